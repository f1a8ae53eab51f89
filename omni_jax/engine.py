"""The inference programs, and the pieces continuous batching is built from.

Every jitted program of the thinker and the talker is a module-level pure function of
``(params, inputs, state) -> (outputs, state)``; configuration (graphdef, config, attention
implementation, dtype) comes in as keyword arguments bound once per model. Each program is
declared in :data:`PROGRAMS` with the logical names of its arguments' shardings
(omni_jax.sharding's rules map them onto a mesh), which arguments are static, and which are
donated; :meth:`Program.bind` makes the jitted callable for one model and mesh. The encoders' and
Token2Wav's programs live beside their models (omni_jax.audio, omni_jax.vision,
omni_jax.token2wav).

Shared by every caller (``generate``, ``stream``, the server, the compiled-TPU check):

- :func:`thinker_step` is the one thinker decode step: :func:`thinker_decode` (one request's
  rows, with its sampling values) and :func:`thinker_decode_rows` (a server's slots, each row with
  its own) both run it in :func:`~omni_jax.generate.decode_loop` over a
  :class:`~omni_jax.generate.DecodeState`.
- :func:`reply_input` is the one builder of the talker's per-step text-side input (the rule
  :func:`reply_kind`, which training's teacher-forced layout uses too); :func:`talker_step` is the
  one talker step over it.

The engine interface a server uses is public: :meth:`omni_jax.OmniModel.prefill` (one request),
:meth:`~omni_jax.OmniModel.talker_start` (the talker's prefill from a reply so far, a
:class:`ThinkerReply`), :meth:`~omni_jax.OmniModel.decode_rows_fn` (the per-row decode steps
above, bound to the model), :func:`noise_key` (the DiT noise of a request) and
:class:`omni_jax.streaming.StreamingToken2Wav` (incremental speech). See docs/serving.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from . import talker as tk
from . import thinker as th
from .decoder import init_cache
from .generate import DecodeState, decode_loop, initial_state, sampling_rows
from .sharding import MeshJit
from .tmrope import decode_start

INT_BIG = 2 ** 30  # "no limit" for per-row step budgets

# logical sharding names of the programs' arguments
BT = ("batch", None)  # [B, T]
BT3 = (None, "batch", None)  # [3, B, T] position ids
BTE = ("batch", None, "act_embed")  # [B, T, E]
OWN = "own"  # parameters: keep the shardings they were placed with
IO = "io"  # a state pytree, named leaf by leaf (sharding.IO_AXES)


def bucket(n: int, minimum: int = 16) -> int:
    """Static-shape bucket of prompts and token buffers: the next power of two >= n (at least
    ``minimum``), so a server or a notebook compiles a handful of shapes, not one per length."""
    b = minimum
    while b < n:
        b *= 2
    return b


def noise_key(seed: int, row: int):
    """The DiT noise key of batch row ``row`` of a request made with ``seed``: the whole decode
    (OmniModel.token2wav/generate) and the streamed one (StreamingToken2Wav, frame_noise) share it."""
    return jax.random.fold_in(jax.random.key(int(seed) + 2), row)


class ThinkerReply(NamedTuple):
    """The thinker's reply so far, as the talker reads it: ``tokens [B, N]``, ``hidden [B, N, E]``
    (the hidden state computed when each token was fed) and ``n`` (tokens that exist: a scalar, or
    ``[B]``)."""

    tokens: Any
    hidden: Any
    n: Any


# --------------------------------------------------------------------------------------------
# shared pieces

def embed_media(model, ids, mm_embeds, mm_idx):
    """Token embeddings of ``ids [B, T]`` with the media encoders' outputs written at the flat
    positions ``mm_idx`` (entries past ``B * T`` are padding and dropped)."""
    b, t = ids.shape
    emb = th.embed(model, ids)
    flat = emb.reshape(b * t, -1).at[mm_idx].set(mm_embeds.astype(emb.dtype), mode="drop")
    return flat.reshape(emb.shape)


def thinker_step(model, cfg, s, impl):
    """One thinker decode step of every row of ``s`` (a DecodeState): feed ``s.last``
    at ``s.next_pos`` into cache slot ``s.slot``. Returns ``(logits [B, V], cache, hidden [B, E])``."""
    emb = th.embed(model, s.last[:, None])
    h, cache = th.hidden_states(model, cfg, emb, s.next_pos[:, :, None], cache=s.cache, start=s.slot,
                                kv_valid=s.kv_valid, impl=impl)
    return th.lm_logits(model, h[:, 0]), cache, h[:, 0]


REPLY_TOKEN, REPLY_EOS, REPLY_PAD = 0, 1, 2


def reply_kind(k, stop):
    """What the talker's reply step ``k`` (its ``n - 1``) is fed: ``REPLY_TOKEN`` (thinker reply
    token ``k + 1``: its hidden state + embedding), ``REPLY_EOS`` (the text-eos embedding, at
    ``k == stop - 1``) or ``REPLY_PAD`` (text-pad, from ``stop`` on), as transformers builds the
    talker's inputs. Works on ints, numpy and jax arrays alike (training lays its teacher-forced
    sequence out with it)."""
    return (k >= stop - 1) * 1 + (k >= stop) * 1


def reply_stop(tokens, n, eos_ids, eos_on=None):
    """``[B]``: the reply entry from which the talker is fed text-pad: the row's first EOS among its
    ``n`` tokens (at least 1), at most ``n - 1``. ``eos_on [B]`` (optional): rows whose EOS ids do
    not stop them (``ignore_eos``) have no EOS."""
    b, cap = tokens.shape
    n = jnp.broadcast_to(jnp.asarray(n, jnp.int32), (b,))[:, None]
    j = jnp.arange(cap)[None, :]
    is_eos = jnp.any(tokens[:, :, None] == jnp.asarray(eos_ids, jnp.int32)[None, None, :], axis=-1) & (j < n)
    if eos_on is not None:
        is_eos = is_eos & eos_on[:, None]
    first_eos = jnp.clip(jnp.min(jnp.where(is_eos, j, n), axis=1), 1, n[:, 0] - 1)
    return jnp.minimum(first_eos, n[:, 0] - 1)


def reply_input(th_model, reply: ThinkerReply, k, stop, eos_embed, pad_embed):
    """``[B, E]``: the text-side input of talker reply step ``k`` (scalar or ``[B]``), by
    :func:`reply_kind`. Entries ``k < n - 2`` do not change as the reply grows, so a streaming
    talker may read them while the thinker is still going."""
    tokens, hidden = reply.tokens, reply.hidden
    b, cap = tokens.shape
    k = jnp.broadcast_to(jnp.minimum(k, cap - 1), (b,))
    jj = jnp.minimum(k + 1, cap - 1)
    rows = jnp.arange(b)
    hid = hidden[rows, jj]
    tok = hid + th.embed(th_model, tokens[rows, jj]).astype(hid.dtype)
    kind = reply_kind(k, stop)
    inp = jnp.where((kind == REPLY_PAD)[:, None], pad_embed.astype(tok.dtype), tok)
    return jnp.where((kind == REPLY_EOS)[:, None], eos_embed.astype(tok.dtype), inp)


def talker_step(tmodel, cfg, s, inp, impl):
    """One talker decode step: feed codec ``s.last``'s embedding plus the text-side input ``inp
    [B, E]``. Returns ``(logits [B, V], cache, an empty hidden [B, 0])``."""
    emb = (tmodel.embed_tokens(s.last) + inp)[:, None]
    logits, cache = tk.logits(tmodel, cfg, emb, s.next_pos[:, :, None], cache=s.cache, start=s.slot,
                              kv_valid=s.kv_valid, impl=impl)
    return logits[:, 0], cache, logits[:, 0, :0]


# --------------------------------------------------------------------------------------------
# thinker programs

def thinker_logits(params, ids, mask, pos, mm_embeds, mm_idx, keep, *, graphdef, cfg, impl):
    """Logits of the last ``keep`` positions of ``ids [B, T]`` (no cache)."""
    model = nnx.merge(graphdef, params)
    h, _ = th.hidden_states(model, cfg, embed_media(model, ids, mm_embeds, mm_idx), pos,
                            kv_valid=mask.astype(bool), impl=impl)
    return th.lm_logits(model, h[:, -keep:])


def thinker_prefill(params, ids, mask, pos, mm_embeds, mm_idx, sp, rng, max_new, eos, pad, n_bucket, do_sample,
                    collect, *, graphdef, cfg, dtype, impl):
    """Prefill a left-aligned prompt into a fresh cache of ``T + n_bucket`` slots and choose the
    first new token. Returns ``(DecodeState, talker_inputs)``; with ``collect`` the talker's inputs
    (the prompt's post-norm hidden states, its input embeddings with media positions zeroed) and a
    per-token hidden buffer in the state, else None."""
    model = nnx.merge(graphdef, params)
    b, t = ids.shape
    vocab = cfg.vocab_size
    cache = init_cache(th.decoder_shape(cfg), b, t + n_bucket, dtype)
    kv_valid = jnp.concatenate([mask.astype(bool), jnp.ones((b, n_bucket), bool)], axis=1)
    h, cache = th.hidden_states(model, cfg, embed_media(model, ids, mm_embeds, mm_idx), pos, cache=cache,
                                start=0, kv_valid=kv_valid, impl=impl)
    logits = th.lm_logits(model, h[:, -1])
    seen = jnp.zeros((b, vocab), jnp.int32).at[jnp.arange(b)[:, None], ids].max(mask) > 0
    # each stream goes on from its last prompt position + 1, as transformers' generate extends the
    # thinker's position ids (GenerationMixin._update_model_kwargs_for_generation); the talker differs
    state = initial_state(logits, cache, kv_valid, seen, pos[:, :, -1] + 1, t, sp, rng, max_new, eos, pad,
                          n_bucket, do_sample, hidden_dim=cfg.hidden_size if collect else 0, hidden_dtype=dtype)
    if not collect:
        return state, None
    plain = embed_media(model, ids, jnp.zeros_like(mm_embeds), mm_idx)  # media positions zeroed
    return state, {"prompt_hidden": h, "prompt_embeds": plain}


def with_request_sampling(state: DecodeState, sp, do_sample) -> DecodeState:
    """``state`` with a request's sampling values ``sp`` (scalars) in every row."""
    return state._replace(sp=sampling_rows(sp, state.n.shape[0], do_sample))


def thinker_decode(params, state: DecodeState, n_steps, sp, eos, pad, do_sample, *, graphdef, cfg, impl):
    """Advance a request's rows together by up to ``n_steps`` tokens (one on-device loop) with its
    sampling values ``sp`` and static ``do_sample``; finished rows are fed ``pad``."""
    model = nnx.merge(graphdef, params)
    return decode_loop(lambda s: thinker_step(model, cfg, s, impl), with_request_sampling(state, sp, do_sample),
                       n_steps, eos_ids=eos, pad_id=pad, do_sample=do_sample, lockstep=True)


def thinker_decode_rows(params, state: DecodeState, n_steps, eos, pad, rows=None, *, graphdef, cfg, impl):
    """Advance a server's rows, each on its own with its own sampling values, by up to ``n_steps``
    tokens (``pad``: unused; ``rows``: unused, the thinker needs no per-row side input)."""
    model = nnx.merge(graphdef, params)
    return decode_loop(lambda s: thinker_step(model, cfg, s, impl), state, n_steps, eos_ids=eos)


def embed_tokens(params, ids, *, graphdef):
    """The thinker's input embeddings of ``ids``."""
    return th.embed(nnx.merge(graphdef, params), ids)


# --------------------------------------------------------------------------------------------
# talker programs

def talker_prompt(params, tokens, hidden, extra_ids, *, graphdef):
    """The last two talker-prompt entries from the thinker's side: the speaker's text-bos
    embedding (``extra_ids[0]``) and the reply's first token (hidden state + embedding)."""
    model = nnx.merge(graphdef, params)
    bos = th.embed(model, extra_ids[:1])[0]
    first = hidden[:, 0] + th.embed(model, tokens[:, 0]).astype(hidden.dtype)
    return bos, first


def talker_prefill(tparams, embeds, mask, pos, seen, sp, rng, max_new, eos, pad, min_new, suppress, n_bucket,
                   do_sample, *, graphdef, cfg, dtype, impl):
    """The talker's prefill over its prompt embeddings (the codec pad and bos embeddings are added
    to the last two entries here) and the choice of its first codec id."""
    model = nnx.merge(graphdef, tparams)
    b, t, _ = embeds.shape
    codec = model.embed_tokens(jnp.asarray([cfg.tts_codec_pad_token_id, cfg.tts_codec_start_token_id]))
    embeds = embeds.at[:, -2].add(codec[0]).at[:, -1].add(codec[1])
    cache = init_cache(tk.decoder_shape(cfg), b, t + n_bucket, dtype)
    kv_valid = jnp.concatenate([mask.astype(bool), jnp.ones((b, n_bucket), bool)], axis=1)
    logits, cache = tk.logits(model, cfg, embeds, pos, cache=cache, start=0, kv_valid=kv_valid, impl=impl)
    # the talker decodes from its prompt's largest position + 1 (transformers' talker rope_deltas)
    return initial_state(logits[:, -1], cache, kv_valid, seen, decode_start(pos, mask), t, sp, rng, max_new, eos,
                         pad, n_bucket, do_sample, min_new=min_new, suppress=suppress)


def talker_decode(tparams, state: DecodeState, params, th_tokens, th_hidden, th_n, n_steps, sp, eos, pad, do_sample,
                  thinker_eos, extra_ids, *, graphdef, thinker_graphdef, cfg, impl):
    """Advance a request's talker by up to ``n_steps`` codec ids, reading its inputs from the
    thinker's reply so far (``th_*``; the caller steps only over final entries)."""
    tmodel = nnx.merge(graphdef, tparams)
    model = nnx.merge(thinker_graphdef, params)
    ex = th.embed(model, extra_ids)  # text bos (speaker), text eos, text pad
    reply = ThinkerReply(th_tokens, th_hidden, th_n)
    stop = reply_stop(th_tokens, th_n, thinker_eos)

    def step(s):
        inp = reply_input(model, reply, s.n - 1, stop, ex[1], ex[2])
        return talker_step(tmodel, cfg, s, inp, impl)

    return decode_loop(step, with_request_sampling(state, sp, do_sample), n_steps, eos_ids=eos, pad_id=pad,
                       do_sample=do_sample, lockstep=True)


def talker_decode_rows(tparams, state: DecodeState, params, th_tokens, th_hidden, th_n, th_finished, th_eos_on,
                       n_steps, eos, pad, thinker_eos, extra_ids, rows=None, *, graphdef, thinker_graphdef, cfg, impl):
    """Advance a server's talker rows by up to ``n_steps`` codec ids each. The thinker's buffers
    (``th_*``) hold all ``B`` rows; ``rows`` picks those of ``state``'s sub-batch. Row ``b`` steps
    only while its next input is final (``k < n_thinker - 2``, or its thinker has finished): what
    ``OmniModel.stream`` does for one conversation."""
    if rows is not None:
        th_tokens, th_hidden, th_n, th_finished, th_eos_on = (
            jnp.take(x, rows, axis=0) for x in (th_tokens, th_hidden, th_n, th_finished, th_eos_on))
    tmodel = nnx.merge(graphdef, tparams)
    model = nnx.merge(thinker_graphdef, params)
    ex = th.embed(model, extra_ids)  # text bos (speaker), text eos, text pad
    reply = ThinkerReply(th_tokens, th_hidden, th_n)
    stop = reply_stop(th_tokens, th_n, thinker_eos, th_eos_on)
    final = jnp.where(th_finished, INT_BIG, th_n - 2)
    budget = jnp.clip(final - (state.n - 1), 0, INT_BIG)

    def step(s):
        return talker_step(tmodel, cfg, s, reply_input(model, reply, s.n - 1, stop, ex[1], ex[2]), impl)

    return decode_loop(step, state, n_steps, eos_ids=eos, budget=budget)


# --------------------------------------------------------------------------------------------
# declarations

@dataclass(frozen=True)
class Program:
    """A program and its calling convention: logical sharding names per positional argument
    (see omni_jax.sharding.MeshJit), static and donated positions, and output names."""

    fn: Callable
    arg_axes: tuple
    static_argnums: tuple = ()
    donate_argnums: tuple = ()
    out_axes: Callable | None = None

    def bind(self, mesh, **config) -> MeshJit:
        """The jitted program for one model (``config``: its graphdef, config, impl, ...) on ``mesh``
        (None: one device)."""
        return MeshJit(partial(self.fn, **config), mesh, self.arg_axes, static_argnums=self.static_argnums,
                       donate_argnums=self.donate_argnums, out_axes=self.out_axes)


PROGRAMS = {
    "thinker_logits": Program(thinker_logits, (OWN, BT, BT, BT3, None, None, None), static_argnums=(6,),
                              out_axes=lambda path, nd: ("batch", None, "act_vocab")[:nd]),
    "thinker_prefill": Program(thinker_prefill, (OWN, BT, BT, BT3, None, None, None, ("batch",), None, None, None,
                                                 None, None, None), static_argnums=(11, 12, 13)),
    "thinker_decode": Program(thinker_decode, (OWN, IO, None, None, None, None, None), static_argnums=(6,),
                              donate_argnums=(1,)),
    "embed_tokens": Program(embed_tokens, (OWN, None)),
    "talker_prompt": Program(talker_prompt, (OWN, None, None, None)),
    "talker_prefill": Program(talker_prefill, (OWN, BTE, BT, BT3, BT, None, ("batch",), None, None, None, None, None,
                                               None, None), static_argnums=(12, 13)),
    "talker_decode": Program(talker_decode, (OWN, IO, OWN, BT, BTE, None, None, None, None, None, None, None, None),
                             static_argnums=(10,), donate_argnums=(1,)),
}


# --------------------------------------------------------------------------------------------
# conversation sessions (omni_jax.session): a thinker cache that lives across turns


class SessionCache(NamedTuple):
    """A session's thinker KV cache (``cache``: :func:`omni_jax.decoder.init_cache`'s per-layer
    buffers), wrapped so that its leaves' paths (``.cache['k'][i]``) get the KV-cache shardings of
    ``sharding.IO_AXES``."""

    cache: dict


def thinker_extend(params, kv: SessionCache, ids, pos, mm_embeds, mm_idx, start, last, collect, *, graphdef, cfg,
                   impl):
    """Prefill ``ids [B, T]`` (media embeddings at the flat positions ``mm_idx``) with positions ``pos
    [3, B, T]`` into an existing cache at slots ``[start, start + T)``; every slot of the cache is a
    valid key (a session has no padding: the causal slot mask keeps a query from the slots after it,
    which hold padding or stale entries until they are rewritten). ``T`` is a bucket: the tokens
    past the real ones are padding, written after them and overwritten later. Returns ``(SessionCache,
    logits [B, V] of token index last, talker inputs)``: the next token's distribution after the real
    tokens and, with ``collect``, the new tokens' post-norm hidden states and input embeddings with
    media positions zeroed (``([B, T, E], [B, T, E])``, what the talker's prompt is made of), else None."""
    model = nnx.merge(graphdef, params)
    cache = kv.cache
    kv_valid = jnp.ones((ids.shape[0], cache["k"][0].shape[1]), bool)  # layer 0's [B, S, KVH, D]
    h, cache = th.hidden_states(model, cfg, embed_media(model, ids, mm_embeds, mm_idx), pos, cache=cache,
                                start=start, kv_valid=kv_valid, impl=impl)
    hl = jax.lax.dynamic_index_in_dim(h, last, axis=1, keepdims=False)
    extra = None
    if collect:
        extra = (h, embed_media(model, ids, jnp.zeros_like(mm_embeds), mm_idx))
    return SessionCache(cache), th.lm_logits(model, hl), extra


def thinker_begin(logits, kv: SessionCache, seen, next_pos, slot, sp, rng, max_new, eos, pad, n_bucket, do_sample,
                  hidden_dim, *, dtype):
    """A :class:`~omni_jax.generate.DecodeState` that decodes a session's reply from the logits of
    :func:`thinker_extend` (first token chosen here, as :func:`thinker_prefill` does), over the
    session's cache, all of whose slots are valid keys; ``hidden_dim`` > 0 collects each fed token's
    hidden state (the talker's input)."""
    cache = kv.cache
    kv_valid = jnp.ones((logits.shape[0], cache["k"][0].shape[1]), bool)
    return initial_state(logits, cache, kv_valid, seen, next_pos, slot, sp, rng, max_new, eos, pad, n_bucket,
                         do_sample, hidden_dim=hidden_dim, hidden_dtype=dtype)


PROGRAMS["thinker_extend"] = Program(thinker_extend, (OWN, IO, BT, BT3, None, None, None, None, None),
                                     static_argnums=(8,), donate_argnums=(1,))
PROGRAMS["thinker_begin"] = Program(thinker_begin, (("batch", None), IO, BT, None, None, None, ("batch",), None, None,
                                                    None, None, None, None), static_argnums=(10, 11, 12),
                                    donate_argnums=(1,))
