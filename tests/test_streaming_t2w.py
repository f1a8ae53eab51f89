"""Streaming Token2Wav (omni_jax/streaming.py) against a reference of the same chunk algorithm
built here from transformers' DiT and BigVGAN modules, CPU, float32.

The reference below restates the documented algorithm independently (an overlap-add of
per-chunk vocoder outputs with the documented weights, over windows cut from the
utterance's codes and per-frame noise) and runs each window through
``Qwen2_5OmniToken2WavDiTModel.sample`` (``torch.randn`` patched to return the window's noise
slice) and ``Qwen2_5OmniToken2WavBigVGANModel``.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.torch import save_file  # noqa: E402
from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as hf  # noqa: E402
from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniToken2WavConfig  # noqa: E402

from omni_jax.checkpoint.safetensors_io import Checkpoint  # noqa: E402
from omni_jax import streaming as st  # noqa: E402
from omni_jax import token2wav as t2w  # noqa: E402
from omni_jax.config import Token2WavConfig  # noqa: E402
from omni_jax.errors import InputError  # noqa: E402

MEL = 10
DIT = dict(hidden_size=32, num_attention_heads=4, head_dim=8, ff_mult=2, emb_dim=16, num_embeds=40, repeats=2,
           mel_dim=MEL, enc_emb_dim=12, enc_dim=10, enc_channels=[16, 16, 16, 32], enc_kernel_sizes=[5, 3, 3, 1],
           enc_dilations=[1, 2, 3, 1], enc_attention_channels=8, enc_res2net_scale=2, enc_se_channels=8,
           max_position_embeddings=512, dropout=0.0,
           # block 4 frames; like the published model: two look-back layers, one look-ahead layer
           num_hidden_layers=4, block_size=4, look_ahead_layers=[2], look_backward_layers=[0, 3])
BIGVGAN = dict(mel_dim=MEL, upsample_initial_channel=16, resblock_kernel_sizes=[3, 5],
               resblock_dilation_sizes=[[1, 3, 5], [1, 2, 3]], upsample_rates=[3, 2], upsample_kernel_sizes=[7, 4])
HOP = 6
N_CODES = 31  # 62 frames: 7 full chunks of 8 frames and a partial one
# a ramp of two 1-block chunks (2 codes each), then chunks of 2 blocks (4 codes); 2 blocks back, 1
# ahead; vocoder left context 12 frames, fade 2 frames
ALGO = dict(first_chunk_blocks=(1, 1), chunk_blocks=2, left_blocks=2, right_blocks=1, vocoder_left_frames=12,
            crossfade_frames=2)
# streamed vs whole decode on this model with ALGO. Measured: mel 2.1e-6, waveform 6.1e-4, log-mel
# 0.0052 dB (the waveform error is the vocoder's, from the 2-frame fade and 4 frames of provisional
# look-ahead at hop 6); with uniform 2-block chunks and no DiT context (left = right = 0 blocks) the
# mel error was 3.1e-3 and the waveform's 8.2e-2 / 0.80 dB. Bounds: about 5-8x the measured values.
WHOLE_MEL_BOUND = 2e-5
WHOLE_WAVE_BOUND = 3e-3
WHOLE_LOGMEL_DB_BOUND = 0.04


def rel(got, ref):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(11)
    hcfg = Qwen2_5OmniToken2WavConfig(dit_config=DIT, bigvgan_config=BIGVGAN)
    model = hf.Qwen2_5OmniToken2WavModel(hcfg).eval()
    g = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.3 if name.endswith((".alpha", ".beta", "to_q.weight", "to_k.weight")) else 0.05
            p.add_(torch.randn(p.shape, generator=g) * scale)
    d = tmp_path_factory.mktemp("stream_t2w")
    save_file({"token2wav." + k: v.contiguous() for k, v in model.state_dict().items()},
              os.path.join(d, "model.safetensors"))
    cfg = Token2WavConfig.from_dict(hcfg.to_dict())
    params = t2w.load_token2wav(Checkpoint(str(d)), cfg)
    rng = np.random.default_rng(3)
    inp = dict(codes=rng.integers(0, DIT["num_embeds"] + 1, N_CODES),
               cond=rng.standard_normal(DIT["enc_emb_dim"]).astype(np.float32),
               ref_mel=(rng.standard_normal((13, MEL)) - 3).astype(np.float32))
    key = jax.random.key(7)
    return dict(model=model, cfg=cfg, params=params, key=key, **inp)


def _stream(setup, codes=None, one_at_a_time=False, **algo):
    s = st.StreamingToken2Wav(setup["params"], setup["cfg"], setup["cond"], setup["ref_mel"], key=setup["key"],
                              **(algo or ALGO))
    codes = setup["codes"] if codes is None else codes
    parts = []
    if one_at_a_time:
        for c in codes:
            parts += s.push([c])
    else:
        parts += s.push(codes)
    parts += s.finish()
    return parts, s


@pytest.fixture(scope="module")
def streamed(setup):
    return _stream(setup)


# ---- the reference: the documented algorithm, restated, on transformers' modules


def _torch_dit(model, codes, cond, ref_mel, noise):
    real = torch.randn

    def fake(*shape, **kw):
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (list, tuple, torch.Size)) else shape
        assert tuple(shape) == (1, *noise.shape), (shape, noise.shape)
        return torch.from_numpy(noise[None].copy())

    torch.randn = fake
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads only add overhead on the 2-core CI machine
    try:
        with torch.no_grad():
            mel = model.code2wav_dit_model.sample(torch.from_numpy(cond[None]), torch.from_numpy(ref_mel[None]),
                                                  torch.from_numpy(np.asarray(codes)[None]).long())
    finally:
        torch.randn = real
        torch.set_num_threads(threads)
    return mel[0].T.numpy()  # [T, mel]


def _torch_voc(model, mel):
    with torch.no_grad():
        return model.code2wav_bigvgan_model(torch.from_numpy(np.ascontiguousarray(mel.T)[None])).reshape(-1).numpy()


def reference_stream(model, codes, cond, ref_mel, noise, *, block, rep, hop, first_chunk_blocks, chunk_blocks,
                     left_blocks, right_blocks, vocoder_left_frames, crossfade_frames):
    n = len(codes) * rep
    cf, lf, rf = chunk_blocks * block, left_blocks * block, right_blocks * block
    vl, f = vocoder_left_frames, crossfade_frames
    ramp = [first_chunk_blocks] if isinstance(first_chunk_blocks, int) else list(first_chunk_blocks)
    edges = [0]  # chunk k owns [edges[k], edges[k + 1]): the ramp's sizes, then cf each
    for r in ramp:
        edges.append(edges[-1] + r * block)
    while edges[-1] < n:
        edges.append(edges[-1] + cf)
    count = max(1, sum(1 for x in edges[:-1] if x < n))
    starts, ends = edges[:count], edges[1:count + 1]  # ends nominal; the last may pass n
    kept = np.zeros((n, noise.shape[1]), np.float32)
    prov = {}
    for k in range(len(starts)):
        s, e = starts[k], min(ends[k], n)
        ws, we = max(0, s - lf), min(n, e + rf)
        mel = _torch_dit(model, codes[ws // rep:we // rep], cond, ref_mel, noise[ws:we])
        kept[s:e] = mel[s - ws:e - ws]
        prov[k] = mel[e - ws:we - ws]
    out = np.zeros(n * hop, np.float64)
    w_in = np.sin(0.5 * np.pi * (np.arange(f * hop) + 0.5) / (f * hop)) ** 2

    def add(audio, a0, lo, hi, fade_in, fade_out):
        # this window's audio over frames [lo, hi), ramped in over its first f frames / out over its last f
        seg = audio[(lo - a0) * hop:(hi - a0) * hop].astype(np.float64)
        w = np.ones(seg.size)
        if fade_in:
            w[:f * hop] = w_in
        if fade_out:
            w[-f * hop:] = 1 - w_in
        out[lo * hop:hi * hop] += w * seg

    pushed = [k for k in prov if ends[k] + rf <= n]
    for k in pushed:  # decoded during push: vocoded with the provisional right context
        s, e = starts[k], ends[k]
        a0 = max(0, s - vl)
        audio = _torch_voc(model, np.concatenate([kept[a0:e], prov[k]]))
        add(audio, a0, max(0, s - f), e, fade_in=k > 0, fade_out=True)
    e_last = ends[len(pushed) - 1] if pushed else 0  # finish: one window ending at the utterance's end
    a0 = max(0, n - (vl + cf + rf))
    add(_torch_voc(model, kept[a0:n]), a0, max(0, e_last - f), n, fade_in=bool(pushed), fade_out=False)
    return out.astype(np.float32), kept


def test_frame_noise_is_counter_based(setup):
    key = setup["key"]
    whole = st.frame_noise(key, 0, 50, MEL)
    np.testing.assert_array_equal(st.frame_noise(key, 17, 9, MEL), whole[17:26])
    np.testing.assert_array_equal(st.frame_noise(key, 49, 1, MEL), whole[49:])
    assert abs(float(whole.std()) - 1) < 0.15 and not np.array_equal(whole[0], whole[1])
    assert not np.array_equal(st.frame_noise(jax.random.key(8), 0, 50, MEL), whole)


def test_streamed_matches_reference_algorithm(setup, streamed):
    parts, s = streamed
    got = np.concatenate(parts)
    n = N_CODES * 2
    noise = st.frame_noise(setup["key"], 0, n, MEL)
    ref, ref_mel = reference_stream(setup["model"], setup["codes"], setup["cond"], setup["ref_mel"], noise,
                                    block=DIT["block_size"], rep=2, hop=HOP, **ALGO)
    assert rel(s._mel, ref_mel) <= 1e-5
    err = rel(got, ref)
    print(f"streamed vs reference rel err {err:.2e}")
    assert err <= 1e-3, err
    assert np.abs(ref).max() < 1.0 and float(np.std(ref)) > 1e-3  # informative: neither clipped nor silent


def test_length_chunks_and_no_clicks(setup, streamed):
    parts, s = streamed
    wav = np.concatenate(parts)
    assert wav.dtype == np.float32 and wav.shape == (N_CODES * 2 * HOP,)
    cf, f = ALGO["chunk_blocks"] * DIT["block_size"], ALGO["crossfade_frames"]
    # the ramp's chunks 0 and 1 (4 frames each), then 6 chunks of 8 whose right context exists
    # before the end (one piece each: chunk 0 holds its last f frames back, the others emit
    # [s - f, e - f)), then the tail [56 - f, 62)
    assert [len(p) for p in parts] == [(4 - f) * HOP, 4 * HOP] + [cf * HOP] * 6 + [(62 - 56 + f) * HOP]
    starts = [4, 8] + [8 + cf * k for k in range(1, 7)]  # DiT seams at 4, 8, 16, ..., 56; fades start f frames earlier
    seams = [x * HOP for x in starts] + [(x - f) * HOP for x in starts]
    ratio = st.seam_jump_ratio(wav, seams)
    print(f"seam jump / 99.9th percentile elsewhere: {ratio:.2f}")
    assert ratio < 2.0, ratio
    # the detector sees a click: a 0.2 step at one seam
    clicked = wav.copy()
    clicked[seams[2]:] += 0.2
    assert st.seam_jump_ratio(clicked, seams) > 3.0


def test_one_at_a_time_equals_all_at_once(setup, streamed):
    parts, _ = streamed
    one, s = _stream(setup, one_at_a_time=True)
    np.testing.assert_array_equal(np.concatenate(one), np.concatenate(parts))
    # latency: the first audio comes with the code that completes chunk 0 and its right context
    s2 = st.StreamingToken2Wav(setup["params"], setup["cfg"], setup["cond"], setup["ref_mel"], key=setup["key"],
                               **ALGO)
    first = next(i for i, c in enumerate(setup["codes"]) if s2.push([c]))
    assert first + 1 == s2.latency_codes == (1 + 1) * 4 // 2
    with pytest.raises(InputError, match="codec ids"):
        s2.push([DIT["num_embeds"] + 1])
    s2.finish()
    with pytest.raises(InputError, match="after finish"):
        s2.push([1])
    for bad in ((1, 3), (0,), (1.5,)):  # the ramp's sizes: integers in [1, chunk_blocks]
        with pytest.raises(InputError, match="first_chunk_blocks"):
            st.StreamingToken2Wav(setup["params"], setup["cfg"], setup["cond"], setup["ref_mel"], key=setup["key"],
                                  **dict(ALGO, first_chunk_blocks=bad))


def test_close_to_whole_decode(setup, streamed):
    parts, s = streamed
    n = N_CODES * 2
    noise = st.frame_noise(setup["key"], 0, n, MEL)
    whole = np.asarray(t2w.token2wav(setup["params"], setup["cfg"], setup["codes"][None], setup["cond"],
                                     setup["ref_mel"], noise[None]))[0]
    whole_mel = np.asarray(t2w.dit_sample(setup["params"].code2wav_dit_model, setup["cfg"].dit,
                                          setup["codes"][None], setup["cond"], setup["ref_mel"], noise[None]))[0]
    c = st.closeness(np.concatenate(parts), whole)
    mel_err = rel(s._mel, whole_mel)
    print(f"streamed vs whole decode: mel {mel_err:.2e}, {c}")
    assert mel_err <= WHOLE_MEL_BOUND, mel_err
    assert c["rel_l2"] <= WHOLE_WAVE_BOUND and c["log_mel_db"] <= WHOLE_LOGMEL_DB_BOUND, c
    # with context reaching over the whole utterance every window sees all of it: the DiT mel is
    # the whole decode's and only vocoder chunking remains
    wide = dict(ALGO, left_blocks=16, right_blocks=16, vocoder_left_frames=24)
    parts_w, sw = _stream(setup, **wide)
    assert rel(sw._mel, whole_mel) <= 1e-5
    err = rel(np.concatenate(parts_w), whole)
    print(f"wide-context streamed vs whole: {err:.2e}")
    assert err <= 1e-3, err
