"""Loading a component's parameters from Hugging Face keys, and the export direction.

A component's key map (``prefixes``: first path element, or ``""`` for any, -> HF key prefix) lives
beside its definition (``omni_jax.thinker.THINKER_LM_PREFIXES``, ``omni_jax.talker.TALKER_PREFIXES``,
``omni_jax.audio.AUDIO_PREFIXES``, ``omni_jax.vision.VISION_PREFIXES``); the mapping of a parameter
path to a key is :func:`omni_jax.checkpoint.tree.hf_name`:

* ``.../kernel`` <- ``....weight`` transposed (torch Linear is ``[out, in]``, ours ``[in, out]``)
* ``.../embedding`` <- ``....weight``; ``.../weight`` and ``.../bias`` unchanged
* a path under ``layers/`` is stacked over the layer axis: layer ``i`` comes from
  ``<prefix>layers.<i>.<rest>``.

Tensors are read one at a time from memory-mapped shards, converted to the load dtype and
placed on device (in their sharded layout when a mesh is given), so the checkpoint is never
assembled twice in host memory.
"""

from __future__ import annotations

from typing import Callable, Iterable

import jax
import numpy as np
from flax import nnx

from ..errors import CheckpointError
from ..sharding import param_sharding, put
from .safetensors_io import Checkpoint
from .tree import flatten_dict, hf_name, set_path, stack_index

__all__ = ["load_component", "check_unexpected", "iter_hf_tensors"]


def _convert(arr: np.ndarray, transpose: bool, dtype) -> np.ndarray:
    a = np.asarray(arr)
    if transpose:
        a = a.T
    return np.ascontiguousarray(a.astype(dtype, copy=False))


def load_component(ckpt: Checkpoint, abstract_state: nnx.State, *, prefixes: dict[str, str], dtype,
                   mesh=None, consumed: set | None = None, sharding_prefix: str = "",
                   stack_names=("layers",)) -> nnx.State:
    """Fill ``abstract_state`` (from ``nnx.split(nnx.eval_shape(...))``) from ``ckpt``.

    ``prefixes`` maps the first path element (or ``""`` for any) to the HF key prefix.
    Every HF key read is added to ``consumed``. Raises ``CheckpointError`` naming a missing
    or wrong-shaped tensor.
    """
    pure = nnx.to_pure_dict(abstract_state)
    consumed = consumed if consumed is not None else set()
    np_dtype = np.dtype(dtype)
    for path, sds in list(flatten_dict(pure)):
        shape = tuple(sds.shape)
        if stack_index(path, stack_names) is not None:
            n = shape[0]
            host = np.empty(shape, np_dtype)
            for i in range(n):
                key, tr = hf_name(path, prefixes, layer=i, stack_names=stack_names)
                host[i] = _read(ckpt, key, tr, shape[1:], np_dtype)
                consumed.add(key)
        else:
            key, tr = hf_name(path, prefixes)
            host = _read(ckpt, key, tr, shape, np_dtype)
            consumed.add(key)
        spath = sharding_prefix + "/".join(str(p) for p in path)
        if mesh is not None:
            arr = put(host, param_sharding(spath, shape, mesh))
        else:
            arr = jax.device_put(host)
        set_path(pure, path, arr)
        del host
    nnx.replace_by_pure_dict(abstract_state, pure)
    return abstract_state


def _read(ckpt: Checkpoint, key: str, transpose: bool, shape: tuple, dtype) -> np.ndarray:
    if key not in ckpt:
        raise CheckpointError(f"{ckpt.directory}: missing tensor '{key}'")
    src_shape = tuple(ckpt.shape(key))
    want = tuple(reversed(shape)) if transpose else shape
    if src_shape != want:
        raise CheckpointError(
            f"{ckpt.directory}: tensor '{key}' has shape {list(src_shape)}, the config implies {list(want)}")
    return _convert(ckpt.get(key), transpose, dtype)


def check_unexpected(ckpt: Checkpoint, consumed: set, allowed_prefixes: Iterable[str],
                     allowed: Callable[[str], bool] | None = None) -> None:
    """Every tensor must be consumed or under a prefix of a component loaded elsewhere."""
    allowed_prefixes = tuple(allowed_prefixes)
    for key in ckpt.keys():
        if key in consumed or key.startswith(allowed_prefixes) or (allowed and allowed(key)):
            continue
        raise CheckpointError(f"{ckpt.directory}: unexpected tensor '{key}' (not part of Qwen2.5-Omni)")


def iter_hf_tensors(state: nnx.State, prefixes: dict[str, str], stack_names=("layers",)):
    """Yield ``(hf_key, numpy array)`` for every parameter of ``state`` (an ``nnx.State`` or its pure
    dict; the export direction)."""
    pure = state if isinstance(state, dict) else nnx.to_pure_dict(state)
    for path, arr in flatten_dict(pure):
        a = np.asarray(arr)
        if stack_index(path, stack_names) is not None:
            for i in range(a.shape[0]):
                key, tr = hf_name(path, prefixes, layer=i, stack_names=stack_names)
                yield key, (a[i].T if tr else a[i])
        else:
            key, tr = hf_name(path, prefixes)
            yield key, (a.T if tr else a)
