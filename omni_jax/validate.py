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

from .errors import InputError


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
    an :class:`InputError` naming it. Returns ``path`` with ``~`` expanded."""
    path = os.path.expanduser(os.fspath(path))
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
