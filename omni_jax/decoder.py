"""The Qwen2 decoder stack shared by the thinker and the talker.

Layers are one NNX module whose parameters carry a leading layer axis (the checkpoint and
training layout; the forward pass is one ``lax.scan`` over it, one compiled layer whatever the
depth), or, in a loaded :class:`omni_jax.OmniModel`, a list of per-layer modules run as a
Python loop (see "inference layout" below: the scan's weight slices are copies on CPU). The KV cache is an
explicit pytree ``{"k", "v"}`` in the load dtype: ``[L, B, S, KVH, D]`` with stacked layers, a list
of ``L`` per-layer ``[B, S, KVH, D]`` buffers with per-layer ones; it is updated in place with
``dynamic_update_slice``; every call writes the new tokens' keys/values at cache slots
``[start, start + T)`` and attends over the whole cache with a causal slot mask and the
per-row key-validity mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from .attention import MaskSpec, attention
from .layers import Linear, RMSNorm, SwiGLU, scan_layers, unstack_layers
from .rope import apply_rope
from .sharding import constrain


class SelfAttention(nnx.Module):
    def __init__(self, hidden, heads, kv_heads, head_dim, *, dtype, rngs, stack):
        self.q_proj = Linear(hidden, heads * head_dim, bias=True, dtype=dtype, rngs=rngs, stack=stack)
        self.k_proj = Linear(hidden, kv_heads * head_dim, bias=True, dtype=dtype, rngs=rngs, stack=stack)
        self.v_proj = Linear(hidden, kv_heads * head_dim, bias=True, dtype=dtype, rngs=rngs, stack=stack)
        self.o_proj = Linear(heads * head_dim, hidden, bias=False, dtype=dtype, rngs=rngs, stack=stack)


class DecoderLayers(nnx.Module):
    """``num_layers`` Qwen2 decoder layers with stacked parameters."""

    def __init__(self, *, num_layers, hidden, intermediate, heads, kv_heads, head_dim, eps, dtype, rngs):
        stack = (num_layers,)
        self.input_layernorm = RMSNorm(hidden, eps=eps, dtype=dtype, stack=stack)
        self.self_attn = SelfAttention(hidden, heads, kv_heads, head_dim, dtype=dtype, rngs=rngs, stack=stack)
        self.post_attention_layernorm = RMSNorm(hidden, eps=eps, dtype=dtype, stack=stack)
        self.mlp = SwiGLU(hidden, intermediate, dtype=dtype, rngs=rngs, stack=stack)


class DecoderShape(NamedTuple):
    num_layers: int
    heads: int
    kv_heads: int
    head_dim: int


CACHE_AXES = ("layers", "batch", "cache_seq", "act_kv_heads", None)  # stacked KV cache: over batch and KV heads


def init_cache(shape: DecoderShape, batch: int, slots: int, dtype, *, per_layer: bool = False) -> dict:
    """An empty KV cache: ``{"k", "v"}`` each ``[L, B, S, KVH, D]`` (stacked layers), or with
    ``per_layer`` each a list of ``L`` arrays ``[B, S, KVH, D]`` (per-layer layers: see
    "inference layout" below). Both carry the sharding constraints of :data:`CACHE_AXES`."""
    if per_layer:  # distinct arrays (outside jit one shared buffer could not be donated twice)
        def z():
            return constrain(jnp.zeros((batch, slots, shape.kv_heads, shape.head_dim), dtype), CACHE_AXES[1:])

        return {n: [z() for _ in range(shape.num_layers)] for n in ("k", "v")}
    z = constrain(jnp.zeros((shape.num_layers, batch, slots, shape.kv_heads, shape.head_dim), dtype), CACHE_AXES)
    return {"k": z, "v": z}


def cache_for(layers, shape: DecoderShape, batch: int, slots: int, dtype) -> dict:
    """The empty KV cache whose layout matches ``layers`` (per-layer for a sequence of layers)."""
    return init_cache(shape, batch, slots, dtype, per_layer=isinstance(layers, Sequence))


def run_layers(layers: DecoderLayers, shape: DecoderShape, h, cos, sin, *, cache=None, start=0,
               kv_valid=None, impl="xla", remat=False):
    """Run the decoder layers.

    ``h [B, T, E]``; ``cos/sin [B, T, head_dim]``. Without a cache: causal self-attention over
    the T tokens with key padding ``kv_valid [B, T]``. With a cache: write at slots
    ``[start, start+T)`` and attend over all ``S`` slots (``kv_valid [B, S]``). ``start`` may be a
    ``[B]`` array of per-row slots (continuous batching: rows at different lengths share one batch);
    writes past the cache's end are dropped. The cache is either layout of :func:`init_cache`; a
    per-layer cache needs per-layer ``layers``.
    Returns ``(h, cache)``.
    """
    b, t, _ = h.shape
    nh, kvh, hd = shape.heads, shape.kv_heads, shape.head_dim
    per_row = jnp.ndim(start) == 1  # serving: each row writes at its own slots start[b] + [0, T)
    q_slots = start[:, None] + jnp.arange(t)[None, :] if per_row else start + jnp.arange(t)
    mask = MaskSpec(causal=True, q_slots=q_slots, kv_valid=kv_valid)

    def write(c, new, i):
        """``c`` with the new keys (values) ``new [B, T, KVH, D]`` at the query slots; ``c`` is one
        layer's cache (``i`` None) or the stacked cache (layer ``i``)."""
        lead = () if i is None else (i,)
        new = new.astype(c.dtype)
        if per_row:
            return c.at[(*lead, jnp.arange(b)[:, None], q_slots)].set(new, mode="drop")
        return jax.lax.dynamic_update_slice(c, new if i is None else new[None], (*lead, 0, start, 0, 0))

    def layer_fn(layer: DecoderLayers, x, kc, vc, i):
        y = layer.input_layernorm(x)
        att = layer.self_attn
        q = apply_rope(att.q_proj(y).reshape(b, t, nh, hd), cos, sin)
        k = apply_rope(att.k_proj(y).reshape(b, t, kvh, hd), cos, sin)
        v = att.v_proj(y).reshape(b, t, kvh, hd)
        q = constrain(q, ("batch", "seq", "act_heads", None))
        if kc is not None:
            kc, vc = write(kc, k, i), write(vc, v, i)
            k, v = (kc, vc) if i is None else (jax.lax.dynamic_index_in_dim(c, i, 0, keepdims=False) for c in (kc, vc))
        o = attention(q, k, v, mask, impl=impl)
        x = x + att.o_proj(o.reshape(b, t, nh * hd))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
        return constrain(x, ("batch", "seq", "act_embed")), kc, vc

    if cache is not None and isinstance(cache["k"], (list, tuple)):
        # per-layer cache: each layer updates its own buffers (no slice of a stacked cache, which
        # XLA copies per layer per step: see "inference layout" below)
        if not isinstance(layers, Sequence) or len(cache["k"]) != len(layers):
            raise ValueError("a per-layer KV cache needs per-layer decoder layers (decoder.to_per_layer), one per cache entry")
        ks, vs = list(cache["k"]), list(cache["v"])
        for i, layer in enumerate(layers):
            h, ks[i], vs[i] = layer_fn(layer, h, ks[i], vs[i], None)
        return h, {"k": ks, "v": vs}

    def body(layer: DecoderLayers, carry, i):
        return layer_fn(layer, *carry, i), None

    kc = vc = None
    if cache is not None:
        kc, vc = cache["k"], cache["v"]
    (h, kc, vc), _ = scan_layers(layers, body, (h, kc, vc), jnp.arange(shape.num_layers), remat=remat)
    return h, (None if cache is None else {"k": kc, "v": vc})


# ---------------------------------------------------------------------------------------------
# inference layout: one weight buffer per layer
#
# Checkpoints, training and sharding rules use the stacked layout (``layers/<name>`` with a
# leading layer axis; one ``lax.scan``). A loaded OmniModel keeps its thinker and talker
# decoder layers as per-layer buffers instead (``layers/<i>/<name>``), run as a Python loop:
# on XLA:CPU the scan's per-layer dynamic slice of the stacked weights is a copy, so a
# memory-bound decode step read every weight three times (read, write, read); per-layer
# buffers read it once (``python -m bench.decode_layers``: 3x faster decode at the talker's
# widths). The price is compile time: L layers are compiled instead of one. The KV cache follows
# (:func:`cache_for`): a stacked cache's layer slice is copied the same way, a per-layer cache is
# read and written in place (at 4k cache slots, the CPU small config's 8 thinker layers decode a
# step ~25-35% faster with per-layer caches; ``python -m bench.decode_layers --slots 4096``).


def is_per_layer(state) -> bool:
    """Whether a thinker/talker state holds its decoder layers as per-layer buffers."""
    return isinstance(state["layers"], nnx.State) and all(isinstance(k, int) for k in state["layers"].keys())


def to_per_layer(graphdef, state, *, free: bool = False):
    """``(graphdef, state)`` of a ThinkerLM/Talker with stacked layers -> the same model with
    ``layers`` an ``nnx.List`` of per-layer modules. ``free``: delete each stacked array once it
    is sliced (the caller owns ``state`` and drops it; peak memory grows by one array, not by
    the whole stack)."""
    if is_per_layer(state):
        return graphdef, state
    model = nnx.merge(graphdef, state)
    model.layers = nnx.List(unstack_layers(model.layers, free=free))
    return nnx.split(model)


def stacked_state(graphdef, state):
    """The checkpoint (stacked) layout of a ``(graphdef, state)`` from :func:`to_per_layer` (a copy
    of the layer weights); a stacked state is returned as is."""
    if not is_per_layer(state):
        return state
    model = nnx.merge(graphdef, state)
    lgdef = nnx.split(model.layers[0])[0]  # a graphdef carries no shapes: the stacked module's is the same
    model.layers = nnx.merge(lgdef, jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(x) for x in model.layers]))
    return nnx.split(model)[1]
