"""Export a converted omni-jax checkpoint (or a training run's ``model/``) back to Hugging Face
safetensors shards with their index, the copied config / tokenizer / preprocessor files and
``spk_dict.pt``, rewritten with the torch-free writer of
:mod:`omni_jax.checkpoint.torch_pickle` (``torch.load(..., weights_only=True)`` accepts it).
Streamed and atomic like conversion; transformers loads the result.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from omni_jax.checkpoint import orbax_io as oio
from omni_jax.checkpoint.safetensors_io import DTYPES, SafetensorsFile, SafetensorsWriter, np_dtype, read_tensor
from omni_jax.checkpoint.torch_pickle import load_torch_pickle, write_torch_pickle
from omni_jax.errors import CheckpointError

from .atomic import atomic_directory, check_target, progress_bar

__all__ = ["export", "DEFAULT_SHARD_BYTES"]

DEFAULT_SHARD_BYTES = 4 << 30  # export: safetensors shard size


def export(converted_dir, hf_dir, *, overwrite=False, progress=True,
           max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict:
    """Write a Hugging Face checkpoint directory from a converted one: safetensors shards with
    ``model.safetensors.index.json``, the copied config / tokenizer / preprocessor files and
    ``spk_dict.pt`` (rewritten without torch). Streamed a group at a time and atomic like
    conversion. Parameters are written in their stored dtype (token2wav, stored in float32 by an
    explicit ``dtype``, in its source dtype), passthrough tensors bit-exact: the export of a
    conversion that kept the source dtypes (the default) gives back the source's tensors, bit for
    bit. Returns the index dict."""
    src = os.path.abspath(os.path.expanduser(os.fspath(converted_dir)))
    if not os.path.isdir(src):
        raise CheckpointError(f"{src}: not a directory")
    man = oio.read_manifest(src)
    target = check_target(hf_dir, overwrite, [src], "export directory")
    for name in man["files"] + ([man["voices"]] if man.get("voices") else []):
        if not os.path.isfile(os.path.join(src, name)):
            raise CheckpointError(f"{src}: file '{name}' named by the manifest is missing")
    pt = man["passthrough"]
    pt_file = None
    if pt["tensors"]:
        pt_file = SafetensorsFile(os.path.join(src, pt["file"]))
        for key, info in pt["tensors"].items():
            if key not in pt_file.entries or list(pt_file.shape(key)) != list(info["shape"]):
                raise CheckpointError(f"{pt['file']}: passthrough tensor '{key}' is missing or has the wrong shape")

    # the output tensors in production order, with their HF shape and dtype
    plan: list[tuple[str, np.dtype, tuple, int]] = []
    for name, comp in man["components"].items():
        seen = None
        for group in comp["groups"]:
            for item in group["items"]:
                key, transpose, src_dt = item[2], item[3], item[4]
                if key == seen:  # the next row block of the same tensor
                    continue
                seen = key
                info = comp["params"][item[0]]
                shape = tuple(info["shape"][1:] if info["stacked"] else info["shape"])
                if transpose:
                    shape = tuple(reversed(shape))
                dt = DTYPES[src_dt] if comp["export_dtype"] == "source" else np_dtype(oio.stored_dtype(comp, item))
                plan.append((key, dt, shape, int(np.prod(shape, dtype=np.int64)) * dt.itemsize))
    for key, info in pt["tensors"].items():
        dt = DTYPES[info["dtype"]]
        plan.append((key, dt, tuple(info["shape"]), int(np.prod(info["shape"], dtype=np.int64)) * dt.itemsize))
    if len({p[0] for p in plan}) != len(plan):
        raise CheckpointError(f"{src}: corrupt manifest (a tensor is named twice)")
    shards: list[list] = [[]]
    size = 0
    for entry in plan:
        if shards[-1] and size + entry[3] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry[3]
    n = len(shards)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    where = {e[0]: names[i] for i, s in enumerate(shards) for e in s}
    total = sum(e[3] for e in plan)

    with atomic_directory(target) as tmp, progress_bar(total, "export", progress) as bar:
        state = {"shard": -1, "writer": None, "left": 0}

        def writer_for(key):
            if key == state.get("key"):
                return state["writer"]
            state["key"] = key
            if state["left"] == 0:
                if state["writer"] is not None:
                    state["writer"].close()
                state["shard"] += 1
                i = state["shard"]
                state["writer"] = SafetensorsWriter(os.path.join(tmp, names[i]), [e[:3] for e in shards[i]],
                                                    metadata={"format": "pt"})
                state["left"] = len(shards[i])
            state["left"] -= 1
            return state["writer"]

        ckptr = oio.checkpointer()
        try:
            for name in man["components"]:
                for item, arr in oio.iter_component(src, man, name, ckptr):
                    key, transpose = item[2], item[3]
                    bar.update(writer_for(key).write(key, arr.T if transpose else arr))
                    del arr
            for key in pt["tensors"]:
                bar.update(writer_for(key).write(key, read_tensor(pt_file, key)))
            if state["writer"] is not None:
                state["writer"].close()
        finally:
            if state["writer"] is not None:
                state["writer"].abort()
        index = {"metadata": {"total_size": int(total)}, "weight_map": dict(sorted(where.items()))}
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
        for name in man["files"]:
            shutil.copyfile(os.path.join(src, name), os.path.join(tmp, name))
        if man.get("voices"):
            write_torch_pickle(os.path.join(tmp, "spk_dict.pt"), load_torch_pickle(os.path.join(src, man["voices"])),
                               archive="spk_dict")
    return index
