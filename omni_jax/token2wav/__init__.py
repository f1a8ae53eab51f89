"""Token2Wav: codec ids -> mel (flow-matching DiT) -> 24 kHz waveform (BigVGAN).

Everything here runs in float32 (the reference runs token2wav in float32 whatever the rest of the
model uses), products and convolutions at :data:`MATMUL_PRECISION`. Activations are channels-last
``[B, T, C]``; mels are time-major ``[B, T, mel_dim]`` throughout (the noise, the reference mel of
``spk_dict.pt``, the DiT output and the BigVGAN input), where transformers' ``sample`` returns
``[B, mel_dim, T]``.

Where each part lives:

* :mod:`.dit` — the DiT: timestep, codec and input embeddings, AdaLN blocks, attention with the
  block band and first-head RoPE, one evaluation from a per-solve plan, the conditioning;
* :mod:`.speaker` — the ECAPA-TDNN speaker encoder inside the DiT's input embedding;
* :mod:`.solve` — the ODE solve over the DiT (time grid, classifier-free guidance, Kutta 3/8 RK4
  in one ``lax.scan``) and its jitted program;
* :mod:`.bigvgan` — the BigVGAN vocoder and its jitted program;
* :mod:`.conv` — torch-layout convolutions shared by the speaker encoder and BigVGAN;
* :mod:`.split` — how the jitted programs take a module (split once) and their matmul precision;
* :mod:`.model` — :class:`Token2Wav` (both halves) and :func:`token2wav` (codes -> waveform);
* :mod:`.params` — the Hugging Face key map and :func:`load_token2wav`.

The jitted programs are module-level functions of (split module, inputs) -> outputs
(``solve._dit_sample_jit``, ``bigvgan._bigvgan_jit``); :func:`dit_sample` and :func:`bigvgan`
validate their inputs and call them. Streaming (chunked) decoding is :mod:`omni_jax.streaming`.
"""

# ``_dit_sample_jit`` and ``_bigvgan_jit`` (the jitted programs) are re-exported for their compile counts.
from .bigvgan import (AMPBlock, AntiAliasedActivation1d, BigVGAN, SnakeBeta, _bigvgan_jit, bigvgan, bigvgan_fn,
                      downsample2, kaiser_sinc_filter, process_mel, sin_squared, upsample2)
from .conv import Conv1d, ConvTranspose1d
from .dit import (DiT, DiTBlocks, DiTCodecEmbedding, DiTInputEmbedding, DiTTimestepEmbedding, dit_conditioning,
                  dit_eval, dit_forward, dit_per_layer, dit_plan, layer_bands)
from .model import Token2Wav, Token2WavParts, presplit_token2wav, token2wav
from .params import HF_PREFIX, hf_key, is_token2wav_buffer, load_token2wav
from .solve import _dit_sample_jit, dit_noise, dit_sample, dit_sample_fn, time_grid
from .speaker import (AttentiveStatisticsPooling, ECAPA_TimeDelayNet, Res2NetBlock, SqueezeExcitationBlock,
                      SqueezeExcitationRes2NetBlock, TimeDelayNetBlock)
from .split import MATMUL_PRECISION, Split, presplit

__all__ = [
    "MATMUL_PRECISION", "Split", "presplit",
    "Conv1d", "ConvTranspose1d",
    "TimeDelayNetBlock", "Res2NetBlock", "SqueezeExcitationBlock", "SqueezeExcitationRes2NetBlock",
    "AttentiveStatisticsPooling", "ECAPA_TimeDelayNet",
    "DiT", "DiTBlocks", "DiTCodecEmbedding", "DiTInputEmbedding", "DiTTimestepEmbedding", "layer_bands",
    "dit_per_layer", "dit_plan", "dit_eval", "dit_forward", "dit_conditioning",
    "time_grid", "dit_sample_fn", "dit_sample", "dit_noise",
    "kaiser_sinc_filter", "upsample2", "downsample2", "sin_squared", "SnakeBeta", "AntiAliasedActivation1d",
    "AMPBlock", "BigVGAN", "process_mel", "bigvgan_fn", "bigvgan",
    "Token2Wav", "Token2WavParts", "presplit_token2wav", "token2wav",
    "HF_PREFIX", "hf_key", "load_token2wav", "is_token2wav_buffer",
]
