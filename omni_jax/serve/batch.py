"""The server's fixed-shape decode batches (device side of continuous batching).

A :class:`SlotBatch` holds one :class:`~omni_jax.generate.DecodeState` of ``B`` rows ("slots") with a
cache of ``S`` slots per row and a ``N``-token buffer, for the thinker or the talker. A request
is prefilled alone with the model's own prefill (:meth:`OmniModel.prefill` /
:meth:`OmniModel.talker_start`, so the first token is the offline one), then its batch-1
state is written into a free row (:meth:`SlotBatch.insert`, a jitted dynamic_update_slice with
the row index traced: no compile per row). :meth:`SlotBatch.step` runs the jitted per-row decode
loop (:meth:`OmniModel.decode_rows_fn`: omni_jax.engine's per-row programs) for up to ``k`` steps over the rows the scheduler
names (the occupied rows that still decode), not over all ``B``: it copies them, padded with free
rows to the occupancy bucket (the smallest power of two >= their count, at most ``B``: 1, 2, 4,
..., ``B``), into a bucket-sized sub-batch (:func:`omni_jax.generate.take_rows`), decodes it and
writes it back in place (:func:`omni_jax.generate.put_rows`; at bucket ``B`` it decodes the
whole batch without a copy). The copy is of the bucket's rows only, so a call costs about what a
batch of that size costs offline.

Compiles: one decode program per occupancy bucket actually used (at most ``ceil(log2(B)) + 1``
per batch, the talker's and the thinker's separately), one insert program per prefill-state shape;
the row indices are traced, and every other shape is fixed by the server's limits, so rows
joining or leaving never recompile. Each row keeps the cache layout of an offline run (prompt
bucket at slots ``[0, Tb)``, token ``j`` at ``Tb + j``), its own positions, key mask, RNG key and
sampling parameters, so its tokens do not depend on the rows beside it nor on the bucket.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..generate import DecodeState, Sampling, put_rows, take_rows


def empty_state(b: int, cache_shape, cache_dtype, n_tokens: int, vocab: int, hidden_dim: int, hidden_dtype):
    """``b`` free rows (all done). The KV cache is per layer (``L`` buffers ``[b, S, KVH, D]``), the
    inference layout (:func:`omni_jax.decoder.init_cache`)."""
    layers, slots, kvh, hd = cache_shape
    cache = {n: [jnp.zeros((b, slots, kvh, hd), cache_dtype) for _ in range(layers)] for n in ("k", "v")}
    return DecodeState(
        cache=cache, kv_valid=jnp.zeros((b, slots), bool),
        tokens=jnp.zeros((b, n_tokens), jnp.int32), n=jnp.zeros((b,), jnp.int32), max_new=jnp.zeros((b,), jnp.int32),
        min_new=jnp.zeros((b,), jnp.int32), last=jnp.zeros((b,), jnp.int32), next_pos=jnp.zeros((3, b), jnp.int32),
        slot=jnp.zeros((b,), jnp.int32), done=jnp.ones((b,), bool), eos_on=jnp.ones((b,), bool),
        seen=jnp.zeros((b, vocab), bool), rng=jax.random.key_data(jax.vmap(jax.random.key)(jnp.arange(b))),
        hidden=jnp.zeros((b, n_tokens if hidden_dim else 0, hidden_dim), hidden_dtype),
        suppress=jnp.zeros((b, vocab), bool),
        sp=Sampling(temperature=jnp.ones((b,), jnp.float32), top_k=jnp.full((b,), vocab, jnp.int32),
                    top_p=jnp.ones((b,), jnp.float32), repetition_penalty=jnp.ones((b,), jnp.float32),
                    do_sample=jnp.zeros((b,), bool)))


def _insert(big: DecodeState, small: DecodeState, r, max_new, min_new, eos_on, sp_row):
    """Write batch-1 prefill state ``small`` into row ``r`` of ``big`` with the row's own limits,
    ``eos_on`` and sampling values ``sp_row`` (row ``r``'s cache slots beyond the small cache keep
    stale values, masked out by ``kv_valid``)."""

    def put(dst, src, axis=0):  # src has a leading batch axis of 1 at `axis`
        start = [0] * dst.ndim
        start[axis] = r
        return jax.lax.dynamic_update_slice(dst, src.astype(dst.dtype), start)

    def row_pad(src, width):  # [1, w, ...] -> [1, width, ...] (zeros/False after)
        pad = [(0, 0)] * src.ndim
        pad[1] = (0, width - src.shape[1])
        return jnp.pad(src, pad)

    cache = jax.tree.map(put, big.cache, small.cache)  # per-layer [B, S, KVH, D] buffers: rows on axis 0
    kv_valid = put(big.kv_valid, row_pad(small.kv_valid, big.kv_valid.shape[1]))
    tokens = put(big.tokens, row_pad(small.tokens, big.tokens.shape[1]))
    hidden = big.hidden
    if hidden.shape[1]:
        hidden = put(hidden, row_pad(small.hidden, hidden.shape[1]))
    one = lambda x: jnp.reshape(x, (1,))  # noqa: E731
    sp = Sampling(*[put(getattr(big.sp, f), one(v)) for f, v in zip(Sampling._fields, sp_row)])
    return big._replace(
        cache=cache, kv_valid=kv_valid, tokens=tokens, hidden=hidden, n=put(big.n, small.n),
        max_new=put(big.max_new, one(max_new)), min_new=put(big.min_new, one(min_new)),
        last=put(big.last, small.last), next_pos=put(big.next_pos, small.next_pos, axis=1),
        slot=put(big.slot, small.slot), done=put(big.done, small.done), eos_on=put(big.eos_on, one(eos_on)),
        seen=put(big.seen, small.seen), rng=put(big.rng, jax.random.key_data(small.rng)),
        suppress=put(big.suppress, small.suppress), sp=sp)


def _release(state: DecodeState, rows):
    """Mark ``rows`` ([B] bool) done: they stop stepping at once (a free slot is a done row)."""
    return state._replace(done=state.done | rows)


def _take_row(state: DecodeState, r):
    """Row ``r``'s tokens ``[1, N]``, hidden ``[1, N, E]`` and count (for the talker's prefill)."""
    return (jax.lax.dynamic_slice_in_dim(state.tokens, r, 1), jax.lax.dynamic_slice_in_dim(state.hidden, r, 1),
            jax.lax.dynamic_index_in_dim(state.n, r, keepdims=False))


def _take_reply(state: DecodeState, r):
    """Row ``r``'s KV cache (per layer ``[1, S, KVH, D]``), hidden ``[1, N, E]``, tokens ``[1, N]`` and
    count: what a session takes back after its reply ran in the batch."""
    cache = jax.tree.map(lambda c: jax.lax.dynamic_slice_in_dim(c, r, 1), state.cache)
    return (cache, jax.lax.dynamic_slice_in_dim(state.hidden, r, 1), jax.lax.dynamic_slice_in_dim(state.tokens, r, 1),
            jax.lax.dynamic_index_in_dim(state.n, r, keepdims=False))


def fit_slots(small: DecodeState, slots: int) -> DecodeState:
    """``small`` (batch 1) with its cache and key mask cut or zero-padded to ``slots`` slots (a
    session's cache may be allocated larger or smaller than the batch's rows; the slots cut hold
    nothing the reply reads or writes)."""
    have = small.kv_valid.shape[1]
    if have == slots:
        return small

    def fit(x):  # [1, S, ...]
        if have > slots:
            return x[:, :slots]
        return jnp.pad(x, [(0, 0), (0, slots - have)] + [(0, 0)] * (x.ndim - 2))

    return small._replace(cache=jax.tree.map(fit, small.cache), kv_valid=fit(small.kv_valid))


def occupancy_bucket(n: int, b: int) -> int:
    """The sub-batch size for ``n`` decoding rows in a batch of ``b``: the smallest power of two
    ``>= n``, at most ``b``."""
    k = 1
    while k < n:
        k *= 2
    return min(k, b)


def _on_rows(step_fn, b):
    """``run(before, state, rows, after)``: ``step_fn`` over rows ``rows`` of ``state`` only (all of
    them, without a copy, when ``len(rows) == b``). ``step_fn(*before, state, *after, rows=...)``
    gets the row indices (or None) to select its own per-row inputs."""

    def run(before, state: DecodeState, rows, after):
        if rows.shape[0] == b:
            return step_fn(*before, state, *after, rows=None)
        sub = step_fn(*before, take_rows(state, rows), *after, rows=rows)
        return put_rows(state, rows, sub)

    return run


class SlotBatch:
    """One decode batch of ``b`` rows with jitted insert / release / step programs."""

    def __init__(self, state: DecodeState, step_fn, *, eos, pad, donate=True, mesh=None):
        self.state = state
        self.mesh = mesh
        self.b = state.tokens.shape[0]
        self.eos = jnp.asarray(eos, jnp.int32)
        self.pad = jnp.int32(pad)
        # wrappers, so that each batch has its own compile cache (and compile count)
        self._insert = jax.jit(lambda *a: _insert(*a), donate_argnums=(0,) if donate else ())
        self._release = jax.jit(lambda *a: _release(*a), donate_argnums=(0,) if donate else ())
        self._take = jax.jit(lambda *a: _take_row(*a))
        self._take_reply = jax.jit(lambda *a: _take_reply(*a))
        self._step = jax.jit(_on_rows(step_fn, self.b), donate_argnums=(1,) if donate else ())
        self.buckets: set[int] = set()  # occupancy buckets decoded so far (one program each)

    def step(self, rows, *, before=(), after=()):
        """``state = step_fn(*before, state, *after)`` over rows ``rows`` (host ints) only, padded
        with other rows (free or finished: they do not step) to :func:`occupancy_bucket` (under the
        model's mesh). No rows: nothing to do."""
        from ..sharding import use_mesh

        rows = sorted(set(int(r) for r in rows))
        if not rows:
            return
        k = occupancy_bucket(len(rows), self.b)
        if k < self.b:
            chosen = set(rows)
            rows = sorted(rows + [r for r in range(self.b) if r not in chosen][:k - len(rows)])
        else:
            rows = list(range(self.b))
        self.buckets.add(k)
        with use_mesh(self.mesh):
            self.state = self._step(tuple(before), self.state, np.asarray(rows, np.int32), tuple(after))

    def insert(self, r: int, small: DecodeState, *, max_new, min_new, eos_on, sp_row):
        self.state = self._insert(self.state, small, np.int32(r), np.int32(max_new), np.int32(min_new),
                                  np.bool_(eos_on), sp_row)

    def release(self, rows: np.ndarray):
        self.state = self._release(self.state, np.asarray(rows, bool))

    def take_row(self, r: int):
        return self._take(self.state, np.int32(r))

    def take_reply(self, r: int):
        """Row ``r``'s ``(cache, hidden, tokens, n)`` (copies; see :func:`_take_reply`)."""
        return self._take_reply(self.state, np.int32(r))

    def host_view(self):
        """(n [B], tokens [B, N], finished [B]) on the host."""
        s = self.state
        n, tokens, done, max_new = jax.device_get((s.n, s.tokens, s.done, s.max_new))
        return n, tokens, done | (n >= max_new)

    def compiles(self) -> dict:
        return {"insert": self._insert._cache_size(), "step": self._step._cache_size(),
                "take_reply": self._take_reply._cache_size()}


def sampling_row(temperature, top_k, top_p, repetition_penalty, do_sample, vocab):
    """Per-row sampling values (the fields of :class:`omni_jax.generate.Sampling`), as
    :func:`omni_jax.generate.make_sampling` sets them."""
    return (np.float32(temperature if do_sample else 1.0), np.int32(min(int(top_k), vocab) if top_k else vocab),
            np.float32(1.0 if top_p is None else top_p), np.float32(repetition_penalty), np.bool_(do_sample))
