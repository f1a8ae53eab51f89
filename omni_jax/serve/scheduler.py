"""The continuous-batching engine: one scheduler thread owns the thinker and talker slot batches.

Loop (one iteration = one ``decode_steps`` boundary):

1. admit: while a slot is free and requests wait, prefill the next one alone (the model's own
   :meth:`OmniModel.prefill`, which also picks its first token) and write it into the free row;
2. drop the rows of requests whose client went away (their slot is free for the next admit);
3. advance every thinker row still writing text by up to ``steps_per_call`` tokens in one jitted
   call over those rows only (gathered into the smallest power-of-two sub-batch that holds them,
   :meth:`SlotBatch.step`: a call costs what a batch of the occupied rows costs, not of
   ``max_batch``);
4. hand out text deltas (whole UTF-8 characters, :class:`omni_jax.processor.TextStreamer`; a request
   that joined in step 1 gets its prefill's token before step 3 runs);
5. speech: start the talker of rows whose thinker has fed its first reply token (the model's own
   talker prefill, written into the talker batch at the same row), advance every talker row
   whose next input is final by up to ``talker_steps_per_call`` codec ids in one jitted call over
   the speaking rows only (bucketed the same way), and
   pass new codec ids to the request's :class:`omni_jax.streaming.StreamingToken2Wav` (run on a
   separate vocoder thread, so the DiT/BigVGAN chunks overlap decoding);
6. free the slots of finished requests.

Requests wait in a bounded FIFO queue (:class:`QueueFull` when it is full). Every per-row value
(positions, cache slots, key mask, RNG key, sampling parameters, limits) lives in the row, so a
request's greedy tokens do not depend on the others in the batch, nor on the sub-batch size.

Compiles: the thinker and the talker each compile one decode program per occupancy bucket
actually used (1, 2, 4, ..., ``max_batch``: at most ``ceil(log2(max_batch)) + 1`` each, see
:func:`.batch.occupancy_bucket`); :meth:`Engine.compile_counts` reports them with the insert and
prefill programs. Joining or leaving never recompiles otherwise.
"""

from __future__ import annotations

import collections
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import numpy as np

from ..engine import ThinkerReply, bucket, noise_key
from ..errors import OmniError
from ..sharding import outside_context_mesh
from .batch import SlotBatch, empty_state, fit_slots, occupancy_bucket, sampling_row

log = logging.getLogger("omni_jax.serve")


@dataclass
class ServeLimits:
    """Server limits. ``max_batch`` slots decode together; ``max_tokens``, ``max_prompt_tokens`` and
    ``max_audio_tokens`` fix the compiled buffer shapes (bucketed to powers of two)."""

    max_batch: int = 8
    max_queue: int = 64
    max_tokens: int = 512  # per request (OpenAI max_tokens); also the default
    max_prompt_tokens: int = 2048
    max_audio_tokens: int = 1024  # codec ids per spoken reply (50 per second)
    max_body_bytes: int = 32 << 20
    max_media_seconds: float = 60.0  # per audio or video part
    max_image_pixels: int = 12_845_056  # per image or video frame (Qwen's max_pixels)
    steps_per_call: int = 4  # thinker tokens per decode call (the join/leave granularity)
    talker_steps_per_call: int = 16  # codec ids per talker call
    max_sessions: int = 4  # realtime (WebSocket) conversations held at once, each with its own KV cache
    session_idle_seconds: float = 600.0  # a realtime connection without client events (and no reply) is closed

    def check(self):
        for name in ("max_batch", "max_queue", "max_tokens", "max_prompt_tokens", "max_audio_tokens",
                     "max_body_bytes", "steps_per_call", "talker_steps_per_call", "max_image_pixels", "max_sessions"):
            if int(getattr(self, name)) < (0 if name == "max_queue" else 1):
                raise OmniError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(self, name)}")
        if not self.session_idle_seconds > 0:
            raise OmniError(f"--session-idle-seconds: must be > 0, got {self.session_idle_seconds}")
        if not self.max_media_seconds > 0:
            raise OmniError(f"--max-media-seconds: must be > 0, got {self.max_media_seconds}")


class QueueFull(Exception):
    """The waiting queue is full (HTTP 429)."""


@dataclass
class GenParams:
    """A request's generation parameters. The thinker's fields left as None take the checkpoint's
    ``generation_config.json`` values, then transformers' defaults, when the request starts
    (:meth:`omni_jax.api.OmniModel.sampling_settings`; ``max_tokens`` is then capped at the server's
    limit); ``talker_do_sample`` None follows the thinker's ``do_sample``."""

    max_tokens: int | None = None
    do_sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None  # 0: no top-k
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int = 0
    ignore_eos: bool = False
    speech: bool = False
    voice: str = "Chelsie"
    talker_max_new_tokens: int = 1024
    talker_min_new_tokens: int = 0
    talker_do_sample: bool | None = True
    talker_top_k: int | None = 40
    talker_top_p: float | None = 0.8
    talker_temperature: float = 0.9
    talker_repetition_penalty: float = 1.05


_ids = itertools.count()


@dataclass
class ServeRequest:
    """One chat request in the engine. ``inputs``: processor outputs (input_ids, attention_mask, media
    tensors); ``sink(event)`` receives ``(kind, payload)`` tuples from the engine's threads:
    ``("started", None)``, ``("text", (delta, ids))``, ``("audio", float32 chunk)``,
    ``("done", info)``, ``("error", (status, message))``; a session's reply (``prepared``) also gets
    ``("returned", None)`` once the session has its cache back."""

    inputs: dict
    params: GenParams
    sink: Callable[[tuple], None]
    # a session's reply, begun by the session (omni_jax.session.PendingReply): inserted as it is instead of
    # prefilled from ``inputs``, and handed back to the session when its row is freed
    prepared: Any = None
    arrival: float = field(default_factory=time.perf_counter)
    id: int = field(default_factory=lambda: next(_ids))
    cancelled: bool = False
    # engine-side state
    slot: int | None = None
    gen: Any = None
    streamer: Any = None
    sent: int = 0
    token_ids: list = field(default_factory=list)
    text_done: bool = False
    finish_reason: str = "length"
    talker_started: bool = False
    talker_done: bool = False
    codes: list = field(default_factory=list)
    vocoder: Any = None
    parts_left: int = 1
    t_first_text: float | None = None
    t_first_audio: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    finished: threading.Event = field(default_factory=threading.Event)

    @property
    def prompt_tokens(self) -> int:
        return int(np.asarray(self.inputs["attention_mask"]).sum())

    def cancel(self):
        self.cancelled = True

    def part_done(self, metrics):
        with self._lock:
            self.parts_left -= 1
            last = self.parts_left == 0
        if last:
            info = dict(finish_reason=self.finish_reason, token_ids=list(self.token_ids),
                        codec_ids=[int(c) for c in self.codes] if self.params.speech else None,
                        prompt_tokens=self.prompt_tokens, completion_tokens=len(self.token_ids),
                        audio_tokens=len(self.codes))
            metrics.request_done(self, "cancelled" if self.cancelled else "ok")
            self.finished.set()
            self.sink(("done", info))


class Metrics:
    """Counters, gauges and latency histograms, written in Prometheus' text format."""

    BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

    def __init__(self):
        self.lock = threading.Lock()
        self.counters = collections.Counter()
        self.hist = {"time_to_first_token_seconds": [0] * (len(self.BUCKETS) + 1),
                     "time_to_first_audio_seconds": [0] * (len(self.BUCKETS) + 1)}
        self.hist_sum = collections.Counter()
        self.hist_count = collections.Counter()
        self.recent = collections.deque()  # (time, tokens) over the last WINDOW seconds
        self.gauges: dict[str, Callable[[], float]] = {}

    WINDOW = 10.0

    def inc(self, name, value=1, **labels):
        with self.lock:
            self.counters[(name, tuple(sorted(labels.items())))] += value

    def observe(self, name, value):
        with self.lock:
            i = next((k for k, b in enumerate(self.BUCKETS) if value <= b), len(self.BUCKETS))
            self.hist[name][i] += 1
            self.hist_sum[name] += value
            self.hist_count[name] += 1

    def tokens(self, n, kind="text"):
        now = time.perf_counter()
        with self.lock:
            self.counters[("tokens_total", (("kind", kind),))] += n
            if kind == "text":
                self.recent.append((now, n))
            while self.recent and self.recent[0][0] < now - self.WINDOW:
                self.recent.popleft()

    def tokens_per_second(self) -> float:
        now = time.perf_counter()
        with self.lock:
            while self.recent and self.recent[0][0] < now - self.WINDOW:
                self.recent.popleft()
            return sum(n for _, n in self.recent) / self.WINDOW

    def request_done(self, req: ServeRequest, status: str):
        self.inc("requests_total", status=status)

    def render(self) -> str:
        out = []
        p = "omni_jax_"
        helps = {"requests_total": "Chat requests by outcome.", "tokens_total": "Generated thinker tokens "
                 "(kind=text) and talker codec ids (kind=audio).", "compiles": "Compiled programs per entry point."}
        with self.lock:
            names = sorted({k[0] for k in self.counters})
            for name in names:
                kind = "gauge" if name == "compiles" else "counter"
                out.append(f"# HELP {p}{name} {helps.get(name, name)}")
                out.append(f"# TYPE {p}{name} {kind}")
                for (n, labels), v in sorted(self.counters.items()):
                    if n == name:
                        lab = ",".join(f'{k}="{val}"' for k, val in labels)
                        out.append(f"{p}{name}{{{lab}}} {v}" if lab else f"{p}{name} {v}")
            for name, counts in self.hist.items():
                out.append(f"# HELP {p}{name} Seconds from a request's arrival to its first "
                           f"{'text token' if 'token' in name else 'audio chunk'}.")
                out.append(f"# TYPE {p}{name} histogram")
                cum = 0
                for b, c in zip(list(self.BUCKETS) + ["+Inf"], counts):
                    cum += c
                    out.append(f'{p}{name}_bucket{{le="{b}"}} {cum}')
                out.append(f"{p}{name}_sum {self.hist_sum[name]:.6f}")
                out.append(f"{p}{name}_count {self.hist_count[name]}")
        for name, fn in self.gauges.items():
            out.append(f"# TYPE {p}{name} gauge")
            out.append(f"{p}{name} {fn()}")
        out.append(f"# HELP {p}tokens_per_second Thinker tokens per second over the last {self.WINDOW:.0f} s.")
        out.append(f"# TYPE {p}tokens_per_second gauge")
        out.append(f"{p}tokens_per_second {self.tokens_per_second():.3f}")
        return "\n".join(out) + "\n"


@outside_context_mesh  # built or driven inside a caller's jax.set_mesh: the library's programs use Auto axes
class Engine:
    """Continuous batching over a loaded :class:`~omni_jax.api.OmniModel` (see the module notes)."""

    def __init__(self, model, limits: ServeLimits | None = None, metrics: Metrics | None = None):
        self.model = model
        self.limits = limits or ServeLimits()
        self.limits.check()
        self.metrics = metrics or Metrics()
        lim = self.limits
        tcfg = model.config.thinker.text
        self.nb = bucket(lim.max_tokens)
        self.pb = bucket(lim.max_prompt_tokens)
        self.speech = (model.talker is not None and model.token2wav_params is not None and bool(model.voices))
        shape = model.config.thinker.text
        self.eos = list(model.generation_config["eos_token_id"])
        eos_arr = np.asarray(self.eos if self.eos else [-1], np.int32)
        pad = model.generation_config["pad_token_id"]
        b = lim.max_batch
        st = empty_state(b, (shape.num_hidden_layers, self.pb + self.nb, shape.num_key_value_heads, shape.head_dim),
                         model.dtype, self.nb, tcfg.vocab_size, tcfg.hidden_size if self.speech else 0, model.dtype)
        self.thinker = SlotBatch(st, model.decode_rows_fn("thinker"), eos=eos_arr, pad=pad, mesh=model.mesh)
        self.row_slots = self.pb + self.nb  # cache slots of a thinker row: a session reply's conversation + reply
        self.talker = None
        if self.speech:
            c = model.config.talker
            self.nbt = bucket(lim.max_audio_tokens)
            tst = empty_state(b, (c.num_hidden_layers, self.pb + 2 + self.nbt, c.num_key_value_heads, c.head_dim),
                              model.dtype, self.nbt, c.vocab_size, 0, model.dtype)
            self.t_eos = [c.tts_codec_pad_token_id, c.tts_codec_end_token_id]
            # the codec bos suppression comes with each row's prefill state (OmniModel.talker_start)
            self.talker = SlotBatch(tst, model.decode_rows_fn("talker"), eos=np.asarray(self.t_eos, np.int32),
                                    pad=c.tts_codec_pad_token_id, mesh=model.mesh)
            self.t_extra = np.asarray([0, c.tts_text_end_token_id, c.tts_text_pad_token_id], np.int32)
        self.slots: list[ServeRequest | None] = [None] * b
        self.queue: collections.deque[ServeRequest] = collections.deque()
        self.cv = threading.Condition()
        self._stop = False
        self._paused = False
        self.peak_active = 0
        self._parked = threading.Event()
        self.vocoder_q: queue.Queue = queue.Queue()
        self.metrics.gauges.update(queue_length=lambda: len(self.queue),
                                   active_slots=lambda: sum(r is not None for r in self.slots),
                                   batch_slots=lambda: lim.max_batch)
        self._thread = threading.Thread(target=self._run, name="omni-jax-scheduler", daemon=True)
        self._vthread = threading.Thread(target=self._vocoder_run, name="omni-jax-vocoder", daemon=True)

    # ------------------------------------------------------------------ control
    def start(self):
        self._thread.start()
        self._vthread.start()
        return self

    def stop(self):
        with self.cv:
            self._stop = True
            self.cv.notify_all()
        self.vocoder_q.put(None)
        self._thread.join(timeout=30)
        self._vthread.join(timeout=30)

    def request_pause(self):
        """Ask the scheduler to park at its next step boundary, without waiting: safe from any thread,
        the scheduler's own included (:meth:`pause` also waits until it is parked)."""
        with self.cv:
            self._paused = True
            self._parked.clear()
            self.cv.notify_all()

    def pause(self, timeout: float = 60.0):
        """Hold the scheduler at its next step boundary (tests, maintenance); returns when parked."""
        self.request_pause()
        if not self._parked.wait(timeout):
            raise TimeoutError("the scheduler did not reach a step boundary")

    def resume(self):
        with self.cv:
            self._paused = False
            self.cv.notify_all()

    def submit(self, req: ServeRequest):
        """Queue ``req``; raises :class:`QueueFull` when ``max_queue`` requests already wait."""
        with self.cv:
            if len(self.queue) >= self.limits.max_queue:
                self.metrics.inc("requests_total", status="rejected_queue_full")
                raise QueueFull(f"the queue is full ({self.limits.max_queue} requests waiting)")
            self.queue.append(req)
            self.cv.notify_all()

    def active(self) -> int:
        return sum(r is not None for r in self.slots)

    def session_reply(self, session, max_new_tokens: int | None = None, *, return_audio: bool = False,
                      speaker: str = "Chelsie", **kwargs):
        """Generate a :class:`omni_jax.session.Session`'s reply as a row of this engine's continuous
        batch, beside the chat completions: yields the events :meth:`~omni_jax.session.Session.respond_stream`
        yields (``text``, ``audio``, then ``done``) and leaves the session as ``respond_stream`` does
        (the reply in its history and :attr:`~omni_jax.session.Session.last_reply`; ``session.cancel()``
        stops it). The session chooses the first token (:meth:`~omni_jax.session.Session.begin_reply`,
        on the calling thread); the row decodes with the engine's per-row programs, and its speech runs
        through the engine's talker batch and a :class:`omni_jax.streaming.StreamingToken2Wav`, so no
        program is compiled per session. Its conversation must fit a row: :attr:`row_slots` slots
        (the session's ``max_context``), and, spoken, ``max_prompt_tokens``. Raises
        :class:`~omni_jax.errors.OmniError` (a full queue, a reply that does not fit)."""
        import queue as queue_mod

        from ..outputs import StreamEvent

        t0 = time.perf_counter()
        kw = dict(kwargs)
        if kw.get("talker_eos_token_id") is not None:
            raise OmniError("talker_eos_token_id: a session reply in the server's batch stops at the talker's own "
                            "end codes")
        if return_audio:
            kw.setdefault("talker_max_new_tokens", self.limits.max_audio_tokens)
        pr = session.begin_reply(max_new_tokens, return_audio=return_audio, speaker=speaker, **kw)
        st = pr.settings
        tk = {k: v for k, v in kw.items() if k.startswith("talker_") and k != "talker_eos_token_id"}
        params = GenParams(max_tokens=pr.max_new, do_sample=pr.do_sample, temperature=st["temperature"],
                           top_k=st["top_k"], top_p=st["top_p"], repetition_penalty=st["repetition_penalty"],
                           seed=pr.seed, speech=return_audio, voice=speaker, **tk)
        if params.talker_do_sample is None:
            params.talker_do_sample = True
        events: queue_mod.Queue = queue_mod.Queue()
        req = ServeRequest(inputs={"attention_mask": np.ones((1, pr.prompt_tokens), np.int32)}, params=params,
                           sink=events.put, prepared=pr)
        pr.on_cancel = req.cancel
        try:
            self.submit(req)
        except QueueFull as e:
            pr.abandon()
            raise OmniError(str(e)) from None
        audio, done, returned, error = [], None, False, None

        def next_event():
            while True:
                try:
                    return events.get(timeout=1.0)
                except queue_mod.Empty:
                    if self._stop:
                        raise OmniError("the server is stopping") from None

        try:
            while not returned or (done is None and error is None and not req.cancelled):
                kind, payload = next_event()
                if kind == "text":
                    delta, ids = payload
                    yield StreamEvent("text", text=delta, token_ids=list(ids), t=time.perf_counter() - t0)
                elif kind == "audio":
                    audio.append(payload)
                    yield StreamEvent("audio", audio=payload, t=time.perf_counter() - t0)
                elif kind == "done":
                    done = payload
                elif kind == "error":
                    error = payload
                elif kind == "returned":
                    returned = True
        finally:
            if not returned:  # the caller stopped listening (or an error): stop the row, wait for the cache
                req.cancel()
                while next_event()[0] != "returned":
                    pass
        if error is not None:
            raise OmniError(error[1])
        reply = session.last_reply
        if return_audio:
            reply.codec_ids = np.asarray(done["codec_ids"] if done else req.codes, np.int32)
            reply.audio = np.concatenate(audio) if audio else None
        if req.cancelled:
            reply.finish_reason = "cancelled"
        yield StreamEvent("done", token_ids=list(reply.token_ids), codec_ids=reply.codec_ids,
                          t=time.perf_counter() - t0)

    def compile_counts(self) -> dict:
        m = self.model
        out = {f"thinker_{k}": v for k, v in self.thinker.compiles().items()}
        counts = m.compile_counts()
        out["thinker_prefill"] = counts["prefill"]
        if self.talker is not None:
            out.update({f"talker_{k}": v for k, v in self.talker.compiles().items()})
            out["talker_prefill"] = counts["talker_prefill"]
        return out

    # ------------------------------------------------------------------ scheduler thread
    def _run(self):
        while True:
            with self.cv:
                while not self._stop and (self._paused or (not self.queue and self.active() == 0)):
                    if self._paused:
                        self._parked.set()
                    self.cv.wait(0.5)
                if self._stop:
                    return
            try:
                self._iteration()
            except Exception as e:  # a bug, not a user error: fail what is in flight, keep serving
                log.exception("scheduler iteration failed")
                self._fail_all(f"internal error: {type(e).__name__}: {e}")

    def _fail_all(self, message):
        for r, req in enumerate(self.slots):
            if req is not None:
                try:
                    self._hand_back(r, req)
                except Exception:  # noqa: BLE001 - the batch itself may be what failed
                    log.exception("handing a session its reply back failed")
                    self._give_up(req)  # the session forgets its cache; its consumer is released
                req.sink(("error", (500, message)))
                self.metrics.request_done(req, "error")
                req.finished.set()
                self.slots[r] = None
        self.thinker.release(np.ones(self.limits.max_batch, bool))
        if self.talker is not None:
            self.talker.release(np.ones(self.limits.max_batch, bool))

    def _iteration(self):
        joined = self._admit()
        self._drop_cancelled()
        if self.active() == 0:
            return
        if joined:  # the prefill's token goes out now, not after the first decode call
            self._emit_text(*self.thinker.host_view())
        self._thinker_step([r for r, q in enumerate(self.slots) if q is not None and not q.text_done])
        n, tokens, finished = self.thinker.host_view()
        self._emit_text(n, tokens, finished)
        if self.talker is not None:
            self._talk(n, finished)
        self._free_finished()

    def _thinker_step(self, rows):
        th = self.thinker
        th.step(rows, before=(self.model.params,), after=(np.int32(self.limits.steps_per_call), th.eos, th.pad))

    def _talker_step(self, rows):
        m, tb, ts = self.model, self.talker, self.thinker.state
        view = (ts.tokens, ts.hidden, ts.n, ts.done | (ts.n >= ts.max_new), ts.eos_on)
        tb.step(rows, before=(m.talker_params,), after=(m.params, *view, np.int32(self.limits.talker_steps_per_call),
                                                  tb.eos, tb.pad, self.thinker.eos, self.t_extra))

    def precompile(self):
        """Compile the thinker's and talker's decode programs for every occupancy bucket now, rather
        than the first time that many rows decode together. Call it before :meth:`start` (or while
        paused with no request in a slot): it steps free rows only, which changes nothing."""
        b = self.limits.max_batch
        if any(q is not None for q in self.slots):
            raise RuntimeError("precompile needs an idle engine")
        for k in sorted({occupancy_bucket(n, b) for n in range(1, b + 1)}):
            self._thinker_step(range(k))
            if self.talker is not None:
                self._talker_step(range(k))
        jax.block_until_ready(self.thinker.state)

    def _admit(self) -> int:
        """Start queued requests in free rows; returns how many joined the batch."""
        joined = 0
        while True:
            with self.cv:
                free = [r for r, q in enumerate(self.slots) if q is None]
                if not free or not self.queue:
                    return joined
                req = self.queue.popleft()
            if req.cancelled:
                self.metrics.request_done(req, "cancelled")
                if req.prepared is not None:  # cancelled while waiting: the reply ends at its first token
                    st = req.prepared.state
                    self._returned(req, lambda: req.prepared.finish(st.cache, st.hidden, np.asarray(st.tokens[0, :1]),
                                                                    "cancelled"))
                req.finished.set()
                continue
            try:
                self._start(req, free[0])
                joined += 1
            except OmniError as e:
                self.metrics.request_done(req, "invalid")
                self._give_up(req)
                req.sink(("error", (400, str(e))))
                req.finished.set()
            except Exception as e:
                log.exception("prefill failed")
                self.metrics.request_done(req, "error")
                self._give_up(req)
                req.sink(("error", (500, f"internal error: {type(e).__name__}: {e}")))
                req.finished.set()

    def _start(self, req: ServeRequest, r: int):
        if req.prepared is not None:
            return self._start_prepared(req, r)
        p, m, lim = req.params, self.model, self.limits
        ids, mask = np.atleast_2d(req.inputs["input_ids"]), np.atleast_2d(req.inputs["attention_mask"])
        # unset fields: the checkpoint's generation config, then transformers' defaults
        st = m.sampling_settings(max_new_tokens=p.max_tokens, do_sample=p.do_sample, temperature=p.temperature,
                                 top_k=p.top_k, top_p=p.top_p, repetition_penalty=p.repetition_penalty,
                                 prompt_length=ids.shape[-1], longest_prompt=int(mask.sum(-1).max()))
        if p.max_tokens is None:
            st["max_new_tokens"] = min(st["max_new_tokens"], lim.max_tokens)
        elif p.max_tokens > lim.max_tokens:
            raise OmniError(f"max_tokens: {p.max_tokens} is above this server's limit of {lim.max_tokens}")
        p.max_tokens, p.do_sample, p.temperature = st["max_new_tokens"], st["do_sample"], st["temperature"]
        p.top_k, p.top_p, p.repetition_penalty = st["top_k"], st["top_p"], st["repetition_penalty"]
        if p.talker_do_sample is None:
            p.talker_do_sample = bool(p.do_sample)
        kw = {k: v for k, v in req.inputs.items() if k not in ("input_ids", "attention_mask")}
        if p.speech:
            kw.update(return_audio=True, speaker=p.voice, talker_max_new_tokens=lim.max_audio_tokens)
        gen = m.prefill(req.inputs["input_ids"], req.inputs["attention_mask"], max_new_tokens=lim.max_tokens,
                        do_sample=p.do_sample, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                        repetition_penalty=p.repetition_penalty, seed=p.seed,
                        eos_token_id=[] if p.ignore_eos else None, **kw)
        vocab = m.config.thinker.text.vocab_size
        self.thinker.insert(r, gen.state, max_new=p.max_tokens, min_new=0, eos_on=not p.ignore_eos,
                            sp_row=sampling_row(p.temperature, p.top_k, p.top_p, p.repetition_penalty, p.do_sample,
                                                vocab))
        gen.state = None  # the row lives in the batch now
        req.gen = gen
        self._occupy(req, r)

    def _start_prepared(self, req: ServeRequest, r: int):
        """Insert a session's begun reply (its cache, first token and sampling) into row ``r``."""
        pr, p, m, lim = req.prepared, req.params, self.model, self.limits
        n = pr.prompt_tokens
        if n + pr.max_new > self.row_slots:
            raise OmniError(f"the conversation of {n} tokens + a reply of up to {pr.max_new} needs more context than "
                            f"this server's rows hold ({self.row_slots} slots: --max-prompt-tokens + --max-tokens)")
        if p.speech and bucket(n) > self.pb:
            raise OmniError(f"a spoken reply's talker reads the whole conversation: {n} tokens is above this server's "
                            f"--max-prompt-tokens ({lim.max_prompt_tokens})")
        if sorted(pr.eos) != sorted(self.eos) and not p.ignore_eos:
            raise OmniError("a session reply in the server's batch stops at the model's own EOS ids")
        if pr.max_new > self.nb:
            raise OmniError(f"max_tokens: {pr.max_new} is above this server's limit of {lim.max_tokens}")
        vocab = m.config.thinker.text.vocab_size
        self.thinker.insert(r, fit_slots(pr.state, self.row_slots), max_new=pr.max_new, min_new=0,
                            eos_on=not p.ignore_eos, sp_row=sampling_row(*pr.sampling_values(), vocab))
        pr.state = None  # the row lives in the batch now
        req.gen = pr.generation
        if req.gen is not None:
            req.gen.state = None
        self._occupy(req, r)

    def _returned(self, req: ServeRequest, finish) -> None:
        """Hand a session's reply back (``finish()``), then tell its consumer."""
        try:
            finish()
        except Exception:  # noqa: BLE001 - the consumer gets the error; serving goes on
            log.exception("handing a session its reply back failed")
            req.prepared.lost()
            req.sink(("error", (500, "internal error: the session could not take its reply back")))
        req.sink(("returned", None))

    def _give_up(self, req: ServeRequest) -> None:
        """A session's reply that never ran: the session takes its cache back unchanged."""
        if req.prepared is not None:
            if req.prepared.state is not None:
                req.prepared.abandon()
            else:  # it failed after its state went into the batch
                req.prepared.lost()
            req.sink(("returned", None))

    def _hand_back(self, r: int, req: ServeRequest) -> None:
        """Before row ``r`` is freed: a session's reply takes its cache and reply tokens back."""
        if req.prepared is None:
            return
        cache, hidden, tokens, n = self.thinker.take_reply(r)
        reason = "cancelled" if req.cancelled else req.finish_reason
        self._returned(req, lambda: req.prepared.finish(cache, hidden, np.asarray(tokens[0, :int(n)]), reason))

    def _occupy(self, req: ServeRequest, r: int):
        """Row ``r`` holds ``req`` now: its text streamer, vocoder and bookkeeping."""
        from ..processor import TextStreamer

        p, m = req.params, self.model
        req.slot = r
        req.streamer = TextStreamer(m.processor) if m.processor is not None else None
        req.parts_left = 2 if p.speech else 1
        if p.speech:
            from ..streaming import StreamingToken2Wav

            voice = m.voices[p.voice]
            req.vocoder = StreamingToken2Wav(m.token2wav_parts, m.config.token2wav, voice.cond, voice.ref_mel,
                                             key=noise_key(p.seed, 0), impl=m.attention)
        if any(q is not None and q.sent > 0 for q in self.slots):
            self.metrics.inc("joins_running_batch_total")  # joined rows that were already decoding
        self.slots[r] = req
        self.peak_active = max(self.peak_active, self.active())
        self.metrics.inc("requests_started_total")
        req.sink(("started", None))

    def _drop_cancelled(self):
        rows = np.zeros(self.limits.max_batch, bool)
        for r, req in enumerate(self.slots):
            if req is not None and req.cancelled:
                rows[r] = True
                self._hand_back(r, req)
                self.slots[r] = None
                self.metrics.request_done(req, "cancelled")
                req.finished.set()
        if rows.any():
            self.thinker.release(rows)
            if self.talker is not None:
                self.talker.release(rows)

    def _emit_text(self, n, tokens, finished):
        now = time.perf_counter()
        for r, req in enumerate(self.slots):
            if req is None or req.text_done:
                continue
            new = [int(x) for x in tokens[r, req.sent:n[r]]]
            req.sent = int(n[r])
            if new:
                req.token_ids.extend(new)
                self.metrics.tokens(len(new))
                eos = set() if req.params.ignore_eos else set(self.eos)
                reply = [x for x in new if x not in eos]
                delta = req.streamer.push(reply) if req.streamer else ""
                if req.t_first_text is None:
                    req.t_first_text = now
                    self.metrics.observe("time_to_first_token_seconds", now - req.arrival)
                req.sink(("text", (delta, new)))
            if finished[r]:
                tail = req.streamer.flush() if req.streamer else ""
                if tail:
                    req.sink(("text", (tail, [])))
                hit = bool(req.token_ids) and not req.params.ignore_eos and req.token_ids[-1] in self.eos
                req.finish_reason = "stop" if hit else "length"
                req.text_done = True
                req.part_done(self.metrics)

    def _talk(self, n, finished):
        m, tb, lim = self.model, self.talker, self.limits
        for r, req in enumerate(self.slots):
            if req is None or not req.params.speech or req.talker_started or req.talker_done:
                continue
            if n[r] >= 2:
                p = req.params
                run = m.talker_start(req.gen, reply=ThinkerReply(*self.thinker.take_row(r)), speaker=p.voice,
                                     seed=p.seed, talker_max_new_tokens=lim.max_audio_tokens,
                                     talker_min_new_tokens=p.talker_min_new_tokens,
                                     talker_do_sample=p.talker_do_sample, talker_top_k=p.talker_top_k,
                                     talker_top_p=p.talker_top_p, talker_temperature=p.talker_temperature,
                                     talker_repetition_penalty=p.talker_repetition_penalty)
                req.gen.talker_inputs = None  # no longer needed
                tb.insert(r, run.state, max_new=p.talker_max_new_tokens, min_new=p.talker_min_new_tokens,
                          eos_on=True, sp_row=sampling_row(p.talker_temperature, p.talker_top_k, p.talker_top_p,
                                                           p.talker_repetition_penalty, p.talker_do_sample,
                                                           m.config.talker.vocab_size))
                req.talker_started = True
            elif finished[r]:  # the thinker stopped before its first reply token was fed: no speech
                req.talker_done = True
                self.vocoder_q.put((req, [], True))
        live = [r for r, q in enumerate(self.slots) if q is not None and q.talker_started and not q.talker_done]
        if not live:
            return
        self._talker_step(live)
        tn, ttok, tfin = tb.host_view()
        for r in live:
            req = self.slots[r]
            row = ttok[r, :tn[r]]
            hit = np.nonzero(np.isin(row, self.t_eos))[0]
            codes = row[:hit[0]] if len(hit) else row
            new = [int(c) for c in codes[len(req.codes):]]
            req.codes.extend(new)
            if new:
                self.metrics.tokens(len(new), kind="audio")
            if tfin[r]:
                req.talker_done = True
            if new or req.talker_done:
                self.vocoder_q.put((req, new, req.talker_done))

    def _free_finished(self):
        rows = np.zeros(self.limits.max_batch, bool)
        for r, req in enumerate(self.slots):
            if req is not None and req.text_done and (not req.params.speech or req.talker_done):
                rows[r] = True
                self._hand_back(r, req)
                self.slots[r] = None
        if rows.any():
            self.thinker.release(rows)
            if self.talker is not None:
                self.talker.release(rows)
            with self.cv:
                self.cv.notify_all()

    # ------------------------------------------------------------------ vocoder thread
    def _vocoder_run(self):
        while True:
            item = self.vocoder_q.get()
            if item is None:
                return
            req, codes, last = item
            if req.cancelled:
                continue
            try:
                chunks = req.vocoder.push(np.asarray(codes, np.int64)) if len(codes) else []
                if last:
                    chunks = chunks + req.vocoder.finish()
                for a in chunks:
                    if len(a):
                        if req.t_first_audio is None:
                            req.t_first_audio = time.perf_counter()
                            self.metrics.observe("time_to_first_audio_seconds", req.t_first_audio - req.arrival)
                        req.sink(("audio", np.asarray(a, np.float32)))
                if last:
                    req.part_done(self.metrics)
            except Exception as e:
                log.exception("token2wav failed")
                req.cancelled = True
                req.sink(("error", (500, f"internal error in token2wav: {type(e).__name__}: {e}")))
