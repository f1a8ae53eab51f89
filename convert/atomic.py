"""Atomic output directories for conversion and export: write into a temporary directory beside the
target, rename it onto the target only when complete, and clean up what killed runs left."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import tempfile
from typing import Iterable

from omni_jax.errors import CheckpointError, InputError

__all__ = ["check_target", "remove_stale_work", "atomic_directory", "progress_bar"]


def check_target(target: str, overwrite: bool, sources: Iterable[str], what: str) -> str:
    target = os.path.abspath(os.path.expanduser(os.fspath(target)))  # `DST` may come as `~/x`, unexpanded
    for src in sources:
        src = os.path.abspath(os.path.expanduser(src))
        # compared as typed and with symlinks resolved: a linked source must not hold its target either
        pairs = ((src, target), (os.path.realpath(src), os.path.realpath(target)))
        if any(os.path.commonpath([s, t]) in (s, t) for s, t in pairs):
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


def progress_bar(total: int, desc: str, enabled: bool):
    """A byte-counting tqdm bar on stderr (disabled when ``enabled`` is false)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                disable=not enabled, dynamic_ncols=True, mininterval=0.5)
