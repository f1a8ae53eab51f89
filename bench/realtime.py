"""First audio after the end of a spoken question: ``/v1/realtime`` against ``/v1/chat/completions``.

    python -m bench realtime [--model DIR | --config bench/configs/cpu_small.json] [--dtype D] [--seconds 10]
                             [--runs 3] [--no-pace] [--max-tokens 16] [--audio-tokens 64]
                             [--json bench/results/realtime_cpu.json]

Starts ``omni-jax serve`` in-process on 127.0.0.1 (uvicorn on a free port, ``--max-batch 1``) for one
model: the embedded default model (float32), a checkpoint (``--model``, bfloat16 by default), or a random
checkpoint of a bench config's widths (``--config``, float32: the CPU small config of ``bench.compare``,
with the embedded model's tokenizer, see :func:`speaking_checkpoint`, since both endpoints take chat
messages); makes a spoken question of ``--seconds`` (espeak-ng speech,
repeated to the length, when espeak-ng is installed; else a synthetic voiced signal), 24 kHz mono, and
times each path from the end of speech:

* realtime: the audio sent as 100 ms ``input_audio_buffer.append`` events paced at real time (``--no-pace``:
  all at once), the session prefilling each complete 2 s audio-encoder chunk while they arrive; then
  ``input_audio_buffer.commit`` and ``response.create`` (spoken reply). Timed from the commit being sent to
  the first ``response.output_audio.delta`` and the first ``response.output_audio_transcript.delta``.
* chat completions: the same samples as one WAV ``input_audio`` part of a user message, in a streamed
  request with ``modalities=["text", "audio"]`` (pcm16), which the server processes only once it arrives.
  Timed from the request being sent (= the end of speech) to the first audio chunk and the first
  transcript chunk.

Both replies use the same ``max_tokens``, voice, codec-id cap (the server's ``max_audio_tokens``) and
sampling (the thinker with the checkpoint's generation defaults, greedy for the embedded model; the talker
sampling with the realtime session's defaults, seed 0), each run on a fresh connection (one user turn).
One warm-up run of each path comes first (it compiles; its times are reported apart, not in the medians),
then ``--runs`` runs of each, alternating. The figures are
the medians; the ratio is chat / realtime (above 1: realtime answers sooner).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from omni_jax.serve.openai_format import pcm16, wav_bytes

from .util import write_json

RATE = 24000  # the Realtime API's pcm16 rate, used for both paths
PIECE = 2400  # samples per input_audio_buffer.append (100 ms)
KEY = "bench"
QUESTION = "What is the weather like in Paris today, and should I take an umbrella when I go out this afternoon?"


# --------------------------------------------------------------------------------------
# the spoken question


def synthetic_speech(seconds: float, rate: int = RATE, seed: int = 0) -> np.ndarray:
    """A voiced, syllable-like signal (harmonics of a gliding 120-160 Hz pitch under a 4 Hz envelope)."""
    t = np.arange(int(round(seconds * rate))) / rate
    f0 = 140 + 20 * np.sin(2 * np.pi * 0.7 * t)
    x = sum(np.sin(2 * np.pi * k * np.cumsum(f0) / rate) / k for k in range(1, 6))
    env = 0.55 + 0.45 * np.sin(2 * np.pi * 4 * t)
    return (0.12 * env * x + 0.002 * np.random.RandomState(seed).randn(len(t))).astype(np.float32)


def espeak_speech(seconds: float, rate: int = RATE, text: str = QUESTION) -> np.ndarray | None:
    """espeak-ng reading ``text``, resampled to ``rate``, repeated with 0.3 s pauses and cut to ``seconds``
    (None without espeak-ng)."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        return None
    import librosa

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "q.wav")
        subprocess.run([exe, "-w", out, text], check=True, capture_output=True)
        y = librosa.load(out, sr=rate)[0].astype(np.float32)
    n = int(round(seconds * rate))
    gap = np.zeros(int(0.3 * rate), np.float32)
    parts, have = [], 0
    while have < n:
        parts += [y, gap]
        have += len(y) + len(gap)
    x = np.concatenate(parts)[:n]
    fade = min(240, n)  # 10 ms fade-out where the cut falls inside a word
    x[n - fade:] *= np.linspace(1, 0, fade, dtype=np.float32)
    peak = float(np.abs(x).max()) or 1.0
    return (0.5 * x / peak).astype(np.float32)


def question(seconds: float) -> tuple[np.ndarray, str]:
    x = espeak_speech(seconds)
    if x is not None:
        return x, "espeak-ng"
    return synthetic_speech(seconds), "synthetic voiced signal (no espeak-ng)"


# --------------------------------------------------------------------------------------
# one run of each path


def run_realtime(url: str, x: np.ndarray, *, pace: bool, max_tokens: int, voice: str, timeout: float = 600) -> dict:
    """One spoken turn over ``/v1/realtime`` on a fresh connection; times from the commit being sent."""
    import websockets.sync.client as wsc

    from omni_jax.serve import realtime as rt

    pieces = [base64.b64encode(pcm16(x[i:i + PIECE])).decode("ascii") for i in range(0, len(x), PIECE)]
    ws_url = url.replace("http://", "ws://") + "/v1/realtime?model=bench"

    def until(ws, last: str, deadline: float, seen: dict | None = None, t0: float = 0.0) -> list:
        evs = []
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                raise RuntimeError(f"realtime: no {last} within {timeout} s; got {[e['type'] for e in evs]}")
            ev = json.loads(ws.recv(timeout=left))
            now = time.perf_counter()
            if ev["type"] == "error":
                raise RuntimeError(f"realtime: error event {ev['error']}")
            if seen is not None and ev["type"] not in seen:
                seen[ev["type"]] = now - t0
            evs.append(ev)
            if ev["type"] == last:
                return evs

    with wsc.connect(ws_url, additional_headers={"Authorization": f"Bearer {KEY}"}, max_size=None) as ws:
        deadline = time.perf_counter() + timeout
        until(ws, "session.created", deadline)
        ws.send(json.dumps({"type": "session.update", "session": {
            "type": "realtime", "output_modalities": ["audio"], "max_output_tokens": max_tokens,
            "audio": {"input": {"format": {"type": "audio/pcm", "rate": RATE}, "turn_detection": None},
                      "output": {"format": {"type": "audio/pcm", "rate": RATE}, "voice": voice}}}}))
        until(ws, "session.updated", deadline)
        start = time.perf_counter()
        for i, p in enumerate(pieces):
            if pace:  # piece i is what a microphone has delivered (i + 1) x 100 ms after speech began
                wait = start + (i + 1) * PIECE / RATE - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
            ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": p}))
        sent_s = time.perf_counter() - start
        # tokens the server's session had prefilled when speech ended (this process runs the server)
        live = [c for c in list(rt.CONNECTIONS) if not c.closed and c.session is not None]
        prefilled = max((c.session.prefilled_tokens for c in live), default=0)
        t0 = time.perf_counter()
        ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        ws.send(json.dumps({"type": "response.create"}))
        seen: dict = {}
        evs = until(ws, "response.done", time.perf_counter() + timeout, seen, t0)
    done = evs[-1]["response"]
    transcript = "".join(e["delta"] for e in evs if e["type"] == "response.output_audio_transcript.delta")
    audio_bytes = sum(len(base64.b64decode(e["delta"])) for e in evs if e["type"] == "response.output_audio.delta")
    return dict(first_audio_s=_r(seen.get("response.output_audio.delta")),
                first_text_s=_r(seen.get("response.output_audio_transcript.delta")),
                committed_s=_r(seen.get("input_audio_buffer.committed")),
                done_s=_r(seen.get("response.done")), audio_sent_s=round(sent_s, 3),
                prefilled_at_commit=int(prefilled), input_tokens=done.get("usage", {}).get("input_tokens"),
                output_tokens=done.get("usage", {}).get("output_tokens"),
                audio_s=round(audio_bytes / 2 / RATE, 3), status=done["status"], transcript=transcript)


def run_chat(url: str, wav_b64: str, *, max_tokens: int, voice: str, timeout: float = 600) -> dict:
    """One streamed chat completion with the question as a WAV ``input_audio``; times from the request."""
    from openai import OpenAI

    c = OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=timeout)
    msgs = [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": wav_b64, "format": "wav"}}]}]
    first_audio = first_text = None
    transcript, audio_bytes, reason, usage = [], 0, None, None
    t0 = time.perf_counter()
    stream = c.chat.completions.create(
        model="bench", messages=msgs, max_tokens=max_tokens, seed=0, stream=True,
        stream_options={"include_usage": True}, modalities=["text", "audio"],
        audio={"voice": voice, "format": "pcm16"},
        extra_body={"talker_do_sample": True})  # the realtime session's talker samples (seed 0) too
    for ch in stream:
        now = time.perf_counter() - t0
        if ch.usage is not None:
            usage = ch.usage
        if not ch.choices:
            continue
        d = ch.choices[0].delta
        a = d.audio  # the client's ChoiceDeltaAudio (transcript / data), or None
        text = (a.transcript if a is not None else None) or d.content
        if text:
            transcript.append(text)
            first_text = now if first_text is None else first_text
        if a is not None and a.data:
            audio_bytes += len(base64.b64decode(a.data))
            first_audio = now if first_audio is None else first_audio
        if ch.choices[0].finish_reason:
            reason = ch.choices[0].finish_reason
    total = time.perf_counter() - t0
    return dict(first_audio_s=_r(first_audio), first_text_s=_r(first_text), done_s=_r(total),
                input_tokens=usage.prompt_tokens if usage else None,
                output_tokens=usage.completion_tokens if usage else None, audio_s=round(audio_bytes / 2 / RATE, 3),
                finish_reason=reason, transcript="".join(transcript))


def _r(t):
    return None if t is None else round(t, 4)


def _median(runs: list, key: str):
    vals = [r[key] for r in runs if r[key] is not None]
    return round(statistics.median(vals), 4) if vals else None


def _ratio(b, a):
    return round(b / a, 3) if a and b is not None else None


# --------------------------------------------------------------------------------------
# the server


class Server:
    """``omni-jax serve`` in this process: an Engine and its app under uvicorn on 127.0.0.1 (a free port)."""

    def __init__(self, model, limits):
        import uvicorn

        from omni_jax.serve import Engine, build_app

        self.engine = Engine(model, limits).start()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        app = build_app(self.engine, model_name="bench", api_key=KEY)
        self.srv = uvicorn.Server(uvicorn.Config(app, log_config=None, log_level="warning", timeout_graceful_shutdown=1,
                                                 ws_max_size=limits.max_body_bytes))
        self.thread = threading.Thread(target=self.srv.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.srv.started and time.time() < deadline:
            time.sleep(0.05)
        if not self.srv.started:
            self.close()
            raise RuntimeError("bench realtime: the server did not start within 60 s")

    def close(self):
        self.srv.should_exit = True
        self.thread.join(10)
        self.engine.stop()
        self.sock.close()


# --------------------------------------------------------------------------------------


def print_table(res: dict) -> None:
    m, r = res["median"], res["ratio"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    pace = "paced at real time" if res["pace"] else "sent at once"
    print(f"\n{res['seconds']:g} s spoken question ({res['speech']}), {res['model']} ({res['precision']}), "
          f"median of {res['runs']} run(s) after a warm-up; seconds from the end of speech")
    w = 52
    print(f"{'path':<{w}} {'first text':>11} {'first audio':>12}")
    print(f"{'realtime /v1/realtime (appends ' + pace + ')':<{w}} {fmt(m['realtime']['first_text_s']):>11} "
          f"{fmt(m['realtime']['first_audio_s']):>12}")
    print(f"{'chat completions (whole audio, streamed)':<{w}} {fmt(m['chat']['first_text_s']):>11} "
          f"{fmt(m['chat']['first_audio_s']):>12}")
    print(f"{'ratio chat / realtime':<{w}} {fmt(r['first_text']):>11} {fmt(r['first_audio']):>12}")
    print("\nper run (first audio s, realtime / chat): " + ", ".join(
        f"{fmt(a['first_audio_s'])} / {fmt(b['first_audio_s'])}" for a, b in zip(res["realtime"], res["chat"])))
    wu = res["warmup"]
    print(f"warm-up (compiling) run: realtime {fmt(wu['realtime']['first_audio_s'])} s, chat "
          f"{fmt(wu['chat']['first_audio_s'])} s to first audio; tokens prefilled before the commit: "
          f"{[a['prefilled_at_commit'] for a in res['realtime']]} of {[a['input_tokens'] for a in res['realtime']]}")


# the thinker-vocabulary ids a chat prompt's tokens must agree with: placeholders, media brackets, padding
_TOKEN_IDS = {"thinker_config": ("audio_token_index", "image_token_index", "video_token_index", "audio_start_token_id",
                                 "audio_end_token_id", "vision_start_token_id", "vision_end_token_id", "pad_token_id"),
              "talker_config": ("audio_token_index", "image_token_index", "video_token_index", "audio_start_token_id",
                                "audio_end_token_id", "vision_start_token_id", "vision_end_token_id",
                                "tts_text_start_token_id", "tts_text_end_token_id", "tts_text_pad_token_id")}


def speaking_checkpoint(cfg: dict, directory: str) -> None:
    """A random checkpoint of the bench config ``cfg`` (:func:`bench.compare.build_checkpoint`: its
    widths, vocabulary and voice) that takes chat messages: the embedded model's tokenizer, chat template
    and generation config beside it, and the config's thinker-vocabulary special ids (placeholders,
    media brackets, the talker's text-side ids) set to that tokenizer's. The compute is the config's; the
    tokenizer only decides which of the vocabulary's ids a prompt uses."""
    import omni_jax

    from .compare import build_checkpoint

    import torch

    full = build_checkpoint(cfg, directory)
    src = omni_jax.default_model_path()
    with open(os.path.join(src, "config.json"), encoding="utf-8") as f:
        vocab = json.load(f)["thinker_config"]["text_config"]["vocab_size"]  # the tokenizer's ids: [0, vocab)
    # Random weights pick any of the vocabulary's ids, and the tokenizer decodes only its own: zeroing the
    # thinker head's rows past it (logit 0, below the largest random logit of the others, as
    # build_checkpoint does for the talker's codec head) keeps greedy replies readable; the compute is
    # unchanged
    with torch.no_grad():
        full.thinker.lm_head.weight[vocab:] = 0
    full.save_pretrained(directory, max_shard_size="500MB")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(os.path.join(src, name), os.path.join(directory, name))
    with open(os.path.join(src, "config.json"), encoding="utf-8") as f:
        emb = json.load(f)
    path = os.path.join(directory, "config.json")
    with open(path, encoding="utf-8") as f:
        conf = json.load(f)
    for section, names in _TOKEN_IDS.items():
        for n in names:
            conf[section][n] = emb[section][n]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(conf, f, indent=1)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench realtime", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint directory with a tokenizer (default: the embedded model)")
    p.add_argument("--config", default=None,
                   help="a bench config (bench/configs/cpu_small.json): a random checkpoint of its widths, built "
                        "in a temporary directory, with the embedded model's tokenizer (see speaking_checkpoint)")
    p.add_argument("--dtype", default=None, help="default: float32 for the embedded model, bfloat16 for --model")
    p.add_argument("--seconds", type=float, default=10.0, help="length of the spoken question")
    p.add_argument("--runs", type=int, default=3, help="timed runs of each path (after one warm-up run of each)")
    p.add_argument("--no-pace", dest="pace", action="store_false",
                   help="send the realtime appends at once instead of at real time")
    p.add_argument("--max-tokens", type=int, default=16, help="text tokens of each reply (both paths)")
    p.add_argument("--audio-tokens", type=int, default=64, help="codec ids of each spoken reply at most (both)")
    p.add_argument("--voice", default=None, help="default: the model's first voice")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.seconds <= 0 or a.runs < 1:
        p.error("--seconds must be > 0 and --runs >= 1")

    import jax

    import omni_jax
    from omni_jax.serve import ServeLimits

    if a.model and a.config:
        p.error("--model and --config: give one")
    tmp = None
    if a.config:
        tmp = tempfile.TemporaryDirectory(prefix="omni-bench-rt-")
        with open(a.config, encoding="utf-8") as f:
            print(f"building a random checkpoint of {a.config} ...", file=sys.stderr, flush=True)
            speaking_checkpoint(json.load(f), tmp.name)
    path = tmp.name if tmp else (a.model or omni_jax.default_model_path())
    model_desc = f"random checkpoint of {os.path.basename(a.config)}" if a.config else (a.model or "embedded default model")
    dtype = a.dtype or ("bfloat16" if a.model else "float32")
    model = omni_jax.load(path, dtype=dtype)
    voice = a.voice or next(iter(model.voices), "Chelsie")
    x, speech = question(a.seconds)
    wav_b64 = base64.b64encode(wav_bytes(x)).decode("ascii")
    limits = ServeLimits(max_batch=1, max_queue=4, max_tokens=max(a.max_tokens, 1),
                         max_audio_tokens=max(a.audio_tokens, 1), max_prompt_tokens=int(25 * a.seconds) + 128,
                         max_media_seconds=max(60.0, a.seconds + 1), max_sessions=2,
                         max_body_bytes=max(32 << 20, 2 * len(wav_b64)))
    server = Server(model, limits)
    try:
        kw = dict(max_tokens=a.max_tokens, voice=voice)
        t = time.perf_counter()
        warm = dict(realtime=run_realtime(server.url, x, pace=a.pace, **kw),
                    chat=run_chat(server.url, wav_b64, **kw))
        warm_s = time.perf_counter() - t
        rts, chats = [], []
        for i in range(a.runs):
            rts.append(run_realtime(server.url, x, pace=a.pace, **kw))
            chats.append(run_chat(server.url, wav_b64, **kw))
            print(f"run {i + 1}/{a.runs}: first audio realtime {rts[-1]['first_audio_s']} s, "
                  f"chat {chats[-1]['first_audio_s']} s", file=sys.stderr, flush=True)
    finally:
        server.close()
        if tmp is not None:
            tmp.cleanup()

    median = {name: {k: _median(runs, k) for k in ("first_audio_s", "first_text_s", "done_s")}
              for name, runs in (("realtime", rts), ("chat", chats))}
    median["realtime"]["committed_s"] = _median(rts, "committed_s")
    res = dict(
        command=" ".join(["python -m bench realtime"] + list(sys.argv[1:] if argv is None else argv)),
        machine=(f"{os.cpu_count()} CPU cores" if jax.default_backend() == "cpu"
                 else str(jax.devices()[0].device_kind)),
        backend=jax.default_backend(), jax=jax.__version__, date=time.strftime("%Y-%m-%d"),
        model=model_desc, model_path=path, precision=dtype, seconds=a.seconds,
        speech=speech, pace=a.pace, runs=a.runs,
        max_tokens=a.max_tokens, audio_tokens=a.audio_tokens, voice=voice,
        what="seconds from the end of speech (realtime: the commit sent after the last paced append; chat: the "
             "request sent) to the first audio / transcript delta; medians over the runs after one warm-up run "
             "of each path (its times under warmup); ratio = chat / realtime",
        median=median,
        ratio={"first_audio": _ratio(median["chat"]["first_audio_s"], median["realtime"]["first_audio_s"]),
               "first_text": _ratio(median["chat"]["first_text_s"], median["realtime"]["first_text_s"])},
        same_transcript=[r["transcript"] == c["transcript"] for r, c in zip(rts, chats)],
        warmup=warm, warmup_s=round(warm_s, 1), realtime=rts, chat=chats)
    print_table(res)
    write_json(a.json, res)
    if a.json:
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
