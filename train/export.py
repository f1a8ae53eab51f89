"""The trained model as a converted omni-jax checkpoint (``RUN_DIR/model``).

The base checkpoint's tensors are streamed into a Hugging Face directory with the trained
components' tensors substituted (in the base tensor's dtype), which the conversion tool beside
this package (``convert``) turns into the converted format, every tensor kept in the dtype it was written in (conversion's
default; a float32 base stays float32): ``omni_jax.load(RUN_DIR/model)`` loads it and ``omni-jax export
RUN_DIR/model HF_DIR`` gives a Hugging Face checkpoint back. Written atomically: the target
appears whole or not at all.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np

from omni_jax.checkpoint.components import COMPONENTS
from omni_jax.checkpoint.hf import iter_hf_tensors
from omni_jax.checkpoint.orbax_io import is_converted
from omni_jax.checkpoint.safetensors_io import Checkpoint, write_file

# The conversion tool is this package's sibling: omni_jax.convert beside omni_jax.train when installed,
# the top-level convert/ beside train/ in a source checkout.
if "." in __package__:
    from ..convert.convert import convert
    from ..convert.export import export
else:
    from convert.convert import convert
    from convert.export import export

SHARD_BYTES = 2 << 30


def write_model(model, params: dict, out_dir: str, *, progress: bool = True) -> str:
    base = model.path
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=parent, prefix=".model-") as tmp:
        src = base
        if is_converted(base):  # exported in its stored dtypes, which conversion then keeps
            src = os.path.join(tmp, "base")
            export(base, src, progress=False)
        ckpt = Checkpoint(src)
        new = {}
        for name, tree in params.items():
            comp = COMPONENTS[name]
            for key, arr in iter_hf_tensors(tree, comp.prefixes, comp.stack_names):
                new[key] = arr
        hf = os.path.join(tmp, "hf")
        os.makedirs(hf)
        shards, cur, size = [], {}, 0
        for key in ckpt.keys():
            a = ckpt.get(key)
            if key in new:
                a = np.asarray(new.pop(key)).astype(a.dtype)
            if cur and size + a.nbytes > SHARD_BYTES:
                shards.append(cur)
                cur, size = {}, 0
            cur[key] = a
            size += a.nbytes
        shards.append(cur)
        if new:
            raise RuntimeError(f"trained tensors missing from the base checkpoint: {sorted(new)[:5]}")
        weight_map = {}
        for i, sh in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_file(os.path.join(hf, name), sh, metadata={"format": "pt"})
            weight_map.update({k: name for k in sh})
        with open(os.path.join(hf, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
        for f_ in os.listdir(src):
            p = os.path.join(src, f_)
            if os.path.isfile(p) and not f_.endswith(".safetensors") and f_ != "model.safetensors.index.json":
                shutil.copyfile(p, os.path.join(hf, f_))
        convert(hf, out_dir, overwrite=True, progress=progress)
    return out_dir
