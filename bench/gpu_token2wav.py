"""Token2wav real-time factor (DiT + BigVGAN), random weights, float32 and TF32, against the
matmul throughput the device measures in the same run.

    python -m bench gpu_token2wav [--preset 3b|default] [--codes 250 500]
        [--precision highest tensorfloat32] [--attention pallas|xla] [--torch] [--json out.json]

The DiT (published: 22 layers, 1024 wide, 16 heads, 10 ODE steps with classifier-free guidance,
RK4) and BigVGAN (initial width 1536, 240x upsampling) run as a loaded model runs them (DiT blocks
as per-layer buffers, ``token2wav.dit_per_layer``), in float32 under each ``--precision``
(``jax.default_matmul_precision``): ``highest`` is what the model uses
(``token2wav.MATMUL_PRECISION``: true float32 products), ``tensorfloat32`` is one-pass TF32 on a
GPU, reported separately (on a CPU both are float32). 50 codes are one second of 24 kHz audio.
RTF = wall time / audio seconds (median of ``--reps`` runs after a compiling one).

The hardware limit beside each figure: float32 matmul throughput measured on the device at the
same precision (an ``n x n`` product), against the FLOPs counted from the shapes
(``bench.compare.dit_flops``: linear layers and band attention of every evaluation;
``bench.compare.bigvgan_flops``: every convolution). ``rtf_at_limit`` is the real-time factor if
every FLOP ran at that throughput: a target below it cannot be met at that precision.

``--torch`` also times transformers' ``Qwen2_5OmniToken2WavModel`` at the same shape on the same
device, TF32 off for ``highest`` and on for ``tensorfloat32``, for the ratio. ``--preset default``
runs the embedded default model's token2wav (a quick check of this script on a CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import numpy as np

PRECISIONS = ("highest", "tensorfloat32")


def _median_time(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def token2wav_config(preset: str):
    import omni_jax

    if preset == "default":
        from omni_jax.default_model import default_config

        return default_config().token2wav
    return omni_jax.preset(preset).token2wav


def matmul_limit(precision: str, n: int | None = None) -> float:
    """Measured float32 ``n x n`` matmul FLOP/s at ``precision`` (n: 8192 on an accelerator, 1024
    on a CPU)."""
    import jax
    import jax.numpy as jnp

    from .__main__ import measure_matmul

    with jax.default_matmul_precision(precision):  # the product is traced inside: it takes this precision
        return measure_matmul(n or (1024 if jax.default_backend() == "cpu" else 8192), jnp.float32)


def work(cfg, n_codes: int, steps: int = 10) -> dict:
    """FLOPs of one token2wav call on ``n_codes`` codes and the seconds of audio it makes."""
    from bench.compare import bigvgan_flops, dit_flops

    d, v = dataclasses.asdict(cfg.dit), dataclasses.asdict(cfg.bigvgan)
    frames = n_codes * cfg.dit.repeats
    hop = int(np.prod(cfg.bigvgan.upsample_rates))
    return dict(dit_flops=dit_flops(d, frames, steps)["total"], bigvgan_flops=bigvgan_flops(v, frames),
                audio_s=frames * hop / 24000)


def _sig(x: float, digits: int = 4) -> float:
    """``x`` to ``digits`` significant digits (tiny configurations give tiny figures)."""
    return float(f"{x:.{digits}g}")


def _row(impl, precision, n, w, dit_s, voc_s, limit, **extra):
    """One row: times, real-time factors, and against ``limit`` (FLOP/s at ``precision``) the
    achieved throughput, its share of the limit and the RTF if every FLOP ran at the limit."""
    a = w["audio_s"]
    return dict(impl=impl, precision=precision, codes=n, audio_s=_sig(a), dit_s=_sig(dit_s), bigvgan_s=_sig(voc_s),
                rtf=_sig((dit_s + voc_s) / a), dit_rtf=_sig(dit_s / a), bigvgan_rtf=_sig(voc_s / a),
                dit_tflops=_sig(w["dit_flops"] / dit_s / 1e12), dit_of_limit=_sig(w["dit_flops"] / dit_s / limit),
                bigvgan_tflops=_sig(w["bigvgan_flops"] / voc_s / 1e12),
                bigvgan_of_limit=_sig(w["bigvgan_flops"] / voc_s / limit),
                rtf_at_limit=_sig((w["dit_flops"] + w["bigvgan_flops"]) / limit / a), **extra)


def _inputs(cfg, n):
    """Voice and codes of one call, the same for both implementations (seeded by ``n``)."""
    d = cfg.dit
    rs = np.random.RandomState(n)
    cond = rs.standard_normal((d.enc_emb_dim,)).astype(np.float32)
    ref_mel = rs.standard_normal((300, d.mel_dim)).astype(np.float32)
    codes = rs.randint(0, d.num_embeds - 1, (1, n)).astype(np.int32)
    return cond, ref_mel, codes


def jax_timer(cfg, attention, reps):
    """``time(n, precision) -> row``: omni-jax's token2wav on ``n`` random codes at ``precision``
    (the DiT and BigVGAN built once, random weights)."""
    import jax
    from flax import nnx

    from bench.util import random_module
    from omni_jax import token2wav as T

    dcfg, vcfg = cfg.dit, cfg.bigvgan
    dit = T.dit_per_layer(random_module(lambda: T.DiT(dcfg, rngs=nnx.Rngs(0))), free=True)  # as load() holds it
    voc = random_module(lambda: T.BigVGAN(vcfg, rngs=nnx.Rngs(1)), seed=1)

    def time_one(n, precision):
        cond, ref_mel, codes = _inputs(cfg, n)
        noise = np.asarray(T.dit_noise(jax.random.PRNGKey(n), dcfg, 1, n))
        box = {}

        def dit_call():
            box["mel"] = T.dit_sample(dit, dcfg, codes, cond, ref_mel, noise, impl=attention)
            jax.block_until_ready(box["mel"])

        def voc_call():
            jax.block_until_ready(T.bigvgan(voc, vcfg, box["mel"]))

        saved, T.MATMUL_PRECISION = T.MATMUL_PRECISION, precision  # the public entry points apply it
        try:
            t0 = time.perf_counter()
            dit_call()
            voc_call()
            first = time.perf_counter() - t0
            dit_s, voc_s = _median_time(dit_call, reps), _median_time(voc_call, reps)
        finally:
            T.MATMUL_PRECISION = saved
        return dict(impl=f"omni_jax ({attention} attention)", dit_s=dit_s, bigvgan_s=voc_s,
                    first_call_s=round(first, 1))

    return time_one


def torch_timer(cfg, reps):
    """``time(n, precision) -> row``: transformers' ``Qwen2_5OmniToken2WavModel`` at the same
    shapes (random weights), on the GPU when there is one, TF32 off for ``highest``, on otherwise."""
    import torch
    import transformers
    from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as M
    from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniToken2WavConfig

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    lists = lambda d: {k: list(x) if isinstance(x, tuple) else x for k, x in d.items()}  # noqa: E731
    hf = Qwen2_5OmniToken2WavConfig(dit_config=lists(dataclasses.asdict(cfg.dit)),
                                    bigvgan_config=lists(dataclasses.asdict(cfg.bigvgan)))
    model = M.Qwen2_5OmniToken2WavModel(hf).to(dev).float().eval()
    flags = torch.backends.cuda.matmul, torch.backends.cudnn

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    def time_one(n, precision):
        cond, ref_mel, codes = (torch.tensor(a, device=dev) for a in _inputs(cfg, n))
        box = {}

        def dit_call():
            with torch.no_grad():
                box["mel"] = model.code2wav_dit_model.sample(cond[None], ref_mel[None], codes.long(), num_steps=10,
                                                             guidance_scale=0.5, sway_coefficient=-1.0)
            sync()

        def voc_call():
            with torch.no_grad():
                model.code2wav_bigvgan_model(box["mel"])
            sync()

        tf32 = precision != "highest"
        saved = [f.allow_tf32 for f in flags]
        try:
            for f in flags:
                f.allow_tf32 = tf32
            dit_s, voc_s = _median_time(dit_call, reps), _median_time(voc_call, reps)
        finally:
            for f, x in zip(flags, saved):
                f.allow_tf32 = x
        return dict(impl=f"transformers {transformers.__version__} (torch {torch.__version__}, "
                         f"TF32 {'on' if tf32 else 'off'})", dit_s=dit_s, bigvgan_s=voc_s)

    return time_one


def timed_row(timer, cfg, n, precision, limit) -> dict:
    """One timer's row for ``n`` codes at ``precision``, with the figures against ``limit``."""
    t = timer(n, precision)
    row = _row(t.pop("impl"), precision, n, work(cfg, n), t.pop("dit_s"), t.pop("bigvgan_s"), limit, **t)
    print(row, flush=True)
    return row


def ratios(rows: list) -> list:
    """transformers' time over omni-jax's, per precision and reply length (both sides measured)."""
    out = []
    for r in rows:
        if not r["impl"].startswith("omni_jax"):
            continue
        for t in rows:
            if t["impl"].startswith("transformers") and "dit_s" in t and \
                    (t["precision"], t["codes"]) == (r["precision"], r["codes"]):
                out.append(dict(precision=r["precision"], codes=r["codes"],
                                dit=_sig(t["dit_s"] / r["dit_s"], 3), bigvgan=_sig(t["bigvgan_s"] / r["bigvgan_s"], 3),
                                total=_sig((t["dit_s"] + t["bigvgan_s"]) / (r["dit_s"] + r["bigvgan_s"]), 3)))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench gpu_token2wav")
    p.add_argument("--preset", default="3b", choices=["3b", "7b", "default"],
                   help="token2wav shapes: published (3b and 7b share them) or the embedded default model's")
    p.add_argument("--codes", type=int, nargs="+", default=[250, 500])
    p.add_argument("--precision", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    p.add_argument("--attention", default=None, choices=["pallas", "xla"],
                   help="default: the model's (pallas on a GPU or TPU, xla on a CPU)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--torch", action="store_true", help="also time transformers on the same device")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if min(a.codes) < 1 or a.reps < 1:
        p.error("--codes and --reps must be positive")
    import jax

    from bench.util import write_json
    from omni_jax.attention import default_impl

    cfg = token2wav_config(a.preset)
    a.attention = a.attention or default_impl()
    limits = {pr: matmul_limit(pr) for pr in a.precision}
    out = dict(device=str(jax.devices()[0].device_kind), backend=jax.default_backend(), jax=jax.__version__,
               date=time.strftime("%Y-%m-%d"), preset=a.preset,
               precision="float32 at each row's matmul precision (highest: true float32; tensorfloat32: TF32)",
               matmul_limit_tflops={pr: _sig(x / 1e12) for pr, x in limits.items()},
               command="python -m bench gpu_token2wav " + " ".join(sys.argv[1:] if argv is None else argv), rows=[])
    timers = [jax_timer(cfg, a.attention, a.reps)]
    if a.torch:
        try:
            timers.append(torch_timer(cfg, a.reps))
        except Exception as e:  # report it in the JSON, keep omni-jax's rows
            out["rows"].append({"impl": "transformers", "error": str(e).splitlines()[0][:300]})
    # the most wanted rows first, the JSON rewritten after each: a time limit keeps what finished
    for n in a.codes:
        for timer in timers:
            for pr in a.precision:
                try:
                    out["rows"].append(timed_row(timer, cfg, n, pr, limits[pr]))
                except Exception as e:
                    if timer is timers[0]:
                        raise
                    out["rows"].append({"impl": "transformers", "precision": pr, "codes": n,
                                        "error": str(e).splitlines()[0][:300]})
                out["ratios"] = ratios(out["rows"])
                write_json(a.json, out)
    for r in out["rows"]:
        if "dit_s" in r:
            print(f"{r['impl'][:40]:40s} {r['precision']:14s} {r['codes']:5d} codes: RTF {r['rtf']:.4f} "
                  f"(at the {r['precision']} matmul limit {r['rtf_at_limit']:.4f}); DiT {r['dit_of_limit']:.0%}, "
                  f"BigVGAN {r['bigvgan_of_limit']:.0%} of it")
    for r in out.get("ratios", []):
        print(f"transformers / omni-jax, {r['precision']}, {r['codes']} codes: DiT {r['dit']}x, BigVGAN "
              f"{r['bigvgan']}x, token2wav {r['total']}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
