"""Pallas attention kernels (interpret mode on CPU) against the XLA reference.

Every case compares ``omni_jax.kernels`` with :func:`omni_jax.attention_xla.xla_attention` on
random inputs: float32 forward within 1e-5 relative L2, gradients within 1e-4, bf16 looser.
Shapes are small (interpret mode compiles each kernel as plain XLA) but always cover several
query and key blocks, lengths that are not block multiples, GQA, and fully masked query rows.
The TPU (Mosaic) and GPU (Triton) lowerings are checked by cross-platform lowering from CPU.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omni_jax.attention import MaskSpec, attention, xla_attention
from omni_jax import kernels
from omni_jax.kernels import flash

jax.config.update("jax_default_matmul_precision", "highest")


def rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def qkv(seed, b, tq, tk, h, kvh, d, dtype=jnp.float32):
    r = np.random.default_rng(seed)
    mk = lambda *s: jnp.asarray(r.standard_normal(s), jnp.float32).astype(dtype)
    return mk(b, tq, h, d), mk(b, tk, kvh, d), mk(b, tk, kvh, d)


def left_pad_valid(s, pads):
    return jnp.arange(s)[None, :] >= jnp.asarray(pads)[:, None]


# name -> (shapes (b, tq, tk, h, kvh, d), mask builder, blocks (bq rows, bk))
def _case(name):
    if name == "causal_gqa":  # self-attention prefill, 37 tokens, blocks of 16
        return (2, 37, 37, 4, 2, 16), lambda: MaskSpec(causal=True), (16, 16)
    if name == "cache_left_pad":  # a 5-token chunk written at slots 11..15 of a 32-slot cache
        pads = [0, 13]  # row 1: queries at slots 11, 12 see no key (fully masked rows)
        valid = left_pad_valid(32, pads) & (jnp.arange(32)[None] < 16)
        return (2, 5, 32, 4, 1, 32), lambda: MaskSpec(causal=True, q_slots=11 + jnp.arange(5), kv_valid=valid), (8, 8)
    if name == "segments_d80":  # vision windows of uneven length, MHA, head dim 80
        seg = jnp.asarray(np.repeat([0, 1, 2, 3], [7, 16, 3, 19]))[None]
        return (1, 45, 45, 2, 2, 80), lambda: MaskSpec(q_segment_ids=seg, kv_segment_ids=seg), (8, 8)
    if name == "band_valid_d64":  # DiT block band (block 4, one back, none ahead) + key padding
        valid = jnp.arange(50)[None] < jnp.asarray([[50], [41]])
        return (2, 50, 50, 2, 2, 64), lambda: MaskSpec(block_band=(4, 1, 0), kv_valid=valid), (16, 8)
    if name == "cross_nomask":  # no mask at all, Tq != Tk
        return (1, 20, 33, 4, 4, 16), lambda: MaskSpec(), (8, 16)
    raise KeyError(name)


@pytest.mark.parametrize("name", ["causal_gqa", "cache_left_pad", "segments_d80", "band_valid_d64", "cross_nomask"])
def test_forward_f32(name):
    (b, tq, tk, h, kvh, d), mk_mask, (bq, bk) = _case(name)
    q, k, v = qkv(1, b, tq, tk, h, kvh, d)
    mask = mk_mask()
    ref = xla_attention(q, k, v, mask)
    got = jax.jit(lambda q, k, v: flash.flash_attention(q, k, v, mask, block_q=bq, block_k=bk))(q, k, v)
    assert np.all(np.isfinite(np.asarray(got)))
    assert rel(got, ref) <= 1e-5, rel(got, ref)


def test_forward_bf16_through_interface():
    """bf16, causal with left padding, through ``attention(impl="pallas")`` and default blocks."""
    q, k, v = qkv(2, 2, 70, 70, 4, 2, 32, jnp.bfloat16)
    mask = MaskSpec(causal=True, kv_valid=left_pad_valid(70, [0, 9]))
    ref = xla_attention(q, k, v, mask)
    got = jax.jit(lambda q, k, v: attention(q, k, v, mask, impl="pallas"))(q, k, v)
    assert got.dtype == jnp.bfloat16
    assert rel(got, ref) <= 2e-2, rel(got, ref)
    # padding queries (no visible key) equal the XLA path's uniform average of V
    np.testing.assert_allclose(np.asarray(got[1, :9], np.float32), np.asarray(ref[1, :9], np.float32),
                               rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("name", ["cache_left_pad", "band_valid_d64"])
def test_gradients(name):
    (b, tq, tk, h, kvh, d), mk_mask, (bq, bk) = _case(name)
    q, k, v = qkv(3, b, tq, tk, h, kvh, d)
    mask = mk_mask()
    if name == "band_valid_d64":  # add segment ids on top of the band
        seg = jnp.asarray(np.repeat([0, 1], [30, 20]))[None]
        mask = MaskSpec(block_band=mask.block_band, kv_valid=mask.kv_valid, q_segment_ids=seg, kv_segment_ids=seg)
    w = jnp.asarray(np.random.default_rng(4).standard_normal((b, tq, h, d)), jnp.float32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * w)

    ref = jax.grad(loss(lambda q, k, v: xla_attention(q, k, v, mask)), (0, 1, 2))(q, k, v)
    got = jax.jit(jax.grad(loss(lambda q, k, v: flash.flash_attention(q, k, v, mask, block_q=bq, block_k=bk)),
                           (0, 1, 2)))(q, k, v)
    for n, g, r in zip("qkv", got, ref):
        assert rel(g, r) <= 1e-4, (n, rel(g, r))


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_decode(dtype, tol):
    """One query per sequence against a 40-slot cache; lengths 40, 7, 1; GQA 4:1; split-K."""
    b, s, h, kvh, d = 3, 40, 8, 2, 32
    q, k, v = qkv(5, b, 1, s, h, kvh, d, dtype)
    lens = jnp.asarray([40, 7, 1])
    mask = MaskSpec(causal=True, q_slots=(lens - 1)[:, None], kv_valid=jnp.arange(s)[None] < lens[:, None])
    ref = xla_attention(q, k, v, mask)
    got = jax.jit(lambda q, k, v: kernels.attention(q, k, v, mask))(q, k, v)  # Tq == 1 -> decode kernel
    cfg = flash._prepare(q, k, v, mask, None, "interpret", None, 8, True)[0]
    assert cfg.splits > 1  # the split-K merge is exercised
    assert rel(got, ref) <= tol, rel(got, ref)
    got8 = jax.jit(lambda q, k, v: flash.decode_attention(q, k, v, mask, block_k=8))(q, k, v)
    assert rel(got8, ref) <= tol, rel(got8, ref)


def test_block_skipping_ranges():
    """Causal and band structure skip whole key blocks; the unmasked middle range is exact."""
    b, t, g = 1, 64, 1
    causal = MaskSpec(causal=True)
    cfg = flash.Cfg(causal=True, band=None, scale=1.0, bq=16, bk=16, platform="interpret")
    meta = flash.build_meta(causal, b, t, t, g, t, t, 1)
    rq, rk = flash._block_ranges(meta, cfg)
    # query block i sees key blocks [0, i]; blocks [0, i) need no mask, block i is diagonal
    # (no unmasked block: the unmasked range is empty, at hi)
    np.testing.assert_array_equal(np.asarray(rq[0]), [[0, 1, 1, 1]] + [[0, i + 1, 0, i] for i in range(1, 4)])
    np.testing.assert_array_equal(np.asarray(rk[0])[:, :2], [[j, 4] for j in range(4)])
    band = MaskSpec(block_band=(16, 1, 0))
    cfg = flash.Cfg(causal=False, band=(1, 0), scale=1.0, bq=16, bk=16, platform="interpret")
    rq, _ = flash._block_ranges(flash.build_meta(band, b, t, t, g, t, t, 16), cfg)
    np.testing.assert_array_equal(np.asarray(rq[0]), [[0, 1, 0, 1], [0, 2, 0, 2], [1, 3, 1, 3], [2, 4, 2, 4]])


def test_fallback_logs_once(caplog):
    q, k, v = qkv(6, 1, 6, 6, 2, 2, 16)
    mask = MaskSpec(causal=True)
    kernels._warned.clear()
    with caplog.at_level(logging.WARNING, logger="omni_jax"):
        a = kernels.attention(q, k.astype(jnp.bfloat16), v, mask)  # mixed dtypes: no kernel
        b = kernels.attention(q, k.astype(jnp.bfloat16), v, mask)
    assert sum("falling back to XLA" in r.message for r in caplog.records) == 1
    np.testing.assert_allclose(np.asarray(a), np.asarray(xla_attention(q, k.astype(jnp.bfloat16), v, mask)))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("platform,target,marker", [("tpu", "tpu", "tpu_custom_call"),
                                                     ("gpu", "cuda", "triton")])
def test_cross_platform_lowering(platform, target, marker):
    """The Mosaic (TPU) and Triton (GPU) lowerings of forward, backward and decode build from CPU.

    This checks tracing and lowering to each backend's kernel IR; compiling that IR needs the
    device itself."""
    b, t, h, kvh, d = 1, 256, 4, 2, 128
    q = jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((b, t, kvh, d), jnp.bfloat16)
    valid = jax.ShapeDtypeStruct((b, t), jnp.bool_)

    def fwd_bwd(q, k, v, valid):
        mask = MaskSpec(causal=True, kv_valid=valid)
        f = lambda q, k, v: flash.flash_attention(q, k, v, mask, platform=platform).astype(jnp.float32).sum()
        return jax.value_and_grad(f, (0, 1, 2))(q, k, v)

    def dec(q, k, v, valid):
        mask = MaskSpec(causal=True, q_slots=jnp.full((b, 1), t - 1), kv_valid=valid)
        return flash.decode_attention(q[:, :1], k, v, mask, platform=platform)

    for fn, n in [(fwd_bwd, 3), (dec, 1)]:
        txt = jax.jit(fn).trace(q, kv, kv, valid).lower(lowering_platforms=(target,)).as_text()
        assert txt.count(marker) >= n, (fn.__name__, txt.count(marker))


def test_separate_backward_blocks(monkeypatch):
    """The GPU configuration: larger forward query blocks than the backward's (``Cfg.bwd``), with
    the block-size shrink for short inputs; checked here in interpret mode with small blocks."""
    def small_gpu_like(platform, d, dtype):
        return dict(bq=32, bk=16, min_block=8, num_warps=4, num_stages=2, exp2=True, bwd=(16, 8, 4, 2),
                    min_programs=2)

    monkeypatch.setattr(flash, "_defaults", small_gpu_like)
    b, t, h, kvh, d = 2, 45, 4, 2, 16
    q, k, v = qkv(7, b, t, t, h, kvh, d)
    seg = jnp.asarray(np.repeat([0, 1], [20, 25]))[None]
    mask = MaskSpec(causal=True, kv_valid=left_pad_valid(t, [0, 6]), q_segment_ids=seg, kv_segment_ids=seg)
    cfg = flash._prepare(q, k, v, mask, None, "interpret", None, None, False)[0]
    assert (cfg.bq, cfg.bk, cfg.bwd[:2]) == (32, 16, (16, 8))
    w = jnp.asarray(np.random.default_rng(8).standard_normal((b, t, h, d)), jnp.float32)
    loss = lambda fn: (lambda q, k, v: jnp.sum(fn(q, k, v) * w))
    ref_o = xla_attention(q, k, v, mask)
    ref = jax.grad(loss(lambda q, k, v: xla_attention(q, k, v, mask)), (0, 1, 2))(q, k, v)
    got_o = jax.jit(lambda q, k, v: flash.flash_attention(q, k, v, mask))(q, k, v)
    got = jax.jit(jax.grad(loss(lambda q, k, v: flash.flash_attention(q, k, v, mask)), (0, 1, 2)))(q, k, v)
    assert rel(got_o, ref_o) <= 1e-5
    for n, g, r in zip("qkv", got, ref):
        assert rel(g, r) <= 1e-4, (n, rel(g, r))


def test_default_impl(monkeypatch):
    from omni_jax.attention import default_impl

    monkeypatch.delenv("OMNI_JAX_ATTENTION", raising=False)
    assert default_impl() == ("xla" if jax.default_backend() == "cpu" else "pallas")
    monkeypatch.setenv("OMNI_JAX_ATTENTION", "pallas")
    assert default_impl() == "pallas"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.delenv("OMNI_JAX_ATTENTION")
    assert default_impl() == "pallas"
    monkeypatch.setenv("OMNI_JAX_ATTENTION", "xla")
    assert default_impl() == "xla"


def test_the_interface_reexports_the_xla_implementation():
    """``omni_jax.attention`` serves the mask type and the XLA implementation defined in
    ``omni_jax.attention_xla`` (the same objects, so either import path behaves the same)."""
    from omni_jax import attention as interface
    from omni_jax import attention_xla

    for name in ("MaskSpec", "build_mask", "xla_attention", "xla_band_attention", "dense_attention", "SCORE_BUDGET"):
        assert getattr(interface, name) is getattr(attention_xla, name), name
    assert kernels.xla_attention is flash.xla_attention is attention_xla.xla_attention


def test_gpu_decode_routes_to_xla(caplog, monkeypatch):
    """One-query attention on a GPU goes to XLA attention (measured faster there), logged once."""
    monkeypatch.delenv("OMNI_JAX_PALLAS_DECODE", raising=False)
    b, s, h, kvh, d = 2, 24, 4, 2, 16
    q, k, v = qkv(9, b, 1, s, h, kvh, d)
    lens = jnp.asarray([24, 5])
    mask = MaskSpec(causal=True, q_slots=(lens - 1)[:, None], kv_valid=jnp.arange(s)[None] < lens[:, None])
    kernels._warned.clear()
    with caplog.at_level(logging.INFO, logger="omni_jax"):
        a = kernels.attention(q, k, v, mask, platform="gpu")
        kernels.attention(q, k, v, mask, platform="gpu")
    assert sum("decode" in r.message for r in caplog.records) == 1
    np.testing.assert_array_equal(np.asarray(a), np.asarray(xla_attention(q, k, v, mask)))


@pytest.mark.parametrize("band", [(1, 0), (0, 1), (1, 1), (0, 0), (2, 1)])
def test_xla_band_attention_equals_dense(band):
    """The XLA path computes a block band block by block (O(T * band) scores); it equals the dense
    masked formulation, with GQA, a length that is not a block multiple, key padding, a row whose
    padding leaves whole bands without a visible key (dense: the average of all values) and
    bfloat16 inputs."""
    from omni_jax.attention_xla import dense_attention, xla_band_attention

    t, bs = 53, 6
    q, k, v = qkv(7, 2, t, t, 4, 2, 16)
    valid = jnp.arange(t)[None] < jnp.asarray([[t], [29]])  # row 1: blocks 6.. see no valid key
    for kv_valid in (None, valid):
        mask = MaskSpec(block_band=(bs, *band), kv_valid=kv_valid)
        ref = dense_attention(q, k, v, mask)
        got = jax.jit(lambda q, k, v: xla_band_attention(q, k, v, mask))(q, k, v)
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-6)
        # the dispatcher takes the band path here and the dense one when the band covers the sequence
        np.testing.assert_array_equal(np.asarray(jax.jit(lambda q, k, v: xla_attention(q, k, v, mask))(q, k, v)),
                                      np.asarray(got))
    empty_rows = np.asarray(ref)[1, (28 // bs + band[0] + 1) * bs:]  # bands past the last valid key
    assert empty_rows.shape[0] >= bs  # padding queries with no visible key: the uniform average of all values
    np.testing.assert_allclose(empty_rows, np.broadcast_to(np.asarray(v)[1].mean(0).repeat(2, 0), empty_rows.shape),
                               rtol=1e-5, atol=1e-6)
    qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
    mask = MaskSpec(block_band=(bs, *band), kv_valid=valid)
    assert rel(xla_band_attention(qb, kb, vb, mask), dense_attention(qb, kb, vb, mask)) <= 1e-2


@pytest.mark.parametrize("name", ["causal_gqa", "cache_left_pad", "segments_d80", "band_valid_d64", "cross_nomask"])
def test_dense_attention_in_query_chunks(name, monkeypatch):
    """Past ``SCORE_BUDGET`` score elements the dense path runs in query chunks (a long prefill on
    CPU would otherwise materialise all T x T scores at once): same outputs as one whole call (and
    gradients, for two of the masks), with a chunk that does not divide the query count."""
    from omni_jax import attention_xla as A

    (b, tq, tk, h, kvh, d), mk_mask, _ = _case(name)
    q, k, v = qkv(3, b, tq, tk, h, kvh, d)
    mask = mk_mask()

    def run(q, k, v):
        return A.dense_attention(q, k, v, mask)

    def loss(q, k, v):
        return jnp.sum(jnp.sin(run(q, k, v)))

    grads = name in ("causal_gqa", "segments_d80")  # gradients on two masks (compiles are the cost)
    whole = run(q, k, v)
    gw = jax.grad(loss, argnums=(0, 1, 2))(q, k, v) if grads else ()
    monkeypatch.setattr(A, "SCORE_BUDGET", b * h * tk * 4)  # 4-query chunks
    jaxpr = str(jax.make_jaxpr(run)(q, k, v))
    assert "scan" in jaxpr or "while" in jaxpr  # it did chunk
    chunked = jax.jit(run)(q, k, v)
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(whole), rtol=1e-6, atol=1e-6)
    gc = jax.grad(loss, argnums=(0, 1, 2))(q, k, v) if grads else ()
    for a, c in zip(gc, gw):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-5, atol=1e-6)


def test_xla_band_attention_with_segments_equals_windows():
    """Vision windows: contiguous segments of at most ``bs`` tokens, attended with segment ids and a
    (1, 1) block band of ``bs`` (which contains every window). The block-by-block path equals the dense
    formulation of the same mask everywhere, and the plain segment mask (no band) on every real token
    (padding tokens, segment -1 in a run longer than a block, may differ in their own rows only)."""
    from omni_jax.attention_xla import dense_attention, xla_band_attention

    bs = 8
    lens = [8, 3, 5, 8, 1, 7, 6, 2, 8]  # uneven windows, as at an image's right and bottom edges
    seg = np.concatenate([np.full(n, i) for i, n in enumerate(lens)] + [np.full(13, -1)])  # + padding
    t = len(seg)
    q, k, v = qkv(11, 1, t, t, 4, 2, 16)
    segj = jnp.asarray(seg)[None]
    banded = MaskSpec(q_segment_ids=segj, kv_segment_ids=segj, block_band=(bs, 1, 1))
    got = jax.jit(lambda q, k, v: xla_attention(q, k, v, banded))(q, k, v)
    np.testing.assert_allclose(np.asarray(got), np.asarray(xla_band_attention(q, k, v, banded)), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got), np.asarray(dense_attention(q, k, v, banded)), rtol=1e-5, atol=1e-6)
    plain = dense_attention(q, k, v, MaskSpec(q_segment_ids=segj, kv_segment_ids=segj))
    real = seg >= 0
    np.testing.assert_allclose(np.asarray(got)[:, real], np.asarray(plain)[:, real], rtol=1e-5, atol=1e-6)
