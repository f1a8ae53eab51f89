"""Bad requests and faults of `omni-jax serve`: each answered alone with its HTTP status and an
OpenAI-style JSON error naming the problem (never a 500 or a traceback), the server healthy afterwards
(a good request made beside and after the bad ones gives the offline result), and the CLI's own errors
(a port in use, paths as users type them)."""

from __future__ import annotations

import base64
import io
import os
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

import omni_jax
from test_media import bomb_png
from test_serve import LIMITS, _stream_raw, offline, png, post, server, tone_wav  # noqa: F401  (fixture)


def test_queue_full_gives_429(server):
    engine = server["engine"]
    engine.limits.max_queue = 1
    try:
        engine.pause()
        body = dict(messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0, seed=0)
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(post, server, body)
            deadline = time.time() + 30
            while len(engine.queue) < 1 and time.time() < deadline:
                time.sleep(0.02)
            r = post(server, body)
            assert r.status_code == 429 and r.headers["Retry-After"] == "1"
            assert r.json()["error"]["code"] == "queue_full" and "queue is full" in r.json()["error"]["message"]
            engine.resume()
            assert first.result().status_code == 200
    finally:
        engine.limits.max_queue = LIMITS["max_queue"]
        engine.resume()


def test_bad_inputs_answer_alone(server):
    model = server["model"]
    img = png(60, 90, seed=4)
    url = "data:image/png;base64," + base64.b64encode(img).decode()
    good = dict(model="omni-test", messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Describe it."}]}],
        max_tokens=24, temperature=0, seed=5, stream=True, return_token_ids=True, ignore_eos=True)

    def user(*parts):
        return {"messages": [{"role": "user", "content": list(parts)}], "max_tokens": 4}

    text = {"type": "text", "text": "hi"}
    bad = [
        (400, None, b"{not json"),
        (400, {"messages": [{"role": "user", "content": "hi"}], "modalities": ["text", "audio"],
               "audio": {"voice": "Nobody", "format": "wav"}}, None),
        (400, user({"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                              + base64.b64encode(b"not an image").decode()}}, text),
         None),
        (400, user({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}, text), None),
        (400, user({"type": "input_audio", "input_audio": {"data": base64.b64encode(b"RIFFjunk").decode(),
                                                           "format": "wav"}}, text), None),
        (400, user({"type": "video_url", "video_url": {"url": "data:video/mp4;base64,"
                                                              + base64.b64encode(b"junk").decode()}}, text), None),
        (400, user({"type": "image_url", "image_url": {"url": "/etc/hostname"}}, text), None),
        (400, user({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}, text), None),
        (400, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 129}, None),
        (400, {"messages": []}, None),
        (400, None, b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'),
        (400, None, b'{"messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}'),
        (400, None, b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e999}'),
        (400, None, b'{"messages": [{"role": "user", "content": "hi"}], "x": ' + b"[" * 100000 + b"]" * 100000
         + b"}"),
        (400, {"messages": [{"role": "user", "content": "caf\udce9"}]}, None),
        (413, user({"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                              + base64.b64encode(png(300, 300)).decode()}}, text),
         None),
        (413, user({"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                              + base64.b64encode(bomb_png()).decode()}}, text),
         None),
        (413, user({"type": "input_audio", "input_audio": {"data": base64.b64encode(tone_wav(6.0)).decode(),
                                                           "format": "wav"}}, text), None),
        (413, None, b'{"messages": [{"role": "user", "content": "' + b"a" * (1 << 20) + b'"}]}'),
    ]
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(_stream_raw, server, good)
        for status, body, raw in bad:
            r = post(server, body, raw=raw)
            assert r.status_code == status, (status, body if raw is None else raw[:40], r.text)
            err = r.json()["error"]
            assert err["message"] and err["type"]
        text_s, ids, _, _, _ = fut.result()
    from omni_jax.media import load_image
    from PIL import Image

    conv = [{"role": "user", "content": [{"type": "image", "image": load_image(Image.open(io.BytesIO(img)))},
                                         {"type": "text", "text": "Describe it."}]}]
    ref_text, ref_ids, _, _ = offline(model, conv, max_tokens=24, seed=5, ignore_eos=True)
    assert ids == ref_ids and text_s == ref_text and len(ids) == 24
    # healthy after them all: /health answers and a plain request succeeds
    assert httpx.get(server["url"] + "/health").json() == {"status": "ok"}
    r = post(server, dict(messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_cli_serve_binds_before_loading(monkeypatch, capsys):
    """A port in use is reported at once (before the model load, which could take minutes), with the
    address and the reason; the CLI exits 2 and holds no socket afterwards."""
    from omni_jax.cli import main

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the port was checked")

    monkeypatch.setattr(omni_jax, "load", no_load)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        assert main(["serve", "--port", str(port)]) == 2
        assert capsys.readouterr().err.strip() == f"error: cannot listen on 127.0.0.1:{port}: Address already in use"
    finally:
        taken.close()
    # once free, the same port binds (the failed attempt left nothing behind); the load is then reached
    with pytest.raises(AssertionError, match="model was loaded"):
        main(["serve", "--port", str(port)])


@pytest.mark.parametrize("how", ["relative", "home", "symlink"])
def test_cli_serve_model_path_as_typed(tmp_path, monkeypatch, capsys, how):
    """`serve --model` relative to the working directory (``.`` included), under ``~`` (unexpanded, as
    ``--model=~/x`` arrives) and through a symlink: the model loads, and /v1/models reports the
    directory's name as typed (``.`` was reported as ``.``)."""
    from omni_jax.cli import main

    real = tmp_path / "mymodel"
    shutil.copytree(omni_jax.default_model_path(), real)
    os.symlink(real, tmp_path / "linked")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(real if how == "relative" else tmp_path)
    arg, name = {"relative": (".", "mymodel"), "home": ("~/mymodel", "mymodel"),
                 "symlink": ("linked", "linked")}[how]
    served = {}

    def fake_serve(model, *, sock, model_name, **kw):
        sock.close()
        served.update(model=model, name=model_name)

    monkeypatch.setattr("omni_jax.serve.serve", fake_serve)
    assert main(["serve", "--port", "0", f"--model={arg}", "--dtype", "float32"]) == 0
    assert served["name"] == name
    assert isinstance(served["model"], omni_jax.OmniModel) and os.path.samefile(served["model"].path, real)
