"""Checks on what users type: one place for the command lines, the Python API and the server.

Every numeric option, argument and request field goes through these, so ``nan``, ``inf`` and values of the
wrong sign are refused with a message naming the option, on every surface alike; every output path is
checked before the work that fills it starts, so a bad target fails at once and nothing that is not a
regular file (or directory) is ever replaced."""

from __future__ import annotations

import argparse
import math
import numbers
import os
import stat

import numpy as np

from .errors import CheckpointError, InputError


def check_finite(value, name: str, *, minimum: float | None = None, positive: bool = False):
    """``value`` if it is a finite real number (and ``> 0`` if ``positive``, ``>= minimum`` if given);
    otherwise an :class:`InputError` naming ``name``. Booleans are not numbers here."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{name}: expected a number, got {value!r}")
    if not math.isfinite(value):
        raise InputError(f"{name}: expected a finite number, got {value!r}")
    if positive and value <= 0:
        raise InputError(f"{name}: expected a number > 0, got {value!r}")
    if minimum is not None and value < minimum:
        raise InputError(f"{name}: expected a number >= {minimum}, got {value!r}")
    return value


def finite_float(text: str) -> float:
    """An argparse ``type``: a float that is finite (argparse's own ``float`` accepts ``nan`` and ``inf``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def _writable_parent(path: str, what: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise InputError(f"{what} {path}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{what} {path}: the directory {parent} is not writable")


def check_output_file(path, what: str = "output") -> str:
    """Check, before any work is done, that ``path`` can be written as a regular file: its directory
    exists and is writable, and whatever is already at ``path`` is a regular file (replaced atomically
    when the output is complete). A device node, a FIFO, a directory or a socket there is never replaced:
    an :class:`InputError` naming it. Returns ``path`` with ``~`` expanded; for a symlink to a regular
    file, the file it points to, so the atomic rename replaces that file and the link stays a link."""
    path = os.path.expanduser(os.fspath(path))
    if os.path.islink(path) and os.path.isfile(path):
        path = os.path.realpath(path)
    if os.path.lexists(path):
        st = os.stat(path) if os.path.exists(path) else os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise InputError(f"{what} {path}: exists and is {kind}; not replacing it")
        if not os.access(path, os.W_OK):
            raise InputError(f"{what} {path}: exists and is not writable")
    _writable_parent(path, what)
    return path


def check_output_dir(path, what: str = "output directory") -> str:
    """Check, before any work is done, that ``path`` is a directory or can be made one: whatever is
    already there must be a directory; otherwise its parent must exist and be writable."""
    path = os.path.expanduser(os.fspath(path))
    if os.path.lexists(path):
        if not os.path.isdir(path):
            raise InputError(f"{what} {path}: exists and is not a directory; not replacing it")
        if not os.access(path, os.W_OK | os.X_OK):
            raise InputError(f"{what} {path}: the directory is not writable")
        return path
    _writable_parent(path, what)
    return path


def name_inside(source: str, name, what: str = "file") -> str:
    """``name`` (a file or directory named by the checkpoint file ``source``) as a relative path inside the
    checkpoint directory, normalised.

    A checkpoint may only name files inside itself: a name that is not a non-empty string, an absolute
    name, a drive, or one that climbs out with ``..`` is a :class:`CheckpointError` naming ``source``,
    so a crafted index or manifest cannot make us read, memory-map or copy files elsewhere. The check is
    lexical (``normpath``), not on where symlinks lead: Hugging Face's cache keeps a snapshot's files as
    symlinks into a sibling folder, which is the user's own layout."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise CheckpointError(f"{source}: names a {what} that is not a file name ({name!r})")
    norm = os.path.normpath(name)
    if os.path.isabs(name) or os.path.splitdrive(name)[0] or norm in (".", "..") \
            or norm.startswith(".." + os.sep) or norm.startswith("/"):
        raise CheckpointError(f"{source}: names {what} '{name}', which is outside the checkpoint directory")
    return norm


# ---------------------------------------------------------------------------------------------
# model inputs

def check_token_ids(input_ids, attention_mask, *, vocab_size: int, max_positions: int):
    """``(input_ids int32 [B, T], attention_mask int32 [B, T])`` from what a caller passed (1-D is one
    row; no mask is all ones), or an :class:`InputError` naming what is wrong."""
    if input_ids is None:
        raise InputError("input_ids: required (or pass messages=...)")
    try:
        ids = np.asarray(input_ids)
    except Exception:
        raise InputError("input_ids: not an array of token ids") from None
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] == 0 or ids.dtype.kind not in "iu":
        raise InputError(f"input_ids: expected a non-empty int array [batch, length], got shape {ids.shape} "
                         f"and dtype {ids.dtype}")
    v = vocab_size
    if ids.min() < 0 or ids.max() >= v:
        raise InputError(f"input_ids: token ids must be in [0, {v}) (vocab_size); got {ids.min()}..{ids.max()}")
    if attention_mask is None:
        mask = np.ones(ids.shape, np.int32)
    else:
        mask = np.asarray(attention_mask)
        if mask.ndim == 1:
            mask = mask[None]
        if mask.shape != ids.shape:
            raise InputError(f"attention_mask: shape {mask.shape} does not match input_ids {ids.shape}")
        if not np.isin(mask, (0, 1)).all():
            raise InputError("attention_mask: values must be 0 or 1")
        mask = mask.astype(np.int32)
    if (mask.sum(1) == 0).any():
        raise InputError("attention_mask: a row has no unmasked token")
    limit = max_positions
    if int(mask.sum(1).max()) > limit:
        raise InputError(f"prompt of {int(mask.sum(1).max())} tokens is longer than max_position_embeddings "
                         f"({limit})")
    return ids.astype(np.int32), mask


def check_position_ids(position_ids, shape):
    """Position ids ``[3, B, T]`` (a ``[B, T]`` array is the same for the three rope sections)."""
    pos = np.asarray(position_ids)
    if pos.ndim == 2:
        pos = np.broadcast_to(pos[None], (3, *pos.shape))
    if pos.shape != (3, *shape):
        raise InputError(f"position_ids: expected shape [3, {shape[0]}, {shape[1]}], got {list(pos.shape)}")
    return pos.astype(np.int32)


def check_sampling(max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty):
    """Sampling settings a generation can run with, or an :class:`InputError` naming the bad one."""
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
    for name, v in (("temperature", temperature), ("top_p", top_p), ("repetition_penalty", repetition_penalty)):
        if v is not None:
            check_finite(v, name)
    if do_sample and not (temperature is not None and temperature > 0):
        raise InputError(f"temperature: must be > 0 when sampling, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or top_k < 0):
        raise InputError(f"top_k: expected an int >= 0 (0: no top-k) or None, got {top_k!r}")
    if top_p is not None and not (0.0 < float(top_p) <= 1.0):
        raise InputError(f"top_p: must be in (0, 1], got {top_p!r}")
    if not (repetition_penalty is not None and repetition_penalty > 0):
        raise InputError(f"repetition_penalty: must be > 0, got {repetition_penalty!r}")


def check_seed(seed) -> None:
    """Seeds are integers that fit jax's 64-bit keys (with the offsets the talker and the DiT add)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not -(2 ** 63) <= int(seed) < 2 ** 63 - 8:
        raise InputError(f"seed: expected an integer in [-2**63, 2**63 - 8), got {seed!r}")
