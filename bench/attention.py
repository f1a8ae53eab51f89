"""Attention kernels against XLA and cuDNN on a GPU.

    python -m bench attention [--json out.json] [--quick] [--no-check] [--sweep]
                              [--only sweep prefill bwd dit decode decode_sweep]

* a correctness check of the Pallas kernels against the XLA reference on this device
  (forward, gradients, decode, band, segments, head dim 80), so the timings are of kernels
  that give the right numbers;
* causal prefill at 8k, 25k and 32k tokens with the 3B thinker's head shapes (16 heads,
  2 KV heads, head dim 128, bfloat16): time and peak temporary memory (XLA's compiled
  memory analysis: bytes beyond inputs and outputs) for the Pallas kernel, XLA attention
  and ``jax.nn.dot_product_attention(implementation="cudnn")``; forward + backward at 8k;
* the DiT's block-band attention (16 heads, head dim 64, block 24, float32, CFG batch 2) at
  4k mel frames against the dense masked XLA path;
* decode attention (the split-K kernel called directly; one query per sequence against an
  8k / 32k cache) against XLA; ``decode_sweep`` varies its key block and split count;
* ``--sweep``: Triton tile parameters of the causal prefill at 8k, and JAX's own Pallas-Triton
  flash attention as a yardstick.

Results of the H100 runs: ``bench/results/h100_attention.json``; correctness on the device:
``python -m bench gpu_check``.

Needs a GPU; on CPU it says so and exits 0. Timings are medians of ``--reps`` runs after a
warm-up; bf16 inputs with float32 softmax; the DiT case uses JAX's default float32 matmul
precision on GPU (TF32).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from omni_jax.attention import MaskSpec, xla_attention
from omni_jax.kernels import attention as pallas_attention
from omni_jax.kernels import decode_attention


def _rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _timeit(f, args, reps, inner=4):
    """Median over ``reps`` of the mean time of ``inner`` back-to-back calls (one sync per rep, so
    host dispatch overlaps the device work as in a real pipeline)."""
    out = f(*args)
    jax.block_until_ready(out)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(inner):
            out = f(*args)
        jax.block_until_ready(out)
        ts.append((time.perf_counter() - t) / inner)
    return float(np.median(ts))


def _chain(fn, n):
    """``n`` dependent calls in one jitted program (each query depends on the last output), so
    that per-call dispatch does not hide a microsecond kernel."""

    def g(q, k, v):
        def body(_, q):
            return (q.astype(jnp.float32) + 1e-3 * fn(q, k, v).astype(jnp.float32)).astype(q.dtype)

        return jax.lax.fori_loop(0, n, body, q)

    return g


def _measure(name, fn, args, reps, inner=1):
    """{ms per call, temp MiB} or the error (OOM of the dense path is an expected result)."""
    f = jax.jit(fn if inner == 1 else _chain(fn, inner))
    try:
        comp = f.lower(*args).compile()
        mem = comp.memory_analysis()
        temp = int(getattr(mem, "temp_size_in_bytes", -1)) if mem is not None else -1
        sec = _timeit(comp, args, reps) / inner
        return {"impl": name, "ms": sec * 1e3, "temp_MiB": temp / 2 ** 20}
    except Exception as e:  # OOM for the dense path at long lengths is an expected result
        msg = str(e).splitlines()[0][:160]
        return {"impl": name, "error": msg}


def check(key):
    """Kernels vs XLA on this device; returns the rows and raises if one is off."""
    rows = []
    ks = jax.random.split(key, 8)

    def rnd(k, shape, dt):
        return jax.random.normal(k, shape, jnp.float32).astype(dt)

    cases = [
        ("causal+leftpad f32 d128", 2, 300, 300, 8, 2, 128, jnp.float32, "causal"),
        ("causal bf16 d128", 1, 512, 512, 16, 2, 128, jnp.bfloat16, "causal"),
        ("segments f32 d80", 1, 400, 400, 4, 4, 80, jnp.float32, "seg"),
        ("band+valid f32 d64", 2, 333, 333, 4, 4, 64, jnp.float32, "band"),
        ("decode bf16 d128", 4, 1, 1000, 16, 2, 128, jnp.bfloat16, "decode"),
    ]
    for name, b, tq, tk, h, kvh, d, dt, kind in cases:
        q, k, v = rnd(ks[0], (b, tq, h, d), dt), rnd(ks[1], (b, tk, kvh, d), dt), rnd(ks[2], (b, tk, kvh, d), dt)
        if kind == "causal":
            valid = jnp.arange(tk)[None, :] >= (jnp.arange(b) * 17)[:, None]
            mask = MaskSpec(causal=True, kv_valid=valid)
        elif kind == "seg":
            seg = (jnp.arange(tk) // 64)[None]
            mask = MaskSpec(q_segment_ids=seg, kv_segment_ids=seg)
        elif kind == "band":
            valid = jnp.arange(tk)[None, :] < jnp.array([tk, tk - 50])[:, None]
            mask = MaskSpec(block_band=(24, 1, 1), kv_valid=valid)
        else:
            lens = jnp.array([1000, 700, 1, 513])
            mask = MaskSpec(causal=True, q_slots=(lens - 1)[:, None], kv_valid=jnp.arange(tk)[None] < lens[:, None])
        with jax.default_matmul_precision("highest"):
            ref = jax.jit(lambda q, k, v: xla_attention(q, k, v, mask))(q, k, v)
            kern = decode_attention if kind == "decode" else pallas_attention
            got = jax.jit(lambda q, k, v: kern(q, k, v, mask))(q, k, v)
            row = {"case": name, "fwd_rel": _rel(got, ref)}
            if kind != "decode":
                w = jax.random.normal(ks[3], ref.shape, jnp.float32)
                lf = lambda fn: (lambda q, k, v: jnp.sum(fn(q, k, v, mask).astype(jnp.float32) * w))
                g_ref = jax.jit(jax.grad(lf(xla_attention), (0, 1, 2)))(q, k, v)
                g_got = jax.jit(jax.grad(lf(pallas_attention), (0, 1, 2)))(q, k, v)
                row.update({f"d{n}_rel": _rel(a, r) for n, a, r in zip("qkv", g_got, g_ref)})
        rows.append(row)
        print("check", row, flush=True)
    return rows


def prefill(lengths, reps, key):
    rows = []
    h, kvh, d = 16, 2, 128
    for t in lengths:
        k1, k2, k3 = jax.random.split(jax.random.fold_in(key, t), 3)
        q = jax.random.normal(k1, (1, t, h, d), jnp.bfloat16)
        k = jax.random.normal(k2, (1, t, kvh, d), jnp.bfloat16)
        v = jax.random.normal(k3, (1, t, kvh, d), jnp.bfloat16)
        mask = MaskSpec(causal=True)
        impls = {
            "pallas": lambda q, k, v: pallas_attention(q, k, v, mask),
            "xla": lambda q, k, v: xla_attention(q, k, v, mask),
            "cudnn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"),
        }
        flops = 4 * t * t * h * d / 2  # causal: half the score matrix
        for name, fn in impls.items():
            if name == "xla" and t > 25000:
                r = {"impl": name, "error": f"skipped: the [16, T, T] float32 scores alone are "
                                            f"{16 * t * t * 4 / 2 ** 30:.0f} GiB"}
            else:
                r = _measure(name, fn, (q, k, v), reps)
            r.update(case="prefill_causal", T=t)
            if "ms" in r:
                r["TFLOPs"] = flops / (r["ms"] * 1e-3) / 1e12
            rows.append(r)
            print(r, flush=True)
    return rows


def prefill_bwd(t, reps, key):
    rows = []
    h, kvh, d = 16, 2, 128
    k1, k2, k3 = jax.random.split(key, 3)
    q = jax.random.normal(k1, (1, t, h, d), jnp.bfloat16)
    k = jax.random.normal(k2, (1, t, kvh, d), jnp.bfloat16)
    v = jax.random.normal(k3, (1, t, kvh, d), jnp.bfloat16)
    mask = MaskSpec(causal=True)
    impls = {
        "pallas": lambda q, k, v: pallas_attention(q, k, v, mask),
        "xla": lambda q, k, v: xla_attention(q, k, v, mask),
        "cudnn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"),
    }
    for name, fn in impls.items():
        g = jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v).astype(jnp.float32)), (0, 1, 2))
        r = _measure(name, g, (q, k, v), reps)
        r.update(case="prefill_causal_fwd_bwd", T=t)
        rows.append(r)
        print(r, flush=True)
    return rows


def dit_band(frames, reps, key):
    rows = []
    h, d, bs = 16, 64, 24
    k1, k2, k3 = jax.random.split(key, 3)
    q = jax.random.normal(k1, (2, frames, h, d), jnp.float32)
    k = jax.random.normal(k2, (2, frames, h, d), jnp.float32)
    v = jax.random.normal(k3, (2, frames, h, d), jnp.float32)
    valid = jnp.ones((2, frames), bool)
    for band in [(1, 1), (0, 0)]:
        mask = MaskSpec(block_band=(bs,) + band, kv_valid=valid)
        for name, fn in {"pallas": lambda q, k, v: pallas_attention(q, k, v, mask),
                         "xla_dense_masked": lambda q, k, v: xla_attention(q, k, v, mask)}.items():
            r = _measure(name, fn, (q, k, v), reps)
            r.update(case="dit_band", frames=frames, band=list(band))
            rows.append(r)
            print(r, flush=True)
    return rows


def decode(caches, batches, reps, key):
    rows = []
    h, kvh, d = 16, 2, 128
    for s in caches:
        for b in batches:
            k1, k2, k3 = jax.random.split(jax.random.fold_in(key, s * 10 + b), 3)
            q = jax.random.normal(k1, (b, 1, h, d), jnp.bfloat16)
            k = jax.random.normal(k2, (b, s, kvh, d), jnp.bfloat16)
            v = jax.random.normal(k3, (b, s, kvh, d), jnp.bfloat16)
            pos = jnp.full((b,), s - 1)  # a full cache: every key is read
            mask = MaskSpec(causal=True, q_slots=pos[:, None], kv_valid=jnp.ones((b, s), bool))
            kv_bytes = 2 * b * s * kvh * d * 2
            # the kernel itself (kernels.attention sends one-query calls on a GPU to XLA)
            for name, fn in {"pallas": lambda q, k, v: decode_attention(q, k, v, mask),
                             "xla": lambda q, k, v: xla_attention(q, k, v, mask)}.items():
                r = _measure(name, fn, (q, k, v), reps, inner=32)
                r.update(case="decode", cache=s, batch=b)
                if "ms" in r:
                    r["GBs"] = kv_bytes / (r["ms"] * 1e-3) / 1e9
                rows.append(r)
                print(r, flush=True)
    return rows


SWEEP = [  # (rows per query block, keys per key block, num_warps, num_stages, exp2)
    (128, 64, 8, 2, False), (128, 64, 8, 3, True), (128, 128, 8, 3, True), (256, 64, 8, 3, True),
    (256, 64, 8, 4, True), (256, 32, 8, 3, True), (256, 32, 8, 4, True), (256, 64, 16, 3, True),
    (256, 128, 8, 3, True), (512, 32, 8, 3, True),
]
DECODE_SWEEP = [(None, None), (64, 32), (128, 8), (256, 4)]  # (block_k, splits)


def decode_sweep(caches, batches, reps, key):
    """Decode kernel key-block size and split count (None: the defaults) against XLA."""
    from omni_jax.kernels import decode_attention

    rows = []
    h, kvh, d = 16, 2, 128
    for s in caches:
        for b in batches:
            k1, k2, k3 = jax.random.split(jax.random.fold_in(key, s * 10 + b), 3)
            q = jax.random.normal(k1, (b, 1, h, d), jnp.bfloat16)
            k = jax.random.normal(k2, (b, s, kvh, d), jnp.bfloat16)
            v = jax.random.normal(k3, (b, s, kvh, d), jnp.bfloat16)
            mask = MaskSpec(causal=True, q_slots=jnp.full((b, 1), s - 1), kv_valid=jnp.ones((b, s), bool))
            kv_bytes = 2 * b * s * kvh * d * 2
            for bk, sp in DECODE_SWEEP:
                fn = lambda q, k, v, bk=bk, sp=sp: decode_attention(q, k, v, mask, block_k=bk, splits=sp)
                r = _measure(f"pallas decode bk={bk} splits={sp}", fn, (q, k, v), reps, inner=32)
                r.update(case="decode_sweep", cache=s, batch=b, block_k=bk, splits=sp)
                if "ms" in r:
                    r["GBs"] = kv_bytes / (r["ms"] * 1e-3) / 1e9
                rows.append(r)
                print(r, flush=True)
    return rows


def sweep(t, reps, key, configs=None):
    """Triton tile parameters of the causal prefill kernel (bq rows, bk keys, warps, stages, exp2),
    and JAX's own Pallas-Triton flash attention (``jax.experimental.pallas.ops.gpu.attention``,
    no GQA: K/V repeated to 16 heads) as a yardstick for what the Triton backend reaches."""
    from omni_jax.kernels import flash_attention

    h, kvh, d = 16, 2, 128
    k1, k2, k3 = jax.random.split(key, 3)
    q = jax.random.normal(k1, (1, t, h, d), jnp.bfloat16)
    k = jax.random.normal(k2, (1, t, kvh, d), jnp.bfloat16)
    v = jax.random.normal(k3, (1, t, kvh, d), jnp.bfloat16)
    rows = []
    flops = 4 * t * t * h * d / 2
    for bq, bk, w, st, e2 in configs or SWEEP:
        fn = lambda q, k, v, bq=bq, bk=bk, w=w, st=st, e2=e2: flash_attention(
            q, k, v, MaskSpec(causal=True), block_q=bq, block_k=bk, num_warps=w, num_stages=st, exp2=e2)
        t0 = time.perf_counter()
        r = _measure(f"pallas bq={bq} bk={bk} w={w} s={st} exp2={int(e2)}", fn, (q, k, v), reps)
        r.update(case="sweep", T=t, bq=bq, bk=bk, num_warps=w, num_stages=st, exp2=e2,
                 wall_s=round(time.perf_counter() - t0, 1))
        if "ms" in r:
            r["TFLOPs"] = flops / (r["ms"] * 1e-3) / 1e12
        rows.append(r)
        print(r, flush=True)
    try:
        from jax.experimental.pallas.ops.gpu import attention as jref

        def ref_mha(q, k, v):
            k, v = jnp.repeat(k, h // kvh, axis=2), jnp.repeat(v, h // kvh, axis=2)
            return jref.mha(q, k, v, segment_ids=None, causal=True, sm_scale=d ** -0.5)

        r = _measure("jax.experimental.pallas.ops.gpu.attention.mha (defaults)", ref_mha, (q, k, v), reps)
    except Exception as e:  # the reference kernel's signature moves between JAX versions
        r = {"impl": "jax pallas gpu mha", "error": str(e).splitlines()[0][:160]}
    r.update(case="sweep_reference", T=t)
    if "ms" in r:
        r["TFLOPs"] = flops / (r["ms"] * 1e-3) / 1e12
    rows.append(r)
    print(r, flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the rows here (rewritten after every section)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="8k prefill, 8k decode only")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="also sweep the Triton tile parameters at 8k")
    ap.add_argument("--only", nargs="+", choices=["sweep", "prefill", "bwd", "dit", "decode", "decode_sweep"],
                    help="run only these sections")
    a = ap.parse_args(argv)
    if jax.default_backend() != "gpu":
        print(f"bench.attention: needs a GPU (backend is {jax.default_backend()}); skipping")
        return 0
    import os
    import platform

    key = jax.random.PRNGKey(0)
    out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"),
           "machine": f"{platform.node()}, {os.cpu_count()} CPU cores", "command": "python -m bench attention " +
           " ".join(sys.argv[1:] if argv is None else argv),
           "precision": "bf16 inputs, float32 softmax (prefill, decode); float32 with default (TF32) "
                        "matmul precision (DiT band)", "rows": []}
    print(out, flush=True)

    def save():
        if a.json:
            with open(a.json, "w") as f:
                json.dump(out, f, indent=1)

    only = set(a.only or ["prefill", "bwd", "dit", "decode"] + (["sweep"] if a.sweep else []))
    if not a.no_check:
        out["check"] = check(key)
        save()
    sections = [
        ("sweep", lambda: sweep(8192, a.reps, key)),
        ("prefill", lambda: prefill([8192] if a.quick else [8192, 25000, 32768], a.reps, key)),
        ("bwd", lambda: prefill_bwd(8192, a.reps, key)),
        ("dit", lambda: dit_band(4096, a.reps, key)),
        ("decode", lambda: decode([8192] if a.quick else [8192, 32768], [1, 8], a.reps, key)),
        ("decode_sweep", lambda: decode_sweep([8192, 32768], [1, 8], a.reps, key)),
    ]
    for name, fn in sections:
        if name not in only:
            continue
        t0 = time.perf_counter()
        try:
            out["rows"] += fn()
        except Exception as e:  # one broken section must not lose the others
            out["rows"].append({"case": name, "error": str(e).splitlines()[0][:300]})
            print("section", name, "failed:", e, flush=True)
        print(f"section {name}: {time.perf_counter() - t0:.1f} s", flush=True)
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
