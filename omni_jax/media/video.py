"""Video inputs: decoding, frame sampling, per-frame size, and the processor's video tensors.

Frame sampling follows qwen-omni-utils (the reference pipeline of Qwen2.5-Omni): ``fps`` 2.0,
``nframes = total / video_fps * fps`` clamped to ``[4, min(768, total)]`` (both bounds rounded to
even) and floored to even; the indices are ``round(linspace(0, total - 1, nframes))`` computed as
torch does (float32, symmetric from both ends, round half to even). Every frame of a video is
resized to one size: ``smart_resize`` with ``min_pixels = 128 * 28 * 28`` and a per-frame budget
``max(min(768 * 28 * 28, total_pixels / nframes * 2), int(1.05 * min_pixels))`` where
``total_pixels = 128000 * 28 * 28 * 0.9``, then torch's uint8 antialiased bicubic and the fused
float32 normalisation (:mod:`omni_jax.media.image`): video pixel values are bit-identical to
transformers'. Frames are padded to a multiple of ``temporal_patch_size`` by repeating the last one,
and ``video_second_per_grid`` is ``temporal_patch_size / fps`` with the *processor's* ``fps``
argument, 2.0 when not given, as in the official pipeline (which never passes it).

Video files are decoded with PyAV (imported only when needed); the audio track (for
``use_audio_in_video``) is decoded by :mod:`omni_jax.media.audio`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import InputError
from ._naming import _name
from .audio import _decode_audio_track
from .image import VisionProcessConfig, _check_image_size, normalize_video, patchify, resize_frames, smart_resize


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
