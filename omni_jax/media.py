"""Media inputs for the Thinker: audio, images and video, read and preprocessed without torch.

What the numbers follow (each checked in ``tests/test_media.py``):

* Audio features are transformers' ``WhisperFeatureExtractor`` as ``Qwen2_5OmniProcessor``
  calls it: the waveform (16 kHz mono) is zero-padded to ``chunk_length`` seconds
  (``padding="max_length"``) *before* the STFT, so the frames at the end of the audio see
  zeros, not a reflection; periodic Hann window, ``n_fft``/``hop_length`` STFT with centred
  reflect padding, power spectrum, Slaney mel filters up to 8 kHz, ``log10`` with a 1e-10
  floor, last frame dropped, floor at ``max - 8``, then ``(x + 4) / 4``. The features are
  ``[feature_size, nb_max_frames]`` (128 x 30000 for the published checkpoints) and
  ``feature_attention_mask`` marks the first ``ceil(samples / hop_length)`` frames. We
  compute only the frames that touch audio and fill the rest with the value the reference
  gives all-zero frames (exactly ``log10(1e-10) = -10`` before the floor), so a 5 s clip
  does not cost a 300 s STFT. Audio longer than ``chunk_length`` seconds raises
  :class:`InputError` (the reference truncates it silently).
* Images follow the Qwen2-VL image processor that ``Qwen2_5OmniProcessor`` and
  ``AutoImageProcessor`` instantiate in transformers 5 when torchvision is installed: the
  torchvision backend ``Qwen2VLImageProcessor`` (``Qwen2VLImageProcessorFast`` before the
  ``Fast`` suffix was dropped; without torchvision transformers falls back to
  ``Qwen2VLImageProcessorPil``, whose PIL resize differs by up to ~1e-2 relative). RGB
  (transparency composited on white: PIL's ``alpha_composite`` for PIL images, torchvision's
  float32 blend for RGBA arrays), ``smart_resize`` to multiples of ``patch_size * merge_size``
  within ``[min_pixels, max_pixels]``, then the video path's arithmetic: torch's uint8
  antialiased bicubic (:func:`resize_frames`) and the fused float32 normalisation
  (:func:`normalize_video`). The patch layout is
  ``[grid_t * grid_h * grid_w, C * temporal_patch_size * patch * patch]`` ordered by
  (t, h-block, w-block, merge row, merge col); an image is its own temporal pair. Image pixel
  values are bit-identical to transformers'.
* Video frame sampling follows qwen-omni-utils (the reference pipeline of Qwen2.5-Omni):
  ``fps`` 2.0, ``nframes = total / video_fps * fps`` clamped to ``[4, min(768, total)]``
  (both bounds rounded to even) and floored to even; the indices are
  ``round(linspace(0, total - 1, nframes))`` computed as torch does (float32,
  symmetric from both ends, round half to even). Every frame of a video is resized to one
  size: ``smart_resize`` with ``min_pixels = 128 * 28 * 28`` and a per-frame budget
  ``max(min(768 * 28 * 28, total_pixels / nframes * 2), int(1.05 * min_pixels))`` where
  ``total_pixels = 128000 * 28 * 28 * 0.9``. qwen-omni-utils and transformers' Qwen2-VL
  video processor resize with torchvision's antialiased bicubic on uint8 tensors, which on
  CPU is torch's fixed-point port of Pillow's resampler (int16 weights, horizontal pass
  first, uint8 in between); :func:`resize_frames` is an exact numpy port of that kernel, and
  :func:`normalize_video` is the torchvision backend's fused ``(x - mean / r) / (std / r)``
  float32 arithmetic: video pixel values are bit-identical to transformers'.
  Frames are padded to a multiple
  of ``temporal_patch_size`` by repeating the last one, and ``video_second_per_grid`` is
  ``temporal_patch_size / fps`` with the *processor's* ``fps`` argument, 2.0 when not
  given, as in the official pipeline (which never passes it).
* Settings (mel bins, window, pixel bounds, patch sizes, statistics...) are the checkpoint's,
  read by :func:`processor_configs` from either layout transformers reads: the nested
  ``processor_config.json`` (transformers 5) or the flat ``preprocessor_config.json``
  (published checkpoints), the nested section winning per component. Images use the image
  processor's settings and video the video processor's, except the video pixel bounds:
  ``Qwen2_5OmniProcessor`` passes its own (128 to 768 tokens of 28 x 28 pixels) at every call,
  so the video processor's saved ``size`` has no effect there, nor here.
* The audio track of a video (for ``use_audio_in_video``) is decoded with PyAV, averaged to
  mono and resampled to 16 kHz with librosa (soxr, librosa's default) like ``librosa.load``.
* :func:`expand_placeholders` expands ``<|AUDIO|>``, ``<|IMAGE|>`` and ``<|VIDEO|>`` the way
  ``Qwen2_5OmniProcessor`` does, including the 2 s chunk interleaving of video and audio
  tokens for ``use_audio_in_video``.

Dependencies: numpy, librosa (audio files and resampling), Pillow (decoding image files),
PyAV (``av``; video files and audio tracks). Pillow and PyAV are imported only when needed.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np

from .errors import InputError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

AUDIO_TOKEN = "<|AUDIO|>"
IMAGE_TOKEN = "<|IMAGE|>"
VIDEO_TOKEN = "<|VIDEO|>"
AUDIO_BOS_TOKEN = "<|audio_bos|>"
AUDIO_EOS_TOKEN = "<|audio_eos|>"


def _name(src: Any, what: str) -> str:
    """How an input is named in error messages: its path, or a description of the array."""
    if isinstance(src, (str, os.PathLike)):
        return f"{what} '{os.fspath(src)}'"
    shape = getattr(src, "shape", None)
    return f"{what} (array of shape {tuple(shape)})" if shape is not None else f"{what} ({type(src).__name__})"


# ======================================================================================
# processor settings files


PROCESSOR_CONFIG = "processor_config.json"
PREPROCESSOR_CONFIG = "preprocessor_config.json"
VIDEO_PREPROCESSOR_CONFIG = "video_preprocessor_config.json"

# Keys each component reads. A transformers 5 ``save_pretrained`` of a processor loaded from the
# published flat file copies every flat key into every section, so a section may carry another
# component's keys: a key is unknown only when no component knows it.
_VISION_KEYS = frozenset({
    "size", "min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size", "image_mean",
    "image_std", "rescale_factor", "do_resize", "do_rescale", "do_normalize", "resample", "do_convert_rgb"})
_VIDEO_ONLY_KEYS = frozenset({
    "cap_pixels_per_frame", "max_video_tokens", "do_sample_frames", "fps", "num_frames", "min_frames", "max_frames"})
_AUDIO_KEYS = frozenset({
    "feature_size", "sampling_rate", "hop_length", "chunk_length", "n_fft", "padding_value", "dither", "padding_side"})
# Keys that change nothing in the reference's outputs either: class names, values transformers
# recomputes (n_samples, nb_max_frames), call options Qwen2_5OmniProcessor sets itself
# (return_attention_mask, padding, truncation), output bookkeeping, and steps Qwen2-VL's
# processors do not run (center crop, padding).
_INFORMATIONAL_KEYS = frozenset({
    "processor_class", "_processor_class", "auto_map", "image_processor_type", "video_processor_type",
    "feature_extractor_type", "n_samples", "nb_max_frames", "return_attention_mask", "padding", "truncation",
    "max_length", "pad_to_multiple_of", "load_audio_backend", "return_tensors", "return_metadata",
    "video_metadata", "device", "input_data_format", "data_format", "default_to_square", "disable_grouping",
    "image_seq_length", "crop_size", "do_center_crop", "do_pad", "pad_size"})
_KNOWN_KEYS = _VISION_KEYS | _VIDEO_ONLY_KEYS | _AUDIO_KEYS | _INFORMATIONAL_KEYS
# processor_config.json's own top level: the nested sections and the processor's bookkeeping
_SECTIONS = ("image_processor", "video_processor", "feature_extractor", "audio_processor")
_PROCESSOR_TOP_KEYS = frozenset(_SECTIONS) | {"processor_class", "auto_map", "chat_template"}


def _show(v) -> str:
    """A setting's value as it reads in its JSON file (``repr`` for what JSON cannot write)."""
    try:
        return json.dumps(v)
    except (TypeError, ValueError):
        return repr(v)


class _Settings:
    """One component's settings as read from one file, and how to name a key of it in messages:
    ``<file>: <section>.<key>`` for a nested section, ``<file>: <key>`` for a flat file."""

    def __init__(self, values: dict, path: str, section: str | None = None):
        self.values, self.path = values, path
        self.prefix = f"{section}." if section else ""
        self.ignored: list[str] = []  # settings read but not applied, each with the reason

    def _bad(self, key: str, what: str, v) -> "Exception":
        from .errors import CheckpointError

        return CheckpointError(f"{self.path}: {self.prefix}{key}: expected {what}, got {_show(v)}")

    def get(self, key: str):
        return self.values.get(key)

    def ignore(self, key: str, why: str) -> None:
        self.ignored.append(f"{self.prefix}{key} = {_show(self.values.get(key))} ({why})")

    def positive_int(self, key: str) -> int | None:
        """A positive integer (JSON integer, or a float with an integral value), None when absent."""
        return self._positive_int(key, self.values.get(key))

    def _positive_int(self, key: str, v) -> int | None:
        if v is None:
            return None
        if isinstance(v, float) and math.isfinite(v) and v == int(v):
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise self._bad(key, "a positive integer", v)
        return v

    def number(self, key: str, *, positive: bool = False, nonnegative: bool = False) -> float | None:
        v = self.values.get(key)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (
                positive and v <= 0) or (nonnegative and v < 0):
            raise self._bad(key, "a positive number" if positive else "a non-negative number" if nonnegative
                            else "a finite number", v)
        return float(v)

    def flag(self, key: str) -> bool | None:
        v = self.values.get(key)
        if v is None:
            return None
        if not isinstance(v, bool):
            raise self._bad(key, "true or false", v)
        return v

    def channels(self, key: str, *, positive: bool = False) -> tuple[float, ...] | None:
        """Per-channel statistics: a list of 3 numbers, or one number for all channels."""
        v = self.values.get(key)
        if v is None:
            return None
        items = list(v) if isinstance(v, (list, tuple)) else [v] * 3
        if len(items) != 3 or any(isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t)
                                  or (positive and t <= 0) for t in items):
            raise self._bad(key, "3 " + ("positive " if positive else "") + "numbers (one per RGB channel)", v)
        return tuple(float(t) for t in items)

    def pixel_bounds(self) -> tuple[int | None, int | None]:
        """``(min_pixels, max_pixels)`` as Qwen2-VL's processors take them: ``size``'s
        ``shortest_edge``/``longest_edge``, each overridden by a top-level ``min_pixels``/``max_pixels``."""
        size = self.values.get("size")
        if size is not None and not isinstance(size, dict):
            raise self._bad("size", 'an object {"shortest_edge": min_pixels, "longest_edge": max_pixels}', size)
        size = size or {}
        lo = self.positive_int("min_pixels")
        if lo is None:
            lo = self._positive_int("size.shortest_edge", size.get("shortest_edge"))
        hi = self.positive_int("max_pixels")
        if hi is None:
            hi = self._positive_int("size.longest_edge", size.get("longest_edge"))
        if self.values.get("size") is not None and (lo is None or hi is None):
            # transformers refuses such a size at the first call
            raise self._bad("size", 'an object with "shortest_edge" and "longest_edge" (pixel bounds)',
                            self.values["size"])
        return lo, hi


def _read_json_object(path: str) -> dict | None:
    """The JSON object in ``path``; None when the file does not exist."""
    if not os.path.exists(path):
        return None
    from .errors import CheckpointError

    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return d


def _unknown_keys(d: dict, prefix: str = "") -> list[str]:
    return [f"{prefix}{k}" for k in d if k not in _KNOWN_KEYS]


def _processor_settings(directory: str | None) -> tuple[dict[str, _Settings], dict[str, list[str]]]:
    """Each component's settings (``image``, ``video``, ``audio``; absent when no file has them),
    found as transformers 5 finds them, and the unknown keys of each file read.

    Per component, the section of ``processor_config.json`` (``image_processor``,
    ``video_processor``, ``feature_extractor`` or ``audio_processor``; what transformers 5 writes)
    takes precedence; without one, the flat legacy file is read: ``preprocessor_config.json``
    for images and audio, ``video_preprocessor_config.json`` and then ``preprocessor_config.json``
    for video. A file no component is read from is not opened."""
    from .errors import CheckpointError

    found: dict[str, _Settings] = {}
    unknown: dict[str, list[str]] = {}
    if not directory:
        return found, unknown
    nested_path = os.path.join(directory, PROCESSOR_CONFIG)
    nested = _read_json_object(nested_path)
    if nested is not None:
        unknown[nested_path] = [k for k in nested if k not in _PROCESSOR_TOP_KEYS]
        for section in _SECTIONS:
            if nested.get(section) is not None and not isinstance(nested[section], dict):
                raise CheckpointError(f"{nested_path}: {section}: expected a JSON object")
            if isinstance(nested.get(section), dict):
                unknown[nested_path] += _unknown_keys(nested[section], f"{section}.")
        for kind, sections in (("image", ("image_processor",)), ("video", ("video_processor",)),
                               ("audio", ("feature_extractor", "audio_processor"))):
            section = next((s for s in sections if isinstance(nested.get(s), dict)), None)
            if section is not None:
                found[kind] = _Settings(nested[section], nested_path, section)
    legacy = {"image": (PREPROCESSOR_CONFIG,), "video": (VIDEO_PREPROCESSOR_CONFIG, PREPROCESSOR_CONFIG),
              "audio": (PREPROCESSOR_CONFIG,)}
    read: dict[str, dict | None] = {}
    for kind, names in legacy.items():
        if kind in found:
            continue
        for name in names:
            path = os.path.join(directory, name)
            if path not in read:
                read[path] = _read_json_object(path)
                if read[path] is not None:
                    unknown[path] = _unknown_keys(read[path])
            if read[path] is not None:
                found[kind] = _Settings(read[path], path)
                break
    return found, unknown


def _warn_ignored(unknown: dict[str, list[str]], settings: Sequence[_Settings]) -> None:
    """One warning per file naming the settings of it that are not applied."""
    by_file = {path: [f"{k} (unknown)" for k in keys] for path, keys in unknown.items()}
    for s in settings:
        by_file.setdefault(s.path, []).extend(s.ignored)
    for path, items in by_file.items():
        items = list(dict.fromkeys(items))  # a flat file read for several components names a setting once
        if items:
            warnings.warn(f"{path}: omni-jax does not apply these processor settings: {'; '.join(items)}")


# ======================================================================================
# audio


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
    def from_dir(cls, directory: str | None) -> "AudioFeatureConfig":
        """The settings in a checkpoint directory (:func:`processor_configs`); defaults without any."""
        return processor_configs(directory)[0]


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
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann
    mel = _mel_filters(cfg)
    out = np.empty((num_frames, cfg.feature_size), np.float64)
    for s in range(0, num_frames, 4096):
        spec = np.fft.rfft(frames[s:s + 4096] * window, n=n_fft, axis=-1)
        out[s:s + 4096] = np.log10(np.maximum((spec.real ** 2 + spec.imag ** 2) @ mel, 1e-10))
    return out.T


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


# ======================================================================================
# images


@dataclass(frozen=True)
class VisionProcessConfig:
    """Image / video preprocessing settings: the checkpoint's Qwen2-VL image and video processors
    (see :func:`processor_configs`) and qwen-omni-utils' video constants.

    ``min_pixels``/``max_pixels`` bound images (published: 3136 and 12845056). The patch,
    statistics and ``do_*`` fields are the image processor's; ``video`` holds the video
    processor's when the checkpoint's differ (:meth:`for_video`). The video bounds are
    qwen-omni-utils' constants and the video ``size`` ``Qwen2_5OmniProcessor`` passes at every
    call (``video_min_pixels``/``video_max_pixels``: 128 and 768 tokens of 28 x 28 pixels),
    which replaces the video processor's own ``size``. ``cap_pixels_per_frame`` and
    ``max_video_tokens`` are the video processor's optional per-frame cap.
    """

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 16384
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    # video (qwen-omni-utils, and the size Qwen2_5OmniProcessor gives its video processor)
    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768
    video_min_pixels: int = 128 * 28 * 28
    video_max_pixels: int = 768 * 28 * 28
    video_total_pixels: float = 128000 * 28 * 28 * 0.9
    # the video processor's per-frame cap (transformers' cap_pixels_per_frame)
    cap_pixels_per_frame: bool = False
    max_video_tokens: int = 128000
    # the video processor's settings, when they differ from the image processor's
    video: "VisionProcessConfig | None" = None

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def for_video(self) -> "VisionProcessConfig":
        """The settings video preprocessing uses: the video processor's patch sizes, statistics,
        ``do_*`` flags and cap (``video``, or these when it is None) with this config's
        qwen-omni-utils fields (``fps``, frame bounds, ``video_*_pixels``)."""
        if self.video is None:
            return self
        return replace(self.video, fps=self.fps, min_frames=self.min_frames, max_frames=self.max_frames,
                       video_min_pixels=self.video_min_pixels, video_max_pixels=self.video_max_pixels,
                       video_total_pixels=self.video_total_pixels, video=None)

    @staticmethod
    def _kwargs(s: _Settings, *, video: bool) -> dict[str, Any]:
        """The fields one Qwen2-VL image (``video=False``) or video processor section sets."""
        kw: dict[str, Any] = {}
        lo, hi = s.pixel_bounds()  # validated for both; applied to images only (see the class notes)
        if not video:
            kw.update({k: v for k, v in (("min_pixels", lo), ("max_pixels", hi)) if v is not None})
        for name in ("patch_size", "temporal_patch_size", "merge_size"):
            if (v := s.positive_int(name)) is not None:
                kw[name] = v
        if (v := s.channels("image_mean")) is not None:
            kw["image_mean"] = v
        if (v := s.channels("image_std", positive=True)) is not None:
            kw["image_std"] = v
        if (v := s.number("rescale_factor", positive=True)) is not None:
            kw["rescale_factor"] = v
        for name in ("do_resize", "do_rescale", "do_normalize"):
            if (v := s.flag(name)) is not None:
                kw[name] = v
        if s.get("resample") not in (None, 3):
            s.ignore("resample", "omni-jax resizes with antialiased bicubic, 3")
        if s.flag("do_convert_rgb") is False:
            s.ignore("do_convert_rgb", "omni-jax always converts to RGB")
        if video:
            if (v := s.flag("cap_pixels_per_frame")) is not None:
                kw["cap_pixels_per_frame"] = v
            if (v := s.positive_int("max_video_tokens")) is not None:
                kw["max_video_tokens"] = v
            # frame sampling settings: used by transformers only with do_sample_frames, which
            # samples again the frames it is given; omni-jax samples once, as qwen-omni-utils does
            s.number("fps", positive=True)
            for name in ("num_frames", "min_frames", "max_frames"):
                s.positive_int(name)
            if s.flag("do_sample_frames") and (s.get("fps") is not None or s.get("num_frames") is not None):
                s.ignore("do_sample_frames", "omni-jax samples frames once, with qwen-omni-utils' rule")
        return kw

    @classmethod
    def _from_kwargs(cls, image_kw: dict, video_kw: dict) -> "VisionProcessConfig":
        img = cls(**image_kw)
        vid = cls(**{**video_kw, "min_pixels": img.min_pixels, "max_pixels": img.max_pixels})
        return img if vid == img else replace(img, video=vid)

    @classmethod
    def from_dict(cls, d: dict) -> "VisionProcessConfig":
        """From one flat dict of settings (``preprocessor_config.json``'s layout), which the image
        and the video processor both read, as transformers does with that file."""
        si, sv = _Settings(d, "vision settings"), _Settings(d, "vision settings")
        cfg = cls._from_kwargs(cls._kwargs(si, video=False), cls._kwargs(sv, video=True))
        _warn_ignored({si.path: _unknown_keys(d)}, [si, sv])
        return cfg

    @classmethod
    def from_dir(cls, directory: str | None) -> "VisionProcessConfig":
        """The settings in a checkpoint directory (:func:`processor_configs`); defaults without any."""
        return processor_configs(directory)[1]


def processor_configs(directory: str | None) -> tuple[AudioFeatureConfig, VisionProcessConfig]:
    """The audio and vision preprocessing settings of a checkpoint directory, read as
    ``Qwen2_5OmniProcessor.from_pretrained`` of transformers 5 reads them.

    Both layouts are read: the nested ``processor_config.json`` that transformers 5's
    ``save_pretrained`` writes (sections ``image_processor``, ``video_processor`` and
    ``feature_extractor``) and the flat ``preprocessor_config.json`` of the published
    checkpoints (with ``video_preprocessor_config.json``, if present, for video). Per component,
    ``processor_config.json``'s section takes precedence, and the flat file is read only for a
    component it has no section for (transformers' own order). Missing settings take the
    published values. Settings omni-jax does not apply (unknown keys, unsupported values) give
    one warning per file naming them; malformed values raise :class:`CheckpointError` naming the
    file and the key.
    """
    found, unknown = _processor_settings(directory)
    audio = AudioFeatureConfig._from_settings(found["audio"]) if "audio" in found else AudioFeatureConfig()
    image_kw = VisionProcessConfig._kwargs(found["image"], video=False) if "image" in found else {}
    video_kw = VisionProcessConfig._kwargs(found["video"], video=True) if "video" in found else {}
    vision = VisionProcessConfig._from_kwargs(image_kw, video_kw)
    _warn_ignored(unknown, list(found.values()))
    return audio, vision


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280, *, qwen_utils: bool = False,
                 name: str = "image") -> tuple[int, int]:
    """(height, width) rounded to multiples of ``factor`` with their product in
    ``[min_pixels, max_pixels]``, keeping the aspect ratio (Qwen2-VL's rule).

    The default is transformers' form (the image and video processors). ``qwen_utils=True``
    is qwen-omni-utils' form, which keeps each rounded side at least ``factor`` before the
    bounds are applied and does not clamp the shrunk sides; the two differ only for sides
    that round to zero (at most ``factor / 2``) or extreme shrinking."""
    if min(height, width) <= 0:
        raise InputError(f"{name}: empty image ({height}x{width})")
    if max(height, width) / min(height, width) > 200:
        raise InputError(f"{name}: aspect ratio {max(height, width) / min(height, width):.1f} is above the "
                         f"limit of 200 ({height}x{width})")
    floor_side = factor if qwen_utils else 0
    h_bar = max(floor_side, round(height / factor) * factor)
    w_bar = max(floor_side, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
        if not qwen_utils:
            h_bar, w_bar = max(factor, h_bar), max(factor, w_bar)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _rgb_from_array(a: np.ndarray, what: str) -> np.ndarray:
    if a.dtype != np.uint8:
        raise InputError(f"{what}: expected a uint8 array (H, W, 3), got dtype {a.dtype}")
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise InputError(f"{what}: expected an array of shape (H, W, 3), got {a.shape}")
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    elif a.shape[-1] == 4:  # composite onto white, as transformers' torchvision backend
        # to_dtype(float32, scale=True), rgb * a + (1 - a), to_dtype(uint8, scale=True): all in
        # float32, and the last step truncates x * (255 + 1 - 1e-3) (torchvision's rounding trick)
        x = a.astype(np.float32) * np.float32(1.0 / 255)
        alpha = x[..., 3:4]
        x = x[..., :3] * alpha + (np.float32(1.0) - alpha)
        a = (x * np.float32(255.0 + 1.0 - 1e-3)).astype(np.uint8)
    return np.ascontiguousarray(a)


def _rgb_from_pil(img, what: str) -> np.ndarray:
    from PIL import Image

    try:
        if "A" in img.getbands() or img.info.get("transparency") is not None:
            img = img.convert("RGBA")
            white = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(white, img).convert("RGB")
        else:
            img = img.convert("RGB")
        return np.asarray(img, dtype=np.uint8).copy()
    except (OSError, ValueError) as e:
        raise InputError(f"{what}: cannot decode image ({e})") from None


MIN_IMAGE_SIDE = 14  # one patch; smaller images carry less than a patch of detail


def load_image(src) -> np.ndarray:
    """RGB uint8 ``[H, W, 3]`` from a path, a PIL image or an ``[H, W, 3|4|1]`` uint8 array.

    Transparency is composited onto white, as transformers' torchvision backend does (PIL's
    ``alpha_composite`` for files and PIL images, a float32 blend for arrays). Unreadable files, and
    images with a side below :data:`MIN_IMAGE_SIDE` pixels or an aspect ratio above 200,
    raise :class:`InputError` naming the file.
    """
    what = _name(src, "image")
    if isinstance(src, (str, os.PathLike)):
        from PIL import Image, UnidentifiedImageError

        path = os.fspath(src)
        if not os.path.isfile(path):
            raise InputError(f"{what}: no such file")
        try:
            with Image.open(path) as img:
                img.load()
                rgb = _rgb_from_pil(img, what)
        except Image.DecompressionBombError as e:  # the header declares more pixels than Pillow will decode
            raise InputError(f"{what}: image too large to decode ({e})") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise InputError(f"{what}: cannot decode image ({e})") from None
    elif isinstance(src, np.ndarray):
        rgb = _rgb_from_array(src, what)
    elif hasattr(src, "getbands") and hasattr(src, "convert"):  # a PIL image
        rgb = _rgb_from_pil(src, what)
    else:
        raise InputError(f"{what}: expected a path, a PIL image or a uint8 array")
    _check_image_size(rgb.shape[0], rgb.shape[1], what)
    return rgb


def _check_image_size(h: int, w: int, what: str) -> None:
    if min(h, w) < MIN_IMAGE_SIDE:
        raise InputError(f"{what}: {h}x{w} pixels is too small (each side needs at least {MIN_IMAGE_SIDE})")
    if max(h, w) / min(h, w) > 200:
        raise InputError(f"{what}: aspect ratio {max(h, w) / min(h, w):.1f} ({h}x{w}) is above the limit of 200")


def patchify(frames: np.ndarray, cfg: VisionProcessConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Normalised float32 ``[T, H, W, C]`` -> (``[T' * gh * gw, C * tp * p * p]``, (T', gh, gw)).

    ``T`` is padded to a multiple of ``temporal_patch_size`` by repeating the last frame.
    Rows run over (t, h-block, w-block, merge row, merge col); a row is laid out as
    (channel, time, patch row, patch col), the reference's layout.
    """
    t, h, w, c = frames.shape
    p, tp, m = cfg.patch_size, cfg.temporal_patch_size, cfg.merge_size
    if h % (p * m) or w % (p * m):
        raise InputError(f"patchify: frame size {h}x{w} is not a multiple of {p * m}")
    if t % tp:
        frames = np.concatenate([frames, np.repeat(frames[-1:], tp - t % tp, axis=0)])
        t = frames.shape[0]
    gt, gh, gw = t // tp, h // p, w // p
    x = frames.reshape(gt, tp, gh // m, m, p, gw // m, m, p, c)
    #                  0   1   2       3  4  5       6  7  8
    x = x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)  # gt, bh, bw, mh, mw, C, tp, ph, pw
    return np.ascontiguousarray(x.reshape(gt * gh * gw, c * tp * p * p)), (gt, gh, gw)


def image_inputs(images: Sequence, cfg: VisionProcessConfig | None = None) -> dict[str, np.ndarray]:
    """``pixel_values`` [N, C * tp * p * p] float32 and ``image_grid_thw`` [B, 3] int64 for images
    (anything :func:`load_image` accepts, or its result), bit-identical to transformers' default
    (torchvision backend) ``Qwen2VLImageProcessor``: ``smart_resize``, torch's uint8 antialiased
    bicubic (:func:`resize_frames`), the fused float32 normalisation (:func:`normalize_video`)."""
    cfg = cfg or VisionProcessConfig()
    pixels, grids = [], []
    for i, src in enumerate(images):
        rgb = load_image(src)
        h, w = rgb.shape[:2]
        if cfg.do_resize:
            h, w = smart_resize(h, w, cfg.factor, cfg.min_pixels, cfg.max_pixels, name=_name(src, "image"))
        x = normalize_video(resize_frames(rgb[None], h, w), cfg)  # [1, h, w, C]
        pv, grid = patchify(np.broadcast_to(x, (cfg.temporal_patch_size, *x.shape[1:])), cfg)
        pixels.append(pv)
        grids.append(grid)
    return {"pixel_values": np.concatenate(pixels, axis=0),
            "image_grid_thw": np.asarray(grids, dtype=np.int64).reshape(-1, 3)}


# ======================================================================================
# video


@dataclass
class Video:
    """Sampled frames of a video and what is needed to preprocess them."""

    frames: np.ndarray  # [T, H, W, 3] uint8, the sampled frames at their source size
    indices: np.ndarray  # int64 [T], which source frames
    video_fps: float  # the source's frame rate
    total_frames: int  # frames in the source
    audio: np.ndarray | None = None  # float32 mono 16 kHz audio track (load_audio=True), None if silent
    name: str = "video"

    @property
    def sample_fps(self) -> float:
        """Frames per second of the sampled frames (qwen-omni-utils' ``sample_fps``)."""
        return len(self.indices) / max(self.total_frames, 1e-6) * self.video_fps


def num_sampled_frames(total_frames: int, video_fps: float, cfg: VisionProcessConfig | None = None, *,
                       name: str = "video") -> int:
    """qwen-omni-utils' ``smart_nframes`` for ``fps`` sampling."""
    cfg = (cfg or VisionProcessConfig()).for_video()
    f = cfg.temporal_patch_size
    min_frames = math.ceil(cfg.min_frames / f) * f
    max_frames = math.floor(min(cfg.max_frames, total_frames) / f) * f
    n = total_frames / video_fps * cfg.fps
    n = min(min(max(n, min_frames), max_frames), total_frames)
    n = math.floor(n / f) * f
    if not (f <= n <= total_frames):
        raise InputError(f"{name}: {total_frames} frame(s) cannot be sampled into temporal pairs "
                         f"(a video needs at least {f} frames)")
    return int(n)


def sample_indices(total_frames: int, num: int) -> np.ndarray:
    """``torch.linspace(0, total_frames - 1, num).round()`` reproduced with numpy.

    torch computes linspace in float32, stepping from the start for the first half and
    back from the end for the second; ``round`` is half to even (as ``np.rint``)."""
    start, end = np.float32(0.0), np.float32(total_frames - 1)
    if num == 1:
        return np.zeros(1, np.int64)
    step = np.float32((end - start) / np.float32(num - 1))
    i = np.arange(num)
    half = num // 2
    lo = start + step * i[:half].astype(np.float32)
    hi = end - step * (num - 1 - i[half:]).astype(np.float32)
    vals = np.concatenate([lo, hi]).astype(np.float32)
    return np.rint(vals).astype(np.int64)


def _to_float_fps(rate) -> float | None:
    try:
        v = float(rate)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return v if v > 0 and math.isfinite(v) else None


def _decode_video_frames(path: str, cfg: VisionProcessConfig, what: str, fps_override: float | None = None):
    import av

    def open_stream():
        try:
            container = av.open(path)
        except Exception as e:
            raise InputError(f"{what}: cannot open video ({type(e).__name__}: {e})") from None
        if not container.streams.video:
            container.close()
            raise InputError(f"{what}: the file has no video stream")
        return container, container.streams.video[0]

    def decode(wanted: set[int] | None):
        container, stream = open_stream()
        stream.thread_type = "AUTO"
        kept: dict[int, np.ndarray] = {}
        count = 0
        try:
            for frame in container.decode(stream):
                if wanted is None or count in wanted:
                    kept[count] = frame.to_ndarray(format="rgb24")
                count += 1
        except av.error.FFmpegError as e:
            if count == 0:
                raise InputError(f"{what}: cannot decode video ({e})") from None
            # a damaged tail: keep what decoded, as players do
        finally:
            container.close()
        return kept, count

    container, stream = open_stream()
    fps = _to_float_fps(stream.average_rate) or _to_float_fps(stream.guessed_rate) or _to_float_fps(
        stream.base_rate)
    declared = int(stream.frames or 0)
    container.close()
    if fps_override is not None:
        fps = float(fps_override)
    if fps is None:
        raise InputError(f"{what}: the video stream has no frame rate")
    total = declared
    if total > 0:
        idx = sample_indices(total, num_sampled_frames(total, fps, cfg, name=what))
        kept, count = decode(set(idx.tolist()))
        if count == total:
            return [kept[i] for i in idx.tolist()], idx, fps, total
    _, count = decode(set())  # the header's frame count is missing or wrong: count them
    if count == 0:
        raise InputError(f"{what}: the video has no frames")
    idx = sample_indices(count, num_sampled_frames(count, fps, cfg, name=what))
    kept, count2 = decode(set(idx.tolist()))
    if count2 != count:
        raise InputError(f"{what}: the video decodes differently on each pass ({count} vs {count2} frames)")
    return [kept[i] for i in idx.tolist()], idx, fps, count


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


def load_video_audio(path, target_rate: int = 16000) -> np.ndarray | None:
    """The audio track of a video file, mono float32 at ``target_rate``; None if it is silent."""
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise InputError(f"{_name(p, 'video')}: no such file")
    wav, _ = _decode_audio_track(p, target_rate)
    return wav


def load_video(src, fps: float | None = None, *, load_audio: bool = False,
               cfg: VisionProcessConfig | None = None, audio_rate: int = 16000) -> Video:
    """Read a video and sample its frames (qwen-omni-utils' rule, see the module notes).

    ``src`` is a path (decoded with PyAV; ``fps`` overrides the container's frame rate) or a
    ``[T, H, W, 3]`` uint8 array (``fps``, its frame rate, is then required). With
    ``load_audio`` the file's audio track is decoded too (``Video.audio``, None when the
    file has none). Errors raise :class:`InputError` naming the file.
    """
    cfg = cfg or VisionProcessConfig()
    what = _name(src, "video")
    audio = None
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        if not os.path.isfile(path):
            raise InputError(f"{what}: no such file")
        if fps is not None and not float(fps) > 0:
            raise InputError(f"{what}: fps must be positive, got {fps}")
        frames, idx, video_fps, total = _decode_video_frames(path, cfg, what, fps)
        if load_audio:
            audio, _ = _decode_audio_track(path, audio_rate)
        if len({f.shape for f in frames}) != 1:
            raise InputError(f"{what}: the frame size changes within the video "
                             f"({sorted({f.shape[:2] for f in frames})})")
        frames = np.stack(frames)
    else:
        if fps is None or not float(fps) > 0:
            raise InputError(f"{what}: a video array needs its frame rate (fps)")
        arr = np.asarray(src)
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
            raise InputError(f"{what}: expected a uint8 array of shape (T, H, W, 3), got {arr.dtype} {arr.shape}")
        total = arr.shape[0]
        if total == 0:
            raise InputError(f"{what}: the video has no frames")
        video_fps = float(fps)
        idx = sample_indices(total, num_sampled_frames(total, video_fps, cfg, name=what))
        frames = arr[idx]
        if load_audio:
            raise InputError(f"{what}: a video array has no audio track; pass the audio separately")
    if frames.shape[0] == 0:
        raise InputError(f"{what}: the video has no frames")
    _check_image_size(frames.shape[1], frames.shape[2], what)
    return Video(frames=np.ascontiguousarray(frames), indices=np.asarray(idx, np.int64), video_fps=float(video_fps),
                 total_frames=int(total), audio=audio, name=what)


def video_frame_size(height: int, width: int, num_frames: int, cfg: VisionProcessConfig | None = None, *,
                     name: str = "video") -> tuple[int, int]:
    """The size every frame is resized to: qwen-omni-utils' per-frame budget, then the video
    processor's own ``smart_resize`` (``video_min_pixels``/``video_max_pixels``, the size
    ``Qwen2_5OmniProcessor`` passes; with ``cap_pixels_per_frame`` the upper bound is also held
    to an even share of ``max_video_tokens`` as transformers computes it), unless the video
    processor has ``do_resize`` off."""
    cfg = (cfg or VisionProcessConfig()).for_video()
    f = cfg.temporal_patch_size
    budget = max(min(cfg.video_max_pixels, cfg.video_total_pixels / num_frames * f),
                 int(cfg.video_min_pixels * 1.05))
    h, w = smart_resize(height, width, cfg.factor, cfg.video_min_pixels, budget, qwen_utils=True, name=name)
    if not cfg.do_resize:
        return h, w
    max_pixels = cfg.video_max_pixels
    if cfg.cap_pixels_per_frame:
        total = int(cfg.max_video_tokens * cfg.factor * cfg.factor * 0.9)
        max_pixels = max(min(max_pixels, total * f // num_frames), int(cfg.video_min_pixels * 1.05))
    return smart_resize(h, w, cfg.factor, cfg.video_min_pixels, max_pixels, name=name)


def _aa_bicubic_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """torch's uint8 antialiased bicubic weights for one axis: ``(idx, k, precision)``.

    A numpy port of ``HelperInterpBase::_compute_index_ranges_int16_weights`` (aten's
    ``UpSampleKernel.cpp``, ``antialias=True``, ``align_corners=False``, no explicit scale):
    Pillow's support window (``scale = in / out``, support ``2 * scale`` when shrinking, else
    2; Keys cubic with ``a = -0.5``), weights in float64 normalised by their sequential sum,
    then int16 fixed point with the precision the largest weight allows (< 2**15 after one more
    bit), rounded half away from zero. ``idx``/``k`` are ``[out, taps]`` (taps with a zero
    weight dropped: they add nothing to the exact integer sum); output ``o`` is
    ``(2**(precision-1) + sum_j x[idx[o, j]] * k[o, j]) >> precision`` clamped to [0, 255].
    """
    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    taps = int(math.ceil(support)) * 2 + 1
    center = scale * (np.arange(out_size) + 0.5)
    xmin = np.maximum((center - support + 0.5).astype(np.int64), 0)  # C++ casts truncate toward zero
    xsize = np.clip(np.minimum((center + support + 0.5).astype(np.int64), in_size) - xmin, 0, taps)
    j = np.arange(taps)
    live = j[None, :] < xsize[:, None]
    x = np.abs(((j[None, :] + xmin[:, None]).astype(np.float64) - center[:, None] + 0.5) * invscale)
    a = -0.5  # Pillow's (and torch's antialiased) bicubic constant
    w = np.where(x < 1.0, ((a + 2) * x - (a + 3)) * x * x + 1,
                 np.where(x < 2.0, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))
    w = np.where(live, w, 0.0)
    total = np.zeros(out_size)
    for t in range(taps):  # the reference's left-to-right sum (numpy's pairwise sum can differ)
        total = total + w[:, t]
    norm = (total != 0.0)[:, None] & live
    w = np.where(norm, w / np.where(total != 0.0, total, 1.0)[:, None], w)
    wt_max = float(np.max(np.where(norm, w, 0.0), initial=0.0))
    precision = 0
    while precision < 22 and int(0.5 + wt_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    v = w * float(1 << precision)
    k = np.where(live, np.where(v < 0, np.trunc(v - 0.5), np.trunc(v + 0.5)), 0.0).astype(np.int32)
    idx = np.minimum(xmin[:, None] + j[None, :], in_size - 1)
    # drop zero taps (bicubic's outer taps often are): move the nonzero ones to the front
    order = np.argsort(k == 0, axis=1, kind="stable")
    k = np.take_along_axis(k, order, axis=1)
    idx = np.take_along_axis(idx, order, axis=1)
    used = max(int((k != 0).sum(axis=1).max(initial=0)), 1)
    return np.ascontiguousarray(idx[:, :used]), np.ascontiguousarray(k[:, :used]), precision


def _aa_resample_axis(x: np.ndarray, axis: int, out_size: int) -> np.ndarray:
    """One separable pass of torch's uint8 antialiased bicubic along ``axis`` of a uint8 array."""
    idx, k, precision = _aa_bicubic_taps(x.shape[axis], out_size)
    if precision < 1:
        raise InputError(f"resize: cannot resample {x.shape[axis]} pixels to {out_size}")
    shape = [1] * x.ndim
    shape[axis] = out_size
    out_shape = x.shape[:axis] + (out_size,) + x.shape[axis + 1:]
    acc = np.full(out_shape, 1 << (precision - 1), np.int32)  # the +0.5 of the rounding
    tmp = np.empty(out_shape, np.int32)
    for t in range(idx.shape[1]):
        np.multiply(np.take(x, idx[:, t], axis=axis), k[:, t].reshape(shape), out=tmp)
        acc += tmp  # exact: |sum| < 255 * 2**16 * taps, far inside int32
    acc >>= precision  # arithmetic shift: floor, as the reference's
    np.clip(acc, 0, 255, out=acc)
    return acc.astype(np.uint8)


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic, antialiased resize of uint8 ``[T, H, W, C]`` frames, bit-identical to torch's.

    This is what transformers' Qwen2-VL video processor (and qwen-omni-utils) run:
    torchvision's ``resize(BICUBIC, antialias=True)`` on a uint8 CPU tensor calls torch's
    native uint8 kernel (``_upsample_bicubic2d_aa``; the AVX2 kernel and the generic one give
    the same numbers), a fixed-point port of Pillow's resampler: the horizontal pass first,
    rounded to uint8, then the vertical pass, each with int16 weights of a per-axis precision
    (see :func:`_aa_bicubic_taps`). An unchanged size returns the frames as they are, as
    torchvision does. Pure numpy, processed a few frames at a time."""
    t, h, w, c = frames.shape
    if (h, w) == (height, width):
        return frames
    if min(height, width) < 1:
        raise InputError(f"resize: invalid target size {height}x{width}")
    out = np.empty((t, height, width, c), np.uint8)
    per = max(1, (1 << 22) // (max(h, height) * max(w, width) * c))  # ~16 MB of int32 per pass
    for s in range(0, t, per):
        x = frames[s:s + per]
        if w != width:
            x = _aa_resample_axis(x, 2, width)
        if h != height:
            x = _aa_resample_axis(x, 1, height)
        out[s:s + per] = x
    return out


def normalize_video(frames: np.ndarray, cfg: VisionProcessConfig) -> np.ndarray:
    """uint8 ``[..., C]`` -> float32 with the fused arithmetic of transformers' torchvision
    backend (its video processor and its default image processor; used for both here): the
    rescale is folded into the statistics, ``(x - mean / r) / (std / r)`` in float32 with
    ``mean / r`` and ``std / r`` rounded to float32 (``r = rescale_factor``). Without
    ``do_rescale`` it is ``(x - mean) / std``; without ``do_normalize``, ``x * r`` (or ``x``)."""
    x = frames.astype(np.float32)
    if not cfg.do_normalize:
        return x * np.float32(cfg.rescale_factor) if cfg.do_rescale else x
    mean = np.asarray(cfg.image_mean, np.float32)
    std = np.asarray(cfg.image_std, np.float32)
    if cfg.do_rescale:
        inv = np.float32(1.0 / cfg.rescale_factor)
        mean, std = mean * inv, std * inv
    return (x - mean) / std


def video_inputs(videos: Sequence[Video], cfg: VisionProcessConfig | None = None,
                 fps: float | None = None) -> dict[str, np.ndarray]:
    """``pixel_values_videos`` [N, C * tp * p * p] float32, ``video_grid_thw`` [B, 3] int64 and
    ``video_second_per_grid`` [B] float64 (``temporal_patch_size / fps``; ``fps`` is the
    processor's argument, 2.0 when None, as in the official pipeline). Keep it float64 for
    :func:`expand_placeholders`: the 2 s chunk boundaries compare ``t * second_per_grid * 25``
    with multiples of 50, which a float32 value can move across (e.g. fps 3). Frames are
    processed with the video processor's settings (:meth:`VisionProcessConfig.for_video`)."""
    cfg = (cfg or VisionProcessConfig()).for_video()
    pixels, grids = [], []
    for v in videos:
        t, h0, w0, _ = v.frames.shape
        h, w = video_frame_size(h0, w0, t, cfg, name=v.name)
        x = normalize_video(resize_frames(v.frames, h, w), cfg)
        pv, grid = patchify(x, cfg)
        pixels.append(pv)
        grids.append(grid)
    fps = 2.0 if fps is None else float(fps)
    return {"pixel_values_videos": np.concatenate(pixels, axis=0),
            "video_grid_thw": np.asarray(grids, dtype=np.int64).reshape(-1, 3),
            "video_second_per_grid": np.full(len(grids), cfg.temporal_patch_size / fps, np.float64)}


# ======================================================================================
# prompt placeholders


def _chunk_sizes(values: np.ndarray, per_chunk: int) -> list[int]:
    """Sizes of the runs of ``values`` (non-decreasing) cut where a value first reaches the next
    multiple of ``per_chunk``; the boundary advances one chunk per cut, as the reference does."""
    sizes = []
    start, boundary = 0, per_chunk
    for i, v in enumerate(values):
        if v >= boundary:
            sizes.append(i - start)
            start = i
            boundary += per_chunk
    sizes.append(len(values) - start)
    return sizes


def video_with_audio_placeholder(grid_thw: Sequence[int], second_per_grid: float, audio_length: int, *,
                                 merge_size: int = 2, position_id_per_seconds: float = 25,
                                 seconds_per_chunk: float = 2.0, video_token: str = VIDEO_TOKEN,
                                 audio_token: str = AUDIO_TOKEN, audio_bos: str = AUDIO_BOS_TOKEN,
                                 audio_eos: str = AUDIO_EOS_TOKEN) -> str:
    """``<|audio_bos|>`` + per 2 s chunk (video tokens, then audio tokens) + ``<|audio_eos|>``."""
    t, h, w = (int(g) for g in grid_thw)
    per_frame = (h // merge_size) * (w // merge_size)
    video_pos = np.repeat(np.arange(t), per_frame) * second_per_grid * position_id_per_seconds
    audio_pos = np.arange(audio_token_count(audio_length))
    per_chunk = int(position_id_per_seconds * seconds_per_chunk)
    v_sizes = _chunk_sizes(video_pos, per_chunk)
    a_sizes = _chunk_sizes(audio_pos, per_chunk)
    parts = [audio_bos]
    for j in range(max(len(v_sizes), len(a_sizes))):
        if j < len(v_sizes):
            parts.append(video_token * v_sizes[j])
        if j < len(a_sizes):
            parts.append(audio_token * a_sizes[j])
    parts.append(audio_eos)
    return "".join(parts)


def expand_placeholders(text: str | Sequence[str], *, audio_lengths: Sequence[int] = (),
                        image_grids: Sequence[Sequence[int]] = (), video_grids: Sequence[Sequence[int]] = (),
                        video_seconds: Sequence[float] | None = None, use_audio_in_video: bool = False,
                        video_audio_lengths: Sequence[int | None] | None = None, merge_size: int = 2,
                        position_id_per_seconds: float = 25, seconds_per_chunk: float = 2.0,
                        audio_token: str = AUDIO_TOKEN, image_token: str = IMAGE_TOKEN,
                        video_token: str = VIDEO_TOKEN, audio_bos: str = AUDIO_BOS_TOKEN,
                        audio_eos: str = AUDIO_EOS_TOKEN) -> str | list[str]:
    """Expand each placeholder token into the processor's run of tokens, in order of appearance.

    ``audio_lengths``: feature lengths (``feature_attention_mask`` sums) of the standalone
    audios, one per ``<|AUDIO|>``; ``image_grids``/``video_grids``: ``(t, h, w)`` grids, one
    per ``<|IMAGE|>``/``<|VIDEO|>``; ``video_seconds``: ``video_second_per_grid`` per video
    (needed with ``use_audio_in_video``). With ``use_audio_in_video``, ``video_audio_lengths``
    gives each video's audio-track feature length (None for a silent video, which keeps its
    plain expansion); the audio of a video has no placeholder of its own.
    ``text`` may be a list (a batch): items are consumed across it in order. A count that
    does not match the placeholders raises :class:`InputError`.
    """
    batch = [text] if isinstance(text, str) else list(text)
    if use_audio_in_video:
        if video_audio_lengths is None:
            raise InputError("use_audio_in_video: video_audio_lengths (one per video) is required")
        if len(video_audio_lengths) != len(video_grids):
            raise InputError(f"use_audio_in_video: {len(video_audio_lengths)} video audio lengths for "
                             f"{len(video_grids)} videos")
        if video_seconds is None or len(video_seconds) != len(video_grids):
            raise InputError("use_audio_in_video: video_seconds (video_second_per_grid, one per video) is required")
    m2 = merge_size * merge_size
    repl: dict[str, list[str]] = {
        audio_token: [audio_token * audio_token_count(n) for n in audio_lengths],
        image_token: [image_token * (int(np.prod(g)) // m2) for g in image_grids],
        video_token: [],
    }
    for i, g in enumerate(video_grids):
        if use_audio_in_video and video_audio_lengths[i] is not None:
            repl[video_token].append(video_with_audio_placeholder(
                g, float(video_seconds[i]), int(video_audio_lengths[i]), merge_size=merge_size,
                position_id_per_seconds=position_id_per_seconds, seconds_per_chunk=seconds_per_chunk,
                video_token=video_token, audio_token=audio_token, audio_bos=audio_bos, audio_eos=audio_eos))
        else:
            repl[video_token].append(video_token * (int(np.prod(g)) // m2))
    for tok, items in repl.items():
        found = sum(s.count(tok) for s in batch)
        if found != len(items):
            raise InputError(f"prompt has {found} {tok} placeholder(s) but {len(items)} input(s) were given")
    tokens = sorted(repl, key=len, reverse=True)
    iters = {tok: iter(items) for tok, items in repl.items()}
    out = []
    for s in batch:
        pieces, i = [], 0
        while True:
            hits = [(s.find(tok, i), tok) for tok in tokens]
            hits = [(pos, tok) for pos, tok in hits if pos >= 0]
            if not hits:
                pieces.append(s[i:])
                break
            pos, tok = min(hits)
            pieces.append(s[i:pos])
            pieces.append(next(iters[tok]))
            i = pos + len(tok)
        out.append("".join(pieces))
    return out[0] if isinstance(text, str) else out


# ======================================================================================
# writing audio


def write_wav(path: str, audio: np.ndarray, sampling_rate: int = 24000) -> None:
    """Write mono float audio in [-1, 1] as a 16-bit PCM WAV, atomically (temp file + rename)."""
    import wave

    x = np.asarray(audio, np.float32).reshape(-1)
    pcm = (np.clip(x, -1.0, 1.0) * 32767.0).round().astype("<i2")
    from .validate import check_output_file

    path = check_output_file(path, "WAV")  # never replaces a device node, FIFO or directory
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with wave.open(tmp, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(int(sampling_rate))
            w.writeframes(pcm.tobytes())
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise InputError(f"{path}: cannot write ({e.strerror})") from None
