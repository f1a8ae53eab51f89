"""``/v1/realtime`` on a real uvicorn server (embedded default model), driven by the real ``openai``
client's ``client.realtime.connect``: every server event parses as the client's own event types, and
each conversation's replies equal those of an :class:`omni_jax.session.Session` run directly on the
same input. The browser page is tested in test_realtime_browser.py."""

from __future__ import annotations

import base64
import json
import time

import numpy as np
import pytest
from pydantic import TypeAdapter

from omni_jax.serve import realtime as rt
from test_serve import KEY, LIMITS, server  # noqa: F401  (fixture)

# a session's replies decode in the engine's rows, whose prompt part (max_prompt_tokens) holds the
# whole conversation a spoken reply's talker reads: room for a few turns with audio
SERVER_LIMITS = {**LIMITS, "max_prompt_tokens": 512}
EVENTS = None


def _adapter():
    global EVENTS
    if EVENTS is None:
        from openai.types.realtime.realtime_server_event import RealtimeServerEvent

        EVENTS = TypeAdapter(RealtimeServerEvent)
    return EVENTS


def connect(server, **kw):
    from openai import OpenAI

    c = OpenAI(base_url=server["url"] + "/v1", api_key=kw.pop("api_key", KEY), max_retries=0, timeout=300)
    return c.realtime.connect(model="omni-test", **kw)


def events_until(conn, last: str, *, timeout: float = 300) -> list:
    """Server events (as the client parsed them) up to and including the first of type ``last``;
    each is also validated against the client's event union (so a missing required field fails)."""
    out = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        # the websocket under the client's connection, for a receive that can time out
        raw = conn._connection.recv(timeout=max(deadline - time.time(), 0.1), decode=False)
        ev = json.loads(raw)
        typed = _adapter().validate_python(ev)
        assert typed.type == ev["type"]
        out.append(ev)
        if ev["type"] == last:
            return out
    raise AssertionError(f"no {last} within {timeout} s; got {[e['type'] for e in out]}")


def pcm16_b64(x: np.ndarray) -> str:
    return base64.b64encode((np.clip(x, -1, 1) * 32767).round().astype("<i2").tobytes()).decode()


def speechlike(seconds: float, rate: int = rt.RATE, seed: int = 0) -> np.ndarray:
    """A voiced, syllable-like signal (harmonics under a 4 Hz envelope) at -12 dBFS or so."""
    t = np.arange(int(seconds * rate)) / rate
    f0 = 140 + 20 * np.sin(2 * np.pi * 0.7 * t)
    x = sum(np.sin(2 * np.pi * k * np.cumsum(f0) / rate) / k for k in range(1, 6))
    env = 0.55 + 0.45 * np.sin(2 * np.pi * 4 * t)
    return (0.12 * env * x + 0.002 * np.random.RandomState(seed).randn(len(t))).astype(np.float32)


def quantised(x: np.ndarray) -> np.ndarray:
    """What the server decodes from :func:`pcm16_b64`."""
    return (np.clip(x, -1, 1) * 32767).round().astype(np.int16).astype(np.float32) / 32768.0


def scratch_ids(model, conv, max_new) -> list[int]:
    """Reply ids of ``generate`` on ``conv`` from scratch (cut after the first EOS)."""
    out = model.generate(messages=conv, max_new_tokens=max_new)
    ids = [int(x) for x in out.sequences[0, out.prompt_length:]]
    eos = model.generation_config["eos_token_id"]
    cut = next((i + 1 for i, x in enumerate(ids) if x in eos), len(ids))
    return ids[:cut]


def types(evs) -> list[str]:
    return [e["type"] for e in evs]


def test_text_turn_equals_a_session(server):
    model = server["model"]
    with connect(server) as conn:
        created = events_until(conn, "session.created")[-1]
        assert created["session"]["type"] == "realtime"
        conn.session.update(session={"type": "realtime", "instructions": "Answer briefly.",
                                     "output_modalities": ["text"], "max_output_tokens": 8})
        upd = events_until(conn, "session.updated")[-1]["session"]
        assert upd["instructions"] == "Answer briefly." and upd["output_modalities"] == ["text"]
        assert upd["max_output_tokens"] == 8
        conn.conversation.item.create(item={"type": "message", "role": "user",
                                            "content": [{"type": "input_text", "text": "Hello there"}]})
        added = events_until(conn, "conversation.item.done")
        assert added[-1]["item"]["role"] == "user"
        conn.response.create()
        evs = events_until(conn, "response.done")
        # a second turn on the same connection: only its new tokens are prefilled
        conn.conversation.item.create(item={"type": "message", "role": "user",
                                            "content": [{"type": "input_text", "text": "And then?"}]})
        conn.response.create()
        evs2 = events_until(conn, "response.done")
    assert types(evs)[:4] == ["response.created", "response.output_item.added", "conversation.item.added",
                              "response.content_part.added"]
    assert types(evs)[-5:] == ["response.output_text.done", "response.content_part.done",
                               "response.output_item.done", "conversation.item.done", "response.done"]
    s = model.session(system="Answer briefly.")
    replies = []
    for q in ("Hello there", "And then?"):
        s.add_user(q)
        replies.append(s.respond(8))
    for got, ref in zip((evs, evs2), replies):
        deltas = "".join(e["delta"] for e in got if e["type"] == "response.output_text.delta")
        done = got[-1]["response"]
        assert deltas == ref.text and done["output"][0]["content"][0]["text"] == ref.text
        assert done["status"] == ("incomplete" if ref.finish_reason == "length" else "completed")
        assert done["usage"]["output_tokens"] == len(ref.token_ids)
    conv = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hello there"}]
    assert evs[-1]["response"]["usage"]["input_tokens"] == model.encode_messages(conv)["input_ids"].shape[1]


def test_streamed_audio_turn_is_prefilled_while_arriving_and_spoken(server):
    """Audio appended in uneven pieces is resampled as it comes (24 -> 16 kHz) and its complete 2 s
    chunks are prefilled before the commit; the spoken reply (transcript and pcm16) equals a
    session's on the whole clip read at 24 kHz."""
    model = server["model"]
    x = speechlike(2.6)
    with connect(server) as conn:
        events_until(conn, "session.created")
        conn.session.update(session={"type": "realtime", "output_modalities": ["audio"], "max_output_tokens": 6,
                                     "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000},
                                                         "turn_detection": None},
                                               "output": {"voice": "Chelsie"}}})
        events_until(conn, "session.updated")
        cuts = [0, 1234, 7000, 30001, 52000, len(x)]
        for a, b in zip(cuts, cuts[1:]):
            conn.input_audio_buffer.append(audio=pcm16_b64(x[a:b]))
        deadline = time.time() + 120
        live = []
        while time.time() < deadline and not any(c.session is not None and c.session.prefilled_tokens > 50
                                                 for c in rt.CONNECTIONS):
            time.sleep(0.2)
        live = [c for c in rt.CONNECTIONS if c.session is not None]
        assert live and max(c.session.prefilled_tokens for c in live) > 50  # the first 2 s chunk, before commit
        conn.input_audio_buffer.commit()
        committed = events_until(conn, "conversation.item.done")
        conn.response.create()
        evs = events_until(conn, "response.done")
        server_side = next(c for c in rt.CONNECTIONS if c.session is not None and c.session.last_reply is not None
                           and not c.closed)
        spoken_turn = [dict(m) for m in server_side.session.messages[:1]]
        reply_ids = list(server_side.session.last_reply.token_ids)
        # a text turn in the same session, cancelled once its first text arrives; then one more turn
        conn.conversation.item.create(item={"type": "message", "role": "user",
                                            "content": [{"type": "input_text", "text": "Go on, at length."}]})
        conn.response.create(response={"output_modalities": ["text"], "max_output_tokens": 120})
        first = events_until(conn, "response.output_text.delta")
        conn.response.cancel()
        cancelled = first + events_until(conn, "response.done")
        conn.conversation.item.create(item={"type": "message", "role": "user",
                                            "content": [{"type": "input_text", "text": "Thanks."}]})
        conn.response.create(response={"output_modalities": ["text"], "max_output_tokens": 4})
        after = events_until(conn, "response.done")
        history = [dict(m) for m in server_side.session.messages]
    # the streamed-input session's reply has the ids of a one-shot generate on the same conversation
    assert reply_ids == scratch_ids(model, spoken_turn, 6)
    done = cancelled[-1]["response"]
    assert done["status"] == "cancelled" and done["status_details"]["reason"] == "client_cancelled"
    sent = "".join(e["delta"] for e in cancelled if e["type"] == "response.output_text.delta")
    kept = done["output"][0]["content"][0]["text"]
    assert kept.startswith(sent) and len(done["output"][0]["content"][0]["text"]) < 400
    assert done["usage"]["output_tokens"] < 120  # stopped early
    assert history[3] == {"role": "assistant", "content": kept}  # the history keeps what was produced
    assert after[-1]["response"]["status"] in ("completed", "incomplete")
    assert after[-1]["response"]["output"][0]["content"][0]["text"] == history[-1]["content"]
    assert reply_ids == scratch_ids(model, history[:1], 6)
    assert types(committed) == ["input_audio_buffer.committed", "conversation.item.added", "conversation.item.done"]
    s = model.session()
    s.add_user(audio=quantised(x), sampling_rate=24000)
    ref = s.respond(6, return_audio=True, speaker="Chelsie", talker_max_new_tokens=LIMITS["max_audio_tokens"])
    transcript = "".join(e["delta"] for e in evs if e["type"] == "response.output_audio_transcript.delta")
    assert transcript == ref.text == evs[-1]["response"]["output"][0]["content"][0]["transcript"]
    pcm = b"".join(base64.b64decode(e["delta"]) for e in evs if e["type"] == "response.output_audio.delta")
    from omni_jax.serve.openai_format import pcm16

    assert len(pcm) > 0 and pcm == pcm16(ref.audio)


def test_replies_are_rows_of_the_chat_batch(server):
    """A realtime reply decodes as a row of the engine's continuous batch beside a chat completion (both
    are in the batch at once), equals a session's own reply, and a second session compiles nothing."""
    from concurrent.futures import ThreadPoolExecutor

    from test_serve import client

    model, engine = server["model"], server["engine"]

    def turn(text):
        with connect(server) as conn:
            events_until(conn, "session.created")
            conn.session.update(session={"type": "realtime", "output_modalities": ["text"], "max_output_tokens": 12})
            events_until(conn, "session.updated")
            conn.conversation.item.create(item={"type": "message", "role": "user",
                                                "content": [{"type": "input_text", "text": text}]})
            events_until(conn, "conversation.item.done")
            conn.response.create()
            return events_until(conn, "response.done")

    def pair(rt_text, chat_text):
        """A realtime turn and a chat completion queued together while the scheduler is held."""
        engine.pause()
        engine.peak_active = 0
        started = engine.metrics.counters[("requests_started_total", ())]
        with ThreadPoolExecutor(2) as pool:
            rt_fut = pool.submit(turn, rt_text)
            chat_fut = pool.submit(lambda: client(server).chat.completions.create(
                model="omni-test", messages=[{"role": "user", "content": chat_text}], max_tokens=12, temperature=0))
            deadline = time.time() + 120
            while len(engine.queue) < 2 and time.time() < deadline:
                time.sleep(0.02)
            assert len(engine.queue) == 2  # the session's reply waits in the chat queue
            engine.resume()
            evs, chat = rt_fut.result(), chat_fut.result()
        assert engine.peak_active == 2  # decoded together, as two rows of one batch
        assert engine.metrics.counters[("requests_started_total", ())] == started + 2
        return evs, chat

    pair("warm up", "Hello")  # the first pair compiles what sessions and chats use
    before_engine, before_model = engine.compile_counts(), model.compile_counts()
    evs, chat = pair("Tell me about boats", "Tell me about the sea")  # a new session, a new chat
    assert engine.compile_counts() == before_engine and model.compile_counts() == before_model
    s = model.session()
    s.add_user("Tell me about boats")
    ref = s.respond(12)
    text = "".join(e["delta"] for e in evs if e["type"] == "response.output_text.delta")
    assert text == ref.text and evs[-1]["response"]["usage"]["output_tokens"] == len(ref.token_ids)
    assert chat.choices[0].message.content == model.generate(
        messages=[{"role": "user", "content": "Tell me about the sea"}], max_new_tokens=12).text[0]


def test_server_vad_commits_responds_and_is_interrupted(server):
    """server_vad: silence, speech, silence -> speech_started / speech_stopped, the turn committed and a
    spoken response started by the server; speech during the response cancels it (barge-in), and a
    truncate keeps only the part of the reply that was heard."""
    rate = rt.RATE
    silence = np.zeros(int(0.6 * rate), np.float32)
    speech = espeak("Tell me about the weather in Paris.", rate)
    lo, hi = (np.flatnonzero(np.abs(speech) > 0.02)[[0, -1]] * 1000 / rate).astype(int)  # ms of its first/last sound
    with connect(server) as conn:
        events_until(conn, "session.created")
        conn.session.update(session={"type": "realtime", "output_modalities": ["audio"], "max_output_tokens": 40,
                                     "audio": {"input": {"turn_detection": {
                                         "type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 200,
                                         "silence_duration_ms": 300}}}})
        events_until(conn, "session.updated")
        for piece in (silence, speech, silence):
            for i in range(0, len(piece), 2400):
                conn.input_audio_buffer.append(audio=pcm16_b64(piece[i:i + 2400]))
        first = events_until(conn, "response.output_audio.delta")
        # the user speaks again while the reply is being spoken
        again = espeak("Wait, stop.", rate)
        for i in range(0, len(again), 2400):
            conn.input_audio_buffer.append(audio=pcm16_b64(again[i:i + 2400]))
        rest = events_until(conn, "response.done")
        item = next(e for e in first if e["type"] == "response.output_item.added")["item"]["id"]
        conn.conversation.item.truncate(item_id=item, content_index=0, audio_end_ms=10)
        trunc = events_until(conn, "conversation.item.truncated")
        conn_obj = max(rt.CONNECTIONS, key=lambda c: c.session.prefilled_tokens if c.session else -1)
        history = [m for m in conn_obj.session.messages if m["role"] == "assistant"]
    t = types(first)
    assert t[:4] == ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                     "input_audio_buffer.committed", "conversation.item.added"]
    started, stopped = first[0], first[1]
    # speech_started includes the 200 ms prefix padding; both within 150 ms of the sound's edges
    assert abs(started["audio_start_ms"] - (600 + lo - 200)) <= 150, (started, lo)
    assert abs(stopped["audio_end_ms"] - (600 + hi)) <= 150, (stopped, hi)
    assert started["item_id"] == stopped["item_id"] == first[2]["item_id"]
    assert "response.created" in t
    assert "input_audio_buffer.speech_started" in types(rest)
    done = rest[-1]["response"]
    assert done["status"] == "cancelled" and done["status_details"]["reason"] == "turn_detected"
    assert trunc[-1]["item_id"] == item and trunc[-1]["audio_end_ms"] == 10
    full = done["output"][0]["content"][0]["transcript"]
    assert full and history and len(history[0]["content"]) < len(full)


BAD = [
    ("{not json", "invalid_json", None),
    ('{"type": "session.update", "session": {"type": "realtime", "max_output_tokens": NaN}}', "invalid_json", None),
    ("[1, 2]", "invalid_event", None),
    ('{"type": "frobnicate"}', "invalid_event_type", "type"),
    ('{"type": "input_audio_buffer.append", "audio": "***"}', "invalid_value", "audio"),
    ('{"type": "input_audio_buffer.append", "audio": "AA=="}', "invalid_value", "audio"),  # one byte: odd
    ('{"type": "session.update", "session": {"type": "realtime", "audio": {"input": {"format": '
     '{"type": "audio/pcm", "rate": 16000}}}}}', "unsupported_audio_format", "session.audio.input.format"),
    ('{"type": "session.update", "session": {"type": "realtime", "audio": {"output": {"voice": "nobody"}}}}',
     "invalid_value", "session.audio.output.voice"),
    ('{"type": "session.update", "session": {"type": "realtime", "audio": {"input": {"turn_detection": '
     '{"type": "semantic_vad"}}}}}', "invalid_value", "session.audio.input.turn_detection"),
    ('{"type": "session.update", "session": {"type": "realtime", "audio": {"input": {"turn_detection": '
     '{"type": "server_vad", "threshold": 7}}}}}', "invalid_value", "session.audio.input.turn_detection.threshold"),
    ('{"type": "input_audio_buffer.commit"}', "input_audio_buffer_commit_empty", None),
    ('{"type": "response.cancel"}', "response_cancel_not_active", None),
    ('{"type": "conversation.item.truncate", "item_id": "item_x", "content_index": 0, "audio_end_ms": 5}',
     "item_not_found", "item_id"),
    ('{"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": []}}',
     "invalid_value", "item.content"),
    ('{"type": "response.create", "response": {"max_output_tokens": -1}}', "invalid_value",
     "response.max_output_tokens"),
    ('{"type": "session.update", "session": {"type": "realtime", "instructions": "a\\ud800"}}', "invalid_value",
     "session.instructions"),
]


def test_bad_events_get_one_error_each_and_the_connection_stays_usable(server):
    import httpx

    with connect(server) as conn:
        events_until(conn, "session.created")
        for raw, code, param in BAD:
            conn._connection.send(raw)  # raw text: the client would refuse to send most of these
            ev = events_until(conn, "error")[-1]
            assert ev["error"]["code"] == code and ev["error"]["param"] == param, (raw, ev)
            assert ev["error"]["message"] and "Traceback" not in ev["error"]["message"]
        conn.session.update(session={"type": "realtime", "instructions": "ok", "output_modalities": ["text"],
                                     "max_output_tokens": 3})
        events_until(conn, "session.updated")
        conn.conversation.item.create(item={"type": "message", "role": "user",
                                            "content": [{"type": "input_text", "text": "Hi"}]})
        conn.response.create()
        done = events_until(conn, "response.done")[-1]
        assert done["response"]["status"] in ("completed", "incomplete")
    assert httpx.get(server["url"] + "/health").json() == {"status": "ok"}


def test_keys_and_the_session_limit(server):
    import websockets.sync.client as wsc
    from websockets.exceptions import InvalidStatus

    url = server["url"].replace("http", "ws") + "/v1/realtime?model=omni-test"
    with pytest.raises(InvalidStatus) as e:
        wsc.connect(url, additional_headers={"Authorization": "Bearer wrong"})
    assert e.value.response.status_code == 403
    with pytest.raises(InvalidStatus):
        wsc.connect(url)
    # a browser cannot set headers: the key as a subprotocol
    with wsc.connect(url, subprotocols=["realtime", f"openai-insecure-api-key.{KEY}"]) as ws:
        assert json.loads(ws.recv(timeout=30))["type"] == "session.created"
    n = server["engine"].limits.max_sessions
    held = [wsc.connect(url, additional_headers={"Authorization": f"Bearer {KEY}"}) for _ in range(n)]
    try:
        for ws in held:
            assert json.loads(ws.recv(timeout=30))["type"] == "session.created"
        with wsc.connect(url, additional_headers={"Authorization": f"Bearer {KEY}"}) as extra:
            ev = json.loads(extra.recv(timeout=30))
            assert ev["type"] == "error" and ev["error"]["code"] == "session_limit"
            with pytest.raises(Exception):
                extra.recv(timeout=30)
            assert extra.close_code == 1013
    finally:
        for ws in held:
            ws.close()
    deadline = time.time() + 30
    while server_slots_used() and time.time() < deadline:
        time.sleep(0.1)
    assert server_slots_used() == 0  # closed connections give their slots back


def test_idle_connections_are_closed_and_events_are_bounded(server):
    import websockets.sync.client as wsc
    from websockets.exceptions import ConnectionClosed

    url = server["url"].replace("http", "ws") + "/v1/realtime"
    limits = server["engine"].limits
    auth = {"Authorization": f"Bearer {KEY}"}
    with wsc.connect(url, additional_headers=auth, max_size=None) as ws:
        assert json.loads(ws.recv(timeout=30))["type"] == "session.created"
        ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": "A" * (limits.max_body_bytes + 4)}))
        ev = json.loads(ws.recv(timeout=30))
        assert ev["type"] == "error" and ev["error"]["code"] == "event_too_large", ev
    before = limits.session_idle_seconds
    limits.session_idle_seconds = 0.5
    try:
        with wsc.connect(url, additional_headers=auth) as ws:
            assert json.loads(ws.recv(timeout=30))["type"] == "session.created"
            ev = json.loads(ws.recv(timeout=30))
            assert ev["type"] == "error" and ev["error"]["code"] == "idle_timeout", ev
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=30)
            assert ws.close_code == 1000
    finally:
        limits.session_idle_seconds = before


def server_slots_used() -> int:
    return sum(1 for c in rt.CONNECTIONS if not c.closed)


def espeak(text: str, rate: int = 16000) -> np.ndarray:
    """Real speech: ``espeak-ng`` read at ``rate`` (the suite's machines have it: see .ci/run)."""
    import shutil
    import subprocess
    import tempfile

    import librosa

    assert shutil.which("espeak-ng"), "this test needs espeak-ng: apt-get install espeak-ng"
    with tempfile.TemporaryDirectory() as d:
        subprocess.run(["espeak-ng", "-w", f"{d}/s.wav", text], check=True, capture_output=True)
        return librosa.load(f"{d}/s.wav", sr=rate)[0].astype(np.float32)


def test_vad_finds_real_speech_in_noise_and_does_not_depend_on_chunking():
    """silero-vad on espeak speech in room noise (-40 dBFS, before, under and after it): one start near
    the speech's first sample, one stop near its last, whatever the chunking; noise alone starts nothing."""
    rng = np.random.RandomState(0)
    speech = espeak("What is the weather like today in Paris?")
    lo, hi = np.flatnonzero(np.abs(speech) > 0.02)[[0, -1]]
    noise = lambda n: (0.01 * rng.randn(n)).astype(np.float32)  # noqa: E731
    x = np.concatenate([np.zeros(16000, np.float32), speech, np.zeros(16000, np.float32)])
    x = x + noise(len(x))  # room noise all along, under the speech too
    ref = rt.Vad(rt.VadSettings(silence_duration_ms=400)).push(x)
    v = rt.Vad(rt.VadSettings(silence_duration_ms=400))
    got, i = [], 0
    while i < len(x):
        n = int(rng.randint(1, 3000))
        got += v.push(x[i:i + n])
        i += n
    assert got == ref and [k for k, _ in ref] == ["start", "stop"], ref
    # the start within 0.1 s of the first sound; the stop within 0.2 s of the last (silero's speech
    # probability decays over a few frames after speech: 0.99, 0.77, 0.58, 0.52 here)
    assert abs(ref[0][1] - (16000 + lo)) <= 1600 and abs(ref[1][1] - (16000 + hi)) <= 3200, (ref, lo, hi)
    assert rt.Vad(rt.VadSettings()).push(noise(48000)) == []


def test_resampler_does_not_depend_on_chunking():
    import librosa

    y = speechlike(1.3)
    r = rt.Resampler(16000)
    parts, i = [], 0
    for n in (1, 999, 7000, 2400, 20000):
        parts.append(r.push(y[i:i + n]))
        i += n
    parts.append(r.push(y[i:], last=True))
    np.testing.assert_array_equal(np.concatenate(parts), librosa.resample(y, orig_sr=24000, target_sr=16000))


def test_a_reply_that_does_not_fit_a_row_leaves_the_session_usable(server):
    """The engine refuses a spoken reply whose conversation is longer than a row's prompt part (its talker
    reads the whole conversation) with one error; the session gets its cache back untouched and its next
    (text) reply, in the engine, is the one a session run directly gives."""
    from omni_jax.errors import OmniError

    model, engine = server["model"], server["engine"]
    n = lambda k: model.encode_messages([{"role": "user", "content": "boats " * k}])["input_ids"].shape[1]  # noqa: E731
    k = next(k for k in range(50, 2000, 10) if n(k) > SERVER_LIMITS["max_prompt_tokens"] + 10)
    assert n(k) + 8 <= engine.row_slots
    s = model.session(max_context=engine.row_slots, minimum_slots=engine.row_slots)
    s.add_user("boats " * k)
    with pytest.raises(OmniError, match="max-prompt-tokens"):
        list(engine.session_reply(s, 4, return_audio=True, speaker="Chelsie"))
    assert [m["role"] for m in s.messages] == ["user"] and s.last_reply is None
    evs = list(engine.session_reply(s, 8))
    ref = model.session()
    ref.add_user("boats " * k)
    want = ref.respond(8)
    assert s.last_reply.token_ids == want.token_ids and s.messages == ref.messages
    assert "".join(e.text for e in evs if e.kind == "text") == want.text and evs[-1].kind == "done"


def test_a_reply_cancelled_while_queued_ends_at_its_first_token(server):
    """session.cancel() on a reply still waiting in the engine's queue: it ends as cancelled with the
    first token (chosen when it began), which joins the history as a reply does, and the session goes on."""
    import threading

    model, engine = server["model"], server["engine"]
    s = model.session(max_context=engine.row_slots, minimum_slots=engine.row_slots)
    s.add_user("Tell me about islands")
    engine.pause()
    out = {}
    th = threading.Thread(target=lambda: out.update(evs=list(engine.session_reply(s, 8))))
    th.start()
    deadline = time.time() + 60
    while len(engine.queue) < 1 and time.time() < deadline:
        time.sleep(0.02)
    assert len(engine.queue) == 1
    s.cancel()
    engine.resume()
    th.join(60)
    assert not th.is_alive()
    r = s.last_reply
    assert r.finish_reason == "cancelled" and len(r.token_ids) == 1 and out["evs"][-1].kind == "done"
    assert s.messages[-1] == {"role": "assistant", "content": r.text}
    s.add_user("And then?")
    list(engine.session_reply(s, 4))
    ref = model.session()
    for m in s.messages[:-2]:
        ref.messages.append(dict(m))
    ref.add_user("And then?")
    assert s.last_reply.token_ids == ref.respond(4).token_ids


def test_an_image_turn_equals_a_session(server):
    """conversation.item.create with input_image (a PNG data URL) beside input_text: the reply equals a
    session's on the same image; a part that is not an image data URL is one error event."""
    import io

    from PIL import Image

    model = server["model"]
    img = (np.random.default_rng(3).random((56, 84, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    with connect(server) as conn:
        events_until(conn, "session.created")
        conn.session.update(session={"type": "realtime", "output_modalities": ["text"], "max_output_tokens": 8})
        events_until(conn, "session.updated")
        conn.send({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_image", "image_url": "data:text/plain;base64,aGk="}]}})
        bad = events_until(conn, "error")[-1]
        conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
            {"type": "input_image", "image_url": url}, {"type": "input_text", "text": "What is this?"}]})
        added = events_until(conn, "conversation.item.done")[-1]
        conn.response.create()
        evs = events_until(conn, "response.done")
    assert "image_url" in bad["error"]["message"] and bad["error"]["param"] == "item.content[0].image_url"
    assert [p["type"] for p in added["item"]["content"]] == ["input_image", "input_text"]
    s = model.session()
    s.add_user(content=[{"type": "image", "image": img}, {"type": "text", "text": "What is this?"}])
    ref = s.respond(8)
    assert "".join(e["delta"] for e in evs if e["type"] == "response.output_text.delta") == ref.text
    assert evs[-1]["response"]["usage"]["output_tokens"] == len(ref.token_ids)


def test_a_reply_whose_listener_stops_is_cancelled_and_the_session_goes_on(server):
    """Closing Engine.session_reply's event stream mid-reply (the caller stopped listening) cancels the
    row and gives the session its cache back: the reply keeps what was produced, the next turn works."""
    model, engine = server["model"], server["engine"]
    s = model.session(max_context=engine.row_slots, minimum_slots=engine.row_slots)
    s.add_user("Go on, at length.")
    events = engine.session_reply(s, 100)
    first = next(e for e in events if e.kind == "text")
    events.close()
    r = s.last_reply
    assert first.token_ids and r.finish_reason == "cancelled" and len(r.token_ids) < 100
    assert r.token_ids[:len(first.token_ids)] == first.token_ids
    assert s.messages[-1] == {"role": "assistant", "content": r.text}
    s.add_user("Thanks.")
    assert [e.kind for e in engine.session_reply(s, 4)][-1] == "done" and s.messages[-1]["role"] == "assistant"
