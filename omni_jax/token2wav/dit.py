"""The Token2Wav DiT (``Qwen2_5OmniToken2WavDiTModel``): its modules and one evaluation of its velocity field.

Float32. Inputs are the noised mel ``[N, T, mel_dim]`` and the per-frame conditioning
(:func:`dit_conditioning`: speaker-encoder output, codec embedding repeated ``repeats`` times,
speaker vector); the output is the velocity ``[N, T, mel_dim]``.

Reference semantics kept exactly (transformers ``modeling_qwen2_5_omni``):

* attention: RoPE on the first head only, interleaved pairs ``(x0, x1), (x2, x3)...``; the mask is
  the block-difference band of each layer (``look_backward_layers`` / ``look_ahead_layers`` give one
  block each way, :func:`layer_bands`), through :func:`omni_jax.attention.attention` with
  ``MaskSpec(block_band=...)``; padded keys are masked with ``kv_valid``;
* AdaLN-modulated blocks (shift, scale, gate for attention and MLP), tanh-GELU MLP, a final AdaLN
  and projection to the mel.

Rows are independent (no cross-row op): a batch gives the per-row results. What is constant over
an ODE solve (the conditioning's share of the input projection, the time modulations at every
evaluation time, the per-layer weights) is computed once by :func:`dit_plan`; :func:`dit_eval`
runs one evaluation from it. A loaded model holds the blocks per layer (:func:`dit_per_layer`);
a DiT built in the stacked layout (training-style init) computes the same.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ..attention import MaskSpec, attention
from ..config import DiTConfig
from ..layers import Embed, Linear, unstack_layers
from ..rope import inv_freq, rotate_half
from ..sharding import constrain
from .speaker import ECAPA_TimeDelayNet

_F32 = jnp.float32


def _layer_norm(x, eps=1e-6):
    """LayerNorm without affine parameters (float32)."""
    mu = jnp.mean(x, axis=-1, keepdims=True)
    xc = x - mu
    var = jnp.mean(xc * xc, axis=-1, keepdims=True)
    return xc * jax.lax.rsqrt(var + eps)


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
