"""Token generation on device: prefill, then ``decode_steps(state, n)``.

The whole decoding state — KV cache, per-row key validity, generated-token buffer,
sampler state (per-row RNG keys, seen-token mask for the repetition penalty), stop flags —
is one pytree, :class:`DecodeState`. :func:`decode_steps` advances it by up to ``n`` tokens
inside one ``lax.while_loop`` and returns it, so ``generate`` runs all new tokens in one
call while streaming and serving hand tokens out every few steps with the same compiled
program (``n`` is a traced argument: changing it does not recompile).

Logits processing follows transformers' order: repetition penalty, then (sampling only)
temperature, top-k, top-p; greedy takes the argmax of the penalised logits. A finished row
keeps producing the pad id, like transformers.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Sampling(NamedTuple):
    """Traced sampling parameters (changing them does not recompile)."""

    temperature: jax.Array  # f32 scalar
    top_k: jax.Array  # i32 scalar; >= vocab means off
    top_p: jax.Array  # f32 scalar; 1.0 means off
    repetition_penalty: jax.Array  # f32 scalar; 1.0 means off


def make_sampling(temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0, vocab=1 << 30) -> Sampling:
    return Sampling(
        temperature=jnp.float32(temperature),
        top_k=jnp.int32(min(int(top_k), vocab) if top_k else vocab),
        top_p=jnp.float32(1.0 if top_p is None else top_p),
        repetition_penalty=jnp.float32(repetition_penalty),
    )


class DecodeState(NamedTuple):
    cache: dict  # {"k","v"}: [L, B, S, KVH, D]
    kv_valid: jax.Array  # [B, S] bool
    tokens: jax.Array  # [B, N] int32 generated ids (first `n` valid)
    n: jax.Array  # i32 scalar: tokens generated so far
    max_new: jax.Array  # i32 scalar
    last: jax.Array  # [B] int32: the last generated token (fed next)
    next_pos: jax.Array  # [3, B] int32: its position ids
    slot: jax.Array  # i32 scalar: the cache slot it will be written to
    done: jax.Array  # [B] bool
    seen: jax.Array  # [B, V] bool: tokens in prompt or output (repetition penalty)
    rng: jax.Array  # [B] PRNG keys, one per row


def process_logits(logits, seen, sp: Sampling, do_sample: bool):
    """Penalise, then (when sampling) temperature, top-k and top-p, as transformers does."""
    pen = sp.repetition_penalty
    penalised = jnp.where(logits < 0, logits * pen, logits / pen)
    logits = jnp.where(seen, penalised, logits)
    if not do_sample:
        return logits
    logits = logits / sp.temperature
    v = logits.shape[-1]
    desc = jnp.sort(logits, axis=-1)[..., ::-1]
    kth = jnp.take_along_axis(desc, jnp.clip(sp.top_k - 1, 0, v - 1)[None, None].repeat(logits.shape[0], 0), -1)
    logits = jnp.where(logits < kth, -jnp.inf, logits)
    # top-p: drop the smallest tokens whose cumulative probability is <= 1 - top_p; keep >= 1
    order = jnp.argsort(logits, axis=-1)  # ascending
    sorted_logits = jnp.take_along_axis(logits, order, -1)
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove_sorted = (cum <= 1.0 - sp.top_p).at[..., -1].set(False)
    remove = jnp.zeros_like(remove_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(remove_sorted)
    return jnp.where(remove, -jnp.inf, logits)


def choose(logits, seen, sp: Sampling, keys, do_sample: bool):
    """Next token per row ``[B]`` from float32 ``logits [B, V]``."""
    processed = process_logits(logits, seen, sp, do_sample)
    if not do_sample:
        return jnp.argmax(processed, axis=-1).astype(jnp.int32)
    return jax.vmap(lambda k, lg: jax.random.categorical(k, lg))(keys, processed).astype(jnp.int32)


def step_keys(rng, n):
    return jax.vmap(lambda k: jax.random.fold_in(k, n))(rng)


def record(state_tokens, seen, done, tok, n, eos_ids, pad_id):
    """Store ``tok`` (pad for finished rows) at column ``n``; update seen and done.

    ``eos_ids`` is an int32 array (entries < 0 are unused), ``pad_id`` an int32 scalar.
    """
    tok = jnp.where(done, pad_id, tok)
    tokens = jax.lax.dynamic_update_slice(state_tokens, tok[:, None], (0, n))
    seen = seen.at[jnp.arange(tok.shape[0]), tok].set(True)
    is_eos = jnp.any(tok[:, None] == eos_ids[None, :], axis=-1)
    return tokens, seen, done | is_eos, tok


def decode_loop(step_fn, state: DecodeState, n_steps, sp: Sampling, *, eos_ids, pad_id, do_sample):
    """Advance ``state`` by up to ``n_steps`` tokens; ``step_fn(state) -> (logits [B,V], cache)``."""

    def cond(carry):
        s, i = carry
        return (i < n_steps) & (s.n < s.max_new) & ~jnp.all(s.done)

    def body(carry):
        s, i = carry
        logits, cache = step_fn(s)
        tok = choose(logits, s.seen, sp, step_keys(s.rng, s.n), do_sample)
        tokens, seen, done, tok = record(s.tokens, s.seen, s.done, tok, s.n, eos_ids, pad_id)
        s = s._replace(cache=cache, tokens=tokens, seen=seen, done=done, last=tok, n=s.n + 1,
                       next_pos=s.next_pos + 1, slot=s.slot + 1)
        return s, i + 1

    state, _ = jax.lax.while_loop(cond, body, (state, jnp.int32(0)))
    return state


def finished(state: DecodeState) -> bool:
    return bool(state.n >= state.max_new) or bool(jnp.all(state.done))
