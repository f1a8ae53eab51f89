"""Token2Wav (DiT + BigVGAN) and spk_dict.pt against transformers, CPU, float32.

Tiny random transformers models (two DiT variants with different block sizes and
look-ahead/look-back layers), every weight perturbed after init, saved under the
``token2wav.`` prefixes and loaded through :func:`omni_jax.token2wav.load_token2wav`; the
DiT's initial noise is fixed by patching ``torch.randn``.
"""

from __future__ import annotations

import os
import pickle
import zipfile

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
from omni_jax import token2wav as t2w  # noqa: E402
from omni_jax.config import Token2WavConfig  # noqa: E402
from omni_jax.errors import CheckpointError  # noqa: E402
from omni_jax.voices import load_torch_pickle, load_voices  # noqa: E402

MEL = 10

DIT_COMMON = dict(
    hidden_size=32, num_attention_heads=4, head_dim=8, ff_mult=2, emb_dim=16, num_embeds=40, repeats=2,
    mel_dim=MEL, enc_emb_dim=12, enc_dim=10, enc_channels=[16, 16, 16, 32], enc_kernel_sizes=[5, 3, 3, 1],
    enc_dilations=[1, 2, 3, 1], enc_attention_channels=8, enc_res2net_scale=2, enc_se_channels=8,
    max_position_embeddings=512, dropout=0.0,
)
DIT_VARIANTS = {
    # block 4: layer 1 looks ahead, layers 0 and 3 look back
    "b4": dict(num_hidden_layers=4, block_size=4, look_ahead_layers=[1], look_backward_layers=[0, 3]),
    # block 3: one layer looks both ways, one only back, the rest see their own block
    "b3": dict(num_hidden_layers=5, block_size=3, look_ahead_layers=[2, 4], look_backward_layers=[2]),
}
BIGVGAN = dict(mel_dim=MEL, upsample_initial_channel=16, resblock_kernel_sizes=[3, 5],
               resblock_dilation_sizes=[[1, 3, 5], [1, 2, 3]], upsample_rates=[3, 2], upsample_kernel_sizes=[7, 4])

N_CODES = 11
T_REF = 13


def rel(got, ref):
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def _perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # large q/k weights make attention peaked, so the mask and RoPE visibly matter
            scale = 0.3 if name.endswith((".alpha", ".beta", "to_q.weight", "to_k.weight")) else 0.05
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _build(variant, seed):
    torch.manual_seed(seed)
    cfg = Qwen2_5OmniToken2WavConfig(dit_config=dict(DIT_COMMON, **DIT_VARIANTS[variant]), bigvgan_config=BIGVGAN)
    model = hf.Qwen2_5OmniToken2WavModel(cfg).eval()  # forces sdpa attention (bool block mask)
    _perturb(model, seed + 1)
    return model, cfg


_SETUPS: dict = {}


def _setup(variant, tmp_path_factory):
    if variant not in _SETUPS:
        _SETUPS[variant] = _make_setup(variant, tmp_path_factory)
    return _SETUPS[variant]


@pytest.fixture(scope="module", params=sorted(DIT_VARIANTS))
def setup(request, tmp_path_factory):
    return _setup(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def b3(tmp_path_factory):
    return _setup("b3", tmp_path_factory)


@pytest.fixture(scope="module")
def b4(tmp_path_factory):
    return _setup("b4", tmp_path_factory)


def _make_setup(variant, tmp_path_factory):
    model, hcfg = _build(variant, seed=len(variant) * 7 + ord(variant[-1]))
    d = tmp_path_factory.mktemp(f"t2w_{variant}")
    sd = {"token2wav." + k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, os.path.join(d, "model.safetensors"))
    cfg = Token2WavConfig.from_dict(hcfg.to_dict())
    consumed = set()
    params = t2w.load_token2wav(Checkpoint(str(d)), cfg, consumed)
    assert consumed == set(sd), sorted(set(sd) ^ consumed)

    rng = np.random.default_rng(ord(variant[-1]))
    b = 2
    inputs = dict(
        codes=rng.integers(0, DIT_COMMON["num_embeds"] + 1, (b, N_CODES)),
        cond=rng.standard_normal((b, DIT_COMMON["enc_emb_dim"])).astype(np.float32),
        ref_mel=(rng.standard_normal((b, T_REF, MEL)) - 3).astype(np.float32),
        noise=rng.standard_normal((b, N_CODES * 2, MEL)).astype(np.float32),
    )
    return dict(variant=variant, model=model, cfg=cfg, params=params, inputs=inputs, dir=str(d), sd=sd)


def _patched_randn(noise):
    real = torch.randn

    def fake(*shape, **kw):
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (list, tuple, torch.Size)) else shape
        assert tuple(shape) == noise.shape, (shape, noise.shape)
        return torch.from_numpy(noise.copy()).to(kw.get("dtype") or torch.float32)

    return real, fake


def _torch_dit(model, inp, **kw):
    real, fake = _patched_randn(inp["noise"])
    torch.randn = fake
    try:
        with torch.no_grad():
            mel = model.code2wav_dit_model.sample(
                torch.from_numpy(inp["cond"]), torch.from_numpy(inp["ref_mel"]),
                torch.from_numpy(inp["codes"]).long(), **kw)
    finally:
        torch.randn = real
    return mel.permute(0, 2, 1).numpy()


def test_dit_sample_matches_reference(setup):
    inp, cfg = setup["inputs"], setup["cfg"]
    ref = _torch_dit(setup["model"], inp)
    got = t2w.dit_sample(setup["params"].code2wav_dit_model, cfg.dit, **inp)
    err = rel(got, ref)
    print(f"dit[{setup['variant']}] rel err {err:.2e}")
    # float32 agreement is ~1e-7; a wrong band mask or RoPE layout gives >= 1.5e-3 here
    assert err <= 1e-5, err
    assert float(np.std(ref)) > 0.1  # a non-degenerate mel


def test_dit_stacked_layout_equals_per_layer(b3):
    """The loader holds the DiT blocks per layer; a DiT in the stacked (checkpoint) layout runs the
    same computation from static slices: same mel, and re-stacking the loaded layers restores the
    loader's arrays."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    setup = b3
    inp, cfg = setup["inputs"], setup["cfg"]
    dit = setup["params"].code2wav_dit_model
    assert isinstance(dit.transformer_blocks, nnx.List) and len(dit.transformer_blocks) == cfg.dit.num_hidden_layers
    gdef, state = nnx.split(dit)
    stacked = nnx.merge(gdef, state)  # a second module over the same arrays
    lgdef = nnx.split(stacked.transformer_blocks[0])[0]
    stacked.transformer_blocks = nnx.merge(
        lgdef, jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(x) for x in stacked.transformer_blocks]))
    assert not isinstance(stacked.transformer_blocks, nnx.List)
    kw = dict(steps=4, guidance_scale=0.5)
    got = np.asarray(t2w.dit_sample(stacked, cfg.dit, **inp, **kw))
    want = np.asarray(t2w.dit_sample(dit, cfg.dit, **inp, **kw))
    assert rel(got, want) <= 1e-6 and float(np.std(want)) > 0.1
    again = t2w.dit_per_layer(stacked)
    for a, b in zip(jax.tree.leaves(nnx.state(again)), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_dit_no_guidance_and_other_steps(b3):
    setup = b3
    inp, cfg = setup["inputs"], setup["cfg"]
    kw = dict(guidance_scale=0.0, sway_coefficient=None, num_steps=4)
    ref = _torch_dit(setup["model"], inp, **kw)
    got = t2w.dit_sample(setup["params"].code2wav_dit_model, cfg.dit, **inp, guidance_scale=0.0, sway=None, steps=4)
    assert rel(got, ref) <= 1e-5


def test_dit_padded_rows_match_unpadded(b4):
    setup = b4
    inp, cfg = setup["inputs"], setup["cfg"]
    dit = setup["params"].code2wav_dit_model
    full = t2w.dit_sample(dit, cfg.dit, **inp)
    # row 0 keeps its 11 codes, row 1 is cut to 7; both padded to 14 codes
    rng = np.random.default_rng(5)
    codes = np.concatenate([inp["codes"], rng.integers(0, 40, (2, 3))], axis=1)
    noise = np.concatenate([inp["noise"], rng.standard_normal((2, 6, MEL)).astype(np.float32)], axis=1)
    noise[1, 14:] = rng.standard_normal((14, MEL))
    got = t2w.dit_sample(dit, cfg.dit, codes, inp["cond"], inp["ref_mel"], noise, code_lengths=[11, 7])
    assert rel(got[0, :22], full[0]) <= 1e-5
    short = {k: v[1:] for k, v in inp.items()}
    short["codes"], short["noise"] = short["codes"][:, :7], noise[1:, :14]
    assert rel(got[1, :14], _torch_dit(setup["model"], short)[0]) <= 1e-5
    # batch rows equal single-row decodes
    one = t2w.dit_sample(dit, cfg.dit, inp["codes"][:1], inp["cond"][:1], inp["ref_mel"][:1], inp["noise"][:1])
    assert rel(one[0], full[0]) <= 1e-5


def test_bigvgan_matches_reference(b4):
    setup = b4
    cfg = setup["cfg"]
    rng = np.random.default_rng(3)
    mel = (rng.standard_normal((2, 17, MEL)) * 2 - 4).astype(np.float32)
    voc = setup["model"].code2wav_bigvgan_model
    with torch.no_grad():
        ref = np.stack([voc(torch.from_numpy(m.T[None].copy())).numpy() for m in mel])
    got = t2w.bigvgan(setup["params"].code2wav_bigvgan_model, cfg.bigvgan, mel)
    assert got.shape == (2, 17 * 6)
    err = rel(got, ref)
    print(f"bigvgan rel err {err:.2e}")
    assert err <= 1e-5, err
    assert np.abs(ref).max() < 1.0  # not saturated by the clamp: the comparison is informative


def test_bigvgan_padded_rows_equal_each_row_alone(b4):
    """Rows of different lengths padded to one bucket (garbage in the padding, 1 to 3 frames of it, so
    every sequence end is inside the receptive field of the padding) give, over their valid samples,
    transformers' vocoder on each row alone."""
    setup = b4
    cfg = setup["cfg"]
    hop = int(np.prod(cfg.bigvgan.upsample_rates))
    rng = np.random.default_rng(5)
    lengths = [23, 21, 1, 24]
    mel = (rng.standard_normal((4, 24, MEL)) * 2 - 4).astype(np.float32)
    mel[:, 23:] += 50.0  # padding far from the signal: a leak would show
    voc = setup["model"].code2wav_bigvgan_model
    got = np.asarray(t2w.bigvgan(setup["params"].code2wav_bigvgan_model, cfg.bigvgan, mel, lengths=lengths))
    assert got.shape == (4, 24 * hop)
    for r, n in enumerate(lengths):
        with torch.no_grad():
            ref = voc(torch.from_numpy(mel[r, :n].T[None].copy())).numpy().reshape(-1)
        assert ref.shape == (n * hop,)
        assert rel(got[r, :n * hop], ref) <= 1e-5, (r, n, rel(got[r, :n * hop], ref))
    unmasked = np.asarray(t2w.bigvgan(setup["params"].code2wav_bigvgan_model, cfg.bigvgan, mel[:1, :24]))
    assert rel(unmasked[0, :23 * hop], got[0, :23 * hop]) > 1e-3  # without the lengths the padding leaks in
    from omni_jax import InputError

    for bad in ([0, 1, 1, 1], [25, 1, 1, 1], [3, 3]):
        with pytest.raises(InputError, match="lengths"):
            t2w.bigvgan(setup["params"].code2wav_bigvgan_model, cfg.bigvgan, mel, lengths=bad)


def test_kaiser_filter_matches_reference():
    for cutoff, hw, k in ((0.25, 0.3, 12), (0.25, 0.3, 11), (1 / 6, 0.1, 18)):
        ref = hf.kaiser_sinc_filter1d(cutoff, hw, k).reshape(-1).numpy()
        np.testing.assert_allclose(t2w.kaiser_sinc_filter(cutoff, hw, k), ref, rtol=1e-5, atol=1e-7)


def test_time_grid_matches_reference():
    for steps, sway in ((10, -1.0), (7, 0.3), (32, None)):
        t = torch.linspace(0, 1, steps, dtype=torch.float32)
        if sway is not None:
            t += sway * (torch.cos(torch.pi / 2 * t) - 1 + t)
        np.testing.assert_allclose(t2w.time_grid(steps, sway), t.numpy(), rtol=0, atol=2e-7)


def test_token2wav_end_to_end(b4):
    setup = b4
    inp, cfg = setup["inputs"], setup["cfg"]
    real, fake = _patched_randn(inp["noise"][:1])
    torch.randn = fake
    try:
        with torch.no_grad():
            ref = setup["model"](torch.from_numpy(inp["codes"][:1]).long(), torch.from_numpy(inp["cond"][:1]),
                                 torch.from_numpy(inp["ref_mel"][:1])).numpy()
    finally:
        torch.randn = real
    got = t2w.token2wav(setup["params"], cfg, inp["codes"][:1], inp["cond"][0], inp["ref_mel"][0], inp["noise"][:1])
    err = rel(got[0], ref)
    print(f"token2wav[{setup['variant']}] rel err {err:.2e}")
    assert err <= 1e-4, err  # the project bound for waveforms is 1e-3
    parts = t2w.presplit_token2wav(setup["params"])  # split once, as a loaded model keeps it
    assert t2w.presplit_token2wav(parts) is parts
    again = t2w.token2wav(parts, cfg, inp["codes"][:1], inp["cond"][0], inp["ref_mel"][0], inp["noise"][:1])
    np.testing.assert_array_equal(np.asarray(again), np.asarray(got))


def test_loader_buffers_and_errors(b4, tmp_path):
    setup = b4
    # checkpoints that also hold the (non-persistent here) buffers load, and count them as consumed
    bufs = {"token2wav." + n: b.contiguous() for n, b in setup["model"].named_buffers()}
    assert any(k.endswith("inv_freq") for k in bufs) and any(k.endswith("downsample.filter") for k in bufs)
    save_file({**setup["sd"], **bufs}, os.path.join(tmp_path, "model.safetensors"))
    consumed = set()
    t2w.load_token2wav(Checkpoint(str(tmp_path)), setup["cfg"], consumed)
    assert consumed == set(setup["sd"]) | set(bufs)
    key = "token2wav.code2wav_dit_model.rotary_embed.inv_freq"
    save_file({**setup["sd"], key: bufs[key] * 2}, os.path.join(tmp_path, "model.safetensors"))
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        t2w.load_token2wav(Checkpoint(str(tmp_path)), setup["cfg"], set())

    sd = dict(setup["sd"])
    missing = "token2wav.code2wav_dit_model.transformer_blocks.2.attn.to_k.weight"
    del sd[missing]
    save_file(sd, os.path.join(tmp_path, "model.safetensors"))
    with pytest.raises(CheckpointError, match=missing.replace(".", r"\.")):
        t2w.load_token2wav(Checkpoint(str(tmp_path)), setup["cfg"], set())
    bad = "token2wav.code2wav_bigvgan_model.ups.1.0.weight"
    sd = dict(setup["sd"])
    sd[bad] = torch.zeros(3, 3, 3)
    save_file(sd, os.path.join(tmp_path, "model.safetensors"))
    with pytest.raises(CheckpointError, match=bad.replace(".", r"\.") + ".*shape"):
        t2w.load_token2wav(Checkpoint(str(tmp_path)), setup["cfg"], set())


# --------------------------------------------------------------------------------------
# spk_dict.pt


def test_spk_dict_roundtrip(tmp_path):
    g = torch.Generator().manual_seed(0)
    mel = torch.randn(1, 30, MEL, generator=g)
    spk = {
        "Chelsie": {"bos_token": 151870, "cond": torch.randn(1, 12, generator=g), "ref_mel": mel},
        # bf16 storage, a strided (transposed) view, an offset view into a shared storage
        "Ethan": {"bos_token": torch.tensor(151871), "cond": torch.randn(12, generator=g).to(torch.bfloat16),
                  "ref_mel": torch.randn(MEL, 25, generator=g).t()},
        "Mixed": {"bos_token": 1, "cond": mel[0, 3], "ref_mel": mel[0, 5:9]},
    }
    path = os.path.join(tmp_path, "spk_dict.pt")
    torch.save(spk, path)
    voices = load_voices(path)
    assert set(voices) == set(spk)
    assert voices["Chelsie"].bos_token == 151870 and voices["Ethan"].bos_token == 151871
    np.testing.assert_array_equal(voices["Chelsie"].cond, spk["Chelsie"]["cond"][0].numpy())
    np.testing.assert_array_equal(voices["Chelsie"].ref_mel, mel[0].numpy())
    np.testing.assert_array_equal(voices["Ethan"].cond, spk["Ethan"]["cond"].float().numpy())
    np.testing.assert_array_equal(voices["Ethan"].ref_mel, spk["Ethan"]["ref_mel"].numpy())
    np.testing.assert_array_equal(voices["Mixed"].cond, mel[0, 3].numpy())
    np.testing.assert_array_equal(voices["Mixed"].ref_mel, mel[0, 5:9].numpy())
    for v in voices.values():
        assert v.cond.dtype == np.float32 and v.ref_mel.dtype == np.float32
    raw = load_torch_pickle(path)
    assert raw["Ethan"]["cond"].dtype.name == "bfloat16"


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_spk_dict_rejects_arbitrary_globals(tmp_path):
    path = os.path.join(tmp_path, "spk_dict.pt")
    torch.save({"Chelsie": {"bos_token": 1, "cond": torch.zeros(3), "ref_mel": torch.zeros(2, 3)}}, path)
    # replace data.pkl with a pickle that calls os.system
    with zipfile.ZipFile(path) as zf:
        entries = {n: zf.read(n) for n in zf.namelist()}
    pkl = next(n for n in entries if n.endswith("/data.pkl"))
    entries[pkl] = pickle.dumps({"Chelsie": _Evil()}, protocol=2)
    evil = os.path.join(tmp_path, "evil.pt")
    with zipfile.ZipFile(evil, "w") as zf:
        for n, b in entries.items():
            zf.writestr(n, b)
    with pytest.raises(CheckpointError, match=r"evil\.pt.*(posix|os)\.system"):
        load_voices(evil)
    torch.save({"Chelsie": {"bos_token": 1, "cond": torch.zeros(3)}}, path)
    with pytest.raises(CheckpointError, match=r"spk_dict\.pt.*Chelsie.*ref_mel"):
        load_voices(path)
    with open(os.path.join(tmp_path, "junk.pt"), "wb") as f:
        f.write(b"not a zip")
    with pytest.raises(CheckpointError, match=r"junk\.pt"):
        load_voices(os.path.join(tmp_path, "junk.pt"))


def test_sin_squared_matches_float64():
    """SnakeBeta's polynomial sin^2 stays within a few float32 ulps of the exact value, including
    large arguments (range reduction) and the points where sin^2 is 0 or 1."""
    rs = np.random.RandomState(0)
    x = np.concatenate([rs.randn(200_000) * s for s in (0.01, 1.0, 10.0, 300.0, 3e4)]
                       + [np.arange(-200, 200) * np.pi / 2]).astype(np.float32)
    got = np.asarray(t2w.sin_squared(x)).astype(np.float64)
    want = np.sin(x.astype(np.float64)) ** 2
    assert got.dtype == np.float64 and got.shape == x.shape
    assert np.abs(got - want).max() <= 5e-7
    assert got.min() >= 0.0 and got.max() <= 1.0 + 1e-6
