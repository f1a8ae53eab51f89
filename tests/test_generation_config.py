"""Thinker generation defaults: explicit argument > the checkpoint's generation_config.json >
transformers' GenerationConfig defaults, in the API, the CLI and the server, vs transformers' thinker
generate run with the same generation_config.json."""

from __future__ import annotations

import json
import os
import shutil
import threading

import numpy as np
import pytest
import torch

import omni_jax
from omni_jax.generation_config import read_generation_config as _generation_config

from conftest import VOCAB

N = 10


@pytest.fixture(scope="module")
def ckpt(hf_models, tmp_path_factory):
    """A copy of the tiny gqa checkpoint (its generation_config.json is rewritten per test) and its
    transformers model."""
    src, tm = hf_models("gqa")
    d = str(tmp_path_factory.mktemp("gencfg") / "ckpt")
    shutil.copytree(src, d)
    return d, tm


@pytest.fixture(scope="module")
def model(ckpt):
    return omni_jax.load(ckpt[0], dtype="float32")


@pytest.fixture(scope="module")
def ids():
    return np.random.RandomState(21).randint(0, 280, (1, 9))


def set_gc(model, d, cfg: dict):
    """Write ``cfg`` as the checkpoint's generation_config.json and read it as ``load`` does."""
    with open(os.path.join(d, "generation_config.json"), "w") as f:
        json.dump(cfg, f)
    model.generation_config = _generation_config(d, model.processor)


def reference(ckpt, ids, check_margin=True, **kw):
    """transformers' thinker generate with the checkpoint's generation_config.json as its defaults
    (what ``Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained`` loads) and ``kw`` on top."""
    from transformers import GenerationConfig

    d, tm = ckpt
    saved = tm.thinker.generation_config
    tm.thinker.generation_config = GenerationConfig.from_pretrained(d)
    try:
        with torch.no_grad():
            out = tm.thinker.generate(input_ids=torch.tensor(ids), attention_mask=torch.ones_like(torch.tensor(ids)),
                                      output_scores=True, return_dict_in_generate=True, **kw)
    finally:
        tm.thinker.generation_config = saved
    if check_margin:
        top2 = np.sort(np.stack([s.numpy() for s in out.scores], 1), axis=-1)[..., -2:]
        fin = np.isfinite(top2).all(-1)
        assert (top2[..., 1] - top2[..., 0])[fin].min() > 1e-4, "near-tied reference logits: pick another prompt"
    return out.sequences.numpy()


def new_ids(out, ids):
    return out.sequences[0, ids.shape[1]:]


def test_file_sampling_with_top_k_1_gives_the_greedy_ids(ckpt, model, ids):
    d, _ = ckpt
    set_gc(model, d, {"do_sample": True, "top_k": 1, "max_new_tokens": N})
    out = model.generate(ids)  # no sampling argument: all from the file
    ref = reference(ckpt, ids, check_margin=False)  # top-k 1 leaves one finite score per step
    np.testing.assert_array_equal(ref, reference(ckpt, ids, do_sample=False))  # (margins checked here)
    np.testing.assert_array_equal(out.sequences, ref)
    greedy = model.generate(ids, do_sample=False)
    np.testing.assert_array_equal(out.sequences, greedy.sequences)
    # the file's do_sample is really read: without its top_k=1 (so top-k 50) the same seed samples other ids
    set_gc(model, d, {"do_sample": True, "temperature": 2.0, "max_new_tokens": N})
    assert not np.array_equal(model.generate(ids).sequences, greedy.sequences)


def test_file_repetition_penalty_and_max_new_tokens(ckpt, model, ids):
    d, _ = ckpt
    set_gc(model, d, {"repetition_penalty": 1.3, "max_new_tokens": 14})
    out = model.generate(ids)
    assert out.sequences.shape == (1, ids.shape[1] + 14)
    np.testing.assert_array_equal(out.sequences, reference(ckpt, ids))
    plain = model.generate(ids, repetition_penalty=1.0)
    assert not np.array_equal(plain.sequences, out.sequences)  # the penalty mattered
    # explicit arguments win over the file, as in transformers
    over = model.generate(ids, repetition_penalty=1.0, max_new_tokens=5)
    np.testing.assert_array_equal(over.sequences, reference(ckpt, ids, repetition_penalty=1.0, max_new_tokens=5))
    np.testing.assert_array_equal(over.sequences, plain.sequences[:, :ids.shape[1] + 5])


def test_file_max_length_counts_the_prompt(ckpt, model, ids):
    d, _ = ckpt
    t = ids.shape[1]
    set_gc(model, d, {"max_length": t + 4})
    out = model.generate(ids)
    assert out.sequences.shape == (1, t + 4)
    np.testing.assert_array_equal(out.sequences, reference(ckpt, ids))
    set_gc(model, d, {"max_length": t + 4, "max_new_tokens": 6})  # max_new_tokens takes precedence
    assert model.generate(ids).sequences.shape == (1, t + 6)
    assert reference(ckpt, ids).shape == (1, t + 6)
    set_gc(model, d, {"max_length": t})
    with pytest.raises(ValueError):
        reference(ckpt, ids, check_margin=False)
    with pytest.raises(omni_jax.InputError, match=r"generation_config.json max_length \(9\) leaves no room"):
        model.generate(ids)
    # neither in the file: 1024 new tokens, cut to what max_position_embeddings leaves
    set_gc(model, d, {})
    st = model.sampling_settings(prompt_length=t)
    assert st == dict(do_sample=False, temperature=1.0, top_k=50, top_p=1.0, repetition_penalty=1.0,
                      max_new_tokens=1024)
    limit = model.config.thinker.text.max_position_embeddings
    assert model.sampling_settings(prompt_length=limit - 3)["max_new_tokens"] == 3


def test_file_eos_and_pad(ckpt, model, ids):
    d, _ = ckpt
    set_gc(model, d, {"max_new_tokens": N})
    free = new_ids(model.generate(ids), ids)
    eos = int(free[3])
    first = int(np.argmax(free == eos))
    set_gc(model, d, {"max_new_tokens": N, "eos_token_id": eos, "pad_token_id": 7})
    got = new_ids(model.generate(ids), ids)
    ref = reference(ckpt, ids)[0, ids.shape[1]:]  # transformers stops the (one-row) batch at its EOS
    np.testing.assert_array_equal(ref, free[:first + 1])
    np.testing.assert_array_equal(got[:first + 1], ref)
    assert (got[first + 1:] == 7).all()
    # an explicit eos_token_id wins
    np.testing.assert_array_equal(new_ids(model.generate(ids, eos_token_id=[]), ids), free)


def test_file_temperature_and_top_p(ckpt, model, ids):
    d, _ = ckpt
    set_gc(model, d, {"max_new_tokens": N})
    greedy = model.generate(ids).sequences
    set_gc(model, d, {"max_new_tokens": N, "do_sample": True, "top_k": 0, "temperature": 1e-4})
    np.testing.assert_array_equal(model.generate(ids).sequences, greedy)  # a near-zero temperature: argmax
    assert not np.array_equal(model.generate(ids, temperature=2.0).sequences, greedy)
    set_gc(model, d, {"max_new_tokens": N, "do_sample": True, "top_k": 0, "top_p": 1e-6, "temperature": 2.0})
    np.testing.assert_array_equal(model.generate(ids).sequences, greedy)  # only the top token survives
    assert not np.array_equal(model.generate(ids, top_p=1.0).sequences, greedy)


def test_top_k_zero_means_no_top_k(ckpt, model, ids):
    d, _ = ckpt
    set_gc(model, d, {})
    kw = dict(do_sample=True, temperature=3.0, max_new_tokens=24, seed=5)
    none = model.generate(ids, top_k=0, **kw).sequences
    np.testing.assert_array_equal(none, model.generate(ids, top_k=VOCAB, **kw).sequences)
    default = model.generate(ids, **kw).sequences  # unset: transformers' top-k 50
    np.testing.assert_array_equal(default, model.generate(ids, top_k=50, **kw).sequences)
    assert not np.array_equal(none, default)
    with pytest.raises(omni_jax.InputError, match="top_k: expected an int >= 0"):
        model.generate(ids, top_k=-1, **kw)


def test_bad_generation_config_value(ckpt, tmp_path):
    d = str(tmp_path / "bad")
    shutil.copytree(ckpt[0], d)
    with open(os.path.join(d, "generation_config.json"), "w") as f:
        json.dump({"top_k": "many"}, f)
    with pytest.raises(omni_jax.CheckpointError, match=r"generation_config.json: top_k 'many' is not a valid value"):
        omni_jax.load(d, dtype="float32")


# ---------------------------------------------------------------------------------------------
# the CLI and the server


@pytest.fixture(scope="module")
def default_copy(tmp_path_factory):
    """A copy of the embedded default model (it has a tokenizer, so the CLI can run on it)."""
    d = str(tmp_path_factory.mktemp("gencfg-default") / "model")
    shutil.copytree(omni_jax.default_model_path(), d)
    return d


def _cli_ids(capsys, d, *flags):
    from omni_jax.cli import main

    capsys.readouterr()
    assert main(["generate", "--model", d, "--prompt", "Hi", "--no-audio", "--json", "--dtype", "float32",
                 *flags]) == 0
    return json.loads(capsys.readouterr().out)["token_ids"]


def test_cli_follows_the_generation_config(default_copy, capsys):
    from omni_jax.processor import DEFAULT_SYSTEM_PROMPT

    d = default_copy
    conv = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    m = omni_jax.load(d, dtype="float32")
    out = m.generate(messages=conv, do_sample=False, max_new_tokens=6, eos_token_id=[])
    greedy = [int(x) for x in out.sequences[0, out.prompt_length:]]
    base = {"eos_token_id": [], "pad_token_id": 0}
    with open(os.path.join(d, "generation_config.json"), "w") as f:
        json.dump({**base, "do_sample": True, "top_k": 1, "max_new_tokens": 4}, f)
    assert _cli_ids(capsys, d) == greedy[:4]  # sampling with top-k 1, 4 tokens: from the file
    assert _cli_ids(capsys, d, "--max-new-tokens", "6") == greedy  # the flag wins
    assert _cli_ids(capsys, d, "--top-k", "0", "--temperature", "3", "--max-new-tokens", "6") != greedy
    with open(os.path.join(d, "generation_config.json"), "w") as f:
        json.dump({**base, "do_sample": True, "top_k": 0, "temperature": 3.0, "max_new_tokens": 6}, f)
    assert _cli_ids(capsys, d) != greedy
    assert _cli_ids(capsys, d, "--greedy") == greedy


def test_server_follows_the_generation_config(ckpt, model, ids):
    from omni_jax.serve import Engine, ServeLimits, ServeRequest
    from omni_jax.serve.openai_format import parse_chat_request

    d, _ = ckpt
    set_gc(model, d, {"do_sample": True, "top_k": 1, "repetition_penalty": 1.3, "max_new_tokens": 6})
    expected = new_ids(model.generate(ids, eos_token_id=[]), ids)
    plain = new_ids(model.generate(ids, do_sample=False, repetition_penalty=1.0, max_new_tokens=8, eos_token_id=[]),
                    ids)
    assert not np.array_equal(expected, plain[:6])
    limits = ServeLimits(max_batch=2, max_tokens=16, max_prompt_tokens=16, max_audio_tokens=16)

    def params(**body):
        req = parse_chat_request({"messages": [{"role": "user", "content": "x"}], "ignore_eos": True, **body},
                                 limits=limits, voices=[], allow_local_media=False, speech_ok=False)
        return req.params

    p = params()
    assert (p.max_tokens, p.do_sample, p.temperature, p.top_k, p.top_p, p.repetition_penalty) == (None,) * 6
    engine = Engine(model, limits).start()
    try:
        got = []
        for prm in (params(), params(temperature=0, max_tokens=8, repetition_penalty=1.0)):
            done = threading.Event()
            box = {}

            def sink(ev, box=box, done=done):
                if ev[0] in ("done", "error"):
                    box[ev[0]] = ev[1]
                    done.set()

            engine.submit(ServeRequest(inputs=dict(input_ids=ids, attention_mask=np.ones_like(ids)), params=prm,
                                       sink=sink))
            assert done.wait(300)
            assert "error" not in box, box.get("error")
            got.append(box["done"]["token_ids"])
    finally:
        engine.stop()
    np.testing.assert_array_equal(got[0], expected)  # unset fields: the checkpoint's
    np.testing.assert_array_equal(got[1], plain)  # explicit fields win
