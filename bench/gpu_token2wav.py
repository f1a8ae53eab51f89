"""Token2wav real-time factor (DiT + BigVGAN) at the published widths, random weights, float32.

    python -m bench.gpu_token2wav [--codes 250 500] [--attention pallas] [--torch] [--json out.json]

The DiT (22 layers, 1024 wide, 16 heads, 10 ODE steps with classifier-free guidance, RK4) and
BigVGAN (initial width 1536, 240x upsampling) run as the model runs them: float32 under
``jax.default_matmul_precision("highest")`` (``token2wav.MATMUL_PRECISION``). 50 codes are one
second of 24 kHz audio. RTF = wall time / audio seconds (median of ``--reps`` runs after a
compiling one). ``--torch`` also times transformers' ``Qwen2_5OmniToken2WavModel`` at the same
shape on the same device (float32, TF32 off: the reference numerics), for the ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def _median_time(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def run_jax(codes_list, attention, reps, preset="3b"):
    import jax
    from flax import nnx

    import omni_jax
    from omni_jax import token2wav as T

    cfg = omni_jax.preset(preset).token2wav
    dcfg, vcfg = cfg.dit, cfg.bigvgan
    dit = T.DiT(dcfg, rngs=nnx.Rngs(0))
    voc = T.BigVGAN(vcfg, rngs=nnx.Rngs(1))
    rs = np.random.RandomState(0)
    cond = rs.standard_normal((dcfg.enc_emb_dim,)).astype(np.float32)
    ref_mel = rs.standard_normal((300, dcfg.mel_dim)).astype(np.float32)
    rows = []
    for n in codes_list:
        codes = rs.randint(0, dcfg.num_embeds - 1, (1, n)).astype(np.int32)
        noise = np.asarray(T.dit_noise(jax.random.PRNGKey(n), dcfg, 1, n))
        mel_box = {}

        def dit_call():
            mel_box["mel"] = T.dit_sample(dit, dcfg, codes, cond, ref_mel, noise, impl=attention)
            jax.block_until_ready(mel_box["mel"])

        t0 = time.perf_counter()
        dit_call()
        compile_dit = time.perf_counter() - t0
        dit_s = _median_time(dit_call, reps)
        mel = mel_box["mel"]

        def voc_call():
            jax.block_until_ready(T.bigvgan(voc, vcfg, mel))

        t0 = time.perf_counter()
        voc_call()
        compile_voc = time.perf_counter() - t0
        voc_s = _median_time(voc_call, reps)
        audio_s = n * dcfg.repeats * int(np.prod(vcfg.upsample_rates)) / 24000
        rows.append(dict(impl=f"omni_jax ({attention} attention)", codes=n, audio_s=audio_s,
                         dit_s=round(dit_s, 4), bigvgan_s=round(voc_s, 4),
                         rtf=round((dit_s + voc_s) / audio_s, 4), dit_rtf=round(dit_s / audio_s, 4),
                         bigvgan_rtf=round(voc_s / audio_s, 4),
                         first_call_s=round(compile_dit + compile_voc, 1)))
        print(rows[-1], flush=True)
    return rows


def run_torch(codes_list, reps):
    import torch
    from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as M
    from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniToken2WavConfig

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cfg = Qwen2_5OmniToken2WavConfig(dit_config=dict(hidden_size=1024, num_hidden_layers=22, num_attention_heads=16),
                                     bigvgan_config=dict(upsample_initial_channel=1536))
    model = M.Qwen2_5OmniToken2WavModel(cfg).cuda().float().eval()
    rs = np.random.RandomState(0)
    cond = torch.tensor(rs.standard_normal((1, 192)), dtype=torch.float32, device="cuda")
    ref_mel = torch.tensor(rs.standard_normal((1, 300, 80)), dtype=torch.float32, device="cuda")
    rows = []
    for n in codes_list:
        code = torch.tensor(rs.randint(0, 8192, (1, n)), device="cuda")

        def dit_call():
            with torch.no_grad():
                mel = model.code2wav_dit_model.sample(cond, ref_mel, code, num_steps=10, guidance_scale=0.5,
                                                      sway_coefficient=-1.0)
            torch.cuda.synchronize()
            return mel

        mel = dit_call()
        dit_s = _median_time(dit_call, reps)

        def voc_call():
            with torch.no_grad():
                model.code2wav_bigvgan_model(mel)
            torch.cuda.synchronize()

        voc_s = _median_time(voc_call, reps)
        audio_s = n * 2 * 240 / 24000
        rows.append(dict(impl=f"transformers {__import__('transformers').__version__} (torch "
                              f"{torch.__version__}, float32, TF32 off)", codes=n, audio_s=audio_s,
                         dit_s=round(dit_s, 4), bigvgan_s=round(voc_s, 4), rtf=round((dit_s + voc_s) / audio_s, 4)))
        print(rows[-1], flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.gpu_token2wav")
    p.add_argument("--codes", type=int, nargs="+", default=[250, 500])
    p.add_argument("--attention", default="pallas")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--torch", action="store_true")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    import jax

    out = dict(device=str(jax.devices()[0].device_kind), backend=jax.default_backend(), jax=jax.__version__,
               date=time.strftime("%Y-%m-%d"), precision="float32, matmul precision highest",
               command="python -m bench.gpu_token2wav " + " ".join(sys.argv[1:] if argv is None else argv), rows=[])
    out["rows"] += run_jax(a.codes, a.attention, a.reps)
    if a.json:
        json.dump(out, open(a.json, "w"), indent=1)
    if a.torch:
        try:
            out["rows"] += run_torch(a.codes, a.reps)
        except Exception as e:
            out["rows"].append({"impl": "transformers", "error": str(e).splitlines()[0][:300]})
            print(out["rows"][-1], flush=True)
    if a.json:
        json.dump(out, open(a.json, "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
