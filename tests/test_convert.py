"""Checkpoint conversion: HF -> orbax (restored parameters equal the HF load), orbax -> HF (bit-exact
round trip that transformers loads with identical logits) and the stored dtypes (lossless by default,
cast by --dtype, recorded in the manifest). Failures of convert and export are in test_errors_convert.py."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from flax import nnx

from conftest import VOCAB, rel_err

from omni_jax.checkpoint import orbax_io as oio
from convert.cli import main as cli_main
from convert.convert import convert
from convert.export import export
from omni_jax.checkpoint.loader import load_converted, load_converted_component
from omni_jax.checkpoint.safetensors_io import Checkpoint, write_file
from omni_jax.checkpoint.torch_pickle import write_torch_pickle
from omni_jax.checkpoint.tree import flatten_dict

EXTRA_KEY = "token2wav.code2wav_dit_model.rotary_embed.inv_freq"  # a buffer no module holds: passthrough


def _leaves(state) -> dict:
    return {"/".join(map(str, p)): np.asarray(v) for p, v in flatten_dict(nnx.to_pure_dict(state))}


def _assert_states_equal(got, ref, what):
    g, r = _leaves(got), _leaves(ref)
    assert set(g) == set(r), what
    for k in r:
        assert g[k].dtype == r[k].dtype and g[k].shape == r[k].shape, (what, k)
        assert g[k].tobytes() == r[k].tobytes(), (what, k)


def _add_tensor(directory: str, key: str, value: np.ndarray, shard="model-extra.safetensors"):
    write_file(os.path.join(directory, shard), {key: value}, metadata={"format": "pt"})
    p = os.path.join(directory, "model.safetensors.index.json")
    with open(p) as f:
        index = json.load(f)
    index["weight_map"][key] = shard
    with open(p, "w") as f:
        json.dump(index, f)


@pytest.fixture(scope="module")
def src(hf_models, tmp_path_factory):
    """The gqa checkpoint plus one passthrough tensor (the DiT's rotary inverse frequencies)."""
    from omni_jax.config import load_config
    from omni_jax.rope import inv_freq

    d = str(tmp_path_factory.mktemp("conv") / "hf")
    shutil.copytree(hf_models("gqa")[0], d)
    dit = load_config(d).token2wav.dit
    _add_tensor(d, EXTRA_KEY, np.asarray(inv_freq(dit.head_dim, dit.rope_theta), np.float32))
    for name, text in (("tokenizer_config.json", '{"model_max_length": 32768}'), ("chat_template.jinja", "{{ x }}")):
        with open(os.path.join(d, name), "w") as f:
            f.write(text)
    return d


@pytest.fixture(scope="module")
def converted(src, tmp_path_factory):
    """The float32 source converted with the default dtype (each tensor keeps its own)."""
    out = str(tmp_path_factory.mktemp("conv") / "orbax")
    # small groups: stacked parameters span groups and the larger tensors are stored as row blocks
    man = convert(src, out, progress=False, group_bytes=16 << 10)
    return out, man


def _items(man):
    return [(name, it) for name, c in man["components"].items() for g in c["groups"] for it in g["items"]]


def _stored_arrays(directory) -> dict:
    """{(component, param, layer, rows): stored numpy array} of a converted directory."""
    man = oio.read_manifest(directory)
    return {(name, it[0], it[1], None if it[5] is None else tuple(it[5])): arr
            for name in man["components"] for it, arr in oio.iter_component(directory, man, name)}


BF16_KEEP_F32 = ("thinker.model.norm.weight", "thinker.model.layers.1.input_layernorm.weight")


@pytest.fixture(scope="module")
def bf16_src(src, tmp_path_factory):
    """The source with every tensor in bfloat16 except the two thinker tensors of BF16_KEEP_F32 and the
    passthrough buffer: audio, vision, talker and token2wav are all bfloat16, the thinker mixes both
    (one of its stacked parameters differs between layers)."""
    import ml_dtypes

    d = str(tmp_path_factory.mktemp("conv") / "hf_bf16")
    shutil.copytree(src, d, ignore=shutil.ignore_patterns("*.safetensors", "model.safetensors.index.json"))
    ckpt = Checkpoint(src)
    tensors = {k: (ckpt.get(k) if k in BF16_KEEP_F32 or k == EXTRA_KEY else ckpt.get(k).astype(ml_dtypes.bfloat16))
               for k in ckpt.keys()}
    keys = sorted(tensors)
    shards = {f"model-{i + 1:05d}-of-00002.safetensors": keys[i::2] for i in range(2)}
    for name, ks in shards.items():
        write_file(os.path.join(d, name), {k: tensors[k] for k in ks}, metadata={"format": "pt"})
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}, f)
    return d


def test_convert_restores_exactly_what_hf_load_gives(src, converted, jax_model, hf_models):
    from omni_jax.checkpoint.safetensors_io import Checkpoint as Ckpt
    from omni_jax.config import load_config
    from omni_jax.token2wav import dit_per_layer, load_token2wav

    out, man = converted
    assert oio.is_converted(out) and not oio.is_converted(src)
    # lossless by default: a float32 source is stored in float32, nothing cast, and the manifest says so
    assert man["cast_to"] is None
    for name, c in man["components"].items():
        assert (c["dtype"], c["stored_dtypes"], c["source_dtypes"], c["cast"], c["cast_to"]) == \
            ("float32", ["float32"], ["float32"], False, None), name
    assert {(it[4], it[6]) for _, it in _items(man)} == {("F32", "float32")}
    assert list(man["components"]) == ["thinker", "audio", "vision", "talker", "token2wav"]
    assert set(man["passthrough"]["tensors"]) == {EXTRA_KEY}
    assert man["source"]["tensors"] == len(Checkpoint(src).keys())
    th = man["components"]["thinker"]
    blocks = {(it[0], it[3]) for g in th["groups"] for it in g["items"] if it[5] is not None}
    assert ("embed_tokens/embedding", False) in blocks and ("layers/mlp/up_proj/kernel", True) in blocks
    where = {(it[0], it[1]): g["dir"] for g in th["groups"] for it in g["items"]}
    assert where[("layers/self_attn/q_proj/kernel", 0)] != where[("layers/self_attn/q_proj/kernel", 1)]
    assert {"config.json", "generation_config.json", "tokenizer_config.json", "chat_template.jinja"} <= \
        set(man["files"]) and man["voices"] == "spk_dict.pt"
    for name in man["files"] + ["spk_dict.pt"]:
        with open(os.path.join(src, name), "rb") as a, open(os.path.join(out, name), "rb") as b:
            assert a.read() == b.read(), name

    # an omni_jax.load of the HF directory (float32) is the reference, component by component
    model = jax_model("gqa")
    cfg = load_config(out)
    assert cfg == model.config
    parts = load_converted(out, cfg, dtype="float32")
    thinker = parts["thinker"][1]
    stacked = model.stacked_params()  # the model keeps per-layer buffers; conversion writes the stacked layout
    _assert_states_equal(thinker, stacked["thinker"], "thinker")
    _assert_states_equal(nnx.state(parts["audio"]), nnx.state(model.audio), "audio")
    _assert_states_equal(nnx.state(parts["vision"]), nnx.state(model.vision), "vision")
    _assert_states_equal(parts["talker"][1], stacked["talker"], "talker")
    # load_token2wav holds the DiT blocks per layer (dit_per_layer); the restored module is stacked
    dit_per_layer(parts["token2wav"].code2wav_dit_model)
    _assert_states_equal(nnx.state(parts["token2wav"]), nnx.state(load_token2wav(Ckpt(src), cfg.token2wav)),
                         "token2wav")

    # and the same logits through the model's own jitted program
    ids = np.random.RandomState(3).randint(0, VOCAB, (2, 9))
    swapped = copy.copy(model)
    swapped.params = thinker
    np.testing.assert_array_equal(swapped.thinker_logits(ids), model.thinker_logits(ids))

    # restoring into a model of another shape is refused, naming the parameter
    bigger = json.loads(json.dumps(cfg.to_dict()))
    bigger["thinker_config"]["text_config"]["intermediate_size"] += 8
    from omni_jax.config import OmniConfig

    with pytest.raises(oio.CheckpointError, match=r"parameter .layers/mlp/\w+_proj/kernel. has shape"):
        load_converted_component(out, "thinker", OmniConfig.from_dict(bigger), dtype="float32")


def test_dtype_bfloat16_casts_some_components(src, jax_model, tmp_path, capsys):
    """``--dtype bfloat16`` on a float32 source casts, and the manifest records it; the default group
    size (a tiny component is one group)."""
    out = str(tmp_path / "bf16")
    capsys.readouterr()
    assert cli_main(["convert", src, out, "--quiet", "--dtype", "bfloat16", "--components", "thinker,token2wav"]) == 0
    assert "cast: thinker float32 -> bfloat16" in capsys.readouterr().err
    man = oio.read_manifest(out)
    assert list(man["components"]) == ["thinker", "audio", "vision", "token2wav"]
    assert man["skipped_components"] == ["talker"] and man["cast_to"] == "bfloat16"
    th = man["components"]["thinker"]
    assert len(th["groups"]) == 1
    for name in ("thinker", "audio", "vision"):
        c = man["components"][name]
        assert (c["dtype"], c["stored_dtypes"], c["source_dtypes"], c["cast"], c["cast_to"]) == \
            ("bfloat16", ["bfloat16"], ["float32"], True, "bfloat16"), name
    t2w = man["components"]["token2wav"]  # token2wav runs in float32: stored float32, nothing to cast
    assert (t2w["dtype"], t2w["source_dtypes"], t2w["cast"], t2w["cast_to"]) == ("float32", ["float32"], False,
                                                                                 "float32")
    assert {(n, it[6]) for n, it in _items(man)} == {("thinker", "bfloat16"), ("audio", "bfloat16"),
                                                     ("vision", "bfloat16"), ("token2wav", "float32")}
    stored = _stored_arrays(out)
    assert {a.dtype.name for (n, *_), a in stored.items() if n != "token2wav"} == {"bfloat16"}
    assert {a.dtype.name for (n, *_), a in stored.items() if n == "token2wav"} == {"float32"}
    model = jax_model("gqa", "bfloat16")
    _, thinker = load_converted_component(out, "thinker", model.config, dtype="bfloat16")
    _assert_states_equal(thinker, model.stacked_params()["thinker"], "thinker bf16")
    _, audio = load_converted_component(out, "audio", model.config, dtype="bfloat16")
    _assert_states_equal(audio, nnx.state(model.audio), "audio bf16")
    with pytest.raises(oio.CheckpointError, match="'talker' was not converted"):
        load_converted_component(out, "talker", model.config, dtype="bfloat16")


def test_restore_into_sharded_arrays(converted):
    """On a 4-device CPU mesh every parameter comes back with param_sharding's layout, same values."""
    out, _ = converted
    code = textwrap.dedent(f"""
        import os, numpy as np, jax
        from flax import nnx
        from omni_jax.config import load_config
        from omni_jax.sharding import make_mesh, param_sharding
        from omni_jax.checkpoint.loader import load_converted_component
        from omni_jax.checkpoint.tree import flatten_dict
        cfg = load_config({out!r})
        mesh = make_mesh("fsdp=2,tensor=2")
        checked = 0
        for comp, prefix in (("thinker", ""), ("talker", "talker/")):
            _, ref = load_converted_component({out!r}, comp, cfg, dtype="float32")
            _, sh = load_converted_component({out!r}, comp, cfg, dtype="float32", mesh=mesh)
            ref = dict(flatten_dict(nnx.to_pure_dict(ref)))
            for p, a in flatten_dict(nnx.to_pure_dict(sh)):
                want = param_sharding(prefix + "/".join(map(str, p)), a.shape, mesh)
                assert a.sharding.is_equivalent_to(want, a.ndim), (p, a.sharding, want)
                assert np.asarray(a).tobytes() == np.asarray(ref[p]).tobytes(), p
                checked += len(a.sharding.device_set) > 1 and a.sharding.spec != jax.sharding.PartitionSpec()
        assert checked > 5, checked
        print("OK", checked)
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


def test_round_trip_is_bit_exact_and_loads_in_transformers(src, converted, hf_models, tmp_path):
    import torch
    from transformers import Qwen2_5OmniForConditionalGeneration

    out, _ = converted
    back = str(tmp_path / "hf_back")
    assert cli_main(["export", out, back, "--quiet", "--max-shard-size", "200KB"]) == 0
    a, b = Checkpoint(src), Checkpoint(back)
    assert len(b.files) > 3  # sharded, with an index naming every tensor
    assert all(os.path.getsize(os.path.join(back, f)) < 200_000 + 50_000 for f in b.files)
    assert set(a.keys()) == set(b.keys())
    for k in a.keys():  # every tensor, passthrough included: same dtype, shape and bytes
        x, y = a.get(k), b.get(k)
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), k
    for name in ("config.json", "generation_config.json", "tokenizer_config.json", "chat_template.jinja"):
        with open(os.path.join(src, name), "rb") as f1, open(os.path.join(back, name), "rb") as f2:
            assert f1.read() == f2.read(), name
    v0 = torch.load(os.path.join(src, "spk_dict.pt"), weights_only=True)
    v1 = torch.load(os.path.join(back, "spk_dict.pt"), weights_only=True, mmap=True)
    assert v0.keys() == v1.keys()
    for spk in v0:
        assert v1[spk]["bos_token"] == v0[spk]["bos_token"]
        for f in ("cond", "ref_mel"):
            assert v1[spk][f].dtype == v0[spk][f].dtype and torch.equal(v1[spk][f], v0[spk][f])

    ref = hf_models("gqa")[1]
    loaded = Qwen2_5OmniForConditionalGeneration.from_pretrained(back, dtype=torch.float32).eval()
    ids = torch.tensor(np.random.RandomState(5).randint(0, VOCAB, (2, 11)))
    with torch.no_grad():
        got = loaded.thinker(input_ids=ids).logits
        want = ref.thinker(input_ids=ids).logits
    assert torch.equal(got, want)
    assert set(loaded.speaker_map) == {"Chelsie", "Ethan"}

    # the export converted again with the defaults stores the very same arrays, dtypes included
    again = str(tmp_path / "again")
    man2 = convert(back, again, progress=False, group_bytes=16 << 10)
    assert all(c["dtype"] == "float32" and not c["cast"] for c in man2["components"].values())
    first, second = _stored_arrays(out), _stored_arrays(again)
    assert set(first) == set(second) and len(first) > 50
    for k, a in first.items():
        assert a.dtype == second[k].dtype == np.float32 and a.tobytes() == second[k].tobytes(), k


def test_export_reads_manifests_with_one_store_dtype(src, converted, tmp_path):
    """A manifest from before per-item stored dtypes (one ``store_dtype`` per component) still exports."""
    out, man = converted
    old = str(tmp_path / "old")
    shutil.copytree(out, old)
    legacy = copy.deepcopy(man)
    legacy["dtype"] = legacy.pop("cast_to") or "float32"
    for c in legacy["components"].values():
        c["store_dtype"] = c.pop("dtype")
        for k in ("stored_dtypes", "source_dtypes", "cast", "cast_to"):
            del c[k]
        for g in c["groups"]:
            g["items"] = [it[:6] for it in g["items"]]
    with open(os.path.join(old, oio.MANIFEST), "w") as f:
        json.dump(legacy, f)
    back = str(tmp_path / "back")
    assert cli_main(["export", old, back, "--quiet"]) == 0
    a, b = Checkpoint(src), Checkpoint(back)
    assert set(a.keys()) == set(b.keys())
    for k in a.keys():
        assert a.get(k).dtype == b.get(k).dtype and a.get(k).tobytes() == b.get(k).tobytes(), k


def test_bf16_source_stays_bf16_and_loads_in_either_dtype(bf16_src, tmp_path):
    """A bfloat16 source is stored in bfloat16 by default (float32 tensors beside it stay float32,
    per tensor, even within one stacked parameter); it loads as float32 or bfloat16 with the values
    the Hugging Face directory loads with (token2wav in float32 either way) and exports back bit-exact."""
    import omni_jax
    from omni_jax.checkpoint.components import COMPONENTS
    from omni_jax.config import load_config
    from omni_jax.token2wav import dit_per_layer, load_token2wav

    out = str(tmp_path / "orbax")
    man = convert(bf16_src, out, progress=False, group_bytes=16 << 10)
    assert man["cast_to"] is None
    for name in ("audio", "vision", "talker", "token2wav"):
        c = man["components"][name]
        assert (c["dtype"], c["stored_dtypes"], c["source_dtypes"], c["cast"]) == \
            ("bfloat16", ["bfloat16"], ["bfloat16"], False), name
    th = man["components"]["thinker"]
    assert (th["dtype"], th["stored_dtypes"], th["source_dtypes"], th["cast"]) == \
        ("mixed", ["bfloat16", "float32"], ["bfloat16", "float32"], False)
    src_ckpt = Checkpoint(bf16_src)
    for _, it in _items(man):  # every tensor is stored in its own source dtype
        assert it[6] == src_ckpt.get(it[2]).dtype.name, it
    assert {it[2] for _, it in _items(man) if it[6] == "float32"} == set(BF16_KEEP_F32)
    stored = _stored_arrays(out)
    assert stored[("thinker", "layers/input_layernorm/weight", 1, None)].dtype == np.float32
    assert stored[("thinker", "layers/input_layernorm/weight", 0, None)].dtype.name == "bfloat16"

    cfg = load_config(out)
    for dt in ("float32", "bfloat16"):
        ref = omni_jax.load(bf16_src, dtype=dt)
        parts = {name: load_converted_component(out, name, cfg, dtype=dt) for name in COMPONENTS}
        stacked = ref.stacked_params()
        _assert_states_equal(parts["thinker"][1], stacked["thinker"], f"thinker {dt}")
        _assert_states_equal(parts["talker"][1], stacked["talker"], f"talker {dt}")
        _assert_states_equal(parts["audio"][1], nnx.state(ref.audio), f"audio {dt}")
        _assert_states_equal(parts["vision"][1], nnx.state(ref.vision), f"vision {dt}")
        assert {v.dtype.name for v in _leaves(parts["thinker"][1]).values()} == {dt}
        t2w = nnx.merge(*parts["token2wav"])
        dit_per_layer(t2w.code2wav_dit_model)
        t2w_state = nnx.state(t2w)
        assert {v.dtype.name for v in _leaves(t2w_state).values()} == {"float32"}
        _assert_states_equal(t2w_state, nnx.state(load_token2wav(src_ckpt, cfg.token2wav)), f"token2wav {dt}")

    back = str(tmp_path / "back")
    export(out, back, progress=False)
    b = Checkpoint(back)
    assert set(src_ckpt.keys()) == set(b.keys())
    for k in src_ckpt.keys():
        x, y = src_ckpt.get(k), b.get(k)
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), k


def test_torch_pickle_writer_without_torch(tmp_path):
    import ml_dtypes
    import torch

    from omni_jax.voices import load_torch_pickle

    rng = np.random.RandomState(0)
    obj = {"a": {"bos_token": 296, "big": 1 << 40, "x": 0.25, "ok": True, "none": None, "name": "é",
                 "f32": rng.randn(3, 5).astype(np.float32), "bf16": rng.randn(7).astype(ml_dtypes.bfloat16),
                 "i64": np.arange(6, dtype=np.int64).reshape(2, 3), "scalar": np.array(2.5, np.float16),
                 "empty": np.zeros((0, 4), np.float32)},
           "list": [1, (2, 3)]}
    p = str(tmp_path / "x.pt")
    write_torch_pickle(p, obj)
    t = torch.load(p, weights_only=True)
    ours = load_torch_pickle(p)
    for k, v in obj["a"].items():
        if isinstance(v, np.ndarray):
            tv = t["a"][k]
            want = torch.from_numpy(v.view(np.int16)).view(torch.bfloat16) if v.dtype == ml_dtypes.bfloat16 \
                else torch.from_numpy(v)
            assert tv.dtype == want.dtype and torch.equal(tv, want), k
            assert ours["a"][k].dtype == v.dtype and ours["a"][k].tobytes() == v.tobytes(), k
        else:
            assert t["a"][k] == v and ours["a"][k] == v, k
    assert t["list"] == [1, (2, 3)]


def test_load_converted_directory_via_cli(hf_models, jax_model, tmp_path, capsys):
    """`omni-jax convert` then `omni_jax.load(OUT_DIR)`: the same model, logits and speech codes."""
    import omni_jax
    from omni_jax.cli import main

    src, torch_ref = hf_models("gqa")
    out = tmp_path / "converted"
    assert main(["convert", src, str(out), "--quiet"]) == 0  # the default: a float32 source stays float32
    model = omni_jax.load(out, dtype="float32")
    ref = jax_model("gqa")
    ids = np.random.RandomState(3).randint(0, 280, (2, 7))
    got = model.thinker_logits(ids)
    assert rel_err(got, ref.thinker_logits(ids)) <= 1e-6
    np.testing.assert_array_equal(got, ref.thinker_logits(ids))
    import torch

    with torch.no_grad():
        want = torch_ref.thinker(input_ids=torch.tensor(ids)).logits.numpy()
    assert rel_err(got, want) <= 1e-4
    kw = dict(max_new_tokens=5, eos_token_id=[], return_audio=True, talker_do_sample=False,
              talker_max_new_tokens=10, talker_min_new_tokens=4)
    a, b = model.generate(ids, **kw), ref.generate(ids, **kw)
    np.testing.assert_array_equal(a.sequences, b.sequences)
    for x, y in zip(a.codec_ids, b.codec_ids):
        np.testing.assert_array_equal(x, y)
    assert sorted(model.voices) == ["Chelsie", "Ethan"]
    # export back and the exported directory loads to the same logits
    back = tmp_path / "back"
    assert main(["export", str(out), str(back), "--quiet"]) == 0
    np.testing.assert_array_equal(omni_jax.load(back, dtype="float32").thinker_logits(ids), ref.thinker_logits(ids))
    assert main(["convert", src, str(out)]) == 2  # exists: needs --overwrite
    assert "overwrite" in capsys.readouterr().err
