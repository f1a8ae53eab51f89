"""A Qwen2.5-Omni at the published 3B widths with two layers per stack, built with transformers.

Every width, head count, vocabulary, special token id and rope setting is the published
Qwen/Qwen2.5-Omni-3B value; only the depths are cut (two layers per stack, the vision tower's
full-attention layer and the DiT's look-ahead/look-back layers moved inside those two). The two
voices of ``spk_dict.pt`` are random vectors with text-bos ids chosen inside the thinker vocabulary.

Initialising ~800M parameters with transformers' own initialisers and then perturbing them with
``torch.randn`` costs tens of seconds on a 2-core machine, so the model is built without
initialisation and every parameter is filled once, in place, by :func:`fill_`: a deterministic
pseudo-random pattern at a fan-in scale (norm weights around 1, biases and the SnakeBeta log-scales
around 0), so no tensor stays at its 0/1 initial value and a transposed, skipped or misplaced weight
changes the output.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from omni_jax.processor import left_pad

# the published 3B thinker text model (36 layers there)
TEXT = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=2, num_attention_heads=16,
            num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6, use_sliding_window=False,
            sliding_window=32768, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                                   "mrope_section": [16, 24, 24]})
# published audio encoder (32 layers there)
AUDIO = dict(d_model=1280, encoder_layers=2, encoder_attention_heads=20, encoder_ffn_dim=5120, num_mel_bins=128,
             n_window=100, max_source_positions=1500, output_dim=2048)
# published vision encoder (32 blocks there, full attention at 7, 15, 23, 31)
VISION = dict(depth=2, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048, patch_size=14,
              spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1], in_channels=3)
# published talker (24 layers there); its head_dim of 64 takes a 32-wide mrope split
TALKER = dict(vocab_size=8448, embedding_size=2048, hidden_size=896, intermediate_size=4864, num_hidden_layers=2,
              num_attention_heads=14, num_key_value_heads=2, head_dim=64, max_position_embeddings=32768,
              rms_norm_eps=1e-6, use_sliding_window=False, sliding_window=32768,
              rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 16, 0]})
# published DiT (22 layers there, look-ahead at 10, look-back at 0 and 20) and BigVGAN
DIT = dict(hidden_size=1024, num_hidden_layers=2, num_attention_heads=16, head_dim=64, ff_mult=2, emb_dim=512,
           block_size=24, look_ahead_layers=[1], look_backward_layers=[0], repeats=2, num_embeds=8193, mel_dim=80,
           enc_emb_dim=192, enc_dim=128, enc_channels=[256, 256, 256, 256, 768], enc_kernel_sizes=[5, 3, 3, 3, 1],
           enc_dilations=[1, 2, 3, 4, 1], enc_attention_channels=64, enc_res2net_scale=2, enc_se_channels=64,
           max_position_embeddings=32768)
BIGVGAN = dict(mel_dim=80, upsample_initial_channel=1536, resblock_kernel_sizes=[3, 7, 11],
               resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5], [1, 3, 5]], upsample_rates=[5, 3, 2, 2, 2, 2],
               upsample_kernel_sizes=[11, 7, 4, 4, 4, 4])

# published special ids (transformers' defaults equal them)
AUDIO_ID, IMAGE_ID, VIDEO_ID = 151646, 151655, 151656
AUDIO_BOS, AUDIO_EOS, VISION_BOS, VISION_EOS = 151647, 151648, 151652, 151653
CODEC_PAD, CODEC_BOS, CODEC_END = 8292, 8293, 8294
TEXT_IDS = 151643  # ordinary text ids are drawn below this (the special ids start at 151643)
VOICES = {"Chelsie": 151870, "Ethan": 151871}  # each voice's text-bos id (any id of the thinker vocabulary)
REF_MEL_FRAMES = 40


def hf_config():
    from transformers import Qwen2_5OmniConfig

    return Qwen2_5OmniConfig(
        thinker_config=dict(text_config=TEXT, audio_config=AUDIO, vision_config=VISION, tie_word_embeddings=True,
                            audio_token_index=AUDIO_ID, image_token_index=IMAGE_ID, video_token_index=VIDEO_ID,
                            audio_start_token_id=AUDIO_BOS, audio_end_token_id=AUDIO_EOS,
                            vision_start_token_id=VISION_BOS, vision_end_token_id=VISION_EOS,
                            position_id_per_seconds=25, seconds_per_chunk=2),
        talker_config=dict(TALKER, tts_codec_start_token_id=CODEC_BOS, tts_codec_end_token_id=CODEC_END,
                           tts_codec_pad_token_id=CODEC_PAD, tts_codec_mask_token_id=8296,
                           tts_text_start_token_id=151860, tts_text_end_token_id=151861,
                           tts_text_pad_token_id=151859, audio_token_index=AUDIO_ID, image_token_index=IMAGE_ID,
                           video_token_index=VIDEO_ID, vision_start_token_id=VISION_BOS,
                           vision_end_token_id=VISION_EOS, audio_start_token_id=AUDIO_BOS,
                           audio_end_token_id=AUDIO_EOS, position_id_per_seconds=25, seconds_per_chunk=2,
                           spatial_merge_size=2),
        token2wav_config=dict(dit_config=DIT, bigvgan_config=BIGVGAN),
    )


_PERIOD = 1_000_003  # a prime above every tensor's row count: no two rows of a large tensor are equal


def _pattern_(flat, g) -> None:
    """Overwrite the 1-D view ``flat`` with unit normal values: exact draws for small tensors; for
    large ones a normal block of prime length repeated. A row of a large matrix is then a window
    of that block at its own offset, so rows differ (no two logits of a random head tie exactly)
    without adding any low-rank structure."""
    import torch

    n = flat.numel()
    if n <= _PERIOD:
        flat.copy_(torch.randn(n, generator=g))
        return
    block = torch.randn(_PERIOD, generator=g)
    k = n // _PERIOD
    flat[:k * _PERIOD].view(k, _PERIOD).copy_(block)
    flat[k * _PERIOD:].copy_(block[:n - k * _PERIOD])


# at unit gain the vocoder's last convolution sees activations of std ~7, and 90% of the waveform
# would sit on BigVGAN's [-1, 1] clamp (where a wrong sample cannot show); scaled, it rarely does
_GAIN = {"token2wav.code2wav_bigvgan_model.conv_post.weight": 0.05}


def fill_(model, seed: int = 0) -> None:
    """Fill every parameter of ``model`` in place (see the module docstring). Weights get
    ``gain / sqrt(fan_in)`` times the pattern (gain 1 but for ``_GAIN``); norm weights
    ``1 + 0.1 x``; all other vectors (biases, SnakeBeta's log-scale alpha/beta) ``0.1 x``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    done = set()  # a tied parameter is filled once
    with torch.no_grad():
        for mod_name, mod in model.named_modules():
            is_norm = "Norm" in type(mod).__name__
            for name, p in mod.named_parameters(recurse=False):
                if id(p) in done:
                    continue
                done.add(id(p))
                flat = p.data.view(-1)
                _pattern_(flat, g)
                if p.ndim >= 2:
                    fan_in = p.numel() // p.shape[0]
                    flat.mul_(_GAIN.get(f"{mod_name}.{name}", 1.0) / np.sqrt(fan_in))
                elif is_norm and name == "weight":
                    flat.mul_(0.1).add_(1.0)
                else:
                    flat.mul_(0.1)


def build(directory: str, seed: int = 0):
    """Build, fill and save the model (``save_pretrained`` in shards) and its ``spk_dict.pt``;
    returns the torch model in eval mode with ``speaker_map`` set."""
    import torch
    from transformers import Qwen2_5OmniForConditionalGeneration
    from transformers.initialization import no_init_weights

    with no_init_weights():  # (which also skips the tying that initialisation would do)
        model = Qwen2_5OmniForConditionalGeneration(hf_config())
    model.tie_weights()
    head, embed = model.thinker.lm_head.weight, model.thinker.get_input_embeddings().weight
    assert head is embed, "the thinker's head is not tied to its embedding"
    model.eval()
    fill_(model, seed)
    model.save_pretrained(directory, max_shard_size="400MB")
    g = torch.Generator().manual_seed(seed + 1)
    voices = {name: {"bos_token": bos, "cond": torch.randn(DIT["enc_emb_dim"], generator=g),
                     "ref_mel": torch.randn(REF_MEL_FRAMES, DIT["mel_dim"], generator=g) - 4.0}
              for name, bos in VOICES.items()}
    torch.save(voices, os.path.join(directory, "spk_dict.pt"))
    model.speaker_map = voices
    return model


def thinker_view(src: str, dst: str) -> str:
    """A checkpoint directory ``dst`` that holds only ``src``'s thinker tensors: its config, and an
    index listing the thinker keys of ``src``'s shards (linked, not copied). Loading it gives the
    thinker with its audio and vision towers, without the talker or token2wav."""
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(src, "model.safetensors.index.json")) as f:
        index = json.load(f)
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k.startswith("thinker.")}
    for name in set(index["weight_map"].values()) | {"config.json"}:
        os.symlink(os.path.join(src, name), os.path.join(dst, name))
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    return dst


# ------------------------------------------------------------------------------------------
# inputs in processor form


def audio_token_count(frames: int) -> int:
    return ((frames - 1) // 2 + 1 - 2) // 2 + 1


def multimodal_inputs(seed: int = 0):
    """Two left-padded rows: row 0 text, 0.5 s of audio, text, a 112 x 168 image (two vision
    windows), text; row 1 text, a 56 x 84 image, text, 0.3 s of audio, text. Returns
    ``(input_ids, attention_mask, processor outputs)`` as numpy arrays."""
    rs = np.random.RandomState(seed)
    mels, patch = AUDIO["num_mel_bins"], 3 * 2 * 14 * 14
    audios = [50, 30]
    grids = [(1, 8, 12), (1, 4, 6)]

    def text(n):
        return list(rs.randint(0, TEXT_IDS, n))

    def aud(frames):
        return [AUDIO_BOS] + [AUDIO_ID] * audio_token_count(frames) + [AUDIO_EOS]

    def img(thw):
        return [VISION_BOS] + [IMAGE_ID] * (int(np.prod(thw)) // 4) + [VISION_EOS]

    rows = [text(4) + aud(audios[0]) + text(3) + img(grids[0]) + text(4),
            text(3) + img(grids[1]) + text(2) + aud(audios[1]) + text(5)]
    ids, mask = (np.asarray(x, np.int64) for x in left_pad(rows))
    fmask = np.zeros((2, max(audios)), np.int64)
    for i, n in enumerate(audios):
        fmask[i, :n] = 1
    n_patches = sum(int(np.prod(g)) for g in grids)
    mm = dict(input_features=rs.randn(2, mels, max(audios)).astype(np.float32), feature_attention_mask=fmask,
              pixel_values=rs.randn(n_patches, patch).astype(np.float32),
              image_grid_thw=np.asarray(grids, np.int64))
    return ids, mask, mm


# ------------------------------------------------------------------------------------------
# the sharded run (a subprocess: the host device count is fixed before JAX starts)


def sharded_logits(view: str, inputs: str, out: str, spec: str) -> dict:
    """Load ``view`` on the mesh ``spec`` and then (the sharded copy freed) on one device; write both
    thinker logits on ``inputs``' ids to ``out`` (an .npz of ``sharded`` and ``single``). Returns the
    device count, every parameter whose sharding differs from the table's, and the specs of layer
    0's q_proj and of the embedding."""
    import gc

    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    if os.environ.get("OMNI_JAX_CACHE"):
        jax.config.update("jax_compilation_cache_dir", os.path.join(os.environ["OMNI_JAX_CACHE"], "xla"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    import omni_jax
    from omni_jax.sharding import logical_to_spec, param_axes

    z = np.load(inputs)
    mesh = omni_jax.make_mesh(spec)
    m = omni_jax.load(view, dtype="float32", mesh=mesh)
    sharded = m.thinker_logits(z["ids"], z["mask"])
    bad = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(m.params)[0]:
        p = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path).replace("/value", "")
        want = tuple(logical_to_spec(param_axes(p, leaf.ndim), leaf.shape, mesh))
        got = tuple(leaf.sharding.spec)
        if got + (None,) * (leaf.ndim - len(got)) != want + (None,) * (leaf.ndim - len(want)):
            bad.append(f"{p}: {got} != {want}")
    res = {"devices": len(jax.devices()), "sharding_mismatches": bad,
           "q_proj_spec": list(m.params["layers"][0]["self_attn"]["q_proj"]["kernel"][...].sharding.spec),
           "embed_spec": list(m.params["embed_tokens"]["embedding"][...].sharding.spec)}
    del m
    gc.collect()
    single = omni_jax.load(view, dtype="float32").thinker_logits(z["ids"], z["mask"])
    np.savez(out, sharded=sharded, single=single)
    return res


if __name__ == "__main__":
    if len(sys.argv) != 6 or sys.argv[1] != "sharded":
        raise SystemExit("usage: published.py sharded VIEW_DIR INPUTS.npz OUT.npz MESH_SPEC")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    print(json.dumps(sharded_logits(*sys.argv[2:])))
