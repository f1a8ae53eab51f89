"""Correctness of the Pallas attention kernels on the device they will run on.

    python -m bench gpu_check [--json out.json] [--model] [--small]

Kernel (``omni_jax.kernels.attention``) against the XLA reference (``xla_attention``) on fresh
random inputs, relative L2 error of the output and of dQ, dK, dV: causal (with left padding,
with a KV-cache chunk), segment ids (vision windows), block band + key padding (DiT), key
padding alone (audio encoder), decode (one query against a cache); GQA and MHA; head dims 64,
80 and 128; float32 and bfloat16. Float32 cases run twice: under
``jax.default_matmul_precision("highest")`` (the kernel uses 3-pass TF32 dots, the reference
true float32: both near float32 accuracy) and under the default precision (both one-pass TF32
on a GPU). ``--model`` adds the whole embedded default model with ``attention="pallas"`` against
``attention="xla"`` (thinker logits; generated text, codec ids and waveform).

Every case is guarded: a failure is recorded and the others still run. Exit status 1 if any
case fails its tolerance or raises. On CPU the kernels run in interpret mode (``--small`` keeps
that quick); this is how the script is checked before it goes to a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from omni_jax.attention import MaskSpec, xla_attention
from omni_jax.kernels import attention as pallas_attention
from omni_jax.kernels import decode_attention

# tolerances on relative L2 error: (forward, gradients)
TOL = {"f32_highest": (2e-5, 1e-4), "f32_default": (5e-3, 1e-2), "bf16": (2e-2, 4e-2)}


def rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def cases(small: bool):
    """name, (b, tq, tk, h, kvh, d), mask kind."""
    s = (lambda n: max(8, n // 8)) if small else (lambda n: n)
    return [
        ("causal gqa8 d128", (1, s(1000), s(1000), 16, 2, 128), "causal"),
        ("causal+leftpad gqa4 d128", (2, s(300), s(300), 8, 2, 128), "causal_pad"),
        ("causal talker gqa7 d64", (2, s(257), s(257), 14, 2, 64), "causal"),
        ("cache chunk gqa4 d128", (2, 37, 256, 8, 2, 128), "chunk"),
        ("segments mha d80", (1, s(400), s(400), 16, 16, 80), "seg"),
        ("band(1,1)+valid mha d64", (2, s(333), s(333), 16, 16, 64), "band"),
        ("band(0,0) mha d64", (2, s(200), s(200), 16, 16, 64), "band0"),
        ("key padding mha d64 (audio)", (2, s(250), s(250), 20, 20, 64), "pad"),
        ("decode gqa8 d128", (4, 1, s(1000) + 24, 16, 2, 128), "decode"),
        ("decode gqa7 d64", (3, 1, 300, 14, 2, 64), "decode"),
        ("causal+leftpad b8 gqa8 d128 (256-row blocks)", (8, s(1024), s(1024), 16, 2, 128), "causal_pad"),
    ]


def make_mask(kind, b, tq, tk):
    if kind == "causal":
        return MaskSpec(causal=True)
    if kind == "causal_pad":
        return MaskSpec(causal=True, kv_valid=jnp.arange(tk)[None, :] >= (jnp.arange(b) * 17)[:, None])
    if kind == "chunk":  # a tq-token chunk written at slots 100.., row 1 left-padded by 120 (some rows see nothing)
        valid = (jnp.arange(tk)[None] >= jnp.asarray([0, 120])[:, None]) & (jnp.arange(tk)[None] < 100 + tq)
        return MaskSpec(causal=True, q_slots=100 + jnp.arange(tq), kv_valid=valid)
    if kind == "seg":
        seg = jnp.asarray(np.minimum(np.arange(tk) // 64 + (np.arange(tk) > tk // 3), 1000))[None]
        return MaskSpec(q_segment_ids=seg, kv_segment_ids=seg)
    if kind == "band":
        valid = jnp.arange(tk)[None, :] < jnp.asarray([tk, tk - 50])[:, None]
        return MaskSpec(block_band=(24, 1, 1), kv_valid=valid)
    if kind == "band0":
        return MaskSpec(block_band=(24, 0, 0), kv_valid=jnp.ones((b, tk), bool))
    if kind == "pad":
        return MaskSpec(kv_valid=jnp.arange(tk)[None, :] < jnp.asarray([tk, tk - 77])[:, None])
    if kind == "decode":
        lens = jnp.asarray(([tk, tk // 2 + 3, 1, 513 % tk] * 2)[:b])
        return MaskSpec(causal=True, q_slots=(lens - 1)[:, None], kv_valid=jnp.arange(tk)[None] < lens[:, None])
    raise KeyError(kind)


def run_case(name, shape, kind, dtype, prec, seed):
    b, tq, tk, h, kvh, d = shape
    key = jax.random.PRNGKey(seed)
    ks = jax.random.split(key, 4)
    q = jax.random.normal(ks[0], (b, tq, h, d), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (b, tk, kvh, d), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (b, tk, kvh, d), jnp.float32).astype(dtype)
    mask = make_mask(kind, b, tq, tk)
    tag = "bf16" if dtype == jnp.bfloat16 else f"f32_{prec}"
    tol_f, tol_g = TOL[tag]
    row = {"case": name, "dtype": tag, "shape": list(shape)}
    t0 = time.perf_counter()
    with jax.default_matmul_precision(None if prec == "default" else prec):
        ref = jax.jit(lambda q, k, v: xla_attention(q, k, v, mask))(q, k, v)
        # decode: the kernel itself (kernels.attention sends one-query calls on a GPU to XLA)
        kern = decode_attention if kind == "decode" else pallas_attention
        got = jax.jit(lambda q, k, v: kern(q, k, v, mask))(q, k, v)
        row["finite"] = bool(np.all(np.isfinite(np.asarray(got, np.float32))))
        row["fwd_rel"] = rel(got, ref)
        ok = row["finite"] and row["fwd_rel"] <= tol_f
        if True:  # decode differentiates through the XLA reference; checked too
            w = jax.random.normal(ks[3], ref.shape, jnp.float32)
            lf = lambda fn: (lambda q, k, v: jnp.sum(fn(q, k, v, mask).astype(jnp.float32) * w))
            g_ref = jax.jit(jax.grad(lf(xla_attention), (0, 1, 2)))(q, k, v)
            g_got = jax.jit(jax.grad(lf(kern), (0, 1, 2)))(q, k, v)
            for n, a, r in zip("qkv", g_got, g_ref):
                row[f"d{n}_rel"] = rel(a, r)
                ok = ok and np.all(np.isfinite(np.asarray(a, np.float32))) and row[f"d{n}_rel"] <= tol_g
    row["ok"] = bool(ok)
    row["tol"] = [tol_f, tol_g]
    row["s"] = round(time.perf_counter() - t0, 1)
    return row


def model_check(rows):
    """The embedded default model (float32) with attention="pallas" against attention="xla"."""
    import omni_jax

    path = omni_jax.default_model_path()
    t0 = time.perf_counter()
    pal = omni_jax.load(path, dtype="float32", attention="pallas")
    xla = omni_jax.load(path, dtype="float32", attention="xla")
    vocab = pal.config.thinker.text.vocab_size
    ids = np.random.RandomState(4).randint(0, min(vocab, 280), (2, 23))
    mask = np.ones_like(ids)
    mask[0, :5] = 0
    a = np.asarray(pal.thinker_logits(ids, mask), np.float32)
    b = np.asarray(xla.thinker_logits(ids, mask), np.float32)
    keep = mask.astype(bool)
    r = {"case": "model: thinker logits (left-padded batch)", "dtype": "f32_default", "fwd_rel": rel(a[keep], b[keep])}
    r["ok"] = r["fwd_rel"] <= 5e-3
    rows.append(r)
    print(r, flush=True)
    kw = dict(max_new_tokens=6, eos_token_id=[], return_audio=True, talker_do_sample=False,
              talker_max_new_tokens=40, talker_min_new_tokens=30)
    ga, gb = pal.generate(ids, mask, **kw), xla.generate(ids, mask, **kw)
    same_text = bool(np.array_equal(ga.sequences, gb.sequences))
    same_codes = all(np.array_equal(x, y) for x, y in zip(ga.codec_ids, gb.codec_ids))
    wav = [rel(x, y) for x, y in zip(ga.audio, gb.audio)] if same_codes else None
    r = {"case": "model: generate text+codes+audio", "dtype": "f32_default", "same_text": same_text,
         "same_codes": same_codes, "wav_rel": wav, "s": round(time.perf_counter() - t0, 1)}
    # greedy ids may legitimately flip on a near-tie under TF32; the waveform is compared when codes agree
    r["ok"] = same_text and (wav is None or max(wav) <= 1e-2)
    rows.append(r)
    print(r, flush=True)
    # the DiT as the model runs it: float32 under "highest" (token2wav.MATMUL_PRECISION)
    from omni_jax import token2wav

    t2w = pal.token2wav_params
    dcfg = pal.config.token2wav.dit
    voice = next(iter(pal.voices.values()))
    codes = np.random.RandomState(1).randint(0, dcfg.num_embeds - 1, (1, 96)).astype(np.int32)
    noise = np.asarray(token2wav.dit_noise(jax.random.PRNGKey(2), dcfg, 1, 96))
    mels = [np.asarray(token2wav.dit_sample(t2w.code2wav_dit_model, dcfg, codes, voice.cond, voice.ref_mel, noise,
                                            impl=impl)) for impl in ("pallas", "xla")]
    r = {"case": "model: DiT mel, 96 codes (highest precision)", "dtype": "f32_highest", "fwd_rel": rel(*mels)}
    r["ok"] = r["fwd_rel"] <= 1e-4
    rows.append(r)
    print(r, flush=True)


def long_prefill_check(rows, t=8192):
    """The default GPU tiles at the benchmark's shape: 8k causal, 16/2 heads, d128, bf16, forward,
    against XLA attention and cuDNN."""
    ks = jax.random.split(jax.random.PRNGKey(int(time.time()) % 10000), 3)
    q = jax.random.normal(ks[0], (1, t, 16, 128), jnp.bfloat16)
    k = jax.random.normal(ks[1], (1, t, 2, 128), jnp.bfloat16)
    v = jax.random.normal(ks[2], (1, t, 2, 128), jnp.bfloat16)
    mask = MaskSpec(causal=True)
    got = jax.jit(lambda q, k, v: pallas_attention(q, k, v, mask))(q, k, v)
    ref = jax.jit(lambda q, k, v: xla_attention(q, k, v, mask))(q, k, v)
    r = {"case": f"causal {t} gqa8 d128 default tiles vs xla", "dtype": "bf16", "fwd_rel": rel(got, ref)}
    try:
        cud = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                   implementation="cudnn"))(q, k, v)
        r["fwd_rel_vs_cudnn"] = rel(got, cud)
        r["cudnn_rel_vs_xla"] = rel(cud, ref)
    except Exception as e:
        r["cudnn_error"] = str(e).splitlines()[0][:200]
    r["ok"] = bool(np.isfinite(r["fwd_rel"]) and r["fwd_rel"] <= 2e-2)
    rows.append(r)
    print(r, flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json")
    ap.add_argument("--small", action="store_true", help="short sequences (CPU interpret mode)")
    ap.add_argument("--model", action="store_true", help="also the whole default model, pallas vs xla")
    ap.add_argument("--only-model", action="store_true")
    ap.add_argument("--long", action="store_true", help="also 8k causal prefill with the default tiles")
    ap.add_argument("--cases", type=int, nargs="+", help="indices into the case list (default: all)")
    ap.add_argument("--dtypes", nargs="+", choices=["f32", "bf16"], default=["f32", "bf16"])
    a = ap.parse_args(argv)
    out = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "jax": jax.__version__,
           "date": time.strftime("%Y-%m-%d"), "command": "python -m bench gpu_check " + " ".join(argv or sys.argv[1:]),
           "rows": []}
    print({k: v for k, v in out.items() if k != "rows"}, flush=True)

    def save():
        if a.json:
            with open(a.json, "w") as f:
                json.dump(out, f, indent=1)

    seed = int(time.time()) % 10000  # fresh inputs every run
    out["seed"] = seed
    if not a.only_model:
        for i, (name, shape, kind) in enumerate(cases(a.small)):
            if a.cases is not None and i not in a.cases:
                continue
            variants = [(jnp.float32, "highest"), (jnp.bfloat16, "default")]
            if kind in ("causal_pad", "seg", "band"):  # one-pass TF32 (the GPU default) on a few
                variants.insert(1, (jnp.float32, "default"))
            variants = [(dt, p) for dt, p in variants if ("bf16" if dt == jnp.bfloat16 else "f32") in a.dtypes]
            for dtype, prec in variants:
                try:
                    row = run_case(name, shape, kind, dtype, prec, seed + i)
                except Exception as e:
                    row = {"case": name, "dtype": str(jnp.dtype(dtype)), "prec": prec, "ok": False,
                           "error": "".join(traceback.format_exception_only(type(e), e))[-600:]}
                out["rows"].append(row)
                print(row, flush=True)
                save()
    if a.long:
        try:
            long_prefill_check(out["rows"])
        except Exception as e:
            out["rows"].append({"case": "long prefill", "ok": False, "error": str(e)[-400:]})
        save()
    if a.model or a.only_model:
        try:
            model_check(out["rows"])
        except Exception as e:
            out["rows"].append({"case": "model", "ok": False,
                                "error": "".join(traceback.format_exception_only(type(e), e))[-600:]})
            print(out["rows"][-1], flush=True)
        save()
    bad = [r for r in out["rows"] if not r.get("ok")]
    print(f"gpu_check: {len(out['rows']) - len(bad)}/{len(out['rows'])} ok", flush=True)
    for r in bad:
        print("FAILED", r, flush=True)
    out["all_ok"] = not bad
    save()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
