"""The Thinker's language model: Qwen2 decoder with TMRoPE and the LM head.

Parameter tree (NNX, paths mirror the Hugging Face keys ``thinker.model.*``/``thinker.lm_head``)::

    embed_tokens/embedding      [V, E]
    layers/...                  stacked [L, ...] (see omni_jax.decoder)
    norm/weight                 [E]
    lm_head/kernel              [E, V]   (absent when thinker_config.tie_word_embeddings)

The functions here are pure: (model, inputs, cache) -> (outputs, cache); the jitted
entry points live in :mod:`omni_jax.generate` and :mod:`omni_jax.api`.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from .config import TextConfig, ThinkerConfig
from .decoder import DecoderLayers, DecoderShape, run_layers
from .layers import Embed, Linear, RMSNorm
from .rope import mrope_cos_sin

# Hugging Face key map (omni_jax.checkpoint.tree.hf_name): lm_head/... <- thinker.lm_head.*, the rest
# <- thinker.model.*; decoder layers stacked over "layers"
THINKER_LM_PREFIXES = {"lm_head": "thinker.", "": "thinker.model."}
THINKER_LM_STACK_NAMES = ("layers",)


class ThinkerLM(nnx.Module):
    def __init__(self, cfg: ThinkerConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        t: TextConfig = cfg.text
        self.embed_tokens = Embed(t.vocab_size, t.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = DecoderLayers(
            num_layers=t.num_hidden_layers, hidden=t.hidden_size, intermediate=t.intermediate_size,
            heads=t.num_attention_heads, kv_heads=t.num_key_value_heads, head_dim=t.head_dim,
            eps=t.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.norm = RMSNorm(t.hidden_size, eps=t.rms_norm_eps, dtype=dtype)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            t.hidden_size, t.vocab_size, bias=False, dtype=dtype, rngs=rngs)


def decoder_shape(t: TextConfig) -> DecoderShape:
    return DecoderShape(t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads, t.head_dim)


def embed(model: ThinkerLM, input_ids):
    return model.embed_tokens(input_ids)


def hidden_states(model: ThinkerLM, cfg: TextConfig, embeds, position_ids, *, cache=None, start=0,
                  kv_valid=None, impl="xla", remat=False):
    """Last-layer hidden states after the final norm ``[B, T, E]`` and the updated cache."""
    cos, sin = mrope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, cfg.mrope_section)
    h, cache = run_layers(model.layers, decoder_shape(cfg), embeds, cos, sin, cache=cache, start=start,
                          kv_valid=kv_valid, impl=impl, remat=remat)
    return model.norm(h), cache


def lm_logits(model: ThinkerLM, h):
    """Float32 logits; the product accumulates in float32."""
    if model.lm_head is not None:
        w = model.lm_head.kernel[...]
        return jnp.einsum("...e,ev->...v", h.astype(w.dtype), w, preferred_element_type=jnp.float32)
    w = model.embed_tokens.embedding[...]
    return jnp.einsum("...e,ve->...v", h.astype(w.dtype), w, preferred_element_type=jnp.float32)
