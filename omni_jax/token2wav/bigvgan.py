"""The BigVGAN vocoder (``Qwen2_5OmniToken2WavBigVGANModel``): mel ``[B, T, mel_dim]`` -> 24 kHz waveform.

Reference semantics kept exactly: ``exp`` -> amplitude-to-dB (floor -115 dB) - 20 dB ->
clamp-normalise to [-1, 1] (:func:`process_mel`); transposed-convolution upsampling, AMP residual
blocks of anti-aliased SnakeBeta (2x up, activation, 2x down, Kaiser-sinc filters of 12 taps,
replicate padding); output clamped to [-1, 1]. Float32; convolution weights in torch's layout. The
anti-aliasing filters are not parameters: they are rebuilt from the config (:func:`kaiser_sinc_filter`).

``lengths`` gives each row's valid mel frames when rows are padded to a common (bucketed) length:
before every operation that looks along time the padding is replaced by what that operation's own
padding would read at the end of an exact-length input, so a row's samples equal the vocoder on
that row alone and one compiled program serves every length in a bucket. The program is
:func:`_bigvgan_jit`, a module-level function of the split vocoder (static structure, leaves) and the
inputs; :func:`bigvgan` validates the inputs and calls it at :data:`MATMUL_PRECISION`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..config import BigVGANConfig
from ..errors import CheckpointError, InputError
from ..sharding import constrain
from .conv import Conv1d, ConvTranspose1d
from .split import MATMUL_PRECISION, Split, presplit

_F32 = jnp.float32


@functools.lru_cache(maxsize=None)
def kaiser_sinc_filter(cutoff: float, half_width: float, kernel_size: int) -> np.ndarray:
    """The Kaiser-windowed sinc low-pass filter of the reference (``[kernel_size]`` float32)."""
    even = kernel_size % 2 == 0
    half = kernel_size // 2
    delta_f = 4 * half_width
    att = 2.285 * (half - 1) * math.pi * delta_f + 7.95
    if att > 50.0:
        beta = 0.1102 * (att - 8.7)
    elif att >= 21.0:
        beta = 0.5842 * (att - 21) ** 0.4 + 0.07886 * (att - 21.0)
    else:
        beta = 0.0
    window = np.kaiser(kernel_size, beta)
    t = (np.arange(-half, half) + 0.5) if even else (np.arange(kernel_size) - half)
    if cutoff == 0:
        f = np.zeros(kernel_size, np.float32)
        f.setflags(write=False)
        return f
    f = 2 * cutoff * window * np.sinc(2 * cutoff * t)
    f = (f / f.sum()).astype(np.float32)
    f.setflags(write=False)  # cached: shared by every caller
    return f


def upsample2(x, kernel_size=12, ratio=2):
    """The reference's anti-aliased upsampling ``[B, L, C] -> [B, ratio * L, C]``.

    The reference replicate-pads by ``k // ratio - 1``, runs a depthwise transposed conv with
    the Kaiser-sinc filter ``f``, scales by ``ratio`` and crops. Here each output phase ``s``
    is its own ``k / ratio``-tap filter over the padded input (polyphase form: no products
    with the zeros a strided transposed conv inserts), as shifted multiply-adds that XLA
    fuses into one pass.
    """
    k = kernel_size
    f = kaiser_sinc_filter(0.5 / ratio, 0.6 / ratio, k)
    pad = k // ratio - 1
    crop_l = pad * ratio + (k - ratio) // 2
    n = x.shape[1]
    xp = jnp.pad(x, ((0, 0), (pad, pad), (0, 0)), mode="edge")
    phases = []
    for s in range(ratio):
        # output ratio*p + s is z[j], j = ratio*p + s + crop_l, z[ratio*m + r] = sum_q xp[m - q] f[ratio*q + r]
        m0, r = divmod(s + crop_l, ratio)
        acc = 0
        for q in range((k - r + ratio - 1) // ratio):
            acc = acc + float(f[ratio * q + r]) * xp[:, m0 - q:m0 - q + n]
        phases.append(ratio * acc)
    return jnp.stack(phases, axis=2).reshape(x.shape[0], ratio * n, x.shape[2])


def downsample2(x, kernel_size=12, ratio=2):
    """The reference's anti-aliased downsampling: replicate pad, strided Kaiser-sinc filter
    (as ``k`` strided multiply-adds)."""
    k = kernel_size
    f = kaiser_sinc_filter(0.5 / ratio, 0.6 / ratio, k)
    even = k % 2 == 0
    xp = jnp.pad(x, ((0, 0), (k // 2 - int(even), k // 2), (0, 0)), mode="edge")
    n_out = (xp.shape[1] - k) // ratio + 1
    acc = 0
    for j in range(k):
        acc = acc + float(f[j]) * xp[:, j:j + ratio * (n_out - 1) + 1:ratio]
    return acc


# sin^2 for SnakeBeta. XLA:CPU's float32 sin is scalar code (~4.5 ns per element per core): at the
# published widths BigVGAN evaluates it on ~160 M upsampled samples per second of audio, about a third of
# the vocoder's time on CPU. sin^2 has period pi, so the sign of the reduction does not matter: reduce by
# pi in four float32 parts (Cody-Waite; the first three have 8 significant bits, so k * part is exact for
# |x| < 2^16 * pi) and evaluate the odd Taylor polynomial to x^13 on [-pi/2, pi/2] (truncation error
# < 7e-10). Plain multiply-adds that vectorise: 24x faster on this CPU, max abs error 2.5e-7 against
# float64 (jnp.sin: 9e-8).
_PI_PARTS = (np.float32(3.140625), np.float32(0.00096893310546875), np.float32(-1.2814998626708984e-06),
             np.float32(1.984187258941006e-09))


_SIN_COEFFS = tuple(np.float32(c) for c in (-1 / 6, 1 / 120, -1 / 5040, 1 / 362880, -1 / 39916800,
                                            1 / 6227020800))


def sin_squared(x):
    """``sin(x) ** 2`` in float32 by range reduction and a polynomial (see the notes above)."""
    k = jnp.round(x * np.float32(1 / np.pi))
    r = (((x - k * _PI_PARTS[0]) - k * _PI_PARTS[1]) - k * _PI_PARTS[2]) - k * _PI_PARTS[3]
    r2 = r * r
    p = _SIN_COEFFS[-1]
    for c in reversed(_SIN_COEFFS[:-1]):
        p = p * r2 + c
    s = r + r * r2 * p
    return s * s


class SnakeBeta(nnx.Module):
    """``x + 1 / (exp(beta) + 1e-9) * sin(x * exp(alpha)) ** 2`` (log-scale alpha, beta per channel)."""

    def __init__(self, channels):
        self.alpha = nnx.Param(jnp.zeros((channels,), _F32))
        self.beta = nnx.Param(jnp.zeros((channels,), _F32))

    def __call__(self, x):
        alpha = jnp.exp(self.alpha[...])
        beta = jnp.exp(self.beta[...])
        return x + (1.0 / (beta + 1e-9)) * sin_squared(x * alpha)


def _hold(x, valid, mode: str, reach: int):
    """``x [B, T, C]`` with the ``reach`` frames after each row's ``valid [B]`` frames replaced by what
    the reference's padding of an exact-length input would read there: zeros (``"zero"``: zero-padded
    convolutions) or the last valid frame (``"edge"``: the replicate-padded anti-aliasing filters).
    An operation that looks at most ``reach`` frames ahead then computes every valid position exactly;
    what it computes past them is replaced again before the next one. Only a ``reach``-frame window is
    rewritten (in place), not the whole tensor. ``valid`` None: ``x`` as is."""
    if valid is None or reach <= 0:
        return x
    w = min(int(reach), x.shape[1])

    def row(xr, n):  # xr [T, C]
        start = jnp.clip(n, 0, xr.shape[0] - w)  # a window that fits (clamped at the end)
        win = jax.lax.dynamic_slice_in_dim(xr, start, w, axis=0)
        past = (start + jnp.arange(w))[:, None] >= n
        fill = 0.0 if mode == "zero" else xr[jnp.maximum(n - 1, 0)][None, :]
        return jax.lax.dynamic_update_slice_in_dim(xr, jnp.where(past, fill, win), start, axis=0)

    return jax.vmap(row)(x, valid)


def _reach(conv) -> int:
    """How many frames past a position a :class:`Conv1d` reads (its right padding)."""
    k = conv.weight.shape[-1]
    return conv.dilation * (k - 1) - conv.dilation * (k - 1) // 2 if conv.padding == "same" else int(conv.padding)


_FILTER_REACH = 8  # the anti-aliasing filters' replicate padding (12 taps: 5 frames up, 6 down) and a margin


class AntiAliasedActivation1d(nnx.Module):
    def __init__(self, channels):
        self.act = SnakeBeta(channels)

    def __call__(self, x, valid=None):
        u = self.act(upsample2(_hold(x, valid, "edge", _FILTER_REACH)))
        return downsample2(_hold(u, None if valid is None else 2 * valid, "edge", _FILTER_REACH))


class AMPBlock(nnx.Module):
    def __init__(self, channels, k, dilations, *, rngs):
        pad = lambda d: int((k * d - d) / 2)
        self.convs1 = nnx.List([Conv1d(channels, channels, k, dilation=d, padding=pad(d), rngs=rngs)
                                for d in dilations])
        self.convs2 = nnx.List([Conv1d(channels, channels, k, dilation=1, padding=pad(1), rngs=rngs)
                                for _ in dilations])
        self.activations = nnx.List([AntiAliasedActivation1d(channels) for _ in range(2 * len(dilations))])

    def __call__(self, x, valid=None):
        for i in range(len(self.convs1)):
            r = x
            c1, c2 = self.convs1[i], self.convs2[i]
            x = c1(_hold(self.activations[2 * i](x, valid), valid, "zero", _reach(c1)))
            x = c2(_hold(self.activations[2 * i + 1](x, valid), valid, "zero", _reach(c2)))
            x = r + x
        return x


class BigVGAN(nnx.Module):
    """``Qwen2_5OmniToken2WavBigVGANModel``."""

    def __init__(self, cfg: BigVGANConfig, *, rngs: nnx.Rngs):
        c0 = cfg.upsample_initial_channel
        if len(cfg.upsample_rates) != len(cfg.upsample_kernel_sizes):
            raise CheckpointError(
                "config.json: bigvgan_config upsample_rates and upsample_kernel_sizes differ in length")
        self.conv_pre = Conv1d(cfg.mel_dim, c0, 7, padding=3, rngs=rngs)
        self.ups = nnx.List([
            nnx.List([ConvTranspose1d(c0 // 2 ** i, c0 // 2 ** (i + 1), k, s, (k - s) // 2, rngs=rngs)])
            for i, (s, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes))])
        self.resblocks = nnx.List([
            AMPBlock(c0 // 2 ** (i + 1), k, tuple(d), rngs=rngs)
            for i in range(len(cfg.upsample_rates))
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes)])
        c_last = c0 // 2 ** len(cfg.upsample_rates)
        self.activation_post = AntiAliasedActivation1d(c_last)
        self.conv_post = Conv1d(c_last, 1, 7, padding=3, bias=False, rngs=rngs)


def process_mel(mel):
    """log-mel -> amplitude -> dB (floor -115 dB) - 20 dB -> clamp-normalised to [-1, 1]."""
    min_db = -115.0
    amp = jnp.exp(mel)
    floor = jnp.exp(jnp.float32(min_db / 20.0 * np.log(10)))
    db = 20 * jnp.log10(jnp.maximum(amp, floor)) - 20
    return jnp.clip((2 * 1.0) * ((db - min_db) / (-min_db)) - 1.0, -1.0, 1.0)


def bigvgan_fn(voc: BigVGAN, cfg: BigVGANConfig, mel, lengths=None):
    """Traceable body of :func:`bigvgan`: ``mel [B, T, mel_dim]`` -> ``[B, T * prod(upsample_rates)]``.

    ``lengths [B]`` (int): row ``b``'s mel is its first ``lengths[b]`` frames, the rest padding. Before
    every operation that looks along time, what lies past a row's valid length is replaced by what
    that operation's padding would read at the end of an exact-length input (:func:`_hold`: zeros
    before the convolutions, the last valid frame before the anti-aliasing filters; a transposed
    convolution's output at valid positions only reads valid or zero inputs; only as many frames as
    the operation reads past a position are rewritten), so the first
    ``lengths[b] * prod(upsample_rates)`` samples equal the vocoder run on that row alone: one
    compiled program serves every length up to ``T``."""
    valid = None if lengths is None else jnp.asarray(lengths, jnp.int32)
    x = voc.conv_pre(_hold(process_mel(jnp.asarray(mel, _F32)), valid, "zero", _reach(voc.conv_pre)))
    nr = len(cfg.resblock_kernel_sizes)
    for i, rate in enumerate(cfg.upsample_rates):
        up = voc.ups[i][0]
        x = up(_hold(x, valid, "zero", -(-up.weight.shape[-1] // up.stride)))  # its taps per phase
        valid = None if valid is None else valid * rate
        acc = 0
        for j in range(nr):
            acc = acc + voc.resblocks[i * nr + j](x, valid)
        x = constrain(acc / nr, ("batch", "seq", None))
    x = voc.conv_post(_hold(voc.activation_post(x, valid), valid, "zero", _reach(voc.conv_post)))
    return jnp.clip(x, -1.0, 1.0)[..., 0]


@functools.partial(jax.jit, static_argnames=("structure", "cfg"))
def _bigvgan_jit(structure, leaves, mel, lengths, *, cfg):
    return bigvgan_fn(structure.merge(leaves), cfg, mel, lengths)


def bigvgan(voc: BigVGAN | Split, cfg: BigVGANConfig, mel, lengths=None):
    """Mel ``[B, T, mel_dim]`` (or ``[T, mel_dim]``) -> waveform ``[B, samples]`` in [-1, 1], 24 kHz.

    ``lengths``: each row's valid mel frames (rows padded to a common, bucketed ``T``); row ``b``'s
    first ``lengths[b] * prod(upsample_rates)`` samples are its waveform (see :func:`bigvgan_fn`)."""
    mel = jnp.asarray(mel, _F32)
    if mel.ndim == 2:
        mel = mel[None]
    if mel.ndim != 3 or mel.shape[-1] != cfg.mel_dim:
        raise InputError(f"bigvgan: mel must be [batch, frames, {cfg.mel_dim}], got {list(mel.shape)}")
    if lengths is not None:
        lengths = np.asarray(lengths, np.int32).reshape(-1)
        if lengths.shape[0] != mel.shape[0] or lengths.min() < 1 or lengths.max() > mel.shape[1]:
            raise InputError(f"bigvgan: lengths must give 1..{mel.shape[1]} frames for each of the {mel.shape[0]} "
                             f"rows, got {lengths.tolist()}")
    split = presplit(voc)
    with jax.default_matmul_precision(MATMUL_PRECISION):
        return _bigvgan_jit(split.structure, split.leaves, mel, lengths, cfg=cfg)
