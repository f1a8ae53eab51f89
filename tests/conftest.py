"""Shared fixtures: tiny random Qwen2.5-Omni checkpoints built and saved with transformers.

Every reference number comes from transformers itself, run on CPU in float32. Checkpoints are
written with ``save_pretrained(max_shard_size=...)`` so the sharded loading path is exercised,
and all weights are perturbed after init so no tensor stays exactly 0 or 1.
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("OMNI_JAX_CACHE", tempfile.mkdtemp(prefix="omni-jax-test-cache-"))
# The suite runs on the CPU (its reference is transformers on torch's CPU). libtpu, in the test extra
# for ahead-of-time TPU compilation, would otherwise be initialised as a backend on a host without a
# TPU and log its failure to every process's stderr (the CLI tests read stderr); compiling for a TPU
# topology (tests/test_tpu_compile.py) does not need the TPU backend. JAX_PLATFORMS set by the caller
# wins. libtpu takes an exclusive lock per process: let parallel test workers each load it.
if not any(os.path.exists(p) for p in ("/dev/accel0", "/dev/vfio/0")):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
try:  # a persistent compile cache makes re-runs faster; harmless when empty
    jax.config.update("jax_compilation_cache_dir", os.path.join(os.environ["OMNI_JAX_CACHE"], "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
except Exception:
    pass

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# thinker text variants: GQA / MHA, tied / untied, different head dims and mrope splits
TEXT_VARIANTS = {
    "gqa": dict(text=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, mrope_section=[2, 3, 3]), tie=False),
    "mha_tied": dict(text=dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=2,
                               num_key_value_heads=2, mrope_section=[4, 4, 4]), tie=True),
    "hd32_kv1": dict(text=dict(hidden_size=64, intermediate_size=72, num_hidden_layers=3, num_attention_heads=2,
                               num_key_value_heads=1, mrope_section=[8, 4, 4]), tie=False),
    # sizes that divide no mesh axis of 8: 3 heads, 1 KV head, width 60, MLP 90, vocab 300
    "odd": dict(text=dict(hidden_size=60, intermediate_size=90, num_hidden_layers=2, num_attention_heads=3,
                          num_key_value_heads=1, mrope_section=[2, 4, 4]), tie=False),
}
VOCAB = 300
# media token ids inside the tiny vocabulary (transformers embeds every id before scattering media)
MEDIA_IDS = dict(audio_token_index=290, image_token_index=291, video_token_index=292, audio_start_token_id=293,
                 audio_end_token_id=294, vision_start_token_id=295, vision_end_token_id=296)


def tiny_hf_config(variant: str, max_position_embeddings: int = 32768):
    from transformers import Qwen2_5OmniConfig

    v = TEXT_VARIANTS[variant]
    t = dict(v["text"])
    section = t.pop("mrope_section")
    text = dict(vocab_size=VOCAB, max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section}, **t)
    return Qwen2_5OmniConfig(
        thinker_config=dict(
            text_config=text, tie_word_embeddings=v["tie"], **MEDIA_IDS,
            audio_config=dict(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=48,
                              output_dim=t["hidden_size"], num_mel_bins=16, n_window=4, max_source_positions=100),
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2,
                               out_hidden_size=t["hidden_size"], fullatt_block_indexes=[1], window_size=56)),
        talker_config=dict(vocab_size=120, embedding_size=t["hidden_size"], hidden_size=48, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                           tts_codec_start_token_id=110, tts_codec_end_token_id=111, tts_codec_pad_token_id=112,
                           tts_codec_mask_token_id=113, tts_text_start_token_id=297, tts_text_end_token_id=298,
                           tts_text_pad_token_id=299,
                           **MEDIA_IDS,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                            "mrope_section": [2, 2, 2]}),
        token2wav_config=dict(
            dit_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, head_dim=16, emb_dim=16,
                            num_embeds=120, mel_dim=20, enc_emb_dim=24, enc_dim=16, enc_channels=[16, 16, 16, 16, 48],
                            enc_attention_channels=8, enc_se_channels=8, look_ahead_layers=[0],
                            look_backward_layers=[0]),
            bigvgan_config=dict(mel_dim=20, upsample_initial_channel=32, upsample_rates=[2, 2],
                                upsample_kernel_sizes=[4, 4])),
    )


def perturb_(model, seed: int = 0, scale: float = 0.05):
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


VOICE_BOS = {"Chelsie": 296, "Ethan": 295}


def build_hf_checkpoint(directory: str, variant: str, seed: int = 0, **cfg_kw):
    """Save a tiny perturbed transformers Qwen2.5-Omni (and its spk_dict.pt) to ``directory``;
    return the torch model, its ``speaker_map`` filled with the same voices."""
    import torch
    from transformers import Qwen2_5OmniForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2_5OmniForConditionalGeneration(tiny_hf_config(variant, **cfg_kw)).eval()
    perturb_(model, seed)
    model.save_pretrained(directory, max_shard_size="100KB")
    dit = model.config.token2wav_config.dit_config
    g = torch.Generator().manual_seed(seed + 7)
    voices = {name: {"bos_token": bos, "cond": torch.randn(dit.enc_emb_dim, generator=g),
                     "ref_mel": torch.randn(30, dit.mel_dim, generator=g)} for name, bos in VOICE_BOS.items()}
    torch.save(voices, os.path.join(directory, "spk_dict.pt"))
    model.speaker_map = voices
    return model


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """{variant: (checkpoint_dir, torch_model)}, built lazily once per session."""
    cache: dict = {}

    def get(variant: str):
        if variant not in cache:
            d = str(tmp_path_factory.mktemp(f"hf-{variant}"))
            cache[variant] = (d, build_hf_checkpoint(d, variant))
        return cache[variant]

    return get


@pytest.fixture(scope="session")
def jax_model(hf_models):
    """``jax_model(variant, dtype="float32")``: the omni_jax model of a session checkpoint (cached)."""
    import omni_jax

    cache: dict = {}

    def get(variant: str, dtype: str = "float32"):
        if (variant, dtype) not in cache:
            cache[(variant, dtype)] = omni_jax.load(hf_models(variant)[0], dtype=dtype)
        return cache[(variant, dtype)]

    return get


def rel_err(got, ref) -> float:
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
