"""The embedded default model, the text API on it (messages, stream) and the ``omni-jax`` CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import omni_jax
from omni_jax.cli import main


@pytest.fixture(scope="module")
def default_model():
    return omni_jax.load(omni_jax.default_model_path(), dtype="float32")


def test_default_model_is_deterministic_and_cached(default_model, tmp_path, monkeypatch):
    path = omni_jax.default_model_path()
    assert os.path.exists(os.path.join(path, "model.safetensors"))
    # a second build elsewhere gives byte-identical files
    monkeypatch.setenv("OMNI_JAX_CACHE", str(tmp_path))
    other = omni_jax.default_model_path()
    assert other != path
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        with open(os.path.join(path, name), "rb") as a, open(os.path.join(other, name), "rb") as b:
            assert a.read() == b.read(), name
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".default-")]  # no partial build left


def test_messages_text_and_batch(default_model):
    conv = [{"role": "user", "content": "Tell me a story about the sea."}]
    one = default_model.generate(messages=conv, max_new_tokens=12)
    assert isinstance(one.text[0], str) and one.sequences.shape[0] == 1
    prompt = default_model.processor.apply_chat_template(conv)
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = default_model.processor.encode(prompt)
    np.testing.assert_array_equal(one.sequences[0, :len(ids)], ids)
    new = one.sequences[0, len(ids):]
    eos = default_model.generation_config["eos_token_id"]
    reply = [int(t) for t in new if t not in eos]
    assert one.text[0] == default_model.processor.decode(reply)
    batch = default_model.generate(messages=[conv, [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]],
                                   max_new_tokens=12)
    assert batch.text[0] == one.text[0] and len(batch.text) == 2


def test_stream_matches_generate_and_can_stop(default_model):
    conv = [{"role": "user", "content": "Hello! How are you today?"}]
    kw = dict(max_new_tokens=24, eos_token_id=[])
    full = default_model.generate(messages=conv, **kw)
    events = list(default_model.stream(messages=conv, steps_per_event=3, **kw))
    assert events[-1].kind == "done" and all(e.kind == "text" for e in events[:-1])
    assert len(events) > 3  # delivered in several pieces, not at the end
    ids = [t for e in events[:-1] for t in e.token_ids]
    np.testing.assert_array_equal(ids, full.sequences[0, full.prompt_length:])
    assert "".join(e.text for e in events) == full.text[0]
    assert all(b.t >= a.t for a, b in zip(events, events[1:]))
    # stopping midway leaves the model usable
    it = default_model.stream(messages=conv, **kw)
    next(it)
    it.close()
    again = default_model.generate(messages=conv, **kw)
    np.testing.assert_array_equal(again.sequences, full.sequences)


def test_text_streamer_whole_characters():
    from omni_jax.processor import TextStreamer

    class ByteProc:  # decodes ids as raw UTF-8 bytes, like byte-level BPE pieces
        def decode(self, ids):
            return bytes(ids).decode("utf-8", errors="replace")

    text = "héllo, 世界 🎉!"
    data = list(text.encode())
    s = TextStreamer(ByteProc())
    deltas = [s.push([b]) for b in data] + [s.flush()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_cli_generate_json(capsys):
    assert main(["generate", "--prompt", "Hi", "--max-new-tokens", "8", "--greedy", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["embedded_default"] is True and len(out["token_ids"]) >= 1
    assert isinstance(out["text"], str)


def test_cli_stream_and_errors(capsys):
    assert main(["generate", "--prompt", "Hi", "--max-new-tokens", "6", "--stream", "--temperature", "0.8",
                 "--top-p", "0.9", "--seed", "3"]) == 0
    captured = capsys.readouterr()
    assert "embedded default model" in captured.err and captured.out.endswith("\n")
    assert main(["generate", "--model", "/nonexistent/dir", "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: /nonexistent/dir: not a directory (expected a Qwen2.5-Omni checkpoint directory)"]
    assert main(["generate", "--max-new-tokens", "0"]) == 2
    assert "max-new-tokens" in capsys.readouterr().err


def test_console_script_exit_code(tmp_path):
    """The installed entry point prints one line and exits 2 on a user error (no traceback)."""
    r = subprocess.run([sys.executable, "-m", "omni_jax.cli", "generate", "--model", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: {tmp_path}/config.json: no config.json (not a Qwen2.5-Omni checkpoint " \
                               "directory)"
    assert "Traceback" not in r.stderr
