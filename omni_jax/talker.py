"""The Talker: a Qwen2-style decoder that turns the thinker's states into codec ids.

Parameter tree (paths mirror ``talker.*``)::

    thinker_to_talker_proj/{kernel,bias}   [E_thinker, H]
    embed_tokens/embedding                 [codec_vocab, E_thinker]   (HF: talker.model.embed_tokens)
    layers/...                             stacked decoder layers     (HF: talker.model.layers.N)
    norm/weight                            [H]                        (HF: talker.model.norm)
    codec_head/kernel                      [H, codec_vocab]

It is fed exactly as transformers' ``Qwen2_5OmniForConditionalGeneration.generate`` feeds it:

* prompt, per thinker prompt position: the thinker's last-layer (post-norm) hidden state plus
  its input embedding, the embedding term zeroed at audio/image/video positions; then the
  speaker's text-bos embedding, then the first reply token's (hidden + embedding); the codec
  pad embedding is added at the second-to-last prompt position and the codec bos embedding
  at the last;
* then one thinker reply token (hidden + embedding) per step, added to the embedding of the
  codec id just produced; after the reply: the text-eos embedding, then text-pad embeddings
  (the last one repeats);
* codec bos is suppressed; the repetition penalty also sees the prompt's codec ids (mask,
  pad, bos); generation stops at the talker's EOS ids (codec pad and codec end).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from .config import TalkerConfig
from .decoder import DecoderLayers, DecoderShape, run_layers
from .layers import Embed, Linear, RMSNorm
from .rope import mrope_cos_sin


class Talker(nnx.Module):
    def __init__(self, cfg: TalkerConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.thinker_to_talker_proj = Linear(cfg.embedding_size, cfg.hidden_size, bias=True, dtype=dtype, rngs=rngs)
        self.embed_tokens = Embed(cfg.vocab_size, cfg.embedding_size, dtype=dtype, rngs=rngs)
        self.layers = DecoderLayers(
            num_layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, intermediate=cfg.intermediate_size,
            heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
            eps=cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.codec_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype, rngs=rngs)


TALKER_PREFIXES = {"thinker_to_talker_proj": "talker.", "codec_head": "talker.", "": "talker.model."}


def decoder_shape(cfg: TalkerConfig) -> DecoderShape:
    return DecoderShape(cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)


def hidden_states(model: Talker, cfg: TalkerConfig, embeds, position_ids, *, cache=None, start=0, kv_valid=None,
                  impl="xla", remat=False):
    """Post-norm hidden states ``[B, T, H]`` for thinker-space input embeddings ``[B, T, E_thinker]``."""
    x = model.thinker_to_talker_proj(embeds)
    cos, sin = mrope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, cfg.mrope_section)
    h, cache = run_layers(model.layers, decoder_shape(cfg), x, cos, sin, cache=cache, start=start,
                          kv_valid=kv_valid, impl=impl, remat=remat)
    return model.norm(h), cache


def logits(model: Talker, cfg: TalkerConfig, embeds, position_ids, *, cache=None, start=0, kv_valid=None,
           impl="xla"):
    """Codec logits (float32) for thinker-space input embeddings ``[B, T, E_thinker]``."""
    h, cache = hidden_states(model, cfg, embeds, position_ids, cache=cache, start=start, kv_valid=kv_valid,
                             impl=impl)
    w = model.codec_head.kernel[...]
    return jnp.einsum("...h,hv->...v", h.astype(w.dtype), w, preferred_element_type=jnp.float32), cache


def rope_view(cfg: TalkerConfig):
    """The attributes :func:`omni_jax.tmrope.rope_index` reads, taken from the talker's config."""
    from types import SimpleNamespace

    return SimpleNamespace(
        vision=SimpleNamespace(spatial_merge_size=cfg.spatial_merge_size),
        position_id_per_seconds=cfg.position_id_per_seconds, seconds_per_chunk=cfg.seconds_per_chunk,
        audio_token_id=cfg.audio_token_id, image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
        audio_start_token_id=cfg.audio_start_token_id, vision_start_token_id=cfg.vision_start_token_id)
