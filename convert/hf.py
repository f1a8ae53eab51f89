"""Hugging Face key names <-> omni-jax parameter paths, and loading a component's parameters.

Our parameter paths mirror transformers' module names, so the mapping is mechanical:

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

from omni_jax.errors import CheckpointError
from omni_jax.sharding import param_sharding, put

from .safetensors_io import Checkpoint


def flatten_dict(d, prefix=()):
    """Yield ``(path tuple, leaf)`` for a nested dict (an ``nnx.to_pure_dict`` tree)."""
    for k, v in d.items():
        if isinstance(v, dict):
            yield from flatten_dict(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def set_path(d, path, value):
    for k in path[:-1]:
        d = d[k]
    d[path[-1]] = value


def stack_index(path: tuple, stack_names=("layers",)) -> int | None:
    """Position of the stacked-layers element in ``path`` (its parameters carry a layer axis), or None."""
    for j, p in enumerate(path[:-1]):
        if str(p) in stack_names:
            return j
    return None


def hf_name(path: tuple, prefixes: dict[str, str], layer: int | None = None,
            stack_names=("layers",)) -> tuple[str, bool]:
    """HF key for a parameter path (one layer of a stacked path), and whether it is transposed."""
    parts = [str(p) for p in path]
    top = parts[0]
    prefix = prefixes.get(top, prefixes.get("", ""))
    leaf = parts[-1]
    transpose = leaf == "kernel"
    suffix = {"kernel": "weight", "embedding": "weight"}.get(leaf, leaf)
    body = parts[:-1]
    if layer is not None:
        j = stack_index(tuple(body) + ("",), stack_names)
        j = 0 if j is None else j
        body = [*body[:j + 1], str(layer), *body[j + 1:]]
    return prefix + ".".join(body + [suffix]), transpose


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


THINKER_LM_PREFIXES = {"lm_head": "thinker.", "": "thinker.model."}


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
