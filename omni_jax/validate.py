"""Checks on numbers that users type: one place for the command lines, the Python API and the server.

Every numeric option, argument and request field goes through these, so ``nan``, ``inf`` and values of the
wrong sign are refused with a message naming the option, on every surface alike."""

from __future__ import annotations

import argparse
import math
import numbers

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
