"""The checkpoint's processor settings files, read as transformers 5 reads them.

:func:`processor_configs` gives the audio and vision preprocessing settings
(:class:`~omni_jax.media.audio.AudioFeatureConfig`, :class:`~omni_jax.media.image.VisionProcessConfig`)
of a checkpoint directory, from either layout transformers reads: the nested
``processor_config.json`` (transformers 5) or the flat ``preprocessor_config.json`` (published
checkpoints, with ``video_preprocessor_config.json`` for video if present), the nested section
winning per component. Images use the image processor's settings and video the video processor's,
except the video pixel bounds: ``Qwen2_5OmniProcessor`` passes its own (128 to 768 tokens of
28 x 28 pixels) at every call, so the video processor's saved ``size`` has no effect there, nor
here. Settings not applied give one warning per file; malformed values raise
:class:`~omni_jax.errors.CheckpointError` naming the file and the key.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from typing import Sequence

from ..errors import CheckpointError


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


def settings_from_dir(cls, directory: str | None):
    """One settings class's values in a checkpoint directory (``cls._from_found`` of what the files
    hold: the class's defaults where they say nothing), warning once about settings not applied."""
    found, unknown = _processor_settings(directory)
    _warn_ignored(unknown, list(found.values()))
    return cls._from_found(found)
