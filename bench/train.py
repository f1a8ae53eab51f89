"""Training throughput: omni-jax's train step against a plain transformers training loop on the
same random-weight thinker, in one run (CPU), and MFU on an accelerator.

    python -m bench train --config bench/configs/cpu_small.json --batch 4 --seq 256 --json bench/results/cpu_train.json
    python -m bench train --preset 3b --dtype bfloat16 --batch 8 --seq 2048 --no-torch   # GPU/TPU: MFU

Both sides run the same step: forward, token cross-entropy on every position, backward, AdamW
update (float32 on CPU). omni-jax's step is one jitted program (chunked cross-entropy, per-layer
remat as ``train`` uses it); transformers' is ``loss.backward(); opt.step()`` with torch's AdamW.
Compile time is reported apart. MFU counts 6 x parameters x tokens plus the attention
(12 x layers x hidden x seq^2 / 2 per sequence, causal) against measured matmul throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np


def _omni_step(model, dtype, remat):
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from omni_jax.training import model_params, train_loss

    params = {"thinker": nnx.to_pure_dict(model_params(model)["thinker"])}
    tx = optax.adamw(1e-5)
    opt = tx.init(params)
    cfg, impl = model.config, model.attention
    cdt = jnp.dtype(dtype)

    def step(p, o, batch):
        def f(q):
            q = jax.tree.map(lambda x: x.astype(cdt), q)
            return train_loss(q, batch, cfg, impl=impl, remat=remat)[0]

        loss, g = jax.value_and_grad(f)(p)
        upd, o = tx.update(g, o, p)
        return optax.apply_updates(p, upd), o, loss

    return jax.jit(step, donate_argnums=(0, 1)), params, opt


def run(args) -> dict:
    import jax

    import omni_jax
    from omni_jax.training import make_batch

    from . import compare

    cfg = json.load(open(args.config)) if args.config else None
    rs = np.random.RandomState(0)
    out: dict = {"device": jax.devices()[0].device_kind, "platform": jax.default_backend(), "batch": args.batch,
                 "seq": args.seq, "dtype": args.dtype, "remat": args.remat,
                 "date": time.strftime("%Y-%m-%d"), "command": "python -m bench train " + " ".join(args.argv)}
    with tempfile.TemporaryDirectory() as d:
        if args.preset:
            from . import thinker as bm

            model = bm.random_model(args.preset, "float32")  # float32 master weights; compute in --dtype
            tm = None
            vocab = model.config.thinker.text.vocab_size
        else:
            tm = compare.build_checkpoint(cfg, d).thinker
            model = omni_jax.load(d, dtype="float32")
            vocab = cfg["text"]["vocab_size"]
        t = model.config.thinker.text
        n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(model.params))
        out["params"] = n_params
        ids = rs.randint(0, vocab - 1, (args.batch, args.seq)).astype(np.int32)
        mask = np.ones_like(ids)
        batch = make_batch(model.config, ids, mask, ids)
        step, p, o = _omni_step(model, args.dtype, args.remat)
        t0 = time.perf_counter()
        p, o, loss = step(p, o, batch)
        loss.block_until_ready()
        out["omni_compile_s"] = time.perf_counter() - t0
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            p, o, loss = step(p, o, batch)
            loss.block_until_ready()
            times.append(time.perf_counter() - t0)
        sec = float(np.median(times))
        tokens = args.batch * args.seq
        out["omni_tokens_per_s"] = tokens / sec
        flops = 6 * n_params * tokens + 12 * t.num_hidden_layers * t.hidden_size * args.seq ** 2 / 2 * args.batch
        out["flops_per_step"] = flops
        if jax.default_backend() != "cpu" or args.mfu:
            from .__main__ import measure_matmul

            import jax.numpy as jnp

            peak = measure_matmul(dtype=jnp.dtype(args.dtype))
            out["matmul_flops_per_s"] = peak
            out["mfu"] = flops / sec / peak
        if tm is not None and not args.no_torch:
            import torch

            if args.threads:
                torch.set_num_threads(args.threads)
            out["torch_threads"] = torch.get_num_threads()
            tm.train()
            opt = torch.optim.AdamW(tm.parameters(), lr=1e-5)
            x = torch.tensor(ids).long()

            def tstep():
                loss = tm(input_ids=x, labels=x).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            tstep()
            tt = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                tstep()
                tt.append(time.perf_counter() - t0)
            out["torch_tokens_per_s"] = tokens / float(np.median(tt))
            out["ratio"] = out["omni_tokens_per_s"] / out["torch_tokens_per_s"]
    return out


def main(argv=None) -> int:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m bench train")
    ap.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "configs", "cpu_small.json"))
    ap.add_argument("--preset", default=None, help="3b or 7b: random weights at a published shape (no torch)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--no-remat", dest="remat", action="store_false")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--mfu", action="store_true", help="also measure matmul throughput on CPU")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    args.argv = argv
    res = run(args)
    print(f"{'':24}{'omni-jax':>12}{'transformers':>14}{'ratio':>8}")
    print(f"{'train tokens/s':24}{res['omni_tokens_per_s']:>12.1f}{res.get('torch_tokens_per_s', float('nan')):>14.1f}"
          f"{res.get('ratio', float('nan')):>8.2f}")
    print(f"compile {res['omni_compile_s']:.1f} s; {res['params'] / 1e6:.1f} M thinker parameters; {res['dtype']}; "
          f"{res['platform']} ({res['device']})" + (f"; MFU {res['mfu']:.1%}" if "mfu" in res else ""))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
