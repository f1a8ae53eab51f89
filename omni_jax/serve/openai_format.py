"""OpenAI chat-completions format: request parsing (with media decoding) and response building.

Message parts: ``text``; ``image_url`` (``{"url": "data:image/...;base64,..."}``); ``input_audio``
(``{"data": base64, "format": "wav" | "mp3"}``); and, as this server's extension, ``video_url``
(``{"url": "data:video/...;base64,..."}``). ``file://`` URLs and bare paths are read only when the
server runs with ``--allow-local-media``; remote (http/https) URLs are never fetched.

Extensions to OpenAI's request fields (pass them with the openai client's ``extra_body``):
``top_k``, ``repetition_penalty``, ``ignore_eos``, ``return_token_ids`` (adds ``token_ids`` and,
with audio, ``codec_ids`` to the choice), ``use_audio_in_video``, and the talker's
``talker_max_new_tokens``, ``talker_min_new_tokens``, ``talker_do_sample``, ``talker_temperature``,
``talker_top_k``, ``talker_top_p``, ``talker_repetition_penalty``.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError
from .scheduler import GenParams, ServeLimits


class RequestError(Exception):
    """A request this server refuses: HTTP ``status`` with an OpenAI-style error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_


def error_body(message: str, type_: str = "invalid_request_error", code=None, param=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


AUDIO_FORMATS = ("wav", "pcm16")
INPUT_AUDIO_FORMATS = ("wav", "mp3")
UNSUPPORTED = {"tools": "tool calls", "functions": "function calls", "logit_bias": "logit_bias",
               "tool_choice": "tool_choice", "function_call": "function_call"}


@dataclass
class ChatRequest:
    messages: list  # omni_jax messages (typed parts, media decoded)
    params: GenParams
    stream: bool = False
    include_usage: bool = False
    audio_format: str | None = None
    return_token_ids: bool = False
    use_audio_in_video: bool = False
    temp_files: list = field(default_factory=list)

    def cleanup(self):
        for p in self.temp_files:
            try:
                os.remove(p)
            except OSError:
                pass
        self.temp_files.clear()


def _num(body, name, lo, hi, default, *, lo_open=False, integer=False):
    v = body.get(name)
    if v is None:
        return default
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or not math.isfinite(v) or (v <= lo if lo_open else v < lo) \
            or (hi is not None and v > hi):
        rng = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}]"
        raise RequestError(400, f"{name}: expected {'an integer' if integer else 'a number'} in {rng}, got {v!r}",
                           param=name)
    return v


def _bool(body, name, default):
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise RequestError(400, f"{name}: expected true or false, got {v!r}", param=name)
    return v


def parse_chat_request(body, *, limits: ServeLimits, voices, allow_local_media: bool, speech_ok: bool,
                       vision_cfg=None) -> ChatRequest:
    """Validate an OpenAI chat-completions body and decode its media. Raises :class:`RequestError`."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    for k, what in UNSUPPORTED.items():
        if body.get(k):
            raise RequestError(400, f"{k}: {what} are not supported by this server", param=k)
    if body.get("n") not in (None, 1):
        raise RequestError(400, f"n: only n=1 is supported, got {body.get('n')!r}", param="n")
    if body.get("stop"):
        raise RequestError(400, "stop: stop sequences are not supported by this server", param="stop")
    if body.get("logprobs"):
        raise RequestError(400, "logprobs: not supported by this server", param="logprobs")
    for k in ("presence_penalty", "frequency_penalty"):
        if _num(body, k, -2, 2, 0) != 0:
            raise RequestError(400, f"{k}: not supported (use the repetition_penalty extension)", param=k)
    rf = body.get("response_format")
    if rf is not None and (not isinstance(rf, dict) or rf.get("type") != "text"):
        raise RequestError(400, "response_format: only {'type': 'text'} is supported", param="response_format")
    mt = body.get("max_completion_tokens", body.get("max_tokens"))
    if mt is None:
        max_tokens = None  # the checkpoint's generation config (capped at the server's limit) decides
    elif isinstance(mt, bool) or not isinstance(mt, int) or mt < 1:
        raise RequestError(400, f"max_tokens: expected an integer >= 1, got {mt!r}", param="max_tokens")
    elif mt > limits.max_tokens:
        raise RequestError(400, f"max_tokens: {mt} is above this server's limit of {limits.max_tokens}",
                           param="max_tokens")
    else:
        max_tokens = mt
    # fields left out (or null) stay None: the checkpoint's generation_config.json, then transformers'
    # GenerationConfig defaults fill them in when the request starts (Engine); top_k 0 means no top-k
    temperature = _num(body, "temperature", 0, 2, None)
    top_p = _num(body, "top_p", 0, 1, None, lo_open=True)
    top_k = _num(body, "top_k", 0, None, None, integer=True)
    rep = _num(body, "repetition_penalty", 0, None, None, lo_open=True)
    seed = body.get("seed")
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little") >> 1
    elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 31:
        raise RequestError(400, f"seed: expected an integer in [0, 2^31), got {seed!r}", param="seed")
    stream = _bool(body, "stream", False)
    so = body.get("stream_options") or {}
    if not isinstance(so, dict):
        raise RequestError(400, "stream_options: expected an object", param="stream_options")
    # OpenAI's convention: temperature 0 is greedy, a positive one samples; top_p or top_k alone ask for
    # sampling too; with none of them the checkpoint's do_sample decides
    if temperature is not None:
        do_sample = temperature > 0
    elif top_p is not None or top_k is not None:
        do_sample = True
    else:
        do_sample = None
    params = GenParams(max_tokens=max_tokens, do_sample=do_sample,
                       temperature=float(temperature) if do_sample and temperature is not None else None,
                       top_k=top_k, top_p=top_p, repetition_penalty=None if rep is None else float(rep), seed=int(seed),
                       ignore_eos=_bool(body, "ignore_eos", False), talker_max_new_tokens=limits.max_audio_tokens)
    mods = body.get("modalities") or ["text"]
    if not isinstance(mods, list) or not all(isinstance(m, str) for m in mods) \
            or not set(mods) <= {"text", "audio"} or "text" not in mods:
        raise RequestError(400, f"modalities: expected [\"text\"] or [\"text\", \"audio\"], got {mods!r}",
                           param="modalities")
    audio_format = None
    if "audio" in mods:
        if not speech_ok:
            raise RequestError(400, "modalities: this model cannot speak (no talker, token2wav or voices)",
                               param="modalities")
        a = body.get("audio")
        if not isinstance(a, dict):
            raise RequestError(400, "audio: required with modalities [\"text\", \"audio\"]: {\"voice\": ..., "
                                    "\"format\": \"wav\" | \"pcm16\"}", param="audio")
        voice = a.get("voice")
        names = {v.lower(): v for v in voices}
        if not isinstance(voice, str) or voice.lower() not in names:
            raise RequestError(400, f"audio.voice: unknown voice {voice!r}; voices: {', '.join(sorted(voices))}",
                               param="audio.voice")
        audio_format = a.get("format", "wav")
        if audio_format not in AUDIO_FORMATS:
            raise RequestError(400, f"audio.format: {audio_format!r} is not supported ({', '.join(AUDIO_FORMATS)})",
                               param="audio.format")
        if stream and audio_format != "pcm16":
            raise RequestError(400, "audio.format: streamed audio is pcm16 (24 kHz, 16-bit little-endian); "
                                    "ask for \"pcm16\" with stream=true", param="audio.format")
        params.speech, params.voice = True, names[voice.lower()]
        params.talker_max_new_tokens = _num(body, "talker_max_new_tokens", 1, limits.max_audio_tokens,
                                            limits.max_audio_tokens, integer=True)
        params.talker_min_new_tokens = _num(body, "talker_min_new_tokens", 0, params.talker_max_new_tokens, 0,
                                            integer=True)
        params.talker_do_sample = _bool(body, "talker_do_sample", do_sample)  # None: the thinker's, once known
        params.talker_temperature = float(_num(body, "talker_temperature", 0, 2, 0.9, lo_open=True))
        params.talker_top_k = _num(body, "talker_top_k", 1, None, 40, integer=True)
        params.talker_top_p = _num(body, "talker_top_p", 0, 1, 0.8, lo_open=True)
        params.talker_repetition_penalty = float(_num(body, "talker_repetition_penalty", 0, None, 1.05, lo_open=True))
    req = ChatRequest(messages=[], params=params, stream=stream, include_usage=bool(so.get("include_usage")),
                      audio_format=audio_format, return_token_ids=_bool(body, "return_token_ids", False),
                      use_audio_in_video=_bool(body, "use_audio_in_video", False))
    try:
        req.messages = _messages(body.get("messages"), req, limits, allow_local_media)
    except BaseException:
        req.cleanup()
        raise
    return req


ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _messages(msgs, req: ChatRequest, limits: ServeLimits, allow_local: bool) -> list:
    if not isinstance(msgs, list) or not msgs:
        raise RequestError(400, "messages: expected a non-empty list", param="messages")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or m["role"] not in ROLES:
            raise RequestError(400, f"{where}: expected an object with a role among {', '.join(ROLES)}",
                               param=where)
        c = m.get("content")
        if isinstance(c, str):
            out.append({"role": ROLES[m["role"]], "content": c})
            continue
        if not isinstance(c, list) or not c:
            raise RequestError(400, f"{where}.content: expected a string or a non-empty list of parts",
                               param=f"{where}.content")
        parts = []
        for j, part in enumerate(c):
            parts.append(_part(part, f"{where}.content[{j}]", req, limits, allow_local))
        out.append({"role": ROLES[m["role"]], "content": parts})
    return out


def _part(part, where, req, limits, allow_local):
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise RequestError(400, f"{where}: a text part needs a string 'text'", param=where)
        return {"type": "text", "text": part["text"]}
    if kind == "image_url":
        raw, path = _url_source(part.get("image_url"), where, "image", allow_local)
        return {"type": "image", "image": _image(raw, path, where, limits)}
    if kind == "input_audio":
        a = part.get("input_audio")
        if not isinstance(a, dict) or not isinstance(a.get("data"), str):
            raise RequestError(400, f"{where}: input_audio needs base64 'data' and a 'format'", param=where)
        fmt = a.get("format")
        if fmt not in INPUT_AUDIO_FORMATS:
            raise RequestError(400, f"{where}: input_audio.format {fmt!r} is not supported "
                                    f"({', '.join(INPUT_AUDIO_FORMATS)})", param=where)
        raw = _b64(a["data"], where)
        return {"type": "audio", "audio": _audio(raw, fmt, where, req, limits), "sampling_rate": 16000}
    if kind == "video_url":
        raw, path = _url_source(part.get("video_url"), where, "video", allow_local)
        if raw is not None:
            path = _temp(raw, ".mp4", req)
        _check_video(path, where, limits)
        return {"type": "video", "video": path}
    raise RequestError(400, f"{where}: unknown part type {kind!r} (text, image_url, input_audio, video_url)",
                       param=where)


def _b64(s: str, where: str) -> bytes:
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, f"{where}: the data is not valid base64", param=where) from None


def _url_source(obj, where, kind, allow_local):
    url = obj.get("url") if isinstance(obj, dict) else obj if isinstance(obj, str) else None
    if not isinstance(url, str) or not url:
        raise RequestError(400, f"{where}: a {kind}_url part needs {{\"url\": ...}}", param=where)
    if url.startswith("data:"):
        head, sep, data = url.partition(",")
        if not sep or not head.endswith(";base64"):
            raise RequestError(400, f"{where}: expected a base64 data URL (data:<type>;base64,...)", param=where)
        return _b64(data, where), None
    if url.startswith(("http://", "https://")):
        raise RequestError(400, f"{where}: remote URLs are not fetched; send the {kind} as a base64 data URL",
                           param=where)
    path = url[len("file://"):] if url.startswith("file://") else url
    if not allow_local:
        raise RequestError(400, f"{where}: local paths are disabled; start the server with --allow-local-media, "
                                f"or send a base64 data URL", param=where)
    if not os.path.isfile(path):
        raise RequestError(400, f"{where}: {path}: no such file", param=where)
    return None, path


def _temp(raw: bytes, suffix: str, req: ChatRequest) -> str:
    fd, path = tempfile.mkstemp(prefix="omni-jax-serve-", suffix=suffix)
    with os.fdopen(fd, "wb") as f:
        f.write(raw)
    req.temp_files.append(path)
    return path


def _image(raw, path, where, limits):
    from PIL import Image, UnidentifiedImageError

    from ..media import load_image

    try:
        img = Image.open(io.BytesIO(raw) if raw is not None else path)
        w, h = img.size
        if w * h > limits.max_image_pixels:
            raise RequestError(413, f"{where}: the image has {w}x{h} = {w * h} pixels, above this server's limit "
                                    f"of {limits.max_image_pixels}", param=where, code="media_too_large")
        img.load()
    except RequestError:
        raise
    except Image.DecompressionBombError as e:  # a header declaring more pixels than Pillow decodes: too large
        raise RequestError(413, f"{where}: the image is too large ({e})", param=where,
                           code="media_too_large") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise RequestError(400, f"{where}: cannot decode image ({e})", param=where) from None
    try:
        return load_image(img)
    except InputError as e:
        raise RequestError(400, f"{where}: {e}", param=where) from None


def image_from_data_url(url, where: str, limits: ServeLimits):
    """An image sent as a base64 data URL (``data:image/png;base64,...``), decoded and checked against
    ``limits.max_image_pixels`` (the HTTP API's and the realtime API's image parts); raises
    :class:`RequestError`."""
    if not isinstance(url, str) or not url.startswith("data:image/"):
        raise RequestError(400, f"{where}: expected a base64 image data URL (data:image/png;base64,...)", param=where)
    raw, _ = _url_source(url, where, "image", False)
    return _image(raw, None, where, limits)


def _audio(raw, fmt, where, req, limits):
    from ..media import load_audio

    path = _temp(raw, "." + fmt, req)
    try:
        import soundfile

        dur = soundfile.info(path).duration
    except Exception:
        dur = None  # soundfile cannot read it: load_audio tries PyAV, and reports what fails
    if dur is not None and dur > limits.max_media_seconds:
        raise RequestError(413, f"{where}: {dur:.1f} s of audio, above this server's limit of "
                                f"{limits.max_media_seconds:g} s", param=where, code="media_too_large")
    try:
        wav = load_audio(path)
    except InputError:
        raise RequestError(400, f"{where}: cannot decode the {fmt} audio", param=where) from None
    if len(wav) / 16000 > limits.max_media_seconds:
        raise RequestError(413, f"{where}: {len(wav) / 16000:.1f} s of audio, above this server's limit of "
                                f"{limits.max_media_seconds:g} s", param=where, code="media_too_large")
    return wav


def _check_video(path, where, limits):
    import av

    try:
        with av.open(path) as c:
            vs = [s for s in c.streams if s.type == "video"]
            if not vs:
                raise RequestError(400, f"{where}: the file has no video stream", param=where)
            s = vs[0]
            dur = None
            if c.duration is not None:
                dur = c.duration / 1e6
            elif s.duration is not None and s.time_base is not None:
                dur = float(s.duration * s.time_base)
            w, h = s.codec_context.width, s.codec_context.height
    except RequestError:
        raise
    except Exception as e:
        raise RequestError(400, f"{where}: cannot decode video ({type(e).__name__})", param=where) from None
    if dur is not None and dur > limits.max_media_seconds:
        raise RequestError(413, f"{where}: {dur:.1f} s of video, above this server's limit of "
                                f"{limits.max_media_seconds:g} s", param=where, code="media_too_large")
    if w * h > limits.max_image_pixels:
        raise RequestError(413, f"{where}: video frames of {w}x{h} pixels, above this server's limit of "
                                f"{limits.max_image_pixels}", param=where, code="media_too_large")


# ---------------------------------------------------------------------------------------------
# responses


def pcm16(audio: np.ndarray) -> bytes:
    """float32 [-1, 1] -> 16-bit little-endian PCM (as omni_jax.media.write_wav quantises)."""
    return (np.clip(np.asarray(audio, np.float32), -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


def wav_bytes(audio: np.ndarray, rate: int = 24000) -> bytes:
    import wave

    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm16(audio))
    return buf.getvalue()


def usage(info) -> dict:
    u = {"prompt_tokens": info["prompt_tokens"], "completion_tokens": info["completion_tokens"],
         "total_tokens": info["prompt_tokens"] + info["completion_tokens"]}
    if info.get("codec_ids") is not None:
        u["completion_tokens_details"] = {"audio_tokens": info["audio_tokens"]}
    return u


def completion(rid, model, created, text, info, audio=None, audio_format=None, return_ids=False) -> dict:
    msg: dict = {"role": "assistant", "content": text}
    if audio is not None:
        data = wav_bytes(audio) if audio_format == "wav" else pcm16(audio)
        msg["content"] = None
        msg["audio"] = {"id": f"audio_{rid}", "data": base64.b64encode(data).decode(), "transcript": text,
                        "expires_at": int(time.time()) + 3600}
    choice = {"index": 0, "message": msg, "finish_reason": info["finish_reason"], "logprobs": None}
    if return_ids:
        choice["token_ids"] = info["token_ids"]
        if info.get("codec_ids") is not None:
            choice["codec_ids"] = info["codec_ids"]
    return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": [choice],
            "usage": usage(info)}


def chunk(rid, model, created, delta, finish_reason=None, extra=None) -> dict:
    choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
    if extra:
        choice.update(extra)
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}
