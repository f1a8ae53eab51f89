"""Audio and vision encoders against transformers (CPU, float32, highest matmul precision).

Tiny random transformers encoders (several variants each) are perturbed so that no weight
stays at its init value, saved under the thinker's key prefixes, loaded with our loaders and
run on the same inputs: several audios of different lengths in one call, several images and
a video-like grid (t > 1) in one call.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402
from transformers.models.qwen2_5_omni import configuration_qwen2_5_omni as hf_cfg  # noqa: E402
from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as hf  # noqa: E402

from omni_jax.checkpoint.loader import load_hf_component  # noqa: E402
from omni_jax.checkpoint.safetensors_io import Checkpoint  # noqa: E402
from omni_jax import audio as A  # noqa: E402
from omni_jax import vision as V  # noqa: E402
from omni_jax.config import AudioConfig, VisionConfig  # noqa: E402
from omni_jax.errors import CheckpointError, InputError  # noqa: E402


def rel_err(got, ref):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def _perturb(model, seed, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def _save(model, prefix, directory):
    sd = {prefix + k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(directory / "model.safetensors"))
    return set(sd)


# --------------------------------------------------------------------------------------
# audio

AUDIO_VARIANTS = {
    # even n_window: pooled pairs stay inside chunks; a 1-frame audio gives no token
    "mha4_nwin4": dict(cfg=dict(num_mel_bins=16, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=48,
                                d_model=32, n_window=4, output_dim=24, max_source_positions=64),
                       lens=[37, 8, 3, 16, 1]),
    # odd n_window: pairs straddle chunk boundaries; 2 heads, 3 layers
    "mha2_nwin3": dict(cfg=dict(num_mel_bins=8, encoder_layers=3, encoder_attention_heads=2, encoder_ffn_dim=40,
                                d_model=24, n_window=3, output_dim=20, max_source_positions=32),
                       lens=[27, 11, 6, 2]),
}


@pytest.fixture(scope="module", params=sorted(AUDIO_VARIANTS))
def audio_case(request, tmp_path_factory):
    v = AUDIO_VARIANTS[request.param]
    torch.manual_seed(0)
    hcfg = hf_cfg.Qwen2_5OmniAudioEncoderConfig(**v["cfg"])
    ref = _perturb(hf.Qwen2_5OmniAudioEncoder._from_config(hcfg, attn_implementation="eager"), seed=1)
    d = tmp_path_factory.mktemp("audio_" + request.param)
    keys = _save(ref, A.HF_PREFIX, d)
    cfg = AudioConfig.from_dict(hcfg.to_dict())
    consumed: set = set()
    model = load_hf_component(Checkpoint(str(d)), "audio", cfg, dtype="float32", consumed=consumed)
    lens = v["lens"]
    feats = np.random.default_rng(2).standard_normal((cfg.num_mel_bins, sum(lens))).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(feats), feature_lens=torch.tensor(lens)).last_hidden_state.numpy()
    return dict(cfg=cfg, hcfg=hcfg, model=model, feats=feats, lens=lens, want=want, keys=keys, consumed=consumed,
                dir=d)


def test_audio_matches_transformers(audio_case):
    c = audio_case
    got = np.asarray(A.encode_audio(c["model"], c["cfg"], c["feats"], c["lens"]))
    _, out_lens = A.feat_extract_output_lengths(c["lens"])
    assert got.shape == c["want"].shape == (int(out_lens.sum()), c["cfg"].output_dim)
    err = rel_err(got, c["want"])
    print(f"audio rel err {err:.2e}")
    assert err <= 1e-4


def test_audio_bucket_padding_and_per_audio(audio_case):
    """More padding chunks, or one audio at a time, give the same embeddings."""
    c = audio_case
    base = np.asarray(A.encode_audio(c["model"], c["cfg"], c["feats"], c["lens"]))
    batch = A.prepare_audio(c["cfg"], c["feats"], c["lens"])
    wide = np.asarray(A.encode_audio(c["model"], c["cfg"], c["feats"], c["lens"],
                                     num_chunks=len(batch.chunk_lens) + 5))
    assert rel_err(wide, base) <= 1e-6
    starts = np.cumsum([0] + c["lens"])
    nb = len(batch.chunk_lens)  # the bucket of the whole set, reused for every single-audio call
    compiled = A._audio_jit._cache_size()
    parts = [np.asarray(A.encode_audio(c["model"], c["cfg"], c["feats"][:, s:s + n], [n], num_chunks=nb))
             for s, n in zip(starts[:-1], c["lens"])]
    assert A._audio_jit._cache_size() == compiled  # same bucket: no new compile
    assert [p.shape[0] for p in parts] == list(batch.tokens_per_audio)
    assert rel_err(np.concatenate(parts), c["want"]) <= 1e-4


def test_audio_padded_processor_form(audio_case):
    c = audio_case
    lens = c["lens"]
    t = max(lens) + 3
    padded = np.zeros((len(lens), c["cfg"].num_mel_bins, t), np.float32)
    mask = np.zeros((len(lens), t), np.int64)
    for i, (s, n) in enumerate(zip(np.cumsum([0] + lens)[:-1], lens)):
        padded[i, :, :n] = c["feats"][:, s:s + n]
        padded[i, :, n:] = 7.0  # garbage past the mask must not matter
        mask[i, :n] = 1
    got = np.asarray(A.encode_audio_padded(c["model"], c["cfg"], padded, mask))
    assert rel_err(got, c["want"]) <= 1e-4


def test_audio_loader_consumes_every_key(audio_case):
    assert audio_case["consumed"] == audio_case["keys"]


def test_audio_bad_inputs(audio_case):
    c = audio_case
    with pytest.raises(InputError, match="feature_lens"):
        A.encode_audio(c["model"], c["cfg"], c["feats"], [c["lens"][0]])
    with pytest.raises(InputError, match="num_chunks"):
        A.encode_audio(c["model"], c["cfg"], c["feats"], c["lens"], num_chunks=1)


def test_audio_bfloat16(audio_case):
    """The bf16 load path runs and stays close (its own looser check; float32 above is the parity one)."""
    c = audio_case
    model = load_hf_component(Checkpoint(str(c["dir"])), "audio", c["cfg"], dtype="bfloat16", consumed=set())
    assert model.layers.fc1.kernel[...].dtype == jnp.bfloat16
    got = A.encode_audio(model, c["cfg"], c["feats"], c["lens"])
    assert got.dtype == jnp.bfloat16
    assert rel_err(np.asarray(got.astype(jnp.float32)), c["want"]) <= 3e-2


def test_audio_loader_errors(tmp_path):
    hcfg = hf_cfg.Qwen2_5OmniAudioEncoderConfig(**AUDIO_VARIANTS["mha2_nwin3"]["cfg"])
    ref = hf.Qwen2_5OmniAudioEncoder(hcfg)
    sd = {A.HF_PREFIX + k: v.contiguous() for k, v in ref.state_dict().items()}
    missing = A.HF_PREFIX + "layers.1.fc2.weight"
    save_file({k: v for k, v in sd.items() if k != missing}, str(tmp_path / "model.safetensors"))
    cfg = AudioConfig.from_dict(hcfg.to_dict())
    with pytest.raises(CheckpointError, match=r"layers\.1\.fc2\.weight"):
        load_hf_component(Checkpoint(str(tmp_path)), "audio", cfg, dtype="float32", consumed=set())
    wrong = dataclasses.replace(cfg, encoder_ffn_dim=cfg.encoder_ffn_dim + 1)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"layers\.0\.fc1\.(weight|bias)'.*shape"):
        load_hf_component(Checkpoint(str(tmp_path)), "audio", wrong, dtype="float32", consumed=set())


# --------------------------------------------------------------------------------------
# vision

VISION_VARIANTS = {
    # 2 heads, windows of 2x2 merge units, one full-attention block in the middle
    "h2_win2_full1": dict(cfg=dict(depth=3, hidden_size=32, hidden_act="silu", intermediate_size=48, num_heads=2,
                                   in_channels=3, patch_size=2, spatial_merge_size=2, temporal_patch_size=2,
                                   window_size=8, out_hidden_size=24, fullatt_block_indexes=[1]),
                          grids=[[1, 8, 12], [2, 4, 8], [1, 6, 6]]),
    # 4 heads, windows of 3x3 units (grids not multiples of it), full attention first and last
    "h4_win3_full03": dict(cfg=dict(depth=4, hidden_size=48, hidden_act="silu", intermediate_size=40, num_heads=4,
                                    in_channels=3, patch_size=2, spatial_merge_size=2, temporal_patch_size=2,
                                    window_size=12, out_hidden_size=28, fullatt_block_indexes=[0, 3]),
                           grids=[[3, 6, 10], [1, 14, 6], [1, 2, 2]]),
}


@pytest.fixture(scope="module", params=sorted(VISION_VARIANTS))
def vision_case(request, tmp_path_factory):
    v = VISION_VARIANTS[request.param]
    torch.manual_seed(0)
    hcfg = hf_cfg.Qwen2_5OmniVisionEncoderConfig(**v["cfg"])
    ref = _perturb(hf.Qwen2_5OmniVisionEncoder._from_config(hcfg, attn_implementation="eager"), seed=3)
    d = tmp_path_factory.mktemp("vision_" + request.param)
    keys = _save(ref, V.HF_PREFIX, d)
    cfg = VisionConfig.from_dict(hcfg.to_dict())
    consumed: set = set()
    model = load_hf_component(Checkpoint(str(d)), "vision", cfg, dtype="float32", consumed=consumed)
    grids = np.array(v["grids"])
    width = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
    pix = np.random.default_rng(4).standard_normal((int(grids.prod(-1).sum()), width)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(pix), grid_thw=torch.from_numpy(grids)).pooler_output.numpy()
    return dict(cfg=cfg, model=model, pix=pix, grids=grids, want=want, keys=keys, consumed=consumed, dir=d)


def test_vision_matches_transformers(vision_case):
    c = vision_case
    got = np.asarray(V.encode_vision(c["model"], c["cfg"], c["pix"], c["grids"]))
    m2 = c["cfg"].spatial_merge_size ** 2
    assert got.shape == c["want"].shape == (int(c["grids"].prod(-1).sum()) // m2, c["cfg"].out_hidden_size)
    err = rel_err(got, c["want"])
    print(f"vision rel err {err:.2e}")
    assert err <= 1e-4


def test_vision_bucket_padding_and_per_item(vision_case):
    """More padding patches, or one item at a time, give the same embeddings."""
    c = vision_case
    cfg, m2 = c["cfg"], c["cfg"].spatial_merge_size ** 2
    base = np.asarray(V.encode_vision(c["model"], cfg, c["pix"], c["grids"]))
    n = len(V.prepare_vision(cfg, c["grids"]).order)
    wide = np.asarray(V.encode_vision(c["model"], cfg, c["pix"], c["grids"], num_patches=n + 3 * m2))
    assert rel_err(wide, base) <= 1e-6
    sizes = c["grids"].prod(-1)
    starts = np.cumsum(np.concatenate([[0], sizes]))
    compiled = V._vision_jit._cache_size()
    parts = [np.asarray(V.encode_vision(c["model"], cfg, c["pix"][s:s + k], g[None], num_patches=n))
             for s, k, g in zip(starts[:-1], sizes, c["grids"])]
    assert V._vision_jit._cache_size() == compiled  # same bucket: no new compile
    assert [p.shape[0] for p in parts] == [int(k) // m2 for k in sizes]
    assert rel_err(np.concatenate(parts), c["want"]) <= 1e-4


def test_vision_window_layout_matches_reference(vision_case):
    """Our window order and window segments are transformers' window_index / cu_window_seqlens."""
    from transformers.vision_utils import get_vision_window_index

    cfg = vision_case["cfg"]
    grids = vision_case["grids"]
    b = V.prepare_vision(cfg, grids)
    widx, cu = get_vision_window_index(torch.from_numpy(grids), cfg.spatial_merge_size, cfg.window_size,
                                       cfg.patch_size)
    m2 = cfg.spatial_merge_size ** 2
    n = b.num_patches
    assert np.array_equal(b.order[:n:m2] // m2, widx.numpy())
    seg = b.window_ids[:n]
    bounds = np.flatnonzero(np.diff(seg)) + 1
    assert np.array_equal(np.concatenate([[0], bounds, [n]]), cu.numpy())


def test_vision_loader_consumes_every_key(vision_case):
    assert vision_case["consumed"] == vision_case["keys"]


def test_vision_bad_inputs(vision_case):
    c = vision_case
    with pytest.raises(InputError, match="pixel_values"):
        V.encode_vision(c["model"], c["cfg"], c["pix"][:-1], c["grids"])
    with pytest.raises(InputError, match="grid_thw"):
        V.encode_vision(c["model"], c["cfg"], c["pix"], [[1, 3, 4]])


def test_vision_bfloat16(vision_case):
    c = vision_case
    model = load_hf_component(Checkpoint(str(c["dir"])), "vision", c["cfg"], dtype="bfloat16", consumed=set())
    assert model.blocks.attn.q.kernel[...].dtype == jnp.bfloat16
    got = V.encode_vision(model, c["cfg"], c["pix"], c["grids"])
    assert got.dtype == jnp.bfloat16
    assert rel_err(np.asarray(got.astype(jnp.float32)), c["want"]) <= 3e-2


def test_vision_loader_errors(tmp_path):
    hcfg = hf_cfg.Qwen2_5OmniVisionEncoderConfig(**VISION_VARIANTS["h2_win2_full1"]["cfg"])
    ref = hf.Qwen2_5OmniVisionEncoder(hcfg)
    sd = {V.HF_PREFIX + k: v.contiguous() for k, v in ref.state_dict().items()}
    missing = V.HF_PREFIX + "blocks.2.attn.proj.bias"
    save_file({k: v for k, v in sd.items() if k != missing}, str(tmp_path / "model.safetensors"))
    cfg = VisionConfig.from_dict(hcfg.to_dict())
    with pytest.raises(CheckpointError, match=r"blocks\.2\.attn\.proj\.bias"):
        load_hf_component(Checkpoint(str(tmp_path)), "vision", cfg, dtype="float32", consumed=set())
    save_file(sd, str(tmp_path / "model.safetensors"))
    wrong = dataclasses.replace(cfg, out_hidden_size=cfg.out_hidden_size + 2)
    with pytest.raises(CheckpointError, match=r"merger\.mlp\.2\.(weight|bias)'.*shape"):
        load_hf_component(Checkpoint(str(tmp_path)), "vision", wrong, dtype="float32", consumed=set())
