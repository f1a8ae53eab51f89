"""One attention interface for every model in omni-jax.

``attention(q, k, v, mask=MaskSpec(...), impl=...)`` is the only way the thinker, talker,
audio encoder, vision encoder and DiT attend. The mask is described by *structure*
(:class:`MaskSpec`: causal slots, segment ids, key padding, a block band), never by a
materialised ``[T, T]`` array handed in by the caller.

Two implementations: ``"xla"`` (plain jnp, the reference and the CPU path:
:func:`xla_attention`) and ``"pallas"`` (the kernels in :mod:`omni_jax.kernels`, TPU/GPU).
Shapes: ``q [B, Tq, H, D]``, ``k, v [B, Tk, KVH, D]`` with ``H % KVH == 0`` (GQA); output
``[B, Tq, H, D]``.

:class:`MaskSpec`, :func:`build_mask` and the XLA implementation (:func:`xla_attention`,
:func:`xla_band_attention`, :func:`dense_attention`, :data:`SCORE_BUDGET`) are defined in
:mod:`omni_jax.attention_xla`, below both this module and the kernels, and re-exported here.
"""

from __future__ import annotations

import jax

from .attention_xla import SCORE_BUDGET, MaskSpec, build_mask, dense_attention, xla_attention, xla_band_attention

__all__ = ["attention", "default_impl", "MaskSpec", "build_mask", "xla_attention", "xla_band_attention",
           "dense_attention", "SCORE_BUDGET"]


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
    """Attention with a structurally described mask (:class:`MaskSpec`) by implementation ``impl``."""
    if impl == "xla":
        return xla_attention(q, k, v, mask, scale)
    if impl == "pallas":
        from . import kernels

        return kernels.attention(q, k, v, mask, scale=scale)
    raise ValueError(f"attention implementation '{impl}' is not one of 'xla', 'pallas'")
