"""TMRoPE position ids vs transformers' get_rope_index, on hand-built multimodal prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import omni_jax
from omni_jax.tmrope import audio_token_count, rope_index

from conftest import MEDIA_IDS

AUD, IMG, VID = MEDIA_IDS["audio_token_index"], MEDIA_IDS["image_token_index"], MEDIA_IDS["video_token_index"]
A_BOS, A_EOS = MEDIA_IDS["audio_start_token_id"], MEDIA_IDS["audio_end_token_id"]
V_BOS, V_EOS = MEDIA_IDS["vision_start_token_id"], MEDIA_IDS["vision_end_token_id"]


def _text(rs, n):
    return list(rs.randint(0, 200, n))


def _audio(L):
    return [A_BOS] + [AUD] * audio_token_count(L) + [A_EOS]


def _vision(tok, thw):
    return [V_BOS] + [tok] * (int(np.prod(thw)) // 4) + [V_EOS]


def _audio_in_video(L, thw, spg):
    """The processor's layout: video and audio tokens interleaved in 2 s chunks (video first)."""
    n_a, n_v = audio_token_count(L), int(np.prod(thw)) // 4
    return [V_BOS, A_BOS] + [VID] * n_v + [AUD] * n_a + [A_EOS, V_EOS]


CASES = {
    "image": dict(rows=[["t5", ("img", (1, 4, 6)), "t3"]]),
    "two_images_video": dict(rows=[["t2", ("img", (1, 4, 4)), "t1", ("vid", (3, 4, 6), 1.0), "t2",
                                    ("img", (1, 6, 2)), "t4"]]),
    "audio_image": dict(rows=[["t3", ("aud", 57), "t2", ("img", (1, 2, 4)), "t3"]]),
    "video_fractional_fps": dict(rows=[["t3", ("vid", (4, 2, 4), 0.7), "t2"]]),
    "batch_padded": dict(rows=[["t3", ("img", (1, 4, 4)), "t3"], ["t1", ("aud", 33), ("img", (1, 2, 2)), "t6"]]),
    "audio_in_video": dict(rows=[["t3", ("aiv", 230, (6, 4, 4), 1.0), "t4"]], aiv=True),
    "audio_in_video_long": dict(rows=[["t2", ("aiv", 610, (8, 2, 4), 1.6), "t3", ("img", (1, 2, 2)), "t1"]],
                                aiv=True),
}


def _build(case, seed=0):
    rs = np.random.RandomState(seed)
    rows, images, videos, spg, audios = [], [], [], [], []
    for row in case["rows"]:
        toks = []
        for part in row:
            if isinstance(part, str):
                toks += _text(rs, int(part[1:]))
            elif part[0] == "img":
                toks += _vision(IMG, part[1])
                images.append(part[1])
            elif part[0] == "vid":
                toks += _vision(VID, part[1])
                videos.append(part[1])
                spg.append(part[2])
            elif part[0] == "aud":
                toks += _audio(part[1])
                audios.append(part[1])
            else:
                toks += _audio_in_video(part[1], part[2], part[3])
                audios.append(part[1])
                videos.append(part[2])
                spg.append(part[3])
        rows.append(toks)
    t = max(len(r) for r in rows)
    ids = np.zeros((len(rows), t), np.int64)
    mask = np.zeros((len(rows), t), np.int64)
    for i, r in enumerate(rows):
        ids[i, t - len(r):] = r
        mask[i, t - len(r):] = 1
    arr = lambda x, dt=np.int64: np.asarray(x, dt) if x else None  # noqa: E731
    return ids, mask, arr(images), arr(videos), arr(audios), arr(spg, np.float32)


@pytest.mark.parametrize("name", list(CASES))
def test_rope_index_matches_transformers(name, hf_models):
    _, tm = hf_models("gqa")
    case = CASES[name]
    ids, mask, images, videos, audios, spg = _build(case)
    aiv = case.get("aiv", False)
    t = lambda x: None if x is None else torch.tensor(x)  # noqa: E731
    ref, _ = tm.thinker.get_rope_index(t(ids), t(images), t(videos), t(mask), aiv, t(audios), t(spg))
    cfg = omni_jax.load_config(hf_models("gqa")[0]).thinker
    got = rope_index(cfg, ids, mask, image_grid_thw=images, video_grid_thw=videos, audio_seqlens=audios,
                     second_per_grids=spg, use_audio_in_video=aiv)
    np.testing.assert_array_equal(got, ref.numpy())
    assert len(np.unique(got[1])) > 1 or images is None  # streams really differ for media


def test_rope_index_placeholder_mismatch(hf_models):
    cfg = omni_jax.load_config(hf_models("gqa")[0]).thinker
    ids, mask, images, videos, _, spg = _build(CASES["two_images_video"])
    with pytest.raises(omni_jax.InputError, match="more media placeholders than"):
        rope_index(cfg, ids, mask, image_grid_thw=images[:1], video_grid_thw=videos, second_per_grids=spg)
