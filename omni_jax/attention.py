"""One attention interface for every model in omni-jax.

``attention(q, k, v, mask=MaskSpec(...), impl=...)`` is the only way the thinker, talker,
audio encoder, vision encoder and DiT attend. The mask is described by *structure*,
never by a materialised ``[T, T]`` array handed in by the caller:

* ``causal``: key slot ``j`` is visible to a query at slot ``i`` when ``j <= i``, where
  ``q_slots``/``kv_slots`` give the slots (default ``arange``). With a KV cache the query
  slots are the cache slots being written.
* ``q_segment_ids`` / ``kv_segment_ids``: attention only inside equal segment ids (vision
  windows, audio chunks, packed sequences).
* ``kv_valid``: key padding ``[B, Tk]`` (left padding, unfilled cache slots).
* ``block_band``: ``(block_size, look_back, look_ahead)`` — query block ``bi`` sees key
  block ``bj`` when ``-look_back <= bj - bi <= look_ahead`` (the DiT's block-difference
  mask).

Two implementations: ``"xla"`` (plain jnp, the reference and the CPU path) and
``"pallas"`` (the kernels in :mod:`omni_jax.kernels`, TPU/GPU). Shapes: ``q [B, Tq, H, D]``,
``k, v [B, Tk, KVH, D]`` with ``H % KVH == 0`` (GQA); output ``[B, Tq, H, D]``.
Scores, softmax and the mask are computed in float32; the probabilities are cast to the
value dtype before the second product (as transformers' eager attention does).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import jax
import jax.numpy as jnp

log = logging.getLogger("omni_jax")

_NEG = float(jnp.finfo(jnp.float32).min)


@dataclass(frozen=True)
class MaskSpec:
    causal: bool = False
    q_slots: Optional[jax.Array] = None  # [B, Tq] or [Tq] int
    kv_slots: Optional[jax.Array] = None  # [B, Tk] or [Tk] int
    q_segment_ids: Optional[jax.Array] = None  # [B, Tq] int
    kv_segment_ids: Optional[jax.Array] = None  # [B, Tk] int
    kv_valid: Optional[jax.Array] = None  # [B, Tk] bool
    block_band: Optional[tuple[int, int, int]] = None  # (block_size, look_back, look_ahead)


def _bt(x, b):
    """Broadcast a [T] or [B, T] index array to [B, T]."""
    x = jnp.asarray(x)
    return x[None, :] if x.ndim == 1 else x


def build_mask(mask: MaskSpec, b: int, tq: int, tk: int) -> jax.Array | None:
    """Materialise the boolean mask ``[B, Tq, Tk]`` (True = attend). XLA path only."""
    m = None

    def _and(a, c):
        return c if a is None else a & c

    qs = _bt(mask.q_slots, b) if mask.q_slots is not None else jnp.arange(tq)[None, :]
    ks = _bt(mask.kv_slots, b) if mask.kv_slots is not None else jnp.arange(tk)[None, :]
    if mask.causal:
        m = _and(m, ks[:, None, :] <= qs[:, :, None])
    if mask.block_band is not None:
        bs, back, ahead = mask.block_band
        diff = ks[:, None, :] // bs - qs[:, :, None] // bs
        m = _and(m, (diff >= -back) & (diff <= ahead))
    if mask.q_segment_ids is not None or mask.kv_segment_ids is not None:
        qsg = _bt(mask.q_segment_ids, b)
        ksg = _bt(mask.kv_segment_ids, b)
        m = _and(m, qsg[:, :, None] == ksg[:, None, :])
    if mask.kv_valid is not None:
        m = _and(m, _bt(mask.kv_valid, b)[:, None, :].astype(bool))
    return m


def xla_attention(q, k, v, mask: MaskSpec, scale: float | None = None):
    b, tq, h, d = q.shape
    tk, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    scale = d ** -0.5 if scale is None else scale
    qg = q.reshape(b, tq, kvh, g, d)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) * scale
    m = build_mask(mask, b, tq, tk)
    if m is not None:
        # a large finite negative, not -inf: fully masked rows (padding queries) stay finite
        s = jnp.where(jnp.broadcast_to(m, (b, tq, tk))[:, None, None], s, _NEG)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    o = jnp.einsum("bhgqk,bkhd->bqhgd", p, v, preferred_element_type=jnp.float32)
    return o.reshape(b, tq, h, d).astype(q.dtype)


def default_impl() -> str:
    """The implementation used when ``attention=None``: ``"pallas"`` on GPU and TPU, ``"xla"`` on CPU
    (where the kernels would only run in interpret mode). ``OMNI_JAX_ATTENTION=xla|pallas``
    overrides it. The kernels fall back to XLA attention, logging once per reason, for calls
    they do not cover (:func:`omni_jax.kernels.unsupported_reason`)."""
    import os

    impl = os.environ.get("OMNI_JAX_ATTENTION", "")
    if impl in ("xla", "pallas"):
        return impl
    return "pallas" if jax.default_backend() in ("gpu", "cuda", "rocm", "tpu") else "xla"


def attention(q, k, v, mask: MaskSpec = MaskSpec(), *, scale: float | None = None, impl: str = "xla"):
    """Attention with a structurally described mask (see module docstring)."""
    if impl == "xla":
        return xla_attention(q, k, v, mask, scale)
    if impl == "pallas":
        from . import kernels

        return kernels.attention(q, k, v, mask, scale=scale)
    raise ValueError(f"attention implementation '{impl}' is not one of 'xla', 'pallas'")
