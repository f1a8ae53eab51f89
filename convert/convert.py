"""Convert a Hugging Face Qwen2.5-Omni checkpoint to the omni-jax orbax format.

    convert(hf_dir, out_dir, dtype=None)   # HF safetensors -> orbax (format: omni_jax/checkpoint/orbax_io.py)

The way back is ``export.py`` beside this module.

Conversion is lossless by default: each tensor is stored in its own source dtype (a bfloat16 tensor
stays bfloat16, a float32 one float32), so a float32 checkpoint (a fine-tuned export, or the
export of a float32 conversion) converts without rounding. ``dtype="bfloat16"``
or ``"float32"`` casts every floating parameter of thinker, audio, vision and talker explicitly
(token2wav, which runs in float32, is then stored in float32). The manifest records, per component
and per tensor, the dtype stored and the source dtype. Loading (``omni_jax.load(dir, dtype=...)``)
casts whatever was stored to the load dtype.

Both are

* streamed: tensors are read from the shards in row chunks (``os.pread``-style reads into a buffer,
  never a whole-file memory map, whose resident pages would count against us), converted
  (transposed to ``[in, out]``, cast) straight into their destination array, and written a group
  (at most 256 MiB of layers, parameters or row blocks of a larger tensor) at a time, so peak
  resident memory stays well under 3 GiB plus the largest single tensor whatever the checkpoint's
  size or dtype (measured by ``python -m bench.convert_memory``: about 1.1-1.5 GiB);
* atomic: everything is written into a temporary directory beside the target and renamed onto it
  only when complete; a failure (or Ctrl-C) removes the temporary directory and leaves nothing
  at the target; an existing target is replaced only with ``overwrite=True``;
* verified: every tensor's header shape and dtype are checked against the shapes the config
  implies *before* anything is written; every source tensor ends up as a parameter, as
  passthrough data (tensors that no module uses but that the round trip must keep, e.g. a tied
  ``lm_head`` or token2wav's rebuilt buffers) or under a component not selected; every parameter
  is filled; orbax's metadata of each written group is checked against the manifest. Bad input is a
  :class:`~omni_jax.errors.CheckpointError` (or ``InputError`` for bad arguments) naming the file,
  tensor or argument.

``spk_dict.pt`` is validated with omni_jax's restricted (torch-free) reader and copied.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np

from omni_jax.checkpoint import orbax_io as oio
from omni_jax.checkpoint.safetensors_io import (DTYPE_NAMES, DTYPES, Checkpoint, SafetensorsWriter, dtype_name,
                                                np_dtype, read_tensor)
from omni_jax.checkpoint.tree import flatten_dict, hf_name, stack_index
from omni_jax.config import load_config
from omni_jax.errors import CheckpointError, InputError
from omni_jax.voices import load_voices

from .atomic import atomic_directory, check_target, progress_bar
from .components import COMPONENT_ORDER, COMPONENTS, build_abstract, owner, parse_components, passthrough_reason

__all__ = ["convert", "DEFAULT_GROUP_BYTES"]

DEFAULT_GROUP_BYTES = 256 << 20  # converted bytes per orbax group (orbax's save holds about 2x a group besides)
_DTYPE_ALIASES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float32": "float32", "fp32": "float32"}
_FLOAT_NAMES = ("F64", "F32", "F16", "BF16")
_WEIGHT_EXT = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf", ".npz", ".index.json")


def _copy_files(hf_dir: str, out: str) -> tuple[list[str], str | None]:
    files, voices = [], None
    for name in sorted(os.listdir(hf_dir)):
        src = os.path.join(hf_dir, name)
        if name.startswith(".") or not os.path.isfile(src):
            continue
        if name == "spk_dict.pt":  # validated by convert() before anything was written
            shutil.copyfile(src, os.path.join(out, name))
            voices = name
            continue
        if name.endswith(_WEIGHT_EXT) or name == oio.MANIFEST:
            continue
        shutil.copyfile(src, os.path.join(out, name))
        files.append(name)
    return files, voices


def convert(hf_dir, out_dir, *, dtype=None, components=None, overwrite=False, progress=True,
            group_bytes: int = DEFAULT_GROUP_BYTES) -> dict:
    """Convert the Hugging Face checkpoint ``hf_dir`` into ``out_dir`` (see the module docstring).

    ``dtype``: ``None`` (the default) stores every tensor in its source dtype, so nothing is
    rounded; ``"bfloat16"`` or ``"float32"`` casts the floating parameters of thinker, audio, vision
    and talker to it, and stores token2wav (which runs in float32) in float32. ``components``:
    names (or a comma-separated string) among thinker, audio, vision, talker, token2wav
    (``thinker`` includes its audio and vision encoders); ``None`` converts all present. Returns
    the manifest, whose components record the stored and source dtypes (``"dtype"``,
    ``"stored_dtypes"``, ``"source_dtypes"``, ``"cast"``).
    """
    hf_dir = os.path.abspath(os.path.expanduser(os.fspath(hf_dir)))
    if dtype is not None:
        if not isinstance(dtype, str) or dtype.lower() not in _DTYPE_ALIASES:
            raise InputError(f"dtype '{dtype}' is not supported (bfloat16 or float32, or None to keep each "
                             "tensor's stored dtype)")
        dtype = _DTYPE_ALIASES[dtype.lower()]
    if not os.path.isdir(hf_dir):
        raise CheckpointError(f"{hf_dir}: not a directory (expected a Qwen2.5-Omni checkpoint directory)")
    if oio.is_converted(hf_dir):
        raise InputError(f"{hf_dir}: is already a converted omni-jax checkpoint (export turns it back into HF)")
    target = check_target(out_dir, overwrite, [hf_dir], "output directory")
    t0 = time.time()
    cfg = load_config(hf_dir)
    ckpt = Checkpoint(hf_dir)  # validates every header: truncated/corrupt shards, missing files
    keys = list(ckpt.keys())
    for key in keys:
        if owner(key) is None:
            raise CheckpointError(f"{ckpt.where[key]}: unexpected tensor '{key}' (not part of Qwen2.5-Omni)")
    present = [n for n in COMPONENT_ORDER
               if COMPONENTS[n].available(cfg) and any(owner(k) == n for k in keys)]
    if "thinker" not in present:
        raise CheckpointError(f"{hf_dir}: no thinker tensors ('thinker.model.*')")
    selected = parse_components(components, present, hf_dir)
    if group_bytes < 1:
        raise InputError(f"group_bytes must be positive, got {group_bytes}")
    if os.path.isfile(os.path.join(hf_dir, "spk_dict.pt")):
        load_voices(os.path.join(hf_dir, "spk_dict.pt"))  # restricted loader: a corrupt file is a CheckpointError

    # ---- plan and verify everything before writing anything
    plans: dict[str, dict] = {}
    consumed: set[str] = set()
    for name in selected:
        plans[name] = _plan_component(ckpt, cfg, name, dtype, consumed, group_bytes)
    passthrough: dict[str, dict] = {}
    skipped = 0
    for key in keys:
        if key in consumed:
            continue
        comp = owner(key)
        if comp not in selected:
            skipped += 1
            continue
        reason = passthrough_reason(key, cfg)
        if reason is None:
            raise CheckpointError(f"{ckpt.where[key]}: tensor '{key}' is not a parameter of the {comp} that "
                                  "config.json describes (config and tensors do not match)")
        sf = ckpt.file_of(key)
        passthrough[key] = {"dtype": DTYPE_NAMES[sf.dtype(key)], "shape": list(sf.shape(key)), "reason": reason}
    mapped = {it[2] for p in plans.values() for g in p["groups"] for it in g["items"]}
    n_items = len(mapped)
    if mapped != consumed or n_items + len(passthrough) + skipped != len(keys):  # each tensor exactly once
        raise CheckpointError(f"{hf_dir}: internal error: {len(keys)} tensors, {n_items} mapped, "
                              f"{len(passthrough)} passthrough, {skipped} skipped")
    total = sum(ckpt.file_of(k).nbytes(k) for k in keys if k in consumed or k in passthrough)

    man = {"format": oio.FORMAT, "format_version": oio.FORMAT_VERSION, "cast_to": dtype,
           "components": {}, "skipped_components": [c for c in present if c not in selected],
           "passthrough": {"file": oio.PASSTHROUGH_FILE if passthrough else None, "tensors": passthrough},
           "files": [], "voices": None,
           "source": {"tensors": len(keys), "bytes": int(sum(ckpt.file_of(k).nbytes(k) for k in keys))}}
    try:
        import orbax.checkpoint as ocp

        man["orbax_checkpoint_version"] = ocp.__version__
    except Exception:  # pragma: no cover
        pass

    with atomic_directory(target) as tmp, progress_bar(total, "convert", progress) as bar:
        ckptr = oio.checkpointer()
        for name in selected:
            plan = plans[name]
            for group in plan["groups"]:
                arrays = {}
                for item in group["items"]:
                    param, layer, key, transpose, _src, rows, stored = item
                    sf = ckpt.file_of(key)
                    arr = read_tensor(sf, key, transpose=transpose, dtype=np_dtype(stored), rows=rows)
                    arrays[oio.tree_path(param, layer, rows)] = arr
                    bar.update(arr.size * sf.dtype(key).itemsize)
                oio.save_group(ckptr, os.path.join(tmp, group["dir"]), arrays)
                del arrays
            man["components"][name] = plan
        if passthrough:
            w = SafetensorsWriter(os.path.join(tmp, oio.PASSTHROUGH_FILE),
                                  [(k, DTYPES[v["dtype"]], tuple(v["shape"])) for k, v in passthrough.items()],
                                  metadata={"format": "omni-jax-passthrough"})
            try:
                for key in passthrough:
                    bar.update(w.write(key, read_tensor(ckpt.file_of(key), key)))
                w.close()
            finally:
                w.abort()
        man["files"], man["voices"] = _copy_files(hf_dir, tmp)
        _verify_written(tmp, man, ckptr)
        man["seconds"] = round(time.time() - t0, 3)
        with open(os.path.join(tmp, oio.MANIFEST), "w", encoding="utf-8") as f:
            json.dump(man, f, indent=1)
    return man


def _plan_component(ckpt: Checkpoint, cfg, name: str, dtype: str | None, consumed: set, group_bytes: int) -> dict:
    """Map and check every parameter of component ``name`` against the source headers, and pack
    its (parameter, layer) items into groups. Each item's stored dtype is its source tensor's when
    ``dtype`` is None, else the dtype the component is cast to. Raises ``CheckpointError`` naming
    the tensor."""
    from flax import nnx

    comp = COMPONENTS[name]
    cast = (comp.fixed_dtype or dtype) if dtype is not None else None
    prefixes = comp.prefixes
    _, state = build_abstract(cfg, name, "float32")  # only the shapes are used
    flat = list(flatten_dict(nnx.to_pure_dict(state)))
    params: dict[str, dict] = {}
    items: list[list] = []
    stacked_items: list[tuple[int, list]] = []
    for path, sds in flat:
        shape = tuple(int(s) for s in sds.shape)
        pstr = oio.path_str(path)
        stacked = stack_index(path, comp.stack_names) is not None
        params[pstr] = {"shape": list(shape), "stacked": stacked}
        layers = range(shape[0]) if stacked else [None]
        for layer in layers:
            key, transpose = hf_name(path, prefixes, layer=layer, stack_names=comp.stack_names)
            want = shape[1:] if stacked else shape
            _check_source(ckpt, key, transpose, want)
            consumed.add(key)
            src_dt = DTYPE_NAMES[ckpt.file_of(key).dtype(key)]
            stored = cast or dtype_name(DTYPES[src_dt])
            nbytes = int(np.prod(want, dtype=np.int64)) * np_dtype(stored).itemsize
            n_rows = want[-1] if transpose else (want[0] if want else 1)
            n_pieces = min(n_rows, -(-nbytes // group_bytes)) if want else 1
            if n_pieces <= 1:
                pieces = [None]
            else:  # larger than a group: stored as blocks of source rows (see orbax_io)
                per = -(-n_rows // n_pieces)
                pieces = [[r, min(n_rows, r + per)] for r in range(0, n_rows, per)]
            for rows in pieces:
                item = [pstr, layer, key, bool(transpose), src_dt, rows, stored]
                (stacked_items.append((layer, item)) if stacked else items.append(item))
    # non-stacked first, then layer-major so that a group is a run of whole layers
    items += [it for _, it in sorted(stacked_items, key=lambda x: x[0])]
    groups, cur, cur_bytes = [], [], 0
    for item in items:
        nbytes = int(np.prod(oio.item_shape(params[item[0]], item), dtype=np.int64)) * np_dtype(item[6]).itemsize
        if cur and cur_bytes + nbytes > group_bytes:
            groups.append(cur)
            cur, cur_bytes = [], 0
        cur.append(item)
        cur_bytes += nbytes
    if cur:
        groups.append(cur)
    stored = sorted({it[6] for it in items})
    sources = sorted({dtype_name(DTYPES[it[4]]) for it in items})
    return {"dtype": stored[0] if len(stored) == 1 else "mixed", "stored_dtypes": stored, "source_dtypes": sources,
            "cast": any(it[6] != dtype_name(DTYPES[it[4]]) for it in items), "cast_to": cast,
            "export_dtype": "source" if comp.fixed_dtype else "store",
            "hf_prefixes": prefixes, "stack_names": list(comp.stack_names), "sharding_prefix": comp.sharding_prefix,
            "params": params,
            "groups": [{"dir": f"{oio.PARAMS_DIR}/{name}/g{i:05d}", "items": g} for i, g in enumerate(groups)]}


def _check_source(ckpt: Checkpoint, key: str, transpose: bool, shape: tuple) -> None:
    if key not in ckpt:
        raise CheckpointError(f"{ckpt.directory}: missing tensor '{key}' (the config implies it; config and "
                              "tensors do not match)")
    sf = ckpt.file_of(key)
    fname = os.path.basename(sf.path)
    src = tuple(sf.shape(key))
    want = tuple(reversed(shape)) if transpose else tuple(shape)
    if src != want:
        raise CheckpointError(f"{fname}: tensor '{key}' has shape {list(src)}, the config implies {list(want)}")
    if DTYPE_NAMES[sf.dtype(key)] not in _FLOAT_NAMES:
        raise CheckpointError(f"{fname}: tensor '{key}' has dtype {DTYPE_NAMES[sf.dtype(key)]}, "
                              "expected a floating-point parameter")


def _verify_written(directory: str, man: dict, ckptr) -> None:
    """Every group's orbax metadata names exactly the planned arrays, with their shapes and dtypes."""
    for name, comp in man["components"].items():
        for group in comp["groups"]:
            gdir = os.path.join(directory, group["dir"])
            try:
                meta = ckptr.metadata(gdir)
                meta = getattr(meta, "item_metadata", meta)
                tree = getattr(meta, "tree", meta)
            except Exception as e:
                raise CheckpointError(f"{gdir}: written group cannot be read back ({type(e).__name__}: {e})") from None
            got = {tuple(str(k) for k in p): leaf for p, leaf in flatten_dict(_to_dict(tree))}
            want = {oio.tree_path(it[0], it[1], it[5]): (oio.item_shape(comp["params"][it[0]], it),
                                                         np_dtype(oio.stored_dtype(comp, it)))
                    for it in group["items"]}
            if set(got) != set(want):
                raise CheckpointError(f"{gdir}: written group holds {sorted(got)}, planned {sorted(want)}")
            for p, (shape, store) in want.items():
                leaf = got[p]
                if tuple(leaf.shape) != shape or np.dtype(leaf.dtype) != store:
                    raise CheckpointError(f"{gdir}: array '{'/'.join(p)}' was written as {list(leaf.shape)} "
                                          f"{leaf.dtype}, planned {list(shape)} {store}")


def _to_dict(tree):
    if isinstance(tree, dict):
        return {k: _to_dict(v) for k, v in tree.items()}
    if hasattr(tree, "items") and not hasattr(tree, "shape"):
        return {k: _to_dict(v) for k, v in tree.items()}
    return tree
