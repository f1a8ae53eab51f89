"""The embedded default model: a tiny, randomly initialised Qwen2.5-Omni with its own tokenizer.

Built deterministically on first use (a byte-level BPE tokenizer trained on the text below,
weights from a fixed seed) and written, atomically, as an ordinary Hugging Face checkpoint
directory under ``$OMNI_JAX_CACHE`` (default ``~/.cache/omni_jax``), so it goes through the
same loading path as a real checkpoint. Its output is noise: it exists so that every
command runs with no download.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax.numpy as jnp
import numpy as np

from .config import (AudioConfig, BigVGANConfig, DiTConfig, OmniConfig, TalkerConfig, TextConfig, ThinkerConfig,
                     Token2WavConfig, VisionConfig)

VERSION = "v4"  # bump when the default model's files change

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>",
                  "<|IMAGE|>", "<|VIDEO|>", "<|vision_bos|>", "<|vision_eos|>", "<|tts_pad|>", "<|tts_bos|>",
                  "<|tts_eos|>", "<|voice_chelsie|>", "<|voice_ethan|>"]

CORPUS = """\
omni-jax runs Qwen2.5-Omni in JAX. The thinker hears audio, sees images and video, and reads text;
the talker turns its thoughts into speech codes, and token2wav turns the codes into a waveform.
Hello! How are you today? I am fine, thank you. What can I do for you? Tell me a story about the sea.
Once upon a time there was a small boat that sailed across the ocean, looking for a quiet harbour.
The weather was calm, the sky was blue, and the wind carried the boat over the waves toward the island.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Punctuation: , . ; : ! ? ( ) [ ] { } " ' - _ / \\ @ # % & * + =.
Questions and answers, greetings and farewells, small talk about music, food, travel, science and art.
This embedded model has random weights, so what it says is noise; load a real checkpoint for real answers.
"""


def cache_root() -> str:
    return os.environ.get("OMNI_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "omni_jax")


def default_config(vocab_size: int = 512) -> OmniConfig:
    text = TextConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
                      rope_theta=10000.0, mrope_section=(4, 6, 6))
    ids = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    thinker = ThinkerConfig(
        text=text,
        audio=AudioConfig(num_mel_bins=128, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=128,
                          d_model=64, max_source_positions=1500, n_window=100, output_dim=128),
        vision=VisionConfig(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128,
                            fullatt_block_indexes=(1,), window_size=112),
        tie_word_embeddings=False,
        audio_token_id=ids["<|AUDIO|>"], image_token_id=ids["<|IMAGE|>"], video_token_id=ids["<|VIDEO|>"],
        audio_start_token_id=ids["<|audio_bos|>"], audio_end_token_id=ids["<|audio_eos|>"],
        vision_start_token_id=ids["<|vision_bos|>"], vision_end_token_id=ids["<|vision_eos|>"],
        user_token_id=-1, pad_token_id=ids["<|endoftext|>"],
    )
    media = dict(audio_token_id=ids["<|AUDIO|>"], image_token_id=ids["<|IMAGE|>"], video_token_id=ids["<|VIDEO|>"],
                 audio_start_token_id=ids["<|audio_bos|>"], audio_end_token_id=ids["<|audio_eos|>"],
                 vision_start_token_id=ids["<|vision_bos|>"], vision_end_token_id=ids["<|vision_eos|>"])
    talker = TalkerConfig(vocab_size=300, embedding_size=text.hidden_size, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                          max_position_embeddings=4096, rope_theta=10000.0, mrope_section=(2, 3, 3),
                          tts_text_start_token_id=ids["<|tts_bos|>"], tts_text_end_token_id=ids["<|tts_eos|>"],
                          tts_text_pad_token_id=ids["<|tts_pad|>"], tts_codec_start_token_id=291,
                          tts_codec_end_token_id=292, tts_codec_pad_token_id=290, tts_codec_mask_token_id=293,
                          **media)
    t2w = Token2WavConfig(
        dit=DiTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, head_dim=32, emb_dim=32,
                      num_embeds=300, mel_dim=80, enc_emb_dim=64, enc_dim=32, enc_channels=(32, 32, 32, 32, 96),
                      enc_attention_channels=16, enc_se_channels=16, block_size=24, look_ahead_layers=(1,),
                      look_backward_layers=(0,), max_position_embeddings=8192),
        bigvgan=BigVGANConfig(mel_dim=80, upsample_initial_channel=64))
    return OmniConfig(thinker=thinker, talker=talker, token2wav=t2w, enable_audio_output=True, dtype="float32")


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    return tok


def build_default_model(directory: str) -> None:
    """Write the default model's files into ``directory`` (which must exist and be empty)."""
    from flax import nnx

    from .checkpoint.components import COMPONENTS
    from .checkpoint.hf import iter_hf_tensors
    from .checkpoint.safetensors_io import write_file
    from .checkpoint.torch_pickle import write_torch_pickle
    from .processor import CHATML_TEMPLATE
    from .thinker import ThinkerLM

    vocab = 512
    tok = _train_tokenizer(vocab)
    tok.save(os.path.join(directory, "tokenizer.json"))
    cfg = default_config(vocab)
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"chat_template": CHATML_TEMPLATE, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, f,
                  indent=1)
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg.to_dict(), f, indent=1)
    with open(os.path.join(directory, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump({"eos_token_id": [SPECIAL_TOKENS.index("<|im_end|>"), SPECIAL_TOKENS.index("<|endoftext|>")],
                   "pad_token_id": SPECIAL_TOKENS.index("<|endoftext|>")}, f, indent=1)
    from .audio import AudioEncoder
    from .talker import Talker
    from .token2wav import Token2Wav
    from .vision import VisionEncoder

    rs = np.random.RandomState(0)
    tensors = {}
    parts = [
        ("thinker", lambda: ThinkerLM(cfg.thinker, dtype=jnp.float32, rngs=nnx.Rngs(0))),
        ("audio", lambda: AudioEncoder(cfg.thinker.audio, dtype=jnp.float32, rngs=nnx.Rngs(1))),
        ("vision", lambda: VisionEncoder(cfg.thinker.vision, dtype=jnp.float32, rngs=nnx.Rngs(2))),
        ("talker", lambda: Talker(cfg.talker, dtype=jnp.float32, rngs=nnx.Rngs(3))),
        ("token2wav", lambda: Token2Wav(cfg.token2wav, rngs=nnx.Rngs(4))),
    ]
    for name, make in parts:
        prefixes, stacks = COMPONENTS[name].prefixes, COMPONENTS[name].stack_names  # the components' key maps
        # numpy initialisation: JAX's eager init compiles a program per parameter shape (minutes on CPU)
        _, state = nnx.split(nnx.eval_shape(make))
        state = numpy_init(state, rs)
        for key, arr in iter_hf_tensors(state, prefixes, stacks):
            a = np.array(arr, np.float32)
            if key.endswith("norm.weight") or key.endswith("bias"):
                a = a + rs.normal(0, 0.05, a.shape).astype(np.float32)
            # larger output heads so the random model's next-token choice is not a near-tie
            tensors[key] = a * (4.0 if key.endswith(("lm_head.weight", "codec_head.weight")) else 1.0)
    write_file(os.path.join(directory, "model.safetensors"), tensors, {"format": "pt"})
    dit = cfg.token2wav.dit
    voices = {name: {"bos_token": SPECIAL_TOKENS.index(tok),
                     "cond": rs.normal(0, 1, (dit.enc_emb_dim,)).astype(np.float32),
                     "ref_mel": rs.normal(-4, 1, (60, dit.mel_dim)).astype(np.float32)}
              for name, tok in (("Chelsie", "<|voice_chelsie|>"), ("Ethan", "<|voice_ethan|>"))}
    write_torch_pickle(os.path.join(directory, "spk_dict.pt"), voices)
    with open(os.path.join(directory, "README.md"), "w", encoding="utf-8") as f:
        f.write("omni-jax embedded default model: tiny, random weights. Its output is noise.\n")


def numpy_init(abstract_state, rs: np.random.RandomState):
    """Random values for an abstract NNX state: scaled normals for matrices, ones for 1-D weights
    (norm scales), zeros for other vectors (biases, SnakeBeta's log-scale alpha and beta)."""
    from flax import nnx

    from .checkpoint.tree import flatten_dict, set_path

    pure = nnx.to_pure_dict(abstract_state)
    for path, sds in list(flatten_dict(pure)):
        shape, name = tuple(sds.shape), str(path[-1])
        if len(shape) == 1 or (len(shape) == 2 and name in ("weight", "bias") and "layers" in map(str, path)):
            a = np.ones(shape) if name in ("weight", "scale") else np.zeros(shape)
        else:
            fan_in = shape[-2] if name == "kernel" else int(np.prod(shape[1:]))
            std = 0.02 if name == "embedding" else (1.0 if name == "kernel" else 0.25) / np.sqrt(max(fan_in, 1))
            a = rs.normal(0.0, std, shape)
        set_path(pure, path, np.asarray(a, np.dtype(sds.dtype)))
    nnx.replace_by_pure_dict(abstract_state, pure)
    return abstract_state


def ensure_default_model() -> str:
    """Path of the default model, building it (atomically) if it is not cached yet."""
    root = cache_root()
    path = os.path.join(root, f"default-{VERSION}")
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return path
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".default-", dir=root)
    try:
        build_default_model(tmp)
        try:
            os.replace(tmp, path)
        except OSError:  # another process won the race, or a stale partial directory is there
            if not os.path.exists(os.path.join(path, "model.safetensors")):
                shutil.rmtree(path, ignore_errors=True)
                os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
