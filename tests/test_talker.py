"""The Talker fed exactly as transformers' generate feeds it: codec ids vs the reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.util import talker_mask_restored
from conftest import rel_err
from test_multimodal import _inputs


def _reference_codes(tm, ids, mask, thinker_new, talker_new, talker_min, mm=None, aiv=False, speaker="Chelsie"):
    """Run transformers' full generate; capture the talker's codes and scores (token2wav stubbed)."""
    captured = {}
    orig = tm.talker.generate

    def talker_generate(**kw):
        res = orig(output_scores=True, return_dict_in_generate=True, **kw)
        captured["prompt_len"] = kw["input_ids"].shape[1]
        captured["scores"] = res.scores
        captured["sequences"] = res.sequences
        return res.sequences

    t2w = tm.token2wav.forward
    tm.talker.generate = talker_generate
    tm.token2wav.forward = lambda code, **kw: torch.zeros(1, 10)
    try:
        # pixel inputs go to the thinker only (transformers 5 would hand them to talker.generate too, which
        # rejects them); grids stay shared: the talker's positions need them
        t = {("thinker_" + k if k.startswith("pixel_values") else k): torch.tensor(v) for k, v in (mm or {}).items()}
        with torch.no_grad(), talker_mask_restored(tm):
            seqs, _ = tm.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), speaker=speaker,
                                  use_audio_in_video=aiv, thinker_max_new_tokens=thinker_new,
                                  thinker_do_sample=False, thinker_eos_token_id=None, talker_do_sample=False,
                                  talker_max_new_tokens=talker_new, talker_min_new_tokens=talker_min,
                                  talker_eos_token_id=[112, 111], **t)
    finally:
        tm.talker.generate = orig
        tm.token2wav.forward = t2w
    # the talker's prefill ran its masked branch (TMRoPE index, codec pad/bos embeddings): it sets rope_deltas
    assert tm.talker.rope_deltas is not None
    codes = captured["sequences"][:, captured["prompt_len"]:].numpy()
    scores = np.stack([s.numpy() for s in captured["scores"]], 1)
    return seqs.numpy(), codes, scores


def _cut(row):
    hit = np.nonzero(np.isin(row, [112, 111]))[0]
    return row[:hit[0]] if len(hit) else row


def _check_margins(scores):
    fin = np.where(np.isfinite(scores), scores, -1e30)
    top2 = np.sort(fin, axis=-1)[..., -2:]
    assert (top2[..., 1] - top2[..., 0]).min() > 1e-4, "near-tied reference talker logits: pick another seed"


@pytest.mark.parametrize("variant", ["gqa", "hd32_kv1"])
def test_talker_codes_match_transformers(variant, hf_models, jax_model):
    _, tm = hf_models(variant)
    model = jax_model(variant)
    rs = np.random.RandomState(11)
    ids = rs.randint(0, 280, (1, 9))
    mask = np.ones_like(ids)
    seqs, codes, scores = _reference_codes(tm, ids, mask, thinker_new=12, talker_new=24, talker_min=10)
    _check_margins(scores)
    out = model.generate(ids, mask, max_new_tokens=12, eos_token_id=[], return_audio=True, talker_do_sample=False,
                         talker_max_new_tokens=24, talker_min_new_tokens=10)
    np.testing.assert_array_equal(out.sequences, seqs)
    assert len(out.codec_ids[0]) >= 10
    np.testing.assert_array_equal(out.codec_ids[0], _cut(codes[0]))


def test_talker_codes_multimodal_batch(hf_models, jax_model):
    _, tm = hf_models("gqa")
    model = jax_model("gqa")
    ids, mask, mm, aiv = _inputs("audio_image_batch")
    seqs, codes, scores = _reference_codes(tm, ids, mask, thinker_new=6, talker_new=16, talker_min=6, mm=mm,
                                           aiv=aiv, speaker="Ethan")
    out = model.generate(ids, mask, max_new_tokens=6, eos_token_id=[], return_audio=True, talker_do_sample=False,
                         talker_max_new_tokens=16, talker_min_new_tokens=6, speaker="Ethan", **mm)
    np.testing.assert_array_equal(out.sequences, seqs)
    for r in range(ids.shape[0]):
        np.testing.assert_array_equal(out.codec_ids[r], _cut(codes[r]))


def test_unknown_speaker_lists_voices(jax_model):
    from omni_jax import InputError

    with pytest.raises(InputError, match="speaker 'Nobody' is not available; voices: Chelsie, Ethan"):
        jax_model("gqa").generate(np.arange(5)[None], return_audio=True, speaker="Nobody")


def _generate_with_noise(tm, ids, mask, noises, **kw):
    """transformers' full generate with the DiT's initial noise fixed (torch.randn patched), per row."""
    calls = iter(noises)
    orig = torch.randn

    def randn(*shape, **k):
        if len(shape) == 1 and isinstance(shape[0], (list, tuple)):
            shape = tuple(shape[0])
        if len(shape) == 3 and shape[-1] == tm.config.token2wav_config.dit_config.mel_dim:
            return torch.tensor(next(calls))[None].to(k.get("dtype") or torch.float32)
        return orig(*shape, **k)

    torch.randn = randn
    try:
        with torch.no_grad(), talker_mask_restored(tm):
            return tm.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **kw)
    finally:
        torch.randn = orig


@pytest.mark.parametrize("variant", ["gqa"])
def test_generate_with_audio_matches_transformers(variant, hf_models, jax_model):
    _, tm = hf_models(variant)
    model = jax_model(variant)
    rs = np.random.RandomState(12)
    ids = rs.randint(0, 280, (2, 8))
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    kw = dict(max_new_tokens=6, eos_token_id=[], return_audio=True, talker_do_sample=False,
              talker_max_new_tokens=14, talker_min_new_tokens=8, speaker="Chelsie")
    ours = model.generate(ids, mask, **kw)
    mel_dim = model.config.token2wav.dit.mel_dim
    noises = [rs.randn(2 * len(c), mel_dim).astype(np.float32) for c in ours.codec_ids]
    ours = model.generate(ids, mask, dit_noise=noises, **kw)
    seqs, wavs = _generate_with_noise(tm, ids, mask, noises, speaker="Chelsie", thinker_max_new_tokens=6,
                                      thinker_do_sample=False, thinker_eos_token_id=None, talker_do_sample=False,
                                      talker_max_new_tokens=14, talker_min_new_tokens=8, talker_eos_token_id=[112, 111])
    np.testing.assert_array_equal(ours.sequences, seqs.numpy())
    for r in range(2):
        ref = wavs[r].numpy()
        assert ours.audio[r].shape == ref.shape and ours.audio[r].dtype == np.float32
        assert rel_err(ours.audio[r], ref) <= 1e-3
    # batched speech equals each row alone (same codes, same noise)
    for r in range(2):
        alone = model.token2wav(ours.codec_ids[r], "Chelsie", noise=noises[r])
        np.testing.assert_allclose(alone, ours.audio[r], rtol=1e-5, atol=1e-6)


def test_speech_limits(jax_model):
    from omni_jax import InputError

    model = jax_model("gqa")
    with pytest.raises(InputError, match="exceeds the DiT's max_position_embeddings"):
        model.generate(np.arange(5)[None], return_audio=True, talker_max_new_tokens=10 ** 6)
    with pytest.raises(InputError, match=r"dit_noise\[0\]: expected shape"):
        model.token2wav(np.array([1, 2, 3]), "Chelsie", noise=np.zeros((5, 20), np.float32))
    assert model.token2wav(np.zeros((0,), np.int32)).shape == (0,)


@pytest.mark.parametrize("variant", ["gqa", "hd32_kv1"])
def test_talker_logits_match_transformers(variant, hf_models, jax_model):
    """The talker forward itself (projection, decoder with 3-D positions, codec head) vs transformers."""
    import jax.numpy as jnp
    from flax import nnx

    from omni_jax import talker as tk

    _, tm = hf_models(variant)
    model = jax_model(variant)
    cfg = model.config.talker
    rs = np.random.RandomState(5)
    t = 11
    embeds = rs.randn(1, t, cfg.embedding_size).astype(np.float32)
    base = np.arange(t)
    pos = np.stack([base, base // 2 + 3, (base * 5) % 7])[:, None, :]
    with torch.no_grad():
        ref = tm.talker(inputs_embeds=torch.tensor(embeds), position_ids=torch.tensor(pos)).logits.numpy()
    talker = nnx.merge(*model.talker)
    got, _ = tk.logits(talker, cfg, jnp.asarray(embeds), jnp.asarray(pos))
    assert rel_err(np.asarray(got), ref) <= 1e-4


def test_dit_bucket_keeps_padding_below_a_third():
    import functools

    from omni_jax import layers

    half_octave_bucket = functools.partial(layers.half_octave_bucket, minimum=32)  # the DiT's codes (speech.speak)
    assert [half_octave_bucket(n) for n in (1, 32, 33, 48, 49, 65, 97, 128, 129, 300, 385)] == \
        [32, 32, 48, 48, 64, 96, 128, 128, 192, 384, 512]
    for n in range(1, 3000):
        b = half_octave_bucket(n)
        assert b >= n and (b <= 32 or (b - n) / b < 1 / 3), n


def test_vocoder_compiles_once_per_bucket(jax_model):
    """Replies of different lengths in one DiT bucket share the DiT's and the vocoder's programs."""
    from omni_jax import token2wav as t2w

    model = jax_model("gqa")
    model.token2wav(np.array([1, 2, 3, 4, 5], np.int32))  # compile (bucket of 32 codes)
    dit, voc = t2w._dit_sample_jit._cache_size(), t2w._bigvgan_jit._cache_size()
    wavs = [model.token2wav(np.arange(1, n + 1, dtype=np.int32) % 7 + 1) for n in (9, 17, 30)]
    assert t2w._dit_sample_jit._cache_size() == dit and t2w._bigvgan_jit._cache_size() == voc
    hop = model.config.token2wav.dit.repeats * int(np.prod(model.config.token2wav.bigvgan.upsample_rates))
    assert [w.shape[0] for w in wavs] == [9 * hop, 17 * hop, 30 * hop]
    assert all(np.isfinite(w).all() and np.abs(w).max() > 0 for w in wavs)
