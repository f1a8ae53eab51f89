"""Rotary position embeddings: the decoders' multimodal RoPE (TMRoPE's rotation).

Positions come as three streams ``[3, B, T]`` (temporal, height, width). The rotary
frequencies are split by ``mrope_section``; chunk ``i`` of the frequency axis takes its
angle from stream ``i % 3``. For text all three streams are equal and this is plain RoPE.
Angles, cos and sin are float32; the rotation is applied in float32 and cast back.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def inv_freq(head_dim: int, theta: float) -> np.ndarray:
    exps = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    return (1.0 / (np.float32(theta) ** exps)).astype(np.float32)


def mrope_cos_sin(position_ids, head_dim: int, theta: float, mrope_section):
    """cos, sin ``[B, T, head_dim]`` (float32) from ``position_ids [3, B, T]``."""
    inv = jnp.asarray(inv_freq(head_dim, theta))
    freqs = position_ids[..., None].astype(jnp.float32) * inv  # [3, B, T, D/2]
    idx = np.concatenate([np.full(n, i % 3) for i, n in enumerate(mrope_section)])  # stream per freq
    sel = jnp.moveaxis(freqs[idx, :, :, np.arange(len(idx))], 0, -1)  # [B, T, D/2]
    emb = jnp.concatenate([sel, sel], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def rotate_half(x):
    h = x.shape[-1] // 2
    return jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def apply_rope(x, cos, sin):
    """``x [B, T, H, D]``, ``cos/sin [B, T, D]``."""
    xf = x.astype(jnp.float32)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return (xf * c + rotate_half(xf) * s).astype(x.dtype)
