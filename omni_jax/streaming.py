"""Streaming Token2Wav: codec ids in, 24 kHz audio chunks out, as the talker produces them.

Notation: ``B`` = ``dit.block_size`` mel frames (24 published), ``rep`` = ``dit.repeats`` mel
frames per codec id (2), ``hop`` = ``prod(bigvgan.upsample_rates)`` samples per mel frame (240),
``N`` = mel frames of the utterance (``rep * n_codes``). Frame ``j`` is time ``j * hop / 24 kHz``.

The chunk algorithm (the one :class:`StreamingToken2Wav` runs and the test rebuilds from
transformers' modules)
-------------------------------------------------------------------------------------------

**Noise.** The DiT's initial state is defined per mel frame for the whole utterance:
``frame_noise(key, j0, n, mel_dim)[i]`` is frame ``j0 + i``'s standard-normal row, a function of
``(key, j0 + i)`` only (``fold_in(key, j)``, then ``normal``). A streamed and a whole decode that
use the same key therefore start from the same noise, frame for frame, and a chunk's window
takes the slice ``frame_noise(key, window_start, window_frames)`` of it.

**DiT chunks.** The mel frames are cut at DiT block boundaries: the first chunks follow the
*ramp* ``first_chunk_blocks`` = ``(C0, C1, ...)`` (default ``(1, 1, 2)`` blocks: a short time to
first audio, then chunks that grow while the audio already delivered plays; see "Default"
below), every later chunk has ``C`` blocks (``chunk_blocks``, default 3: ``C B / rep`` = 36 codec
ids); the last one is clipped to ``N``. Chunk ``k`` owning ``[s, e)`` solves its ODE (all ``steps - 1`` RK4 steps, 36
DiT evaluations at 10 steps) on the window ``[max(0, s - L B), min(N, e + R B))`` with ``L`` =
``left_blocks`` (2) blocks of left and ``R`` = ``right_blocks`` (1) block of right context: the
published receptive field of one DiT evaluation (two look-back layers chain to 2 blocks back,
one look-ahead layer reaches 1 block ahead). Window starts are multiples of ``B``, so the
window's block partition is the utterance's and every frame sees the same band mask as in the
whole decode, except that nothing outside the window exists. Every window is padded at its end
(code 0, noise of the following frames) to its nominal shape, ``(L + C + R) B`` frames, or half of it (rounded up to whole blocks) when the nominal window
fits there: the first chunks, whose left context the utterance's start cuts (with the defaults
the ramp's 2- and 3-block windows run at 3 blocks, then 6), and run through
:func:`omni_jax.token2wav.dit_sample` with ``code_lengths`` = its valid codes, which masks the
padding out of attention: two compiled DiT shapes for the whole stream, and the first chunks
(whose latency counts most) do not compute a full window of padding. Only the chunk's own
frames ``[s, e)`` are kept (final); the window's right-context frames ``[e, e + R B)`` are a
*provisional* mel used only as vocoder look-ahead. Chunk ``k`` is decoded in ``push`` as soon as
the codes of ``[0, e + R B)`` exist, else in ``finish`` with the right context that exists. The
latency from a codec id to its audio is therefore one chunk plus the right context: the first
audio needs ``(C0 + R) B / rep`` = 24 ids (0.48 s of speech at 50 ids/s), steady chunks ``(C + R)
B / rep`` = 48 ids after their first id; plus compute.

Since the ODE chains 36 DiT evaluations, the whole decode's receptive field is unbounded and a
chunk is *not* the whole decode's output: the table below measures by how much.

**Vocoder chunks.** BigVGAN (convolutions, no mask) vocodes chunk ``k``'s mel window
``[max(0, s - VL), e + R B)``: ``VL`` = ``vocoder_left_frames`` (24) already-final frames of
left context, the chunk's kept frames and its provisional right context. Audio is emitted for
frames ``[s - F, e - F)`` (``F`` = ``crossfade_frames``, 4): the first ``F`` frames ``[s - F,
s)`` are a raised-cosine (``sin^2``, weights summing to 1) cross-fade from the previous chunk's
audio of those frames to this chunk's (both vocoded the same final mel there, with ``>= VL - F``
frames of left and ``>= R B`` frames of look-ahead on their open sides, so they differ only by
vocoder edge effects, and the fade removes even that step); the last ``F`` frames ``[e - F, e)``
are held back for the next cross-fade. Chunk 0 emits ``[0, e - F)`` without a fade. ``finish``
runs the remaining chunks' DiT, then one vocoder window that ends exactly at ``N`` (``[max(0, N -
W_v), N)``, ``W_v = VL + C B + R B``: the utterance's own end, so the last samples see the same
boundary as the whole decode) emits the pending cross-fade and everything up to ``N``. The
streamed samples add up to exactly ``N * hop``, the whole decode's length. Vocoder shapes
depend on the configuration only (``min(s, VL) + (e - s) + R B`` for the ramp's chunks, then
``W_v``: with the defaults 48, 72, 96 and 120 frames, one vocoder compile each; padding them to
fewer shapes with BigVGAN's exact valid-length mode compiled slower than the four exact shapes
on this project's CPU: 23 s against 10 s per shape for the embedded model's vocoder), except for utterances shorter than ``W_v`` frames, whose tail is vocoded at its own
length (as the whole decode is). With ``right_blocks = 0`` the vocoder's look-ahead at an
emitted chunk end is only the ``F`` held-back frames: keep ``R >= 1``.

Measured closeness (:func:`closeness`: streamed vs whole decode of the same codes and noise)
--------------------------------------------------------------------------------------------

Random-weight models (JAX init: ``_uniform``, torch's default Linear bound), float32, CPU, 10
ODE steps, guidance 0.5, sway -1, 144 random codec ids (288 mel frames). DiT: published block
24, repeats 2, mel 80, ff_mult 2, speaker-encoder shapes; width 512 (8 heads of 64; the published 1024 is
too slow for a CPU sweep) and 4 layers (look-back layers 0 and
3, look-ahead layer 2: the published 2-back / 1-ahead receptive field). BigVGAN: the published
rates, kernels and dilations (hop 240) at width 256. ``VL = 24``, ``F = 4``; uniform chunks
(``C0 = C``). Random DiTs couple frames weakly, so the table uses a *stress* variant whose
attention is sharpened and strengthened (``to_q``, ``to_k`` and ``to_out`` weights x4); plain
init gives 50-100x smaller DiT errors (``C = 3``: mel 6.7e-8, wave 1.7e-7). Columns: ``mel``
relative L2 of the streamed DiT mel; ``mel - noise`` the same relative to what the ODE added to
the noise; ``wave`` relative L2 of the waveform; ``log-mel`` mean absolute difference of 80-band
log-mel spectra (1024-point STFT, hop 256) in dB; ``latency`` codec ids from a chunk's first
id to its audio; ``DiT cost`` DiT frames computed per frame kept::

    C  L,R  ids/chunk  latency  DiT cost   mel      mel-noise  wave     log-mel dB
    1  2,1     12        24       4.0     6.7e-6    1.4e-5    2.1e-6    6.6e-5
    2  2,1     24        36       2.5     4.8e-6    9.8e-6    1.5e-6    3.7e-5
    3  2,1     36        48       2.0     3.4e-6    7.0e-6    1.0e-6    2.5e-5
    4  2,1     48        60       1.75    3.2e-6    6.4e-6    8.1e-7    1.9e-5
    3  1,1     36        48       1.67    4.2e-5    8.5e-5    1.1e-6    3.8e-5
    3  0,0     36        36       1.0     2.4e-3    4.8e-3    1.7e-3*   3.3e-2*

``*`` dominated by the vocoder (no look-ahead beyond the fade; vocoder chunking alone gives
the same 1.7e-3). For scale: two whole decodes of the same codes with *different* noise differ
by 1.25 (mel), 1.4e-2 (wave: a random BigVGAN hardly responds to mel detail, so judge by the mel
columns) and 0.82 dB. Vocoder chunking alone (the whole decode's mel through the chunked
vocoder) is 2e-8 - 7e-8 relative for every row with ``R = 1``. The largest sample-to-sample
step within 2 samples of a seam (DiT seams and fade edges) is 0.78-0.81 of the 99.9th percentile
elsewhere, the same as the whole decode's at those positions: no clicks.

Default: ``chunk_blocks = 3`` (36 ids, 0.72 s), ``first_chunk_blocks = (1, 1, 2)``,
``left_blocks = 2``, ``right_blocks = 1``. Closeness hardly depends on the chunk size (about 2x from C = 4 to C = 1):
the context sets the error (one block less on the left: x12; no context: x700), so 2 back / 1
ahead, the published receptive field, is kept and the chunk size is chosen by cost and latency:
C = 3 runs the DiT on 2x the frames of the whole decode (C = 1: 4x, which matters on CPU where
the stream must outpace playback), and the 1-block first chunk gets the first audio after 24
ids (0.48 s of speech) rather than 48. This matches Qwen's own streaming (chunks of 3 blocks of
24 frames, 2 blocks back, 1 ahead). The ramp after the first chunk is for playback: while the
thinker still writes the reply, the talker makes one codec id per text token, so codes arrive at
the thinker's pace. Chunk 0 emits ``C0 B - F`` frames (0.2 s); with a 3-block chunk next, that
chunk needed 36 more ids before its audio (the embedded model on this project's 2-core CPU: it
arrived 35 ms after the first chunk had played out); a 1-block chunk needs 12 more ids, the
2-block one after it 24 more while 0.24 s plays, and from there each chunk brings more audio
than the next one waits for. The ramp costs two more DiT calls per utterance (at the half-size
window shape) and two more vocoder shapes.

These numbers come from random models; a trained DiT's attention may couple frames more
strongly, so they are a guide, not a guarantee (measure again with real weights). The test
(``tests/test_streaming_t2w.py``) checks the algorithm against transformers' DiT and BigVGAN run
on the same windows, and a documented bound against the whole decode on its tiny model.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from .config import Token2WavConfig
from .errors import InputError
from .token2wav import Token2Wav, Token2WavParts, bigvgan, dit_sample, presplit_token2wav

DEFAULT_CHUNK_BLOCKS = 3
DEFAULT_FIRST_CHUNK_BLOCKS = (1, 1, 2)  # the ramp: chunk sizes before the steady chunk_blocks
DEFAULT_LEFT_BLOCKS = 2
DEFAULT_RIGHT_BLOCKS = 1
DEFAULT_VOCODER_LEFT_FRAMES = 24
DEFAULT_CROSSFADE_FRAMES = 4


# --------------------------------------------------------------------------------------
# noise


@functools.partial(jax.jit, static_argnames=("n_frames", "mel_dim"))
def _frame_noise(key, start, n_frames, mel_dim):
    idx = jnp.asarray(start, jnp.uint32) + jnp.arange(n_frames, dtype=jnp.uint32)
    return jax.vmap(lambda j: jax.random.normal(jax.random.fold_in(key, j), (mel_dim,), jnp.float32))(idx)


def frame_noise(key, start_frame: int, n_frames: int, mel_dim: int) -> np.ndarray:
    """Counter-based DiT noise: ``[n_frames, mel_dim]`` float32 rows for frames
    ``start_frame ..``; row ``i`` depends only on ``(key, start_frame + i)``, so any slice of
    an utterance's noise can be drawn without the rest. ``key``: a ``jax.random`` key.
    The whole decode's noise is ``frame_noise(key, 0, repeats * n_codes, mel_dim)``."""
    if start_frame < 0 or n_frames < 0:
        raise InputError(f"frame_noise: start_frame={start_frame} and n_frames={n_frames} must be >= 0")
    if n_frames == 0:
        return np.zeros((0, mel_dim), np.float32)
    return np.asarray(_frame_noise(key, int(start_frame), int(n_frames), int(mel_dim)))


# --------------------------------------------------------------------------------------
# the streaming decoder


def crossfade_weights(n: int) -> np.ndarray:
    """Weights of the incoming chunk over an ``n``-sample cross-fade (``sin^2`` ramp from ~0 to
    ~1; the outgoing chunk gets ``1 - w``)."""
    return (np.sin(0.5 * np.pi * (np.arange(n) + 0.5) / n) ** 2).astype(np.float32)


class StreamingToken2Wav:
    """Decode one utterance's codec ids to audio incrementally (see the module notes).

    ``model``/``cfg``: a loaded :class:`~omni_jax.token2wav.Token2Wav` (or its
    :func:`~omni_jax.token2wav.presplit_token2wav` parts, which a model keeps) and its config;
    ``cond [enc_emb_dim]``, ``ref_mel [T_ref, mel_dim]``: the voice; ``key``: the utterance's
    noise key (:func:`frame_noise`), or ``noise_fn(start_frame, n_frames) -> [n, mel_dim]``.
    ``noise_fn`` must return exactly ``n_frames`` rows. Chunk sizes and contexts are in DiT blocks,
    vocoder context and fade in mel frames; ``first_chunk_blocks`` is the ramp: the sizes of the
    first chunks (a sequence, or an int for chunk 0 alone; each at most ``chunk_blocks``; None: no
    ramp), every later chunk has ``chunk_blocks``; ``steps``/``guidance_scale``/``sway``/``impl`` as in :func:`~omni_jax.token2wav.dit_sample`.
    ``push(codes)`` returns the audio chunks that became ready (float32, 24 kHz), ``finish()``
    the rest; concatenated they have ``repeats * n_codes * hop`` samples, the whole decode's.
    """

    def __init__(self, model: Token2Wav | Token2WavParts, cfg: Token2WavConfig, cond, ref_mel, *, key=None, noise_fn=None,
                 chunk_blocks: int = DEFAULT_CHUNK_BLOCKS,
                 first_chunk_blocks: int | tuple[int, ...] | None = DEFAULT_FIRST_CHUNK_BLOCKS,
                 left_blocks: int = DEFAULT_LEFT_BLOCKS, right_blocks: int = DEFAULT_RIGHT_BLOCKS,
                 vocoder_left_frames: int = DEFAULT_VOCODER_LEFT_FRAMES,
                 crossfade_frames: int = DEFAULT_CROSSFADE_FRAMES,
                 steps: int = 10, guidance_scale: float = 0.5, sway: float | None = -1.0, impl: str | None = None):
        d = cfg.dit
        self.model, self.cfg = presplit_token2wav(model), cfg  # split once, not per chunk
        self.cond = np.asarray(cond, np.float32).reshape(-1)
        self.ref_mel = np.asarray(ref_mel, np.float32)
        if self.ref_mel.ndim == 3 and self.ref_mel.shape[0] == 1:
            self.ref_mel = self.ref_mel[0]
        if (key is None) == (noise_fn is None):
            raise InputError("StreamingToken2Wav: give exactly one of key= and noise_fn=")
        self.noise_fn = noise_fn or (lambda start, n: frame_noise(key, start, n, d.mel_dim))
        ramp = () if first_chunk_blocks is None else first_chunk_blocks
        ramp = (ramp,) if isinstance(ramp, (int, np.integer)) else tuple(ramp)
        for name, v, lo in (("chunk_blocks", chunk_blocks, 1), *(("first_chunk_blocks", r, 1) for r in ramp),
                            ("left_blocks", left_blocks, 0),
                            ("right_blocks", right_blocks, 0)):
            if int(v) != v or v < lo:
                raise InputError(f"StreamingToken2Wav: {name}={v} must be an integer >= {lo}")
            if (v * d.block_size) % d.repeats:
                raise InputError(f"StreamingToken2Wav: {name}={v} blocks of {d.block_size} frames are not a whole "
                                 f"number of codec ids ({d.repeats} frames each)")
        if any(v > chunk_blocks for v in ramp):
            raise InputError(f"StreamingToken2Wav: first_chunk_blocks={first_chunk_blocks}: each at most "
                             f"chunk_blocks={chunk_blocks}")
        self.rep = d.repeats
        self.cf = chunk_blocks * d.block_size  # chunk frames
        self.ramp = [int(v) * d.block_size for v in ramp]  # the first chunks' frames
        self.ramp_starts = [int(x) for x in np.cumsum([0] + self.ramp)]  # chunk k < len(ramp) owns [k, k + 1)
        self.f0 = (self.ramp or [self.cf])[0]  # chunk 0's frames
        self.lf = left_blocks * d.block_size
        self.rf = right_blocks * d.block_size
        self.window_frames = self.lf + self.cf + self.rf
        self.vl = int(vocoder_left_frames)
        self.fade = int(crossfade_frames)
        if not (0 < self.fade <= min(self.ramp + [self.cf, self.vl])):
            raise InputError(f"StreamingToken2Wav: crossfade_frames={crossfade_frames} must be in [1, min(smallest "
                             f"chunk's frames {min(self.ramp + [self.cf])}, vocoder_left_frames {self.vl})]")
        self.hop = int(np.prod(cfg.bigvgan.upsample_rates))
        self.vocoder_window = self.vl + self.cf + self.rf
        self.dit_kw = dict(steps=steps, guidance_scale=guidance_scale, sway=sway, impl=impl)

        self._codes = np.zeros((0,), np.int64)
        self._mel = np.zeros((0, d.mel_dim), np.float32)  # final (kept) mel frames [0, e_last)
        self._next = 0  # next chunk index
        self._pending = None  # audio of frames [e_last - F, e_last) held back for the cross-fade
        self._finished = False

    # ---- properties

    @property
    def latency_codes(self) -> int:
        """Codec ids that must exist before chunk 0's audio (chunk + right context)."""
        return (self.f0 + self.rf) // self.rep

    def chunk_bounds(self, k: int) -> tuple[int, int]:
        """Nominal mel frames ``[s, e)`` of chunk ``k`` (before clipping to the utterance)."""
        r = len(self.ramp)
        if k < r:
            return self.ramp_starts[k], self.ramp_starts[k + 1]
        s = self.ramp_starts[r] + (k - r) * self.cf
        return s, s + self.cf

    def window_frames_of(self, k: int) -> int:
        """The DiT window shape of chunk ``k``, one of two: ``(L + C + R) B`` frames, or half of it
        (rounded up to whole blocks) when chunk ``k``'s nominal window fits there (the first chunks,
        whose left context the utterance's start cuts). A function of ``k`` only: the shapes
        compiled are fixed by the configuration."""
        s, e = self.chunk_bounds(k)
        b, full = self.cfg.dit.block_size, self.window_frames
        half = b * -(-full // (2 * b))
        return half if e + self.rf - max(0, s - self.lf) <= half < full else full

    @property
    def n_codes(self) -> int:
        return int(self._codes.shape[0])

    # ---- the two stages

    def _dit_chunk(self, k: int):
        """Kept mel ``[s, e)`` and provisional right-context mel of chunk ``k``."""
        n = self.n_codes * self.rep
        s, e = self.chunk_bounds(k)
        e = min(e, n)
        ws, we = max(0, s - self.lf), min(n, e + self.rf)
        frames = self.window_frames_of(k)
        codes = np.zeros((1, frames // self.rep), np.int32)
        valid = (we - ws) // self.rep
        codes[0, :valid] = self._codes[ws // self.rep:we // self.rep]
        noise = self.noise_fn(ws, frames)[None]
        mel = np.asarray(dit_sample(self.model.code2wav_dit_model, self.cfg.dit, codes, self.cond, self.ref_mel,
                                    noise, code_lengths=[valid], **self.dit_kw))[0]
        return mel[s - ws:e - ws], mel[e - ws:we - ws]

    def _vocode(self, mel) -> np.ndarray:
        return np.asarray(bigvgan(self.model.code2wav_bigvgan_model, self.cfg.bigvgan, mel[None]))[0]

    def _emit(self, audio, a0: int, s: int, stop: int) -> np.ndarray:
        """Output for frames ``[s - F, stop)`` (``[0, stop)`` for the first chunk) from ``audio``, the
        vocoding of frames starting at ``a0``, cross-fading the held-back samples in."""
        h, f = self.hop, self.fade
        if self._pending is None:
            return audio[(0 - a0) * h:(stop - a0) * h]
        w = crossfade_weights(f * h)
        fade = (1.0 - w) * self._pending + w * audio[(s - f - a0) * h:(s - a0) * h]
        return np.concatenate([fade, audio[(s - a0) * h:(stop - a0) * h]])

    # ---- public

    def push(self, codes) -> list[np.ndarray]:
        """Append codec ids; decode every chunk whose right context now exists."""
        if self._finished:
            raise InputError("StreamingToken2Wav: push() after finish()")
        c = np.asarray(codes).reshape(-1)
        if c.size and (not np.issubdtype(c.dtype, np.integer) or c.min() < 0 or c.max() > self.cfg.dit.num_embeds):
            raise InputError(f"StreamingToken2Wav: codec ids must be integers in [0, {self.cfg.dit.num_embeds}]")
        self._codes = np.concatenate([self._codes, c.astype(np.int64)])
        out = []
        n = self.n_codes * self.rep
        h, f = self.hop, self.fade
        while self.chunk_bounds(self._next)[1] + self.rf <= n:
            k = self._next
            s, e = self.chunk_bounds(k)
            kept, prov = self._dit_chunk(k)
            a0 = max(0, s - self.vl)
            audio = self._vocode(np.concatenate([self._mel[a0:], kept, prov]))
            out.append(self._emit(audio, a0, s, e - f))
            self._pending = audio[(e - f - a0) * h:(e - a0) * h]
            self._mel = np.concatenate([self._mel, kept])
            self._next += 1
        return out

    def finish(self) -> list[np.ndarray]:
        """No more codes: decode the remaining chunks (with the right context that exists) and
        emit everything up to the utterance's end."""
        if self._finished:
            return []
        self._finished = True
        n = self.n_codes * self.rep
        if n == 0:
            return []
        s = self.chunk_bounds(self._next)[0]  # first frame not yet final (e_last)
        while self.chunk_bounds(self._next)[0] < n:
            kept, _ = self._dit_chunk(self._next)
            self._mel = np.concatenate([self._mel, kept])
            self._next += 1
        a0 = max(0, n - self.vocoder_window)
        audio = self._vocode(self._mel[a0:n])
        out = self._emit(audio, a0, s, n)
        self._pending = None
        return [out]

    def decode_all(self, codes) -> np.ndarray:
        """``push(codes)`` then ``finish()``, concatenated (a convenience for tests and benches)."""
        parts = self.push(codes) + self.finish()
        return np.concatenate(parts) if parts else np.zeros((0,), np.float32)


# --------------------------------------------------------------------------------------
# measuring closeness


@functools.lru_cache(maxsize=None)
def _mel_filterbank(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """Slaney-style triangular mel filterbank ``[n_mels, n_fft // 2 + 1]`` (HTK mel scale)."""
    mel = lambda f: 2595.0 * np.log10(1.0 + f / 700.0)
    inv = lambda m: 700.0 * (10 ** (m / 2595.0) - 1.0)
    pts = inv(np.linspace(mel(fmin), mel(fmax), n_mels + 2))
    freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    fb = np.zeros((n_mels, freqs.size))
    for i in range(n_mels):
        lo, c, hi = pts[i], pts[i + 1], pts[i + 2]
        fb[i] = np.maximum(0, np.minimum((freqs - lo) / (c - lo), (hi - freqs) / (hi - c)))
        fb[i] *= 2.0 / (hi - lo)
    return fb


def log_mel_db(wav, sr: int = 24000, n_fft: int = 1024, hop: int = 256, n_mels: int = 80) -> np.ndarray:
    """Log-mel spectrogram in dB ``[frames, n_mels]`` (Hann window, floor -100 dB)."""
    x = np.asarray(wav, np.float64).reshape(-1)
    if x.size < n_fft:
        x = np.pad(x, (0, n_fft - x.size))
    frames = 1 + (x.size - n_fft) // hop
    idx = np.arange(n_fft)[None, :] + hop * np.arange(frames)[:, None]
    spec = np.abs(np.fft.rfft(x[idx] * np.hanning(n_fft), axis=-1)) ** 2
    m = spec @ _mel_filterbank(sr, n_fft, n_mels, 0.0, sr / 2).T
    return 10.0 * np.log10(np.maximum(m, 1e-10))


def closeness(streamed, whole, *, sr: int = 24000) -> dict:
    """``rel_l2``: ``||streamed - whole|| / ||whole||`` of two waveforms; ``log_mel_db``: mean
    absolute difference of their log-mel spectra (:func:`log_mel_db`), in dB."""
    a = np.asarray(streamed, np.float64).reshape(-1)
    b = np.asarray(whole, np.float64).reshape(-1)
    if a.shape != b.shape:
        raise InputError(f"closeness: lengths differ ({a.size} vs {b.size})")
    return dict(rel_l2=float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)),
                log_mel_db=float(np.mean(np.abs(log_mel_db(a, sr) - log_mel_db(b, sr)))))


def seam_jump_ratio(wav, seam_samples, *, radius: int = 2) -> float:
    """Largest ``|x[i+1] - x[i]|`` within ``radius`` samples of any seam, over the 99.9th
    percentile of ``|x[i+1] - x[i]|`` elsewhere (a click shows as a ratio >> 1)."""
    x = np.asarray(wav, np.float64).reshape(-1)
    d = np.abs(np.diff(x))
    near = np.zeros(d.size, bool)
    for s in seam_samples:
        near[max(0, s - radius - 1):min(d.size, s + radius)] = True
    if not near.any() or near.all():
        raise InputError("seam_jump_ratio: no seams inside the waveform, or nothing else")
    return float(d[near].max() / max(np.percentile(d[~near], 99.9), 1e-30))
