"""Pallas attention kernels (TPU and GPU).

The blockwise flash-attention and decode-attention kernels land with the kernels issue.
Until a kernel covers a call, :func:`attention` falls back to the XLA implementation and
logs that once, so ``attention="pallas"`` is always safe to ask for.
"""

from __future__ import annotations

import logging

log = logging.getLogger("omni_jax")
_warned: set[str] = set()


def attention(q, k, v, mask, *, scale=None):
    from ..attention import xla_attention

    key = "attention"
    if key not in _warned:
        _warned.add(key)
        log.warning("omni_jax: no Pallas attention kernel for this call yet; falling back to XLA attention")
    return xla_attention(q, k, v, mask, scale)
