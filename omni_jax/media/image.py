"""Image inputs for the vision encoder: loading, resizing, normalisation and patches.

Images follow the Qwen2-VL image processor that ``Qwen2_5OmniProcessor`` and ``AutoImageProcessor``
instantiate in transformers 5 when torchvision is installed: the torchvision backend
``Qwen2VLImageProcessor`` (``Qwen2VLImageProcessorFast`` before the ``Fast`` suffix was dropped;
without torchvision transformers falls back to ``Qwen2VLImageProcessorPil``, whose PIL resize
differs by up to ~1e-2 relative). RGB (transparency composited on white: PIL's ``alpha_composite``
for PIL images, torchvision's float32 blend for RGBA arrays), :func:`smart_resize` to multiples of
``patch_size * merge_size`` within ``[min_pixels, max_pixels]``, then torch's uint8 antialiased
bicubic (:func:`resize_frames`, an exact numpy port of torch's fixed-point port of Pillow's
resampler) and the torchvision backend's fused float32 normalisation (:func:`normalize_video`).
Video frames go through the same resize and normalisation (:mod:`omni_jax.media.video`). The patch
layout is ``[grid_t * grid_h * grid_w, C * temporal_patch_size * patch * patch]`` ordered by
(t, h-block, w-block, merge row, merge col); an image is its own temporal pair. Pixel values are
bit-identical to transformers' (checked in ``tests/test_media.py``).

Pillow is imported only when an image file or PIL image is read.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np

from ..errors import InputError
from ._naming import _name
from .settings import _Settings, _unknown_keys, _warn_ignored, settings_from_dir


OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)


OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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
    def _from_found(cls, found: dict) -> "VisionProcessConfig":
        image_kw = cls._kwargs(found["image"], video=False) if "image" in found else {}
        video_kw = cls._kwargs(found["video"], video=True) if "video" in found else {}
        return cls._from_kwargs(image_kw, video_kw)

    @classmethod
    def from_dir(cls, directory: str | None) -> "VisionProcessConfig":
        """The settings in a checkpoint directory (as :func:`omni_jax.media.processor_configs` reads
        them); defaults without any."""
        return settings_from_dir(cls, directory)


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
