"""The DiT side by side with transformers as the reply grows: one ODE solve of the same random
weights, codes, speaker and noise in omni-jax and in transformers (torch CPU, same threads),
for several reply lengths, float32.

    python -m bench dit_length                         # 64, 250, 500 codes (1.3 s, 5 s, 10 s of audio)
    python -m bench dit_length --codes 64 1000 --json out.json

Why: the DiT attends over the whole reply with a block-band mask (each query block sees at most
``look_back + 1 + look_ahead`` blocks of 24 frames). Computed densely, as transformers does
(all ``T x T`` scores, then the mask), attention grows with the square of the reply and overtakes
the linear layers within a few seconds of audio. omni-jax's XLA path computes the band block by
block (:func:`omni_jax.attention.xla_band_attention`). ``--dense`` in the same run also times
omni-jax with the dense formulation (the before/after of that change). The DiT widths are the
published ones (``bench/configs/cpu_small.json``, 4 of the 22 layers); the evaluation count is
``4 x (ode_steps - 1)`` (the default ``--ode-steps 4`` keeps long replies quick; time per
evaluation does not depend on it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import numpy as np

from .compare import _PatchedRandn, _rel, _timeit
from .util import band_attention, write_json


def build(dit_cfg: dict, seed: int = 0):
    """transformers' Token2Wav with the config's DiT widths (a tiny vocoder: only the DiT is
    timed) and the same weights as an omni-jax DiT."""
    import torch
    from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as hf
    from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniToken2WavConfig

    from omni_jax import token2wav as t2w
    from omni_jax.config import Token2WavConfig

    voc = dict(mel_dim=dit_cfg["mel_dim"], upsample_initial_channel=16, resblock_kernel_sizes=[3],
               resblock_dilation_sizes=[[1, 3, 5]], upsample_rates=[2], upsample_kernel_sizes=[4])
    torch.manual_seed(seed)
    hcfg = Qwen2_5OmniToken2WavConfig(dit_config=dict(dit_cfg, dropout=0.0), bigvgan_config=voc)
    model = hf.Qwen2_5OmniToken2WavModel(hcfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # initialisation leaves some weights at 0/1: perturb all of them
        for _, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    sd = {"token2wav." + k: v.detach().contiguous().numpy() for k, v in model.state_dict().items()}

    class _Dict:  # the checkpoint interface load_token2wav reads
        def keys(self):
            return sd.keys()

        def get(self, key):
            return sd[key]

        def shape(self, key):
            return tuple(sd[key].shape)

    cfg = Token2WavConfig.from_dict(hcfg.to_dict())
    return model, cfg, t2w.load_token2wav(_Dict(), cfg)


def measure(model, cfg, jmodel, n_codes: int, steps: int, dense: bool, seed: int = 0) -> dict:
    import torch

    from omni_jax import token2wav as t2w

    d = cfg.dit
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, d.num_embeds, (1, n_codes)).astype(np.int32)
    cond = rng.standard_normal((1, d.enc_emb_dim)).astype(np.float32)
    ref_mel = (rng.standard_normal((1, 100, d.mel_dim)) - 3).astype(np.float32)
    noise = rng.standard_normal((n_codes * d.repeats, d.mel_dim)).astype(np.float32)
    frames = n_codes * d.repeats
    audio_s = frames * 240 / 24000  # BigVGAN's 240 samples per mel frame at 24 kHz
    evals = 4 * (steps - 1)
    out: dict = dict(codes=n_codes, mel_frames=frames, audio_s=round(audio_s, 2), evals=evals)

    def jx():
        return np.asarray(jax.block_until_ready(t2w.dit_sample(jmodel.code2wav_dit_model, d, codes, cond, ref_mel,
                                                               noise[None], steps=steps)))

    mels = {}
    for kind in ("band", "dense") if dense else ("band",):
        with band_attention(kind == "band"):
            t = time.perf_counter()
            jx()
            first = time.perf_counter() - t
            s = _timeit(jx, 2)
            mels[kind] = jx()
        out[f"jax_{kind}"] = dict(solve_s=round(s, 3), ms_per_eval=round(1e3 * s / evals, 1),
                                  s_per_audio_s_per_eval=round(s / evals / audio_s, 4), compile_s=round(first - s, 2))
    pt_mel = None

    def pt():
        nonlocal pt_mel
        with torch.no_grad(), _PatchedRandn(noise, d.mel_dim):
            pt_mel = model.code2wav_dit_model.sample(torch.from_numpy(cond), torch.from_numpy(ref_mel),
                                                     torch.from_numpy(codes).long(), num_steps=steps)

    s = _timeit(pt, 2)
    out["torch"] = dict(solve_s=round(s, 3), ms_per_eval=round(1e3 * s / evals, 1),
                        s_per_audio_s_per_eval=round(s / evals / audio_s, 4))
    ref = pt_mel[0].permute(1, 0).numpy()
    for kind in mels:
        out[f"jax_{kind}"]["ratio_vs_torch"] = round(out["torch"]["solve_s"] / out[f"jax_{kind}"]["solve_s"], 2)
        out[f"jax_{kind}"]["mel_rel_err"] = _rel(mels[kind][0], ref)
    return out


def main(argv=None):
    import torch

    p = argparse.ArgumentParser(prog="python -m bench dit_length")
    p.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "configs", "cpu_small.json"))
    p.add_argument("--codes", type=int, nargs="+", default=[64, 250, 500])
    p.add_argument("--ode-steps", type=int, default=4)
    p.add_argument("--dense", action="store_true", help="also time omni-jax with dense (masked T x T) attention")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.ode_steps < 2 or any(n < 1 for n in args.codes):
        p.error("--ode-steps must be >= 2 and every --codes >= 1")
    with open(args.config) as f:
        cfg = json.load(f)
    threads = args.threads or os.cpu_count()
    torch.set_num_threads(threads)
    dit_cfg = {k: v for k, v in cfg["token2wav"]["dit"].items() if not k.startswith("_")}
    model, tcfg, jmodel = build(dit_cfg)
    res = dict(machine=f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}",
               backend=jax.default_backend(), jax=jax.__version__, torch=torch.__version__, threads=threads,
               precision="float32", date=time.strftime("%Y-%m-%d"), ode_steps=args.ode_steps,
               dit=dict(layers=dit_cfg["num_hidden_layers"], hidden=dit_cfg["hidden_size"],
                        block_size=dit_cfg["block_size"]), rows=[])
    for n in args.codes:
        row = measure(model, tcfg, jmodel, n, args.ode_steps, args.dense)
        res["rows"].append(row)
        line = (f"{n:5d} codes ({row['audio_s']:5.2f} s audio, {row['mel_frames']} frames): per evaluation "
                f"omni-jax {row['jax_band']['ms_per_eval']} ms, transformers {row['torch']['ms_per_eval']} ms "
                f"-> {row['jax_band']['ratio_vs_torch']}x")
        if args.dense:
            line += f" (dense attention: {row['jax_dense']['ms_per_eval']} ms, {row['jax_dense']['ratio_vs_torch']}x)"
        print(line + f"; mel rel err {row['jax_band']['mel_rel_err']:.1e}", flush=True)
    write_json(args.json, res)
    return res


if __name__ == "__main__":
    main()
