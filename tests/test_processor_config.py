"""Processor settings files: omni_jax reads what transformers' ``Qwen2_5OmniProcessor`` reads.

transformers 5's ``save_pretrained`` writes one nested ``processor_config.json`` (sections
``image_processor``, ``video_processor``, ``feature_extractor``); the published checkpoints ship
the flat ``preprocessor_config.json``. Each test saves or writes a directory, loads it with
``Qwen2_5OmniProcessor.from_pretrained`` and with omni_jax, and compares the settings and the
processor outputs (image and video pixels bit-identical, audio features to float32 rounding,
input ids identical). Every size setting differs from its default, so a reader that falls back
to defaults gives other grids and other token counts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings

import numpy as np
import pytest

from omni_jax import media
from omni_jax.errors import CheckpointError
from omni_jax.processor import TextProcessor, process_conversations

MM_TOKENS = {"image_token": "<|IMAGE|>", "audio_token": "<|AUDIO|>", "video_token": "<|VIDEO|>",
             "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
             "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>"}
IMAGE_MEAN, IMAGE_STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
FLAT = {  # a flat preprocessor_config.json (the published layout) with non-default values
    "chunk_length": 5, "dither": 0.0, "feature_extractor_type": "WhisperFeatureExtractor", "feature_size": 16,
    "hop_length": 120, "image_mean": list(IMAGE_MEAN), "image_processor_type": "Qwen2VLImageProcessor",
    "image_std": list(IMAGE_STD), "max_pixels": 64 * 28 * 28, "merge_size": 2, "min_pixels": 8 * 28 * 28,
    "n_fft": 300, "n_samples": 80000, "nb_max_frames": 666, "padding_side": "right", "padding_value": 0.0,
    "patch_size": 14, "processor_class": "Qwen2_5OmniProcessor", "return_attention_mask": True,
    "sampling_rate": 16000, "temporal_patch_size": 2,
}


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def tone(n, seed=0):
    t = np.arange(n) / 16000
    rs = np.random.RandomState(seed)
    return (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rs.randn(n)).astype(np.float32)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A tiny tokenizer with the media tokens, saved as transformers saves it."""
    from transformers import PreTrainedTokenizerFast

    from omni_jax.default_model import _train_tokenizer

    d = tmp_path_factory.mktemp("tokenizer")
    _train_tokenizer(512).save(str(d / "tokenizer.json"))
    tok = PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"), extra_special_tokens=MM_TOKENS)
    tok.save_pretrained(str(d))
    return str(d)


def _with_tokenizer(tokenizer_dir, d):
    os.makedirs(d, exist_ok=True)
    for name in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, name), d)
    return str(d)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer_dir):
    """``Qwen2_5OmniProcessor.save_pretrained`` of a processor whose every size setting is changed;
    the image and video processors also differ from each other (statistics, rescale factor,
    temporal patch), and the video processor caps pixels per frame."""
    import torchvision  # noqa: F401  (transformers' Qwen2-VL processors need it)
    from transformers import (AutoTokenizer, Qwen2_5OmniProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor,
                              WhisperFeatureExtractor)

    image = Qwen2VLImageProcessor(size={"shortest_edge": 8 * 28 * 28, "longest_edge": 64 * 28 * 28},
                                  image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD), rescale_factor=1 / 250,
                                  temporal_patch_size=3)
    video = Qwen2VLVideoProcessor(size={"shortest_edge": 16 * 28 * 28, "longest_edge": 100 * 28 * 28},
                                  cap_pixels_per_frame=True, max_video_tokens=700, min_frames=6, max_frames=10,
                                  fps=1.0)
    audio = WhisperFeatureExtractor(feature_size=16, chunk_length=5, hop_length=120, n_fft=300,
                                    return_attention_mask=True)
    proc = Qwen2_5OmniProcessor(image_processor=image, video_processor=video, feature_extractor=audio,
                                tokenizer=AutoTokenizer.from_pretrained(tokenizer_dir))
    d = str(tmp_path_factory.mktemp("saved"))
    proc.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def reference(saved):
    from transformers import Qwen2_5OmniProcessor

    return Qwen2_5OmniProcessor.from_pretrained(saved)


def _read_quietly(d):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no setting of a transformers-written file is left unapplied
        return media.processor_configs(d)


def test_saved_layout_is_nested(saved):
    assert not os.path.exists(os.path.join(saved, "preprocessor_config.json"))
    with open(os.path.join(saved, "processor_config.json")) as f:
        nested = json.load(f)
    assert {"image_processor", "video_processor", "feature_extractor"} <= set(nested)
    assert nested["image_processor"]["size"] == {"shortest_edge": 8 * 28 * 28, "longest_edge": 64 * 28 * 28}


def test_reads_saved_values(saved, reference):
    from transformers import Qwen2_5OmniProcessor

    acfg, vcfg = _read_quietly(saved)
    assert media.AudioFeatureConfig.from_dir(saved) == acfg and media.VisionProcessConfig.from_dir(saved) == vcfg
    ip, vp, fe = reference.image_processor, reference.video_processor, reference.feature_extractor
    assert (vcfg.min_pixels, vcfg.max_pixels) == (ip.size.shortest_edge, ip.size.longest_edge) == (6272, 50176)
    assert (vcfg.patch_size, vcfg.temporal_patch_size, vcfg.merge_size) == (
        ip.patch_size, ip.temporal_patch_size, ip.merge_size) == (14, 3, 2)
    assert vcfg.image_mean == tuple(ip.image_mean) and vcfg.image_std == tuple(ip.image_std)
    assert vcfg.rescale_factor == ip.rescale_factor
    v = vcfg.for_video()  # the video processor's own settings, not the image processor's
    assert (v.patch_size, v.temporal_patch_size, v.merge_size) == (vp.patch_size, vp.temporal_patch_size,
                                                                  vp.merge_size) == (14, 2, 2)
    assert v.image_mean == tuple(vp.image_mean) == media.OPENAI_CLIP_MEAN and v.image_std == tuple(vp.image_std)
    assert v.rescale_factor == vp.rescale_factor == 1 / 255
    assert (v.cap_pixels_per_frame, v.max_video_tokens) == (vp.cap_pixels_per_frame, vp.max_video_tokens) == (
        True, 700)
    # the video pixel bounds are the ones Qwen2_5OmniProcessor passes at every call, not the video
    # processor's saved size (16 to 100 tokens here)
    size = Qwen2_5OmniProcessor.videos_kwargs["size"]
    assert (v.video_min_pixels, v.video_max_pixels) == (size["shortest_edge"], size["longest_edge"])
    assert vp.size.shortest_edge == 16 * 28 * 28
    assert (acfg.feature_size, acfg.sampling_rate, acfg.hop_length, acfg.chunk_length, acfg.n_fft) == (
        fe.feature_size, fe.sampling_rate, fe.hop_length, fe.chunk_length, fe.n_fft) == (16, 16000, 120, 5, 300)
    assert (acfg.padding_value, acfg.dither) == (fe.padding_value, fe.dither)
    assert (acfg.n_samples, acfg.nb_max_frames) == (fe.n_samples, fe.nb_max_frames) == (80000, 666)


def test_outputs_match_reference(saved, reference):
    """One conversation with an audio clip, a 300x200 image and two videos (arrays) through
    omni_jax's processing path, against ``Qwen2_5OmniProcessor`` on the same rendered text."""
    rs = np.random.RandomState(0)
    img = (rs.rand(300, 200, 3) * 255).astype(np.uint8)
    small = (rs.rand(8, 300, 200, 3) * 255).astype(np.uint8)  # upscaled to 392x280, under the cap
    large = (rs.rand(4, 476, 644, 3) * 255).astype(np.uint8)  # qwen-omni-utils keeps it; the cap shrinks it
    aud = tone(16000 * 2 + 345, seed=1)
    conv = [{"role": "user", "content": [
        {"type": "audio", "audio": aud, "sampling_rate": 16000}, {"type": "text", "text": "and"},
        {"type": "image", "image": img}, {"type": "video", "video": small, "fps": 2.0},
        {"type": "video", "video": large, "fps": 2.0}, {"type": "text", "text": "what is this?"}]}]
    text_proc = TextProcessor.from_dir(saved)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = process_conversations(text_proc, [conv], directory=saved)
    vcfg = media.VisionProcessConfig.from_dir(saved)
    videos = [media.load_video(small, 2.0, cfg=vcfg), media.load_video(large, 2.0, cfg=vcfg)]
    assert [len(v.indices) for v in videos] == [8, 4]  # qwen-omni-utils' sampling keeps every frame here
    ref = reference(text=[text_proc.apply_chat_template(conv)], images=[img], videos=[v.frames for v in videos],
                    audio=[aud], return_tensors="np")

    # the image: bounded to 64 x 28 x 28 pixels -> 252x168, 216 patches (308 with the default bounds)
    np.testing.assert_array_equal(ours["image_grid_thw"], [[1, 18, 12]])
    np.testing.assert_array_equal(ours["image_grid_thw"], ref["image_grid_thw"])
    assert ours["pixel_values"].shape == ref["pixel_values"].shape == (216, 3 * 3 * 14 * 14)
    np.testing.assert_array_equal(ours["pixel_values"], ref["pixel_values"])
    # the videos: the processor's 128..768-token bounds (not the saved 16..100), the video processor's
    # statistics and temporal patch, and its per-frame cap on the 476x644 frames (-> 420x560)
    np.testing.assert_array_equal(ours["video_grid_thw"], [[4, 28, 20], [2, 30, 40]])
    np.testing.assert_array_equal(ours["video_grid_thw"], ref["video_grid_thw"])
    np.testing.assert_array_equal(ours["pixel_values_videos"], ref["pixel_values_videos"])
    np.testing.assert_allclose(ours["video_second_per_grid"], ref["video_second_per_grid"])
    # the audio: 16 mel bins, a 5 s window of 666 frames
    assert ours["input_features"].shape == ref["input_features"].shape == (1, 16, 666)
    assert rel(ours["input_features"], ref["input_features"]) <= 1e-5
    np.testing.assert_array_equal(ours["feature_attention_mask"], ref["feature_attention_mask"])
    np.testing.assert_array_equal(ours["input_ids"], ref["input_ids"])


def test_flat_layout(tmp_path, tokenizer_dir):
    """The published layout: one flat preprocessor_config.json for every component."""
    from transformers import Qwen2_5OmniProcessor

    d = _with_tokenizer(tokenizer_dir, tmp_path / "flat")
    with open(os.path.join(d, "preprocessor_config.json"), "w") as f:
        json.dump(FLAT, f)
    acfg, vcfg = _read_quietly(d)
    assert (acfg.feature_size, acfg.chunk_length, acfg.hop_length, acfg.n_fft) == (16, 5, 120, 300)
    assert (vcfg.min_pixels, vcfg.max_pixels, vcfg.image_mean, vcfg.image_std) == (
        8 * 28 * 28, 64 * 28 * 28, IMAGE_MEAN, IMAGE_STD)
    assert vcfg.for_video() == vcfg  # the video processor reads the same file
    ref = Qwen2_5OmniProcessor.from_pretrained(d)
    img = (np.random.RandomState(1).rand(300, 200, 3) * 255).astype(np.uint8)
    r = ref.image_processor(img, return_tensors="np")
    ours = media.image_inputs([img], vcfg)
    np.testing.assert_array_equal(ours["image_grid_thw"], r["image_grid_thw"])
    np.testing.assert_array_equal(ours["pixel_values"], r["pixel_values"])
    frames = (np.random.RandomState(2).rand(4, 300, 200, 3) * 255).astype(np.uint8)
    rv = ref(text=["<|VIDEO|>"], videos=[frames], return_tensors="np")
    ov = media.video_inputs([media.load_video(frames, 2.0, cfg=vcfg)], vcfg)
    np.testing.assert_array_equal(ov["video_grid_thw"], rv["video_grid_thw"])
    np.testing.assert_array_equal(ov["pixel_values_videos"], rv["pixel_values_videos"])
    a = tone(16000 + 77, seed=3)
    ra = ref.feature_extractor(a, sampling_rate=16000, padding="max_length", return_attention_mask=True,
                               return_tensors="np")
    oa = media.audio_inputs([a], acfg)
    assert oa["input_features"].shape == ra["input_features"].shape == (1, 16, 666)
    assert rel(oa["input_features"], ra["input_features"]) <= 1e-5
    np.testing.assert_array_equal(oa["feature_attention_mask"], ra["attention_mask"])
    # a transformers 5 save of a processor loaded from the flat file: every section carries every
    # flat key (the video section the image bounds too); the same settings, and no warning
    ref.save_pretrained(str(tmp_path / "resaved"))
    assert not os.path.exists(tmp_path / "resaved" / "preprocessor_config.json")
    assert _read_quietly(str(tmp_path / "resaved")) == (acfg, vcfg)


def _component_values(ref):
    ip, vp, fe = ref.image_processor, ref.video_processor, ref.feature_extractor
    return (ip.size.shortest_edge, ip.size.longest_edge, tuple(ip.image_mean), tuple(vp.image_mean),
            fe.feature_size, fe.chunk_length)


def _our_values(d):
    acfg, vcfg = media.processor_configs(d)
    return (vcfg.min_pixels, vcfg.max_pixels, vcfg.image_mean, vcfg.for_video().image_mean, acfg.feature_size,
            acfg.chunk_length)


def test_layout_precedence(tmp_path, saved, tokenizer_dir):
    """Per component, processor_config.json's section wins; the flat files are read only for a
    component it has no section for (video: video_preprocessor_config.json, then
    preprocessor_config.json), as transformers does."""
    from transformers import Qwen2_5OmniProcessor

    other = dict(FLAT, min_pixels=4 * 28 * 28, max_pixels=32 * 28 * 28, feature_size=24, chunk_length=4,
                 image_mean=[0.1, 0.2, 0.3], frobnicate=1)  # an unknown key in a file that is not read
    both = _with_tokenizer(tokenizer_dir, tmp_path / "both")
    shutil.copy(os.path.join(saved, "processor_config.json"), both)
    with open(os.path.join(both, "preprocessor_config.json"), "w") as f:
        json.dump(other, f)
    ours = _read_quietly(both)
    assert ours == _read_quietly(saved)
    assert _our_values(both) == _component_values(Qwen2_5OmniProcessor.from_pretrained(both)) == (
        6272, 50176, IMAGE_MEAN, media.OPENAI_CLIP_MEAN, 16, 5)

    # processor_config.json without a video section: video from video_preprocessor_config.json,
    # and from preprocessor_config.json without that
    with open(os.path.join(saved, "processor_config.json")) as f:
        nested = json.load(f)
    video = nested.pop("video_processor")
    partial = _with_tokenizer(tokenizer_dir, tmp_path / "partial")
    with open(os.path.join(partial, "processor_config.json"), "w") as f:
        json.dump(nested, f)
    with open(os.path.join(partial, "preprocessor_config.json"), "w") as f:
        json.dump({k: v for k, v in other.items() if k != "frobnicate"}, f)
    with open(os.path.join(partial, "video_preprocessor_config.json"), "w") as f:
        json.dump(dict(video, image_mean=[0.7, 0.6, 0.5]), f)
    assert _our_values(partial) == _component_values(Qwen2_5OmniProcessor.from_pretrained(partial)) == (
        6272, 50176, IMAGE_MEAN, (0.7, 0.6, 0.5), 16, 5)
    os.remove(os.path.join(partial, "video_preprocessor_config.json"))
    assert _our_values(partial) == _component_values(Qwen2_5OmniProcessor.from_pretrained(partial)) == (
        6272, 50176, IMAGE_MEAN, (0.1, 0.2, 0.3), 16, 5)


def test_unapplied_settings_warn_once_per_file(tmp_path, saved):
    with open(os.path.join(saved, "processor_config.json")) as f:
        nested = json.load(f)
    nested["mystery_option"] = 1
    nested["image_processor"]["frobnicate"] = True
    nested["video_processor"]["resample"] = 2  # bilinear
    nested["feature_extractor"]["padding_side"] = "left"
    d = tmp_path / "odd"
    d.mkdir()
    path = str(d / "processor_config.json")
    with open(path, "w") as f:
        json.dump(nested, f)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        acfg, vcfg = media.processor_configs(str(d))
    assert len(caught) == 1, [str(w.message) for w in caught]
    msg = str(caught[0].message)
    assert msg.startswith(path + ":")
    for key in ("mystery_option", "image_processor.frobnicate", "video_processor.resample",
                "feature_extractor.padding_side"):
        assert key in msg, (key, msg)
    for informational in ("processor_class", "image_processor_type", "feature_extractor_type", "n_samples"):
        assert informational not in msg, (informational, msg)
    assert (vcfg.max_pixels, acfg.feature_size) == (64 * 28 * 28, 16)  # the other settings still apply

    flat = tmp_path / "flat"
    flat.mkdir()
    with open(flat / "preprocessor_config.json", "w") as f:
        json.dump(dict(FLAT, frobnicate=1), f)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        media.processor_configs(str(flat))
    assert len(caught) == 1 and str(caught[0].message).startswith(str(flat / "preprocessor_config.json") + ":")
    assert "frobnicate" in str(caught[0].message) and "processor_class" not in str(caught[0].message)


@pytest.mark.parametrize("section, key, value, named", [
    ("image_processor", "size", {"shortest_edge": 6272, "longest_edge": "big"}, "image_processor.size.longest_edge"),
    ("image_processor", "size", {"height": 56, "width": 56}, "image_processor.size"),
    ("image_processor", "size", 50176, "image_processor.size"),
    ("image_processor", "image_mean", [0.5, 0.5], "image_processor.image_mean"),
    ("image_processor", "image_std", [0.5, 0.0, 0.5], "image_processor.image_std"),
    ("image_processor", "patch_size", 0, "image_processor.patch_size"),
    ("image_processor", "do_resize", "yes", "image_processor.do_resize"),
    ("video_processor", "merge_size", 2.5, "video_processor.merge_size"),
    ("video_processor", "cap_pixels_per_frame", 1, "video_processor.cap_pixels_per_frame"),
    ("video_processor", "rescale_factor", -1.0, "video_processor.rescale_factor"),
    ("feature_extractor", "hop_length", 0, "feature_extractor.hop_length"),
    ("feature_extractor", "chunk_length", "30", "feature_extractor.chunk_length"),
    ("feature_extractor", "dither", -0.1, "feature_extractor.dither"),
    (None, "image_processor", [1, 2], "image_processor"),
])
def test_malformed_values_raise(tmp_path, saved, section, key, value, named):
    with open(os.path.join(saved, "processor_config.json")) as f:
        nested = json.load(f)
    (nested[section] if section else nested)[key] = value
    path = tmp_path / "processor_config.json"
    with open(path, "w") as f:
        json.dump(nested, f)
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: {re.escape(named)}:"):
        media.processor_configs(str(tmp_path))


def test_malformed_flat_file_raises(tmp_path):
    path = tmp_path / "preprocessor_config.json"
    with open(path, "w") as f:
        json.dump(dict(FLAT, max_pixels=-1), f)
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: max_pixels:"):
        media.processor_configs(str(tmp_path))
    path.write_text("{not json")
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: cannot read"):
        media.VisionProcessConfig.from_dir(str(tmp_path))
    path.write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: expected a JSON object"):
        media.AudioFeatureConfig.from_dir(str(tmp_path))


@pytest.mark.parametrize("kw", [dict(do_rescale=False), dict(do_normalize=False),
                                dict(do_rescale=False, do_normalize=False), dict(do_resize=False)])
def test_image_flags_match_reference(kw):
    """do_rescale / do_normalize / do_resize off, as the image processor saves them (to_dict)."""
    import torchvision  # noqa: F401
    from transformers import Qwen2VLImageProcessor

    ip = Qwen2VLImageProcessor(image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD), **kw)
    cfg = media.VisionProcessConfig.from_dict(ip.to_dict())
    assert (cfg.do_resize, cfg.do_rescale, cfg.do_normalize) == (ip.do_resize, ip.do_rescale, ip.do_normalize)
    rs = np.random.RandomState(4)
    # 28x56 is below min_pixels (a resize makes it 56x84); without a resize the reference can patch
    # only sides that are multiples of 28, so the 61x93 image is for the resizing cases
    images = [(rs.rand(28, 56, 3) * 255).astype(np.uint8)]
    if cfg.do_resize:
        images.append((rs.rand(61, 93, 3) * 255).astype(np.uint8))
    for img in images:
        ref = ip(img, return_tensors="np")
        ours = media.image_inputs([img], cfg)
        np.testing.assert_array_equal(ours["image_grid_thw"], ref["image_grid_thw"])
        np.testing.assert_array_equal(ours["pixel_values"], np.asarray(ref["pixel_values"], np.float32))
