"""How a media input is named in error messages."""

from __future__ import annotations

import os
from typing import Any


def _name(src: Any, what: str) -> str:
    """How an input is named in error messages: its path, or a description of the array."""
    if isinstance(src, (str, os.PathLike)):
        return f"{what} '{os.fspath(src)}'"
    shape = getattr(src, "shape", None)
    return f"{what} (array of shape {tuple(shape)})" if shape is not None else f"{what} ({type(src).__name__})"
