"""Audio inputs: decoding and resampling to 16 kHz mono, log-mel features, and writing WAV files.

Features are transformers' ``WhisperFeatureExtractor`` as ``Qwen2_5OmniProcessor`` calls it (checked
in ``tests/test_media.py``): the waveform (16 kHz mono) is zero-padded to ``chunk_length`` seconds
(``padding="max_length"``) *before* the STFT, so the frames at the end of the audio see zeros, not
a reflection; periodic Hann window, ``n_fft``/``hop_length`` STFT with centred reflect padding,
power spectrum, Slaney mel filters up to 8 kHz, ``log10`` with a 1e-10 floor, last frame dropped,
floor at ``max - 8``, then ``(x + 4) / 4``. The features are ``[feature_size, nb_max_frames]``
(128 x 30000 for the published checkpoints) and ``feature_attention_mask`` marks the first
``ceil(samples / hop_length)`` frames. Only the frames that touch audio are computed; the rest hold
the value the reference gives all-zero frames (exactly ``log10(1e-10) = -10`` before the floor).
Audio longer than ``chunk_length`` seconds raises :class:`InputError` (the reference truncates it
silently).

Files are read with librosa (soundfile), other containers and the audio track of a video with
PyAV, averaged to mono and resampled with librosa's default (soxr) like ``librosa.load``.
"""

from __future__ import annotations

import io
import os
import stat
import tempfile
import warnings
import wave
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import InputError
from ._naming import _name
from .settings import _Settings, _unknown_keys, _warn_ignored, settings_from_dir


@dataclass(frozen=True)
class AudioFeatureConfig:
    """The checkpoint's ``WhisperFeatureExtractor`` settings (see :func:`processor_configs`).

    Defaults, for settings the checkpoint does not give, are the published Qwen2.5-Omni values
    (128 mel bins, 300 s window), not ``WhisperFeatureExtractor``'s own class defaults (80
    bins, 30 s).
    """

    feature_size: int = 128
    sampling_rate: int = 16000
    hop_length: int = 160
    chunk_length: int = 300
    n_fft: int = 400
    padding_value: float = 0.0
    dither: float = 0.0

    @property
    def n_samples(self) -> int:
        """Samples in the fixed window (transformers derives it from ``chunk_length``)."""
        return self.chunk_length * self.sampling_rate

    @property
    def nb_max_frames(self) -> int:
        """Feature frames of a padded input (the length of ``feature_attention_mask``)."""
        return self.n_samples // self.hop_length

    @classmethod
    def _from_settings(cls, s: _Settings) -> "AudioFeatureConfig":
        kw: dict[str, Any] = {}
        for name in ("feature_size", "sampling_rate", "hop_length", "chunk_length", "n_fft"):
            if (v := s.positive_int(name)) is not None:
                kw[name] = v
        if (v := s.number("padding_value")) is not None:
            kw["padding_value"] = v
        if (v := s.number("dither", nonnegative=True)) is not None:
            kw["dither"] = v
        if s.get("padding_side") not in (None, "right"):
            s.ignore("padding_side", "omni-jax pads audio on the right")
        return cls(**kw)

    @classmethod
    def from_dict(cls, d: dict) -> "AudioFeatureConfig":
        """From one flat dict of feature-extractor settings (``preprocessor_config.json``'s layout)."""
        s = _Settings(d, "audio settings")
        cfg = cls._from_settings(s)
        _warn_ignored({s.path: _unknown_keys(d)}, [s])
        return cfg

    @classmethod
    def _from_found(cls, found: dict) -> "AudioFeatureConfig":
        return cls._from_settings(found["audio"]) if "audio" in found else cls()

    @classmethod
    def from_dir(cls, directory: str | None) -> "AudioFeatureConfig":
        """The settings in a checkpoint directory (as :func:`omni_jax.media.processor_configs` reads
        them); defaults without any."""
        return settings_from_dir(cls, directory)


def _to_mono(x: np.ndarray, what: str) -> np.ndarray:
    if x.ndim == 1:
        return x
    if x.ndim == 2:
        # channels are the short axis: [C, n] (librosa's layout) or [n, C] (soundfile's)
        axis = 0 if x.shape[0] <= x.shape[1] else 1
        if x.shape[axis] > 8:
            raise InputError(f"{what}: expected mono or multi-channel audio, got an array of shape {x.shape}")
        return x.mean(axis=axis)
    raise InputError(f"{what}: expected a 1-D waveform, got an array of shape {x.shape}")


def _check_waveform(x: np.ndarray, what: str) -> np.ndarray:
    if x.size == 0:
        raise InputError(f"{what}: the audio is empty")
    if not np.all(np.isfinite(x)):
        raise InputError(f"{what}: the audio contains NaN or infinite samples")
    return x


def load_audio(src, sampling_rate: int | None = None, *, target_rate: int = 16000) -> np.ndarray:
    """Mono float32 waveform at ``target_rate`` (16 kHz) from a path or an array.

    ``src`` is a path to anything librosa reads (through soundfile; other containers, such
    as mp4/m4a, through PyAV), or an array (``sampling_rate`` is then required; 2-D arrays
    are averaged over their channel axis, the shorter one). Resampling is librosa's
    default (soxr high quality), as ``librosa.load(path, sr=16000)`` used by the reference
    pipeline. Errors raise :class:`InputError` naming the file.
    """
    import librosa

    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        what = _name(path, "audio")
        if not os.path.isfile(path):
            raise InputError(f"{what}: no such file")
        try:
            with warnings.catch_warnings():  # librosa warns before its audioread fallback
                warnings.simplefilter("ignore")
                wav, sr = librosa.load(path, sr=None, mono=False)
        except Exception as e:  # soundfile cannot read it: try FFmpeg through PyAV
            try:
                wav, sr = _decode_audio_track(path)
            except InputError:
                raise
            except Exception:
                raise InputError(f"{what}: cannot decode audio ({type(e).__name__}: {e})") from None
            if wav is None:
                raise InputError(f"{what}: the file has no audio stream") from None
        wav = np.asarray(wav, dtype=np.float32)
    else:
        what = _name(src, "audio")
        if sampling_rate is None:
            raise InputError(f"{what}: an audio array needs its sampling_rate")
        try:
            wav = np.asarray(src)
        except Exception as e:
            raise InputError(f"{what}: not an array ({e})") from None
        if not (np.issubdtype(wav.dtype, np.floating) or np.issubdtype(wav.dtype, np.integer)):
            raise InputError(f"{what}: expected a numeric array, got dtype {wav.dtype}")
        if np.issubdtype(wav.dtype, np.integer):
            wav = wav.astype(np.float32) / float(np.iinfo(wav.dtype).max + 1)
        wav = wav.astype(np.float32)
        sr = sampling_rate
    if sr is None or not float(sr) > 0:
        raise InputError(f"{what}: invalid sampling rate {sr}")
    wav = _check_waveform(_to_mono(wav, what), what)
    if int(sr) != int(target_rate):
        wav = librosa.resample(wav, orig_sr=int(sr), target_sr=int(target_rate))
        wav = _check_waveform(np.asarray(wav, np.float32), what)
    return np.ascontiguousarray(wav, dtype=np.float32)


def _decode_audio_track(path: str, target_rate: int | None = None):
    """(mono float32 waveform, rate) of the first audio stream, or (None, None) if there is none.

    With ``target_rate`` the waveform is resampled with librosa (soxr), like ``librosa.load``."""
    import av

    what = _name(path, "audio track of")
    try:
        container = av.open(path)
    except Exception as e:
        raise InputError(f"{what}: cannot open ({type(e).__name__}: {e})") from None
    try:
        if not container.streams.audio:
            return None, None
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="fltp")  # planar float, source layout and rate
        chunks: list[np.ndarray] = []
        rate = getattr(stream, "sample_rate", None) or getattr(stream, "rate", None)
        try:
            for frame in container.decode(stream):
                rate = frame.sample_rate or rate
                for f in resampler.resample(frame):
                    chunks.append(f.to_ndarray())
            for f in resampler.resample(None):
                chunks.append(f.to_ndarray())
        except av.error.FFmpegError as e:
            if not chunks:
                raise InputError(f"{what}: cannot decode audio ({e})") from None
    finally:
        container.close()
    if not chunks:
        raise InputError(f"{what}: the audio stream is empty")
    wav = np.concatenate(chunks, axis=1).astype(np.float32).mean(axis=0)
    if not rate:
        raise InputError(f"{what}: the audio stream has no sample rate")
    wav = _check_waveform(wav, what)
    if target_rate is not None and int(rate) != int(target_rate):
        import librosa

        wav = np.asarray(librosa.resample(wav, orig_sr=int(rate), target_sr=int(target_rate)), np.float32)
        rate = target_rate
    return wav, int(rate)


_MEL_CACHE: dict = {}


def _mel_filters(cfg: AudioFeatureConfig) -> np.ndarray:
    """[n_fft // 2 + 1, feature_size] Slaney-scale, Slaney-normalised filters from 0 to 8 kHz."""
    key = (cfg.sampling_rate, cfg.n_fft, cfg.feature_size)
    if key not in _MEL_CACHE:
        import librosa

        fb = librosa.filters.mel(sr=cfg.sampling_rate, n_fft=cfg.n_fft, n_mels=cfg.feature_size, fmin=0.0,
                                 fmax=8000.0, htk=False, norm="slaney", dtype=np.float64)
        _MEL_CACHE[key] = np.ascontiguousarray(fb.T)
    return _MEL_CACHE[key]


def _log_mel_frames(x: np.ndarray, num_frames: int, cfg: AudioFeatureConfig) -> np.ndarray:
    """log10 mel power ``[feature_size, num_frames]`` (float64) of the first frames of the
    centred STFT of ``x`` padded with ``padding_value`` to ``n_samples`` (the reference's input)."""
    n_fft, hop, half, total = cfg.n_fft, cfg.hop_length, cfg.n_fft // 2, cfg.n_samples
    need = (num_frames - 1) * hop + n_fft  # samples of the reflect-padded signal these frames read
    sig = np.full(min(total, max(need - half, half + 1)), cfg.padding_value, np.float64)
    sig[:min(x.shape[0], sig.shape[0])] = x[:sig.shape[0]]
    parts = [sig[1:half + 1][::-1], sig]
    if need > half + total:  # the last frames reach the right reflection (sig is then all of it)
        parts.append(sig[-half - 1:-1][::-1])
    padded = np.concatenate(parts)[:need]
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop][:num_frames]
    out = np.empty((num_frames, cfg.feature_size), np.float64)
    for s in range(0, num_frames, 4096):
        out[s:s + 4096] = frames_log_mel(frames[s:s + 4096], cfg)
    return out.T


def frames_log_mel(frames: np.ndarray, cfg: AudioFeatureConfig) -> np.ndarray:
    """log10 mel power ``[N, feature_size]`` (float64) of STFT frames ``[N, n_fft]``: periodic
    Hann window, power spectrum, Slaney mel filters, ``log10`` with a 1e-10 floor (before the
    per-utterance clamp). A frame's value depends on its own samples only, so a streaming caller
    computing frames as audio arrives gets the whole utterance's values."""
    n_fft = cfg.n_fft
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann
    spec = np.fft.rfft(frames * window, n=n_fft, axis=-1)
    return np.log10(np.maximum((spec.real ** 2 + spec.imag ** 2) @ _mel_filters(cfg), 1e-10))


def log_mel(audio: np.ndarray, cfg: AudioFeatureConfig | None = None, *, pad: bool = True,
            name: str | None = None) -> tuple[np.ndarray, int]:
    """Log-mel features of one 16 kHz mono waveform, as ``Qwen2_5OmniProcessor`` computes them.

    Returns ``(input_features, length)``: ``input_features`` is float32
    ``[feature_size, nb_max_frames]`` (``pad=True``, the processor's fixed length) or
    ``[feature_size, length]`` (``pad=False``, the same values, trimmed); ``length`` is
    ``ceil(samples / hop_length)``, the number of ones in ``feature_attention_mask``.
    Audio longer than ``cfg.chunk_length`` seconds raises :class:`InputError`.
    """
    cfg = cfg or AudioFeatureConfig()
    what = name or "audio"
    x = np.asarray(audio)
    if x.ndim != 1:
        raise InputError(f"{what}: expected a 1-D 16 kHz waveform, got shape {x.shape} (use load_audio)")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise InputError(f"{what}: expected a float waveform, got dtype {x.dtype}")
    x = _check_waveform(x.astype(np.float32).astype(np.float64), what)  # the reference casts to float32
    n = x.shape[0]
    if n > cfg.n_samples:
        raise InputError(
            f"{what}: {n / cfg.sampling_rate:.2f} s of audio is longer than the {cfg.chunk_length} s the audio "
            f"feature extractor accepts (its chunk_length setting); split it into shorter clips")
    if cfg.dither != 0.0:  # the reference draws fresh noise each call; ours is seeded
        x = x + cfg.dither * np.random.default_rng(0).standard_normal(n)
    total_frames = cfg.nb_max_frames  # the reference's 1 + n_samples // hop frames, the last dropped
    length = min(-(-n // cfg.hop_length), total_frames)
    if cfg.padding_value == 0.0:
        # frames that start past the audio's end (plus n_fft // 2) read only zeros: their mel
        # power is 0, floored to 1e-10, so log10 gives exactly -10; compute only the others
        live = min(total_frames, (n + cfg.n_fft // 2) // cfg.hop_length + 2)
        spec = np.full((cfg.feature_size, total_frames), -10.0)
        spec[:, :live] = _log_mel_frames(x, live, cfg)
    else:
        spec = _log_mel_frames(x, total_frames, cfg)
    spec = np.maximum(spec, spec.max() - 8.0)
    spec = ((spec + 4.0) / 4.0).astype(np.float32)
    if not pad:
        spec = np.ascontiguousarray(spec[:, :length])
    return spec, int(length)


def feature_attention_mask(length: int, cfg: AudioFeatureConfig | None = None) -> np.ndarray:
    """int32 ``[nb_max_frames]``: ones on the first ``length`` frames (the processor's mask)."""
    cfg = cfg or AudioFeatureConfig()
    m = np.zeros(cfg.nb_max_frames, np.int32)
    m[:length] = 1
    return m


def audio_token_count(length: int) -> int:
    """Thinker tokens for ``length`` feature frames: ((L - 1) // 2 + 1 - 2) // 2 + 1."""
    return ((int(length) - 1) // 2 + 1 - 2) // 2 + 1


def audio_inputs(audios: Sequence[np.ndarray], cfg: AudioFeatureConfig | None = None,
                 names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """The processor's audio outputs for 16 kHz waveforms: ``input_features``
    [B, feature_size, nb_max_frames] float32 and ``feature_attention_mask`` [B, nb_max_frames] int32."""
    cfg = cfg or AudioFeatureConfig()
    feats, masks = [], []
    for i, a in enumerate(audios):
        f, length = log_mel(a, cfg, name=names[i] if names else f"audio[{i}]")
        feats.append(f)
        masks.append(feature_attention_mask(length, cfg))
    return {"input_features": np.stack(feats), "feature_attention_mask": np.stack(masks)}


def write_wav(path: str, audio: np.ndarray, sampling_rate: int = 24000) -> None:
    """Write mono float audio in [-1, 1] as a 16-bit PCM WAV, atomically: a temporary file beside
    ``path`` (``.NAME.tmp-PID-*``) renamed over it once complete, removed on failure."""
    x = np.asarray(audio, np.float32).reshape(-1)
    pcm = (np.clip(x, -1.0, 1.0) * 32767.0).round().astype("<i2")
    from ..validate import check_output_file

    path = check_output_file(path, "WAV")  # never replaces a device node, FIFO or directory
    # the WAV is built in memory and written with a plain file: a failing open or write is one
    # OSError here, not a half-built wave.Wave_write whose finaliser prints a traceback later
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(sampling_rate))
        w.writeframes(pcm.tobytes())
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-{os.getpid()}-",
                                   dir=os.path.dirname(os.path.abspath(path)))
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getvalue())
        os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode) if os.path.exists(path) else 0o644)
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None and os.path.lexists(tmp):
            try:
                os.remove(tmp)
            except OSError:
                pass
        raise InputError(f"{path}: cannot write ({e.strerror})") from None
