"""Peak resident memory of ``omni-jax convert`` (and ``export``) on a large synthetic checkpoint.

    python -m bench convert_memory --size-gb 8 --shards 16 [--dtype bfloat16] [--export] [--json out.json]

Builds a thinker-only Qwen2.5-Omni checkpoint of about ``--size-gb`` GB of bfloat16 tensors in
``--shards`` safetensors shards (7B widths from 6 GB up: hidden 3584, MLP 18944, vocab 152064,
untied head; narrower below; the layer count is chosen to reach the size). Tensors are written
streaming, in 64 MiB chunks of random bits (exponents bounded, so no NaN/Inf; not compressible
like constant data would be), so building it needs little memory. The conversion then runs in a
fresh subprocess, which reports its own peak RSS (``getrusage``; ``psutil`` sampling as a cross-check)
and its RSS after imports; the figure to compare is peak RSS against
``3 GiB + the largest single tensor``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from .util import write_json

GiB = 1 << 30


def synthetic_config(size_gb: float, widths: str | None = None) -> tuple[dict, int]:
    from omni_jax.config import preset

    cfg = preset("7b").to_dict()
    text = cfg["thinker_config"]["text_config"]
    if widths == "7b" or (widths is None and size_gb >= 6):
        w = dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                 head_dim=128, vocab_size=152064)
    else:
        w = dict(hidden_size=1024, intermediate_size=5632, num_attention_heads=8, num_key_value_heads=2,
                 head_dim=128, vocab_size=65536)
    h, f, v = w["hidden_size"], w["intermediate_size"], w["vocab_size"]
    kv = w["num_key_value_heads"] * w["head_dim"]
    per_layer = 2 * (2 * h * h + 2 * h * kv + 3 * h * f + 2 * kv + h + 2 * h)  # bf16 bytes
    embeds = 2 * 2 * v * h
    layers = max(1, int(round((size_gb * 1e9 - embeds) / per_layer)))
    text.update(w, num_hidden_layers=layers)
    cfg["thinker_config"]["tie_word_embeddings"] = False
    return cfg, layers


def hf_tensors(cfg: dict) -> list[tuple[str, tuple]]:
    """(HF key, HF shape) of every thinker LM tensor the config implies."""
    import jax.numpy as jnp
    from flax import nnx

    from omni_jax.checkpoint.components import build_abstract
    from omni_jax.checkpoint.tree import flatten_dict, hf_name, stack_index
    from omni_jax.config import OmniConfig
    from omni_jax.thinker import THINKER_LM_PREFIXES

    ocfg = OmniConfig.from_dict(cfg)
    _, state = build_abstract(ocfg, "thinker", jnp.bfloat16)
    out = []
    for path, sds in flatten_dict(nnx.to_pure_dict(state)):
        shape = tuple(sds.shape)
        stacked = stack_index(path) is not None
        for layer in (range(shape[0]) if stacked else [None]):
            key, tr = hf_name(path, THINKER_LM_PREFIXES, layer=layer)
            s = shape[1:] if stacked else shape
            out.append((key, tuple(reversed(s)) if tr else s))
    return out


def _chunks(shape, rng_block: np.ndarray, salt: int):
    import ml_dtypes

    n = int(np.prod(shape))
    step = rng_block.size
    for i, s in enumerate(range(0, n, step)):
        m = min(step, n - s)
        bits = (rng_block[:m] ^ np.uint16((salt * 7919 + i * 104729) & 0x3FFF)) & np.uint16(0xBFFF)
        yield bits.view(ml_dtypes.bfloat16)


def build_checkpoint(directory: str, size_gb: float, shards: int, widths: str | None = None) -> dict:
    import ml_dtypes

    from omni_jax.checkpoint.safetensors_io import SafetensorsWriter

    cfg, layers = synthetic_config(size_gb, widths)
    tensors = hf_tensors(cfg)
    sizes = [int(np.prod(s)) * 2 for _, s in tensors]
    total = sum(sizes)
    target = total / shards
    groups, cur, acc = [], [], 0
    for t, n in zip(tensors, sizes):
        if cur and acc + n > target and len(groups) < shards - 1:
            groups.append(cur)
            cur, acc = [], 0
        cur.append(t)
        acc += n
    groups.append(cur)
    os.makedirs(directory, exist_ok=True)
    rng_block = np.random.default_rng(0).integers(0, 1 << 16, 32 << 20, dtype=np.uint16)  # 64 MiB
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    weight_map = {}
    bf16 = np.dtype(ml_dtypes.bfloat16)
    salt = 0
    for name, group in zip(names, groups):
        w = SafetensorsWriter(os.path.join(directory, name), [(k, bf16, s) for k, s in group],
                              metadata={"format": "pt"})
        for k, s in group:
            w.write_chunks(k, _chunks(s, rng_block, salt))
            salt += 1
            weight_map[k] = name
        w.close()
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg, f)
    return {"bytes": total, "tensors": len(tensors), "shards": len(groups), "layers": layers,
            "largest_tensor_bytes": max(sizes)}


_CHILD = r"""
import json, os, resource, sys, threading, time
import psutil
proc = psutil.Process()
peak = [0]
stop = threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.05)
import jax, orbax.checkpoint, flax  # noqa: F401  (imports counted in the baseline)
from convert.convert import convert
from convert.export import export
base = proc.memory_info().rss
th = threading.Thread(target=sample, daemon=True); th.start()
op, src, dst, dtype = sys.argv[1:5]
t = time.time()
if op == "convert":
    convert(src, dst, dtype=dtype, progress=False)
else:
    export(src, dst, progress=False)
dt = time.time() - t
stop.set(); th.join()
print(json.dumps({"seconds": dt, "baseline_rss": base, "peak_rss_sampled": peak[0],
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def run_child(op: str, src: str, dst: str, dtype: str) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", _CHILD, op, src, dst, dtype], cwd=root, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{op} failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench convert_memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=8.0)
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--widths", default=None, choices=["7b", "small"],
                    help="tensor widths (default: 7B's from 6 GB up); 7b at a smaller size keeps its 1 GiB tensors")
    ap.add_argument("--workdir", default=None, help="where to build (default: a new temporary directory; needs "
                    "about 2x --size-gb of disk, 3x with --export)")
    ap.add_argument("--export", action="store_true", help="also measure export back to safetensors")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    work = args.workdir or tempfile.mkdtemp(prefix="convert-bench-")
    os.makedirs(work, exist_ok=True)
    try:
        t = time.time()
        info = build_checkpoint(os.path.join(work, "hf"), args.size_gb, args.shards, args.widths)
        info["build_seconds"] = time.time() - t
        print(f"synthetic checkpoint: {info['bytes'] / 1e9:.2f} GB, {info['tensors']} tensors in {info['shards']} "
              f"shards, {info['layers']} layers, largest tensor {info['largest_tensor_bytes'] / GiB:.3f} GiB "
              f"(built in {info['build_seconds']:.0f} s)")
        bound = 3 * GiB + info["largest_tensor_bytes"]  # the largest source tensor, whatever --dtype
        res = {"checkpoint": info, "dtype": args.dtype, "bound_bytes": bound}
        ops = [("convert", os.path.join(work, "hf"), os.path.join(work, "orbax"))]
        if args.export:
            ops.append(("export", os.path.join(work, "orbax"), os.path.join(work, "hf_back")))
        ok = True
        for op, src, dst in ops:
            r = run_child(op, src, dst, args.dtype)
            res[op] = r
            peak = max(r["peak_rss"], r["peak_rss_sampled"])
            ok &= peak <= bound
            print(f"{op}: {r['seconds']:.1f} s ({info['bytes'] / r['seconds'] / 1e6:.0f} MB/s), peak RSS "
                  f"{peak / GiB:.2f} GiB (after imports {r['baseline_rss'] / GiB:.2f} GiB); bound 3 GiB + largest "
                  f"tensor = {bound / GiB:.2f} GiB: {'OK' if peak <= bound else 'OVER'}")
        res["ok"] = bool(ok)
        write_json(args.json, res)
        return 0 if ok else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
