"""Speaker voices from ``spk_dict.pt``, read without torch.

``spk_dict.pt`` is a ``torch.save`` zip archive of
``{"Chelsie": {"bos_token": int, "cond": tensor, "ref_mel": tensor}, "Ethan": {...}}``.
transformers uses, per voice: ``bos_token`` as the talker's text-bos id, ``cond`` (the
speaker vector, ``[enc_emb_dim]`` or ``[1, enc_emb_dim]``) as the DiT's speaker embedding and
``ref_mel`` (``[T_ref, mel_dim]`` or ``[1, T_ref, mel_dim]``) as the DiT's reference mel, both
cast to float32.

Pickles can run arbitrary code on load, so the unpickler here resolves only the globals a
plain tensor dictionary needs (torch's tensor-rebuild functions, storage types, dtypes and
``OrderedDict``), each mapped to a numpy re-implementation; any other global is refused with
a :class:`CheckpointError`. Tensors come back as numpy arrays (bfloat16 via ``ml_dtypes``).
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from .errors import CheckpointError

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


@dataclass(frozen=True)
class Voice:
    """One speaker: the talker's text-bos id, the DiT speaker vector and reference mel (float32)."""

    name: str
    bos_token: int
    cond: np.ndarray  # [enc_emb_dim]
    ref_mel: np.ndarray  # [T_ref, mel_dim]


def load_voices(path: str) -> dict[str, Voice]:
    """Read ``spk_dict.pt`` into ``{name: Voice}``; a malformed file is a ``CheckpointError``."""
    name = os.path.basename(path)
    obj = load_torch_pickle(path)
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{name}: expected a non-empty dict of voices")
    out = {}
    for spk, v in obj.items():
        if not isinstance(spk, str) or not isinstance(v, dict):
            raise CheckpointError(f"{name}: voice entry {spk!r} is not a dict")
        for field in ("bos_token", "cond", "ref_mel"):
            if field not in v:
                raise CheckpointError(f"{name}: voice '{spk}' has no '{field}'")
        bos = v["bos_token"]
        if isinstance(bos, np.ndarray):
            if bos.size != 1:
                raise CheckpointError(f"{name}: voice '{spk}' bos_token is not a single id")
            bos = bos.reshape(())[()]
        try:
            bos = int(bos)
        except (TypeError, ValueError):
            raise CheckpointError(f"{name}: voice '{spk}' bos_token is not an integer") from None
        cond, mel = v["cond"], v["ref_mel"]
        if not isinstance(cond, np.ndarray) or not isinstance(mel, np.ndarray):
            raise CheckpointError(f"{name}: voice '{spk}' cond/ref_mel are not tensors")
        cond = np.asarray(cond, np.float32)
        mel = np.asarray(mel, np.float32)
        if cond.ndim == 2 and cond.shape[0] == 1:
            cond = cond[0]
        if mel.ndim == 3 and mel.shape[0] == 1:
            mel = mel[0]
        if cond.ndim != 1 or mel.ndim != 2:
            raise CheckpointError(f"{name}: voice '{spk}' has cond {list(v['cond'].shape)} and ref_mel "
                                  f"{list(v['ref_mel'].shape)}; expected [D] and [T, mel_dim]")
        out[spk] = Voice(spk, bos, cond, mel)
    return out
