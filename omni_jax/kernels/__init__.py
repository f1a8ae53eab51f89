"""Pallas attention kernels (GPU through Triton, TPU through Mosaic, CPU in interpret mode).

:func:`attention` is what ``omni_jax.attention.attention(..., impl="pallas")`` calls. It picks

* :func:`flash_attention` (blockwise, online softmax, block skipping, custom_vjp backward)
  for ``Tq > 1``;
* :func:`decode_attention` (split-K over the cache) for ``Tq == 1``;

and falls back to the XLA implementation, logging once per reason, where no kernel covers a
call (mismatched dtypes, head dims above 256, empty inputs). See :mod:`.flash` for the design.

Decode on a GPU (``Tq == 1``, platform ``gpu``) goes to XLA attention too, logged once: on the
H100 the fused XLA path measured faster than the split-K kernel plus its XLA glue (8k cache,
batch 1: 17.5 us vs 39 us per call; the 3B thinker decoded 99 tok/s at batch 1 with the kernel,
against 114 tok/s in an earlier run with XLA attention; ``bench/results_h100_attention.json``,
``bench/results_h100_3b_thinker*.json``). ``OMNI_JAX_PALLAS_DECODE=1`` forces
the kernel; :func:`decode_attention` calls it directly.

The platform follows ``jax.default_backend()``: ``gpu`` -> Triton lowering, ``tpu`` -> Mosaic,
anything else -> ``interpret=True`` (the same kernels run as plain JAX ops; this is how CPU
tests check them). ``platform=`` overrides it (the TPU lowering test uses that from CPU).
"""

from __future__ import annotations

import logging
import os

from .flash import current_platform, decode_attention, flash_attention

log = logging.getLogger("omni_jax")
_warned: set[str] = set()

__all__ = ["attention", "flash_attention", "decode_attention", "current_platform", "unsupported_reason"]


def unsupported_reason(q, k, v, mask) -> str | None:
    """Why no kernel covers this call (``None`` when one does)."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        return "inputs are not [B, T, H, D]"
    b, tq, h, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        return f"k/v shapes {k.shape}/{v.shape} do not match q {q.shape}"
    if h % k.shape[2]:
        return f"{h} query heads are not a multiple of {k.shape[2]} KV heads"
    if not (q.dtype == k.dtype == v.dtype):
        return f"mixed dtypes q={q.dtype} k={k.dtype} v={v.dtype}"
    if d > 256:
        return f"head dim {d} > 256"
    if tq == 0 or k.shape[1] == 0:
        return "empty sequence"
    return None


def attention(q, k, v, mask, *, scale=None, platform=None):
    reason = unsupported_reason(q, k, v, mask)
    if reason is not None:
        from ..attention import xla_attention

        if reason not in _warned:
            _warned.add(reason)
            log.warning("omni_jax: no Pallas attention kernel for this call (%s); falling back to XLA attention",
                        reason)
        return xla_attention(q, k, v, mask, scale)
    if q.shape[1] == 1:
        if (platform or current_platform()) == "gpu" and os.environ.get("OMNI_JAX_PALLAS_DECODE", "") != "1":
            from ..attention import xla_attention

            why = "decode on GPU"
            if why not in _warned:
                _warned.add(why)
                log.info("omni_jax: one-query (decode) attention on GPU uses XLA attention, measured faster than "
                         "the split-K Pallas kernel; OMNI_JAX_PALLAS_DECODE=1 forces the kernel")
            return xla_attention(q, k, v, mask, scale)
        return decode_attention(q, k, v, mask, scale=scale, platform=platform)
    return flash_attention(q, k, v, mask, scale=scale, platform=platform)
