"""Blockwise (flash) attention and split-K decode attention in Pallas.

One kernel body serves every attention in omni-jax. The mask arrives as *structure*
(:class:`omni_jax.attention_xla.MaskSpec`) and is turned into small per-position metadata:

* per query row: its slot (causal), its band block ``slot // block_size`` (DiT band) and its
  segment id;
* per key: its slot, its band block, and its segment id, with invalid keys (``kv_valid``
  False, or internal padding) given the segment id ``INVALID`` that no query carries.

Inside a tile the mask is recomputed from that metadata (a few integer compares), so no
``[T, T]`` array ever exists. Across tiles, :func:`_block_ranges` works out (in XLA, from
per-block min/max of the metadata) the contiguous range of key blocks that can hold a
visible key for each query block; the kernel loops over that range only, so causal, band,
segment (window) and padding structure skip whole blocks. The same tables give the run of
blocks where every pair is visible; those tiles skip the mask arithmetic altogether.

GQA is folded into the query rows: the ``G = H / KVH`` query heads that share a KV head
become ``G`` consecutive rows (row ``t * G + g``), so a KV tile is loaded once for the
whole group and the key/value gradient kernel sums over the group by construction.

Softmax runs in float32 with a running max and sum (online softmax); the probabilities
are cast to the value dtype before the second product, as in the XLA reference. Rows
with no visible key come out of the kernel as zeros with ``lse = EMPTY``; the wrapper
replaces them with the XLA reference's value (the uniform average of V over all keys), so
both implementations agree even on padding queries.

Backward (``jax.custom_vjp``): FlashAttention-2 style, one kernel for dQ (loop over key
blocks) and one for dK/dV (loop over query blocks), both recomputing probabilities from
the saved log-sum-exp.

Decode (``Tq == 1``): the same body on a grid that also splits the key axis (flash
decoding), so one sequence's cache is read by many programs at once; the partial results
are merged with their log-sum-exps in XLA.

The exponentials run in base 2 (scores pre-multiplied by ``scale * log2(e)``, ``exp2`` per
element; the saved log-sum-exp stays natural), except on TPU. Float32 inputs on a GPU use
tensor-core dots: 3-pass TF32 under ``jax.default_matmul_precision("highest")`` (the DiT's
setting; about float32 accuracy), one-pass TF32 otherwise; Triton's IEEE float32 dot is an FMA
loop, slow to compile and to run. GPU bfloat16 tiles (:func:`_defaults`) come from an H100 sweep;
the backward may use smaller tiles than the forward (``Cfg.bwd``).

Platforms: ``"gpu"`` lowers through Pallas' Triton backend, ``"tpu"`` through Mosaic (K/V
are transposed to ``[B, KVH, T, D]`` there, since Mosaic tiles the last two dims),
``"interpret"`` runs the kernel as plain JAX (CPU tests).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from ..attention_xla import xla_attention

NEG = -0.7 * float(np.finfo(np.float32).max)  # masked score (finite: no inf - inf)
EMPTY = -1e30  # lse of a row with no visible key
INVALID = int(np.iinfo(np.int32).min)  # segment id of an invalid key; no query has it
_BIG = int(np.iinfo(np.int32).max)


@dataclasses.dataclass(frozen=True)
class Cfg:
    """Static kernel configuration (hashable: used as a custom_vjp nondiff argument)."""

    causal: bool
    band: Optional[tuple[int, int]]  # (look_back, look_ahead) in band blocks
    scale: float
    bq: int
    bk: int
    platform: str  # "gpu" | "tpu" | "interpret"
    splits: int = 1  # key-axis splits (decode)
    num_warps: int = 4
    num_stages: int = 2
    exp2: bool = True  # softmax in base 2: scores pre-multiplied by scale * log2(e), exp2 per element
    precision: Optional[str] = None  # float32 dots on GPU: "tf32" or "tf32x3" (None: the dtype's default)
    bwd: Optional[tuple[int, int, int, int]] = None  # backward (bq, bk, num_warps, num_stages), if not the same
    band_size: int = 0  # band block size in slots (for the cost estimate only)
    group: int = 1  # query heads per KV head (rows = tokens x group; for the cost estimate only)
    vmem_limit: int = 0  # TPU: the scoped VMEM limit the Mosaic compile may use (0: the compiler's default)

    def for_bwd(self) -> "Cfg":
        if self.bwd is None:
            return self
        bq, bk, w, st = self.bwd
        return dataclasses.replace(self, bq=bq, bk=bk, num_warps=w, num_stages=st, bwd=None)


# the kernel platform forced by :func:`target_platform` (None: follow jax.default_backend())
_TARGET = contextvars.ContextVar("omni_jax_pallas_platform", default=None)


@contextlib.contextmanager
def target_platform(platform: str | None):
    """Within this context, kernels traced without an explicit ``platform=`` lower for ``platform``
    (``"tpu"``, ``"gpu"``, ``"interpret"``) whatever the default backend: ahead-of-time compilation
    for a TPU topology from a CPU host traces on the CPU, where the default would be interpret mode
    (plain JAX ops, no Mosaic kernel in the program)."""
    if platform not in (None, "tpu", "gpu", "interpret"):
        raise ValueError(f"kernel platform '{platform}' is not one of 'tpu', 'gpu', 'interpret'")
    token = _TARGET.set(platform)
    try:
        yield
    finally:
        _TARGET.reset(token)


def current_platform() -> str:
    forced = _TARGET.get()
    if forced is not None:
        return forced
    b = jax.default_backend()
    if b in ("gpu", "cuda", "rocm"):
        return "gpu"
    if b == "tpu":
        return "tpu"
    return "interpret"


# --------------------------------------------------------------------------- metadata


def _bt(x, b, t):
    x = jnp.asarray(x).astype(jnp.int32)
    x = x[None, :] if x.ndim == 1 else x
    return jnp.broadcast_to(x, (b, t))


def _pad_to(x, n, axis, value=0):
    if x.shape[axis] == n:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, n - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


@dataclasses.dataclass
class Meta:
    """Per-row / per-key int32 metadata, padded to the kernel's sizes."""

    q: dict  # name -> [B, Rq_pad]   (slot, blk, seg)
    k: dict  # name -> [B, Tk_pad]
    q_real: jax.Array  # [B, Rq_pad] bool


def build_meta(mask, b, tq, tk, g, rq_pad, tk_pad, band_size) -> Meta:
    qd, kd = {}, {}
    qs = _bt(mask.q_slots, b, tq) if mask.q_slots is not None else _bt(jnp.arange(tq), b, tq)
    ks = _bt(mask.kv_slots, b, tk) if mask.kv_slots is not None else _bt(jnp.arange(tk), b, tk)
    if mask.causal:
        qd["slot"], kd["slot"] = qs, ks
    if mask.block_band is not None:
        qd["blk"], kd["blk"] = qs // band_size, ks // band_size
    if mask.q_segment_ids is not None or mask.kv_segment_ids is not None:
        qseg, kseg = _bt(mask.q_segment_ids, b, tq), _bt(mask.kv_segment_ids, b, tk)
    else:
        qseg, kseg = jnp.zeros((b, tq), jnp.int32), jnp.zeros((b, tk), jnp.int32)
    if mask.kv_valid is not None:
        valid = jnp.broadcast_to(jnp.asarray(mask.kv_valid).astype(bool).reshape(-1, tk), (b, tk))
        kseg = jnp.where(valid, kseg, INVALID)
    qd["seg"], kd["seg"] = qseg, kseg
    # GQA: query token t, group head j -> row t * G + j
    qd = {n: _pad_to(jnp.repeat(x, g, axis=1), rq_pad, 1) for n, x in qd.items()}
    kd = {n: _pad_to(x, tk_pad, 1, INVALID if n == "seg" else 0) for n, x in kd.items()}
    q_real = jnp.broadcast_to(jnp.arange(rq_pad)[None, :] < tq * g, (b, rq_pad))
    return Meta(qd, kd, q_real)


def _block_ranges(meta: Meta, cfg: Cfg):
    """Per query block, the [lo, hi) key-block range that can hold a visible key, and per key
    block the [lo, hi) query-block range (for the dK/dV kernel). Conservative, from per-block
    min/max of the metadata; exact masking happens inside the tile."""
    bq, bk = cfg.bq, cfg.bk
    b, rq = meta.q_real.shape
    tk = meta.k["seg"].shape[1]
    nq, nk = rq // bq, tk // bk
    qreal = meta.q_real.reshape(b, nq, bq)
    kreal = (meta.k["seg"] != INVALID).reshape(b, nk, bk)

    def mm(x, real, n, bs):
        x = x.reshape(b, n, bs)
        return jnp.min(jnp.where(real, x, _BIG), -1), jnp.max(jnp.where(real, x, -_BIG), -1)

    qall, kall = qreal.all(-1)[:, :, None], kreal.all(-1)[:, None, :]
    vis = qreal.any(-1)[:, :, None] & kreal.any(-1)[:, None, :]
    full = qall & kall  # every (row, key) pair of the tile visible: no mask needed
    qmin, qmax = mm(meta.q["seg"], qreal, nq, bq)
    kmin, kmax = mm(meta.k["seg"], kreal, nk, bk)
    vis &= (kmin[:, None, :] <= qmax[:, :, None]) & (kmax[:, None, :] >= qmin[:, :, None])
    full &= ((qmin == qmax)[:, :, None] & (kmin == kmax)[:, None, :] & (kmin[:, None, :] == qmin[:, :, None]))
    if cfg.causal:
        qmin, qmax = mm(meta.q["slot"], qreal, nq, bq)
        kmin, kmax = mm(meta.k["slot"], kreal, nk, bk)
        vis &= kmin[:, None, :] <= qmax[:, :, None]
        full &= kmax[:, None, :] <= qmin[:, :, None]
    if cfg.band is not None:
        back, ahead = cfg.band
        qmin, qmax = mm(meta.q["blk"], qreal, nq, bq)
        kmin, kmax = mm(meta.k["blk"], kreal, nk, bk)
        vis &= (kmin[:, None, :] - qmax[:, :, None] <= ahead) & (kmax[:, None, :] - qmin[:, :, None] >= -back)
        full &= (kmax[:, None, :] - qmin[:, :, None] <= ahead) & (kmin[:, None, :] - qmax[:, :, None] >= -back)
    full &= vis

    def rng(v, f):  # [B, n, m] -> [B, n, 4]: visible [lo, hi), unmasked [flo, fhi) inside it
        m = v.shape[-1]
        anyv, anyf = v.any(-1), f.any(-1)
        lo = jnp.where(anyv, jnp.argmax(v, -1), 0)
        hi = jnp.where(anyv, m - jnp.argmax(v[..., ::-1], -1), 0)
        flo = jnp.argmax(f, -1)
        fhi = m - jnp.argmax(f[..., ::-1], -1)
        # use the unmasked range only when it is one contiguous run
        ok = anyf & (jnp.sum(f, -1) == fhi - flo)
        flo, fhi = jnp.where(ok, flo, hi), jnp.where(ok, fhi, hi)
        return jnp.stack([lo, hi, flo, fhi], -1).astype(jnp.int32)

    return rng(vis, full), rng(jnp.swapaxes(vis, 1, 2), jnp.swapaxes(full, 1, 2))


def _tile_mask(cfg: Cfg, qm: dict, km: dict):
    """Boolean [bq, bk] mask from row metadata ([bq, 1]) and key metadata ([1, bk])."""
    m = km["seg"] == qm["seg"]
    if cfg.causal:
        m = m & (km["slot"] <= qm["slot"])
    if cfg.band is not None:
        back, ahead = cfg.band
        d = km["blk"] - qm["blk"]
        m = m & (d >= -back) & (d <= ahead)
    return m


_PRECISIONS = {None: None, "tf32": lax.DotAlgorithmPreset.TF32_TF32_F32,
               "tf32x3": lax.DotAlgorithmPreset.TF32_TF32_F32_X3}
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def _dg(a, b, dims, prec):
    p = _PRECISIONS[prec] if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, (dims, ((), ())), precision=p, preferred_element_type=jnp.float32)


def _dot_nt(a, b, prec=None):  # a [m, d] . b [n, d]^T -> [m, n] f32
    return _dg(a, b, ((1,), (1,)), prec)


def _dot_nn(a, b, prec=None):  # a [m, n] . b [n, d] -> [m, d] f32
    return _dg(a, b, ((1,), (0,)), prec)


def _dot_tn(a, b, prec=None):  # a [n, m]^T . b [n, d] -> [m, d] f32
    return _dg(a, b, ((0,), (0,)), prec)


def _exp(cfg, x):
    return jnp.exp2(x) if cfg.exp2 else jnp.exp(x)


def _loops(rng_ref, b, i, body, carry, clip=None):
    """Run ``body(masked, j, carry)`` over the visible blocks ``[lo, hi)`` of row ``i``: the
    unmasked run ``[flo, fhi)`` without the mask, everything else in one masked loop (two
    loop bodies per kernel, not three: smaller code, faster Triton compiles)."""
    lo, hi, flo, fhi = (rng_ref[b, i, c] for c in range(4))
    if clip is not None:
        lo, hi = jnp.maximum(lo, clip[0]), jnp.minimum(hi, clip[1])
        hi = jnp.maximum(hi, lo)
    flo = jnp.minimum(jnp.maximum(flo, lo), hi)
    fhi = jnp.minimum(jnp.maximum(fhi, flo), hi)
    gap = fhi - flo

    def masked(t, c):
        j = lo + t
        return body(True, jnp.where(j >= flo, j + gap, j), c)

    carry = lax.fori_loop(0, (hi - lo) - gap, masked, carry)
    return lax.fori_loop(flo, fhi, functools.partial(body, False), carry)


# --------------------------------------------------------------------------- kernels


def _fwd_kernel(rng_ref, q_ref, k_ref, v_ref, *refs, cfg: Cfg, names: tuple, per_split: int):
    nm = len(names)
    qm_refs, km_refs = refs[:nm], refs[nm:2 * nm]
    o_ref, lse_ref = refs[2 * nm:]
    # query blocks run in reverse order: under a causal mask the late blocks are the heavy ones,
    # and starting them first shortens the tail of the launch
    b, i, s = pl.program_id(0), pl.num_programs(2) - 1 - pl.program_id(2), pl.program_id(3)
    clip = (s * per_split, (s + 1) * per_split) if cfg.splits > 1 else None
    bq, bk = cfg.bq, cfg.bk
    q = q_ref[...]
    qm = {n: r[...] for n, r in zip(names, qm_refs)}  # [bq, 1]

    qk_scale = cfg.scale * (LOG2E if cfg.exp2 else 1.0)  # scores in the exponent's base

    def body(masked, j, carry):
        acc, m, l = carry
        start = pl.multiple_of(j * bk, bk)
        k = k_ref[pl.ds(start, bk), :]
        sc = _dot_nt(q, k, cfg.precision) * qk_scale
        if masked:
            km = {n: r[:, pl.ds(start, bk)] for n, r in zip(names, km_refs)}  # [1, bk]
            msk = _tile_mask(cfg, qm, km)
            sc = jnp.where(msk, sc, NEG)
        m_new = jnp.maximum(m, jnp.max(sc, axis=-1, keepdims=True))
        corr = _exp(cfg, m - m_new)
        p = _exp(cfg, sc - m_new)
        if masked:
            p = jnp.where(msk, p, 0.0)
        l = corr * l + jnp.sum(p, axis=-1, keepdims=True)
        v = v_ref[pl.ds(start, bk), :]
        acc = corr * acc + _dot_nn(p.astype(v.dtype), v, cfg.precision)
        return acc, m_new, l

    d = q_ref.shape[-1]
    init = (jnp.zeros((bq, d), jnp.float32), jnp.full((bq, 1), NEG, jnp.float32),
            jnp.zeros((bq, 1), jnp.float32))
    acc, m, l = _loops(rng_ref, b, i, body, init, clip)
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc / l_safe).astype(o_ref.dtype)
    lse = (m + jnp.log2(l_safe)) * LN2 if cfg.exp2 else m + jnp.log(l_safe)  # natural log-sum-exp
    lse_ref[...] = jnp.where(empty, EMPTY, lse)


def _dq_kernel(rng_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, *refs, cfg: Cfg, names: tuple):
    nm = len(names)
    qm_refs, km_refs = refs[:nm], refs[nm:2 * nm]
    (dq_ref,) = refs[2 * nm:]
    b, i = pl.program_id(0), pl.num_programs(2) - 1 - pl.program_id(2)
    bk = cfg.bk
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], dl_ref[...]
    qm = {n: r[...] for n, r in zip(names, qm_refs)}
    qk_scale = cfg.scale * (LOG2E if cfg.exp2 else 1.0)

    def body(masked, j, dq):
        start = pl.multiple_of(j * bk, bk)
        k = k_ref[pl.ds(start, bk), :]
        v = v_ref[pl.ds(start, bk), :]
        sc = _dot_nt(q, k, cfg.precision) * qk_scale
        p = _exp(cfg, sc - lse)
        if masked:
            km = {n: r[:, pl.ds(start, bk)] for n, r in zip(names, km_refs)}
            p = jnp.where(_tile_mask(cfg, qm, km), p, 0.0)
        dp = _dot_nt(do, v, cfg.precision)
        ds = p * (dp - delta)
        return dq + _dot_nn(ds.astype(k.dtype), k, cfg.precision)

    dq = _loops(rng_ref, b, i, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(rng_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, *refs, cfg: Cfg, names: tuple):
    nm = len(names)
    qm_refs, km_refs = refs[:nm], refs[nm:2 * nm]
    dk_ref, dv_ref = refs[2 * nm:]
    b, j = pl.program_id(0), pl.program_id(2)
    bq = cfg.bq
    k, v = k_ref[...], v_ref[...]
    km = {n: r[...] for n, r in zip(names, km_refs)}  # [1, bk]
    qk_scale = cfg.scale * (LOG2E if cfg.exp2 else 1.0)

    def body(masked, i, carry):
        dk, dv = carry
        start = pl.multiple_of(i * bq, bq)
        q = q_ref[pl.ds(start, bq), :]
        do = do_ref[pl.ds(start, bq), :]
        lse = lse_ref[pl.ds(start, bq), :]
        delta = dl_ref[pl.ds(start, bq), :]
        sc = _dot_nt(q, k, cfg.precision) * qk_scale
        p = _exp(cfg, sc - lse)
        if masked:
            qm = {n: r[pl.ds(start, bq), :] for n, r in zip(names, qm_refs)}
            p = jnp.where(_tile_mask(cfg, qm, km), p, 0.0)
        dv = dv + _dot_tn(p.astype(do.dtype), do, cfg.precision)
        dp = _dot_nt(do, v, cfg.precision)
        ds = p * (dp - delta)
        dk = dk + _dot_tn(ds.astype(q.dtype), q, cfg.precision)
        return dk, dv

    z = jnp.zeros(k.shape, jnp.float32)
    dk, dv = _loops(rng_ref, b, j, body, (z, z))
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# --------------------------------------------------------------------------- pallas_call plumbing


def _compiler_params(cfg: Cfg, nd: int):
    if cfg.platform == "gpu":
        from jax.experimental.pallas import triton as plgpu

        return plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.platform == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.CompilerParams(dimension_semantics=("parallel",) * nd,
                                    vmem_limit_bytes=cfg.vmem_limit or None)
    return None


def _visible_fraction(cfg: Cfg, rows: int, g: int, tk: int) -> float:
    """The share of the ``rows x tk`` score tiles a kernel computes, estimated from the mask's static
    structure (the kernels skip invisible key blocks): causal prefill from slot 0, ``(Tq + 1) / 2``
    keys per query; a block band, its ``(look_back + 1 + look_ahead)`` blocks; one query (decode),
    the whole cache (an upper bound: the kernel stops at the last visible key). Key padding and
    segment ids are data, so they do not enter the estimate."""
    frac = 1.0
    tq = max(1, rows // max(g, 1))
    if cfg.causal and tq > 1:
        frac = min(frac, (tq + 1) / (2 * tk))
    if cfg.band is not None and cfg.band_size:
        frac = min(frac, (cfg.band[0] + 1 + cfg.band[1]) * cfg.band_size / tk)
    return max(frac, 1.0 / max(tk, 1))


def _cost(cfg: Cfg, b, kvh, rows, tk, d, dots: int, operands, g: int = 1):
    """``pl.CostEstimate`` of one attention kernel: ``dots`` products of ``rows x tk x d`` per
    (batch, KV head), one exponential per visible score, and every operand read or written once.
    Without it XLA counts a custom call as free, and the compiled program's cost analysis (and its
    scheduling) would leave attention out."""
    frac = _visible_fraction(cfg, rows, g, tk)
    scores = b * kvh * rows * tk * frac
    nbytes = sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in operands)
    return pl.CostEstimate(flops=int(2 * dots * scores * d), transcendentals=int(scores), bytes_accessed=int(nbytes))


def _call(kernel, cfg, grid, in_specs, out_specs, out_shape, name, cost=None):
    return pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        compiler_params=_compiler_params(cfg, len(grid)), interpret=cfg.platform == "interpret",
        name=name, cost_estimate=cost)


def _rng_spec(cfg):
    if cfg.platform == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pl.BlockSpec(memory_space=pltpu.SMEM)
    return pl.BlockSpec()  # the whole [B, n, 2] table; the kernel reads two scalars


def _kv_spec(cfg, rows, d, blocked: bool):
    """K/V (and dK/dV): native [B, Tk, KVH, D] on GPU/interpret, [B, KVH, Tk, D] on TPU."""
    if cfg.platform == "tpu":
        if blocked:
            return pl.BlockSpec((None, None, rows, d), lambda b, h, j: (b, h, j, 0))
        return pl.BlockSpec((None, None, rows, d), lambda b, h, *_: (b, h, 0, 0))
    if blocked:
        return pl.BlockSpec((None, rows, None, d), lambda b, h, j: (b, j, h, 0))
    return pl.BlockSpec((None, rows, None, d), lambda b, h, *_: (b, 0, h, 0))


def _fwd(cfg: Cfg, q, k, v, meta_q, meta_k, rng_q):
    """q [B, KVH, Rq_pad, D]; k, v kernel layout. -> o [B, KVH, S, Rq_pad, D], lse [..., 1]."""
    b, kvh, rq, d = q.shape
    tk = k.shape[2] if cfg.platform == "tpu" else k.shape[1]
    names = tuple(meta_q)
    nq, nk, s = rq // cfg.bq, tk // cfg.bk, cfg.splits
    per = -(-nk // s)
    in_specs = [_rng_spec(cfg),
                pl.BlockSpec((None, None, cfg.bq, d), lambda b, h, i, s: (b, h, nq - 1 - i, 0)),
                _kv_spec(cfg, tk, d, False), _kv_spec(cfg, tk, d, False)]
    in_specs += [pl.BlockSpec((None, cfg.bq, 1), lambda b, h, i, s: (b, nq - 1 - i, 0)) for _ in names]
    in_specs += [pl.BlockSpec((None, 1, tk), lambda b, h, i, s: (b, 0, 0)) for _ in names]
    odt = q.dtype if s == 1 else jnp.float32
    out_shape = [jax.ShapeDtypeStruct((b, kvh, s, rq, d), odt),
                 jax.ShapeDtypeStruct((b, kvh, s, rq, 1), jnp.float32)]
    out_specs = [pl.BlockSpec((None, None, None, cfg.bq, d), lambda b, h, i, s: (b, h, s, nq - 1 - i, 0)),
                 pl.BlockSpec((None, None, None, cfg.bq, 1), lambda b, h, i, s: (b, h, s, nq - 1 - i, 0))]
    kern = functools.partial(_fwd_kernel, cfg=cfg, names=names, per_split=per)
    cost = _cost(cfg, b, kvh, rq, tk, d, 2, [q, k, v, *out_shape], cfg.group)
    return _call(kern, cfg, (b, kvh, nq, s), in_specs, out_specs, out_shape, "omni_flash_fwd", cost)(
        rng_q, q, k, v, *[meta_q[n][..., None] for n in names], *[meta_k[n][:, None, :] for n in names])


def _bwd(cfg: Cfg, q, k, v, do, lse, delta, meta_q, meta_k, rng_q, rng_k):
    b, kvh, rq, d = q.shape
    tk = k.shape[2] if cfg.platform == "tpu" else k.shape[1]
    names = tuple(meta_q)
    nq, nk = rq // cfg.bq, tk // cfg.bk
    qm = [meta_q[n][..., None] for n in names]
    km = [meta_k[n][:, None, :] for n in names]
    # dQ: grid over query blocks, loop over key blocks
    rowspec = lambda: pl.BlockSpec((None, None, cfg.bq, d), lambda b, h, i: (b, h, nq - 1 - i, 0))
    colspec = lambda: pl.BlockSpec((None, None, cfg.bq, 1), lambda b, h, i: (b, h, nq - 1 - i, 0))
    in_specs = [_rng_spec(cfg), rowspec(), _kv_spec(cfg, tk, d, False), _kv_spec(cfg, tk, d, False),
                rowspec(), colspec(), colspec()]
    in_specs += [pl.BlockSpec((None, cfg.bq, 1), lambda b, h, i: (b, nq - 1 - i, 0)) for _ in names]
    in_specs += [pl.BlockSpec((None, 1, tk), lambda b, h, i: (b, 0, 0)) for _ in names]
    dq = _call(functools.partial(_dq_kernel, cfg=cfg, names=names), cfg, (b, kvh, nq), in_specs,
               [rowspec()], [jax.ShapeDtypeStruct(q.shape, q.dtype)], "omni_flash_dq",
               _cost(cfg, b, kvh, rq, tk, d, 3, [q, k, v, do, q], cfg.group))(
        rng_q, q, k, v, do, lse, delta, *qm, *km)[0]
    # dK, dV: grid over key blocks, loop over query blocks (the whole GQA group is in the rows)
    fullrow = lambda w: pl.BlockSpec((None, None, rq, w), lambda b, h, j: (b, h, 0, 0))
    in_specs = [_rng_spec(cfg), fullrow(d), _kv_spec(cfg, cfg.bk, d, True), _kv_spec(cfg, cfg.bk, d, True),
                fullrow(d), fullrow(1), fullrow(1)]
    in_specs += [pl.BlockSpec((None, rq, 1), lambda b, h, j: (b, 0, 0)) for _ in names]
    in_specs += [pl.BlockSpec((None, 1, cfg.bk), lambda b, h, j: (b, 0, j)) for _ in names]
    dk, dv = _call(functools.partial(_dkv_kernel, cfg=cfg, names=names), cfg, (b, kvh, nk), in_specs,
                   [_kv_spec(cfg, cfg.bk, d, True)] * 2,
                   [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
                   "omni_flash_dkv", _cost(cfg, b, kvh, rq, tk, d, 4, [q, k, v, do, k, v], cfg.group))(
        rng_k, q, k, v, do, lse, delta, *qm, *km)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash_core(cfg, q, k, v, meta_q, meta_k, rng_f, rng_q, rng_k):
    """``rng_f``: the forward's per-query-block key ranges; ``rng_q``/``rng_k``: the backward's
    (its blocks may differ: ``cfg.bwd``)."""
    o, lse = _fwd(cfg, q, k, v, meta_q, meta_k, rng_f)
    return o[:, :, 0], lse[:, :, 0]


def _flash_core_fwd(cfg, q, k, v, meta_q, meta_k, rng_f, rng_q, rng_k):
    o, lse = _flash_core(cfg, q, k, v, meta_q, meta_k, rng_f, rng_q, rng_k)
    return (o, lse), (q, k, v, o, lse, meta_q, meta_k, rng_q, rng_k)


def _flash_core_bwd(cfg, res, cts):
    q, k, v, o, lse, meta_q, meta_k, rng_q, rng_k = res
    do = cts[0].astype(q.dtype)  # the lse output is only compared, never differentiated
    delta = jnp.sum(cts[0].astype(jnp.float32) * o.astype(jnp.float32), -1, keepdims=True)
    lse = jnp.where(lse <= EMPTY / 2, 0.0, lse)  # empty rows: every p is masked to 0 anyway
    if cfg.exp2:
        lse = lse * LOG2E  # the kernels exponentiate in base 2
    dq, dk, dv = _bwd(cfg.for_bwd(), q, k, v, do, lse, delta, meta_q, meta_k, rng_q, rng_k)
    return dq, dk, dv, None, None, None, None, None


_flash_core.defvjp(_flash_core_fwd, _flash_core_bwd)


# --------------------------------------------------------------------------- public wrappers


def _pow2(n):
    return 1 << max(0, int(n - 1).bit_length())


def _choose(n, pref, lo):
    """Block size: ``pref`` (shrunk to a power of two >= n for short inputs, not below ``lo``)."""
    return max(lo, min(pref, _pow2(n)))


def _defaults(platform, d, dtype):
    """Per-platform tiles. GPU bfloat16 figures are from the H100 sweep in ``bench/attention.py``
    (8k causal prefill, 16 heads / 2 KV heads, head dim 128; ``bench/results/h100_attention.json``):
    256-row query blocks, 64-key blocks, 8 warps, 3 pipeline stages forward; the backward keeps
    128 x 64 (its dQ / dK,dV accumulators double the register load)."""
    if platform == "gpu":
        if dtype == jnp.float32:  # float32 tiles take twice the registers
            return dict(bq=64, bk=32, min_block=16, num_warps=4, num_stages=2, exp2=True, bwd=None)
        return dict(bq=256, bk=64, min_block=16, num_warps=8, num_stages=3, exp2=True, bwd=(128, 64, 8, 2),
                    min_programs=264)
    if platform == "tpu":
        return dict(bq=128, bk=128, min_block=8, num_warps=4, num_stages=2, exp2=False, bwd=None)
    return dict(bq=64, bk=64, min_block=8, num_warps=4, num_stages=2, exp2=True, bwd=None)


def _f32_precision(platform, dtype):
    """Triton input precision for float32 dots, following ``jax.default_matmul_precision``:
    3-pass TF32 (about float32 accuracy, on the tensor cores) under "highest"/"float32", one-pass
    TF32 otherwise (XLA's own default for float32 matmuls on the GPU). Plain IEEE float32 dots
    lower to FMA loops in Triton: slow to compile at useful tile sizes and slow to run."""
    if platform != "gpu" or dtype != jnp.float32:
        return None
    from jax._src import config as jcfg

    val = jcfg.default_matmul_precision.value
    val = str(getattr(val, "name", val)).lower() if val is not None else "default"
    return "tf32x3" if val in ("highest", "float32", "f32_f32_f32", "tensorfloat32x3") else "tf32"


# the most scoped VMEM the TPU kernels ask for (v5e, v6e and v5p cores have 128 / 128 / 95 MiB)
TPU_VMEM_CAP = 90 << 20


def tpu_vmem_bytes(tk: int, d: int, itemsize: int, rq: int = 0, n_meta: int = 3) -> int:
    """VMEM a TPU kernel call holds, conservatively: K and V of one (batch, KV head) whole and double
    buffered with the head dim padded to 128 lanes, the per-key metadata rows (``[1, Tk]`` int32
    blocks padded to 8 sublanes), and for the dK/dV kernel the whole query rows (q, dO and their
    float32 statistics). The default scoped limit (16 MiB on v5e, 32 MiB on v6e) is below what a
    32k-slot cache needs; the kernels raise it to this (:data:`TPU_VMEM_CAP` at most)."""
    lanes = -(-d // 128) * 128
    kv = 4 * tk * lanes * itemsize + 2 * n_meta * 8 * tk * 4
    rows = 2 * rq * (2 * lanes * itemsize + 2 * 128 * 4) if rq else 0
    return kv + rows


def _prepare(q, k, v, mask, scale, platform, block_q, block_k, splits_for_decode, num_warps=None,
             num_stages=None, exp2=None, splits=None):
    b, tq, h, d = q.shape
    tk, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    scale = d ** -0.5 if scale is None else float(scale)
    dflt = _defaults(platform, d, q.dtype)
    rq = tq * g
    bq = block_q or _choose(rq, dflt["bq"], dflt["min_block"])
    if not block_q and "min_programs" in dflt:  # short inputs: smaller query blocks, more programs
        while bq > 128 and b * kvh * -(-rq // bq) < dflt["min_programs"]:
            bq //= 2
    bk = block_k or _choose(tk, dflt["bk"], dflt["min_block"])
    bwd = None
    if dflt["bwd"] is not None and not (block_q or block_k or num_warps or num_stages):
        bbq, bbk, bw, bs = dflt["bwd"]
        bwd = (min(bbq, bq), min(bbk, bk), bw, bs)  # powers of two <= the forward's: they divide the padding
    rq_pad = -(-rq // bq) * bq
    tk_pad = -(-tk // bk) * bk
    dp = max(16, _pow2(d)) if platform == "gpu" else d
    nk = tk_pad // bk
    if splits_for_decode and splits:
        splits = int(max(1, min(nk, splits)))
    elif splits_for_decode:
        if platform == "gpu":
            want = -(-264 // (b * kvh * (rq_pad // bq)))
        else:
            want = 2
        splits = int(max(1, min(nk, want)))
    else:
        splits = 1
    band = None
    band_size = 1
    if mask.block_band is not None:
        band_size, back, ahead = mask.block_band
        band = (int(back), int(ahead))
    cfg = Cfg(causal=bool(mask.causal), band=band, scale=scale, bq=bq, bk=bk, platform=platform,
              splits=splits, num_warps=num_warps or dflt["num_warps"],
              num_stages=num_stages or dflt["num_stages"], exp2=dflt["exp2"] if exp2 is None else bool(exp2),
              precision=_f32_precision(platform, q.dtype), bwd=bwd, band_size=int(band_size) if band else 0,
              group=g, vmem_limit=_vmem_limit(platform, tk_pad, d, q.dtype.itemsize, rq_pad))
    meta = build_meta(mask, b, tq, tk, g, rq_pad, tk_pad, band_size)
    rng_q, rng_k = _block_ranges(meta, cfg)
    if bwd is not None:
        rng_q = (rng_q,) + _block_ranges(meta, cfg.for_bwd())  # (forward, backward rows, backward keys)
    # rows: [B, Tq, KVH, G, D] -> [B, KVH, Tq*G, D]
    qr = q.reshape(b, tq, kvh, g, d).transpose(0, 2, 1, 3, 4).reshape(b, kvh, rq, d)
    qr = _pad_to(_pad_to(qr, rq_pad, 2), dp, 3)
    kk = _pad_to(_pad_to(k, tk_pad, 1), dp, 3)
    vv = _pad_to(_pad_to(v, tk_pad, 1), dp, 3)
    if platform == "tpu":
        kk, vv = kk.transpose(0, 2, 1, 3), vv.transpose(0, 2, 1, 3)
    return cfg, meta, rng_q, rng_k, qr, kk, vv


def _vmem_limit(platform, tk, d, itemsize, rq) -> int:
    """The scoped VMEM limit of a TPU call (0 elsewhere, or where the default 16 MiB suffices)."""
    if platform != "tpu":
        return 0
    need = tpu_vmem_bytes(tk, d, itemsize, rq) + (4 << 20)  # the q/o blocks and Mosaic's own scratch
    return 0 if need <= (16 << 20) else int(min(need, TPU_VMEM_CAP))


def _finish(o_rows, lse, q, v, mask):
    """Rows back to [B, Tq, H, D]; rows with no visible key get the XLA path's value."""
    b, tq, h, d = q.shape
    tk, kvh = v.shape[1], v.shape[2]
    g = h // kvh
    o = o_rows[:, :, : tq * g, :d].reshape(b, kvh, tq, g, d).transpose(0, 2, 1, 3, 4)
    empty = (lse[:, :, : tq * g, 0] <= EMPTY / 2).reshape(b, kvh, tq, g).transpose(0, 2, 1, 3)

    def fill(o):
        w = jnp.asarray(1.0 / tk, jnp.float32).astype(v.dtype).astype(jnp.float32)
        mean_v = (jnp.sum(v.astype(jnp.float32), axis=1) * w).astype(o.dtype)  # [B, KVH, D]
        return jnp.where(empty[..., None], mean_v[:, None, :, None, :], o)

    if any(x is not None for x in (mask.kv_valid, mask.q_segment_ids, mask.kv_segment_ids,
                                   mask.block_band)) or mask.causal:
        o = lax.cond(jnp.any(empty), fill, lambda o: o, o)
    return o.reshape(b, tq, h, d).astype(q.dtype)


def flash_attention(q, k, v, mask, *, scale=None, platform=None, block_q=None, block_k=None, num_warps=None,
                    num_stages=None, exp2=None):
    """Blockwise attention with a structural mask; differentiable (custom_vjp).

    Same contract as :func:`omni_jax.attention_xla.xla_attention`. ``block_q`` counts query *rows*
    (tokens x GQA group); block sizes and the Triton ``num_warps``/``num_stages`` default per
    platform (:func:`_defaults`).
    """
    platform = platform or current_platform()
    cfg, meta, rng_q, rng_k, qr, kk, vv = _prepare(q, k, v, mask, scale, platform, block_q, block_k, False,
                                                   num_warps, num_stages, exp2)
    rng_f, rng_bq, rng_bk = rng_q if cfg.bwd is not None else (rng_q, rng_q, rng_k)
    o, lse = _flash_core(cfg, qr, kk, vv, meta.q, meta.k, rng_f, rng_bq, rng_bk)
    return _finish(o, lse, q, v, mask)


def _decode_impl(q, k, v, mask, scale, platform, block_k, splits=None):
    cfg, meta, rng_q, _, qr, kk, vv = _prepare(q, k, v, mask, scale, platform, None, block_k, True, splits=splits)
    if cfg.bwd is not None:
        rng_q = rng_q[0]
    o, lse = _fwd(cfg, qr, kk, vv, meta.q, meta.k, rng_q)  # [B, KVH, S, R, D], [B, KVH, S, R, 1]
    if cfg.splits > 1:  # merge the key-axis splits by their log-sum-exps
        mx = jnp.max(lse, axis=2, keepdims=True)
        w = jnp.exp(lse - mx)
        wsum = jnp.sum(w, axis=2)
        o = jnp.sum(w * o.astype(jnp.float32), axis=2) / jnp.where(wsum == 0, 1.0, wsum)
        lse = jnp.where(mx[:, :, 0] <= EMPTY / 2, EMPTY, mx[:, :, 0] + jnp.log(jnp.where(wsum == 0, 1.0, wsum)))
    else:
        o, lse = o[:, :, 0], lse[:, :, 0]
    return _finish(o, lse, q, v, mask)


def decode_attention(q, k, v, mask, *, scale=None, platform=None, block_k=None, splits=None):
    """One new query per sequence (``q [B, 1, H, D]``) against the cache ``k, v [B, S, KVH, D]``.

    Split-K ("flash decoding"): the key axis is cut into splits run as separate programs and
    merged by log-sum-exp; key blocks past each sequence's last visible key are never read.
    Differentiable through the XLA reference (decode is an inference path).
    """
    platform = platform or current_platform()
    fields = tuple(f.name for f in dataclasses.fields(mask) if f.name not in ("causal", "block_band"))
    arrays = tuple(getattr(mask, n) for n in fields)

    def rebuild(arrs):
        return dataclasses.replace(mask, **dict(zip(fields, arrs)))

    @jax.custom_vjp
    def f(q, k, v, arrs):
        return _decode_impl(q, k, v, rebuild(arrs), scale, platform, block_k, splits)

    def f_fwd(q, k, v, arrs):
        return f(q, k, v, arrs), (q, k, v, arrs)

    def f_bwd(res, ct):
        q, k, v, arrs = res
        grads = jax.vjp(lambda q, k, v: xla_attention(q, k, v, rebuild(arrs), scale), q, k, v)[1](ct)
        return (*grads, tuple(None for _ in arrs))

    f.defvjp(f_fwd, f_bwd)
    return f(q, k, v, arrays)
