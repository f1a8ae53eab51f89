"""The converted-checkpoint format (written by ``omni-jax convert``) and restoring it, sharded.

A converted directory ``OUT_DIR`` holds::

    omni_jax_checkpoint.json      the manifest (below); written last, so its presence marks a whole checkpoint
    params/<component>/gNNNNN/    one orbax checkpoint (StandardCheckpointHandler, OCDBT) per *group*
    passthrough.safetensors       source tensors that no module uses, kept bit-exact for the round trip
    config.json, generation_config.json, tokenizer / preprocessor files, chat template, spk_dict.pt

Why groups. A stacked parameter ``[L, ...]`` of the 7B thinker is up to 3.8 GB (7.6 GB in float32),
more than the conversion may hold at once (3 GiB plus the largest single *source* tensor), and an
orbax save needs its whole tree in memory (and holds about twice that again while it writes, as
measured). So parameters are stored per layer: a stacked parameter ``layers/mlp/gate_proj/kernel``
is saved as one array per layer, at tree path ``("layers", "mlp", "gate_proj", "kernel", "<i>")``;
other parameters at their own path. An item larger than a group (the embedding and the head of a
7B model, about 1 GiB each) is stored as blocks of its *source rows*, ``.../rows_<start>_<stop>``
(axis 0 of our layout, or the last axis of a transposed kernel), so that export writes them back
as consecutive bytes of the HF tensor. The items of a component are packed in order into groups of
at most ``group_bytes`` (256 MiB by default; a whole tiny model is one group), and each group is an
independent orbax checkpoint written and freed before the next is read: peak memory is bounded by
the group size, not by the checkpoint's or its largest tensor's. Every array is stored in *our*
layout (kernels already transposed to ``[in, out]``) and its item's stored dtype: by default the
source tensor's own (conversion rounds nothing), or the dtype an explicit ``--dtype`` cast to. So
restoring is a plain read, cast by orbax to the load dtype.

Restoring (:func:`restore_component`) asks orbax for each per-layer array directly in its sharded
layout (the parameter's ``NamedSharding`` from :func:`omni_jax.sharding.param_sharding`, minus the
layer axis, which the rules never shard) and writes it into a preallocated, sharded stacked array
(or row block) with a donated ``dynamic_update_slice``: each device reads only its shards and the
full host copy of a parameter never exists. Peak device memory is the component plus one group.

Manifest (``format_version`` 1), JSON::

    {"format": "omni-jax-orbax-checkpoint", "format_version": 1, "cast_to": null | "bfloat16" | "float32",
     "components": {"thinker": {
         "dtype": "float32" | ... | "mixed", "stored_dtypes": ["float32"], "source_dtypes": ["float32"],
         "cast": false, "cast_to": null | "bfloat16" | "float32", "export_dtype": "store" | "source",
         "hf_prefixes": {...}, "stack_names": ["layers"], "sharding_prefix": "",
         "params": {"layers/self_attn/q_proj/kernel": {"shape": [L, D, H], "stacked": true}, ...},
         "groups": [{"dir": "params/thinker/g00000",
                     "items": [[param_path, layer | null, hf_key, transposed, source_dtype,
                                [row_start, row_stop] | null, stored_dtype], ...]}, ...]},
         ...},
     "skipped_components": [...], "passthrough": {"file": ..., "tensors": {hf_key: {"dtype", "shape", "reason"}}},
     "files": [copied file names], "voices": "spk_dict.pt" | null,
     "source": {"tensors": N, "bytes": B}}

``cast_to`` is the conversion's ``dtype`` argument (null: every tensor kept its source dtype). Per
component, ``dtype`` is the one stored dtype of its parameters (``"mixed"`` when they differ, as
in a source that mixes them), ``stored_dtypes`` / ``source_dtypes`` the distinct dtypes stored and
read (numpy names: ``"bfloat16"``, ``"float32"``...), ``cast`` whether any parameter was stored in
a dtype other than its source's. An item's ``source_dtype`` is the safetensors name (``"BF16"``),
its ``stored_dtype`` the numpy name. Manifests written before ``stored_dtype`` existed hold one
``store_dtype`` per component instead; :func:`stored_dtype` reads both.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import threading
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..errors import CheckpointError
from ..validate import name_inside
from .tree import flatten_dict, set_path

__all__ = ["MANIFEST", "FORMAT", "FORMAT_VERSION", "PARAMS_DIR", "PASSTHROUGH_FILE", "COMPONENT_ORDER",
           "checkpointer", "path_str", "tree_path", "split_axis", "item_shape", "stored_dtype", "nested",
           "get_path", "is_converted", "read_manifest", "converted_components", "save_group",
           "restore_group_numpy", "iter_component", "restore_component"]

MANIFEST = "omni_jax_checkpoint.json"
FORMAT = "omni-jax-orbax-checkpoint"
FORMAT_VERSION = 1
PARAMS_DIR = "params"
PASSTHROUGH_FILE = "passthrough.safetensors"
COMPONENT_ORDER = ("thinker", "audio", "vision", "talker", "token2wav")


def _quiet_absl():
    try:
        from absl import logging as absl_logging

        if absl_logging.get_verbosity() < absl_logging.WARNING:
            absl_logging.set_verbosity(absl_logging.WARNING)
    except Exception:  # pragma: no cover - absl always comes with orbax
        pass


def checkpointer():
    """A synchronous orbax checkpointer (a save returns when its files are committed)."""
    import orbax.checkpoint as ocp

    _quiet_absl()
    return ocp.Checkpointer(ocp.StandardCheckpointHandler())


def path_str(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def tree_path(param: str, layer: int | None, rows=None) -> tuple[str, ...]:
    """Path of an item inside its group's orbax tree: the parameter path, then the layer, then
    ``rows_<start>_<stop>`` for a block of source rows of a tensor larger than a group."""
    parts = tuple(param.split("/"))
    if layer is not None:
        parts += (str(layer),)
    if rows is not None:
        parts += (f"rows_{int(rows[0])}_{int(rows[1])}",)
    return parts


def split_axis(item_ndim: int, transposed: bool) -> int:
    """Axis of a stored item that holds the source (HF) rows: the last one for a transposed kernel."""
    return item_ndim - 1 if transposed else 0


def item_shape(info: dict, item) -> tuple[int, ...]:
    """Stored shape of a manifest item (one layer of a stacked parameter; a row block if split)."""
    shape = list(info["shape"][1:] if info["stacked"] else info["shape"])
    rows = item[5]
    if rows is not None:
        shape[split_axis(len(shape), item[3])] = int(rows[1]) - int(rows[0])
    return tuple(shape)


def stored_dtype(comp: dict, item) -> str:
    """The dtype name an item of manifest component ``comp`` was stored in."""
    return item[6] if len(item) > 6 else comp["store_dtype"]


def nested(items: list[tuple[tuple[str, ...], object]]) -> dict:
    tree: dict = {}
    for path, value in items:
        d = tree
        for k in path[:-1]:
            d = d.setdefault(k, {})
        d[path[-1]] = value
    return tree


def get_path(tree: dict, path: tuple):
    for k in path:
        tree = tree[k]
    return tree


# --------------------------------------------------------------------------------------
# manifest


def is_converted(directory) -> bool:
    """Whether ``directory`` is a complete ``omni-jax convert`` output (its manifest names this format)."""
    p = os.path.join(os.fspath(directory), MANIFEST)
    if not os.path.isfile(p):
        return False
    try:
        with open(p, encoding="utf-8") as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_manifest(directory) -> dict:
    """The manifest of a converted directory; ``CheckpointError`` if absent, corrupt or of a newer format."""
    directory = os.fspath(directory)
    p = os.path.join(directory, MANIFEST)
    if not os.path.isfile(p):
        raise CheckpointError(f"{directory}: not a converted omni-jax checkpoint (no {MANIFEST})")
    try:
        with open(p, encoding="utf-8") as f:
            man = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{p}: cannot read ({e})") from None
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        raise CheckpointError(f"{p}: not an omni-jax checkpoint manifest")
    if man.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{p}: format version {man.get('format_version')} is not supported "
                              f"(this omni-jax reads version {FORMAT_VERSION})")
    for key in ("components", "passthrough", "files"):
        if key not in man:
            raise CheckpointError(f"{p}: corrupt manifest (no '{key}')")
    _check_names(p, man)
    return man


def _check_names(p: str, man: dict) -> None:
    """Every file and directory the manifest ``p`` names lies inside the checkpoint directory (checked on
    the names, :func:`omni_jax.validate.name_inside`): loading and export only ever read, and export only
    ever writes, inside the directories they were given."""
    comps, pt, files = man["components"], man["passthrough"], man["files"]
    if not isinstance(comps, dict) or not isinstance(pt, dict) or not isinstance(files, list):
        raise CheckpointError(f"{p}: corrupt manifest (components, passthrough or files of the wrong type)")
    for name, comp in comps.items():
        groups = comp.get("groups") if isinstance(comp, dict) else None
        if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
            raise CheckpointError(f"{p}: corrupt manifest (component '{name}' has no list of groups)")
        for group in groups:
            group["dir"] = name_inside(p, group.get("dir"), "parameter group")
    if pt.get("tensors"):
        pt["file"] = name_inside(p, pt.get("file"), "passthrough file")
    plain = files + ([man["voices"]] if man.get("voices") is not None else [])
    for name in plain:
        norm = name_inside(p, name)
        if os.path.basename(norm) != norm:  # convert copies only the files at the top of the source
            raise CheckpointError(f"{p}: names file '{name}', which is not a file at the top of the checkpoint")


def converted_components(directory) -> list[str]:
    """Names of the components a converted directory holds, in load order."""
    return list(read_manifest(directory)["components"])


# --------------------------------------------------------------------------------------
# groups


class _TolerantLoop(asyncio.SelectorEventLoop):
    """An event loop that drops the callbacks other threads schedule on it once it is closed.

    orbax runs each save and restore in a fresh event loop and closes it as soon as the call returns or
    raises. When one read of a damaged group fails, tensorstore still finishes the group's other reads in
    its own threads, and each then schedules its result on the closed loop: ``call_soon_threadsafe``
    raises ``RuntimeError: Event loop is closed`` there, and tensorstore prints that with a traceback on
    stderr, at any time after our error was reported. Those results belong to a call that already failed;
    dropping them is all that is left to do."""

    def call_soon_threadsafe(self, callback, *args, context=None):
        try:
            return super().call_soon_threadsafe(callback, *args, context=context)
        except RuntimeError:
            if self.is_closed():
                return None
            raise


class _TolerantPolicy(asyncio.DefaultEventLoopPolicy):
    def new_event_loop(self):
        return _TolerantLoop()


_policy_lock = threading.RLock()


@contextlib.contextmanager
def _orbax_loops():
    """Inside: the event loops orbax creates (``asyncio.new_event_loop``) are :class:`_TolerantLoop` instances.
    The policy is set only for the call and put back after, so nothing else in the process changes."""
    with _policy_lock:
        previous = asyncio.get_event_loop_policy()
        if isinstance(previous, _TolerantPolicy):
            yield
            return
        asyncio.set_event_loop_policy(_TolerantPolicy())
        try:
            yield
        finally:
            asyncio.set_event_loop_policy(previous)


def _reason(e: BaseException) -> str:
    """The part of an orbax / tensorstore error a user can act on, on one line: tensorstore's messages
    chain every layer (``Error opening "cast" driver: Error opening "zarr" driver: ...``) and append the
    full JSON spec; keep the innermost cause and the file it names."""
    text = " ".join(str(e).split())
    text = text.split(" [tensorstore_spec")[0]
    files = re.findall(r'local file "([^"]+)"', text)
    inner = text.rsplit(": ", 1)[-1] if ": " in text else text
    where = f"{os.path.basename(files[-1].rstrip('/'))}: " if files and not files[-1].endswith("/") else ""
    out = f"{type(e).__name__}: {where}{inner}" if inner else type(e).__name__
    return out if len(out) <= 300 else out[:297] + "..."


def save_group(ckptr, directory: str, arrays: dict[tuple[str, ...], np.ndarray]) -> None:
    """Write one group (``{tree path: array}``) as an orbax checkpoint at ``directory``."""
    try:
        with _orbax_loops():
            ckptr.save(os.path.abspath(directory), nested(list(arrays.items())))  # orbax wants absolute paths
    except CheckpointError:
        raise
    except Exception as e:  # orbax/tensorstore wrap I/O errors (disk full...) in several types
        raise CheckpointError(f"{directory}: cannot write parameter group ({_reason(e)})") from e


def _restore(ckptr, directory: str, target=None, *, component: str | None = None):
    what = "" if component is None else f"component '{component}': "
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: {what}parameter group is missing")
    where = os.path.abspath(directory)  # orbax refuses relative paths; users type them
    try:
        with _orbax_loops():
            if target is None:
                return ckptr.restore(where)
            return ckptr.restore(where, target)
    except CheckpointError:
        raise
    except Exception as e:  # orbax/tensorstore raise many types for damaged files
        raise CheckpointError(f"{directory}: {what}cannot restore parameter group, its files are damaged "
                              f"({_reason(e)})") from e


def restore_group_numpy(ckptr, directory: str, component: str | None = None) -> dict:
    """A group as a nested dict of host numpy arrays, in the stored dtype."""
    return _restore(ckptr, directory, component=component)


def iter_component(directory: str, man: dict, component: str, ckptr=None):
    """Yield ``(item, numpy array)`` for every stored item of ``component``, a group at a time.

    ``item`` is the manifest's ``[param_path, layer, hf_key, transposed, source_dtype, rows,
    stored_dtype]``; arrays come in their stored dtype; the items of one HF tensor come in order
    (row blocks ascending).
    """
    ckptr = ckptr or checkpointer()
    comp = man["components"][component]
    for group in comp["groups"]:
        gdir = os.path.join(directory, group["dir"])
        tree = restore_group_numpy(ckptr, gdir, component)
        for item in group["items"]:
            param, layer = item[0], item[1]
            try:
                arr = get_path(tree, tree_path(param, layer, item[5]))
            except (KeyError, TypeError):
                raise CheckpointError(f"{gdir}: no array for parameter '{param}'"
                                      + ("" if layer is None else f" layer {layer}")) from None
            want = item_shape(comp["params"][param], item)
            if tuple(arr.shape) != want:
                raise CheckpointError(f"{gdir}: parameter '{param}' has shape {list(arr.shape)}, "
                                      f"the manifest says {list(want)}")
            yield item, np.asarray(arr)
        del tree


# --------------------------------------------------------------------------------------
# restore


@partial(jax.jit, donate_argnums=0)
def _put(full, x, starts):
    """``full`` with block ``x`` written at ``starts`` (a stacked layer gets its leading axis)."""
    x = x.reshape((1,) * (full.ndim - x.ndim) + x.shape).astype(full.dtype)
    return jax.lax.dynamic_update_slice(full, x, starts)


def _zeros(shape, dtype, sharding):
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()


def _shardings(path: str, shape: tuple, mesh, stacked: bool):
    """(sharding of the full parameter, spec of one stored item as a tuple, or None without a mesh)."""
    from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

    if mesh is None:
        return SingleDeviceSharding(jax.local_devices()[0]), None
    from ..sharding import param_sharding

    full = param_sharding(path, shape, mesh)
    spec = tuple(full.spec) + (None,) * (len(shape) - len(full.spec))
    if stacked and spec[0] is not None:  # the rules never shard the layer axis; keep it whole if a table does
        spec = (None,) + spec[1:]
        full = NamedSharding(mesh, P(*spec))
    return full, (spec[1:] if stacked else spec)


def restore_component(out_dir, component: str, abstract_state: nnx.State, *, dtype=None, mesh=None,
                      ckptr=None) -> nnx.State:
    """Fill ``abstract_state`` (from ``nnx.split(nnx.eval_shape(...))[1]``) from a converted directory.

    ``component``: ``"thinker"`` (the ThinkerLM), ``"audio"``, ``"vision"``, ``"talker"`` or
    ``"token2wav"``. ``dtype``: the dtype of the restored arrays (cast from the stored dtype);
    ``None`` keeps each abstract leaf's dtype. ``mesh``: arrays come back sharded by
    :func:`omni_jax.sharding.param_sharding` (path prefixed with the component's sharding prefix,
    as :func:`omni_jax.checkpoint.hf.load_component` does); ``None`` puts them on the default device.
    Each stored item is read by orbax directly in its sharded layout (each device reads its
    shards); layers and row blocks are written into a preallocated sharded array by a donated
    ``dynamic_update_slice``. Raises :class:`CheckpointError` naming the component, parameter
    or group that does not fit.
    """
    from jax.sharding import NamedSharding, PartitionSpec as P

    out_dir = os.fspath(out_dir)
    man = read_manifest(out_dir)
    comp = man["components"].get(component)
    if comp is None:
        raise CheckpointError(f"{out_dir}: component '{component}' was not converted "
                              f"(it holds {', '.join(man['components']) or 'none'})")
    params = comp["params"]
    pure = nnx.to_pure_dict(abstract_state)
    flat = {path_str(p): (p, sds) for p, sds in flatten_dict(pure)}
    for name in flat:
        if name not in params:
            raise CheckpointError(f"{out_dir}: component '{component}' has no parameter '{name}' "
                                  "(converted from a different config?)")
    for name in params:
        if name not in flat:
            raise CheckpointError(f"{out_dir}: component '{component}' parameter '{name}' is not in the model "
                                  "(converted from a different config?)")
    split = {it[0] for g in comp["groups"] for it in g["items"] if it[5] is not None}
    out: dict[str, jax.Array] = {}
    item_spec: dict[str, object] = {}
    dtypes: dict[str, np.dtype] = {}
    prefix = comp.get("sharding_prefix", "")
    for name, (path, sds) in flat.items():
        shape = tuple(sds.shape)
        info = params[name]
        if tuple(info["shape"]) != shape:
            raise CheckpointError(f"{out_dir}: component '{component}' parameter '{name}' has shape "
                                  f"{list(info['shape'])}, the model expects {list(shape)}")
        dt = np.dtype(dtype) if dtype is not None else np.dtype(sds.dtype)
        dtypes[name] = dt
        full, spec = _shardings(prefix + name, shape, mesh, info["stacked"])
        item_spec[name] = (full, spec)
        if info["stacked"] or name in split:
            out[name] = _zeros(shape, dt, full)
    filled: dict[str, list] = {name: [] for name in flat}
    ckptr = ckptr or checkpointer()
    for group in comp["groups"]:
        gdir = os.path.join(out_dir, group["dir"])
        entries = []
        for item in group["items"]:
            name, layer, rows = item[0], item[1], item[5]
            if name not in flat:
                raise CheckpointError(f"{gdir}: unknown parameter '{name}'")
            shape = item_shape(params[name], item)
            full, spec = item_spec[name]
            if spec is None:
                sharding = full
            else:
                if rows is not None:  # a row block: replicated along the split axis (it may not divide)
                    spec = list(spec)
                    spec[split_axis(len(shape), item[3])] = None
                sharding = NamedSharding(mesh, P(*spec))
            entries.append((tree_path(name, layer, rows), jax.ShapeDtypeStruct(shape, dtypes[name], sharding=sharding)))
        tree = _restore(ckptr, gdir, nested(entries), component=component)
        for item in group["items"]:
            name, layer, rows = item[0], item[1], item[5]
            arr = get_path(tree, tree_path(name, layer, rows))
            if name not in out or (layer is None and rows is None):
                out[name] = arr
            else:
                starts = [0] * len(flat[name][1].shape)
                if layer is not None:
                    starts[0] = int(layer)
                if rows is not None:
                    starts[(1 if layer is not None else 0) + split_axis(arr.ndim, item[3])] = int(rows[0])
                out[name] = _put(out[name], arr, tuple(jnp.int32(s) for s in starts))
            filled[name].append((layer, None if rows is None else (int(rows[0]), int(rows[1]))))
        del tree
    for name, (path, sds) in flat.items():
        _check_filled(out_dir, component, name, params[name], sds.shape, filled[name], comp)
        set_path(pure, path, out[name])
    nnx.replace_by_pure_dict(abstract_state, pure)
    return abstract_state


def _check_filled(out_dir, component, name, info, shape, got, comp) -> None:
    """The stored items of a parameter cover it exactly once (every layer, every row)."""
    items = {(it[1], None if it[5] is None else tuple(it[5])): it for g in comp["groups"] for it in g["items"]
             if it[0] == name}
    layers = range(shape[0]) if info["stacked"] else [None]
    ok = len(got) == len(set(got))
    for layer in layers:
        blocks = sorted(r for (l, r) in got if l == layer and r is not None)
        whole = (layer, None) in got
        if blocks:
            it = items[(layer, blocks[0])]
            n = (shape[1:] if info["stacked"] else shape)[split_axis(len(shape) - info["stacked"], it[3])]
            ok &= not whole and blocks[0][0] == 0 and blocks[-1][1] == n and all(
                a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
        else:
            ok &= whole
        if not ok:
            raise CheckpointError(f"{out_dir}: component '{component}' parameter '{name}' is incomplete or "
                                  f"overlapping" + ("" if layer is None else f" at layer {layer}"))
