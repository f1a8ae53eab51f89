"""Side by side with transformers on the same random-weight thinker, in one run.

    python -m bench.compare --config bench/configs/cpu_small.json --json bench/results_cpu.json

Measures thinker prefill tokens/s and greedy decode tokens/s at batch 1 and 8 for omni-jax and
transformers (torch CPU, same thread count), prints ratios, the hardware limit beside each
figure (decode: parameter bytes / measured copy bandwidth; prefill: FLOPs / measured matmul
throughput) and writes JSON. Compile time is reported apart from steady-state time. Every
figure is float32 (the CPU precision of both).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np


def _timeit(fn, reps=3):
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def build_checkpoint(cfg: dict, directory: str):
    import torch
    from transformers import Qwen2_5OmniThinkerConfig

    torch.manual_seed(0)
    text = dict(cfg["text"])
    section = text.pop("mrope_section")
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": section}
    tcfg = Qwen2_5OmniThinkerConfig(text_config=text, vision_start_token_id=151652,
                                    audio_config=dict(d_model=32, encoder_layers=1, encoder_attention_heads=2,
                                                      encoder_ffn_dim=32, output_dim=text["hidden_size"]),
                                    vision_config=dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, fullatt_block_indexes=[0],
                                                       out_hidden_size=text["hidden_size"]))
    from transformers import Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration

    full = Qwen2_5OmniForConditionalGeneration(Qwen2_5OmniConfig(thinker_config=tcfg.to_dict(),
                                                                 enable_audio_output=False))
    full.thinker.float().eval()
    full.save_pretrained(directory, max_shard_size="500MB")
    return full.thinker


def measure_bandwidth():
    a = np.ones(1 << 25, np.float32)  # 128 MB
    b = np.empty_like(a)
    t = _timeit(lambda: np.copyto(b, a), 5)
    return 2 * a.nbytes / t


def measure_matmul():
    """Best of numpy's and XLA's float32 matmul throughput (the measured hardware limit)."""
    import jax
    import jax.numpy as jnp

    a = np.random.rand(1024, 1024).astype(np.float32)
    t_np = _timeit(lambda: a @ a, 5)
    x = jnp.asarray(a)
    f = jax.jit(lambda m: m @ m)
    f(x).block_until_ready()
    t_jx = _timeit(lambda: f(x).block_until_ready(), 5)
    return 2 * 1024 ** 3 / min(t_np, t_jx)


def run(cfg: dict) -> dict:
    import jax
    import torch

    import omni_jax

    threads = cfg.get("threads") or os.cpu_count()
    torch.set_num_threads(threads)
    d = tempfile.mkdtemp(prefix="omni-bench-")
    tm = build_checkpoint(cfg, d)
    t0 = time.perf_counter()
    model = omni_jax.load(d, dtype="float32", attention="xla")
    load_s = time.perf_counter() - t0
    pbytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(model.params))
    n_params = pbytes // 4
    # per generated token: every weight but the input embedding table is read once (only B rows of
    # the table are gathered); matmul FLOPs per prompt token likewise exclude the embedding and the
    # LM head (applied to the last position only)
    emb = model.params["embed_tokens"]["embedding"][...]
    emb_bytes = int(np.prod(emb.shape)) * emb.dtype.itemsize
    head_params = 0 if model.params.get("lm_head") is None else int(np.prod(emb.shape))
    step_bytes = pbytes - emb_bytes if head_params else pbytes
    flop_params = n_params - emb_bytes // 4 - head_params
    bw, mm = measure_bandwidth(), measure_matmul()
    v = cfg["text"]["vocab_size"]
    rows = []
    prompt, new = cfg["prompt"], cfg["new_tokens"]
    for b in cfg["batches"]:
        ids = np.random.RandomState(1).randint(0, v, (b, prompt))
        # omni-jax: first call compiles, then steady state
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=new, eos_token_id=[])
        first = time.perf_counter() - t
        steady = _timeit(lambda: model.generate(ids, max_new_tokens=new, eos_token_id=[]), 1)

        def jx_prefill():
            g = model.prefill(ids, max_new_tokens=new, eos_token_id=[])
            jax.block_until_ready(g.state.tokens)
            return g

        jx_pre = _timeit(jx_prefill)

        def jx_decode():
            g2 = model.prefill(ids, max_new_tokens=new, eos_token_id=[])
            jax.block_until_ready(g2.state.tokens)
            t1 = time.perf_counter()
            model.decode_steps(g2, new)
            jax.block_until_ready(g2.state.tokens)
            return time.perf_counter() - t1

        jx_dec = min(jx_decode() for _ in range(2))
        ti = torch.tensor(ids)
        with torch.no_grad():
            pt_pre = _timeit(lambda: tm(input_ids=ti, logits_to_keep=1), 2)
            t = time.perf_counter()
            tm.generate(input_ids=ti, attention_mask=torch.ones_like(ti), max_new_tokens=new, min_new_tokens=new,
                        do_sample=False, pad_token_id=0)
            pt_total = time.perf_counter() - t
        pt_dec = max(pt_total - pt_pre, 1e-9)
        steps = new - 1
        roof_step = step_bytes / bw
        rows.append(dict(
            batch=b, prompt=prompt, new=new, jax_compile_s=round(first - steady, 2),
            prefill_tok_s=dict(jax=round(b * prompt / jx_pre, 1), torch=round(b * prompt / pt_pre, 1),
                               ratio=round(pt_pre / jx_pre, 2),
                               jax_frac_of_matmul_peak=round(2 * flop_params * b * prompt / jx_pre / mm, 3)),
            decode_tok_s=dict(jax=round(b * steps / jx_dec, 1), torch=round(b * steps / pt_dec, 1),
                              ratio=round(pt_dec / jx_dec, 2),
                              jax_frac_of_bandwidth_roofline=round(roof_step / (jx_dec / steps), 3))))
    return dict(machine=f"{os.cpu_count()} CPU cores", backend=jax.default_backend(), jax=jax.__version__,
                torch=torch.__version__, threads=threads, precision="float32", params=n_params,
                param_bytes=pbytes, copy_bandwidth_GBs=round(bw / 1e9, 2), matmul_GFLOPs=round(mm / 1e9, 1),
                load_s=round(load_s, 2), date=time.strftime("%Y-%m-%d"), config=cfg, rows=rows)


def print_table(res: dict) -> None:
    print(f"{res['machine']}, jax {res['jax']} vs torch {res['torch']} ({res['threads']} threads), "
          f"{res['precision']}; copy {res['copy_bandwidth_GBs']} GB/s, matmul {res['matmul_GFLOPs']} GFLOP/s")
    print("batch | prefill tok/s jax / torch (x) [of peak] | decode tok/s jax / torch (x) [of roofline] | compile s")
    for r in res["rows"]:
        p, d = r["prefill_tok_s"], r["decode_tok_s"]
        print(f"{r['batch']:5d} | {p['jax']:9.1f} / {p['torch']:9.1f} ({p['ratio']:.2f}x) [{p['jax_frac_of_matmul_peak']:.2f}]"
              f" | {d['jax']:8.1f} / {d['torch']:8.1f} ({d['ratio']:.2f}x) [{d['jax_frac_of_bandwidth_roofline']:.2f}]"
              f" | {r['jax_compile_s']:.1f}")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.compare")
    p.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "configs", "cpu_small.json"))
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    with open(args.config) as f:
        cfg = json.load(f)
    res = run(cfg)
    print_table(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
