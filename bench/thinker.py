"""Thinker decode/prefill throughput with random weights at a published shape, against the
hardware limit (decode: parameter + KV bytes / measured copy bandwidth; prefill: FLOPs /
measured matmul throughput).

    python -m bench thinker --preset 3b --dtype bfloat16 --batch 1 8 --prompt 512 --new 128 --json out.json
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from .util import check_json_target, write_json


def measure_bandwidth(nbytes=1 << 28, reps=10) -> float:
    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a * 1.0001)
    f(x).block_until_ready()
    t = time.perf_counter()
    for _ in range(reps):
        y = f(x)
    y.block_until_ready()
    return 2 * nbytes * reps / (time.perf_counter() - t)  # read + write


def measure_matmul(n=8192, dtype=jnp.bfloat16, reps=10) -> float:
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t = time.perf_counter()
    for _ in range(reps):
        y = f(a)
    y.block_until_ready()
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def random_model(preset: str, dtype: str):
    from flax import nnx

    import omni_jax
    from omni_jax import OmniModel
    from omni_jax.attention import default_impl
    from omni_jax.thinker import ThinkerLM

    if preset == "default":
        from omni_jax.default_model import default_config

        cfg = default_config()
    else:
        cfg = omni_jax.preset(preset)
    dt = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[dtype]
    from omni_jax.decoder import to_per_layer

    # per-layer buffers (as load() keeps them), freeing the stacked arrays as they are sliced
    graphdef, state = to_per_layer(*nnx.split(ThinkerLM(cfg.thinker, dtype=dt, rngs=nnx.Rngs(0))), free=True)
    return OmniModel(cfg, graphdef, state, processor=None, dtype=dt, mesh=None, attention=default_impl(),
                     generation_config={"eos_token_id": [], "pad_token_id": 0})


def bench_thinker(args) -> dict:
    model = random_model(args.preset, args.dtype)
    t = model.config.thinker.text
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(model.params))
    pbytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(model.params))
    gpu = jax.default_backend() != "cpu"
    bw = measure_bandwidth(1 << 30 if gpu else 1 << 26)
    mm = measure_matmul(8192 if gpu else 1024, jnp.bfloat16 if gpu else jnp.float32)
    rows = []
    for b in args.batch:
        ids = np.random.RandomState(0).randint(0, t.vocab_size, (b, args.prompt))
        # compile + warm up
        t0 = time.perf_counter()
        gen = model.prefill(ids, max_new_tokens=args.new)
        model.decode_steps(gen, args.new)
        jax.block_until_ready(gen.state.tokens)
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        gen = model.prefill(ids, max_new_tokens=args.new)
        jax.block_until_ready(gen.state.tokens)
        prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.decode_steps(gen, args.new)
        jax.block_until_ready(gen.state.tokens)
        decode_s = time.perf_counter() - t0
        steps = args.new - 1
        kv_bytes = 2 * t.num_hidden_layers * b * (args.prompt + args.new) * t.num_key_value_heads * t.head_dim * \
            jnp.dtype(model.dtype).itemsize
        step_limit = (pbytes + kv_bytes / 2) / bw  # weights once per step + on average half the cache
        prefill_flops = 2 * n_params * b * args.prompt
        rows.append(dict(
            batch=b, prompt=args.prompt, new=args.new, compile_s=round(compile_s, 2),
            prefill_tok_s=round(b * args.prompt / prefill_s, 1),
            prefill_frac_of_matmul_peak=round(prefill_flops / prefill_s / mm, 3),
            decode_tok_s=round(b * steps / decode_s, 1), decode_ms_per_step=round(1e3 * decode_s / steps, 3),
            decode_roofline_ms=round(1e3 * step_limit, 3),
            decode_frac_of_roofline=round(step_limit / (decode_s / steps), 3)))
    return dict(device=str(jax.devices()[0].device_kind), backend=jax.default_backend(), jax=jax.__version__,
                preset=args.preset, dtype=args.dtype, attention=model.attention, params=n_params,
                param_bytes=pbytes, copy_bandwidth_GBs=round(bw / 1e9, 1), matmul_TFLOPs=round(mm / 1e12, 1),
                date=time.strftime("%Y-%m-%d"), rows=rows)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    q = argparse.ArgumentParser(prog="python -m bench thinker",
                                description="thinker prefill/decode throughput vs the hardware limit")
    q.add_argument("--preset", default="3b")
    q.add_argument("--dtype", default="bfloat16")
    q.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    q.add_argument("--prompt", type=int, default=512)
    q.add_argument("--new", type=int, default=128)
    q.add_argument("--json", default=None)
    args = q.parse_args(argv)
    check_json_target(args.json)
    res = bench_thinker(args)
    print(f"{res['device']} ({res['backend']}, jax {res['jax']}), {res['preset']} thinker, {res['dtype']}, "
          f"attention={res['attention']}; copy {res['copy_bandwidth_GBs']} GB/s, matmul {res['matmul_TFLOPs']} TFLOP/s")
    print("batch  prefill tok/s  (of peak)  decode tok/s  ms/step  roofline ms  (fraction)  compile s")
    for r in res["rows"]:
        print(f"{r['batch']:5d}  {r['prefill_tok_s']:13.1f}  {r['prefill_frac_of_matmul_peak']:9.3f}  "
              f"{r['decode_tok_s']:12.1f}  {r['decode_ms_per_step']:7.3f}  {r['decode_roofline_ms']:11.3f}  "
              f"{r['decode_frac_of_roofline']:10.3f}  {r['compile_s']:9.2f}")
    write_json(args.json, res)


if __name__ == "__main__":
    sys.exit(main())
