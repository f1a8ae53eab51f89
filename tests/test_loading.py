"""Config parsing (published and transformers-5 forms), loading, and the errors bad input causes."""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest

import omni_jax
from omni_jax import CheckpointError, InputError, OmniError
from omni_jax.config import OmniConfig, preset

from conftest import VOCAB, build_hf_checkpoint


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _published_form(cfg: dict) -> dict:
    """Rewrite a transformers-5 config.json the way the published Qwen2.5-Omni files look."""
    cfg = json.loads(json.dumps(cfg))
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    th = cfg["thinker_config"]
    text = th["text_config"]
    rp = text.pop("rope_parameters")
    text["rope_theta"] = rp["rope_theta"]
    text["rope_scaling"] = {"mrope_section": rp["mrope_section"], "rope_type": "default", "type": "default"}
    text.pop("layer_types", None)
    text.pop("rms_norm_eps", None)  # omitted defaulted field
    vis = th["vision_config"]
    vis["embed_dim"] = vis.pop("hidden_size")
    vis["in_chans"] = vis.pop("in_channels")
    vis.pop("rope_parameters", None)
    talker = cfg["talker_config"]
    rp = talker.pop("rope_parameters")
    talker["rope_theta"] = rp["rope_theta"]
    talker["rope_scaling"] = {"mrope_section": rp["mrope_section"], "type": "mrope"}
    return cfg


def test_published_config_loads_and_matches(hf_models, tmp_path, jax_model):
    src, _ = hf_models("gqa")
    d = _copy(src, tmp_path / "published")
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    pub = _published_form(cfg)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(pub, f)
    c = omni_jax.load_config(d)
    assert c.thinker.text.mrope_section == (2, 3, 3)
    assert c.thinker.text.rope_theta == 10000.0
    assert c.thinker.text.rms_norm_eps == 1e-6  # transformers' default for the omitted field
    assert c.thinker.vision.hidden_size == 32 and c.thinker.vision.in_channels == 3
    assert c.talker.mrope_section == (2, 2, 2) and c.dtype == "float32"
    model = omni_jax.load(d, dtype="float32")
    ids = np.random.RandomState(0).randint(0, VOCAB, (2, 7))
    np.testing.assert_array_equal(model.thinker_logits(ids), jax_model("gqa").thinker_logits(ids))


def test_config_forms_agree_and_roundtrip(hf_models):
    src, _ = hf_models("mha_tied")
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    a = OmniConfig.from_dict(cfg)
    b = OmniConfig.from_dict(_published_form(cfg))
    assert a.thinker == b.thinker and a.talker == b.talker and a.token2wav == b.token2wav
    assert a.thinker.tie_word_embeddings is True  # the thinker's flag, not text_config's
    assert OmniConfig.from_dict(a.to_dict()).thinker == a.thinker
    assert a.token2wav.dit.look_ahead_layers == (0,) and a.token2wav.bigvgan.upsample_rates == (2, 2)


def test_presets_have_published_shapes():
    p3, p7 = preset("3b"), preset("7b")
    t = p3.thinker.text
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads, t.head_dim,
            t.intermediate_size, t.vocab_size) == (2048, 36, 16, 2, 128, 11008, 151936)
    t = p7.thinker.text
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads,
            t.intermediate_size) == (3584, 28, 28, 4, 18944)
    for p in (p3, p7):
        v, a = p.thinker.vision, p.thinker.audio
        assert (v.hidden_size, v.depth, v.num_heads, v.intermediate_size) == (1280, 32, 16, 3420)
        assert (a.d_model, a.encoder_layers, a.encoder_attention_heads, a.encoder_ffn_dim) == (1280, 32, 20, 5120)
        assert (p.talker.hidden_size, p.talker.num_hidden_layers) == (896, 24)
        assert (p.token2wav.dit.hidden_size, p.token2wav.dit.num_hidden_layers,
                p.token2wav.dit.num_attention_heads) == (1024, 22, 16)
        assert p.token2wav.bigvgan.upsample_initial_channel == 1536
    with pytest.raises(CheckpointError, match="unknown preset 'huge'"):
        preset("huge")


def test_config_errors():
    with pytest.raises(CheckpointError, match="model_type 'llama'"):
        OmniConfig.from_dict({"model_type": "llama"})
    with pytest.raises(CheckpointError, match="thinker_config"):
        OmniConfig.from_dict({"model_type": "qwen2_5_omni"})
    with pytest.raises(CheckpointError, match=r"thinker_config.text_config.hidden_size"):
        OmniConfig.from_dict({"model_type": "qwen2_5_omni", "thinker_config": {"text_config": {
            "vocab_size": 10, "num_attention_heads": 2, "num_hidden_layers": 1, "intermediate_size": 8}}})
    with pytest.raises(CheckpointError, match="mrope_section"):
        OmniConfig.from_dict({"model_type": "qwen2_5_omni", "thinker_config": {"text_config": {
            "vocab_size": 10, "hidden_size": 16, "num_attention_heads": 2, "num_hidden_layers": 1,
            "intermediate_size": 8, "rope_scaling": {"mrope_section": [1, 1, 1]}}}})


@pytest.mark.parametrize("section,key,value,message", [
    ("text_config", "hidden_size", "big", "text_config.hidden_size is 'big': expected an integer"),
    ("text_config", "num_hidden_layers", -3, "num_hidden_layers is -3: expected a positive integer"),
    ("text_config", "num_attention_heads", 0, "num_attention_heads is 0: expected a positive integer"),
    ("text_config", "rms_norm_eps", "tiny", "rms_norm_eps is 'tiny': expected a finite number"),
    ("text_config", "use_sliding_window", "no", "use_sliding_window is 'no': expected true or false"),
    ("audio_config", "d_model", 12.5, "audio_config.d_model is 12.5: expected an integer"),
    ("vision_config", "depth", -1, "vision_config.depth is -1"),
    ("vision_config", "fullatt_block_indexes", "all", "fullatt_block_indexes is 'all': expected a list"),
    ("thinker", "position_id_per_seconds", -5, "thinker_config.position_id_per_seconds is -5: expected a positive"),
    ("thinker", "audio_token_index", "x", "thinker_config.audio_token_id is 'x': expected an integer"),
    ("thinker", "tie_word_embeddings", "yes", "tie_word_embeddings is 'yes'"),
    ("talker_config", "head_dim", [64], "talker_config.head_dim is (64,): expected an integer"),
    ("dit_config", "num_hidden_layers", None, None),  # null means the default: accepted
    ("bigvgan_config", "upsample_rates", [5, "x"], "upsample_rates.element is 'x'"),
])
def test_config_values_of_wrong_type_or_sign(section, key, value, message):
    """Every config field is checked on its type and sign: a CheckpointError naming the field, not a
    TypeError from inside the model."""
    from conftest import tiny_hf_config

    d = tiny_hf_config("gqa").to_dict()
    where = {"thinker": d["thinker_config"], "talker_config": d["talker_config"],
             "dit_config": d["token2wav_config"]["dit_config"],
             "bigvgan_config": d["token2wav_config"]["bigvgan_config"]}.get(section) \
        or d["thinker_config"][section]
    where[key] = value
    if message is None:
        assert OmniConfig.from_dict(d).token2wav.dit.num_hidden_layers == 22
    else:
        with pytest.raises(CheckpointError, match=re.escape(message)):
            OmniConfig.from_dict(d)


def test_not_a_checkpoint_dir(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        omni_jax.load(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.json"):
        omni_jax.load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        omni_jax.load(tmp_path)


def test_truncated_shard(hf_models, tmp_path):
    d = _copy(hf_models("gqa")[0], tmp_path / "trunc")
    with open(os.path.join(d, "model.safetensors.index.json")) as f:
        shard = json.load(f)["weight_map"]["thinker.model.layers.0.mlp.up_proj.weight"]
    p = os.path.join(d, shard)
    size = os.path.getsize(p)
    with open(p, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(CheckpointError, match=f"{shard}: truncated"):
        omni_jax.load(d, dtype="float32")


def test_corrupt_header_and_missing_shard(hf_models, tmp_path):
    d = _copy(hf_models("gqa")[0], tmp_path / "corrupt")
    with open(os.path.join(d, "model.safetensors.index.json")) as f:
        wm = json.load(f)["weight_map"]
    shard = wm["thinker.model.norm.weight"]
    with open(os.path.join(d, shard), "r+b") as f:
        f.seek(8)
        f.write(b"\xff\xfe garbage")
    with pytest.raises(CheckpointError, match=shard):
        omni_jax.load(d, dtype="float32")
    os.remove(os.path.join(d, shard))
    with pytest.raises(CheckpointError, match=f"names shard '{shard}', which does not exist"):
        omni_jax.load(d, dtype="float32")


@pytest.mark.parametrize("how", ["parent", "absolute"])
def test_index_cannot_name_files_outside(hf_models, tmp_path, how):
    """A shard name that leaves the checkpoint directory is refused, even when the file it names is a
    valid shard (here: the checkpoint's own shard, moved next to the directory)."""
    d = _copy(hf_models("gqa")[0], tmp_path / "ckpt")
    index = os.path.join(d, "model.safetensors.index.json")
    with open(index) as f:
        idx = json.load(f)
    shard = idx["weight_map"]["thinker.model.norm.weight"]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.move(os.path.join(d, shard), outside / shard)
    name = f"../elsewhere/{shard}" if how == "parent" else str(outside / shard)
    idx["weight_map"] = {k: (name if v == shard else v) for k, v in idx["weight_map"].items()}
    with open(index, "w") as f:
        json.dump(idx, f)
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        omni_jax.load(d, dtype="float32")


def test_missing_and_unexpected_tensor(hf_models, tmp_path):
    from omni_jax.checkpoint.safetensors_io import SafetensorsFile, write_file

    d = _copy(hf_models("gqa")[0], tmp_path / "missing")
    idx = os.path.join(d, "model.safetensors.index.json")
    with open(idx) as f:
        index = json.load(f)
    key = "thinker.model.layers.1.self_attn.k_proj.bias"
    shard = index["weight_map"].pop(key)
    f = SafetensorsFile(os.path.join(d, shard))
    rest = {k: np.array(f.get(k)) for k in f.keys() if k != key}
    del f
    write_file(os.path.join(d, shard), rest)
    with open(idx, "w") as fh:
        json.dump(index, fh)
    with pytest.raises(CheckpointError, match=f"missing tensor '{key}'"):
        omni_jax.load(d, dtype="float32")
    # put it back, plus a tensor that belongs to no component
    rest[key] = np.zeros(TEXT_KV_BIAS, np.float32)
    rest["thinker.model.extra_scale"] = np.ones(3, np.float32)
    write_file(os.path.join(d, shard), rest)
    index["weight_map"][key] = shard
    index["weight_map"]["thinker.model.extra_scale"] = shard
    with open(idx, "w") as fh:
        json.dump(index, fh)
    with pytest.raises(CheckpointError, match="unexpected tensor 'thinker.model.extra_scale'"):
        omni_jax.load(d, dtype="float32")


TEXT_KV_BIAS = (2 * 16,)  # gqa variant: 2 kv heads x head_dim 16


def test_wrong_shape(hf_models, tmp_path):
    d = _copy(hf_models("gqa")[0], tmp_path / "shape")
    p = os.path.join(d, "config.json")
    with open(p) as f:
        cfg = json.load(f)
    cfg["thinker_config"]["text_config"]["intermediate_size"] = 100
    with open(p, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(CheckpointError, match=r"tensor 'thinker.model.layers.0.mlp.(gate|up|down)_proj.weight' "
                                              r"has shape \[.*\], the config implies"):
        omni_jax.load(d, dtype="float32")


def test_bad_arguments(jax_model, tmp_path):
    model = jax_model("gqa")
    ids = np.arange(5)[None]
    cases = [
        (dict(do_sample=True, temperature=0.0), "temperature: must be > 0"),
        (dict(do_sample=True, top_p=1.5), r"top_p: must be in \(0, 1\]"),
        (dict(do_sample=True, top_k=-1), "top_k: expected an int >= 0"),
        (dict(max_new_tokens=0), "max_new_tokens: expected an int >= 1"),
        (dict(repetition_penalty=0.0), "repetition_penalty: must be > 0"),
        (dict(bogus=1), "unknown argument"),
        (dict(return_audio=True, speaker="Nobody"), "speaker 'Nobody' is not available"),
    ]
    for kw, msg in cases:
        with pytest.raises(InputError, match=msg):
            model.generate(ids, **kw)
    with pytest.raises(InputError, match=r"token ids must be in \[0, 300\)"):
        model.generate(np.array([[1, 2, 300]]))
    with pytest.raises(InputError, match="attention_mask: shape"):
        model.thinker_logits(ids, np.ones((1, 4)))
    with pytest.raises(InputError, match="position_ids: expected shape"):
        model.thinker_logits(ids, position_ids=np.zeros((3, 1, 4)))
    with pytest.raises(InputError, match="dtype 'int8'"):
        omni_jax.load(tmp_path, dtype="int8")
    with pytest.raises(InputError, match="no tokenizer.json"):
        model.generate(messages=[{"role": "user", "content": "hi"}])
    assert issubclass(InputError, OmniError) and issubclass(OmniError, ValueError)


def test_prompt_longer_than_position_limit(tmp_path):
    d = str(tmp_path / "short")
    build_hf_checkpoint(d, "gqa", max_position_embeddings=16)
    model = omni_jax.load(d, dtype="float32")
    with pytest.raises(InputError, match=r"prompt of 17 tokens is longer than max_position_embeddings \(16\)"):
        model.thinker_logits(np.arange(17)[None])
    with pytest.raises(InputError, match=r"prompt of 10 tokens \+ max_new_tokens 8 exceeds"):
        model.generate(np.arange(10)[None], max_new_tokens=8)
