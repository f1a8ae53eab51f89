"""Decode positions after a raw-id multimodal prompt, and videos without second_per_grid, vs transformers.

The prompt ends with a ``use_audio_in_video`` span (no text after it) whose last interleaved chunk is
audio while the video's width positions reach further, so its last position (the end markers') lies
below its largest: transformers' thinker ``generate`` goes on from the last position + 1 in each stream,
its talker from the largest position + 1.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import omni_jax
from omni_jax.tmrope import rope_index

from conftest import rel_err
from test_multimodal import MELS, PATCH_W
from test_talker import _check_margins, _cut, _reference_codes
from test_tmrope import _build

AUDIO_LEN, GRID = 30, (2, 4, 40)  # 5 audio tokens; merged frames 2 x 20: width positions up to +19
N_NEW = 16


@pytest.fixture(scope="module")
def wide():
    ids, mask, _, videos, audios, spg = _build(dict(rows=[["t3", ("aiv", AUDIO_LEN, GRID, 1.0)]], aiv=True))
    rs = np.random.RandomState(1)
    kw = dict(input_features=rs.randn(1, MELS, AUDIO_LEN).astype(np.float32),
              feature_attention_mask=np.ones((1, AUDIO_LEN), np.int64),
              pixel_values_videos=rs.randn(int(np.prod(videos, 1).sum()), PATCH_W).astype(np.float32),
              video_grid_thw=videos, video_second_per_grid=spg)
    return ids, mask, kw


@pytest.fixture(scope="module")
def reference(wide, hf_models):
    """transformers' thinker generate (greedy, no EOS): its sequences and the last-layer (post-norm)
    hidden state of each fed reply token ``[N_NEW - 1, E]``."""
    _, tm = hf_models("gqa")
    ids, mask, kw = wide
    t = {k: torch.tensor(v) for k, v in kw.items()}
    with torch.no_grad():
        ref = tm.thinker.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=N_NEW,
                                  min_new_tokens=N_NEW, do_sample=False, repetition_penalty=1.0, eos_token_id=None,
                                  pad_token_id=0, use_audio_in_video=True, output_scores=True,
                                  output_hidden_states=True, return_dict_in_generate=True, **t)
    scores = np.stack([s.numpy() for s in ref.scores], 1)
    top2 = np.sort(scores, axis=-1)[..., -2:]
    assert (top2[..., 1] - top2[..., 0]).min() > 1e-3, "near-tied reference logits: pick another prompt"
    hidden = np.stack([ref.hidden_states[k][-1][0, -1].numpy() for k in range(1, N_NEW)])
    return ref.sequences.numpy(), hidden


def test_prompt_last_position_is_below_its_largest(wide, hf_models):
    ids, mask, kw = wide
    cfg = omni_jax.load_config(hf_models("gqa")[0]).thinker
    pos = rope_index(cfg, ids, mask, video_grid_thw=kw["video_grid_thw"], audio_seqlens=[AUDIO_LEN],
                     second_per_grids=kw["video_second_per_grid"], use_audio_in_video=True)
    assert int(pos[:, 0, -1].max()) + 10 < int(pos.max())  # the case where the two rules differ


def _greedy(**extra):
    return dict(max_new_tokens=N_NEW, do_sample=False, repetition_penalty=1.0, eos_token_id=[],
                use_audio_in_video=True, **extra)


def test_thinker_decode_positions_match_transformers(wide, reference, jax_model):
    ids, mask, kw = wide
    ref_seq, ref_hidden = reference
    model = jax_model("gqa")
    out = model.generate(ids, mask, **_greedy(**kw))
    np.testing.assert_array_equal(out.sequences, ref_seq)
    # the decode steps' hidden states (which the logits come from) equal the reference's: greedy ids alone
    # hardly see a position offset in a tiny random model
    gen = model.decode_steps(model.prefill(ids, mask, return_audio=True, **_greedy(**kw)), N_NEW)
    assert rel_err(np.asarray(gen.state.hidden[0, :N_NEW - 1]), ref_hidden) <= 1e-4
    # the streaming path decodes from the same positions
    streamed = [t for e in model.stream(ids, mask, **_greedy(**kw)) if e.kind == "text" for t in e.token_ids]
    np.testing.assert_array_equal(streamed, ref_seq[0, ids.shape[1]:])


def test_server_batched_decode_positions_match_transformers(wide, reference, jax_model):
    from omni_jax.serve import Engine, GenParams, ServeLimits, ServeRequest

    ids, mask, kw = wide
    model = jax_model("gqa")
    engine = Engine(model, ServeLimits(max_batch=2, max_tokens=N_NEW, max_prompt_tokens=128, max_audio_tokens=16,
                                       steps_per_call=4)).start()
    done = threading.Event()
    got = {}

    def sink(ev):
        if ev[0] in ("done", "error"):
            got[ev[0]] = ev[1]
            done.set()

    try:
        engine.submit(ServeRequest(inputs=dict(input_ids=ids, attention_mask=mask, use_audio_in_video=True, **kw),
                                   params=GenParams(max_tokens=N_NEW, do_sample=False, repetition_penalty=1.0,
                                                    ignore_eos=True), sink=sink))
        assert done.wait(300)
    finally:
        engine.stop()
    assert "error" not in got, got.get("error")
    np.testing.assert_array_equal(got["done"]["token_ids"], reference[0][0, ids.shape[1]:])


def test_talker_decode_positions_match_transformers(wide, hf_models, jax_model):
    _, tm = hf_models("gqa")
    model = jax_model("gqa")
    ids, mask, kw = wide
    _, ref_codes, scores = _reference_codes(tm, ids, mask, 6, 40, 40, mm=kw, aiv=True)
    _check_margins(scores)
    out = model.generate(ids, mask, max_new_tokens=6, do_sample=False, repetition_penalty=1.0, eos_token_id=[],
                         use_audio_in_video=True, return_audio=True, talker_do_sample=False,
                         talker_max_new_tokens=40, talker_min_new_tokens=40, **kw)
    np.testing.assert_array_equal(out.codec_ids[0], _cut(ref_codes[0]))


def test_video_without_second_per_grid_is_refused(wide, hf_models, jax_model):
    _, tm = hf_models("gqa")
    model = jax_model("gqa")
    ids, mask, kw = wide
    kw = {k: v for k, v in kw.items() if k != "video_second_per_grid"}
    # the reference has no default either: its get_rope_index cannot place the video
    with pytest.raises(TypeError):
        tm.thinker.get_rope_index(torch.tensor(ids), None, torch.tensor(kw["video_grid_thw"]), torch.tensor(mask),
                                  True, torch.tensor([AUDIO_LEN]), None)
    for call in (lambda: model.thinker_logits(ids, mask, use_audio_in_video=True, **kw),
                 lambda: model.generate(ids, mask, max_new_tokens=2, use_audio_in_video=True, **kw)):
        with pytest.raises(omni_jax.InputError, match=r"video_second_per_grid: required with pixel_values_videos"):
            call()
    cfg = omni_jax.load_config(hf_models("gqa")[0]).thinker
    with pytest.raises(omni_jax.InputError, match=r"video_second_per_grid: 1 video\(s\) need one value each"):
        rope_index(cfg, ids, mask, video_grid_thw=kw["video_grid_thw"], audio_seqlens=[AUDIO_LEN],
                   use_audio_in_video=True)
    # with explicit position ids the frame rate is not needed
    pos = rope_index(cfg, ids, mask, video_grid_thw=kw["video_grid_thw"], audio_seqlens=[AUDIO_LEN],
                     second_per_grids=[1.0], use_audio_in_video=True)
    assert model.thinker_logits(ids, mask, position_ids=pos, use_audio_in_video=True, **kw).shape == (*ids.shape, 300)
