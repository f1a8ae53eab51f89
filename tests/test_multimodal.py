"""Thinker logits with audio, image and video inputs (processor-form tensors) vs transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import rel_err
from test_tmrope import _build

MELS, PATCH_W = 16, 3 * 2 * 14 * 14

MM_CASES = {
    "audio_image_batch": dict(rows=[["t3", ("aud", 37), "t2", ("img", (1, 4, 4)), "t3"],
                                    ["t1", ("img", (1, 2, 6)), "t2", ("aud", 19), "t4"]]),
    "video": dict(rows=[["t2", ("vid", (2, 4, 4), 1.0), "t3"]]),
    "audio_in_video": dict(rows=[["t2", ("aiv", 90, (4, 4, 4), 1.0), "t3"]], aiv=True),
    "all_mixed": dict(rows=[["t2", ("img", (1, 2, 2)), ("aud", 25), "t1", ("vid", (2, 2, 4), 0.5), "t2"],
                            ["t4", ("aud", 41), "t3"]]),
}


def _inputs(name, seed=0):
    case = MM_CASES[name]
    ids, mask, images, videos, audios, spg = _build(case, seed)
    rs = np.random.RandomState(seed + 1)
    kw = {}
    if audios is not None:
        lmax = int(audios.max())
        feats = rs.randn(len(audios), MELS, lmax).astype(np.float32)
        fmask = np.zeros((len(audios), lmax), np.int64)
        for i, n in enumerate(audios):
            fmask[i, :n] = 1
        kw.update(input_features=feats, feature_attention_mask=fmask)
    if images is not None:
        kw.update(pixel_values=rs.randn(int(np.prod(images, 1).sum()), PATCH_W).astype(np.float32),
                  image_grid_thw=images)
    if videos is not None:
        kw.update(pixel_values_videos=rs.randn(int(np.prod(videos, 1).sum()), PATCH_W).astype(np.float32),
                  video_grid_thw=videos, video_second_per_grid=spg)
    return ids, mask, kw, case.get("aiv", False)


def _reference(tm, ids, mask, kw, aiv):
    t = {k: torch.tensor(v) for k, v in kw.items()}
    with torch.no_grad():
        return tm.thinker(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), use_audio_in_video=aiv,
                          **t).logits.numpy()


@pytest.mark.parametrize("name", list(MM_CASES))
def test_multimodal_logits_match_transformers(name, hf_models, jax_model):
    _, tm = hf_models("gqa")
    model = jax_model("gqa")
    ids, mask, kw, aiv = _inputs(name)
    ref = _reference(tm, ids, mask, kw, aiv)
    got = model.thinker_logits(ids, mask, use_audio_in_video=aiv, **kw)
    for b in range(ids.shape[0]):
        v = mask[b].astype(bool)
        assert rel_err(got[b][v], ref[b][v]) <= 1e-4
    # the media really matter: text-only logits at the same ids differ
    if name == "all_mixed":
        plain = model.thinker_logits(ids, mask)
        assert rel_err(plain[0][mask[0] == 1], ref[0][mask[0] == 1]) > 1e-3


def test_multimodal_generate_batched_equals_alone(jax_model):
    model = jax_model("gqa")
    ids, mask, kw, _ = _inputs("audio_image_batch")
    both = model.generate(ids, mask, max_new_tokens=8, eos_token_id=[], **kw)
    # row 1 alone: its own audio (the second) and image (the second)
    r = 1
    v = mask[r] == 1
    kw1 = dict(input_features=kw["input_features"][1:], feature_attention_mask=kw["feature_attention_mask"][1:],
               pixel_values=kw["pixel_values"][16:], image_grid_thw=kw["image_grid_thw"][1:])
    alone = model.generate(ids[r][v][None], max_new_tokens=8, eos_token_id=[], **kw1)
    np.testing.assert_array_equal(both.sequences[r, ids.shape[1]:], alone.sequences[0, v.sum():])


def test_placeholder_count_mismatch(jax_model):
    from omni_jax import InputError

    model = jax_model("gqa")
    ids, mask, kw, _ = _inputs("video")
    kw["video_grid_thw"] = np.array([[2, 4, 8]])
    kw["pixel_values_videos"] = np.zeros((64, PATCH_W), np.float32)
    with pytest.raises(InputError, match=r"pixel_values_videos: the media give 16 embeddings but the prompt has 8"):
        model.thinker_logits(ids, mask, **kw)
