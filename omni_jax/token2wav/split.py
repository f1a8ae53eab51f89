"""How token2wav's jitted programs take a module, and at what matmul precision.

A module is split once (:func:`presplit`) into a static, pre-hashed structure (GraphDef and the
State's treedef) and its flat leaves; the jitted programs (:func:`omni_jax.token2wav.solve.dit_sample`'s
and :func:`omni_jax.token2wav.bigvgan.bigvgan`'s) are module-level functions of
``(structure, leaves, inputs) -> outputs`` that merge the module inside the trace. The public entry
points run them at :data:`MATMUL_PRECISION` (true float32).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
from flax import nnx


# Products and convolutions in true float32 (not TF32 on GPU / bf16 passes on TPU): on an
# H100 at the published shapes, TF32 moved the DiT mel by 2e-4 and the waveform by 2e-3
# (relative L2) from transformers' float32; "highest" gave 5e-7 and 9e-6. The public
# jitted entry points apply it; callers of the traceable ``*_fn`` bodies set it themselves.
MATMUL_PRECISION = "highest"


class _Structure:
    """A split module's GraphDef and the treedef of its State as one static jit argument, hashed
    once: jit hashes its static arguments on every call, ~3 ms for BigVGAN's GraphDef, and
    flattening an nnx State (key sorting in Python) costs ~1.3 ms more; the jitted functions take
    this plus the flat leaves instead."""
    __slots__ = ("graphdef", "treedef", "_hash")

    def __init__(self, graphdef, treedef):
        self.graphdef, self.treedef = graphdef, treedef
        self._hash = hash((graphdef, treedef))

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        return self is other or (isinstance(other, _Structure) and self._hash == other._hash
                                 and self.graphdef == other.graphdef and self.treedef == other.treedef)

    def merge(self, leaves):
        """The module again, from ``leaves`` (inside a trace: what the jitted functions do)."""
        return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, list(leaves)))


class Split(NamedTuple):
    """A module taken apart once (``nnx.split``) for repeated calls. :func:`dit_sample` and
    :func:`bigvgan` take one in place of the module: splitting walks the module's graph in Python on
    every call otherwise (~35 ms for BigVGAN's 449 arrays on this project's CPU, whatever its width),
    which a streamed reply would pay per chunk. The arrays are shared with the module, not copied;
    split again after changing the module's parameters. ``structure`` and ``leaves`` are what the
    jitted calls take (see :class:`_Structure`)."""
    state: Any
    structure: _Structure
    leaves: tuple

    @property
    def graphdef(self):
        return self.structure.graphdef


def presplit(module) -> Split:
    """``module`` as a :class:`Split` (itself when it already is one)."""
    if isinstance(module, Split):
        return module
    graphdef, state = nnx.split(module)
    leaves, treedef = jax.tree.flatten(state)
    return Split(state, _Structure(graphdef, treedef), tuple(leaves))
