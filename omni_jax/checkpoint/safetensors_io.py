"""Safetensors checkpoints, read and written without torch.

Reading: :class:`Checkpoint` (a directory, sharded with an index or a single file) and
:class:`SafetensorsFile` validate every header up front (a truncated or corrupt shard, or an index
naming a missing file or one outside the directory, is a ``CheckpointError`` naming the file and
tensor). ``get`` returns a read-only ``numpy.memmap`` view, so nothing is read until it is used and a
checkpoint is never held twice in RAM; :func:`read_tensor` reads a tensor (or a block of its rows)
in bounded chunks instead, for conversion, whose resident memory a whole-file map would inflate.

Writing: :func:`write_file` writes one small file atomically (temp file + rename);
:class:`SafetensorsWriter` streams a file whose tensors are declared up front, piece by piece.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterator

import ml_dtypes
import numpy as np

from ..errors import CheckpointError
from ..validate import name_inside

__all__ = ["DTYPES", "DTYPE_NAMES", "CHUNK_BYTES", "SafetensorsFile", "Checkpoint", "shard_name_inside",
           "read_tensor", "write_file", "SafetensorsWriter", "np_dtype", "dtype_name"]

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024
CHUNK_BYTES = 64 << 20  # read_tensor's read granularity; SafetensorsWriter's for transposed views


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
    """``name`` (a shard named by the index file ``index``) as a path inside the checkpoint directory
    (:func:`omni_jax.validate.name_inside`)."""
    return name_inside(index, name, "shard")


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


# --------------------------------------------------------------------------------------
# streamed reading


def np_dtype(name: str) -> np.dtype:
    """numpy dtype of a numpy dtype name (``"bfloat16"`` is ml_dtypes')."""
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def dtype_name(dt) -> str:
    """numpy name of a dtype (``"bfloat16"`` for ml_dtypes' bfloat16)."""
    return "bfloat16" if np.dtype(dt) == np.dtype(ml_dtypes.bfloat16) else np.dtype(dt).name


def read_tensor(sf: SafetensorsFile, key: str, *, transpose: bool = False, dtype=None, rows=None,
                chunk_bytes: int = CHUNK_BYTES) -> np.ndarray:
    """Read one tensor (or its source rows ``rows = (start, stop)``) from ``sf`` in row chunks,
    converting each chunk straight into the destination array.

    ``transpose`` reverses the axes (torch ``[out, in]`` -> ``[in, out]``, so source rows become the
    last axis); ``dtype`` casts. Memory: the result plus one chunk. A short read (a file truncated
    since its header was checked) is a ``CheckpointError`` naming the file and tensor.
    """
    src_dt, shape, start, end = sf.entries[key]
    shape = tuple(shape)
    dst_dt = np.dtype(dtype) if dtype is not None else src_dt
    n_rows = shape[0] if shape else 1
    r_start, r_stop = (0, n_rows) if rows is None else (int(rows[0]), int(rows[1]))
    part = ((r_stop - r_start,) + shape[1:]) if shape else ()
    out = np.empty(tuple(reversed(part)) if transpose else part, dst_dt)
    name = os.path.basename(sf.path)
    if end == start or out.size == 0:
        return out
    row_bytes = (end - start) // n_rows
    per = max(1, chunk_bytes // max(row_bytes, 1))
    try:
        with open(sf.path, "rb", buffering=0) as f:
            for r0 in range(r_start, r_stop, per):
                r1 = min(r_stop, r0 + per)
                n = (r1 - r0) * row_bytes
                buf = np.empty(n, np.uint8)
                f.seek(sf.data_offset + start + r0 * row_bytes)
                got = f.readinto(memoryview(buf)) or 0
                while got < n:
                    more = f.readinto(memoryview(buf)[got:])
                    if not more:
                        break
                    got += more
                if got != n:
                    raise CheckpointError(f"{name}: truncated: tensor '{key}' could not be read in full")
                if not shape:
                    out[...] = buf.view(src_dt).reshape(())
                    continue
                chunk = buf.view(src_dt).reshape((r1 - r0,) + shape[1:])
                if transpose:
                    out[..., r0 - r_start:r1 - r_start] = chunk.T
                else:
                    out[r0 - r_start:r1 - r_start] = chunk
                del buf, chunk
    except OSError as e:
        raise CheckpointError(f"{name}: cannot read tensor '{key}' ({e.strerror or e})") from None
    return out


# --------------------------------------------------------------------------------------
# streamed writing


def _raw(a: np.ndarray) -> memoryview:
    """The bytes of ``a`` (C order) without a copy when contiguous; works for ml_dtypes dtypes, which
    the buffer protocol does not know."""
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8).data


class SafetensorsWriter:
    """Write one ``.safetensors`` file whose tensors (names, dtypes, shapes) are known in advance,
    in the declared order: the header goes first, then each tensor's bytes, which may come in
    several consecutive pieces (:meth:`write` with the same key: row blocks in order)."""

    def __init__(self, path: str, entries: list[tuple[str, np.dtype, tuple]], metadata: dict | None = None):
        self.path = path
        header: dict = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}} if metadata else {}
        off = 0
        self.order = []
        for key, dt, shape in entries:
            dt = np.dtype(dt)
            if dt not in DTYPE_NAMES:
                raise CheckpointError(f"tensor '{key}': dtype {dt} cannot be written to safetensors")
            n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
            header[key] = {"dtype": DTYPE_NAMES[dt], "shape": [int(s) for s in shape], "data_offsets": [off, off + n]}
            self.order.append((key, dt, tuple(int(s) for s in shape), n))
            off += n
        hb = json.dumps(header, separators=(",", ":")).encode()
        hb += b" " * ((8 - len(hb) % 8) % 8)
        self.size = 8 + len(hb) + off
        self._f = open(path, "wb")
        self._f.write(struct.pack("<Q", len(hb)))
        self._f.write(hb)
        self._cur = -1  # index of the tensor being written
        self._done = 0  # its bytes written so far

    def _finish_current(self):
        if self._cur >= 0 and self._done != self.order[self._cur][3]:
            key, _, _, n = self.order[self._cur]
            raise CheckpointError(f"{self.path}: internal error: tensor '{key}' got {self._done} of {n} bytes")

    def write(self, key: str, arr: np.ndarray) -> int:
        """Write ``arr`` (cast to the declared dtype) as the next bytes of tensor ``key``: the whole
        tensor, or its next block of rows. Returns the bytes written."""
        if self._cur < 0 or key != self.order[self._cur][0] or self._done == self.order[self._cur][3]:
            self._finish_current()
            self._cur += 1
            self._done = 0
            if self._cur >= len(self.order) or self.order[self._cur][0] != key:
                want = self.order[self._cur][0] if self._cur < len(self.order) else "nothing"
                raise CheckpointError(f"{self.path}: internal error: expected tensor '{want}', got '{key}'")
        _, dt, shape, n = self.order[self._cur]
        arr = np.asarray(arr)
        if arr.dtype != dt:
            arr = arr.astype(dt)
        if arr.nbytes + self._done > n or (shape and arr.shape[1:] != shape[1:] and arr.ndim == len(shape)):
            raise CheckpointError(f"{self.path}: internal error: tensor '{key}' {list(shape)} given {list(arr.shape)}")
        if arr.ndim and not arr.flags.c_contiguous:
            # a transposed view: one contiguous row block at a time
            per = max(1, CHUNK_BYTES // max(arr[0].nbytes, 1))
            for r0 in range(0, arr.shape[0], per):
                self._f.write(_raw(arr[r0:r0 + per]))
        else:
            self._f.write(_raw(arr))
        self._done += arr.nbytes
        return int(arr.nbytes)

    def write_chunks(self, key: str, chunks) -> int:
        """Write tensor ``key`` from an iterable of arrays (its bytes in order)."""
        return sum(self.write(key, c) for c in chunks)

    def close(self) -> None:
        if self._f is None:
            return
        self._f.close()
        self._f = None
        self._finish_current()
        if self._cur != len(self.order) - 1:
            raise CheckpointError(f"{self.path}: internal error: {len(self.order) - 1 - self._cur} tensors not written")
        if os.path.getsize(self.path) != self.size:
            raise CheckpointError(f"{self.path}: written size {os.path.getsize(self.path)} != {self.size}")

    def abort(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
