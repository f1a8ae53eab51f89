"""Every parity family once at the published Qwen2.5-Omni-3B widths (two layers per stack).

The tiny configurations of the rest of the suite cannot show what only happens at real sizes:
head dims of 128/64/80, the 151936-word vocabulary with a tied head, the 1280-wide towers, a zero
mrope section, the vocoder's 1536 channels and six upsampling stages, 2 KV heads on a tensor axis.

Memory is the constraint (the 151936 x 2048 embedding is 1.2 GB in float32): the transformers model
(:mod:`published`) is built once, saved, run for every reference number the tests need, and freed
before the omni_jax model is loaded, so the two never sit in memory together.
"""

from __future__ import annotations

import gc
import itertools
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import published as P
from conftest import rel_err

TEXT_NEW, TALKER_MAX, TALKER_MIN = 6, 12, 8
N_CODES = 16  # 32 mel frames: two of the DiT's 24-frame attention blocks
EMBED_KEY = "thinker.model.language_model.embed_tokens.weight"
# checkpoint key prefixes -> transformers 5's module names
_INTERNAL = (("thinker.model.", "thinker.model.language_model."),
             ("thinker.audio_tower.", "thinker.model.audio_tower."), ("thinker.visual.", "thinker.model.visual."))


def _internal(key):
    for a, b in _INTERNAL:
        if key.startswith(a):
            return b + key[len(a):]
    return key


def _text_inputs(seed, b, t, pad):
    ids = np.random.RandomState(seed).randint(0, P.TEXT_IDS, (b, t))
    mask = np.ones_like(ids)
    mask[1, :pad] = 0
    return ids, mask


def _labels(ids, mask, tail):
    lab = np.full_like(ids, -100)
    lab[:, -tail:] = ids[:, -tail:]
    lab[mask == 0] = -100
    return lab


def _margins(scores, steps):
    """Smallest top-1 minus top-2 gap of each row's first ``steps[row]`` score vectors."""
    fin = np.where(np.isfinite(scores), scores, -1e30)
    top2 = np.sort(fin, axis=-1)[..., -2:]
    gap = top2[..., 1] - top2[..., 0]
    return min(float(gap[r, :steps[r]].min()) for r in range(len(steps)))


def _cut(row):
    hit = np.nonzero(np.isin(row, [P.CODEC_PAD, P.CODEC_END]))[0]
    return row[:hit[0]] if len(hit) else row


# ------------------------------------------------------------------------------------------
# the reference numbers (transformers, CPU, float32)


def _ref_generate(tm, ids, mask):
    """transformers' full generate (thinker greedy, then the talker greedy under its restored mask),
    token2wav stubbed; the thinker's and the talker's scores captured for the margin checks."""
    from bench.util import talker_mask_restored

    cap = {}
    thinker_gen, talker_gen = tm.thinker.generate, tm.talker.generate

    def thinker_generate(*a, **kw):
        res = thinker_gen(*a, output_scores=True, **kw)
        cap["thinker_scores"] = np.stack([s.numpy() for s in res.scores], 1)
        return res

    def talker_generate(**kw):
        res = talker_gen(output_scores=True, return_dict_in_generate=True, **kw)
        cap["codes"] = res.sequences[:, kw["input_ids"].shape[1]:].numpy()
        cap["talker_scores"] = np.stack([s.numpy() for s in res.scores], 1)
        return res.sequences

    tm.thinker.generate, tm.talker.generate = thinker_generate, talker_generate
    tm.token2wav.forward = lambda code, **kw: torch.zeros(1, 10)
    try:
        with torch.no_grad(), talker_mask_restored(tm):
            seqs, _ = tm.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), speaker="Ethan",
                                  thinker_max_new_tokens=TEXT_NEW, thinker_do_sample=False,
                                  thinker_eos_token_id=None, talker_do_sample=False,
                                  talker_max_new_tokens=TALKER_MAX, talker_min_new_tokens=TALKER_MIN)
    finally:
        del tm.thinker.generate, tm.talker.generate, tm.token2wav.forward  # the class methods again
    assert tm.talker.rope_deltas is not None  # the talker's masked prefill branch ran
    cap["sequences"] = seqs.numpy()
    return cap


def _ref_token2wav(tm, codes, noise):
    """transformers' token2wav on ``codes`` with the DiT's initial noise fixed (torch.randn patched)."""
    real = torch.randn

    def randn(*shape, **kw):
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (list, tuple, torch.Size)) else shape
        assert tuple(shape) == (1, *noise.shape), shape
        return torch.from_numpy(noise.copy())[None].to(kw.get("dtype") or torch.float32)

    voice = tm.speaker_map["Chelsie"]
    torch.randn = randn
    try:
        with torch.no_grad():
            return tm.token2wav(torch.tensor(codes)[None], conditioning=voice["cond"][None].float(),
                                reference_mel=voice["ref_mel"][None].float()).numpy()
    finally:
        torch.randn = real


def _ref_loss_and_grads(tm, ids, mask, labels, mm, rows):
    """The thinker's loss and the gradient of every thinker, audio and vision parameter; of the
    embedding (tied to the head) only the rows ``rows``."""
    t = {k: torch.tensor(v) for k, v in mm.items()}
    tm.zero_grad(set_to_none=True)
    with torch.enable_grad():
        out = tm.thinker(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                         labels=torch.tensor(labels), **t)
        out.loss.backward()
    grads = {}
    for name, p in tm.named_parameters():
        if p.grad is not None:
            grads[name] = p.grad[torch.as_tensor(rows)].numpy() if name == EMBED_KEY else p.grad.numpy()
            p.grad = None
    return out.loss.item(), grads


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """The saved checkpoint and every reference number, from one transformers model, which is freed
    before the tests run; the 3 GB checkpoint is removed when the module is done."""
    d = str(tmp_path_factory.mktemp("published-3b"))
    tm = P.build(d)
    r = {"dir": d}
    with torch.no_grad():
        ids, mask = _text_inputs(0, 2, 32, 5)
        logits = tm.thinker(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
        r["text"] = (ids, mask, logits.numpy())
        ids, mask, mm = P.multimodal_inputs()
        r["mm"] = (ids, mask, mm, tm.thinker(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                                             **{k: torch.tensor(v) for k, v in mm.items()}).logits.numpy())
    ids, mask = _text_inputs(1, 2, 16, 3)
    r["generate"] = (ids, mask, _ref_generate(tm, ids, mask))
    rs = np.random.RandomState(2)
    codes = rs.randint(0, P.DIT["num_embeds"], N_CODES)
    noise = rs.randn(N_CODES * P.DIT["repeats"], P.DIT["mel_dim"]).astype(np.float32)
    r["token2wav"] = (codes, noise, _ref_token2wav(tm, codes, noise))
    # the backward holds the thinker's gradients and, transiently, two more of the 1.2 GB embedding's:
    # the talker and token2wav are done with, so free them first
    tm.talker = tm.token2wav = None
    gc.collect()
    # row 0 alone (its audio and its two-window image): the 151936-word head dominates the cost, per token
    ids, mask, mm = P.multimodal_inputs(seed=3)
    n_patches = int(np.prod(mm["image_grid_thw"][0]))
    ids, mask = ids[:1], mask[:1]
    mm = dict(input_features=mm["input_features"][:1], feature_attention_mask=mm["feature_attention_mask"][:1],
              pixel_values=mm["pixel_values"][:n_patches], image_grid_thw=mm["image_grid_thw"][:1])
    labels = _labels(ids, mask, 4)
    rows = np.unique(np.concatenate([ids.ravel(), rs.randint(0, P.TEXT["vocab_size"], 2048)]))
    r["loss"] = (ids, mask, mm, labels, rows, *_ref_loss_and_grads(tm, ids, mask, labels, mm, rows))
    del tm
    gc.collect()
    yield r
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def model(ref):
    import omni_jax

    return omni_jax.load(ref["dir"], dtype="float32")


# ------------------------------------------------------------------------------------------
# the families


def test_sharded_logits_equal_single_device(ref, tmp_path):
    """fsdp=4 x tensor=2 over 8 host devices, in a subprocess (the device count is fixed when JAX
    starts), on the thinker alone: 2 KV heads on a 2-way tensor axis, the vocabulary split. The
    subprocess also computes the single-device logits, after freeing the sharded copy. This test
    comes first, before the module's one-device model is loaded, so that model and the
    subprocess's are never in memory at the same time."""
    ids, mask, want = ref["text"]
    view = P.thinker_view(ref["dir"], str(tmp_path / "thinker"))
    np.savez(tmp_path / "in.npz", ids=ids, mask=mask)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    here = os.path.dirname(__file__)
    r = subprocess.run([sys.executable, os.path.join(here, "published.py"), "sharded", view, str(tmp_path / "in.npz"),
                        str(tmp_path / "out.npz"), "fsdp=4,tensor=2"], env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["devices"] == 8 and res["sharding_mismatches"] == []
    assert res["q_proj_spec"] == ["fsdp", "tensor"]  # [2048, 16 x 128]: embed over fsdp, heads over tensor
    assert "tensor" in res["embed_spec"]  # the 151936-word vocabulary is split
    out = np.load(tmp_path / "out.npz")
    for b in range(2):
        v = mask[b] == 1
        assert rel_err(out["sharded"][b][v], out["single"][b][v]) <= 1e-5
        assert rel_err(out["sharded"][b][v], want[b][v]) <= 1e-4


def test_published_config_read_back(model):
    """The saved config.json gives omni_jax the published shapes (the premise of every test here)."""
    from flax import nnx

    c = model.config
    t, a, v, k = c.thinker.text, c.thinker.audio, c.thinker.vision, c.talker
    assert (t.vocab_size, t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim,
            t.intermediate_size, tuple(t.mrope_section), t.rope_theta) == (151936, 2048, 16, 2, 128, 11008,
                                                                            (16, 24, 24), 1e6)
    assert c.thinker.tie_word_embeddings and "lm_head" not in nnx.to_pure_dict(model.params)
    assert (a.d_model, a.encoder_attention_heads, a.encoder_ffn_dim, a.num_mel_bins, a.output_dim) == \
        (1280, 20, 5120, 128, 2048)
    assert (v.hidden_size, v.num_heads, v.intermediate_size, v.out_hidden_size, v.window_size) == \
        (1280, 16, 3420, 2048, 112)
    assert (k.hidden_size, k.num_attention_heads, k.num_key_value_heads, k.head_dim, k.intermediate_size,
            k.vocab_size, k.embedding_size, tuple(k.mrope_section)) == (896, 14, 2, 64, 4864, 8448, 2048, (16, 16, 0))
    dit, voc = c.token2wav.dit, c.token2wav.bigvgan
    assert (dit.hidden_size, dit.num_attention_heads, dit.head_dim, dit.block_size, dit.mel_dim) == \
        (1024, 16, 64, 24, 80)
    assert (voc.upsample_initial_channel, tuple(voc.upsample_rates), tuple(voc.upsample_kernel_sizes)) == \
        (1536, (5, 3, 2, 2, 2, 2), (11, 7, 4, 4, 4, 4))


def test_text_logits(ref, model):
    ids, mask, want = ref["text"]
    got = model.thinker_logits(ids, mask)
    assert got.shape == want.shape == (2, 32, 151936)
    for b in range(2):
        v = mask[b] == 1
        assert rel_err(got[b][v], want[b][v]) <= 1e-4


def test_multimodal_logits(ref, model):
    """Audio (128 mel bins, 20 heads of 64) and images (16 heads of 80, two 112-pixel windows in row
    0's image) through the published-width towers, TMRoPE over [16, 24, 24]."""
    ids, mask, mm, want = ref["mm"]
    got = model.thinker_logits(ids, mask, **mm)
    for b in range(2):
        v = mask[b] == 1
        assert rel_err(got[b][v], want[b][v]) <= 1e-4


@pytest.fixture(scope="module")
def generated(ref, model):
    """omni_jax's generate with speech on the reference's prompt: codec ids only (token2wav is
    compared on its own below)."""
    ids, mask, _ = ref["generate"]
    t2w = model.token2wav_params
    model.token2wav_params = None
    try:
        return model.generate(ids, mask, max_new_tokens=TEXT_NEW, eos_token_id=[], return_audio=True,
                              speaker="Ethan", talker_do_sample=False, talker_max_new_tokens=TALKER_MAX,
                              talker_min_new_tokens=TALKER_MIN)
    finally:
        model.token2wav_params = t2w


def test_greedy_ids(ref, generated):
    ids, mask, want = ref["generate"]
    assert _margins(want["thinker_scores"], [TEXT_NEW, TEXT_NEW]) > 1e-4, "near-tied reference logits: reseed"
    # each reply varies, so decoding (cache slots, positions) is tested on new inputs, not a fixed point
    assert all(len(set(row[-TEXT_NEW:])) > 2 for row in want["sequences"])
    np.testing.assert_array_equal(generated.sequences, want["sequences"])
    assert generated.sequences.shape == (2, ids.shape[1] + TEXT_NEW)


def test_talker_codes(ref, generated):
    _, _, want = ref["generate"]
    cut = [_cut(c) for c in want["codes"]]
    # every step a row really took (its codes and the one that ended it) has a clear winner
    assert _margins(want["talker_scores"], [min(len(c) + 1, TALKER_MAX) for c in cut]) > 1e-4, \
        "near-tied reference talker logits: reseed"
    for r in range(2):
        assert len(cut[r]) >= TALKER_MIN and len(set(cut[r])) > 2
        np.testing.assert_array_equal(generated.codec_ids[r], cut[r])


def test_token2wav_waveform(ref, model):
    codes, noise, want = ref["token2wav"]
    got = model.token2wav(codes, "Chelsie", noise=noise)
    assert got.shape == want.shape == (N_CODES * 2 * 240,)  # 2 mel frames per code, 240 samples per frame
    # a waveform mostly inside the vocoder's [-1, 1] clamp, so the comparison sees the signal
    assert float(np.mean(np.abs(want) >= 1.0)) < 0.2 and float(np.std(want)) > 0.05
    assert rel_err(got, want) <= 1e-3


def test_loss_and_gradients(ref, model):
    """train_loss through both towers and the thinker; gradients of every parameter (the tied
    embedding's on the prompt's rows and 2048 others) against transformers' backward."""
    from flax import nnx

    from omni_jax.checkpoint.hf import iter_hf_tensors
    from omni_jax.thinker import THINKER_LM_PREFIXES
    from omni_jax import training as T
    from omni_jax.audio import HF_PREFIX as AUDIO
    from omni_jax.vision import HF_PREFIX as VISION

    ids, mask, mm, labels, rows, want_loss, want = ref.pop("loss")  # its gradients are freed with this test
    batch = T.make_batch(model.config, ids, mask, labels, mm)
    # training's layout: the decoder layers stacked (model.params holds them per layer for inference)
    params = {"thinker": model.stacked_params()["thinker"], "audio": nnx.split(model.audio)[1],
              "vision": nnx.split(model.vision)[1]}

    @jax.jit
    def loss_and_grads(p, b):
        (loss, aux), g = jax.value_and_grad(lambda p: T.train_loss(p, b, model.config), has_aux=True)(p)
        g = {k: nnx.to_pure_dict(v) for k, v in g.items()}
        emb = g["thinker"]["embed_tokens"]
        emb["embedding"] = emb["embedding"][rows]  # only these rows leave the program
        return loss, aux, g

    loss, aux, grads = loss_and_grads(params, batch)
    assert int(aux["thinker_tokens"]) == T.count_targets(labels) == 4
    assert rel_err(loss, want_loss) <= 1e-5
    # every stack's gradients carry a leading layer axis, as the parameters do
    thinker = iter_hf_tensors(grads.pop("thinker"), THINKER_LM_PREFIXES, ("layers",))
    towers = [iter_hf_tensors(grads.pop("audio"), {"": AUDIO}, ("layers",)),
              iter_hf_tensors(grads.pop("vision"), {"": VISION}, ("blocks",))]
    seen = set()
    for key, got in itertools.chain(thinker, *towers):
        name = _internal(key)
        if name not in want:  # unused by the forward (audio_bos_eos_token): no gradient in torch either
            assert not np.any(got), name
            continue
        assert got.shape == want[name].shape, name
        assert rel_err(got, want[name]) <= 1e-4, name
        seen.add(name)
    assert seen == set(want)


# ------------------------------------------------------------------------------------------
# Pallas kernels (interpret mode) at the published head dims, with each model's mask structure


def _pallas_case(name):
    from omni_jax.attention import MaskSpec

    if name == "thinker_d128":  # causal GQA 16:2, left padding
        valid = jnp.arange(40)[None] >= jnp.asarray([[0], [7]])
        return (2, 40, 40, 16, 2, 128), MaskSpec(causal=True, kv_valid=valid)
    if name == "dit_d64":  # block band (24, one back, one ahead), 16 heads, padded keys
        valid = jnp.arange(60)[None] < jnp.asarray([[60], [52]])
        return (2, 60, 60, 16, 16, 64), MaskSpec(block_band=(24, 1, 1), kv_valid=valid)
    if name == "vision_d80":  # vision windows of uneven length, 16 heads of 80
        seg = jnp.asarray(np.repeat([0, 1, 2], [64, 32, 16]))[None]
        return (1, 112, 112, 16, 16, 80), MaskSpec(q_segment_ids=seg, kv_segment_ids=seg)
    if name == "talker_decode_d64":  # one decode step per row against a 40-slot cache, GQA 14:2
        lens = jnp.asarray([40, 9])
        return (2, 1, 40, 14, 2, 64), MaskSpec(causal=True, q_slots=(lens - 1)[:, None],
                                               kv_valid=jnp.arange(40)[None] < lens[:, None])
    raise KeyError(name)


@pytest.mark.parametrize("name", ["thinker_d128", "talker_decode_d64", "dit_d64", "vision_d80"])
def test_pallas_interpret_equals_xla(name):
    from omni_jax.attention import xla_attention
    from omni_jax.kernels import flash

    (b, tq, tk, h, kvh, d), mask = _pallas_case(name)
    r = np.random.default_rng(len(name))
    q, k, v = (jnp.asarray(r.standard_normal(s), jnp.float32)
               for s in ((b, tq, h, d), (b, tk, kvh, d), (b, tk, kvh, d)))
    want = xla_attention(q, k, v, mask)
    if tq == 1:  # the decode kernel (split over the cache)
        run = lambda q, k, v: flash.decode_attention(q, k, v, mask, platform="interpret", block_k=8)  # noqa: E731
    else:
        run = lambda q, k, v: flash.flash_attention(q, k, v, mask, platform="interpret", block_q=16,  # noqa: E731
                                                    block_k=16)
    got = jax.jit(run)(q, k, v)
    assert got.shape == want.shape
    assert rel_err(got, want) <= 1e-5
