"""The Qwen2 decoder stack shared by the thinker and the talker.

Layers are one NNX module whose parameters carry a leading layer axis; the forward pass
is one ``lax.scan`` over it (one compiled layer whatever the depth). The KV cache is an
explicit pytree ``{"k", "v"}: [L, B, S, KVH, D]`` in the load dtype, updated in place with
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
from .layers import Linear, RMSNorm, SwiGLU, scan_layers
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


def init_cache(shape: DecoderShape, batch: int, slots: int, dtype) -> dict:
    z = jnp.zeros((shape.num_layers, batch, slots, shape.kv_heads, shape.head_dim), dtype)
    return {"k": z, "v": z}


def run_layers(layers: DecoderLayers, shape: DecoderShape, h, cos, sin, *, cache=None, start=0,
               kv_valid=None, impl="xla", remat=False):
    """Run the decoder layers.

    ``h [B, T, E]``; ``cos/sin [B, T, head_dim]``. Without a cache: causal self-attention over
    the T tokens with key padding ``kv_valid [B, T]``. With a cache: write at slots
    ``[start, start+T)`` and attend over all ``S`` slots (``kv_valid [B, S]``). ``start`` may be a
    ``[B]`` array of per-row slots (continuous batching: rows at different lengths share one batch);
    writes past the cache's end are dropped.
    Returns ``(h, cache)``.
    """
    b, t, _ = h.shape
    nh, kvh, hd = shape.heads, shape.kv_heads, shape.head_dim
    per_row = jnp.ndim(start) == 1  # serving: each row writes at its own slots start[b] + [0, T)
    q_slots = start[:, None] + jnp.arange(t)[None, :] if per_row else start + jnp.arange(t)
    mask = MaskSpec(causal=True, q_slots=q_slots, kv_valid=kv_valid)

    def body(layer: DecoderLayers, carry, i):
        x, kc, vc = carry
        y = layer.input_layernorm(x)
        att = layer.self_attn
        q = apply_rope(att.q_proj(y).reshape(b, t, nh, hd), cos, sin)
        k = apply_rope(att.k_proj(y).reshape(b, t, kvh, hd), cos, sin)
        v = att.v_proj(y).reshape(b, t, kvh, hd)
        q = constrain(q, ("batch", "seq", "act_heads", None))
        if kc is not None and per_row:
            rows = jnp.arange(b)[:, None]
            kc = kc.at[i, rows, q_slots].set(k.astype(kc.dtype), mode="drop")
            vc = vc.at[i, rows, q_slots].set(v.astype(vc.dtype), mode="drop")
        elif kc is not None:
            kc = jax.lax.dynamic_update_slice(kc, k[None].astype(kc.dtype), (i, 0, start, 0, 0))
            vc = jax.lax.dynamic_update_slice(vc, v[None].astype(vc.dtype), (i, 0, start, 0, 0))
        if kc is not None:
            k = jax.lax.dynamic_index_in_dim(kc, i, 0, keepdims=False)
            v = jax.lax.dynamic_index_in_dim(vc, i, 0, keepdims=False)
        o = attention(q, k, v, mask, impl=impl)
        x = x + att.o_proj(o.reshape(b, t, nh * hd))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
        x = constrain(x, ("batch", "seq", "act_embed"))
        return (x, kc, vc), None

    kc = vc = None
    if cache is not None:
        kc, vc = cache["k"], cache["v"]
    (h, kc, vc), _ = scan_layers(layers, body, (h, kc, vc), jnp.arange(shape.num_layers), remat=remat)
    return h, (None if cache is None else {"k": kc, "v": vc})
