"""omni-jax serve: a real uvicorn server on 127.0.0.1 (embedded default model), driven over HTTP by
the real ``openai`` client and by httpx; every served result is compared with offline
``generate`` / ``stream`` on the same input. Bad requests and their answers are in test_errors_serve.py."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
import wave
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

import omni_jax
from omni_jax.serve import Engine, ServeLimits, build_app

KEY = "test-key-123"
LIMITS = dict(max_batch=8, max_queue=32, max_tokens=128, max_prompt_tokens=64, max_audio_tokens=64,
              max_body_bytes=1 << 20, max_media_seconds=5.0, max_image_pixels=200 * 200, steps_per_call=4)
SPEECH = dict(talker_max_new_tokens=40, talker_min_new_tokens=30)  # 0.8 s of speech: two audio chunks


@pytest.fixture(scope="module")
def server(request):
    """A server on the embedded model, with the limits of the test module's ``SERVER_LIMITS`` (else
    ``LIMITS``)."""
    import uvicorn

    model = omni_jax.load(omni_jax.default_model_path(), dtype="float32")
    engine = Engine(model, ServeLimits(**getattr(request.module, "SERVER_LIMITS", LIMITS))).start()
    app = build_app(engine, model_name="omni-test", api_key=KEY)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
    th = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    deadline = time.time() + 60
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started
    yield dict(url=f"http://127.0.0.1:{port}", engine=engine, model=model)
    srv.should_exit = True
    th.join(10)
    engine.stop()
    sock.close()


def client(server, **kw):
    from openai import OpenAI

    return OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=300, **kw)


def post(server, body, *, key=KEY, raw=None, timeout=300):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(server["url"] + "/v1/chat/completions", content=content, timeout=timeout,
                      headers={**headers, "Content-Type": "application/json"})


def offline(model, conv, *, max_tokens, seed, ignore_eos=False, speech=False):
    """The offline reference: generate (text) or stream (speech): (text, ids, codec ids, pcm16)."""
    kw = dict(max_new_tokens=max_tokens, seed=seed, eos_token_id=[] if ignore_eos else None)
    if not speech:
        out = model.generate(messages=conv, **kw)
        return out.text[0], [int(x) for x in out.sequences[0, out.prompt_length:]], None, None
    evs = list(model.stream(messages=conv, return_audio=True, speaker="Chelsie", talker_do_sample=False, **SPEECH,
                            **kw))
    text = "".join(e.text for e in evs)
    ids = [t for e in evs if e.kind == "text" for t in e.token_ids]
    wav = np.concatenate([e.audio for e in evs if e.kind == "audio"])
    return text, ids, [int(c) for c in evs[-1].codec_ids], pcm(wav)


def pcm(wav):
    return (np.clip(wav, -1, 1) * 32767.0).round().astype("<i2")


def wav_pcm(data: bytes):
    with wave.open(io.BytesIO(data)) as w:
        assert w.getframerate() == 24000 and w.getnchannels() == 1 and w.getsampwidth() == 2
        return np.frombuffer(w.readframes(w.getnframes()), "<i2")


def tone_wav(seconds=0.5, rate=16000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


def tone_mp3(seconds=0.5, rate=16000) -> bytes:
    """An mp3 (PyAV's libmp3lame) of the same tone as :func:`tone_wav`; skips without the encoder."""
    av = pytest.importorskip("av")
    try:
        av.codec.Codec("libmp3lame", "w")
    except Exception:
        pytest.skip("PyAV has no mp3 encoder (libmp3lame)")
    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp3") as c:
        s = c.add_stream("libmp3lame", rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray((0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None],
                                           format="fltp", layout="mono")
        frame.sample_rate = rate
        for packet in list(s.encode(frame)) + list(s.encode(None)):
            c.mux(packet)
    return buf.getvalue()


def png(h, w, seed=0) -> bytes:
    from PIL import Image

    arr = np.random.RandomState(seed).randint(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_endpoints_and_api_key(server):
    url = server["url"]
    assert httpx.get(url + "/health").json() == {"status": "ok"}  # no key needed
    for path in ("/v1/models", "/metrics", "/nowhere"):
        r = httpx.get(url + path)
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
        r = httpx.get(url + path, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = post(server, {"messages": [{"role": "user", "content": "Hi"}]}, key=None)
    assert r.status_code == 401
    r = post(server, {"messages": [{"role": "user", "content": "Hi"}]}, key="wrong")
    assert r.status_code == 401
    models = client(server).models.list()
    assert [m.id for m in models.data] == ["omni-test"]
    from openai import AuthenticationError, OpenAI

    with pytest.raises(AuthenticationError):
        OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
    r = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200
    assert "omni_jax_queue_length 0" in r.text and "omni_jax_batch_slots 8" in r.text
    assert "omni_jax_time_to_first_token_seconds_bucket" in r.text and "omni_jax_tokens_per_second" in r.text


def test_openai_client_text_and_audio_input(server):
    model, c = server["model"], client(server)
    conv = [{"role": "user", "content": "Hello! How are you today?"}]
    ref_text, ref_ids, _, _ = offline(model, conv, max_tokens=10, seed=1)
    r = c.chat.completions.create(model="omni-test", messages=conv, max_tokens=10, temperature=0, seed=1,
                                  extra_body={"return_token_ids": True})
    assert r.choices[0].message.content == ref_text
    assert r.choices[0].model_extra["token_ids"] == ref_ids
    assert r.choices[0].finish_reason == ("stop" if ref_ids[-1] in model.generation_config["eos_token_id"]
                                          else "length")
    assert r.usage.completion_tokens == len(ref_ids) and r.usage.prompt_tokens > 5
    # streamed: the deltas add up to the same text
    parts = [ch.choices[0].delta.content for ch in c.chat.completions.create(
        model="omni-test", messages=conv, max_tokens=10, temperature=0, seed=1, stream=True) if ch.choices]
    assert "".join(p for p in parts if p) == ref_text
    # input_audio (base64 wav): same as the offline run on the same file
    wav = tone_wav()
    msgs = [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}},
        {"type": "text", "text": "What do you hear?"}]}]
    r = c.chat.completions.create(model="omni-test", messages=msgs, max_tokens=8, temperature=0, seed=2,
                                  extra_body={"return_token_ids": True, "ignore_eos": True})
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".wav") as f:
        f.write(wav)
        f.flush()
        conv = [{"role": "user", "content": [{"type": "audio", "audio": f.name},
                                             {"type": "text", "text": "What do you hear?"}]}]
        text, ids, _, _ = offline(model, conv, max_tokens=8, seed=2, ignore_eos=True)
    assert r.choices[0].model_extra["token_ids"] == ids and len(ids) == 8
    assert r.choices[0].message.content == text


def test_input_audio_mp3(server):
    """A base64 mp3 ``input_audio``: the same tokens as offline ``generate`` on the same mp3 file."""
    import tempfile

    model, c = server["model"], client(server)
    mp3 = tone_mp3()
    msgs = [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(mp3).decode(), "format": "mp3"}},
        {"type": "text", "text": "What do you hear?"}]}]
    r = c.chat.completions.create(model="omni-test", messages=msgs, max_tokens=8, temperature=0, seed=6,
                                  extra_body={"return_token_ids": True, "ignore_eos": True})
    with tempfile.NamedTemporaryFile(suffix=".mp3") as f:
        f.write(mp3)
        f.flush()
        conv = [{"role": "user", "content": [{"type": "audio", "audio": f.name},
                                             {"type": "text", "text": "What do you hear?"}]}]
        text, ids, _, _ = offline(model, conv, max_tokens=8, seed=6, ignore_eos=True)
    assert r.choices[0].model_extra["token_ids"] == ids and len(ids) == 8
    assert r.choices[0].message.content == text


def test_openai_client_speech(server):
    model, c = server["model"], client(server)
    conv = [{"role": "user", "content": "Tell me a story about the sea."}]
    text, ids, codes, ref_pcm = offline(model, conv, max_tokens=8, seed=3, ignore_eos=True, speech=True)
    assert len(codes) >= 30
    extra = {"return_token_ids": True, "ignore_eos": True, **SPEECH}
    r = c.chat.completions.create(model="omni-test", messages=conv, max_tokens=8, temperature=0, seed=3,
                                  modalities=["text", "audio"], audio={"voice": "Chelsie", "format": "wav"},
                                  extra_body=extra)
    msg = r.choices[0].message
    assert msg.content is None and msg.audio.transcript == text
    assert r.choices[0].model_extra["codec_ids"] == codes and r.choices[0].model_extra["token_ids"] == ids
    np.testing.assert_array_equal(wav_pcm(base64.b64decode(msg.audio.data)), ref_pcm)
    # streamed: transcript deltas and pcm16 chunks as the pipeline produces them
    transcript, chunks, last = [], [], None
    for ch in c.chat.completions.create(model="omni-test", messages=conv, max_tokens=8, temperature=0, seed=3,
                                        modalities=["text", "audio"], audio={"voice": "Chelsie", "format": "pcm16"},
                                        stream=True, extra_body=extra):
        a = ch.choices[0].delta.audio if ch.choices else None  # the client's ChoiceDeltaAudio
        if a and a.transcript:
            transcript.append(a.transcript)
        if a and a.data:
            chunks.append(np.frombuffer(base64.b64decode(a.data), "<i2"))
        if ch.choices and ch.choices[0].finish_reason:
            last = ch.choices[0]
    assert len(chunks) >= 2 and "".join(transcript) == text
    np.testing.assert_array_equal(np.concatenate(chunks), ref_pcm)
    assert last.model_extra["codec_ids"] == codes


def _stream_raw(server, body):
    """POST a streaming request; return (text, token ids, codec ids, pcm16, finish_reason)."""
    text, ids, audio, codes, reason = [], [], [], None, None
    with httpx.stream("POST", server["url"] + "/v1/chat/completions", json=body, timeout=600,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ch = json.loads(line[6:])["choices"][0]
            d = ch["delta"]
            text.append(d.get("content") or (d.get("audio") or {}).get("transcript") or "")
            ids.extend(ch.get("token_ids") or [])
            if (d.get("audio") or {}).get("data"):
                audio.append(np.frombuffer(base64.b64decode(d["audio"]["data"]), "<i2"))
            if ch["finish_reason"]:
                reason, codes = ch["finish_reason"], ch.get("codec_ids")
                assert ch["token_ids_all"] == ids
    return "".join(text), ids, codes, (np.concatenate(audio) if audio else None), reason


def test_32_concurrent_streams_equal_offline(server):
    model, engine = server["model"], server["engine"]
    words = ["sea", "boat", "island", "wind", "music", "food", "travel", "science"]
    reqs = []
    for i in range(32):
        conv = [{"role": "user", "content": f"Tell me about the {words[i % 8]}" + " and the sky" * (i % 5)}]
        speech = i % 4 == 0
        body = dict(model="omni-test", messages=conv, max_tokens=4 + (i * 5) % 13, temperature=0, seed=i,
                    stream=True, return_token_ids=True, ignore_eos=i % 2 == 0)
        if speech:
            body.update(modalities=["text", "audio"], audio={"voice": "Chelsie", "format": "pcm16"}, **SPEECH)
        reqs.append(body)
    # queue all 32 while the scheduler is held, so that the first 8 start together and the rest join
    # the running batch as rows finish (continuous batching)
    engine.pause()
    with ThreadPoolExecutor(32) as pool:
        futs = [pool.submit(_stream_raw, server, b) for b in reqs]
        deadline = time.time() + 120
        while len(engine.queue) < 32 and time.time() < deadline:
            time.sleep(0.02)
        assert len(engine.queue) == 32
        engine.resume()
        results = [f.result() for f in futs]
    assert engine.peak_active == 8
    # one decode program per occupancy bucket used (1, 2, 4, 8 rows): joining never recompiles
    after = engine.compile_counts()
    for name, batch in (("thinker", engine.thinker), ("talker", engine.talker)):
        assert batch.buckets <= {1, 2, 4, 8}, (name, batch.buckets)
        assert after[f"{name}_step"] == len(batch.buckets), (name, after, batch.buckets)
    assert 8 in engine.thinker.buckets and 1 in engine.thinker.buckets  # full batch, then the tail
    m = httpx.get(server["url"] + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    joins = [float(line.split()[-1]) for line in m.splitlines() if line.startswith("omni_jax_joins_running_batch_total")]
    assert joins and joins[0] >= 1
    for body, (text, ids, codes, audio, reason) in zip(reqs, results):
        speech = "audio" in body
        ref_text, ref_ids, ref_codes, ref_pcm = offline(model, body["messages"], max_tokens=body["max_tokens"],
                                                        seed=body["seed"], ignore_eos=body["ignore_eos"],
                                                        speech=speech)
        assert ids == ref_ids and text == ref_text
        assert reason == ("length" if len(ids) == body["max_tokens"] and (body["ignore_eos"] or ids[-1] not in
                                                                          model.generation_config["eos_token_id"])
                          else "stop")
        if speech:
            assert codes == ref_codes
            if ref_pcm is None:
                assert audio is None
            else:
                np.testing.assert_array_equal(audio, ref_pcm)
        else:
            assert codes is None and audio is None


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_frees_the_slot(server, stream):
    """A client that goes away mid-reply, streamed or not, has its request cancelled and its slot
    freed at the engine's next step; the server goes on serving."""
    engine = server["engine"]
    done_before = engine.metrics.counters[("requests_total", (("status", "cancelled"),))]
    body = json.dumps(dict(model="omni-test", messages=[{"role": "user", "content": "Tell me a long story"}],
                           max_tokens=128, temperature=0, seed=0, stream=stream, ignore_eos=True)).encode()
    # the engine parks itself right after its first text step: on a loaded machine the tiny model could
    # otherwise finish all 128 tokens before this thread gets to pause it (the request would leave its slot)
    emitted = threading.Event()
    orig_emit = engine._emit_text

    def emit_then_park(*a, **k):
        orig_emit(*a, **k)
        if engine.active():
            engine.request_pause()
            emitted.set()

    engine._emit_text = emit_then_park
    host, port = server["url"].split("//")[1].split(":")
    client = socket.create_connection((host, int(port)), timeout=60)
    try:  # a raw HTTP/1.1 client, closed while the reply is being generated
        client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: " + str(len(body)).encode()
                       + b"\r\n\r\n" + body)
        assert emitted.wait(30)
        engine.pause()  # parked (it asked itself); hold it while the client goes away
        del engine._emit_text
        req = next(q for q in engine.slots if q is not None)
        assert not req.text_done and len(req.token_ids) < 128
    finally:
        engine.__dict__.pop("_emit_text", None)
        client.close()
    deadline = time.time() + 30
    while not req.cancelled and time.time() < deadline:
        time.sleep(0.02)
    assert req.cancelled  # the server saw the disconnect...
    engine.resume()
    deadline = time.time() + 30
    while engine.active() and time.time() < deadline:
        time.sleep(0.02)
    assert engine.active() == 0  # ...and the engine freed the slot at its next step
    assert len(req.token_ids) < 128
    assert engine.metrics.counters[("requests_total", (("status", "cancelled"),))] == done_before + 1
    r = post(server, dict(messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3


def test_cli_serve_process_answers_and_stops():
    """`omni-jax serve --port 0` as a process: prints the address it bound, answers /health, and on
    Ctrl+C (SIGINT) shuts down gracefully and exits 130 (the shell's code for an interrupt) without a
    traceback."""
    import queue
    import re
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "omni_jax.cli", "serve", "--port", "0", "--log-level", "warning"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stderr], daemon=True).start()
    try:
        url, deadline = None, time.time() + 120
        while url is None and time.time() < deadline:
            try:
                m = re.match(r"omni-jax serve: (http://127\.0\.0\.1:(\d+)) ", lines.get(timeout=1))
            except queue.Empty:
                assert proc.poll() is None, "the server exited before binding"
                continue
            if m:
                url = m.group(1)
                assert int(m.group(2)) > 0
        assert url is not None
        for _ in range(600):
            try:
                r = httpx.get(url + "/health", timeout=5)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        assert r.json() == {"status": "ok"}
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 130
        time.sleep(0.5)  # the reader thread drains what is left
        rest = []
        while not lines.empty():
            rest.append(lines.get())
        assert "Traceback" not in "".join(rest) and "interrupted" in "".join(rest)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_joining_request_gets_its_first_token_before_the_first_decode_call(server):
    """The engine hands out the prefill's token as soon as the request joins the batch (its first text
    event carries one id), not after the first decode call's steps_per_call tokens; the ids are the
    offline ones."""
    import queue as queue_mod

    from omni_jax.serve.scheduler import GenParams, ServeRequest

    model, engine = server["model"], server["engine"]
    conv = [{"role": "user", "content": "Tell me about the wind"}]
    events: queue_mod.Queue = queue_mod.Queue()
    req = ServeRequest(inputs=model.encode_messages(conv), params=GenParams(max_tokens=9, do_sample=False,
                                                                             ignore_eos=True), sink=events.put)
    engine.submit(req)
    got = []
    while True:
        kind, payload = events.get(timeout=120)
        if kind == "text":
            got.append(list(payload[1]))
        if kind in ("done", "error"):
            break
    assert kind == "done" and LIMITS["steps_per_call"] > 1
    assert len(got[0]) == 1 and sum(got, []) == payload["token_ids"] and len(payload["token_ids"]) == 9
    ref = model.generate(messages=conv, max_new_tokens=9, eos_token_id=[])
    assert payload["token_ids"] == [int(x) for x in ref.sequences[0, ref.prompt_length:]]
