"""Lazy, validated reading (and atomic writing) of safetensors checkpoints, without torch.

Each tensor is a read-only ``numpy.memmap`` view of its file: nothing is read until it is
used, so a checkpoint is never held twice in RAM. Headers are validated up front: a
truncated or corrupt shard, or an index naming a missing file, is a ``CheckpointError``
naming the file (and tensor).
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterator

import ml_dtypes
import numpy as np

from omni_jax.errors import CheckpointError

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """One ``.safetensors`` file: header parsed and checked, tensors memory-mapped on demand."""

    def __init__(self, path: str):
        self.path = path
        name = os.path.basename(path)
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{name}: truncated or corrupt safetensors file (no header)")
                (n,) = struct.unpack("<Q", head)
                if n > _MAX_HEADER or 8 + n > size:
                    raise CheckpointError(f"{name}: truncated or corrupt safetensors file (bad header length)")
                header = json.loads(f.read(n))
        except OSError as e:
            raise CheckpointError(f"{name}: cannot read ({e.strerror})") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{name}: corrupt safetensors header (not JSON)") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{name}: corrupt safetensors header")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_offset = 8 + n
        data_size = size - self.data_offset
        self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for key, info in header.items():
            try:
                dt = DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                start, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{name}: corrupt header entry for tensor '{key}'") from None
            if end - start != int(np.prod(shape, dtype=np.int64)) * dt.itemsize or start < 0:
                raise CheckpointError(f"{name}: tensor '{key}' has inconsistent size in the header")
            if end > data_size:
                raise CheckpointError(
                    f"{name}: truncated: tensor '{key}' ends at byte {end} but the file has {data_size} data bytes")
            self.entries[key] = (dt, shape, start, end)
        self._mm = None

    def keys(self):
        return self.entries.keys()

    def shape(self, key):
        return self.entries[key][1]

    def dtype(self, key):
        return self.entries[key][0]

    def nbytes(self, key):
        _, _, s, e = self.entries[key]
        return e - s

    def get(self, key: str) -> np.ndarray:
        dt, shape, start, end = self.entries[key]
        if self._mm is None:
            if self.data_offset == os.path.getsize(self.path):
                self._mm = np.zeros(0, np.uint8)
            else:
                self._mm = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.data_offset)
        return self._mm[start:end].view(dt).reshape(shape)


def shard_name_inside(index: str, name) -> str:
    """``name`` (a file named by the checkpoint file ``index``) as a path inside the checkpoint directory.

    A checkpoint may only name files inside itself: an absolute name, a drive, or one that climbs out with
    ``..`` is a :class:`CheckpointError`, so a crafted index cannot make us read (or memory-map) files
    elsewhere. The check is on the name, not on where symlinks lead: Hugging Face's cache keeps a
    snapshot's files as symlinks into a sibling folder, which is the user's own layout."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise CheckpointError(f"{index}: names a shard that is not a file name ({name!r})")
    norm = os.path.normpath(name)
    if os.path.isabs(name) or os.path.splitdrive(name)[0] or norm == ".." or norm.startswith(".." + os.sep) \
            or norm.startswith("/"):
        raise CheckpointError(f"{index}: names shard '{name}', which is outside the checkpoint directory")
    return norm


class Checkpoint:
    """All tensors of a Hugging Face checkpoint directory (sharded with an index, or single file)."""

    def __init__(self, directory: str):
        self.directory = directory
        index = os.path.join(directory, "model.safetensors.index.json")
        single = os.path.join(directory, "model.safetensors")
        self.where: dict[str, str] = {}
        if os.path.exists(index):
            try:
                with open(index, encoding="utf-8") as f:
                    wm = json.load(f)["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError, TypeError):
                raise CheckpointError(f"{index}: corrupt index (no weight_map)") from None
            if not isinstance(wm, dict):
                raise CheckpointError(f"{index}: corrupt index (weight_map is not an object)")
            files = sorted(set(wm.values()), key=str)
            for fn in files:
                shard_name_inside(index, fn)
                if not os.path.exists(os.path.join(directory, fn)):
                    raise CheckpointError(f"{index}: names shard '{fn}', which does not exist")
            self.files = {fn: SafetensorsFile(os.path.join(directory, fn)) for fn in files}
            for key, fn in wm.items():
                if key not in self.files[fn].entries:
                    raise CheckpointError(f"{fn}: tensor '{key}' listed in the index is not in the file")
                self.where[key] = fn
        elif os.path.exists(single):
            self.files = {"model.safetensors": SafetensorsFile(single)}
            self.where = {k: "model.safetensors" for k in self.files["model.safetensors"].keys()}
        else:
            raise CheckpointError(
                f"{directory}: no model.safetensors or model.safetensors.index.json (not a checkpoint directory)")

    def keys(self):
        return self.where.keys()

    def __contains__(self, key):
        return key in self.where

    def file_of(self, key) -> SafetensorsFile:
        return self.files[self.where[key]]

    def shape(self, key):
        return self.file_of(key).shape(key)

    def get(self, key) -> np.ndarray:
        return self.file_of(key).get(key)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for key in self.where:
            yield key, self.get(key)


def write_file(path: str, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> None:
    """Write one safetensors file atomically (temp file + rename)."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    off = 0
    arrays = []
    for key, a in tensors.items():
        a = np.ascontiguousarray(a)
        if a.dtype not in DTYPE_NAMES:
            raise CheckpointError(f"tensor '{key}': dtype {a.dtype} cannot be written to safetensors")
        header[key] = {"dtype": DTYPE_NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [off, off + a.nbytes]}
        off += a.nbytes
        arrays.append(a)
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for a in arrays:
            f.write(a.tobytes())
    os.replace(tmp, path)
