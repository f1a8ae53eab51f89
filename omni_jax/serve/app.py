"""The ASGI app (Starlette): OpenAI-compatible endpoints over the continuous-batching engine.

``POST /v1/chat/completions`` (streamed as server-sent events or not), ``GET /v1/models``,
``/v1/realtime`` (the OpenAI Realtime API over a WebSocket, :mod:`.realtime`), ``GET /`` (a
browser page that talks to it), ``GET /health`` (no key needed), ``GET /metrics`` (Prometheus text). With an API key every path
but ``/health`` needs ``Authorization: Bearer <key>`` (401 otherwise). Errors are OpenAI-style
JSON bodies ``{"error": {"message", "type", "param", "code"}}``; a bad request is answered on its
own and never reaches the engine.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import time
import uuid

import numpy as np
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route, WebSocketRoute

from ..errors import OmniError
from .openai_format import RequestError, chunk, completion, error_body, parse_chat_request, pcm16
from .scheduler import Engine, QueueFull, ServeRequest

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error"}


def error_response(status: int, message: str, *, code=None, param=None, headers=None) -> JSONResponse:
    return JSONResponse(error_body(message, ERROR_TYPES.get(status, "invalid_request_error"), code, param),
                        status_code=status, headers=headers)


OPEN_PATHS = ("/health", "/")  # no key needed: the health check, the browser page (it asks for the key)


class AuthMiddleware:
    """Bearer-key check on every HTTP path and WebSocket except :data:`OPEN_PATHS` (pure ASGI: works
    for streams too)."""

    def __init__(self, app, api_key: str | None):
        self.app, self.key = app, api_key

    async def __call__(self, scope, receive, send):
        if self.key is None or scope["type"] not in ("http", "websocket") or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        auth = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = auth.partition(" ")
        if scope["type"] == "websocket" and not auth:
            # browsers cannot set headers on a WebSocket: the key may come as the subprotocol
            # "openai-insecure-api-key.<key>", as OpenAI's Realtime API takes it
            for p in headers.get(b"sec-websocket-protocol", b"").decode("latin-1").split(","):
                if p.strip().startswith("openai-insecure-api-key."):
                    scheme, token, auth = "bearer", p.strip()[len("openai-insecure-api-key."):], "subprotocol"
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.key.encode()):
            if scope["type"] == "websocket":  # refused before the upgrade: HTTP 403
                return await send({"type": "websocket.close", "code": 1008})
            msg = "missing API key (Authorization: Bearer ...)" if not auth else "invalid API key"
            resp = error_response(401, msg, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            return await resp(scope, receive, send)
        return await self.app(scope, receive, send)


class ServerState:
    def __init__(self, engine: Engine, model_name: str, allow_local_media: bool):
        self.engine, self.model_name, self.allow_local_media = engine, model_name, allow_local_media
        self.created = int(time.time())


async def _read_body(request: Request, limit: int) -> bytes:
    cl = request.headers.get("content-length")
    if cl is not None and cl.isdigit() and int(cl) > limit:
        raise RequestError(413, f"the request body of {cl} bytes is above this server's limit of {limit} bytes",
                           code="request_too_large")
    chunks, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise RequestError(413, f"the request body is above this server's limit of {limit} bytes",
                               code="request_too_large")
        chunks.append(part)
    return b"".join(chunks)


def _no_constant(name: str):
    """JSON has no NaN or Infinity (Python's json module accepts them as an extension): refused."""
    raise RequestError(400, f"the request body is not valid JSON ({name} is not a JSON number)")


def _prepare(st: ServerState, raw: bytes):
    """Parse, decode media and run the processor (a worker thread: no JAX here)."""
    eng, model = st.engine, st.engine.model
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(400, f"the request body is not valid JSON ({e})") from None
    except RecursionError:
        raise RequestError(400, "the request body is nested too deeply") from None
    req = parse_chat_request(body, limits=eng.limits, voices=list(model.voices), speech_ok=eng.speech,
                             allow_local_media=st.allow_local_media)
    try:
        enc = model.encode_messages(req.messages, req.use_audio_in_video)
    except OmniError as e:
        raise RequestError(400, str(e)) from None
    finally:
        req.cleanup()
    if req.use_audio_in_video:
        enc["use_audio_in_video"] = True
    n = int(enc["attention_mask"].sum())
    if n > eng.limits.max_prompt_tokens:
        raise RequestError(400, f"the prompt has {n} tokens, above this server's limit of "
                                f"{eng.limits.max_prompt_tokens} (max_prompt_tokens)", code="context_length_exceeded")
    return req, enc


async def chat_completions(request: Request):
    st: ServerState = request.app.state.server
    eng = st.engine
    try:
        raw = await _read_body(request, eng.limits.max_body_bytes)
        from starlette.concurrency import run_in_threadpool

        creq, enc = await run_in_threadpool(_prepare, st, raw)
    except RequestError as e:
        return error_response(e.status, e.message, code=e.code, param=e.param)
    except ClientDisconnect:
        return error_response(400, "the client disconnected")
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def sink(ev):
        loop.call_soon_threadsafe(events.put_nowait, ev)

    sreq = ServeRequest(inputs=enc, params=creq.params, sink=sink)
    try:
        eng.submit(sreq)
    except QueueFull as e:
        return error_response(429, f"{e}; retry later", code="queue_full", headers={"Retry-After": "1"})
    kind, payload = await _next(events, request, sreq)
    if kind == "error":
        status, message = payload
        return error_response(status, message)
    if kind != "started":  # the client went away while queued
        return error_response(400, "the client disconnected")
    rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    if creq.stream:
        return StreamingResponse(_sse(st, creq, sreq, events, rid, created), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    text, audio = [], []
    while True:
        kind, payload = await _next(events, request, sreq)
        if kind == "text":
            text.append(payload[0])
        elif kind == "audio":
            audio.append(payload)
        elif kind == "done":
            wav = None
            if creq.params.speech:
                wav = np.concatenate(audio) if audio else np.zeros((0,), np.float32)
            return JSONResponse(completion(rid, st.model_name, created, "".join(text), payload, wav,
                                           creq.audio_format, creq.return_token_ids))
        elif kind == "error":
            return error_response(payload[0], payload[1])
        else:  # disconnected
            return error_response(400, "the client disconnected")


async def _next(events: asyncio.Queue, request: Request, sreq: ServeRequest):
    """The next engine event; ``("disconnected", None)`` (and the request cancelled) when the
    client goes away first (checked every 0.25 s)."""
    while True:
        try:
            return await asyncio.wait_for(events.get(), 0.25)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                sreq.cancel()
                return "disconnected", None


def _sse_line(obj) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


async def _sse(st: ServerState, creq, sreq: ServeRequest, events: asyncio.Queue, rid, created):
    """Server-sent events: text deltas (``delta.content``, or ``delta.audio.transcript`` when audio
    is asked for, as OpenAI sends them), ``delta.audio.data`` chunks (base64 pcm16, 24 kHz), a last
    chunk with ``finish_reason`` (and, with ``return_token_ids``, ``token_ids``/``codec_ids``), an
    optional usage chunk, then ``[DONE]``. A disconnect cancels the request (its slot is freed at
    the engine's next step)."""
    model = st.model_name
    speech = creq.params.speech
    aid = f"audio_{rid}"
    try:
        yield _sse_line(chunk(rid, model, created, {"role": "assistant", "content": None if speech else ""}))
        while True:
            kind, payload = await events.get()
            if kind == "text":
                delta, ids = payload
                if not delta and not (creq.return_token_ids and ids):
                    continue
                d = {"audio": {"id": aid, "transcript": delta}} if speech else {"content": delta}
                extra = {"token_ids": ids} if creq.return_token_ids else None
                yield _sse_line(chunk(rid, model, created, d, extra=extra))
            elif kind == "audio":
                data = base64.b64encode(pcm16(payload)).decode()
                yield _sse_line(chunk(rid, model, created, {"audio": {"id": aid, "data": data}}))
            elif kind == "done":
                extra = None
                if creq.return_token_ids:
                    extra = {"token_ids_all": payload["token_ids"]}
                    if payload.get("codec_ids") is not None:
                        extra["codec_ids"] = payload["codec_ids"]
                yield _sse_line(chunk(rid, model, created, {}, payload["finish_reason"], extra=extra))
                if creq.include_usage:
                    from .openai_format import usage

                    u = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                         "choices": [], "usage": usage(payload)}
                    yield _sse_line(u)
                yield b"data: [DONE]\n\n"
                return
            elif kind == "error":
                yield _sse_line(error_body(payload[1], ERROR_TYPES.get(payload[0], "server_error")))
                return
    finally:
        if not sreq.finished.is_set():
            sreq.cancel()


async def models(request: Request):
    st: ServerState = request.app.state.server
    return JSONResponse({"object": "list", "data": [{"id": st.model_name, "object": "model", "created": st.created,
                                                     "owned_by": "omni-jax"}]})


async def health(request: Request):
    return JSONResponse({"status": "ok"})


async def metrics(request: Request):
    st: ServerState = request.app.state.server
    m = st.engine.metrics
    with m.lock:
        for k in [k for k in m.counters if k[0] == "compiles"]:
            del m.counters[k]
    for prog, n in st.engine.compile_counts().items():
        m.inc("compiles", n, program=prog)
    return PlainTextResponse(m.render(), media_type="text/plain; version=0.0.4")


async def not_found(request: Request, exc):
    status = getattr(exc, "status_code", 404)
    return error_response(status, f"{request.method} {request.url.path}: {getattr(exc, 'detail', 'not found')}")


async def realtime_page(request: Request):
    from importlib.resources import files

    return HTMLResponse(files("omni_jax.serve").joinpath("static/realtime.html").read_text("utf-8"))


def build_app(engine: Engine, *, model_name: str, api_key: str | None = None, allow_local_media: bool = False):
    """The ASGI app over a started :class:`Engine`."""
    from .realtime import SessionSlots, realtime_endpoint

    app = Starlette(routes=[Route("/v1/chat/completions", chat_completions, methods=["POST"]),
                            Route("/v1/models", models, methods=["GET"]),
                            WebSocketRoute("/v1/realtime", realtime_endpoint),
                            Route("/", realtime_page, methods=["GET"]),
                            Route("/health", health, methods=["GET"]),
                            Route("/metrics", metrics, methods=["GET"])],
                    exception_handlers={404: not_found, 405: not_found})
    app.state.server = ServerState(engine, model_name, allow_local_media)
    app.state.realtime_slots = SessionSlots(engine.limits.max_sessions)
    return AuthMiddleware(app, api_key)
