"""Small helpers shared by the bench scripts."""

from __future__ import annotations

import contextlib
import json


@contextlib.contextmanager
def band_attention(enabled: bool = True):
    """Run omni-jax's XLA attention with (``enabled``) or without the block-by-block band path
    (:func:`omni_jax.attention.xla_band_attention`; without it, block bands are computed densely,
    all ``T x T`` scores: the formulation before that path, for A/B runs in one process). jax's
    caches are cleared on entry and exit, so jitted programs are traced again with the choice."""
    import jax

    from omni_jax import attention

    orig = attention._band_only
    if not enabled:
        attention._band_only = lambda mask, tq, tk: False
    jax.clear_caches()
    try:
        yield
    finally:
        attention._band_only = orig
        jax.clear_caches()


def write_json(path: str | None, res: dict) -> None:
    """Write a bench result to ``path`` (nothing when ``path`` is None)."""
    if path:
        with open(path, "w") as f:
            json.dump(res, f, indent=1)
