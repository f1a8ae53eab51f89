"""omni_jax.media against transformers' own preprocessing, on media generated here.

References: ``WhisperFeatureExtractor`` (audio features), the Qwen2-VL image processor that
transformers picks by default (image pixel values, bit-identical), ``Qwen2_5OmniProcessor``
(expanded prompts and input ids), torch's ``linspace(...).round()`` and uint8 antialiased bicubic
kernel (qwen-omni-utils' frame sampling and resize), and transformers' Qwen2-VL video processor
(video pixel values, bit-identical).

With torchvision installed, transformers 5 picks the torchvision backend ``Qwen2VLImageProcessor``
(the former ``Qwen2VLImageProcessorFast``) for images, as it does for the video processor; that
is what omni_jax reproduces. torchvision is on PyPI only beside torch 2.14
(``pip install torch==2.14.1 torchvision==0.29.1``, as the README's test command does); the
bit-identical image and video tests require it (they fail without it). Without torchvision, transformers falls back to ``Qwen2VLImageProcessorPil`` (a PIL resize, up
to ~1e-2 relative away; checked loosely, and exactly where no resize happens), and the prompt
tests use a stand-in video processor that returns our video tensors (its prompt expansion, the
part under test there, is transformers' own code).
"""

from __future__ import annotations

import json
import os
import re
import wave

import numpy as np
import pytest

from omni_jax import media
from omni_jax.errors import InputError

av = pytest.importorskip("av")
PIL_Image = pytest.importorskip("PIL.Image")

CFG_JSON = {  # the published Qwen2.5-Omni preprocessor_config.json
    "chunk_length": 300, "dither": 0.0, "feature_extractor_type": "WhisperFeatureExtractor", "feature_size": 128,
    "hop_length": 160, "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "Qwen2VLImageProcessor", "image_std": [0.26862954, 0.26130258, 0.27577711],
    "max_pixels": 12845056, "merge_size": 2, "min_pixels": 3136, "n_fft": 400, "n_samples": 4800000,
    "nb_max_frames": 30000, "padding_side": "right", "padding_value": 0.0, "patch_size": 14,
    "processor_class": "Qwen2_5OmniProcessor", "return_attention_mask": True, "sampling_rate": 16000,
    "temporal_patch_size": 2,
}


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def tone(n, sr=16000, seed=0):
    t = np.arange(n) / sr
    rs = np.random.RandomState(seed)
    return (0.3 * np.sin(2 * np.pi * 440 * t) * np.sin(2 * np.pi * 1.3 * t) + 0.05 * rs.randn(n)).astype(np.float32)


def write_wav(path, data, sr):
    """int16 PCM WAV with the standard library (data: [n] or [n, channels] floats in [-1, 1])."""
    data = np.asarray(data)
    ch = 1 if data.ndim == 1 else data.shape[1]
    pcm = np.clip(np.round(data * 32767), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(ch)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(pcm.tobytes())


def write_mp4(path, n_frames=25, fps=10, h=64, w=80, audio_sr=44100, seconds=2.5, with_audio=True):
    """mpeg4 video whose frame i is flat grey 20 + 8 i (a red square top-left), plus a 440 Hz AAC track."""
    c = av.open(str(path), "w")
    vs = c.add_stream("mpeg4", rate=fps)
    vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
    vs.options = {"qscale": "2"}
    ast = c.add_stream("aac", rate=audio_sr, layout="stereo") if with_audio else None
    for i in range(n_frames):
        img = np.full((h, w, 3), 20 + 8 * i, np.uint8)
        img[: h // 2, : w // 2, 0] = 255 - 8 * i
        for p in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            c.mux(p)
    for p in vs.encode():
        c.mux(p)
    if with_audio:
        t = np.arange(int(audio_sr * seconds)) / audio_sr
        sig = (0.4 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
        data, pts = np.stack([sig, sig]), 0
        for s in range(0, data.shape[1], 1024):
            chunk = np.ascontiguousarray(data[:, s:s + 1024])
            fr = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="stereo")
            fr.sample_rate, fr.pts = audio_sr, pts
            pts += chunk.shape[1]
            for p in ast.encode(fr):
                c.mux(p)
        for p in ast.encode():
            c.mux(p)
    c.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    rs = np.random.RandomState(0)
    out = {"dir": str(d)}
    # stereo 22.05 kHz WAV (exercises mono mix-down and resampling)
    st = np.stack([tone(22050 * 3, 22050, 1), tone(22050 * 3, 22050, 2)], axis=1) * 0.8
    out["wav"] = str(d / "speech.wav")
    write_wav(out["wav"], st, 22050)
    out["png"] = str(d / "img.png")
    PIL_Image.fromarray((rs.rand(61, 93, 3) * 255).astype(np.uint8)).save(out["png"])
    out["tiny_png"] = str(d / "tiny.png")
    PIL_Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(out["tiny_png"])
    out["mp4"] = str(d / "clip.mp4")
    write_mp4(out["mp4"])
    out["silent_mp4"] = str(d / "silent.mp4")
    write_mp4(out["silent_mp4"], n_frames=9, fps=4, with_audio=False)
    for name, data in (("bad.png", b"\x89PNG\r\n\x1a\n" + bytes(rs.randint(0, 256, 300).astype(np.uint8))),
                       ("bad.wav", b"RIFF\x24\x00\x00\x00WAVEfmt garbage" + bytes(100)),
                       ("bad.mp4", bytes(rs.randint(0, 256, 2000).astype(np.uint8)))):
        with open(d / name, "wb") as f:
            f.write(data)
        out[name] = str(d / name)
    out["empty.wav"] = str(d / "empty.wav")
    write_wav(out["empty.wav"], np.zeros(0, np.float32), 16000)
    with open(d / "preprocessor_config.json", "w") as f:
        json.dump(CFG_JSON, f)
    return out


@pytest.fixture(scope="module")
def whisper():
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(**{k: v for k, v in CFG_JSON.items() if k in (
        "feature_size", "sampling_rate", "hop_length", "chunk_length", "n_fft", "padding_value", "dither",
        "return_attention_mask")})


# ------------------------------------------------------------------------------- audio


def test_config_from_dir(files, tmp_path):
    a = media.AudioFeatureConfig.from_dir(files["dir"])
    assert (a.feature_size, a.chunk_length, a.n_samples, a.nb_max_frames) == (128, 300, 4_800_000, 30_000)
    assert media.AudioFeatureConfig.from_dir(str(tmp_path)) == a  # missing file: the published values
    v = media.VisionProcessConfig.from_dir(files["dir"])
    assert (v.min_pixels, v.max_pixels, v.patch_size, v.merge_size, v.temporal_patch_size) == (
        3136, 12845056, 14, 2, 2)
    assert media.VisionProcessConfig.from_dir(str(tmp_path)) == v


@pytest.mark.parametrize("n", [1, 399, 16000 * 3 + 77, 4_800_000 - 123])
def test_log_mel_matches_whisper(whisper, n):
    a = tone(n, seed=n % 7)
    ref = whisper(a, sampling_rate=16000, padding="max_length", return_attention_mask=True, return_tensors="np")
    feats, length = media.log_mel(a, media.AudioFeatureConfig())
    assert feats.shape == ref["input_features"][0].shape == (128, 30000) and feats.dtype == np.float32
    assert rel(feats, ref["input_features"][0]) <= 1e-5
    np.testing.assert_array_equal(media.feature_attention_mask(length), ref["attention_mask"][0])
    trimmed, length2 = media.log_mel(a, pad=False)
    assert length2 == length and trimmed.shape == (128, length)
    np.testing.assert_array_equal(trimmed, feats[:, :length])


def test_audio_inputs_batch_and_token_count(whisper):
    from transformers.models.qwen2_5_omni.processing_qwen2_5_omni import _get_feat_extract_output_lengths

    auds = [tone(16000 * 2 + 5, seed=1), tone(7000, seed=2)]
    ref = whisper(auds, sampling_rate=16000, padding="max_length", return_attention_mask=True, return_tensors="np")
    ours = media.audio_inputs(auds)
    assert rel(ours["input_features"], ref["input_features"]) <= 1e-5
    np.testing.assert_array_equal(ours["feature_attention_mask"], ref["attention_mask"])
    for L in [1, 2, 3, 4, 5, 99, 100, 101, 1000, 30000]:
        assert media.audio_token_count(L) == int(_get_feat_extract_output_lengths(np.array(L)))


def test_load_audio_matches_librosa(files):
    import librosa

    ref, _ = librosa.load(files["wav"], sr=16000)  # what qwen-omni-utils does
    got = media.load_audio(files["wav"])
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert rel(got, ref) <= 1e-6
    raw = np.stack([tone(22050, 22050, 3), tone(22050, 22050, 4)])  # [channels, n]
    np.testing.assert_allclose(media.load_audio(raw, 22050),
                               librosa.resample(raw.mean(0), orig_sr=22050, target_sr=16000), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(media.load_audio(raw[0], 16000), raw[0])


def test_audio_errors(files):
    with pytest.raises(InputError, match="bad.wav"):
        media.load_audio(files["bad.wav"])
    with pytest.raises(InputError, match="empty.wav.*empty"):
        media.load_audio(files["empty.wav"])
    with pytest.raises(InputError, match="nope.wav.*no such file"):
        media.load_audio(os.path.join(files["dir"], "nope.wav"))
    with pytest.raises(InputError, match="sampling_rate"):
        media.load_audio(np.zeros(100, np.float32))
    with pytest.raises(InputError, match="longer than the 300 s"):
        media.log_mel(np.zeros(4_800_001, np.float32))
    with pytest.raises(InputError, match="empty"):
        media.log_mel(np.zeros(0, np.float32))
    with pytest.raises(InputError, match="NaN"):
        media.log_mel(np.array([0.0, np.nan], np.float32))


# ------------------------------------------------------------------------------- images


@pytest.fixture(scope="module")
def image_processor(files):
    """The image processor transformers picks for the checkpoint's ``preprocessor_config.json``
    (``AutoImageProcessor``, as ``Qwen2_5OmniProcessor.from_pretrained`` does): with torchvision
    the torchvision backend ``Qwen2VLImageProcessor``, without it ``Qwen2VLImageProcessorPil``."""
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(files["dir"])


def _is_torchvision_backend(proc):
    return getattr(proc, "backend", None) == "torchvision"


@pytest.fixture(scope="module")
def fast_image_processor(image_processor):
    """transformers' default image processor when torchvision is installed (as in CI): the
    torchvision backend ``Qwen2VLImageProcessor`` (the test extra installs torchvision)."""
    import torchvision  # noqa: F401  (the test extra installs it: transformers' default image processor needs it)
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    assert type(image_processor) is Qwen2VLImageProcessor and _is_torchvision_backend(image_processor)
    return image_processor


@pytest.fixture(scope="module")
def pil_image_processor():
    """transformers' fallback without torchvision (and the slow processor of transformers 4)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=CFG_JSON["min_pixels"], max_pixels=CFG_JSON["max_pixels"])


def _image_cases(files):
    rs = np.random.RandomState(5)
    rgba = np.concatenate([(rs.rand(50, 70, 3) * 255).astype(np.uint8),
                           (rs.rand(50, 70, 1) * 255).astype(np.uint8)], axis=-1)
    base = rs.rand(13, 17, 3) * 255
    return [
        files["png"],  # path: 61x93 rounds to 56x84
        PIL_Image.fromarray(rgba, "RGBA"),  # transparency composited on white (PIL)
        rgba,  # the same as an array: torchvision's float32 blend
        (rs.rand(300, 200, 3) * 255).astype(np.uint8),  # HWC array
        (rs.rand(20, 40) * 255).astype(np.uint8),  # grey array, below min_pixels: upscaled
        (rs.rand(45, 33, 1) > 0.5).astype(np.uint8) * 255,  # one channel, 0/255: overshoot clamped
        np.repeat(np.repeat(base, 9, 0), 9, 1).astype(np.uint8),  # smooth 117x153, shrinks
        (rs.rand(56, 84, 3) * 255).astype(np.uint8),  # already a multiple of 28: no resize
    ]


def _ref_input(src):
    """What the reference is given for a case: PIL for paths and grey 2-D arrays (the processor
    takes a 2-D array for a batch, not an image)."""
    if isinstance(src, str):
        return PIL_Image.open(src)
    if isinstance(src, np.ndarray) and src.ndim == 2:
        return PIL_Image.fromarray(src, "L")
    return src


def test_image_pixels_match_default_image_processor(files, fast_image_processor):
    """Bit-identical to the image processor ``Qwen2_5OmniProcessor`` uses when torchvision is installed."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    cfg = media.VisionProcessConfig.from_dir(files["dir"])
    cases = _image_cases(files)
    for i, src in enumerate(cases):
        ref = fast_image_processor(_ref_input(src), return_tensors="np")
        ours = media.image_inputs([src], cfg)
        np.testing.assert_array_equal(ours["image_grid_thw"], ref["image_grid_thw"], err_msg=f"case {i}")
        assert ours["pixel_values"].shape == ref["pixel_values"].shape and ours["pixel_values"].dtype == np.float32
        assert rel(ours["pixel_values"], ref["pixel_values"]) <= 1e-5, f"case {i}"
        np.testing.assert_array_equal(ours["pixel_values"], ref["pixel_values"], err_msg=f"case {i}")
    # a batch of differently sized images
    ours = media.image_inputs(cases, cfg)
    ref = fast_image_processor([_ref_input(c) for c in cases], return_tensors="np")
    np.testing.assert_array_equal(ours["image_grid_thw"], ref["image_grid_thw"])
    np.testing.assert_array_equal(ours["pixel_values"], ref["pixel_values"])
    # the max_pixels branch: a small budget forces a downscale
    small = media.VisionProcessConfig(max_pixels=28 * 28 * 20)
    ref_proc = Qwen2VLImageProcessor(min_pixels=3136, max_pixels=28 * 28 * 20)
    for img in (cases[3], (np.random.RandomState(6).rand(720, 1280, 3) * 255).astype(np.uint8)):
        ref = ref_proc(img, return_tensors="np")
        ours = media.image_inputs([img], small)
        np.testing.assert_array_equal(ours["image_grid_thw"], ref["image_grid_thw"])
        np.testing.assert_array_equal(ours["pixel_values"], ref["pixel_values"])


def test_image_pixels_near_pil_image_processor(files, pil_image_processor):
    """transformers' fallback without torchvision resizes with PIL: same grids and layout, pixel
    values a little apart after a resize and equal up to float32 rounding without one."""
    cfg = media.VisionProcessConfig.from_dir(files["dir"])
    for i, src in enumerate(_image_cases(files)):
        ref = pil_image_processor(_ref_input(src), return_tensors="np")
        ours = media.image_inputs([src], cfg)
        np.testing.assert_array_equal(ours["image_grid_thw"], ref["image_grid_thw"], err_msg=f"case {i}")
        assert ours["pixel_values"].shape == ref["pixel_values"].shape
        resized = tuple(ours["image_grid_thw"][0, 1:] * cfg.patch_size) != media.load_image(src).shape[:2]
        assert rel(ours["pixel_values"], ref["pixel_values"]) <= (2e-2 if resized else 1e-6), f"case {i}"


def test_smart_resize_matches_reference():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as ref

    for h, w in [(61, 93), (28, 28), (1000, 37), (4000, 3000), (14, 2700), (123, 457), (720, 1280)]:
        for lo, hi in [(3136, 12845056), (3136, 1003520), (100352, 602112)]:
            assert media.smart_resize(h, w, 28, lo, hi) == ref(h, w, 28, lo, hi)
            # qwen-omni-utils' form (used for the per-frame video budget), transcribed from its source
            hb, wb = max(28, round(h / 28) * 28), max(28, round(w / 28) * 28)
            if hb * wb > hi:
                beta = np.sqrt(h * w / hi)
                hb, wb = int(np.floor(h / beta / 28)) * 28, int(np.floor(w / beta / 28)) * 28
            elif hb * wb < lo:
                beta = np.sqrt(lo / (h * w))
                hb, wb = int(np.ceil(h * beta / 28)) * 28, int(np.ceil(w * beta / 28)) * 28
            assert media.smart_resize(h, w, 28, lo, hi, qwen_utils=True) == (hb, wb)


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header that declares ``width`` x ``height`` pixels (no pixel data): a decompression bomb."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_image_whose_header_declares_a_huge_size(tmp_path):
    """Pillow refuses to decode it (DecompressionBombError, not an OSError): an InputError naming the file."""
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png())
    with pytest.raises(InputError, match=r"bomb\.png.*too large"):
        media.load_image(str(path))


def test_image_errors(files):
    with pytest.raises(InputError, match="bad.png"):
        media.load_image(files["bad.png"])
    with pytest.raises(InputError, match="tiny.png.*1x1"):
        media.load_image(files["tiny_png"])
    with pytest.raises(InputError, match="missing.png.*no such file"):
        media.load_image(os.path.join(files["dir"], "missing.png"))
    with pytest.raises(InputError, match="aspect ratio"):
        media.load_image(np.zeros((15, 3100, 3), np.uint8))
    with pytest.raises(InputError, match="uint8"):
        media.load_image(np.zeros((30, 30, 3), np.float32))


# ------------------------------------------------------------------------------- video


def test_frame_sampling_rule():
    import torch

    # the documented rule: 2 fps, floored to even, at least 4 (at most the frame count, and 768)
    cases = {  # (total frames, video fps) -> sampled frames
        (25, 10.0): 4,  # 2.5 s -> 5 -> even 4
        (30, 30.0): 4,  # 1 s -> 2 -> at least 4
        (300, 30.0): 20,  # 10 s
        (301, 29.97): 20,  # 10.04 s -> 20.08 -> 20
        (3, 30.0): 2,  # fewer than 4 frames: all that pair up
        (7, 30.0): 4,
        (100000, 25.0): 768,  # capped
    }
    for (total, fps), n in cases.items():
        assert media.num_sampled_frames(total, fps) == n, (total, fps)
    with pytest.raises(InputError, match="at least 2 frames"):
        media.num_sampled_frames(1, 30.0)
    for total in list(range(2, 80)) + [299, 1001, 4500, 10007]:
        for n in {2, 4, 6, 10, 20, total - total % 2}:
            if 2 <= n <= total:
                ref = torch.linspace(0, total - 1, n).round().long().numpy()
                np.testing.assert_array_equal(media.sample_indices(total, n), ref, err_msg=f"{total} {n}")


def test_video_file_and_audio_track(files):
    v = media.load_video(files["mp4"], load_audio=True)
    assert (v.total_frames, v.video_fps) == (25, 10.0)
    np.testing.assert_array_equal(v.indices, [0, 8, 16, 24])
    assert v.frames.shape == (4, 64, 80, 3)
    with av.open(files["mp4"]) as c:  # every frame, decoded independently
        every = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    assert len(every) == 25
    np.testing.assert_array_equal(v.frames, every[v.indices])
    grey = v.frames[:, 48:, 48:, 1].mean(axis=(1, 2))  # flat grey 20 + 8 i (limited-range YUV in between)
    np.testing.assert_allclose(grey, 20 + 8 * v.indices, atol=5)
    a = v.audio
    assert a.dtype == np.float32 and abs(len(a) - 40000) <= 2048  # 2.5 s at 16 kHz (+ codec padding)
    spec = np.abs(np.fft.rfft(a))
    assert abs(np.argmax(spec) * 16000 / len(a) - 440) < 2
    mid = a[4000:36000]
    assert 0.25 < np.sqrt(np.mean(mid ** 2)) * np.sqrt(2) < 0.55  # 0.4 amplitude sine survives AAC
    np.testing.assert_array_equal(media.load_video_audio(files["mp4"]), a)
    slow = media.load_video(files["mp4"], fps=2.5)  # the given rate overrides the container's
    assert slow.video_fps == 2.5 and len(slow.indices) == 20  # 25 frames at 2.5 fps = 10 s -> 20
    silent = media.load_video(files["silent_mp4"], load_audio=True)
    assert silent.audio is None and silent.total_frames == 9 and len(silent.indices) == 4


def _torch_aa_bicubic(frames, h, w):
    """torch's uint8 antialiased bicubic (what torchvision's resize(BICUBIC, antialias=True)
    calls for a uint8 CPU tensor), on [T, H, W, C] frames."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).contiguous()
    y = torch.nn.functional.interpolate(x, size=(h, w), mode="bicubic", antialias=True)
    return y.permute(0, 2, 3, 1).numpy()


def test_video_resize_bit_identical_to_torch_kernel(files):
    v = media.load_video(files["mp4"])
    h, w = media.video_frame_size(64, 80, 4)
    assert (h, w) == (308, 364) and h % 28 == 0 and w % 28 == 0  # upscaled to >= 128 tokens per frame
    rs = np.random.RandomState(3)
    frames = np.concatenate([v.frames, (rs.rand(2, 64, 80, 3) * 255).astype(np.uint8)])
    np.testing.assert_array_equal(media.resize_frames(frames, h, w), _torch_aa_bicubic(frames, h, w))
    big = (rs.rand(1, 480, 640, 3) * 255).astype(np.uint8)
    h2, w2 = media.video_frame_size(480, 640, 4)
    assert (h2, w2) == (476, 644)  # shrinks one axis, grows the other
    np.testing.assert_array_equal(media.resize_frames(big, h2, w2), _torch_aa_bicubic(big, h2, w2))
    assert media.resize_frames(big, 480, 640) is big  # same size: untouched, as torchvision
    # many shapes: up- and downscaling (to 9x, where the weights' fixed-point precision
    # changes), one axis only, odd sizes; random, 0/255 (overshoot, clamping) and smooth content.
    # Sides are >= 2: torch's own kernels disagree with each other on 1-pixel outputs.
    for case in range(60):
        H, W = rs.randint(2, 120, size=2)
        if case % 3 == 0:
            oh, ow = max(2, H // rs.randint(1, 10)), max(2, W // rs.randint(1, 10))
        elif case % 3 == 1:
            oh, ow = rs.randint(2, 260, size=2)
        else:
            oh, ow = (H, rs.randint(2, 260)) if case % 2 else (rs.randint(2, 260), W)
        if case % 4 == 0:
            x = rs.randint(0, 256, (2, H, W, 3)).astype(np.uint8)
        elif case % 4 == 1:
            x = (rs.rand(2, H, W, 3) > 0.5).astype(np.uint8) * 255
        else:
            base = rs.rand(2, H // 5 + 1, W // 5 + 1, 3) * 255
            x = np.repeat(np.repeat(base, 5, 1), 5, 2)[:, :H, :W].astype(np.uint8)
        np.testing.assert_array_equal(media.resize_frames(x, int(oh), int(ow)), _torch_aa_bicubic(x, oh, ow),
                                      err_msg=f"{H}x{W} -> {oh}x{ow}")


@pytest.fixture(scope="module")
def video_processor():
    """transformers' own Qwen2-VL video processor (the one ``Qwen2_5OmniProcessor`` uses); it
    imports torchvision (``pip install torch==2.14.1 torchvision==0.29.1``: PyPI's torchvision
    does not import beside torch 2.13)."""
    import torchvision  # noqa: F401  (the test extra installs it: transformers' video processor needs it)
    from transformers import Qwen2VLVideoProcessor

    return Qwen2VLVideoProcessor(cap_pixels_per_frame=False)  # few frames: the budget does not bind


def test_video_pixels_match_qwen2vl_video_processor(files, video_processor):
    rs = np.random.RandomState(12)
    videos = [
        media.load_video(files["mp4"]),  # decoded 64x80: upscaled to 308x364
        media.load_video((rs.rand(8, 480, 640, 3) * 255).astype(np.uint8), fps=4.0),  # 476x644
        media.load_video((rs.rand(6, 201, 333, 3) * 255).astype(np.uint8), fps=2.0),  # odd sides
        media.load_video((rs.rand(4, 336, 392, 3) * 255).astype(np.uint8), fps=2.0),  # no resize
        media.load_video((rs.rand(4, 720, 1280, 3) * 255).astype(np.uint8), fps=2.0),  # downscaled
    ]
    for v in videos:
        ours = media.video_inputs([v])
        ref = video_processor(videos=[v.frames], return_tensors="np")
        np.testing.assert_array_equal(ours["video_grid_thw"], ref["video_grid_thw"])
        assert ours["pixel_values_videos"].shape == ref["pixel_values_videos"].shape
        assert rel(ours["pixel_values_videos"], ref["pixel_values_videos"]) <= 1e-5
        np.testing.assert_array_equal(ours["pixel_values_videos"], ref["pixel_values_videos"])  # bit-identical
    # a batch of differently sized videos
    ours = media.video_inputs(videos[:3])
    ref = video_processor(videos=[v.frames for v in videos[:3]], return_tensors="np")
    np.testing.assert_array_equal(ours["video_grid_thw"], ref["video_grid_thw"])
    np.testing.assert_array_equal(ours["pixel_values_videos"], ref["pixel_values_videos"])


def test_video_frame_budget():
    cfg = media.VisionProcessConfig()
    # many frames shrink the per-frame budget: 1280x720 at 768 frames -> total / 768 * 2 pixels
    h, w = media.video_frame_size(720, 1280, 768, cfg)
    assert h * w <= cfg.video_total_pixels / 768 * 2 and h * w >= cfg.video_min_pixels
    h, w = media.video_frame_size(720, 1280, 8, cfg)
    assert h * w <= 768 * 28 * 28 and (h, w) == media.smart_resize(720, 1280, 28, 128 * 28 * 28, 768 * 28 * 28)


def test_video_pixels_match_image_processor_on_frame_pairs(image_processor):
    """Frames A A B B C C D D at their final size: each temporal pair equals one image (of
    transformers' default image processor: bit-identical with torchvision)."""
    rs = np.random.RandomState(7)
    distinct = (rs.rand(4, 336, 392, 3) * 255).astype(np.uint8)
    arr = np.repeat(distinct, 2, axis=0)  # 8 frames at 2 fps: every frame is sampled
    v = media.load_video(arr, fps=2.0)
    np.testing.assert_array_equal(v.indices, np.arange(8))
    ours = media.video_inputs([v])
    assert media.video_frame_size(336, 392, 8) == (336, 392)
    ref = image_processor(list(distinct), return_tensors="np")
    np.testing.assert_array_equal(ours["video_grid_thw"], [[4, 24, 28]])
    np.testing.assert_array_equal(ref["image_grid_thw"][:, 1:], [[24, 28]] * 4)
    assert rel(ours["pixel_values_videos"], ref["pixel_values"]) <= 1e-5
    if _is_torchvision_backend(image_processor):  # the same fused normalisation
        np.testing.assert_array_equal(ours["pixel_values_videos"], ref["pixel_values"])
    np.testing.assert_allclose(ours["video_second_per_grid"], [1.0])
    np.testing.assert_allclose(media.video_inputs([v], fps=0.5)["video_second_per_grid"], [4.0])


def test_patchify_matches_reference_layout_and_pads_frames():
    import torch

    cfg = media.VisionProcessConfig()
    rs = np.random.RandomState(9)
    x = rs.randn(3, 56, 84, 3).astype(np.float32)  # odd frame count: the last is repeated
    ours, grid = media.patchify(x, cfg)
    # the reference video processor's patchify (B=1), transcribed
    v = torch.from_numpy(x).permute(0, 3, 1, 2)[None]
    v = torch.cat([v, v[:, -1:]], dim=1)
    b, t, c, h, w = v.shape
    p, m, tp = 14, 2, 2
    ref = v.view(b, t // tp, tp, c, h // p // m, m, p, w // p // m, m, p).permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    ref = ref.reshape(b, (t // tp) * (h // p) * (w // p), c * tp * p * p)[0].numpy()
    assert grid == (2, 4, 6)
    np.testing.assert_array_equal(ours, ref)


def test_video_errors(files):
    with pytest.raises(InputError, match="bad.mp4"):
        media.load_video(files["bad.mp4"])
    with pytest.raises(InputError, match="no frames"):
        media.load_video(np.zeros((0, 64, 64, 3), np.uint8), fps=2.0)
    with pytest.raises(InputError, match="at least 2 frames"):
        media.load_video(np.zeros((1, 64, 64, 3), np.uint8), fps=2.0)
    with pytest.raises(InputError, match="fps"):
        media.load_video(np.zeros((4, 64, 64, 3), np.uint8))
    with pytest.raises(InputError, match="no video stream"):
        media.load_video(files["wav"])
    with pytest.raises(InputError, match="gone.mp4.*no such file"):
        media.load_video(os.path.join(files["dir"], "gone.mp4"))


# ------------------------------------------------------------------------------- prompts

MM_TOKENS = {"image_token": "<|IMAGE|>", "audio_token": "<|AUDIO|>", "video_token": "<|VIDEO|>",
             "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
             "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>"}


@pytest.fixture(scope="module")
def omni_processor(tmp_path_factory, whisper, image_processor):
    from transformers import PreTrainedTokenizerFast, Qwen2_5OmniProcessor
    from transformers.feature_extraction_utils import BatchFeature
    from transformers.video_processing_utils import BaseVideoProcessor

    from omni_jax.default_model import _train_tokenizer

    d = tmp_path_factory.mktemp("tok")
    _train_tokenizer(512).save(str(d / "tokenizer.json"))
    tok = PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"), extra_special_tokens=MM_TOKENS)

    class StandInVideoProcessor(BaseVideoProcessor):
        """Returns the video tensors it is given (transformers' own needs torchvision)."""

        temporal_patch_size = 2
        merge_size = 2

        def __init__(self):
            self.outputs = None

        def __call__(self, videos, **kwargs):
            return BatchFeature(dict(self.outputs))

    class Processor(Qwen2_5OmniProcessor):
        def check_argument_for_proper_class(self, name, arg):
            if name == "video_processor":
                return type(arg)
            return super().check_argument_for_proper_class(name, arg)

    return Processor(image_processor=image_processor, video_processor=StandInVideoProcessor(),
                     feature_extractor=whisper, tokenizer=tok)


def _short(s):
    return re.sub(r"(<\|[A-Z]+\|>)\1+", lambda m: f"{m.group(1)}*{len(m.group(0)) // len(m.group(1))}", s)


@pytest.mark.parametrize("fps", [None, 0.5, 3.0])
def test_expanded_prompt_matches_omni_processor(files, omni_processor, fps):
    proc = omni_processor
    rs = np.random.RandomState(11)
    aud = [tone(16000 * 3 + 500, seed=3), tone(4321, seed=4)]
    img = (rs.rand(90, 120, 3) * 255).astype(np.uint8)
    vid = media.load_video(files["mp4"], load_audio=True)
    vin = media.video_inputs([vid], fps=fps)
    proc.video_processor.outputs = {k: vin[k] for k in ("pixel_values_videos", "video_grid_thw")}
    text = ["<|im_start|>user\n<|audio_bos|><|AUDIO|><|audio_eos|>Hello <|vision_bos|><|IMAGE|><|vision_eos|>"
            "<|vision_bos|><|VIDEO|><|vision_eos|> and <|audio_bos|><|AUDIO|><|audio_eos|><|im_end|>\n"
            "<|im_start|>assistant\n"]
    kw = {} if fps is None else {"fps": fps}
    ain = media.audio_inputs(aud)
    iin = media.image_inputs([img])
    lengths = ain["feature_attention_mask"].sum(-1).tolist()

    # plain: every placeholder is expanded on its own
    ref = proc(text=list(text), audio=aud, images=[img], videos=[vid.frames], return_tensors="np", **kw)
    ours = media.expand_placeholders(text[0], audio_lengths=lengths, image_grids=iin["image_grid_thw"],
                                     video_grids=vin["video_grid_thw"], video_seconds=vin["video_second_per_grid"])
    ids = proc.tokenizer(ours)["input_ids"]
    assert ids == ref["input_ids"][0].tolist(), (_short(ours), _short(proc.tokenizer.decode(ref["input_ids"][0])))
    assert proc.tokenizer.decode(ref["input_ids"][0]) == ours
    np.testing.assert_array_equal(ain["feature_attention_mask"], ref["feature_attention_mask"])
    assert rel(ain["input_features"], ref["input_features"]) <= 1e-5
    np.testing.assert_array_equal(iin["image_grid_thw"], ref["image_grid_thw"])
    if _is_torchvision_backend(proc.image_processor):  # transformers' default with torchvision
        np.testing.assert_array_equal(iin["pixel_values"], ref["pixel_values"])
    else:  # the PIL fallback
        assert rel(iin["pixel_values"], ref["pixel_values"]) <= 1e-2
    np.testing.assert_allclose(vin["video_second_per_grid"], ref["video_second_per_grid"])

    # use_audio_in_video: the video's track is interleaved in 2 s chunks. The mp4's own track
    # (2.5 s, decoded here), and a 6 s video (3 chunks) with a 6 s track
    vid_len = int(media.audio_inputs([vid.audio])["feature_attention_mask"].sum())
    frames6 = (rs.rand(12, 56, 84, 3) * 255).astype(np.uint8)
    vid6 = media.load_video(frames6, fps=2.0)
    aud6 = tone(16000 * 6, seed=8)
    vin6 = media.video_inputs([vid, vid6], fps=fps)
    len6 = int(media.audio_inputs([aud6])["feature_attention_mask"].sum())
    proc.video_processor.outputs = {k: vin6[k] for k in ("pixel_values_videos", "video_grid_thw")}
    text2 = [text[0].replace("<|VIDEO|>", "<|VIDEO|> <|VIDEO|>", 1)]
    ref2 = proc(text=list(text2), audio=[aud[0], vid.audio, aud6, aud[1]], images=[img],
                videos=[vid.frames, vid6.frames], audio_from_video_indices=[None, 0, 1, None],
                use_audio_in_video=True, return_tensors="np", **kw)
    ours2 = media.expand_placeholders(text2, audio_lengths=lengths, image_grids=iin["image_grid_thw"],
                                      video_grids=vin6["video_grid_thw"], video_seconds=vin6["video_second_per_grid"],
                                      use_audio_in_video=True, video_audio_lengths=[vid_len, len6])
    assert isinstance(ours2, list) and len(ours2) == 1
    assert proc.tokenizer(ours2[0])["input_ids"] == ref2["input_ids"][0].tolist(), _short(ours2[0])
    assert proc.tokenizer.decode(ref2["input_ids"][0]) == ours2[0]
    if fps is None:  # 1 s per grid: each 2 s chunk has 2 grids of video tokens, then 50 audio tokens
        per_grid = int(np.prod(vin6["video_grid_thw"][1])) // 4 // 6
        v, a = "<|VIDEO|>" * (2 * per_grid), "<|AUDIO|>" * 50
        assert " <|audio_bos|>" + (v + a) * 3 + "<|audio_eos|><|vision_eos|>" in ours2[0]
        assert "<|vision_bos|><|audio_bos|><|VIDEO|>" in ours2[0]  # the mp4, first


@pytest.mark.parametrize("fps", [None, 3.0])
def test_omni_processor_with_real_video_processor(files, omni_processor, video_processor, fps):
    """``Qwen2_5OmniProcessor`` with transformers' own video processor, given our decoded frames:
    same video pixels (bit-identical), grids, seconds per grid and input ids, with and without
    use_audio_in_video."""
    from transformers import Qwen2_5OmniProcessor

    proc = Qwen2_5OmniProcessor(image_processor=omni_processor.image_processor, video_processor=video_processor,
                                feature_extractor=omni_processor.feature_extractor, tokenizer=omni_processor.tokenizer)
    rs = np.random.RandomState(13)
    vid = media.load_video(files["mp4"], load_audio=True)
    vid2 = media.load_video((rs.rand(12, 100, 150, 3) * 255).astype(np.uint8), fps=2.0)  # 6 s, 3 chunks
    aud2 = tone(16000 * 6, seed=9)
    kw = {} if fps is None else {"fps": fps}
    text = ["<|im_start|>user\n<|vision_bos|><|VIDEO|><|vision_eos|> and <|vision_bos|><|VIDEO|><|vision_eos|>"
            "<|im_end|>\n<|im_start|>assistant\n"]
    vin = media.video_inputs([vid, vid2], fps=fps)
    for use_audio in (False, True):
        extra = dict(audio=[vid.audio, aud2], audio_from_video_indices=[0, 1], use_audio_in_video=True) \
            if use_audio else {}
        ref = proc(text=list(text), videos=[vid.frames, vid2.frames], return_tensors="np", **extra, **kw)
        np.testing.assert_array_equal(vin["video_grid_thw"], ref["video_grid_thw"])
        np.testing.assert_array_equal(vin["pixel_values_videos"], ref["pixel_values_videos"])
        np.testing.assert_allclose(vin["video_second_per_grid"], ref["video_second_per_grid"])
        lengths = None
        if use_audio:
            lengths = [int(media.audio_inputs([a])["feature_attention_mask"].sum()) for a in (vid.audio, aud2)]
        ours = media.expand_placeholders(text[0], video_grids=vin["video_grid_thw"],
                                         video_seconds=vin["video_second_per_grid"], use_audio_in_video=use_audio,
                                         video_audio_lengths=lengths)
        assert proc.tokenizer(ours)["input_ids"] == ref["input_ids"][0].tolist(), _short(ours)


def test_expand_placeholder_errors():
    with pytest.raises(InputError, match="1 <\\|IMAGE\\|> placeholder.*2 input"):
        media.expand_placeholders("<|IMAGE|>", image_grids=[(1, 4, 4), (1, 4, 4)])
    with pytest.raises(InputError, match="video_audio_lengths"):
        media.expand_placeholders("<|VIDEO|>", video_grids=[(2, 4, 4)], video_seconds=[1.0], use_audio_in_video=True)
    # a silent video keeps its plain expansion under use_audio_in_video
    assert media.expand_placeholders("<|VIDEO|>", video_grids=[(2, 4, 4)], video_seconds=[1.0],
                                     use_audio_in_video=True, video_audio_lengths=[None]) == "<|VIDEO|>" * 8
