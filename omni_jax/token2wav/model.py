"""Token2Wav as one module (``Qwen2_5OmniToken2WavModel``: the checkpoint's ``token2wav.*`` tree)
and the codes -> waveform call (the DiT's ODE solve, then BigVGAN).
"""

from __future__ import annotations

from typing import NamedTuple

from flax import nnx

from ..config import Token2WavConfig
from .bigvgan import BigVGAN, bigvgan
from .dit import DiT
from .solve import dit_sample
from .split import Split, presplit


class Token2Wav(nnx.Module):
    """``Qwen2_5OmniToken2WavModel``."""

    def __init__(self, cfg: Token2WavConfig, *, rngs: nnx.Rngs):
        self.code2wav_dit_model = DiT(cfg.dit, rngs=rngs)
        self.code2wav_bigvgan_model = BigVGAN(cfg.bigvgan, rngs=rngs)


class Token2WavParts(NamedTuple):
    """A :class:`Token2Wav`'s two halves, each a :class:`Split` (see :func:`presplit_token2wav`)."""
    code2wav_dit_model: Split
    code2wav_bigvgan_model: Split


def presplit_token2wav(model) -> Token2WavParts:
    """A :class:`Token2Wav` (or parts already split) as :class:`Token2WavParts`: what
    :func:`token2wav` and :class:`omni_jax.streaming.StreamingToken2Wav` take in its place."""
    if isinstance(model, Token2WavParts):
        return model
    return Token2WavParts(presplit(model.code2wav_dit_model), presplit(model.code2wav_bigvgan_model))


def token2wav(model: Token2Wav | Token2WavParts, cfg: Token2WavConfig, codes, cond, ref_mel, noise, *, steps: int = 10,
              guidance_scale: float = 0.5, sway: float | None = -1.0, impl: str | None = None):
    """Codec ids ``[B, n]`` -> waveform ``[B, repeats * n * prod(upsample_rates)]`` (float32, 24 kHz).

    Two jitted calls (the DiT's ODE solve, then BigVGAN); see :func:`dit_sample` for the
    arguments. Equals transformers' ``Qwen2_5OmniToken2WavModel(code, cond, ref_mel)`` per row
    with ``torch.randn`` returning ``noise``.
    """
    mel = dit_sample(model.code2wav_dit_model, cfg.dit, codes, cond, ref_mel, noise, steps=steps,
                     guidance_scale=guidance_scale, sway=sway, impl=impl)
    return bigvgan(model.code2wav_bigvgan_model, cfg.bigvgan, mel)
