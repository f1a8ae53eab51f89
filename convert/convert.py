"""Convert a Hugging Face Qwen2.5-Omni checkpoint to the omni-jax orbax format, and export it back.

    convert(hf_dir, out_dir, dtype=None)            # HF safetensors -> orbax (see convert/orbax_io.py)
    export(converted_dir, hf_dir)                   # orbax -> HF safetensors shards + index + spk_dict.pt

Conversion is lossless by default: each tensor is stored in its own source dtype (a bfloat16 tensor
stays bfloat16, a float32 one float32), so a float32 checkpoint (a fine-tuned export, or this
module's own :func:`export` of a float32 conversion) converts without rounding. ``dtype="bfloat16"``
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

``spk_dict.pt`` is validated with omni_jax's restricted (torch-free) reader and copied; export
rewrites it with :func:`write_torch_pickle`, a torch-free writer of the ``torch.save`` zip format
that ``torch.load(..., weights_only=True)`` accepts.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import json
import os
import re
import shutil
import struct
import sys
import tempfile
import time
import zipfile
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

from omni_jax.errors import CheckpointError, InputError

from . import orbax_io as oio
from .hf import THINKER_LM_PREFIXES, flatten_dict, hf_name, stack_index
from .safetensors_io import DTYPE_NAMES, DTYPES, Checkpoint, SafetensorsFile

DEFAULT_GROUP_BYTES = 256 << 20  # converted bytes per orbax group (orbax's save holds about 2x a group besides)
DEFAULT_SHARD_BYTES = 4 << 30  # export: safetensors shard size
CHUNK_BYTES = 64 << 20  # read granularity
_DTYPE_ALIASES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float32": "float32", "fp32": "float32"}
_FLOAT_NAMES = ("F64", "F32", "F16", "BF16")
_WEIGHT_EXT = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf", ".npz", ".index.json")


# --------------------------------------------------------------------------------------
# components


@dataclasses.dataclass(frozen=True)
class Component:
    name: str
    hf_prefix: str  # every HF key of the component starts with this
    prefixes: dict  # first path element (or "") -> HF key prefix, for convert.hf.hf_name
    stack_names: tuple  # path element whose parameters carry a leading layer axis
    sharding_prefix: str  # prepended to the parameter path for omni_jax.sharding.param_sharding
    fixed_dtype: str | None  # stored dtype whatever an explicit --dtype asks (token2wav runs in float32)
    build: Callable  # (OmniConfig, jnp dtype) -> nnx.Module (called under nnx.eval_shape)
    available: Callable  # OmniConfig -> bool


def _build_thinker(cfg, dt):
    from flax import nnx

    from omni_jax.thinker import ThinkerLM

    return ThinkerLM(cfg.thinker, dtype=dt, rngs=nnx.Rngs(0))


def _build_audio(cfg, dt):
    from flax import nnx

    from omni_jax.audio import AudioEncoder

    return AudioEncoder(cfg.thinker.audio, dtype=dt, rngs=nnx.Rngs(0))


def _build_vision(cfg, dt):
    from flax import nnx

    from omni_jax.vision import VisionEncoder

    return VisionEncoder(cfg.thinker.vision, dtype=dt, rngs=nnx.Rngs(0))


def _build_talker(cfg, dt):
    from flax import nnx

    from omni_jax.talker import Talker

    return Talker(cfg.talker, dtype=dt, rngs=nnx.Rngs(0))


def _build_token2wav(cfg, dt):
    from flax import nnx

    from omni_jax.token2wav import Token2Wav

    return Token2Wav(cfg.token2wav, rngs=nnx.Rngs(0))


def _talker_prefixes():
    from omni_jax.talker import TALKER_PREFIXES

    return dict(TALKER_PREFIXES)


COMPONENTS: dict[str, Component] = {
    "thinker": Component("thinker", "thinker.", THINKER_LM_PREFIXES, ("layers",), "", None, _build_thinker,
                         lambda c: True),
    "audio": Component("audio", "thinker.audio_tower.", {"": "thinker.audio_tower."}, ("layers",), "audio/", None,
                       _build_audio, lambda c: c.thinker.audio is not None),
    "vision": Component("vision", "thinker.visual.", {"": "thinker.visual."}, ("blocks",), "vision/", None,
                        _build_vision, lambda c: c.thinker.vision is not None),
    "talker": Component("talker", "talker.", None, ("layers",), "talker/", None, _build_talker,
                        lambda c: c.talker is not None),
    "token2wav": Component("token2wav", "token2wav.", {"": "token2wav."}, ("transformer_blocks",), "token2wav/",
                           "float32", _build_token2wav, lambda c: c.token2wav is not None),
}


def _prefixes(comp: Component) -> dict:
    return comp.prefixes if comp.prefixes is not None else _talker_prefixes()


def owner(key: str) -> str | None:
    """The component an HF key belongs to (longest matching prefix), or None."""
    for name in ("audio", "vision", "thinker", "talker", "token2wav"):
        if key.startswith(COMPONENTS[name].hf_prefix):
            return name
    return None


def build_abstract(cfg, name: str, dtype):
    """``(graphdef, abstract nnx.State)`` of component ``name`` (no parameter memory is allocated)."""
    import jax.numpy as jnp
    from flax import nnx

    comp = COMPONENTS[name]
    dt = jnp.dtype(comp.fixed_dtype or dtype)
    return nnx.split(nnx.eval_shape(lambda: comp.build(cfg, dt)))


def load_converted_component(out_dir, name: str, cfg, *, dtype, mesh=None):
    """``(graphdef, state)`` of component ``name`` restored from a converted directory.

    ``dtype`` is the load dtype of thinker, audio, vision and talker; token2wav is always float32.
    ``nnx.merge(graphdef, state)`` gives the module (audio/vision/token2wav are used as modules).
    """
    import jax.numpy as jnp

    comp = COMPONENTS[name]
    dt = jnp.dtype(comp.fixed_dtype or dtype)
    graphdef, state = build_abstract(cfg, name, dt)
    return graphdef, oio.restore_component(out_dir, name, state, dtype=dt, mesh=mesh)


def load_converted(out_dir, cfg, *, dtype, mesh=None) -> dict:
    """Every converted component of ``out_dir``, as ``omni_jax.load`` holds them::

        {"thinker": (graphdef, state), "audio": AudioEncoder | None, "vision": VisionEncoder | None,
         "talker": (graphdef, state) | None, "token2wav": Token2Wav | None}

    ``cfg`` is ``omni_jax.load_config(out_dir)`` (config.json is copied there); ``dtype`` the load
    dtype (token2wav is float32 whatever it is); ``mesh`` as for ``omni_jax.load``.
    """
    from flax import nnx

    have = oio.converted_components(out_dir)
    if "thinker" not in have:
        raise CheckpointError(f"{out_dir}: the thinker was not converted (it holds {', '.join(have)}); "
                              "convert with --components thinker")
    parts: dict = {"thinker": load_converted_component(out_dir, "thinker", cfg, dtype=dtype, mesh=mesh)}
    for name in ("audio", "vision", "token2wav"):
        parts[name] = (nnx.merge(*load_converted_component(out_dir, name, cfg, dtype=dtype, mesh=mesh))
                       if name in have and COMPONENTS[name].available(cfg) else None)
    parts["talker"] = (load_converted_component(out_dir, "talker", cfg, dtype=dtype, mesh=mesh)
                       if "talker" in have and cfg.talker is not None else None)
    return parts


# --------------------------------------------------------------------------------------
# streamed reading


def _np_dtype(name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def _dtype_str(dt) -> str:
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
# streamed safetensors writing


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


# --------------------------------------------------------------------------------------
# torch zip pickle writing (spk_dict.pt), without torch

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
    ``torch.load(path, weights_only=True)`` accepts it; so does :func:`omni_jax.voices.load_torch_pickle`."""
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


# --------------------------------------------------------------------------------------
# atomic directories


def _check_target(target: str, overwrite: bool, sources: Iterable[str], what: str) -> str:
    target = os.path.abspath(os.fspath(target))
    for src in sources:
        src = os.path.abspath(src)
        if os.path.commonpath([src, target]) in (src, target):
            raise InputError(f"{target}: the {what} must not be, contain or lie inside the source directory {src}")
    if os.path.lexists(target):
        if not overwrite:
            raise InputError(f"{target}: already exists (use --overwrite to replace it)")
        if not os.path.isdir(target) or os.path.islink(target):
            raise InputError(f"{target}: exists and is not a directory; not replacing it")
    return target


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_work(target: str) -> list[str]:
    """Remove what killed runs left beside ``target``: ``.NAME.tmp-PID-*`` and ``.NAME.old-PID-*``
    directories whose process ``PID`` is no longer alive on this machine (a live writer's are kept).
    Returns the paths removed."""
    parent = os.path.dirname(target) or "."
    base = os.path.basename(target)
    pat = re.compile(rf"^\.{re.escape(base)}\.(?:tmp|old)-(\d+)-")
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        m = pat.match(name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            path = os.path.join(parent, name)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_directory(target: str):
    """Yield a fresh temporary directory beside ``target``; on success rename it onto ``target``
    (replacing an old one only after the new one is complete); on any failure remove it.

    The temporary directory is ``.NAME.tmp-PID-XXXX`` beside the target, on the same file system so the
    final rename is atomic. A run killed with SIGKILL cannot clean up, so each run first removes the
    ``.NAME.tmp-PID-*`` and ``.NAME.old-PID-*`` left by processes that are no longer alive."""
    parent = os.path.dirname(target) or "."
    os.makedirs(parent, exist_ok=True)
    remove_stale_work(target)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-{os.getpid()}-", dir=parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would otherwise become the target's mode
        try:
            yield tmp
        except OSError as e:  # disk full, permissions...: one clear line naming the target
            raise CheckpointError(f"{target}: cannot write ({e})") from e
        if os.path.exists(target):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-{os.getpid()}-", dir=parent)
            os.rmdir(old)
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old, target)  # put the previous one back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------------------
# convert


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                disable=not enabled, dynamic_ncols=True, mininterval=0.5)


def _parse_components(components, present: list[str], hf_dir: str) -> list[str]:
    if components is None:
        return present
    if isinstance(components, str):
        components = [c for c in components.split(",") if c.strip()]
    wanted: list[str] = []
    for c in components:
        c = c.strip().lower()
        if c not in COMPONENTS:
            raise InputError(f"unknown component '{c}' (choose from {', '.join(COMPONENTS)})")
        # "thinker" is the whole HF thinker: the language model and its audio and vision encoders
        for n in ([c] + (["audio", "vision"] if c == "thinker" else [])):
            if n not in wanted and (n in present or n == c):
                wanted.append(n)
    for c in wanted:
        if c not in present:
            raise InputError(f"component '{c}' is not in {hf_dir} (it has {', '.join(present)})")
    if not wanted:
        raise InputError("no components selected")
    return [c for c in oio.COMPONENT_ORDER if c in wanted]


def _passthrough_reason(key: str, cfg) -> str | None:
    """Why an unmapped source tensor may be kept as data, or None if it is unexpected."""
    if key == "thinker.lm_head.weight" and cfg.thinker.tie_word_embeddings:
        return "lm_head tied to embed_tokens (tie_word_embeddings); transformers ignores it"
    if key.endswith(".inv_freq") or key.endswith(".original_inv_freq"):
        return "rotary buffer rebuilt from the config"
    try:
        from omni_jax.token2wav import is_token2wav_buffer
    except ImportError:  # pragma: no cover
        is_token2wav_buffer = None
    if is_token2wav_buffer is not None and is_token2wav_buffer(key):
        return "token2wav buffer rebuilt from the config"
    return None


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
    from omni_jax.config import load_config

    hf_dir = os.path.abspath(os.fspath(hf_dir))
    if dtype is not None:
        if not isinstance(dtype, str) or dtype.lower() not in _DTYPE_ALIASES:
            raise InputError(f"dtype '{dtype}' is not supported (bfloat16 or float32, or None to keep each "
                             "tensor's stored dtype)")
        dtype = _DTYPE_ALIASES[dtype.lower()]
    if not os.path.isdir(hf_dir):
        raise CheckpointError(f"{hf_dir}: not a directory (expected a Qwen2.5-Omni checkpoint directory)")
    if oio.is_converted(hf_dir):
        raise InputError(f"{hf_dir}: is already a converted omni-jax checkpoint (export turns it back into HF)")
    target = _check_target(out_dir, overwrite, [hf_dir], "output directory")
    t0 = time.time()
    cfg = load_config(hf_dir)
    ckpt = Checkpoint(hf_dir)  # validates every header: truncated/corrupt shards, missing files
    keys = list(ckpt.keys())
    for key in keys:
        if owner(key) is None:
            raise CheckpointError(f"{ckpt.where[key]}: unexpected tensor '{key}' (not part of Qwen2.5-Omni)")
    present = [n for n in oio.COMPONENT_ORDER
               if COMPONENTS[n].available(cfg) and any(owner(k) == n for k in keys)]
    if "thinker" not in present:
        raise CheckpointError(f"{hf_dir}: no thinker tensors ('thinker.model.*')")
    selected = _parse_components(components, present, hf_dir)
    if group_bytes < 1:
        raise InputError(f"group_bytes must be positive, got {group_bytes}")
    if os.path.isfile(os.path.join(hf_dir, "spk_dict.pt")):
        from omni_jax.voices import load_voices

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
        reason = _passthrough_reason(key, cfg)
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

    with atomic_directory(target) as tmp, _progress(total, "convert", progress) as bar:
        ckptr = oio.checkpointer()
        for name in selected:
            plan = plans[name]
            for group in plan["groups"]:
                arrays = {}
                for item in group["items"]:
                    param, layer, key, transpose, _src, rows, stored = item
                    sf = ckpt.file_of(key)
                    arr = read_tensor(sf, key, transpose=transpose, dtype=_np_dtype(stored), rows=rows)
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
    prefixes = _prefixes(comp)
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
            stored = cast or _dtype_str(DTYPES[src_dt])
            nbytes = int(np.prod(want, dtype=np.int64)) * _np_dtype(stored).itemsize
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
        nbytes = int(np.prod(oio.item_shape(params[item[0]], item), dtype=np.int64)) * _np_dtype(item[6]).itemsize
        if cur and cur_bytes + nbytes > group_bytes:
            groups.append(cur)
            cur, cur_bytes = [], 0
        cur.append(item)
        cur_bytes += nbytes
    if cur:
        groups.append(cur)
    stored = sorted({it[6] for it in items})
    sources = sorted({_dtype_str(DTYPES[it[4]]) for it in items})
    return {"dtype": stored[0] if len(stored) == 1 else "mixed", "stored_dtypes": stored, "source_dtypes": sources,
            "cast": any(it[6] != _dtype_str(DTYPES[it[4]]) for it in items), "cast_to": cast,
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
                                                         _np_dtype(oio.stored_dtype(comp, it)))
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


# --------------------------------------------------------------------------------------
# export


def export(converted_dir, hf_dir, *, overwrite=False, progress=True,
           max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict:
    """Write a Hugging Face checkpoint directory from a converted one: safetensors shards with
    ``model.safetensors.index.json``, the copied config / tokenizer / preprocessor files and
    ``spk_dict.pt`` (rewritten without torch). Streamed a group at a time and atomic like
    :func:`convert`. Parameters are written in their stored dtype (token2wav, stored in float32 by
    an explicit ``dtype``, in its source dtype), passthrough tensors bit-exact: the export of a
    conversion that kept the source dtypes (the default) gives back the source's tensors, bit for
    bit. Returns the index dict."""
    from omni_jax.voices import load_torch_pickle

    src = os.path.abspath(os.fspath(converted_dir))
    if not os.path.isdir(src):
        raise CheckpointError(f"{src}: not a directory")
    man = oio.read_manifest(src)
    target = _check_target(hf_dir, overwrite, [src], "export directory")
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
                dt = DTYPES[src_dt] if comp["export_dtype"] == "source" else _np_dtype(oio.stored_dtype(comp, item))
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

    with atomic_directory(target) as tmp, _progress(total, "export", progress) as bar:
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
