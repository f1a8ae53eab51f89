"""``torch.save`` zip archives of plain containers and tensors, read and written without torch.

Pickles can run arbitrary code on load, so :func:`load_torch_pickle` resolves only the globals a
plain tensor dictionary needs (torch's tensor-rebuild functions, storage types, dtypes and
``OrderedDict``), each mapped to a numpy re-implementation; any other global is refused with
a :class:`~omni_jax.errors.CheckpointError`. Tensors come back as numpy arrays (bfloat16 via
``ml_dtypes``). :func:`write_torch_pickle` writes the zip format that
``torch.load(..., weights_only=True)`` accepts (``spk_dict.pt`` on export).
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np

from ..errors import CheckpointError

__all__ = ["load_torch_pickle", "write_torch_pickle"]

# torch storage classes and dtypes (as pickled by name) -> numpy dtypes
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "ComplexDoubleStorage": np.complex128, "ComplexFloatStorage": np.complex64, "UntypedStorage": np.uint8,
}
_TORCH_DTYPES = {
    "float64": np.float64, "double": np.float64, "float32": np.float32, "float": np.float32,
    "float16": np.float16, "half": np.float16, "bfloat16": ml_dtypes.bfloat16, "int64": np.int64,
    "long": np.int64, "int32": np.int32, "int": np.int32, "int16": np.int16, "short": np.int16,
    "int8": np.int8, "uint8": np.uint8, "bool": np.bool_, "complex64": np.complex64,
    "complex128": np.complex128, "float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2,
}


class _StorageType:
    def __init__(self, name):
        self.name = name
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _DType:
    def __init__(self, name):
        self.dtype = np.dtype(_TORCH_DTYPES[name])


class _Storage:
    """A flat storage: its bytes as a 1-D numpy array of the storage dtype."""

    def __init__(self, flat: np.ndarray, big_endian: bool = False):
        self.flat = flat
        self.big_endian = big_endian

    def typed(self, dtype=None) -> np.ndarray:
        a = self.flat if dtype is None else self.flat.view(dtype)
        return a.byteswap() if self.big_endian else a


def _strided(flat: np.ndarray, offset, size, stride) -> np.ndarray:
    size = tuple(int(s) for s in size)
    stride = tuple(int(s) for s in stride)
    offset = int(offset)
    if len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride) or offset < 0:
        raise pickle.UnpicklingError("bad tensor geometry")
    if 0 in size:
        return np.zeros(size, flat.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= flat.size:
        raise pickle.UnpicklingError("tensor extends past its storage")
    item = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(flat[offset:], shape=size, strides=tuple(s * item for s in stride),
                                           writeable=False)
    return np.array(view)  # an owned, contiguous copy


def _check_metadata(metadata):
    if metadata and any(bool(v) for v in dict(metadata).values()):
        raise pickle.UnpicklingError(f"unsupported tensor metadata {dict(metadata)} (conjugate/negative bits)")


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("tensor without a storage")
    _check_metadata(metadata)
    return _strided(storage.typed(), storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                       metadata=None):
    if not isinstance(storage, _Storage) or not isinstance(dtype, _DType):
        raise pickle.UnpicklingError("tensor without a storage or dtype")
    _check_metadata(metadata)
    if storage.flat.nbytes % dtype.dtype.itemsize:
        raise pickle.UnpicklingError("storage size is not a multiple of the dtype size")
    return _strided(storage.typed(dtype.dtype), storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    return data


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, read_record, big_endian: bool):
        super().__init__(io.BytesIO(data))
        self._read_record = read_record
        self._big = big_endian
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module == "torch" and name in _TORCH_DTYPES:
            return _DType(name)
        raise pickle.UnpicklingError(f"refusing to load global '{module}.{name}' (only plain tensors and dicts "
                                     "are allowed)")

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or len(pid) != 5 or pid[0] not in ("storage", b"storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType):
            raise pickle.UnpicklingError("storage of unknown type")
        key = key.decode() if isinstance(key, bytes) else str(key)
        if key not in self._storages:
            raw = self._read_record(key)
            dt = stype.dtype
            if len(raw) != int(numel) * dt.itemsize:
                raise pickle.UnpicklingError(
                    f"storage '{key}' holds {len(raw)} bytes, expected {int(numel) * dt.itemsize}")
            self._storages[key] = _Storage(np.frombuffer(raw, dtype=dt), self._big)
        return self._storages[key]


def load_torch_pickle(path: str):
    """Load a ``torch.save`` zip archive of plain containers and tensors as numpy, without torch."""
    name = os.path.basename(path)
    try:
        zf = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{name}: not a torch zip archive ({e})") from None
    with zf:
        names = zf.namelist()
        pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1] or \
            [n for n in names if n == "data.pkl"]
        if not pkls:
            raise CheckpointError(f"{name}: not a torch zip archive (no data.pkl)")
        root = pkls[0][: -len("data.pkl")]
        big = False
        if root + "byteorder" in names:
            big = zf.read(root + "byteorder").strip() == b"big"

        def read_record(key):
            rec = f"{root}data/{key}"
            if rec not in names:
                raise pickle.UnpicklingError(f"missing storage record '{rec}'")
            return zf.read(rec)

        try:
            obj = _RestrictedUnpickler(zf.read(pkls[0]), read_record, big).load()
        except CheckpointError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, AttributeError, IndexError,
                zipfile.BadZipFile, OSError) as e:
            raise CheckpointError(f"{name}: cannot load ({e})") from None
    return obj


# --------------------------------------------------------------------------------------
# writing

_STORAGE_NAMES = {
    np.dtype(np.float64): "DoubleStorage", np.dtype(np.float32): "FloatStorage", np.dtype(np.float16): "HalfStorage",
    np.dtype(ml_dtypes.bfloat16): "BFloat16Storage", np.dtype(np.int64): "LongStorage",
    np.dtype(np.int32): "IntStorage", np.dtype(np.int16): "ShortStorage", np.dtype(np.int8): "CharStorage",
    np.dtype(np.uint8): "ByteStorage", np.dtype(np.bool_): "BoolStorage",
}


class _PickleWriter:
    """Protocol-2 pickle opcodes for plain containers and tensors, as ``torch.save`` writes them."""

    def __init__(self):
        self.out = io.BytesIO()
        self.storages: list[np.ndarray] = []

    def w(self, b: bytes):
        self.out.write(b)

    def global_(self, module: str, name: str):
        self.w(b"c" + module.encode() + b"\n" + name.encode() + b"\n")

    def obj(self, o):
        if o is None:
            self.w(b"N")
        elif o is True or o is False:
            self.w(b"\x88" if o else b"\x89")
        elif isinstance(o, (int, np.integer)) and not isinstance(o, np.ndarray):
            o = int(o)
            if -(1 << 31) <= o < (1 << 31):
                self.w(b"J" + struct.pack("<i", o))
            else:
                b = o.to_bytes((o.bit_length() + 8) // 8, "little", signed=True)
                self.w(b"\x8a" + bytes([len(b)]) + b)
        elif isinstance(o, (float, np.floating)) and not isinstance(o, np.ndarray):
            self.w(b"G" + struct.pack(">d", float(o)))
        elif isinstance(o, str):
            b = o.encode("utf-8")
            self.w(b"X" + struct.pack("<I", len(b)) + b)
        elif isinstance(o, dict):
            if isinstance(o, collections.OrderedDict):
                self.global_("collections", "OrderedDict")
                self.w(b")R")
            else:
                self.w(b"}")
            if o:
                self.w(b"(")
                for k, v in o.items():
                    self.obj(k)
                    self.obj(v)
                self.w(b"u")
        elif isinstance(o, list):
            self.w(b"]")
            if o:
                self.w(b"(")
                for v in o:
                    self.obj(v)
                self.w(b"e")
        elif isinstance(o, tuple):
            self.w(b"(")
            for v in o:
                self.obj(v)
            self.w(b"t")
        elif isinstance(o, np.ndarray):
            self.tensor(o)
        else:
            raise CheckpointError(f"cannot write a {type(o).__name__} into a torch pickle (plain tensors and "
                                  "containers only)")

    def tensor(self, a: np.ndarray):
        a = np.array(a, order="C", copy=not a.flags.c_contiguous)  # (ascontiguousarray makes 0-d 1-d)
        if a.dtype not in _STORAGE_NAMES:
            raise CheckpointError(f"cannot write a tensor of dtype {a.dtype} into a torch pickle")
        key = str(len(self.storages))
        self.storages.append(a)
        stride = tuple(int(s) // a.dtype.itemsize for s in a.strides) if a.size else tuple(
            int(np.prod(a.shape[i + 1:], dtype=np.int64)) for i in range(a.ndim))
        self.global_("torch._utils", "_rebuild_tensor_v2")
        self.w(b"(")  # args of _rebuild_tensor_v2
        self.w(b"(")  # persistent id
        self.obj("storage")
        self.global_("torch", _STORAGE_NAMES[a.dtype])
        self.obj(key)
        self.obj("cpu")
        self.obj(int(a.size))
        self.w(b"tQ")
        self.obj(0)
        self.obj(tuple(int(s) for s in a.shape))
        self.obj(stride)
        self.obj(False)
        self.global_("collections", "OrderedDict")
        self.w(b")R")
        self.w(b"tR")


def write_torch_pickle(path: str, obj, *, archive: str = "archive") -> None:
    """Write ``obj`` (dicts/lists/tuples of str, int, float, bool, None and numpy arrays) as a
    ``torch.save`` zip archive, without torch: ``<archive>/data.pkl`` (protocol 2, tensors as
    ``torch._utils._rebuild_tensor_v2`` over persistent storages), ``<archive>/data/<n>`` (raw
    little-endian storage bytes, 64-byte aligned like torch's writer), ``byteorder``, ``version``.
    ``torch.load(path, weights_only=True)`` accepts it; so does :func:`load_torch_pickle`."""
    pw = _PickleWriter()
    pw.w(b"\x80\x02")
    pw.obj(obj)
    pw.w(b".")
    records = [("data.pkl", pw.out.getvalue()), (".format_version", b"1"), (".storage_alignment", b"64"),
               ("byteorder", b"little")]
    records += [(f"data/{i}", a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes())
                for i, a in enumerate(pw.storages)]
    records.append(("version", b"3\n"))
    with open(path, "wb") as fh, zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED) as zf:
        for name, data in records:
            full = f"{archive}/{name}"
            zi = zipfile.ZipInfo(full, date_time=(1980, 1, 1, 0, 0, 0))
            zi.compress_type = zipfile.ZIP_STORED
            offset = fh.tell()
            pad = (-(offset + 30 + len(full.encode()) + 4)) % 64
            zi.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # torch's "FB" alignment padding
            zf.writestr(zi, data)
