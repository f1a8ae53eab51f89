"""The structural attention mask and the XLA attention implementation.

:class:`MaskSpec` describes which keys a query sees by *structure*, never by a materialised
``[T, T]`` array handed in by the caller:

* ``causal``: key slot ``j`` is visible to a query at slot ``i`` when ``j <= i``, where
  ``q_slots``/``kv_slots`` give the slots (default ``arange``). With a KV cache the query
  slots are the cache slots being written.
* ``q_segment_ids`` / ``kv_segment_ids``: attention only inside equal segment ids (vision
  windows, audio chunks, packed sequences).
* ``kv_valid``: key padding ``[B, Tk]`` (left padding, unfilled cache slots).
* ``block_band``: ``(block_size, look_back, look_ahead)`` — query block ``bi`` sees key
  block ``bj`` when ``-look_back <= bj - bi <= look_ahead`` (the DiT's block-difference
  mask).

:func:`xla_attention` is the plain-jnp implementation: the reference, the CPU path, and what the
Pallas kernels (:mod:`omni_jax.kernels`) fall back to and differentiate through. It computes a
block band block by block (:func:`xla_band_attention`) and anything else densely
(:func:`dense_attention`, in query chunks of at most :data:`SCORE_BUDGET` score elements).
Shapes: ``q [B, Tq, H, D]``, ``k, v [B, Tk, KVH, D]`` with ``H % KVH == 0`` (GQA); output
``[B, Tq, H, D]``. Scores, softmax and the mask are computed in float32; the probabilities are
cast to the value dtype before the second product (as transformers' eager attention does).

This module imports neither :mod:`omni_jax.attention` (the interface, which re-exports these
names) nor :mod:`omni_jax.kernels`: both sit above it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import jax
import jax.numpy as jnp

_NEG = float(jnp.finfo(jnp.float32).min)


@dataclass(frozen=True)
class MaskSpec:
    """Which keys each query sees, by structure (the fields are described in the module docstring);
    the default sees every key."""

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


BAND_PATH = True  # False: block bands are computed densely too (the formulation before the band path; for A/B benches)


def _band_only(mask: MaskSpec, tq: int, tk: int) -> bool:
    """Whether ``mask`` is a block band over default slots (plus key padding and segment ids): the
    DiT's mask, or vision windows bounded by a band; computed block by block by
    :func:`xla_band_attention` unless :data:`BAND_PATH` is off."""
    return BAND_PATH and (mask.block_band is not None and not mask.causal and tq == tk and mask.q_slots is None
            and mask.kv_slots is None and (mask.q_segment_ids is None) == (mask.kv_segment_ids is None))


def xla_band_attention(q, k, v, mask: MaskSpec, scale: float | None = None):
    """Block-band attention computed per query block against the ``look_back + 1 + look_ahead``
    key blocks it can see: ``O(T * band)`` scores instead of the dense ``O(T^2)`` (the DiT's
    sequences are whole replies: 30 s of speech is 3,000 frames; at 24-frame blocks and a 3-block
    band, dense attention would compute 40x the needed scores and softmax). Same result as the dense
    path, including a query whose band holds no valid key (a padding frame): it gets the dense path's
    uniform average of all ``T`` values, as the Pallas kernels do."""
    b, t, h, d = q.shape
    kvh = k.shape[2]
    g = h // kvh
    bs, back, ahead = mask.block_band
    scale = d ** -0.5 if scale is None else scale
    nb = -(-t // bs)
    pad = nb * bs - t
    valid = (jnp.ones((b, t), bool) if mask.kv_valid is None
             else jnp.broadcast_to(_bt(mask.kv_valid, b).astype(bool), (b, t)))
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        valid = jnp.pad(valid, ((0, 0), (0, pad)))
    w = back + 1 + ahead

    def windows(x):  # [B, nb*bs, ...] -> [B, nb, w*bs, ...]: block i's keys are blocks i-back..i+ahead
        xb = x.reshape(b, nb, bs, *x.shape[2:])
        xb = jnp.pad(xb, ((0, 0), (back, ahead)) + ((0, 0),) * (xb.ndim - 2))  # missing blocks: invalid
        return jnp.concatenate([xb[:, j:j + nb] for j in range(w)], axis=2)

    kw, vw, mw = windows(k), windows(v), windows(valid)
    qb = q.reshape(b, nb, bs, kvh, g, d)
    s = jnp.einsum("bnqhgd,bnkhd->bnhgqk", qb, kw, preferred_element_type=jnp.float32) * scale
    m = mw[:, :, None, :]  # [B, nb, 1 | bs, w*bs]
    if mask.q_segment_ids is not None:  # padded and missing key blocks are already invalid in `m`
        qseg = jnp.broadcast_to(_bt(mask.q_segment_ids, b), (b, t))
        kseg = jnp.broadcast_to(_bt(mask.kv_segment_ids, b), (b, t))
        if pad:
            qseg = jnp.pad(qseg, ((0, 0), (0, pad)))
            kseg = jnp.pad(kseg, ((0, 0), (0, pad)))
        m = m & (qseg.reshape(b, nb, bs)[:, :, :, None] == windows(kseg)[:, :, None, :])
    s = jnp.where(m[:, :, None, None], s, _NEG)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    o = jnp.einsum("bnhgqk,bnkhd->bnqhgd", p, vw, preferred_element_type=jnp.float32)  # [B, nb, bs, KVH, G, D]
    if mask.kv_valid is not None or mask.q_segment_ids is not None:
        # queries whose band holds no visible key: the average of all T values
        empty = ~jnp.any(jnp.broadcast_to(m, (b, nb, bs, w * bs)), axis=-1)  # [B, nb, bs]
        w_all = jnp.asarray(1.0 / t, jnp.float32).astype(v.dtype).astype(jnp.float32)
        mean_v = jnp.sum(v[:, :t].astype(jnp.float32), axis=1) * w_all  # [B, KVH, D]
        o = jnp.where(empty[:, :, :, None, None, None], mean_v[:, None, None, :, None, :], o)
    return o.reshape(b, nb * bs, h, d)[:, :t].astype(q.dtype)


def xla_attention(q, k, v, mask: MaskSpec, scale: float | None = None):
    """The XLA implementation: :func:`xla_band_attention` for a block band longer than its band,
    else :func:`dense_attention`."""
    tq = q.shape[1]
    if _band_only(mask, tq, k.shape[1]) and tq > (sum(mask.block_band[1:]) + 1) * mask.block_band[0]:
        return xla_band_attention(q, k, v, mask, scale)
    return dense_attention(q, k, v, mask, scale)


# float32 score elements one dense attention call materialises at once (256 MB): longer queries run
# in chunks (a 25k-token prefill would otherwise need 16 x 25k x 25k x 4 B = 40 GB of scores)
SCORE_BUDGET = 1 << 26


def dense_attention(q, k, v, mask: MaskSpec, scale: float | None = None):
    """All ``Tq x Tk`` scores with the materialised mask (the reference formulation), in query
    chunks of at most :data:`SCORE_BUDGET` score elements each (``lax.map``; the same numbers, as
    every query's scores and softmax are computed whole either way)."""
    b, tq, h, _ = q.shape
    tk = k.shape[1]
    chunk = SCORE_BUDGET // (b * h * tk)
    if tq <= max(chunk, 1):
        return _dense(q, k, v, mask, scale)
    chunk = 1 << max(chunk, 1).bit_length() - 1  # a power of two
    n = -(-tq // chunk)
    pad = n * chunk - tq
    qs = jnp.arange(tq)[None, :] if mask.q_slots is None else _bt(mask.q_slots, b)
    qseg = None if mask.q_segment_ids is None else _bt(mask.q_segment_ids, b)
    if pad:  # padding queries: their rows are dropped
        q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
        qs = jnp.pad(qs, ((0, 0), (0, pad)), mode="edge")
        qseg = None if qseg is None else jnp.pad(qseg, ((0, 0), (0, pad)), mode="edge")

    def split(x):  # [B', n * chunk, ...] -> [n, B', chunk, ...]
        return jnp.moveaxis(x.reshape(x.shape[0], n, chunk, *x.shape[2:]), 1, 0)

    def one(xs):
        qc, qsc, qsegc = xs
        m = MaskSpec(causal=mask.causal, q_slots=qsc, kv_slots=mask.kv_slots, q_segment_ids=qsegc,
                     kv_segment_ids=mask.kv_segment_ids, kv_valid=mask.kv_valid, block_band=mask.block_band)
        return _dense(qc, k, v, m, scale)

    o = jax.lax.map(one, (split(q), split(qs), None if qseg is None else split(qseg)))  # [n, B, chunk, H, D]
    return jnp.moveaxis(o, 0, 1).reshape(b, n * chunk, h, -1)[:, :tq]


def _dense(q, k, v, mask: MaskSpec, scale: float | None = None):
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
