"""The Qwen2 decoder stack shared by the thinker and the talker.

Layers come in two layouts (see "Parameter layouts" below and in docs/architecture.md):

* stacked: one NNX module whose parameters carry a leading layer axis (:class:`DecoderLayers`),
  the checkpoint and training layout; the forward pass is one ``lax.scan`` over it (one compiled
  layer whatever the depth), without a KV cache;
* per layer: a list of per-layer modules, what every inference program runs (a loaded
  :class:`omni_jax.OmniModel`'s thinker and talker), as a Python loop. :func:`to_per_layer` and
  :func:`stacked_state` are the one conversion between the two.

The KV cache exists at inference only: an explicit pytree ``{"k", "v"}`` of ``L`` per-layer
``[B, S, KVH, D]`` buffers in the load dtype (:func:`init_cache`), updated in place with
``dynamic_update_slice``; every call writes the new tokens' keys/values at cache slots
``[start, start + T)`` and attends over the whole cache with a causal slot mask and the
per-row key-validity mask.
"""

from __future__ import annotations

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


CACHE_AXES = ("batch", "cache_seq", "act_kv_heads", None)  # one layer's KV cache: over batch and KV heads


def init_cache(shape: DecoderShape, batch: int, slots: int, dtype) -> dict:
    """An empty KV cache: ``{"k", "v"}`` each a list of ``L`` arrays ``[B, S, KVH, D]``, one per
    layer (the per-layer decoder layers of inference: see "Parameter layouts" below), with the
    sharding constraints of :data:`CACHE_AXES`."""

    def z():  # distinct arrays (outside jit one shared buffer could not be donated twice)
        return constrain(jnp.zeros((batch, slots, shape.kv_heads, shape.head_dim), dtype), CACHE_AXES)

    return {n: [z() for _ in range(shape.num_layers)] for n in ("k", "v")}


def run_layers(layers, shape: DecoderShape, h, cos, sin, *, cache=None, start=0, kv_valid=None, impl="xla",
               remat=False):
    """Run the decoder layers: per-layer modules (inference: a Python loop, each layer reading its
    own weight and cache buffers), or a stacked :class:`DecoderLayers` (training: one ``lax.scan``,
    no cache).

    ``h [B, T, E]``; ``cos/sin [B, T, head_dim]``. Without a cache: causal self-attention over
    the T tokens with key padding ``kv_valid [B, T]``. With a cache (:func:`init_cache`, one entry
    per layer): write at slots ``[start, start+T)`` and attend over all ``S`` slots (``kv_valid [B,
    S]``). ``start`` may be a ``[B]`` array of per-row slots (continuous batching: rows at different
    lengths share one batch); writes past the cache's end are dropped.
    Returns ``(h, cache)``.
    """
    b, t, _ = h.shape
    nh, kvh, hd = shape.heads, shape.kv_heads, shape.head_dim
    per_row = jnp.ndim(start) == 1  # serving: each row writes at its own slots start[b] + [0, T)
    q_slots = start[:, None] + jnp.arange(t)[None, :] if per_row else start + jnp.arange(t)
    mask = MaskSpec(causal=True, q_slots=q_slots, kv_valid=kv_valid)

    def write(c, new):
        """One layer's cache ``c`` with the new keys (values) ``new [B, T, KVH, D]`` at the query slots
        (the result constrained to the cache's own layout: without it a KV-head count that does not
        divide the tensor axis lets the projection's sharding of the new entries propagate into the
        buffer, and XLA gathers every layer's whole cache each step to write one token)."""
        new = new.astype(c.dtype)
        if per_row:
            out = c.at[jnp.arange(b)[:, None], q_slots].set(new, mode="drop")
        else:
            out = jax.lax.dynamic_update_slice(c, new, (0, start, 0, 0))
        return constrain(out, CACHE_AXES)

    def layer_fn(layer: DecoderLayers, x, kc, vc):
        y = layer.input_layernorm(x)
        att = layer.self_attn
        q = apply_rope(att.q_proj(y).reshape(b, t, nh, hd), cos, sin)
        k = apply_rope(att.k_proj(y).reshape(b, t, kvh, hd), cos, sin)
        v = att.v_proj(y).reshape(b, t, kvh, hd)
        q = constrain(q, ("batch", "seq", "act_heads", None))
        k = constrain(k, ("batch", "seq", "act_kv_heads", None))
        v = constrain(v, ("batch", "seq", "act_kv_heads", None))
        if kc is not None:
            k, v = kc, vc = write(kc, k), write(vc, v)
        o = attention(q, k, v, mask, impl=impl)
        x = x + att.o_proj(o.reshape(b, t, nh * hd))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
        return constrain(x, ("batch", "seq", "act_embed")), kc, vc

    if isinstance(layers, DecoderLayers):  # the stacked (training) layout: one scan, no cache
        if cache is not None:
            raise ValueError("a KV cache needs per-layer decoder layers (decoder.to_per_layer)")
        (h, _, _), _ = scan_layers(layers, lambda layer, carry, _: (layer_fn(layer, *carry), None), (h, None, None),
                                   remat=remat)
        return h, None
    # per-layer layers: each layer reads its own weights and updates its own cache buffers in place
    # (a stacked cache's or stacked weights' layer slice is a copy per layer per step: see below)
    if cache is not None and (len(cache["k"]) != len(layers) or len(cache["v"]) != len(layers)):
        raise ValueError(f"a KV cache of {len(cache['k'])} layers for {len(layers)} decoder layers")
    run = jax.checkpoint(layer_fn) if remat else layer_fn
    ks = vs = [None] * len(layers)
    if cache is not None:
        ks, vs = list(cache["k"]), list(cache["v"])
    for i, layer in enumerate(layers):
        h, ks[i], vs[i] = run(layer, h, ks[i], vs[i])
    return h, (None if cache is None else {"k": ks, "v": vs})


# ---------------------------------------------------------------------------------------------
# Parameter layouts: stacked for checkpoints and training, per layer at inference
#
# Checkpoints, training and the parameter sharding rules use the stacked layout (``layers/<name>``
# with a leading layer axis; one ``lax.scan``, one compiled layer). Every inference program runs
# per-layer buffers instead (``layers/<i>/<name>``, a Python loop) with a per-layer KV cache: on
# XLA:CPU the scan's per-layer dynamic slice of the stacked weights is a copy, so a memory-bound
# decode step read every weight three times (read, write, read); per-layer buffers read it once
# (``python -m bench.decode_layers``: 3x faster decode at the talker's widths). A stacked cache's
# layer slice is copied the same way; per-layer caches are read and written in place (at 4k cache
# slots, the CPU small config's 8 thinker layers decode a step ~25-35% faster; ``python -m
# bench.decode_layers --slots 4096``). The price is compile time: L layers are compiled instead of
# one. The two functions below are the one conversion between the layouts: the loader and
# OmniModel convert to per-layer buffers, training entry points (OmniModel.stacked_params,
# training.model_params, OmniModel.loss) convert back.


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
