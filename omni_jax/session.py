"""Multi-turn conversations over one thinker KV cache: :class:`Session` (``model.session(...)``).

A session keeps the conversation (``messages``, the list ``OmniModel.generate(messages=...)``
takes) and a KV cache whose slots ``[0, n)`` hold the keys and values of ``n`` token ids
(:attr:`Session.cached_ids`). Each time the conversation changes, the whole conversation is
rendered with the checkpoint's chat template (media placeholders expanded, TMRoPE positions from
:func:`omni_jax.tmrope.rope_index`), its ids and positions are compared with the cached ones, and
only the tokens after their longest common prefix are prefilled, at the slot where the prefix
ends (:func:`omni_jax.engine.thinker_extend`). Normally that is the new user turn plus the
generation prompt; it is also how the assistant's reply joins the history: the reply is stored as
its decoded text, rendered as the template renders it (``<|im_start|>assistant\\n`` text
``<|im_end|>\\n``), so the cache always holds what a from-scratch prefill of the conversation
would hold, and a session's greedy replies are those of ``generate`` on the conversation so far.
Slots past ``n`` hold stale or padding entries; a query never attends to a slot after its own
(the causal slot mask), and each is rewritten before it is used.

Media embeddings (audio, images) are kept per item, so a prefill that starts inside or before a
media span can place them again. With a talker, each cached token's post-norm hidden state and
input embedding are kept beside the cache too: a spoken reply's talker prompt is the whole
conversation, as in ``generate(return_audio=True)``. Streaming audio (:meth:`Session.append_audio`) prefills each
complete chunk of the audio encoder as soon as it exists, streamed video frames
(:meth:`Session.append_video`) each 2 s chunk of 2 fps samples, interleaved with the audio's chunks
with ``use_audio_in_video``; see docs/realtime.md for the chunk algorithms, the frame sampling and
size, and the log-mel clamp policy.

Cache growth: the cache has ``bucket(needed, minimum_slots)`` slots (the next power of two, at
least 256 by default); when a prefill or a reply needs more, it is reallocated at the next bucket
and the old slots are copied in (one copy per doubling). The context limit is
``max_position_embeddings`` or the session's ``max_context`` when smaller: a turn or a reply that
would pass it raises :class:`~omni_jax.errors.InputError` naming the limit; nothing is truncated.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from . import media
from .decoder import init_cache
from .engine import SessionCache, bucket
from .errors import InputError
from .generate import generated, make_sampling
from .media.audio import frames_log_mel
from .media.image import _check_image_size
from .processor import TextStreamer, validate_messages
from .sharding import use_mesh
from .tmrope import rope_index
from .validate import check_sampling, check_seed

MIN_SLOTS = 256  # the smallest cache a session allocates
STREAM_SIZING_SECONDS = 30.0  # streamed video frames are sized as the whole-video path sizes a clip this long
OUTPUT_RATE = 24000  # Hz of the speech replies (token2wav)


@dataclass
class Reply:
    """An assistant reply of :meth:`Session.respond`: its ``text`` (as stored in the history),
    the ids generated (``token_ids``, the EOS id included when one was produced) and why it ended:
    ``"stop"`` (an EOS id), ``"length"`` (``max_new_tokens``) or ``"cancelled"``; with
    ``return_audio``, the speech's ``codec_ids`` and ``audio``."""

    text: str
    token_ids: list[int]
    finish_reason: str
    codec_ids: np.ndarray | None = None  # with return_audio: the talker's codec ids
    audio: np.ndarray | None = None  # with return_audio and token2wav weights: float32, 24 kHz

    @property
    def cancelled(self) -> bool:
        return self.finish_reason == "cancelled"


@dataclass
class _Media:
    """One media item of the conversation, in order of appearance: its kind, its feature length
    (audio frames) or grid (image), and its encoder output ``emb [n, E]`` (n placeholder tokens)."""

    kind: str
    emb: Any
    frames: int = 0
    grid: tuple | None = None
    seconds: float = 0.0  # video: video_second_per_grid (TMRoPE's time step per temporal grid)


@dataclass
class _VideoStream:
    """The video of a streamed user turn (:meth:`Session.append_video`)."""

    source: tuple  # (H, W) of the frames as captured: every frame of the turn has it
    size: tuple  # (h, w) every frame is resized to (fixed by the first frame)
    fps: float | None  # capture rate of the frames given; None: each frame is a sample already
    received: int = 0  # frames received (captured), sampled or not
    frames: list = field(default_factory=list)  # the sampled frames, [H, W, 3] uint8 at the source size
    embs: list = field(default_factory=list)  # vision encoder outputs of the complete chunks, in order
    grid_hw: tuple | None = None  # (gh, gw): a temporal grid's patch rows and columns


@dataclass
class _AudioTurn:
    """A user turn whose audio (:meth:`Session.append_audio`) and/or video frames
    (:meth:`Session.append_video`) are arriving."""

    message: dict  # the user message, its audio or video part last (filled in at the end)
    buf: np.ndarray  # float32 samples received (the first ``n`` entries)
    n: int = 0
    frames: list = field(default_factory=list)  # log10 mel frames [mels, k] (float64, unclamped), in order
    n_frames: int = 0  # frames computed (each final: its window lies inside the received audio)
    chunks: int = 0  # complete encoder chunks encoded and prefilled
    running_max: float = -np.inf  # max log10 mel over the frames of the chunks encoded so far
    embs: list = field(default_factory=list)  # encoder outputs of those chunks
    chunk_max: list = field(default_factory=list)  # the running maximum each chunk was floored with
    chunk_slot: list = field(default_factory=list)  # the cache slot of each chunk's first token
    video: _VideoStream | None = None  # the turn's video, if it has one
    pairs: int = 0  # with video: chunks prefilled (each its video tokens, then its audio tokens)
    pair_slot: list = field(default_factory=list)  # with video: the cache slot of each prefilled chunk


class Session:
    """A conversation with cache reuse. Make one with :meth:`omni_jax.OmniModel.session`.

    ``add_user`` appends a user message and prefills it; ``append_audio`` / ``end_user_turn``
    stream a spoken user turn; ``respond`` (or ``respond_stream``) generates the assistant's reply
    (text, and speech with ``return_audio=True``) and appends it to the history; ``cancel`` stops
    a reply being generated, keeping what was produced. ``messages`` is the conversation as
    ``generate(messages=...)`` takes it. ``audio_clamp`` chooses how streamed audio applies the
    feature extractor's per-utterance log-mel floor (``"running"`` or ``"exact"``, see
    docs/realtime.md); ``minimum_slots`` is the smallest cache allocated.
    """

    def __init__(self, model, *, system: str | None = None, max_context: int | None = None, seed: int = 0,
                 minimum_slots: int = MIN_SLOTS, audio_clamp: str = "running", use_audio_in_video: bool = False):
        if model.processor is None:
            raise InputError(f"{model.path}: this checkpoint has no tokenizer.json, so a session (chat messages) "
                             "cannot be used")
        limit = int(model.config.thinker.text.max_position_embeddings)
        if max_context is not None:
            if not isinstance(max_context, (int, np.integer)) or isinstance(max_context, bool) or max_context < 1:
                raise InputError(f"max_context: expected a positive int, got {max_context!r}")
            if max_context > limit:
                raise InputError(f"max_context ({max_context}) exceeds the model's max_position_embeddings ({limit})")
        check_seed(seed)
        if not isinstance(minimum_slots, (int, np.integer)) or isinstance(minimum_slots, bool) or minimum_slots < 1:
            raise InputError(f"minimum_slots: expected a positive int, got {minimum_slots!r}")
        if audio_clamp not in ("running", "exact"):
            raise InputError(f"audio_clamp: expected 'running' or 'exact', got {audio_clamp!r}")
        if not isinstance(use_audio_in_video, (bool, np.bool_)):
            raise InputError(f"use_audio_in_video: expected true or false, got {use_audio_in_video!r}")
        self.audio_clamp = audio_clamp
        self.use_audio_in_video = bool(use_audio_in_video)
        self.model = model
        self.limit = int(max_context) if max_context is not None else limit
        self.limit_name = "max_context" if max_context is not None else "max_position_embeddings"
        self.seed = int(seed)
        self.minimum_slots = int(minimum_slots)
        self.messages: list[dict] = []
        self._media: list[_Media] = []
        self._ids: list[int] = []  # token ids whose keys/values are in cache slots [0, n)
        self._pos = np.zeros((3, 0), np.int32)
        self._kv: SessionCache | None = None
        self._logits = None  # next-token logits after exactly self._ids (device [1, V]) or None
        self._open: _AudioTurn | None = None
        self._cancel = False
        self._pending: PendingReply | None = None  # a reply begun and not yet finished (it holds the cache)
        self.last_reply: Reply | None = None
        self.prefilled_tokens = 0  # tokens run through the thinker by prefills (not decode steps), in all
        tc = model.config.thinker
        self._tc = tc
        self._acfg, self._vcfg = media.processor_configs(model.path)
        self._chunk_frames = 2 * tc.audio.n_window  # the audio encoder's attention window, in frames
        self._extend_jit, self._begin_jit = model.program("thinker_extend"), model.program("thinker_begin")
        self._decode_jit, self._embed_jit = model.program("thinker_decode"), model.program("embed_tokens")
        # with a talker, every cached token's post-norm hidden state and input embedding (media
        # positions zeroed) are kept beside the cache, slot by slot: the talker's prompt for a spoken reply
        self._speech = model.talker is not None and bool(model.voices)
        self._hid = self._emb = None  # [1, slots, E] each, or None
        if system is not None:
            if not isinstance(system, str):
                raise InputError(f"system: expected a string, got {type(system).__name__}")
            self.messages.append({"role": "system", "content": system})
            ids, pos = self._render(self.messages, add_generation_prompt=False)
            self._sync(ids, pos, need_logits=False)

    # ------------------------------------------------------------------------------------
    # the conversation

    @property
    def cached_ids(self) -> np.ndarray:
        """The token ids whose keys and values the cache holds, slot by slot (int32 ``[n]``)."""
        return np.asarray(self._ids, np.int32)

    @property
    def cache_slots(self) -> int:
        """Slots of the KV cache as now allocated (0 before the first prefill)."""
        return 0 if self._kv is None else int(self._kv.cache["k"][0].shape[1])

    def rendered(self, add_generation_prompt: bool = False) -> str:
        """The conversation as the chat template renders it (media placeholders not expanded)."""
        return self.model.processor.apply_chat_template(self.messages, add_generation_prompt=add_generation_prompt)

    def add_user(self, text: str | None = None, *, audio=None, sampling_rate: int | None = None, image=None,
                 content: list | None = None) -> None:
        """Append a user message and prefill it (with the generation prompt) into the cache.

        Either ``content`` (a string or a list of typed parts, as in ``messages``), or any of
        ``text``, ``audio`` (a path or an array, with ``sampling_rate`` for arrays) and ``image``
        (a path, PIL image or HWC uint8 array), laid out as parts in the order audio, image, text.
        ``content`` may hold video parts (``{"type": "video", "video": path or [T, H, W, 3] uint8 array,
        "fps": ...}``), sampled as ``generate(messages=...)`` samples them; with the session's
        ``use_audio_in_video`` each video's audio track (or, for an array, the part's ``audio``) is
        encoded too and interleaved with its frames per 2 s chunk. The media are read and encoded here."""
        if self._open is not None:
            raise InputError("add_user: a streamed audio turn is open; call end_user_turn() first")
        if content is None:
            parts = []
            if audio is not None:
                parts.append({"type": "audio", "audio": audio, "sampling_rate": sampling_rate})
            if image is not None:
                parts.append({"type": "image", "image": image})
            if text is not None:
                parts.append({"type": "text", "text": text})
            if not parts:
                raise InputError("add_user: give text, audio, image or content")
            content = parts if (audio is not None or image is not None) else text
        elif text is not None or audio is not None or image is not None:
            raise InputError("add_user: pass either content or text/audio/image, not both")
        message = {"role": "user", "content": content}
        validate_messages([message])
        items = self._encode_media(message)
        self._append_and_sync(message, items)

    def _append_and_sync(self, message: dict, items: list) -> None:
        """Append ``message`` (whose media ``items`` are encoded) and prefill the conversation with
        the generation prompt; on an error (the context limit) the history is left as it was."""
        self.messages.append(message)
        self._media.extend(items)
        try:
            ids, pos = self._render(self.messages, add_generation_prompt=True)
            self._sync(ids, pos, need_logits=True)
        except Exception:
            self.messages.pop()
            del self._media[len(self._media) - len(items):]
            raise

    def _encode_media(self, message: dict) -> list[_Media]:
        """Read and encode the media parts of ``message`` (one :class:`_Media` per part, in order)."""
        model, tc = self.model, self._tc
        content = message["content"]
        out = []
        if isinstance(content, str):
            return out
        for j, part in enumerate(content):
            kind = part["type"]
            where = f"content[{j}]"
            if kind == "audio":
                if model.audio is None:
                    raise InputError(f"{where}: {model.path} has no audio encoder (thinker.audio_tower)")
                if part.get("audio") is None:
                    raise InputError(f"{where}: an audio part needs 'audio' (a path or an array)")
                wav = media.load_audio(part["audio"], part.get("sampling_rate"))
                feats, length = media.log_mel(wav, self._acfg, pad=False, name=where)
                out.append(_Media("audio", self._encode_audio(feats, length), frames=length))
            elif kind == "image":
                if model.vision is None:
                    raise InputError(f"{where}: {model.path} has no vision encoder (thinker.visual)")
                if part.get("image") is None:
                    raise InputError(f"{where}: an image part needs 'image' (a path, PIL image or array)")
                from .vision import encode_vision

                px = media.image_inputs([media.load_image(part["image"])], self._vcfg)
                grid = np.asarray(px["image_grid_thw"])
                emb = encode_vision(model.vision, tc.vision, np.asarray(px["pixel_values"]), grid, model.attention,
                                    mesh=model.mesh)
                out.append(_Media("image", jnp.asarray(emb, model.dtype), grid=tuple(int(g) for g in grid[0])))
            elif kind == "video":
                if model.vision is None:
                    raise InputError(f"{where}: {model.path} has no vision encoder (thinker.visual)")
                if part.get("video") is None:
                    raise InputError(f"{where}: a video part needs 'video' (a path or a [T, H, W, 3] uint8 array)")
                from .vision import encode_vision

                aiv = self.use_audio_in_video
                v = media.load_video(part["video"], part.get("fps"), cfg=self._vcfg,
                                     load_audio=aiv and not hasattr(part["video"], "shape"))
                track = v.audio
                if aiv and track is None and part.get("audio") is not None:  # an array's audio, given beside it
                    track = media.load_audio(part["audio"], part.get("sampling_rate"))
                if aiv and track is None:
                    raise InputError(f"{where}: use_audio_in_video, but the video has no audio track")
                px = media.video_inputs([v], self._vcfg, fps=v.sample_fps)
                grid = np.asarray(px["video_grid_thw"])
                emb = jnp.asarray(encode_vision(model.vision, tc.vision, np.asarray(px["pixel_values_videos"]), grid,
                                                model.attention, mesh=model.mesh), model.dtype)
                g, sec = tuple(int(x) for x in grid[0]), float(px["video_second_per_grid"][0])
                frames = 0
                if aiv:
                    if model.audio is None:
                        raise InputError(f"{where}: {model.path} has no audio encoder (thinker.audio_tower)")
                    feats, frames = media.log_mel(track, self._acfg, pad=False, name=where)
                    emb = self._interleave(emb, self._encode_audio(feats, frames), g, sec, frames)
                out.append(_Media("video", emb, frames=frames, grid=g, seconds=sec))
        return out

    def _interleave(self, video, audio, grid, seconds, frames):
        """A video's and its audio track's encoder outputs in the order of their placeholder tokens with
        ``use_audio_in_video`` (per 2 s chunk: the chunk's video tokens, then its audio tokens)."""
        tc = self._tc
        run = media.video_with_audio_placeholder(grid, seconds, frames, merge_size=tc.vision.spatial_merge_size,
                                                 position_id_per_seconds=tc.position_id_per_seconds,
                                                 seconds_per_chunk=tc.seconds_per_chunk)
        kinds = []  # True for a video token, in order
        i = 0
        while i < len(run):
            if run.startswith(media.VIDEO_TOKEN, i):
                kinds.append(True)
                i += len(media.VIDEO_TOKEN)
            elif run.startswith(media.AUDIO_TOKEN, i):
                kinds.append(False)
                i += len(media.AUDIO_TOKEN)
            else:
                i += 1  # the brackets
        kinds = np.asarray(kinds)
        if kinds.sum() != video.shape[0] or (~kinds).sum() != audio.shape[0]:
            raise AssertionError("use_audio_in_video: placeholder counts differ from the encoder outputs")
        order = np.empty(len(kinds), np.int64)
        order[kinds] = np.arange(video.shape[0])
        order[~kinds] = video.shape[0] + np.arange(audio.shape[0])
        return jnp.concatenate([video, audio.astype(video.dtype)], axis=0)[order]

    def _audio_seqlens(self, items) -> list:
        """Feature lengths of every audio the conversation holds, standalone or a video's track (with
        ``use_audio_in_video``), in order of appearance: TMRoPE's and the talker's audio list."""
        return [m.frames for m in items if m.kind == "audio" or (m.kind == "video" and self.use_audio_in_video)]

    def _encode_audio(self, feats: np.ndarray, length: int):
        """Encoder output ``[tokens, E]`` of one audio's features ``[mels, length]``."""
        from .audio import encode_audio

        model = self.model
        emb = encode_audio(model.audio, self._tc.audio, feats[:, :length], np.asarray([length]), model.attention,
                           mesh=model.mesh)
        return jnp.asarray(emb, model.dtype)

    # ------------------------------------------------------------------------------------
    # rendering and prefilling

    def _render(self, messages: list, add_generation_prompt: bool, items: list | None = None):
        """Token ids (list) and TMRoPE positions ``[3, T]`` of ``messages``, as ``encode_messages``
        lays them out (the same template, placeholder expansion and tokenizer)."""
        proc, tc = self.model.processor, self._tc
        items = self._media if items is None else items
        text = proc.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        frames = [m.frames for m in items if m.kind == "audio"]
        grids = [m.grid for m in items if m.kind == "image"]
        vgrids = [m.grid for m in items if m.kind == "video"]
        vsec = [m.seconds for m in items if m.kind == "video"]
        aiv = self.use_audio_in_video
        expanded = media.expand_placeholders(text, audio_lengths=frames, image_grids=grids, video_grids=vgrids,
                                             video_seconds=vsec, use_audio_in_video=aiv,
                                             video_audio_lengths=[m.frames for m in items if m.kind == "video"]
                                             if aiv else None, merge_size=tc.vision.spatial_merge_size,
                                             position_id_per_seconds=tc.position_id_per_seconds,
                                             seconds_per_chunk=tc.seconds_per_chunk)
        ids = proc.encode(expanded)
        seqlens = self._audio_seqlens(items)
        pos = rope_index(tc, np.asarray(ids, np.int64)[None], None,
                         image_grid_thw=np.asarray(grids) if grids else None,
                         video_grid_thw=np.asarray(vgrids) if vgrids else None,
                         second_per_grids=np.asarray(vsec, np.float64) if vgrids else None,
                         audio_seqlens=np.asarray(seqlens) if seqlens else None,
                         use_audio_in_video=aiv and bool(vgrids))[:, 0]
        return ids, pos

    def _check_limit(self, n: int, what: str) -> None:
        if n > self.limit:
            raise InputError(f"{what} needs {n} tokens of context, more than the session's context limit "
                             f"{self.limit_name} ({self.limit})")

    def _check_idle(self) -> None:
        if self._pending is not None:
            raise InputError("the session is generating a reply (its cache is in use until the reply ends or is "
                             "cancelled)")

    def _sync(self, ids: list, pos: np.ndarray, *, need_logits: bool) -> None:
        """Make the cache hold ``ids`` (with positions ``pos``): prefill what follows the longest
        common prefix with the cached ids and positions. With ``need_logits`` the next-token logits
        after ``ids`` are computed (re-running the last token when nothing else is new)."""
        self._check_idle()
        n = len(ids)
        self._check_limit(n + (1 if need_logits else 0), "the conversation")
        old = self._ids
        p = 0
        m = min(len(old), n)
        if m:
            same = (np.asarray(old[:m]) == np.asarray(ids[:m])) & np.all(self._pos[:, :m] == pos[:, :m], axis=0)
            p = m if same.all() else int(np.argmin(same))
        if p == n and len(old) == n and (self._logits is not None or not need_logits):
            return
        if p == n and need_logits:
            p = n - 1  # everything is cached, but not the logits after it: feed the last token again
        if p == n:  # a prefix of the cached ids: drop the rest
            self._ids, self._pos, self._logits = list(ids), np.asarray(pos, np.int32), None
            return
        self._prefill(ids[p:], pos[:, p:], p, self._media_rows(ids, p, n))
        self._ids, self._pos = list(ids), np.asarray(pos, np.int32)

    def _media_rows(self, ids: list, a: int, b: int):
        """The media embeddings of slots ``[a, b)`` of ``ids``: ``(rows [M, E], index [M])`` with
        indices relative to ``a``; each media item's placeholder run is found in order."""
        tc = self._tc
        arr = np.asarray(ids)
        ph = np.isin(arr, [tc.audio_token_id, tc.image_token_id, tc.video_token_id])
        starts = np.flatnonzero(ph & ~np.concatenate([[False], ph[:-1]]))
        if len(starts) != len(self._media):
            raise InputError(f"the conversation has {len(starts)} media placeholder runs for {len(self._media)} "
                             "media items (placeholder tokens in the text?)")
        rows, idx = [], []
        for item, s in zip(self._media, starts.tolist()):
            k = int(item.emb.shape[0])
            lo, hi = max(a, s), min(b, s + k)
            if lo < hi:
                rows.append(item.emb[lo - s:hi - s])
                idx.append(np.arange(lo, hi) - a)
        if not rows:
            return None
        return jnp.concatenate(rows, axis=0), np.concatenate(idx)

    def _ensure_slots(self, needed: int) -> None:
        """Allocate the cache, or grow it to ``bucket(needed)`` slots (copying the old ones in)."""
        self._check_idle()
        have = self.cache_slots
        if have >= needed:
            return
        model = self.model
        slots = bucket(needed, self.minimum_slots)
        e = self._tc.text.hidden_size
        if self._kv is None:
            t = self._tc.text
            from .thinker import decoder_shape

            cache = init_cache(decoder_shape(t), 1, slots, model.dtype)
            if self._speech:
                self._hid = self._emb = jnp.zeros((1, slots, e), model.dtype)
        else:
            def grow(c):
                ax = c.ndim - 3  # [.., B, S, KVH, D]
                return jnp.pad(c, [(0, 0)] * ax + [(0, slots - have), (0, 0), (0, 0)])

            cache = jax.tree.map(grow, self._kv.cache)
            if self._speech:
                self._hid, self._emb = (jnp.pad(x, [(0, 0), (0, slots - have), (0, 0)]) for x in (self._hid, self._emb))
        self._kv = SessionCache(cache)

    def _prefill(self, ids: list, pos: np.ndarray, start: int, mm) -> None:
        """Prefill ``ids`` (positions ``pos [3, T]``; media rows ``mm``) at slot ``start``; keeps the
        logits after the last one."""
        model = self.model
        t = len(ids)
        tb = bucket(t)
        self._ensure_slots(start + tb)  # the padded tail is written too
        ids_b = np.zeros((1, tb), np.int32)
        ids_b[0, :t] = ids
        pos_b = np.empty((3, 1, tb), np.int32)
        pos_b[:, 0, :t] = pos
        pos_b[:, 0, t:] = pos[:, -1:] + 1 + np.arange(tb - t)[None]
        e = self._tc.text.hidden_size
        if mm is None:
            mm_embeds, mm_idx = jnp.zeros((0, e), model.dtype), np.zeros((0,), np.int32)
        else:
            rows, idx = mm
            mb = bucket(len(idx))
            mm_idx = np.full((mb,), tb, np.int32)  # padding entries point past the end: dropped
            mm_idx[:len(idx)] = idx
            mm_embeds = jnp.concatenate([rows.astype(model.dtype), jnp.zeros((mb - len(idx), e), model.dtype)])
        kv, self._kv = self._kv, None  # donated
        self.prefilled_tokens += t
        with use_mesh(model.mesh):
            self._kv, self._logits, extra = self._extend_jit(model.params, kv, ids_b, pos_b, mm_embeds, mm_idx,
                                                             np.int32(start), np.int32(t - 1), self._speech)
        if extra is not None:
            self._keep_talker_inputs(start, extra[0], extra[1], t)

    def _keep_talker_inputs(self, start: int, hid, emb, count: int) -> None:
        """Store the first ``count`` hidden states and embeddings of ``hid``/``emb`` (``[1, W, E]``, ``W``
        a bucket) at slots ``[start, start + count)`` (one program per bucket shape, not per length)."""
        self._hid = _write_slots(self._hid, hid, np.int32(start), np.int32(count))
        self._emb = _write_slots(self._emb, emb, np.int32(start), np.int32(count))

    def next_token_logits(self) -> np.ndarray:
        """float32 ``[V]``: the thinker's logits for the assistant's first reply token, given the
        conversation so far (what :meth:`respond` starts from)."""
        if self._open is not None:
            self.end_user_turn()
        ids, pos = self._render(self.messages, add_generation_prompt=True)
        self._sync(ids, pos, need_logits=True)
        return np.asarray(self._logits[0], np.float32)

    # ------------------------------------------------------------------------------------
    # streamed audio

    def append_audio(self, samples, sampling_rate: int = 16000, *, text: str | None = None) -> None:
        """Add samples of the user's speech (mono, any chunking) to the open user turn, opening one if
        none is open (``text``: a text part placed before the audio in that turn). Each complete
        chunk of the audio encoder (``2 * n_window`` feature frames, 2 s) is encoded and prefilled
        as soon as its frames are final; :meth:`end_user_turn` does the rest."""
        rate = self._acfg.sampling_rate
        if sampling_rate != rate:
            raise InputError(f"append_audio: sampling_rate {sampling_rate}: streamed audio must be at {rate} Hz "
                             "(resample it first; chunks resampled one by one do not join exactly)")
        x = np.asarray(samples)
        if x.ndim != 1:
            raise InputError(f"append_audio: expected a 1-D mono waveform, got shape {x.shape}")
        if np.issubdtype(x.dtype, np.integer):
            x = x.astype(np.float32) / float(np.iinfo(x.dtype).max + 1)
        elif not np.issubdtype(x.dtype, np.floating):
            raise InputError(f"append_audio: expected a numeric array, got dtype {x.dtype}")
        x = x.astype(np.float32)
        if not np.all(np.isfinite(x)):
            raise InputError("append_audio: the audio contains NaN or infinite samples")
        if self._open is None:
            self._begin_audio_turn(text)
        elif text is not None:
            raise InputError("append_audio: text is given only with the first samples of a turn")
        elif self._open.video is not None and not self.use_audio_in_video:
            raise InputError("append_audio: the open turn streams video; a streamed turn holds audio and video "
                             "together only in a session made with use_audio_in_video=True")
        turn = self._open
        cap = self._acfg.n_samples - self._acfg.n_fft
        if turn.n + len(x) > cap:
            raise InputError(f"append_audio: the turn's audio passes {cap / rate:.2f} s, the longest the audio "
                             f"feature extractor takes in one piece (chunk_length {self._acfg.chunk_length} s)")
        if turn.n + len(x) > len(turn.buf):
            grown = np.zeros(max(2 * len(turn.buf), turn.n + len(x)), np.float32)
            grown[:turn.n] = turn.buf[:turn.n]
            turn.buf = grown
        turn.buf[turn.n:turn.n + len(x)] = x
        turn.n += len(x)
        hop, half = self._acfg.hop_length, self._acfg.n_fft // 2
        # frame f reads samples [f * hop - half, f * hop + half): final once they have all arrived
        final = (turn.n - half - 1) // hop + 1 if turn.n > half else 0
        final = min(final, self._acfg.nb_max_frames)
        if final > turn.n_frames:
            turn.frames.append(self._log_mel(turn, turn.n_frames, final))
            turn.n_frames = final
        w = self._chunk_frames
        while (turn.chunks + 1) * w <= turn.n_frames:
            self._stream_chunk(turn)

    def _begin_audio_turn(self, text: str | None) -> None:
        parts = [] if text is None else [{"type": "text", "text": text}]
        message = {"role": "user", "content": parts + [{"type": "audio", "audio": None, "sampling_rate": None}]}
        validate_messages([message])
        # the conversation with this turn, its audio given any length: the ids before its first
        # placeholder (up to and including <|audio_bos|>) do not depend on that length
        probe = _Media("audio", None, frames=self._chunk_frames)
        ids, pos = self._render(self.messages + [message], False, items=self._media + [probe])
        first = int(np.flatnonzero(np.asarray(ids) == self._tc.audio_token_id)[-media.audio_token_count(
            self._chunk_frames)])
        self._sync(ids[:first], pos[:, :first], need_logits=False)
        self._logits = None
        self._open = _AudioTurn(message=message, buf=np.zeros(self._acfg.sampling_rate * 4, np.float32))

    def _log_mel(self, turn: _AudioTurn, f0: int, f1: int) -> np.ndarray:
        """log10 mel power ``[mels, f1 - f0]`` (float64, before the clamp) of frames ``[f0, f1)`` of the
        turn's audio, computed as the whole-utterance feature extractor computes them: a centred
        STFT (reflected at the start; zeros after the audio's end, which only the final frames of a
        finished turn read), periodic Hann window, power, Slaney mel filters, ``log10`` with a 1e-10
        floor. A frame depends only on the samples its window covers, so frames computed as audio
        arrives equal those of the whole utterance."""
        cfg = self._acfg
        n_fft, hop, half = cfg.n_fft, cfg.hop_length, cfg.n_fft // 2
        x = turn.buf[:turn.n].astype(np.float64)
        j = np.arange(f0 * hop, (f1 - 1) * hop + n_fft)  # indices into the padded signal
        src = np.where(j < half, half - j, j - half)  # reflect at the start, then the audio itself
        sig = np.where(src < turn.n, x[np.minimum(src, turn.n - 1)], cfg.padding_value)
        frames = np.lib.stride_tricks.sliding_window_view(sig, n_fft)[::hop][:f1 - f0]
        return frames_log_mel(frames, cfg).T

    def _features(self, turn: _AudioTurn, f0: int, f1: int, floor_max: float) -> np.ndarray:
        """float32 features ``[mels, f1 - f0]``: the log-mel frames floored at ``floor_max - 8``, then
        ``(x + 4) / 4``, the feature extractor's normalisation."""
        spec = np.concatenate(turn.frames, axis=1)[:, f0:f1] if len(turn.frames) > 1 else turn.frames[0][:, f0:f1]
        return ((np.maximum(spec, floor_max - 8.0) + 4.0) / 4.0).astype(np.float32)

    def _stream_chunk(self, turn: _AudioTurn) -> None:
        """Encode complete chunk ``turn.chunks`` (its frames floored with the running maximum over the
        chunks so far) and prefill its placeholder tokens after the cached ones."""
        if len(turn.frames) > 1:
            turn.frames = [np.concatenate(turn.frames, axis=1)]
        w = self._chunk_frames
        f0 = turn.chunks * w
        turn.running_max = max(turn.running_max, float(turn.frames[0][:, f0:f0 + w].max()))
        emb = self._encode_audio(self._features(turn, f0, f0 + w, turn.running_max), w)
        if turn.video is not None:  # prefilled with the chunk's frames, video tokens first
            turn.embs.append(emb)
            turn.chunk_max.append(turn.running_max)
            turn.chunks += 1
            self._prefill_video_chunks(turn)
            return
        k = int(emb.shape[0])
        start = len(self._ids)
        self._check_limit(start + k, "the streamed audio turn")
        pos = self._pos[:, -1:] + 1 + np.arange(k)[None]  # audio positions are text-like: one per token
        self._prefill([self._tc.audio_token_id] * k, pos, start, (emb, np.arange(k)))
        self._ids += [self._tc.audio_token_id] * k
        self._pos = np.concatenate([self._pos, pos.astype(np.int32)], axis=1)
        self._logits = None
        turn.embs.append(emb)
        turn.chunk_max.append(turn.running_max)
        turn.chunk_slot.append(start)
        turn.chunks += 1

    def end_user_turn(self) -> None:
        """Close the streamed user turn: compute its last frames (the audio's end is now known),
        encode what follows the chunks already prefilled, floored with the whole turn's maximum,
        append the message to the history and prefill the rest of the turn and the generation
        prompt."""
        turn = self._open
        if turn is None:
            raise InputError("end_user_turn: no streamed user turn is open (call append_audio or append_video first)")
        if turn.video is not None:
            return self._end_video_turn(turn)
        if turn.n == 0:
            raise InputError("end_user_turn: the turn's audio is empty")
        length, emb = self._finish_audio(turn, turn.chunk_slot)
        message = turn.message
        message["content"][-1] = {"type": "audio", "audio": turn.buf[:turn.n].copy(),
                                  "sampling_rate": self._acfg.sampling_rate}
        self._open = None
        self._append_and_sync(message, [_Media("audio", emb, frames=length)])

    def _finish_audio(self, turn: _AudioTurn, slots: list):
        """The turn's audio, now that its end is known: ``(feature length, encoder output)``. Computes
        the last frames, encodes what follows the chunks already encoded, floored with the whole
        turn's maximum; with ``audio_clamp="exact"`` the chunks whose features that floor changes are
        encoded again and the cache is cut back to ``slots[k]``, the first such chunk's slot (``slots``
        lists the prefilled chunks' first slots), so the end of the turn prefills them again."""
        cfg = self._acfg
        hop, half = cfg.hop_length, cfg.n_fft // 2
        length = min(-(-turn.n // hop), cfg.nb_max_frames)
        live = min(cfg.nb_max_frames, (turn.n + half) // hop + 2)  # frames that read any sample
        if live > turn.n_frames:
            turn.frames.append(self._log_mel(turn, turn.n_frames, live))
            turn.n_frames = live
        if len(turn.frames) > 1:
            turn.frames = [np.concatenate(turn.frames, axis=1)]
        whole_max = float(turn.frames[0].max())  # frames past `live` are exactly -10, never above
        w = self._chunk_frames
        redo = turn.chunks
        if self.audio_clamp == "exact":
            # the first chunk whose features the whole turn's floor changes: a value below
            # whole_max - 8 that the chunk's own (lower) running floor let through
            for k in range(turn.chunks):
                if turn.chunk_max[k] < whole_max and (turn.frames[0][:, k * w:(k + 1) * w] < whole_max - 8.0).any():
                    redo = k
                    break
            if redo < len(slots):  # forget the chunks from there on: prefilled again at the end
                slot = slots[redo]
                self._ids, self._pos, self._logits = self._ids[:slot], self._pos[:, :slot], None
        f0 = redo * w
        embs = list(turn.embs[:redo])
        if length > f0:
            embs.append(self._encode_audio(self._features(turn, f0, length, whole_max), length - f0))
        e = self._tc.text.hidden_size
        emb = jnp.concatenate(embs, axis=0) if embs else jnp.zeros((0, e), self.model.dtype)
        expect = media.audio_token_count(length)
        if emb.shape[0] != expect:
            raise AssertionError(f"streamed audio: {emb.shape[0]} embeddings for {expect} tokens")
        return length, emb

    # ------------------------------------------------------------------------------------
    # streamed video

    def append_video(self, frames, fps: float | None = None, *, text: str | None = None) -> None:
        """Add captured video frames (``[T, H, W, 3]`` uint8, or one ``[H, W, 3]`` frame) to the open
        user turn, opening one if none is open (``text``: a text part placed before the video).

        Frames are sampled at the processor's rate (2 fps): with ``fps`` (the capture rate, at
        least 2) the first frame at or after each half second of the turn is kept; without it every
        frame given is taken as the next sample. The turn's first frame fixes the frame size (the
        size the whole-video path gives a 30 s clip; every later frame must have the first one's
        source size). Each complete 2 s chunk of samples (two temporal patches) is encoded and
        prefilled as soon as it exists; in a session made with ``use_audio_in_video=True`` the turn's
        audio (:meth:`append_audio`) is the video's track: a chunk is prefilled once both its frames
        and its audio are in, its video tokens before its audio tokens, with time-aligned TMRoPE
        positions, as ``generate(use_audio_in_video=True)`` lays out a whole video. The video starts
        with the turn: its first sample is at the audio's first sample. See docs/realtime.md."""
        if self.model.vision is None:
            raise InputError(f"append_video: {self.model.path} has no vision encoder (thinker.visual)")
        x = np.asarray(frames)
        if x.ndim == 3:
            x = x[None]
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise InputError(f"append_video: expected uint8 frames of shape (T, H, W, 3) or (H, W, 3), got "
                             f"{x.dtype} {np.shape(frames)}")
        if x.shape[0] == 0:
            raise InputError("append_video: no frames given")
        vcfg = self._vcfg.for_video()
        rate = float(vcfg.fps)
        if fps is not None:
            if isinstance(fps, bool) or not isinstance(fps, (int, float, np.integer, np.floating)) \
                    or not np.isfinite(fps) or fps < rate:
                raise InputError(f"append_video: fps (the capture rate) must be a number >= {rate:g}, the rate "
                                 f"frames are sampled at, got {fps!r}")
            fps = float(fps)
        turn = self._open
        if turn is not None and text is not None:
            raise InputError("append_video: text is given only with the first frames of a turn")
        if turn is not None and turn.video is None and not self.use_audio_in_video:
            raise InputError("append_video: the open turn streams audio; a streamed turn holds audio and video "
                             "together only in a session made with use_audio_in_video=True")
        if turn is not None and turn.video is not None:
            v = turn.video
            if x.shape[1:3] != v.source:
                raise InputError(f"append_video: frames of {x.shape[1]}x{x.shape[2]} pixels, but this turn's video is "
                                 f"{v.source[0]}x{v.source[1]} (the frame size cannot change within a video)")
            if (fps is None) != (v.fps is None) or (fps is not None and fps != v.fps):
                raise InputError(f"append_video: fps {fps!r}, but this turn's frames came with fps {v.fps!r}")
        _check_image_size(x.shape[1], x.shape[2], "append_video")
        if turn is None or turn.video is None:
            size = media.video_frame_size(x.shape[1], x.shape[2], int(round(STREAM_SIZING_SECONDS * rate)), vcfg,
                                          name="append_video")
            video = _VideoStream(source=tuple(x.shape[1:3]), size=size, fps=fps)
            if turn is None:
                turn = self._begin_stream_turn(text, video)
            else:  # an audio turn gains its video: re-laid out as a video with its audio track
                turn.video = video
                turn.message["content"][-1] = {"type": "video", "video": None}
                self._sync_turn_prefix(turn)
        v = turn.video
        for frame in x:
            t = v.received / v.fps if v.fps is not None else None
            v.received += 1
            if t is not None and t < len(v.frames) / rate - 1e-9:
                continue  # not the first frame at or after the next sample time
            if len(v.frames) >= vcfg.max_frames:
                raise InputError(f"append_video: the turn's video passes {vcfg.max_frames} frames "
                                 f"({vcfg.max_frames / rate:g} s at {rate:g} fps), the most a video takes")
            v.frames.append(np.ascontiguousarray(frame))
        per = self._video_chunk_frames
        while (len(v.embs) + 1) * per <= len(v.frames):
            k = len(v.embs)
            emb, grid = self._encode_frames(np.stack(v.frames[k * per:(k + 1) * per]), v.size)
            v.embs.append(emb)
            v.grid_hw = grid[1:]
        self._prefill_video_chunks(turn)

    def _begin_stream_turn(self, text: str | None, video: _VideoStream) -> _AudioTurn:
        parts = [] if text is None else [{"type": "text", "text": text}]
        message = {"role": "user", "content": parts + [{"type": "video", "video": None}]}
        validate_messages([message])
        turn = _AudioTurn(message=message, buf=np.zeros(self._acfg.sampling_rate * 4, np.float32), video=video)
        self._sync_turn_prefix(turn)
        self._open = turn
        return turn

    def _sync_turn_prefix(self, turn: _AudioTurn) -> None:
        """Prefill the conversation up to the streamed video's first placeholder (``<|vision_bos|>``,
        and ``<|audio_bos|>`` with ``use_audio_in_video``): those ids do not depend on its length."""
        probe = self._video_probe(turn, 1)
        ids, pos = self._render(self.messages + [turn.message], False, items=self._media + [probe])
        count = self._probe_tokens(probe)
        first = int(np.flatnonzero(np.isin(ids, [self._tc.audio_token_id, self._tc.video_token_id]))[-count])
        self._sync(ids[:first], pos[:, :first], need_logits=False)
        self._logits = None
        turn.pairs, turn.pair_slot = 0, []

    @property
    def _video_chunk_frames(self) -> int:
        """Sampled frames per encoder chunk: ``seconds_per_chunk`` at the sampling rate (4: two
        temporal patches of 2 frames in 2 s at 2 fps)."""
        vcfg = self._vcfg.for_video()
        per = int(round(self._tc.seconds_per_chunk * vcfg.fps))
        return max(vcfg.temporal_patch_size, per - per % vcfg.temporal_patch_size)

    def _video_probe(self, turn: _AudioTurn, chunks: int) -> _Media:
        """A stand-in for the turn's video of ``chunks`` complete chunks (its audio too, with
        ``use_audio_in_video``), for rendering ids and positions (no embeddings)."""
        vcfg = self._vcfg.for_video()
        gh, gw = turn.video.grid_hw or (turn.video.size[0] // vcfg.patch_size, turn.video.size[1] // vcfg.patch_size)
        grid_t = chunks * self._video_chunk_frames // vcfg.temporal_patch_size
        frames = chunks * self._chunk_frames if self.use_audio_in_video else 0
        return _Media("video", None, frames=frames, grid=(grid_t, gh, gw),
                      seconds=vcfg.temporal_patch_size / float(vcfg.fps))

    def _probe_tokens(self, probe: _Media) -> int:
        t, gh, gw = probe.grid
        m = self._tc.vision.spatial_merge_size
        audio = media.audio_token_count(probe.frames) if self.use_audio_in_video and probe.frames else 0
        return t * (gh // m) * (gw // m) + audio

    def _encode_frames(self, frames: np.ndarray, size: tuple):
        """Vision encoder output ``[tokens, E]`` and grid ``(t, gh, gw)`` of sampled frames, resized
        and normalised as the video processor does (an odd count padded by repeating the last)."""
        from .vision import encode_vision

        vcfg = self._vcfg.for_video()
        pv, grid = media.patchify(media.normalize_video(media.resize_frames(frames, *size), vcfg), vcfg)
        model = self.model
        emb = encode_vision(model.vision, self._tc.vision, pv, np.asarray([grid], np.int64), model.attention,
                            mesh=model.mesh)
        return jnp.asarray(emb, model.dtype), tuple(int(g) for g in grid)

    def _prefill_video_chunks(self, turn: _AudioTurn) -> None:
        """Prefill every chunk of the streamed video whose frames (and, with ``use_audio_in_video``,
        audio) are encoded: the chunk's placeholders and positions are those of the whole turn,
        taken from a render of the conversation with the turn's video cut after that chunk."""
        v, tc = turn.video, self._tc
        while turn.pairs < len(v.embs) and (not self.use_audio_in_video or turn.pairs < len(turn.embs)):
            j = turn.pairs
            probe = self._video_probe(turn, j + 1)
            ids, pos = self._render(self.messages + [turn.message], False, items=self._media + [probe])
            cut = int(np.flatnonzero(np.isin(ids, [tc.audio_token_id, tc.video_token_id]))[-1]) + 1
            p = len(self._ids)
            if ids[:p] != self._ids or not np.array_equal(pos[:, :p], self._pos):
                raise AssertionError("streamed video: the cached prefix differs from the turn's rendering")
            rows = [v.embs[j]] + ([turn.embs[j]] if self.use_audio_in_video else [])
            rows = jnp.concatenate([r.astype(self.model.dtype) for r in rows], axis=0)
            new = ids[p:cut]
            if len(new) != rows.shape[0]:
                raise AssertionError(f"streamed video: chunk {j} has {rows.shape[0]} embeddings for {len(new)} tokens")
            self._check_limit(cut, "the streamed video turn")
            self._prefill(new, pos[:, p:cut], p, (rows, np.arange(len(new))))
            self._ids += new
            self._pos = np.concatenate([self._pos, np.asarray(pos[:, p:cut], np.int32)], axis=1)
            self._logits = None
            turn.pair_slot.append(p)
            turn.pairs += 1

    def _end_video_turn(self, turn: _AudioTurn) -> None:
        """``end_user_turn`` for a turn with video: encode the frames after the last complete chunk
        (an odd count padded by repeating the last frame, as the processor pads) and, with
        ``use_audio_in_video``, the audio's end; append the message (its video part holds the sampled
        frames at 2 fps, and their audio) and prefill the rest of the turn and the generation prompt."""
        v, vcfg = turn.video, self._vcfg.for_video()
        aiv = self.use_audio_in_video
        if aiv and turn.n == 0:
            raise InputError("end_user_turn: the turn has video but no audio, and the session uses "
                             "use_audio_in_video (append the audio, or discard_user_turn())")
        tp = vcfg.temporal_patch_size
        frames = list(v.frames)
        if len(frames) % tp:
            frames += [frames[-1]] * (tp - len(frames) % tp)
        done = len(v.embs) * self._video_chunk_frames
        embs = list(v.embs)
        if len(frames) > done:
            emb, grid = self._encode_frames(np.stack(frames[done:]), v.size)
            embs.append(emb)
            v.grid_hw = grid[1:]
        video = jnp.concatenate(embs, axis=0)
        grid = (len(frames) // tp, *v.grid_hw)
        seconds = tp / float(vcfg.fps)
        part = {"type": "video", "video": np.stack(frames), "fps": float(vcfg.fps)}
        length = 0
        if aiv:
            length, audio = self._finish_audio(turn, turn.pair_slot)
            video = self._interleave(video, audio, grid, seconds, length)
            part.update(audio=turn.buf[:turn.n].copy(), sampling_rate=self._acfg.sampling_rate)
        message = turn.message
        message["content"][-1] = part
        self._open = None
        self._append_and_sync(message, [_Media("video", video, frames=length, grid=grid, seconds=seconds)])

    def discard_user_turn(self) -> None:
        """Drop the open streamed user turn (a false start, or audio past the context limit): nothing
        of it joins the history, and the cache entries it prefilled are rewritten by the next turn."""
        if self._open is None:
            raise InputError("discard_user_turn: no streamed user turn is open")
        self._open = None
        self._logits = None

    # ------------------------------------------------------------------------------------
    # replies

    def set_system(self, text: str | None) -> None:
        """Replace the system message (None removes it). The next prefill starts where the rendered
        conversation changes (at its start), so later turns see the new instructions; the history is
        kept."""
        if text is not None and not isinstance(text, str):
            raise InputError(f"system: expected a string, got {type(text).__name__}")
        if self.messages and self.messages[0]["role"] == "system":
            self.messages.pop(0)
        if text is not None:
            self.messages.insert(0, {"role": "system", "content": text})
        self._logits = None

    def truncate_reply(self, played_seconds: float) -> str:
        """Keep, of the last (spoken) reply, only what its first ``played_seconds`` of audio said:
        what realtime APIs do when the user interrupts playback. The kept text is the reply's tokens
        in proportion to the share of its audio played, ``round(T * played / total)`` of the ``T``
        tokens the audio speaks (a uniform speaking rate over the reply: the talker reads text ahead
        of the audio, so no finer alignment exists). The history's assistant message becomes that
        text, and the next turn's prefill rewrites the cache from where it changed. Returns the text."""
        r = self.last_reply
        if r is None or not self.messages or self.messages[-1]["role"] != "assistant":
            raise InputError("truncate_reply: the conversation does not end with a reply")
        if r.audio is None or not len(r.audio):
            raise InputError("truncate_reply: the last reply has no audio")
        if not isinstance(played_seconds, (int, float, np.integer, np.floating)) or isinstance(played_seconds, bool) \
                or not np.isfinite(played_seconds) or played_seconds < 0:
            raise InputError(f"truncate_reply: played_seconds must be a finite number >= 0, got {played_seconds!r}")
        total = len(r.audio) / OUTPUT_RATE
        if played_seconds >= total:
            return self.messages[-1]["content"]
        eos = set(int(x) for x in np.atleast_1d(self.model.generation_config["eos_token_id"]))
        ids = [t for t in r.token_ids if t not in eos]
        keep = int(round(len(ids) * played_seconds / total))
        text = self.model.processor.decode(ids[:keep])
        self.messages[-1] = {"role": "assistant", "content": text}
        r.text = text
        self._logits = None
        return text

    def cancel(self) -> None:
        """Stop the reply being generated at the next step boundary (from a callback or another
        thread); the history keeps the tokens produced until then."""
        self._cancel = True
        pr = self._pending
        if pr is not None and pr.on_cancel is not None:
            pr.on_cancel()

    def respond(self, max_new_tokens: int | None = None, *, on_text: Callable[[str], Any] | None = None,
                **kwargs) -> Reply:
        """Generate the assistant's reply to the conversation and append it to the history.

        Arguments as :meth:`respond_stream`: sampling as :meth:`omni_jax.OmniModel.generate`
        (``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``, ``seed``,
        ``eos_token_id``; None takes the checkpoint's generation config), ``return_audio``,
        ``speaker`` and ``talker_*`` for speech, ``steps_per_event`` thinker tokens between events.
        ``on_text(delta)`` is called with each text delta (it may call :meth:`cancel`). Returns the
        :class:`Reply` (with ``codec_ids`` and ``audio`` when speech was asked for)."""
        for ev in self.respond_stream(max_new_tokens, **kwargs):
            if ev.kind == "text" and on_text is not None and ev.text:
                on_text(ev.text)
        return self.last_reply

    def respond_stream(self, max_new_tokens: int | None = None, *, do_sample=None, temperature=None, top_k=None,
                       top_p=None, repetition_penalty=None, seed: int | None = None, eos_token_id=None,
                       steps_per_event: int = 8, return_audio: bool = False, speaker: str = "Chelsie",
                       **talker_kwargs) -> Iterator:
        """Yield :class:`omni_jax.StreamEvent` s of the reply (``text`` deltas; with ``return_audio``
        also ``audio`` chunks, float32 at 24 kHz; then ``done``) while it is generated; at the end (or
        on :meth:`cancel`) the reply is appended to the history and kept in :attr:`last_reply`.

        Speech runs as :meth:`omni_jax.OmniModel.stream` runs it: the talker (``talker_*`` arguments
        as in ``generate``) advances over the reply tokens whose inputs are final, its prompt being
        the whole conversation's hidden states and embeddings (kept beside the cache), and its codec
        ids go through :class:`omni_jax.streaming.StreamingToken2Wav` (codec ids only, in ``done``'s
        ``codec_ids``, when the checkpoint has no token2wav weights). A cancelled reply stops its
        speech too. The decoding runs here, with the session's own programs; a server decodes the
        same :class:`PendingReply` as a row of its continuous batch instead."""
        if not isinstance(steps_per_event, (int, np.integer)) or steps_per_event < 1:
            raise InputError(f"steps_per_event: expected a positive int, got {steps_per_event!r}")
        t0 = time.perf_counter()
        pr = self.begin_reply(max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
                              top_p=top_p, repetition_penalty=repetition_penalty, seed=seed,
                              eos_token_id=eos_token_id, return_audio=return_audio, speaker=speaker, **talker_kwargs)
        yield from self._decode_here(pr, int(steps_per_event), t0)

    def begin_reply(self, max_new_tokens: int | None = None, *, do_sample=None, temperature=None, top_k=None,
                    top_p=None, repetition_penalty=None, seed: int | None = None, eos_token_id=None,
                    return_audio: bool = False, speaker: str = "Chelsie", **talker_kwargs) -> "PendingReply":
        """Start the assistant's reply (arguments as :meth:`respond_stream`): check the arguments,
        prefill what the cache lacks of the conversation and the generation prompt, and choose the
        reply's first token. Returns the :class:`PendingReply`, which holds the session's cache (in
        its decode state) until :meth:`PendingReply.finish` (or :meth:`PendingReply.abandon`) hands it
        back; the session takes no other call in between."""
        model = self.model
        unknown = set(talker_kwargs) - TALKER_ARGS
        if unknown:
            raise InputError(f"unknown argument(s): {', '.join(sorted(unknown))}")
        if return_audio:
            model.check_speech(speaker, talker_kwargs.get("talker_max_new_tokens", 4096))
        if self._open is not None:
            self.end_user_turn()
        if not self.messages:
            raise InputError("respond: the conversation is empty (add a user message first)")
        ids, pos = self._render(self.messages, add_generation_prompt=True)
        n = len(ids)
        st = model.sampling_settings(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                     top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                                     prompt_length=n, longest_prompt=n)
        if max_new_tokens is None:
            if self.limit - n < 1:
                raise InputError(f"the conversation of {n} tokens leaves no room for a reply under the session's "
                                 f"context limit {self.limit_name} ({self.limit})")
            st["max_new_tokens"] = min(st["max_new_tokens"], self.limit - n)
        max_new = st["max_new_tokens"]
        check_sampling(max_new, st["do_sample"], st["temperature"], st["top_k"], st["top_p"],
                       st["repetition_penalty"])
        if n + max_new > self.limit:
            raise InputError(f"the conversation of {n} tokens + max_new_tokens {max_new} exceeds the session's "
                             f"context limit {self.limit_name} ({self.limit})")
        seed = self.seed if seed is None else seed
        check_seed(seed)
        self._sync(ids, pos, need_logits=True)
        eos = eos_token_id if eos_token_id is not None else model.generation_config["eos_token_id"]
        eos = [int(eos)] if isinstance(eos, (int, np.integer)) else [int(x) for x in eos]
        eos_arr = np.full((max(1, len(eos)),), -1, np.int32)
        eos_arr[:len(eos)] = eos
        pad = np.int32(model.generation_config["pad_token_id"])
        vocab = self._tc.text.vocab_size
        sp = make_sampling(st["temperature"], st["top_k"], st["top_p"], st["repetition_penalty"], vocab)
        do = bool(st["do_sample"])
        rng = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(int(seed)), i))(jnp.arange(1))
        seen = np.zeros((1, vocab), bool)
        seen[0, np.asarray(ids)] = True
        self._ensure_slots(n + max_new)
        kv, self._kv = self._kv, None  # donated to the decode state
        next_pos = (pos[:, -1:] + 1).astype(np.int32)
        hidden_dim = self._tc.text.hidden_size if self._speech else 0
        with use_mesh(model.mesh):
            state = self._begin_jit(self._logits, kv, seen, next_pos, np.int32(n), sp, rng, np.int32(max_new),
                                    eos_arr, pad, bucket(max_new), do, hidden_dim)
        self._logits = None
        self._cancel = False
        pr = PendingReply(session=self, state=state, ids=list(ids), pos=np.asarray(pos, np.int32), next_pos=next_pos,
                          max_new=int(max_new), eos=eos, eos_arr=eos_arr, pad=pad, sampling=sp, do_sample=do,
                          settings=st, seed=int(seed), return_audio=bool(return_audio), speaker=speaker,
                          talker_kwargs=dict(talker_kwargs), hand_back=self._finish_reply,
                          take_back=self._take_back)
        if return_audio:
            pr.generation = self._talker_generation(state, ids, eos, max_new)
        self._pending = pr
        return pr

    def _decode_here(self, pr: "PendingReply", steps_per_event: int, t0: float) -> Iterator:
        """Decode ``pr`` with the session's own programs, yielding its events (:meth:`respond_stream`)."""
        from .outputs import StreamEvent

        model = self.model
        state, eos = pr.state, pr.eos
        max_new = pr.max_new
        talk = vocoder = None
        if pr.return_audio:
            talk, vocoder = self._talker_runner(pr)
        streamer = TextStreamer(model.processor)
        produced: list[int] = []
        audio: list[np.ndarray] = []
        reason = "length"

        def audio_events(chunks):
            for a in chunks:
                if len(a):
                    audio.append(np.asarray(a, np.float32))
                    yield StreamEvent("audio", audio=audio[-1], t=time.perf_counter() - t0)

        try:
            while True:
                k = generated(state)
                new = [int(x) for x in np.asarray(state.tokens[0, len(produced):k])]
                produced += new
                hit = [i for i, x in enumerate(new) if x in eos]
                if hit:
                    new = new[:hit[0]]
                if new or hit:
                    yield StreamEvent("text", text=streamer.push(new), token_ids=new, t=time.perf_counter() - t0)
                if any(x in eos for x in produced):
                    reason = "stop"
                    break
                if k >= max_new:
                    break
                if self._cancel:
                    reason = "cancelled"
                    break
                if talk is not None and k >= 2:
                    yield from audio_events(talk(k - 2))
                with use_mesh(model.mesh):
                    state = self._decode_jit(model.params, state, np.int32(steps_per_event), pr.sampling, pr.eos_arr,
                                             pr.pad, pr.do_sample)
                if pr.generation is not None:
                    pr.generation.state = state
        finally:
            pr.state = None
            self._finish_reply(pr, state.cache, state.hidden, produced, reason)
        tail = streamer.flush()
        if tail:
            yield StreamEvent("text", text=tail, t=time.perf_counter() - t0)
        codec_ids = None
        if talk is not None and reason != "cancelled":
            # the thinker is done; the talker goes on alone, one steady vocoder chunk of codes per call
            step = vocoder.cf // vocoder.rep if vocoder is not None else None
            while True:
                yield from audio_events(talk(None, step))
                if talk.run is None or talk.run.finished:
                    break
                if self._cancel:  # barge-in while only the talker was left: the speech stops here
                    self._cancel = False
                    self.last_reply.finish_reason = "cancelled"
                    break
            if vocoder is not None:
                yield from audio_events(vocoder.finish())
            codec_ids = talk.run.codes()[0] if talk.run is not None else np.zeros((0,), np.int32)
        self.last_reply.codec_ids = codec_ids
        self.last_reply.audio = np.concatenate(audio) if audio else None
        yield StreamEvent("done", token_ids=produced, codec_ids=codec_ids, t=time.perf_counter() - t0)

    def _finish_reply(self, pr: "PendingReply", cache, hidden, produced: list, reason: str) -> None:
        """Take the cache back (``cache``, a decode state's; ``hidden``: its reply hidden states) and
        append the reply (what was produced) to the history; the cache holds every produced token but
        the last (chosen, not yet fed)."""
        model = self.model
        ids, pos, next_pos, eos = pr.ids, pr.pos, pr.next_pos, pr.eos
        self._pending = None
        self._kv = SessionCache(cache)
        fed = produced[:-1]
        n = len(ids)
        self._ids = list(ids) + fed
        self._pos = np.concatenate([pos, next_pos + np.arange(len(fed), dtype=np.int32)[None]], axis=1)
        if self._speech and fed:
            ids_b = np.zeros((1, bucket(len(fed))), np.int32)  # bucketed: one embedding program, not one per length
            ids_b[0, :len(fed)] = fed
            self._keep_talker_inputs(n, hidden, self._embed_jit(model.params, ids_b), len(fed))
        cut = next((i for i, x in enumerate(produced) if x in eos), len(produced))
        text = model.processor.decode(produced[:cut])
        self.messages.append({"role": "assistant", "content": text})
        self.last_reply = Reply(text=text, token_ids=produced, finish_reason=reason)
        self._cancel = False
        return self.last_reply

    def _take_back(self, cache) -> None:
        """A begun reply that produced nothing for the history: the cache back as it was (``cache``),
        or, when it is lost (None), no cache at all, so the next turn prefills the conversation again."""
        self._pending, self._logits, self._cancel = None, None, False
        if cache is not None:
            self._kv = SessionCache(cache)
            return
        self._kv, self._ids, self._pos = None, [], np.zeros((3, 0), np.int32)
        if self._speech:
            self._hid = self._emb = None

    def _talker_generation(self, state, ids, eos, max_new):
        """A :class:`omni_jax.Generation` view of the reply being decoded, for the talker: the
        conversation as its prompt, left-padded to a bucket as ``prefill`` lays it out."""
        from .outputs import Generation
        from .processor import left_pad

        n = len(ids)
        tb = bucket(n)
        ids_l, mask_l = left_pad([ids], tb)
        padl = [(0, 0), (tb - n, 0), (0, 0)]
        inputs = {"prompt_hidden": jnp.pad(self._hid[:, :n], padl), "prompt_embeds": jnp.pad(self._emb[:, :n], padl)}
        frames = self._audio_seqlens(self._media)
        grids = [m.grid for m in self._media if m.kind == "image"]
        vgrids = [m.grid for m in self._media if m.kind == "video"]
        mm = {"image_grid_thw": np.asarray(grids) if grids else None,
              "video_grid_thw": np.asarray(vgrids) if vgrids else None,
              "video_second_per_grid": np.asarray([m.seconds for m in self._media if m.kind == "video"], np.float64)
              if vgrids else None,
              "feature_attention_mask": (np.arange(max(frames))[None] < np.asarray(frames)[:, None]).astype(np.int32)
              if frames else None, "use_audio_in_video": self.use_audio_in_video and bool(vgrids)}
        return Generation(state=state, prompt_ids=np.asarray([ids]), eos=eos, max_new_tokens=max_new,
                          talker_inputs=inputs, aligned_ids=ids_l, aligned_mask=mask_l, mm=mm)

    def _talker_runner(self, pr: "PendingReply"):
        """``talk(final, limit)``, which advances the talker of ``pr`` and returns new audio chunks, and
        the streaming vocoder (None without token2wav weights)."""
        from .engine import noise_key

        model, gen, speaker, seed = self.model, pr.generation, pr.speaker, pr.seed
        vocoder = None
        if model.token2wav_params is not None:
            from .streaming import StreamingToken2Wav

            voice = model.voices[speaker]
            vocoder = StreamingToken2Wav(model.token2wav_parts, model.config.token2wav, voice.cond, voice.ref_mel,
                                         key=noise_key(seed, 0), impl=model.attention)

        def talk(final, limit=None):
            if talk.run is None:
                talk.run = model.talker_start(gen, speaker=speaker, seed=seed, **pr.talker_kwargs)
                if talk.run is None:
                    return []
            model.talker_advance(talk.run, gen, final, limit)
            codes = talk.run.codes()[0]
            new = codes[talk.run.taken:]
            talk.run.taken = len(codes)
            return vocoder.push(new) if (vocoder is not None and len(new)) else []

        talk.run = None
        return talk, vocoder


@jax.jit
def _write_slots(buf, src, start, count):
    """``buf [1, S, E]`` with slots ``[start, start + count)`` taken from ``src [1, W, E]``'s first
    ``count`` rows (``start``/``count`` traced)."""
    idx = jnp.arange(buf.shape[1]) - start
    rows = jnp.take(src, jnp.clip(idx, 0, src.shape[1] - 1), axis=1).astype(buf.dtype)
    return jnp.where(((idx >= 0) & (idx < count))[None, :, None], rows, buf)


@dataclass
class PendingReply:
    """An assistant reply of a :class:`Session` whose first token is chosen (:meth:`Session.begin_reply`),
    waiting to be decoded: by the session itself (:meth:`Session.respond_stream`) or as a row of a
    server's continuous batch (:meth:`omni_jax.serve.Engine.session_reply`), whose decode loop is the
    same program family, so the ids are the same. ``state``: the batch-1
    :class:`omni_jax.generate.DecodeState` (it holds the session's KV cache); ``generation``: the
    talker's view of the reply (with ``return_audio``). Exactly one of :meth:`finish` and
    :meth:`abandon` gives the session its cache back."""

    session: Session
    state: Any
    ids: list
    pos: np.ndarray
    next_pos: np.ndarray
    max_new: int
    eos: list
    eos_arr: np.ndarray
    pad: Any
    sampling: Any
    do_sample: bool
    settings: dict
    seed: int
    return_audio: bool
    speaker: str
    talker_kwargs: dict
    hand_back: Callable = field(repr=False, default=None)  # the session's: the reply joins its history
    take_back: Callable = field(repr=False, default=None)  # the session's: its cache back, no reply
    generation: Any = None
    on_cancel: Callable[[], Any] | None = None  # set by whoever decodes it elsewhere

    @property
    def prompt_tokens(self) -> int:
        return len(self.ids)

    def sampling_values(self) -> tuple:
        """``(temperature, top_k, top_p, repetition_penalty, do_sample)`` of the reply's thinker."""
        st = self.settings
        return st["temperature"], st["top_k"], st["top_p"], st["repetition_penalty"], self.do_sample

    def finish(self, cache, hidden, produced, reason: str) -> Reply:
        """The reply ended (``reason``: ``"stop"``, ``"length"`` or ``"cancelled"``) after ``produced``
        ids; ``cache``/``hidden``: the decode state's per-layer KV cache ``[1, S, ...]`` and reply
        hidden states ``[1, N, E]`` (any ``S`` holding the conversation and the reply). Appends the
        reply to the history and returns it (:attr:`Session.last_reply`)."""
        self.state = None
        return self.hand_back(self, cache, hidden, [int(x) for x in produced], reason)

    def abandon(self) -> None:
        """The reply never ran (refused by a server): the session takes its cache back unchanged and
        the history gets no reply."""
        st, self.state = self.state, None
        self.take_back(None if st is None else st.cache)

    def lost(self) -> None:
        """The reply's decode state was lost (a server's internal error): the session forgets its cache,
        so the next turn prefills the whole conversation again; the history gets no reply."""
        self.state = None
        self.take_back(None)


TALKER_ARGS = {"talker_max_new_tokens", "talker_min_new_tokens", "talker_do_sample", "talker_top_k", "talker_top_p",
               "talker_temperature", "talker_repetition_penalty", "talker_eos_token_id"}
