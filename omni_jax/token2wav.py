"""Token2Wav: codec ids -> mel (flow-matching DiT) -> 24 kHz waveform (BigVGAN).

Everything here runs in float32 (the reference runs token2wav in float32 whatever the
rest of the model uses). Activations are channels-last ``[B, T, C]``; mels are time-major
``[B, T, mel_dim]`` throughout (the noise, the reference mel of ``spk_dict.pt``, the DiT
output and the BigVGAN input), where transformers' ``sample`` returns ``[B, mel_dim, T]``.

Parameter tree (NNX; a path joined with ``.`` is the Hugging Face key under ``token2wav.``,
with ``kernel`` = ``weight`` transposed and ``embedding`` = ``weight``)::

    code2wav_dit_model/
        time_embed/time_mlp/{0,2}/{kernel,bias}
        text_embed/codec_embed/embedding            [num_embeds + 1, emb_dim]
        input_embed/proj/{kernel,bias}
        input_embed/spk_encoder/...                 ECAPA-TDNN, convs in torch layout [out, in, k]
        transformer_blocks/...                      stacked over a leading layer axis [L, ...]
                                                    (a loaded model: a list of per-layer modules,
                                                    see :func:`dit_per_layer`)
        norm_out/linear/{kernel,bias}, proj_out/{kernel,bias}
    code2wav_bigvgan_model/
        conv_pre/{weight,bias}, ups/i/0/{weight,bias} (torch ConvTranspose1d layout [in, out, k]),
        resblocks/j/{convs1,convs2}/n/{weight,bias}, resblocks/j/activations/n/act/{alpha,beta},
        activation_post/act/{alpha,beta}, conv_post/weight

Convolution weights stay in torch's layout (``lax.conv_general_dilated`` takes the layout
as a dimension-number string), so loading is a plain copy. The anti-aliasing filters and
the DiT's RoPE frequencies are not parameters: they are rebuilt from the config (a
checkpoint that holds them as buffers has them checked against the rebuilt values).

Reference semantics kept exactly (transformers ``modeling_qwen2_5_omni``):

* DiT attention: RoPE on the first head only, interleaved pairs ``(x0, x1), (x2, x3)...``;
  the mask is the block-difference band of each layer (``look_backward_layers`` /
  ``look_ahead_layers`` give one block each way), through :func:`omni_jax.attention.attention`
  with ``MaskSpec(block_band=...)``.
* Classifier-free guidance: a second batch half whose speaker vector and reference mel are
  zeros and whose codes are all code 0; ``pred = c + (c - u) * guidance_scale``. With
  ``guidance_scale < 1e-5`` the reference skips the second half, and so do we.
* Time grid ``linspace(0, 1, steps)`` then sway ``t + s * (cos(pi/2 t) - 1 + t)``: ``steps - 1``
  intervals, each one Kutta 3/8-rule RK4 step of four DiT evaluations, in the reference's
  operation order. The whole ODE is one ``lax.scan`` inside one ``jit``.
* BigVGAN: ``exp`` -> amplitude-to-dB (floor -115 dB) - 20 dB -> clamp-normalise to [-1, 1];
  anti-aliased SnakeBeta (2x up, activation, 2x down, Kaiser-sinc filters of 12 taps,
  replicate padding); output clamped to [-1, 1].

The DiT treats rows independently (no cross-row op), so a batch gives the per-row
results. ``code_lengths`` lets rows padded to a common (bucketed) length give exactly their
unpadded mel over their valid frames: padded keys are masked out of attention, and nothing
else in the DiT mixes time steps. BigVGAN has no such mask (its convolutions see the
padding), so decode each row's valid mel for per-row-exact waveforms.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .attention import MaskSpec, attention, default_impl
from .config import BigVGANConfig, DiTConfig, Token2WavConfig
from .errors import CheckpointError, InputError
from .layers import Embed, Linear, unstack_layers
from .rope import inv_freq, rotate_half
from .sharding import constrain

_F32 = jnp.float32

# Products and convolutions in true float32 (not TF32 on GPU / bf16 passes on TPU): on an
# H100 at the published shapes, TF32 moved the DiT mel by 2e-4 and the waveform by 2e-3
# (relative L2) from transformers' float32; "highest" gave 5e-7 and 9e-6. The public
# jitted entry points apply it; callers of the traceable ``*_fn`` bodies set it themselves.
MATMUL_PRECISION = "highest"

# --------------------------------------------------------------------------------------
# convolutions (channels-last activations, torch-layout weights)


def _uniform(rngs: nnx.Rngs, shape, fan_in):
    bound = 1.0 / math.sqrt(max(fan_in, 1))
    return jax.random.uniform(rngs.params(), shape, _F32, -bound, bound)


class Conv1d(nnx.Module):
    """torch ``Conv1d``: ``weight [out, in, k]``, optional ``bias [out]``, on ``x [B, T, in]``.

    ``padding`` is an int (both sides) or ``"same"`` (torch's split: left = total // 2);
    ``padding_mode`` is ``"zeros"`` or ``"reflect"``.
    """

    def __init__(self, cin, cout, k, *, dilation=1, padding=0, padding_mode="zeros", bias=True, rngs):
        self.weight = nnx.Param(_uniform(rngs, (cout, cin, k), cin * k))
        self.bias = nnx.Param(_uniform(rngs, (cout,), cin * k)) if bias else None
        self.dilation = dilation
        self.padding = padding
        self.padding_mode = padding_mode

    def __call__(self, x):
        w = self.weight[...]
        k = w.shape[-1]
        if self.padding == "same":
            total = self.dilation * (k - 1)
            left, right = total // 2, total - total // 2
        else:
            left = right = int(self.padding)
        if self.padding_mode == "reflect" and (left or right):
            x = jnp.pad(x, ((0, 0), (left, right), (0, 0)), mode="reflect")
            left = right = 0
        y = jax.lax.conv_general_dilated(
            x, w, window_strides=(1,), padding=[(left, right)], rhs_dilation=(self.dilation,),
            dimension_numbers=("NWC", "OIW", "NWC"), preferred_element_type=_F32)
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class ConvTranspose1d(nnx.Module):
    """torch ``ConvTranspose1d``: ``weight [in, out, k]``, ``bias [out]``, stride and padding."""

    def __init__(self, cin, cout, k, stride, padding, *, rngs):
        self.weight = nnx.Param(_uniform(rngs, (cin, cout, k), cout * k))
        self.bias = nnx.Param(_uniform(rngs, (cout,), cout * k))
        self.stride = stride
        self.padding = padding

    def __call__(self, x):
        # Polyphase form: output phase r of z[s*m + r] = sum_q x[m - q] W[:, :, s*q + r] is a plain
        # stride-1 convolution with ceil(k/s) taps, so all s phases are one convolution with
        # s * out channels, interleaved by a reshape. (A stride-dilated input would multiply
        # s - 1 inserted zeros per sample.) Then crop ``padding`` on each side, as torch does.
        w = self.weight[...]
        cin, cout, k = w.shape
        s, p = self.stride, self.padding
        b, n, _ = x.shape
        kk = -(-k // s)
        w = jnp.pad(w, ((0, 0), (0, 0), (0, kk * s - k))).reshape(cin, cout, kk, s)
        w = jnp.flip(w, 2).transpose(2, 0, 3, 1).reshape(kk, cin, s * cout)  # [taps, in, (phase, out)]
        z = jax.lax.conv_general_dilated(
            x, w, window_strides=(1,), padding=[(kk - 1, kk - 1)], dimension_numbers=("NWC", "WIO", "NWC"),
            preferred_element_type=_F32)
        z = z.reshape(b, (n + kk - 1) * s, cout)
        return z[:, p:p + (n - 1) * s + k - 2 * p] + self.bias[...]


def _layer_norm(x, eps=1e-6):
    """LayerNorm without affine parameters (float32)."""
    mu = jnp.mean(x, axis=-1, keepdims=True)
    xc = x - mu
    var = jnp.mean(xc * xc, axis=-1, keepdims=True)
    return xc * jax.lax.rsqrt(var + eps)


# --------------------------------------------------------------------------------------
# speaker encoder: ECAPA-TDNN over the reference mel


class TimeDelayNetBlock(nnx.Module):
    def __init__(self, cin, cout, k, dilation, *, rngs):
        self.conv = Conv1d(cin, cout, k, dilation=dilation, padding="same", padding_mode="reflect", rngs=rngs)

    def __call__(self, x):
        return jax.nn.relu(self.conv(x))


class Res2NetBlock(nnx.Module):
    def __init__(self, cin, cout, scale, k, dilation, *, rngs):
        self.blocks = nnx.List([TimeDelayNetBlock(cin // scale, cout // scale, k, dilation, rngs=rngs)
                                for _ in range(scale - 1)])
        self.scale = scale

    def __call__(self, x):
        parts = jnp.split(x, self.scale, axis=-1)
        outs = [parts[0]]
        y = None
        for i in range(1, self.scale):
            y = self.blocks[i - 1](parts[i] if i == 1 else parts[i] + y)
            outs.append(y)
        return jnp.concatenate(outs, axis=-1)


class SqueezeExcitationBlock(nnx.Module):
    def __init__(self, cin, se, cout, *, rngs):
        self.conv1 = Conv1d(cin, se, 1, rngs=rngs)
        self.conv2 = Conv1d(se, cout, 1, rngs=rngs)

    def __call__(self, x):
        s = jnp.mean(x, axis=1, keepdims=True)
        s = jax.nn.sigmoid(self.conv2(jax.nn.relu(self.conv1(s))))
        return x * s


class SqueezeExcitationRes2NetBlock(nnx.Module):
    def __init__(self, cin, cout, scale, se, k, dilation, *, rngs):
        self.tdnn1 = TimeDelayNetBlock(cin, cout, 1, 1, rngs=rngs)
        self.res2net_block = Res2NetBlock(cout, cout, scale, k, dilation, rngs=rngs)
        self.tdnn2 = TimeDelayNetBlock(cout, cout, 1, 1, rngs=rngs)
        self.se_block = SqueezeExcitationBlock(cout, se, cout, rngs=rngs)

    def __call__(self, x):
        h = self.se_block(self.tdnn2(self.res2net_block(self.tdnn1(x))))
        return h + x


class AttentiveStatisticsPooling(nnx.Module):
    def __init__(self, channels, attention_channels, *, rngs):
        self.tdnn = TimeDelayNetBlock(channels * 3, attention_channels, 1, 1, rngs=rngs)
        self.conv = Conv1d(attention_channels, channels, 1, rngs=rngs)

    @staticmethod
    def _stats(x, w):
        mean = jnp.sum(w * x, axis=1)
        d = x - mean[:, None, :]
        std = jnp.sqrt(jnp.maximum(jnp.sum(w * d * d, axis=1), 1e-12))
        return mean, std

    def __call__(self, x):  # [B, T, C] -> [B, 2C]
        t = x.shape[1]
        mean, std = self._stats(x, jnp.asarray(1.0 / t, _F32))  # every frame valid: weight 1/T
        rep = lambda a: jnp.broadcast_to(a[:, None, :], x.shape)
        a = self.conv(jnp.tanh(self.tdnn(jnp.concatenate([x, rep(mean), rep(std)], axis=-1))))
        a = jax.nn.softmax(a, axis=1)
        mean, std = self._stats(x, a)
        return jnp.concatenate([mean, std], axis=-1)


class ECAPA_TimeDelayNet(nnx.Module):
    def __init__(self, cfg: DiTConfig, *, rngs):
        ch, ks, dl = cfg.enc_channels, cfg.enc_kernel_sizes, cfg.enc_dilations
        if not len(ch) == len(ks) == len(dl):
            raise CheckpointError("config.json: dit_config enc_channels, enc_kernel_sizes and enc_dilations "
                                  "must have the same length")
        if sum(ch[1:-1]) != ch[-1]:
            raise CheckpointError(f"config.json: dit_config enc_channels {list(ch)}: the last entry must be the "
                                  "sum of the middle ones (multi-layer feature aggregation)")
        blocks = [TimeDelayNetBlock(cfg.mel_dim, ch[0], ks[0], dl[0], rngs=rngs)]
        for i in range(1, len(ch) - 1):
            blocks.append(SqueezeExcitationRes2NetBlock(ch[i - 1], ch[i], cfg.enc_res2net_scale,
                                                        cfg.enc_se_channels, ks[i], dl[i], rngs=rngs))
        self.blocks = nnx.List(blocks)
        self.mfa = TimeDelayNetBlock(ch[-1], ch[-1], ks[-1], dl[-1], rngs=rngs)
        self.asp = AttentiveStatisticsPooling(ch[-1], cfg.enc_attention_channels, rngs=rngs)
        self.fc = Conv1d(ch[-1] * 2, cfg.enc_dim, 1, rngs=rngs)

    def __call__(self, mel):  # [B, T, mel_dim] -> [B, enc_dim]
        h = mel
        outs = []
        for blk in self.blocks:
            h = blk(h)
            outs.append(h)
        h = self.mfa(jnp.concatenate(outs[1:], axis=-1))
        pooled = self.asp(h)
        return self.fc(pooled[:, None, :])[:, 0, :]


# --------------------------------------------------------------------------------------
# DiT


class DiTTimestepEmbedding(nnx.Module):
    FREQ_DIM = 256

    def __init__(self, dim, *, rngs):
        self.time_mlp = nnx.Dict({"0": Linear(self.FREQ_DIM, dim, bias=True, dtype=_F32, rngs=rngs),
                                  "2": Linear(dim, dim, bias=True, dtype=_F32, rngs=rngs)})

    def __call__(self, t):  # t [N] -> [N, dim]
        half = self.FREQ_DIM // 2
        freqs = jnp.exp(jnp.arange(half, dtype=_F32) * -(math.log(10000) / (half - 1)))
        ang = (1000.0 * t)[:, None] * freqs[None, :]
        e = jnp.concatenate([jnp.sin(ang), jnp.cos(ang)], axis=-1)
        return self.time_mlp["2"](jax.nn.silu(self.time_mlp["0"](e)))


class DiTCodecEmbedding(nnx.Module):
    def __init__(self, num_embeds, dim, *, rngs):
        self.codec_embed = Embed(num_embeds + 1, dim, dtype=_F32, rngs=rngs)


class DiTInputEmbedding(nnx.Module):
    def __init__(self, cfg: DiTConfig, *, rngs):
        self.proj = Linear(cfg.mel_dim + cfg.enc_dim + cfg.enc_emb_dim + cfg.emb_dim, cfg.hidden_size, bias=True,
                           dtype=_F32, rngs=rngs)
        self.spk_encoder = ECAPA_TimeDelayNet(cfg, rngs=rngs)


class _AdaLN(nnx.Module):
    def __init__(self, dim, n, *, rngs, stack=()):
        self.linear = Linear(dim, dim * n, bias=True, dtype=_F32, rngs=rngs, stack=stack)


class _DiTAttention(nnx.Module):
    def __init__(self, cfg: DiTConfig, *, rngs, stack):
        inner = cfg.head_dim * cfg.num_attention_heads
        self.to_q = Linear(cfg.hidden_size, inner, bias=True, dtype=_F32, rngs=rngs, stack=stack)
        self.to_k = Linear(cfg.hidden_size, inner, bias=True, dtype=_F32, rngs=rngs, stack=stack)
        self.to_v = Linear(cfg.hidden_size, inner, bias=True, dtype=_F32, rngs=rngs, stack=stack)
        self.to_out = nnx.List([Linear(inner, cfg.hidden_size, bias=True, dtype=_F32, rngs=rngs, stack=stack)])


class _DiTMLP(nnx.Module):
    def __init__(self, dim, mult, *, rngs, stack):
        self.ff = nnx.Dict({"0": Linear(dim, dim * mult, bias=True, dtype=_F32, rngs=rngs, stack=stack),
                            "3": Linear(dim * mult, dim, bias=True, dtype=_F32, rngs=rngs, stack=stack)})

    def __call__(self, x):
        return self.ff["3"](jax.nn.gelu(self.ff["0"](x), approximate=True))


class DiTBlocks(nnx.Module):
    """All DiT decoder layers, parameters stacked on a leading layer axis."""

    def __init__(self, cfg: DiTConfig, *, rngs):
        stack = (cfg.num_hidden_layers,)
        self.attn_norm = _AdaLN(cfg.hidden_size, 6, rngs=rngs, stack=stack)
        self.attn = _DiTAttention(cfg, rngs=rngs, stack=stack)
        self.ff = _DiTMLP(cfg.hidden_size, cfg.ff_mult, rngs=rngs, stack=stack)


class DiT(nnx.Module):
    """``Qwen2_5OmniToken2WavDiTModel``."""

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        self.time_embed = DiTTimestepEmbedding(cfg.hidden_size, rngs=rngs)
        self.text_embed = DiTCodecEmbedding(cfg.num_embeds, cfg.emb_dim, rngs=rngs)
        self.input_embed = DiTInputEmbedding(cfg, rngs=rngs)
        self.transformer_blocks = DiTBlocks(cfg, rngs=rngs)
        self.norm_out = _AdaLN(cfg.hidden_size, 2, rngs=rngs)
        self.proj_out = Linear(cfg.hidden_size, cfg.mel_dim, bias=True, dtype=_F32, rngs=rngs)


def layer_bands(cfg: DiTConfig) -> tuple[tuple[int, int], ...]:
    """``(look_back, look_ahead)`` in blocks for each DiT layer (the reference's rule)."""
    return tuple((1 if i in cfg.look_backward_layers else 0, 1 if i in cfg.look_ahead_layers else 0)
                 for i in range(cfg.num_hidden_layers))


def _dit_rope(cfg: DiTConfig, t: int):
    """cos, sin ``[T, head_dim]`` (half-split layout) for positions ``0..T-1``."""
    freqs = jnp.arange(t, dtype=_F32)[:, None] * jnp.asarray(inv_freq(cfg.head_dim, cfg.rope_theta))[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def _rope_first_head(x, cos, sin):
    """RoPE on head 0 only, interleaved pairs: de-interleave head 0 to the half-split layout
    and rotate it (the reference does the same; the permutation is the same for q and k, so
    scores are those of the interleaved rotation). ``x [N, T, H, D]``, ``cos/sin [T, D]``."""
    h0 = x[:, :, 0, :]
    h0 = jnp.concatenate([h0[..., 0::2], h0[..., 1::2]], axis=-1)
    h0 = h0 * cos + rotate_half(h0) * sin
    return jnp.concatenate([h0[:, :, None, :], x[:, :, 1:, :]], axis=2)


def _affine(x, w, b=None):
    y = jnp.einsum("...i,io->...o", x, w, preferred_element_type=_F32)
    return y if b is None else y + b


def dit_per_layer(dit: DiT, *, free: bool = False) -> DiT:
    """``dit`` with its transformer blocks as a list of per-layer modules (in place; returned).

    On XLA:CPU a static slice of a stacked parameter is a copy at ~2.5 GB/s, and a product whose
    operand is such a slice runs no faster: every ODE solve sliced all the layers' weights (and
    transposed the stacked AdaLN matrix for one batched product), ~150 ms per solve at 4 layers,
    more at the published 22. Per-layer buffers are read in place. ``free``: delete each stacked
    array once sliced (the caller owns them). :func:`load_token2wav` returns this layout; a DiT
    built in the stacked layout (training-style init, tests) runs the same computation."""
    if not isinstance(dit.transformer_blocks, Sequence):
        dit.transformer_blocks = nnx.List(unstack_layers(dit.transformer_blocks, free=free))
    return dit


def dit_plan(dit: DiT, cfg: DiTConfig, cond_feats, times) -> dict:
    """Everything of a DiT evaluation that does not depend on the noised mel, computed once
    per ODE solve (outside its loops) for the evaluation times ``times [E]``.

    * the conditioning's share of the input projection, ``cond_feats @ W_cond + b`` (the
      projection is linear: only the mel's 80 columns are left per evaluation);
    * the time modulations (AdaLN shifts, scales and gates) of every layer for every
      evaluation: one ``[E, H] x [H, 6H]`` product per layer instead of a matrix-vector product
      per layer per evaluation, which on CPU reads the 25 MB modulation matrix every time;
    * per-layer weights: the per-layer modules' own arrays (:func:`dit_per_layer`), or static
      slices of the stacked parameters. (A ``lax.scan`` over the stacked layers would
      dynamic-slice, i.e. copy on CPU, every weight matrix at every layer of every evaluation.)
    """
    md = cfg.mel_dim
    k_in, b_in = dit.input_embed.proj.kernel[...], dit.input_embed.proj.bias[...]
    stemb = jax.nn.silu(dit.time_embed(jnp.reshape(times, (-1,)).astype(_F32)))  # [E, H]
    blk = dit.transformer_blocks
    per_layer = isinstance(blk, Sequence)
    layers = []
    for i in range(cfg.num_hidden_layers):
        b = blk[i] if per_layer else blk
        att, ff = b.attn, b.ff.ff
        w = dict(q_w=att.to_q.kernel, q_b=att.to_q.bias, k_w=att.to_k.kernel, k_b=att.to_k.bias,
                 v_w=att.to_v.kernel, v_b=att.to_v.bias, o_w=att.to_out[0].kernel, o_b=att.to_out[0].bias,
                 ff0_w=ff["0"].kernel, ff0_b=ff["0"].bias, ff3_w=ff["3"].kernel, ff3_b=ff["3"].bias,
                 ada_w=b.attn_norm.linear.kernel, ada_b=b.attn_norm.linear.bias)
        w = {k: v[...] if per_layer else v[...][i] for k, v in w.items()}  # stacked: a static slice
        w["mod"] = _affine(stemb, w.pop("ada_w"), w.pop("ada_b"))  # [E, 6H]
        layers.append(w)
    return dict(
        x_w=k_in[:md], h_cond=_affine(cond_feats, k_in[md:], b_in), layers=layers,
        out_mod=_affine(stemb, dit.norm_out.linear.kernel[...], dit.norm_out.linear.bias[...]),  # [E, 2H]
        proj_w=dit.proj_out.kernel[...], proj_b=dit.proj_out.bias[...])


def dit_eval(plan: dict, cfg: DiTConfig, x, e, *, kv_valid=None, rope=None, impl="xla"):
    """One DiT evaluation (the velocity field) from a :func:`dit_plan`: ``x [N, T, mel_dim]`` the
    noised mel, ``e`` the index (may be traced) of this evaluation's time in the plan's
    ``times``. Returns ``[N, T, mel_dim]``."""
    n, tlen, _ = x.shape
    nh, hd = cfg.num_attention_heads, cfg.head_dim
    inner = nh * hd
    cos, sin = rope if rope is not None else _dit_rope(cfg, tlen)
    h = _affine(x.astype(_F32), plan["x_w"]) + plan["h_cond"]
    h = constrain(h, ("batch", "seq", "act_embed"))
    for w, band in zip(plan["layers"], layer_bands(cfg)):
        mod = jax.lax.dynamic_index_in_dim(w["mod"], e, keepdims=True)  # [1, 6H]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod[:, None, :], 6, axis=-1)
        y = _layer_norm(h) * (1 + scale_msa) + shift_msa
        q, k, v = (_affine(y, w[f"{c}_w"], w[f"{c}_b"]).reshape(n, tlen, nh, hd) for c in "qkv")
        q = _rope_first_head(q, cos, sin)
        k = _rope_first_head(k, cos, sin)
        mask = MaskSpec(block_band=(cfg.block_size, band[0], band[1]), kv_valid=kv_valid)
        o = attention(q, k, v, mask, impl=impl)
        h = h + gate_msa * _affine(o.reshape(n, tlen, inner), w["o_w"], w["o_b"])
        y = _layer_norm(h) * (1 + scale_mlp) + shift_mlp
        h = h + gate_mlp * _affine(jax.nn.gelu(_affine(y, w["ff0_w"], w["ff0_b"]), approximate=True),
                                   w["ff3_w"], w["ff3_b"])
        h = constrain(h, ("batch", "seq", "act_embed"))
    scale, shift = jnp.split(jax.lax.dynamic_index_in_dim(plan["out_mod"], e, keepdims=True)[:, None, :], 2, axis=-1)
    h = _layer_norm(h) * (1 + scale) + shift
    return _affine(h, plan["proj_w"], plan["proj_b"])


def dit_forward(dit: DiT, cfg: DiTConfig, x, t, cond_feats, *, kv_valid=None, rope=None, impl="xla"):
    """One DiT evaluation at time ``t`` (a float32 scalar shared by the rows): ``x [N, T, mel_dim]``
    the noised mel, ``cond_feats [N, T, enc_dim + emb_dim + enc_emb_dim]`` the speaker-encoder
    output, the codec embedding and the speaker vector per frame (:func:`dit_conditioning`).
    Returns ``[N, T, mel_dim]``. (An ODE solve plans once and calls :func:`dit_eval`.)"""
    plan = dit_plan(dit, cfg, cond_feats, jnp.reshape(t, (1,)))
    return dit_eval(plan, cfg, x, 0, kv_valid=kv_valid, rope=rope, impl=impl)


def dit_conditioning(dit: DiT, cfg: DiTConfig, codes, cond, ref_mel, *, cfg_half: bool):
    """Per-frame conditioning ``[N, T, enc_dim + emb_dim + enc_emb_dim]`` (constant over the ODE).

    ``codes [B, n]``, ``cond [B, enc_emb_dim]``, ``ref_mel [B, T_ref, mel_dim]``. With
    ``cfg_half`` the unconditioned rows follow (N = 2B): zero reference mel through the
    speaker encoder, code 0 everywhere, zero speaker vector.
    """
    b, n = codes.shape
    tlen = n * cfg.repeats
    table = dit.text_embed.codec_embed.embedding[...]

    def feats(codes, cond, ref_mel):
        code_emb = jnp.repeat(jnp.take(table, codes, axis=0), cfg.repeats, axis=1)
        spk = dit.input_embed.spk_encoder(ref_mel)
        return jnp.concatenate([jnp.broadcast_to(spk[:, None, :], (b, tlen, spk.shape[-1])), code_emb,
                                jnp.broadcast_to(cond[:, None, :], (b, tlen, cond.shape[-1]))], axis=-1)

    c = feats(codes, cond, ref_mel)
    if not cfg_half:
        return c
    u = feats(jnp.zeros_like(codes), jnp.zeros_like(cond), jnp.zeros_like(ref_mel))
    return jnp.concatenate([c, u], axis=0)


def time_grid(steps: int, sway: float | None) -> np.ndarray:
    """The reference's ODE time points (float32, computed like ``torch.linspace`` + sway)."""
    if steps < 2:
        raise InputError(f"token2wav: steps={steps}; need at least 2 time points")
    step = np.float32(1.0) / np.float32(steps - 1)
    i = np.arange(steps)
    # torch.linspace fills the first half from the start and the second half from the end
    t = np.where(i < steps // 2, i.astype(np.float32) * step,
                 np.float32(1.0) - (steps - 1 - i).astype(np.float32) * step).astype(np.float32)
    if sway is not None:
        s = np.float32(sway)
        t = (t + s * (np.cos(np.float32(np.pi / 2) * t).astype(np.float32) - np.float32(1.0) + t)).astype(np.float32)
    return t


def _broadcast_speaker(cfg: DiTConfig, b, cond, ref_mel):
    cond = jnp.asarray(cond, _F32)
    ref_mel = jnp.asarray(ref_mel, _F32)
    if cond.ndim == 1:
        cond = cond[None]
    if ref_mel.ndim == 2:
        ref_mel = ref_mel[None]
    return jnp.broadcast_to(cond, (b, cond.shape[-1])), jnp.broadcast_to(ref_mel, (b, *ref_mel.shape[1:]))


def dit_sample_fn(dit: DiT, cfg: DiTConfig, codes, cond, ref_mel, noise, *, steps: int = 10,
                  guidance_scale=0.5, sway: float | None = -1.0, code_lengths=None, impl: str = "xla",
                  use_cfg: bool | None = None, time_points=None):
    """Traceable body of :func:`dit_sample` (call it inside your own ``jit``).

    ``guidance_scale`` may be traced when ``use_cfg`` (whether the unconditioned half runs:
    the reference skips it when ``guidance_scale < 1e-5``) is given; ``time_points`` (``[steps]``,
    from :func:`time_grid`) may be traced, replacing ``steps``/``sway``.
    """
    b, n = codes.shape
    tlen = n * cfg.repeats
    cond, ref_mel = _broadcast_speaker(cfg, b, cond, ref_mel)
    if use_cfg is None:
        use_cfg = not guidance_scale < 1e-5
    feats = dit_conditioning(dit, cfg, codes, cond, ref_mel, cfg_half=use_cfg)
    kv_valid = None
    if code_lengths is not None:
        kv_valid = jnp.arange(tlen)[None, :] < (jnp.asarray(code_lengths, jnp.int32) * cfg.repeats)[:, None]
        if use_cfg:
            kv_valid = jnp.concatenate([kv_valid, kv_valid], axis=0)
    rope = _dit_rope(cfg, tlen)
    third, two_thirds = 1.0 / 3.0, 2.0 / 3.0
    grid = jnp.asarray(time_grid(steps, sway) if time_points is None else time_points, _F32)
    t0, t1 = grid[:-1], grid[1:]
    dts = t1 - t0
    # the four RK4 stage times of every interval, in evaluation order [intervals * 4]
    stage_t = jnp.stack([t0, t0 + dts * third, t0 + dts * two_thirds, t1], axis=1)
    plan = dit_plan(dit, cfg, feats, stage_t.reshape(-1))  # once, outside the ODE loops

    def velocity(e, y):
        x = jnp.concatenate([y, y], axis=0) if use_cfg else y
        out = dit_eval(plan, cfg, x, e, kv_valid=kv_valid, rope=rope, impl=impl)
        if not use_cfg:
            return out
        c, u = out[:b], out[b:]
        return c + (c - u) * guidance_scale

    def rk4_38(y, xs):
        """Kutta's 3/8 rule, in the reference's operation order:
        k1 = f(t0, y); k2 = f(t0 + dt/3, y + dt k1 / 3); k3 = f(t0 + 2dt/3, y + dt (k2 - k1/3));
        k4 = f(t1, y + dt (k1 - k2 + k3)); y1 = y + (k1 + 3 (k2 + k3) + k4) dt / 8.
        The four stages run as a scan over one DiT call site (one compiled DiT, not four)."""
        i, dt = xs
        stage_y = [
            lambda ks: y,
            lambda ks: y + dt * ks[0] * third,
            lambda ks: y + dt * (ks[1] - ks[0] * third),
            lambda ks: y + dt * (ks[0] - ks[1] + ks[2]),
        ]

        def stage(ks, s):
            k = velocity(4 * i + s, jax.lax.switch(s, stage_y, ks))
            return ks.at[s].set(k), None

        ks, _ = jax.lax.scan(stage, jnp.zeros((4, *y.shape), _F32), jnp.arange(4))
        k1, k2, k3, k4 = ks[0], ks[1], ks[2], ks[3]
        return y + (k1 + 3 * (k2 + k3) + k4) * dt / 8, None

    y, _ = jax.lax.scan(rk4_38, jnp.asarray(noise, _F32), (jnp.arange(dts.shape[0]), dts))
    return y


class _Structure:
    """A split module's GraphDef and the treedef of its State as one static jit argument, hashed
    once: jit hashes its static arguments on every call, ~3 ms for BigVGAN's GraphDef, and
    flattening an nnx State (key sorting in Python) costs ~1.3 ms more; the jitted functions take
    this plus the flat leaves instead."""
    __slots__ = ("graphdef", "treedef", "_hash")

    def __init__(self, graphdef, treedef):
        self.graphdef, self.treedef = graphdef, treedef
        self._hash = hash((graphdef, treedef))

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        return self is other or (isinstance(other, _Structure) and self._hash == other._hash
                                 and self.graphdef == other.graphdef and self.treedef == other.treedef)

    def merge(self, leaves):
        """The module again, from ``leaves`` (inside a trace: what the jitted functions do)."""
        return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, list(leaves)))


class Split(NamedTuple):
    """A module taken apart once (``nnx.split``) for repeated calls. :func:`dit_sample` and
    :func:`bigvgan` take one in place of the module: splitting walks the module's graph in Python on
    every call otherwise (~35 ms for BigVGAN's 449 arrays on this project's CPU, whatever its width),
    which a streamed reply would pay per chunk. The arrays are shared with the module, not copied;
    split again after changing the module's parameters. ``structure`` and ``leaves`` are what the
    jitted calls take (see :class:`_Structure`)."""
    state: Any
    structure: _Structure
    leaves: tuple

    @property
    def graphdef(self):
        return self.structure.graphdef


def presplit(module) -> Split:
    """``module`` as a :class:`Split` (itself when it already is one)."""
    if isinstance(module, Split):
        return module
    graphdef, state = nnx.split(module)
    leaves, treedef = jax.tree.flatten(state)
    return Split(state, _Structure(graphdef, treedef), tuple(leaves))


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


@functools.partial(jax.jit, static_argnames=("structure", "cfg", "use_cfg", "impl"))
def _dit_sample_jit(structure, leaves, codes, cond, ref_mel, noise, code_lengths, time_points, guidance_scale, *,
                    cfg, use_cfg, impl):
    # only the structure is static: guidance scale and time grid are traced (no recompiles)
    dit = structure.merge(leaves)
    return dit_sample_fn(dit, cfg, codes, cond, ref_mel, noise, guidance_scale=guidance_scale,
                         code_lengths=code_lengths, impl=impl, use_cfg=use_cfg, time_points=time_points)


def _check_codes(cfg: DiTConfig, codes, noise, code_lengths):
    codes = jnp.asarray(codes)
    if codes.ndim == 1:
        codes = codes[None]
    if codes.ndim != 2 or not jnp.issubdtype(codes.dtype, jnp.integer):
        raise InputError(f"token2wav: codes must be integer [batch, n_codes], got {codes.dtype} {list(codes.shape)}")
    b, n = codes.shape
    tlen = n * cfg.repeats
    if tlen > cfg.max_position_embeddings:
        raise InputError(f"token2wav: {n} codes give {tlen} mel frames, more than dit_config.max_position_embeddings "
                         f"({cfg.max_position_embeddings})")
    try:
        c = np.asarray(codes)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):  # traced
        c = None
    if c is not None:
        if c.size and (c.min() < 0 or c.max() > cfg.num_embeds):
            raise InputError(f"token2wav: codec ids must lie in [0, {cfg.num_embeds}], got [{c.min()}, {c.max()}]")
    noise = jnp.asarray(noise, _F32)
    if noise.ndim == 2:
        noise = noise[None]
    if noise.shape != (b, tlen, cfg.mel_dim):
        raise InputError(f"token2wav: noise has shape {list(noise.shape)}, expected {[b, tlen, cfg.mel_dim]} "
                         f"(batch, {cfg.repeats} * n_codes, mel_dim)")
    if code_lengths is not None:
        code_lengths = jnp.asarray(code_lengths, jnp.int32).reshape(b)
    return codes.astype(jnp.int32), noise, code_lengths


def dit_sample(dit: DiT | Split, cfg: DiTConfig, codes, cond, ref_mel, noise, *, steps: int = 10,
               guidance_scale: float = 0.5, sway: float | None = -1.0, code_lengths=None, impl: str | None = None):
    """Codec ids -> mel ``[B, repeats * n_codes, mel_dim]`` (time-major), one jitted ODE solve.

    ``codes [B, n]`` (or ``[n]``), ``cond [B, enc_emb_dim]`` or ``[enc_emb_dim]`` (the voice's
    ``cond``), ``ref_mel [B, T_ref, mel_dim]`` or ``[T_ref, mel_dim]``, ``noise [B, repeats * n,
    mel_dim]``: the initial state (the reference draws it with ``torch.randn``).
    ``code_lengths [B]``: valid codes per row when rows are padded (see the module notes).
    Matches ``Qwen2_5OmniToken2WavDiTModel.sample(...).permute(0, 2, 1)``.
    """
    codes, noise, code_lengths = _check_codes(cfg, codes, noise, code_lengths)
    cond, ref_mel = _broadcast_speaker(cfg, codes.shape[0], cond, ref_mel)  # one trace for [D] and [B, D]
    if cond.shape[-1] != cfg.enc_emb_dim or ref_mel.shape[-1] != cfg.mel_dim:
        raise InputError(f"token2wav: cond {list(cond.shape)} / ref_mel {list(ref_mel.shape)} do not match "
                         f"enc_emb_dim={cfg.enc_emb_dim} / mel_dim={cfg.mel_dim}")
    split = presplit(dit)
    grid = time_grid(int(steps), None if sway is None else float(sway))
    with jax.default_matmul_precision(MATMUL_PRECISION):
        return _dit_sample_jit(split.structure, split.leaves, codes, cond, ref_mel, noise, code_lengths, grid,
                               np.float32(guidance_scale), cfg=cfg, use_cfg=not float(guidance_scale) < 1e-5,
                               impl=impl or default_impl())


def dit_noise(key, cfg: DiTConfig, batch: int, n_codes: int):
    """Standard-normal initial state ``[batch, repeats * n_codes, mel_dim]``."""
    return jax.random.normal(key, (batch, n_codes * cfg.repeats, cfg.mel_dim), _F32)


# --------------------------------------------------------------------------------------
# BigVGAN


@functools.lru_cache(maxsize=None)
def kaiser_sinc_filter(cutoff: float, half_width: float, kernel_size: int) -> np.ndarray:
    """The Kaiser-windowed sinc low-pass filter of the reference (``[kernel_size]`` float32)."""
    even = kernel_size % 2 == 0
    half = kernel_size // 2
    delta_f = 4 * half_width
    att = 2.285 * (half - 1) * math.pi * delta_f + 7.95
    if att > 50.0:
        beta = 0.1102 * (att - 8.7)
    elif att >= 21.0:
        beta = 0.5842 * (att - 21) ** 0.4 + 0.07886 * (att - 21.0)
    else:
        beta = 0.0
    window = np.kaiser(kernel_size, beta)
    t = (np.arange(-half, half) + 0.5) if even else (np.arange(kernel_size) - half)
    if cutoff == 0:
        f = np.zeros(kernel_size, np.float32)
        f.setflags(write=False)
        return f
    f = 2 * cutoff * window * np.sinc(2 * cutoff * t)
    f = (f / f.sum()).astype(np.float32)
    f.setflags(write=False)  # cached: shared by every caller
    return f


def upsample2(x, kernel_size=12, ratio=2):
    """The reference's anti-aliased upsampling ``[B, L, C] -> [B, ratio * L, C]``.

    The reference replicate-pads by ``k // ratio - 1``, runs a depthwise transposed conv with
    the Kaiser-sinc filter ``f``, scales by ``ratio`` and crops. Here each output phase ``s``
    is its own ``k / ratio``-tap filter over the padded input (polyphase form: no products
    with the zeros a strided transposed conv inserts), as shifted multiply-adds that XLA
    fuses into one pass.
    """
    k = kernel_size
    f = kaiser_sinc_filter(0.5 / ratio, 0.6 / ratio, k)
    pad = k // ratio - 1
    crop_l = pad * ratio + (k - ratio) // 2
    n = x.shape[1]
    xp = jnp.pad(x, ((0, 0), (pad, pad), (0, 0)), mode="edge")
    phases = []
    for s in range(ratio):
        # output ratio*p + s is z[j], j = ratio*p + s + crop_l, z[ratio*m + r] = sum_q xp[m - q] f[ratio*q + r]
        m0, r = divmod(s + crop_l, ratio)
        acc = 0
        for q in range((k - r + ratio - 1) // ratio):
            acc = acc + float(f[ratio * q + r]) * xp[:, m0 - q:m0 - q + n]
        phases.append(ratio * acc)
    return jnp.stack(phases, axis=2).reshape(x.shape[0], ratio * n, x.shape[2])


def downsample2(x, kernel_size=12, ratio=2):
    """The reference's anti-aliased downsampling: replicate pad, strided Kaiser-sinc filter
    (as ``k`` strided multiply-adds)."""
    k = kernel_size
    f = kaiser_sinc_filter(0.5 / ratio, 0.6 / ratio, k)
    even = k % 2 == 0
    xp = jnp.pad(x, ((0, 0), (k // 2 - int(even), k // 2), (0, 0)), mode="edge")
    n_out = (xp.shape[1] - k) // ratio + 1
    acc = 0
    for j in range(k):
        acc = acc + float(f[j]) * xp[:, j:j + ratio * (n_out - 1) + 1:ratio]
    return acc


# sin^2 for SnakeBeta. XLA:CPU's float32 sin is scalar code (~4.5 ns per element per core): at the
# published widths BigVGAN evaluates it on ~160 M upsampled samples per second of audio, about a third of
# the vocoder's time on CPU. sin^2 has period pi, so the sign of the reduction does not matter: reduce by
# pi in four float32 parts (Cody-Waite; the first three have 8 significant bits, so k * part is exact for
# |x| < 2^16 * pi) and evaluate the odd Taylor polynomial to x^13 on [-pi/2, pi/2] (truncation error
# < 7e-10). Plain multiply-adds that vectorise: 24x faster on this CPU, max abs error 2.5e-7 against
# float64 (jnp.sin: 9e-8).
_PI_PARTS = (np.float32(3.140625), np.float32(0.00096893310546875), np.float32(-1.2814998626708984e-06),
             np.float32(1.984187258941006e-09))
_SIN_COEFFS = tuple(np.float32(c) for c in (-1 / 6, 1 / 120, -1 / 5040, 1 / 362880, -1 / 39916800,
                                            1 / 6227020800))


def sin_squared(x):
    """``sin(x) ** 2`` in float32 by range reduction and a polynomial (see the notes above)."""
    k = jnp.round(x * np.float32(1 / np.pi))
    r = (((x - k * _PI_PARTS[0]) - k * _PI_PARTS[1]) - k * _PI_PARTS[2]) - k * _PI_PARTS[3]
    r2 = r * r
    p = _SIN_COEFFS[-1]
    for c in reversed(_SIN_COEFFS[:-1]):
        p = p * r2 + c
    s = r + r * r2 * p
    return s * s


class SnakeBeta(nnx.Module):
    """``x + 1 / (exp(beta) + 1e-9) * sin(x * exp(alpha)) ** 2`` (log-scale alpha, beta per channel)."""

    def __init__(self, channels):
        self.alpha = nnx.Param(jnp.zeros((channels,), _F32))
        self.beta = nnx.Param(jnp.zeros((channels,), _F32))

    def __call__(self, x):
        alpha = jnp.exp(self.alpha[...])
        beta = jnp.exp(self.beta[...])
        return x + (1.0 / (beta + 1e-9)) * sin_squared(x * alpha)


def _hold(x, valid, mode: str, reach: int):
    """``x [B, T, C]`` with the ``reach`` frames after each row's ``valid [B]`` frames replaced by what
    the reference's padding of an exact-length input would read there: zeros (``"zero"``: zero-padded
    convolutions) or the last valid frame (``"edge"``: the replicate-padded anti-aliasing filters).
    An operation that looks at most ``reach`` frames ahead then computes every valid position exactly;
    what it computes past them is replaced again before the next one. Only a ``reach``-frame window is
    rewritten (in place), not the whole tensor. ``valid`` None: ``x`` as is."""
    if valid is None or reach <= 0:
        return x
    w = min(int(reach), x.shape[1])

    def row(xr, n):  # xr [T, C]
        start = jnp.clip(n, 0, xr.shape[0] - w)  # a window that fits (clamped at the end)
        win = jax.lax.dynamic_slice_in_dim(xr, start, w, axis=0)
        past = (start + jnp.arange(w))[:, None] >= n
        fill = 0.0 if mode == "zero" else xr[jnp.maximum(n - 1, 0)][None, :]
        return jax.lax.dynamic_update_slice_in_dim(xr, jnp.where(past, fill, win), start, axis=0)

    return jax.vmap(row)(x, valid)


def _reach(conv) -> int:
    """How many frames past a position a :class:`Conv1d` reads (its right padding)."""
    k = conv.weight.shape[-1]
    return conv.dilation * (k - 1) - conv.dilation * (k - 1) // 2 if conv.padding == "same" else int(conv.padding)


_FILTER_REACH = 8  # the anti-aliasing filters' replicate padding (12 taps: 5 frames up, 6 down) and a margin


class AntiAliasedActivation1d(nnx.Module):
    def __init__(self, channels):
        self.act = SnakeBeta(channels)

    def __call__(self, x, valid=None):
        u = self.act(upsample2(_hold(x, valid, "edge", _FILTER_REACH)))
        return downsample2(_hold(u, None if valid is None else 2 * valid, "edge", _FILTER_REACH))


class AMPBlock(nnx.Module):
    def __init__(self, channels, k, dilations, *, rngs):
        pad = lambda d: int((k * d - d) / 2)
        self.convs1 = nnx.List([Conv1d(channels, channels, k, dilation=d, padding=pad(d), rngs=rngs)
                                for d in dilations])
        self.convs2 = nnx.List([Conv1d(channels, channels, k, dilation=1, padding=pad(1), rngs=rngs)
                                for _ in dilations])
        self.activations = nnx.List([AntiAliasedActivation1d(channels) for _ in range(2 * len(dilations))])

    def __call__(self, x, valid=None):
        for i in range(len(self.convs1)):
            r = x
            c1, c2 = self.convs1[i], self.convs2[i]
            x = c1(_hold(self.activations[2 * i](x, valid), valid, "zero", _reach(c1)))
            x = c2(_hold(self.activations[2 * i + 1](x, valid), valid, "zero", _reach(c2)))
            x = r + x
        return x


class BigVGAN(nnx.Module):
    """``Qwen2_5OmniToken2WavBigVGANModel``."""

    def __init__(self, cfg: BigVGANConfig, *, rngs: nnx.Rngs):
        c0 = cfg.upsample_initial_channel
        if len(cfg.upsample_rates) != len(cfg.upsample_kernel_sizes):
            raise CheckpointError(
                "config.json: bigvgan_config upsample_rates and upsample_kernel_sizes differ in length")
        self.conv_pre = Conv1d(cfg.mel_dim, c0, 7, padding=3, rngs=rngs)
        self.ups = nnx.List([
            nnx.List([ConvTranspose1d(c0 // 2 ** i, c0 // 2 ** (i + 1), k, s, (k - s) // 2, rngs=rngs)])
            for i, (s, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes))])
        self.resblocks = nnx.List([
            AMPBlock(c0 // 2 ** (i + 1), k, tuple(d), rngs=rngs)
            for i in range(len(cfg.upsample_rates))
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes)])
        c_last = c0 // 2 ** len(cfg.upsample_rates)
        self.activation_post = AntiAliasedActivation1d(c_last)
        self.conv_post = Conv1d(c_last, 1, 7, padding=3, bias=False, rngs=rngs)


def process_mel(mel):
    """log-mel -> amplitude -> dB (floor -115 dB) - 20 dB -> clamp-normalised to [-1, 1]."""
    min_db = -115.0
    amp = jnp.exp(mel)
    floor = jnp.exp(jnp.float32(min_db / 20.0 * np.log(10)))
    db = 20 * jnp.log10(jnp.maximum(amp, floor)) - 20
    return jnp.clip((2 * 1.0) * ((db - min_db) / (-min_db)) - 1.0, -1.0, 1.0)


def bigvgan_fn(voc: BigVGAN, cfg: BigVGANConfig, mel, lengths=None):
    """Traceable body of :func:`bigvgan`: ``mel [B, T, mel_dim]`` -> ``[B, T * prod(upsample_rates)]``.

    ``lengths [B]`` (int): row ``b``'s mel is its first ``lengths[b]`` frames, the rest padding. Before
    every operation that looks along time, what lies past a row's valid length is replaced by what
    that operation's padding would read at the end of an exact-length input (:func:`_hold`: zeros
    before the convolutions, the last valid frame before the anti-aliasing filters; a transposed
    convolution's output at valid positions only reads valid or zero inputs; only as many frames as
    the operation reads past a position are rewritten), so the first
    ``lengths[b] * prod(upsample_rates)`` samples equal the vocoder run on that row alone: one
    compiled program serves every length up to ``T``."""
    valid = None if lengths is None else jnp.asarray(lengths, jnp.int32)
    x = voc.conv_pre(_hold(process_mel(jnp.asarray(mel, _F32)), valid, "zero", _reach(voc.conv_pre)))
    nr = len(cfg.resblock_kernel_sizes)
    for i, rate in enumerate(cfg.upsample_rates):
        up = voc.ups[i][0]
        x = up(_hold(x, valid, "zero", -(-up.weight.shape[-1] // up.stride)))  # its taps per phase
        valid = None if valid is None else valid * rate
        acc = 0
        for j in range(nr):
            acc = acc + voc.resblocks[i * nr + j](x, valid)
        x = constrain(acc / nr, ("batch", "seq", None))
    x = voc.conv_post(_hold(voc.activation_post(x, valid), valid, "zero", _reach(voc.conv_post)))
    return jnp.clip(x, -1.0, 1.0)[..., 0]


@functools.partial(jax.jit, static_argnames=("structure", "cfg"))
def _bigvgan_jit(structure, leaves, mel, lengths, *, cfg):
    return bigvgan_fn(structure.merge(leaves), cfg, mel, lengths)


def bigvgan(voc: BigVGAN | Split, cfg: BigVGANConfig, mel, lengths=None):
    """Mel ``[B, T, mel_dim]`` (or ``[T, mel_dim]``) -> waveform ``[B, samples]`` in [-1, 1], 24 kHz.

    ``lengths``: each row's valid mel frames (rows padded to a common, bucketed ``T``); row ``b``'s
    first ``lengths[b] * prod(upsample_rates)`` samples are its waveform (see :func:`bigvgan_fn`)."""
    mel = jnp.asarray(mel, _F32)
    if mel.ndim == 2:
        mel = mel[None]
    if mel.ndim != 3 or mel.shape[-1] != cfg.mel_dim:
        raise InputError(f"bigvgan: mel must be [batch, frames, {cfg.mel_dim}], got {list(mel.shape)}")
    if lengths is not None:
        lengths = np.asarray(lengths, np.int32).reshape(-1)
        if lengths.shape[0] != mel.shape[0] or lengths.min() < 1 or lengths.max() > mel.shape[1]:
            raise InputError(f"bigvgan: lengths must give 1..{mel.shape[1]} frames for each of the {mel.shape[0]} "
                             f"rows, got {lengths.tolist()}")
    split = presplit(voc)
    with jax.default_matmul_precision(MATMUL_PRECISION):
        return _bigvgan_jit(split.structure, split.leaves, mel, lengths, cfg=cfg)


# --------------------------------------------------------------------------------------
# both


class Token2Wav(nnx.Module):
    """``Qwen2_5OmniToken2WavModel``."""

    def __init__(self, cfg: Token2WavConfig, *, rngs: nnx.Rngs):
        self.code2wav_dit_model = DiT(cfg.dit, rngs=rngs)
        self.code2wav_bigvgan_model = BigVGAN(cfg.bigvgan, rngs=rngs)


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


# --------------------------------------------------------------------------------------
# loading

HF_PREFIX = "token2wav."
_STACKED = ("code2wav_dit_model", "transformer_blocks")


def hf_key(path: tuple, layer: int | None = None) -> tuple[str, bool]:
    """HF key of a parameter path (one layer of a stacked path) and whether it is transposed."""
    parts = [str(p) for p in path]
    leaf = parts[-1]
    body = parts[:-1]
    if layer is not None:
        body = body[:2] + [str(layer)] + body[2:]
    name = {"kernel": "weight", "embedding": "weight"}.get(leaf, leaf)
    return HF_PREFIX + ".".join(body + [name]), leaf == "kernel"


def _where(ckpt) -> str:
    return str(getattr(ckpt, "directory", "checkpoint"))


def _read(ckpt, key: str, transpose: bool, shape: tuple) -> np.ndarray:
    if key not in ckpt.keys():
        raise CheckpointError(f"{_where(ckpt)}: missing tensor '{key}'")
    src_shape = tuple(ckpt.shape(key)) if hasattr(ckpt, "shape") else tuple(np.shape(ckpt.get(key)))
    want = tuple(reversed(shape)) if transpose else tuple(shape)
    if src_shape != want:
        raise CheckpointError(f"{_where(ckpt)}: tensor '{key}' has shape {list(src_shape)}, "
                              f"the config implies {list(want)}")
    a = np.asarray(ckpt.get(key))
    if transpose:
        a = a.T
    return np.ascontiguousarray(a.astype(np.float32, copy=False))


def load_token2wav(ckpt, cfg: Token2WavConfig, consumed: set | None = None) -> Token2Wav:
    """Build :class:`Token2Wav` (float32) from the ``token2wav.*`` tensors of ``ckpt``.

    ``ckpt``: a :class:`convert.safetensors_io.Checkpoint` (anything with ``keys()``, ``get(key)``
    and optionally ``shape(key)``). Every key read is added to ``consumed``. Raises
    :class:`CheckpointError` naming a missing or wrong-shaped tensor.
    """
    from convert.hf import flatten_dict, set_path

    consumed = consumed if consumed is not None else set()
    abstract = nnx.eval_shape(lambda: Token2Wav(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    pure = nnx.to_pure_dict(state)
    for path, sds in list(flatten_dict(pure)):
        shape = tuple(sds.shape)
        if tuple(str(p) for p in path[:2]) == _STACKED:
            host = np.empty(shape, np.float32)
            for i in range(shape[0]):
                key, tr = hf_key(path, layer=i)
                host[i] = _read(ckpt, key, tr, shape[1:])
                consumed.add(key)
        else:
            key, tr = hf_key(path)
            host = _read(ckpt, key, tr, shape)
            consumed.add(key)
        set_path(pure, path, jax.device_put(host))
    _check_buffers(ckpt, cfg, consumed)
    nnx.replace_by_pure_dict(state, pure)
    model = nnx.merge(graphdef, state)
    dit_per_layer(model.code2wav_dit_model, free=True)
    return model


# Buffers that are not parameters here (rebuilt from the config) but that checkpoints written
# by other versions may contain: checked against what we rebuild, then counted as consumed.
_BUFFER_RE = re.compile(r"^token2wav\.(code2wav_dit_model\.rotary_embed\.(original_)?inv_freq|"
                        r"code2wav_bigvgan_model\..*\.(upsample|downsample)(\.lowpass)?\.filter)$")


def is_token2wav_buffer(key: str) -> bool:
    """Whether ``key`` is a token2wav buffer (RoPE inverse frequencies, anti-aliasing filter)."""
    return _BUFFER_RE.match(key) is not None


def _check_buffers(ckpt, cfg: Token2WavConfig, consumed: set) -> None:
    for key in ckpt.keys():
        if not is_token2wav_buffer(key):
            continue
        if key.endswith("inv_freq"):
            want = inv_freq(cfg.dit.head_dim, cfg.dit.rope_theta)
        else:
            want = kaiser_sinc_filter(0.25, 0.3, 12)
        got = np.asarray(ckpt.get(key), np.float32).reshape(-1)
        # loose: a bf16 checkpoint rounds these; a config mismatch is far larger
        if got.shape != want.shape or not np.allclose(got, want, rtol=1e-2, atol=1e-3):
            raise CheckpointError(f"{_where(ckpt)}: buffer '{key}' does not match the config "
                                  f"(shape {list(got.shape)}, expected {list(want.shape)} with the rebuilt values)")
        consumed.add(key)
