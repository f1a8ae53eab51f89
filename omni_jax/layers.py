"""Flax NNX building blocks shared by every model.

Parameters keep transformers' names (``q_proj``, ``gate_proj``, ``input_layernorm``...) so a
parameter path reads like the Hugging Face key it comes from; linear kernels are stored
``[in, out]`` (transposed from torch's ``[out, in]``). Logical sharding axes are given by
parameter path in :mod:`omni_jax.sharding`, so modules carry no sharding code.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


def activation(name: str, what: str):
    """transformers' ``ACT2FN[name]``; an unknown name is a CheckpointError naming ``what``."""
    from .errors import CheckpointError

    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise CheckpointError(f"config.json: {what} '{name}' is not supported "
                              f"({', '.join(sorted(ACTIVATIONS))})") from None


def _normal(rngs: nnx.Rngs, shape, dtype, std=0.02):
    return (jax.random.normal(rngs.params(), shape, jnp.float32) * std).astype(dtype)


def half_octave_bucket(n: int, minimum: int = 1, multiple: int = 1) -> int:
    """Static-shape bucket with padding below a third: the first of ``m, 1.5 m, 2 m, 3 m, 4 m, ...``
    (``m = minimum``, a power of two; each rounded up to ``multiple``) that is >= ``n``. Twice as many
    shapes (compiles) as powers of two. Audio chunk counts, vision patch counts and the DiT's codes."""
    b = minimum
    while True:
        for c in (b, b + b // 2):
            c = -(-c // multiple) * multiple
            if c >= n:
                return c
        b *= 2


class Linear(nnx.Module):
    """``y = x @ kernel + bias`` with ``kernel [in, out]``; products accumulate in float32."""

    def __init__(self, din: int, dout: int, *, bias: bool, dtype, rngs: nnx.Rngs, stack: tuple[int, ...] = ()):
        self.kernel = nnx.Param(_normal(rngs, (*stack, din, dout), dtype))
        self.bias = nnx.Param(jnp.zeros((*stack, dout), dtype)) if bias else None

    def __call__(self, x):
        k = self.kernel[...]
        y = jnp.einsum("...i,io->...o", x.astype(k.dtype), k, preferred_element_type=jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(k.dtype)


class Embed(nnx.Module):
    def __init__(self, num: int, dim: int, *, dtype, rngs: nnx.Rngs):
        self.embedding = nnx.Param(_normal(rngs, (num, dim), dtype))

    def __call__(self, ids):
        return jnp.take(self.embedding[...], ids, axis=0)


class RMSNorm(nnx.Module):
    """transformers' RMSNorm: normalise in float32, cast back, then scale by the weight."""

    def __init__(self, dim: int, *, eps: float, dtype, stack: tuple[int, ...] = ()):
        self.weight = nnx.Param(jnp.ones((*stack, dim), dtype))
        self.eps = eps

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * xf.astype(x.dtype)


class SwiGLU(nnx.Module):
    """Qwen2 MLP: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, dim: int, hidden: int, *, dtype, rngs: nnx.Rngs, stack: tuple[int, ...] = ()):
        self.gate_proj = Linear(dim, hidden, bias=False, dtype=dtype, rngs=rngs, stack=stack)
        self.up_proj = Linear(dim, hidden, bias=False, dtype=dtype, rngs=rngs, stack=stack)
        self.down_proj = Linear(hidden, dim, bias=False, dtype=dtype, rngs=rngs, stack=stack)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


def scan_layers(stacked, body, carry, xs=None, *, remat: bool = False):
    """Run ``body(layer, carry, x) -> (carry, y)`` over a module whose parameters are stacked
    on a leading layer axis, with one ``lax.scan`` (one compiled layer, not L copies).

    The layouts that run per layer instead (a loaded model's thinker/talker decoder, the DiT) loop
    over their own modules (:func:`unstack_layers`; see "Parameter layouts" in docs/architecture.md)."""
    graphdef, state = nnx.split(stacked)

    def step(c, inp):
        st, x = inp
        layer = nnx.merge(graphdef, st)
        return body(layer, c, x)

    if remat:
        step = jax.checkpoint(step)
    return jax.lax.scan(step, carry, (state, xs))


@functools.lru_cache(maxsize=64)
def _layer_slicer(out_sharding):
    """One jitted ``(stacked, i) -> stacked[i]`` per output sharding (``i`` traced: one compile per
    shape, not per layer)."""
    return jax.jit(lambda x, i: jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=False), out_shardings=out_sharding)


def _take_layer(a, i: int):
    """Layer ``i`` of a stacked array, keeping the other axes' sharding."""
    from jax.sharding import NamedSharding, PartitionSpec

    s = getattr(a, "sharding", None)
    if isinstance(s, NamedSharding) and len(s.spec) > 0:
        return _layer_slicer(NamedSharding(s.mesh, PartitionSpec(*tuple(s.spec)[1:])))(a, np.int32(i))
    return a[i]


def unstack_layers(stacked: nnx.Module, *, free: bool = False) -> list:
    """Per-layer modules (parameters without the layer axis, each its own array: a copy, sharded
    as the stacked array's other axes) of a module whose parameters are stacked on a leading
    layer axis. ``free``: delete each stacked array once it is sliced (for a caller that owns them:
    peak memory grows by one array, not by the whole stack)."""
    graphdef, state = nnx.split(stacked)
    leaves, treedef = jax.tree.flatten(state)
    n = leaves[0].shape[0]
    per = [[None] * len(leaves) for _ in range(n)]
    for j, a in enumerate(leaves):
        for i in range(n):
            per[i][j] = _take_layer(a, i)
        if free and isinstance(a, jax.Array):
            a.delete()
    return [nnx.merge(graphdef, jax.tree.unflatten(treedef, p)) for p in per]
