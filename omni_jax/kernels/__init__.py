"""Pallas attention kernels (GPU through Triton, TPU through Mosaic, CPU in interpret mode).

:func:`attention` is what ``omni_jax.attention.attention(..., impl="pallas")`` calls. It picks

* :func:`flash_attention` (blockwise, online softmax, block skipping, custom_vjp backward)
  for ``Tq > 1``;
* :func:`decode_attention` (split-K over the cache) for ``Tq == 1``;

and falls back to the XLA implementation (:func:`omni_jax.attention_xla.xla_attention`), logging
once per reason, where no kernel covers a call (mismatched dtypes, head dims above 256, empty
inputs). See :mod:`.flash` for the design.

Decode on a GPU (``Tq == 1``, platform ``gpu``) goes to XLA attention too, logged once: on the
H100 the fused XLA path measured faster than the split-K kernel plus its XLA glue (8k cache,
batch 1: 17.5 us vs 39 us per call; the 3B thinker decoded 99 tok/s at batch 1 with the kernel,
against 114 tok/s in an earlier run with XLA attention; ``bench/results/h100_attention.json``,
``bench/results/h100_3b_thinker*.json``). ``OMNI_JAX_PALLAS_DECODE=1`` forces
the kernel; :func:`decode_attention` calls it directly.

Decode on a TPU uses the kernel when each device holds one KV head (the 3B and 7B thinkers on
``tensor=4``), where it reads 0.6x the bytes of XLA's attention by the compiled cost analysis; with
several KV heads per device the kernel's ``[B, KVH, S, D]`` layout means a transpose of the whole
cache per step (about 3x XLA's bytes), so those calls go to XLA, logged once
(``python -m bench.tpu --kernels``, docs/tpu.md).

The platform follows ``jax.default_backend()``: ``gpu`` -> Triton lowering, ``tpu`` -> Mosaic,
anything else -> ``interpret=True`` (the same kernels run as plain JAX ops; this is how CPU
tests check them). ``platform=`` overrides it (the TPU lowering test uses that from CPU).
"""

from __future__ import annotations

import logging
import os

from ..attention_xla import xla_attention
from .flash import TPU_VMEM_CAP, current_platform, decode_attention, flash_attention, target_platform, tpu_vmem_bytes

log = logging.getLogger("omni_jax")
_warned: set[str] = set()

__all__ = ["attention", "flash_attention", "decode_attention", "current_platform", "target_platform",
           "unsupported_reason"]


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
    from ..sharding import _ctx

    mesh = _ctx.mesh
    if mesh is not None and mesh.size > 1 and (platform or current_platform()) != "interpret":
        return _sharded(q, k, v, mask, scale, platform, mesh)
    return _local(q, k, v, mask, scale=scale, platform=platform)


def _head_split(mesh, h: int, kvh: int):
    """How the ``tensor`` axis splits the heads: ``(q_axis, kv_axis, kv_pick)``. With ``kvh``
    divisible by the axis, both q and KV heads are split; with only the query heads divisible
    and each device's query heads inside one KV group (the 3B thinker's 16 / 2 heads on 4 or 8
    devices), the KV heads stay whole and each device picks its one KV head (``kv_pick``);
    otherwise heads are not split."""
    n = mesh.shape.get("tensor", 1)
    if n == 1:
        return None, None, False
    if h % n == 0 and kvh % n == 0:
        return "tensor", "tensor", False
    g = h // kvh
    if h % n == 0 and g % (h // n) == 0:
        return "tensor", None, True
    return None, None, False


def _sharded(q, k, v, mask, scale, platform, mesh):
    """The kernel under ``jax.shard_map``: batch rows over the axes the ``batch`` rule names (where
    they divide), heads as :func:`_head_split` says; mask arrays follow the batch rows of ``q``
    (those with a leading axis of 1, or none, are replicated). Where nothing divides (one image's
    patches with heads that do not divide ``tensor``), every device runs the whole call on
    replicated operands: still inside ``shard_map``, as XLA refuses to partition a Mosaic call."""
    import dataclasses

    import jax
    import numpy as np
    from jax.sharding import PartitionSpec as P

    from ..sharding import logical_to_spec

    b, _, h, _ = q.shape
    kvh = k.shape[2]
    batch = logical_to_spec(("batch",), (b,), mesh)[0]
    q_ax, kv_ax, pick = _head_split(mesh, h, kvh)
    fields = [f.name for f in dataclasses.fields(mask) if f.name not in ("causal", "block_band")]
    arrays = {n: getattr(mask, n) for n in fields if getattr(mask, n) is not None}

    def spec_of(x):
        x = np.shape(x)
        if len(x) == 2 and x[0] == b and b > 1:
            return P(batch, None)
        return P(*([None] * len(x)))

    arr_specs = {n: spec_of(x) for n, x in arrays.items()}
    heads_per = h // mesh.shape["tensor"] if q_ax else h

    def local(q, k, v, arrs):
        if pick:  # this device's query heads share one KV head: take it
            i = jax.lax.axis_index("tensor") * heads_per // (h // kvh)
            k = jax.lax.dynamic_slice_in_dim(k, i, 1, axis=2)
            v = jax.lax.dynamic_slice_in_dim(v, i, 1, axis=2)
        return _local(q, k, v, dataclasses.replace(mask, **arrs), scale=scale, platform=platform)

    qs, kvs = P(batch, None, q_ax, None), P(batch, None, kv_ax, None)
    return jax.shard_map(local, mesh=mesh, in_specs=(qs, kvs, kvs, arr_specs), out_specs=qs,
                         check_vma=False)(q, k, v, arrays)


def _local(q, k, v, mask, *, scale=None, platform=None):
    reason = unsupported_reason(q, k, v, mask)
    if reason is None and (platform or current_platform()) == "tpu":
        need = tpu_vmem_bytes(k.shape[1], k.shape[3], k.dtype.itemsize)
        if need > TPU_VMEM_CAP:
            # the TPU kernels keep a sequence's whole K/V in VMEM (the Mosaic compile fails beyond it:
            # 60 s of video is 172,800 patches under full attention): such calls use XLA attention
            reason = (f"keys of {k.shape[1]} x {k.shape[3]} need {need >> 20} MiB of TPU VMEM (whole-sequence K/V "
                      f"blocks), above {TPU_VMEM_CAP >> 20} MiB")
    if reason is not None:
        if reason not in _warned:
            _warned.add(reason)
            log.warning("omni_jax: no Pallas attention kernel for this call (%s); falling back to XLA attention",
                        reason)
        return xla_attention(q, k, v, mask, scale)
    if q.shape[1] == 1:
        plat = platform or current_platform()
        if plat == "tpu" and k.shape[2] > 1 and os.environ.get("OMNI_JAX_PALLAS_DECODE", "") != "1":
            # the TPU kernel reads K/V as [B, KVH, S, D]: with several KV heads per device that is a
            # transpose of the whole cache per layer per step (about 3x XLA's bytes by the compiled cost
            # analysis, python -m bench.tpu --kernels); with one (the 3B and 7B thinkers on tensor=4) the
            # layouts coincide and the kernel reads 0.6x XLA's bytes
            why = "decode on TPU with several KV heads per device"
            if why not in _warned:
                _warned.add(why)
                log.info("omni_jax: one-query (decode) attention with %d KV heads per device on TPU uses XLA "
                         "attention (the kernel would transpose the cache); OMNI_JAX_PALLAS_DECODE=1 forces the "
                         "kernel", k.shape[2])
            return xla_attention(q, k, v, mask, scale)
        if plat == "gpu" and os.environ.get("OMNI_JAX_PALLAS_DECODE", "") != "1":
            why = "decode on GPU"
            if why not in _warned:
                _warned.add(why)
                log.info("omni_jax: one-query (decode) attention on GPU uses XLA attention, measured faster than "
                         "the split-K Pallas kernel; OMNI_JAX_PALLAS_DECODE=1 forces the kernel")
            return xla_attention(q, k, v, mask, scale)
        return decode_attention(q, k, v, mask, scale=scale, platform=platform)
    return flash_attention(q, k, v, mask, scale=scale, platform=platform)
