"""Training data: JSONL conversations -> fixed-shape batches for :func:`omni_jax.train_loss`.

One JSON object per line::

    {"messages": [{"role": "system", "content": "..."},
                  {"role": "user", "content": [{"type": "audio", "audio": "clip.wav"},
                                               {"type": "text", "text": "What is said?"}]},
                  {"role": "assistant", "content": "Hello there."}],
     "codec_ids": [12, 873, ...],      # optional: the spoken last reply's codec ids
     "speaker": "Chelsie"}             # optional: its voice (default Chelsie)

Media paths are relative to the JSONL file. The messages are rendered with the checkpoint's chat
template and preprocessed by omni_jax's processor (the one ``generate`` uses); the loss covers
the assistant replies only: each reply's tokens and its ``<|im_end|>``. With ``codec_ids`` the
talker is trained on the last reply's speech (the ids end with the talker's EOS; it is added when
missing). Bad lines (invalid JSON, wrong schema, missing media file, too long) are reported with
their line number; ``on_error="skip"`` skips them (counted and logged), ``"fail"`` stops.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

from omni_jax.errors import InputError
from omni_jax.processor import collect_media, left_pad, process_conversations, validate_messages
from omni_jax.training import IGNORE, make_batch, talker_layout

MEDIA_KEYS = ("input_features", "feature_attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos",
              "video_grid_thw", "video_second_per_grid")


@dataclass
class Record:
    where: str  # "FILE:LINE"
    messages: list
    codec_ids: list | None = None
    speaker: str | None = None


@dataclass
class Example:
    where: str
    ids: np.ndarray  # [T] int32
    labels: np.ndarray  # [T] int32
    media: dict = field(default_factory=dict)
    reply: tuple | None = None  # (start, length) of the last assistant reply
    codes: np.ndarray | None = None
    speaker_bos: int | None = None


class DataError(InputError):
    pass


def _check_record(obj, where: str, base: str, *, talker_vocab: int | None, voices) -> Record:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with 'messages'")
    unknown = set(obj) - {"messages", "codec_ids", "speaker"}
    if unknown:
        raise DataError(f"{where}: unknown field(s) {', '.join(sorted(unknown))} (messages, codec_ids, speaker)")
    msgs = obj.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    try:
        validate_messages(msgs)
    except InputError as e:
        raise DataError(f"{where}: {e}") from None
    if not any(m.get("role") == "assistant" for m in msgs):
        raise DataError(f"{where}: no assistant message (nothing to train on)")
    for m in msgs:
        if m.get("role") == "assistant" and not isinstance(m.get("content"), str):
            raise DataError(f"{where}: assistant content must be a string")
    # media paths: relative to the data file; they must exist now, not halfway through a run
    msgs = json.loads(json.dumps(msgs))
    for part in collect_media(msgs):
        src = part.get(part["type"])
        if not isinstance(src, str):
            raise DataError(f"{where}: {part['_where']}: a {part['type']} part needs a file path")
        path = src if os.path.isabs(src) else os.path.join(base, src)
        if not os.path.isfile(path):
            raise DataError(f"{where}: {part['_where']}: {part['type']} file not found: {path}")
    for m in msgs:
        if isinstance(m.get("content"), list):
            for part in m["content"]:
                k = part.get("type")
                if k in ("audio", "image", "video") and not os.path.isabs(part[k]):
                    part[k] = os.path.join(base, part[k])
    codes = obj.get("codec_ids")
    if codes is not None:
        if talker_vocab is None:
            raise DataError(f"{where}: codec_ids given, but the model has no talker")
        if (not isinstance(codes, list) or not codes
                or not all(isinstance(c, int) and 0 <= c < talker_vocab for c in codes)):
            raise DataError(f"{where}: codec_ids must be a non-empty list of ints in [0, {talker_vocab})")
    speaker = obj.get("speaker")
    if speaker is not None:
        if codes is None:
            raise DataError(f"{where}: 'speaker' without codec_ids")
        if speaker not in voices:
            raise DataError(f"{where}: unknown speaker '{speaker}' (voices: {', '.join(sorted(voices)) or 'none'})")
    return Record(where, msgs, codes, speaker)


def read_jsonl(path: str, *, on_error: str = "fail", talker_vocab: int | None = None, voices=(),
               log=print) -> tuple[list[Record], int]:
    """Validated records of a JSONL file and the number of skipped lines."""
    if on_error not in ("fail", "skip"):
        raise InputError(f"on_error: 'fail' or 'skip', got {on_error!r}")
    path = os.path.expanduser(os.fspath(path))  # `--data=~/x.jsonl` reaches us unexpanded
    try:
        f = open(path, "rb")  # decoded line by line: a bad byte is that line's error, not the file's
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    base = os.path.dirname(os.path.abspath(path))
    records, skipped = [], 0
    with f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{n}"
            try:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column "
                                    f"{e.start + 1})") from None
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: not valid JSON ({e.msg})") from None
                records.append(_check_record(obj, where, base, talker_vocab=talker_vocab, voices=voices))
            except DataError as e:
                if on_error == "fail":
                    raise
                skipped += 1
                log(f"warning: {e} (line skipped)")
    if not records:
        raise InputError(f"{path}: no usable training example")
    return records, skipped


def _find(seq: np.ndarray, pattern: list[int], start: int) -> int:
    n = len(pattern)
    for i in range(start, len(seq) - n + 1):
        if list(seq[i:i + n]) == pattern:
            return i
    return -1


def assistant_spans(ids: np.ndarray, header: list[int], end_id: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of every assistant reply: the tokens after ``<|im_start|>assistant\\n`` up to
    and including the next ``<|im_end|>``."""
    spans = []
    i = _find(ids, header, 0)
    while i >= 0:
        s = i + len(header)
        ends = np.flatnonzero(ids[s:] == end_id)
        e = s + int(ends[0]) + 1 if len(ends) else len(ids)
        spans.append((s, e))
        i = _find(ids, header, e)
    return spans


class Encoder:
    """Records -> :class:`Example` with the model's processor (tokenizer, chat template, media)."""

    def __init__(self, model, *, max_length: int, use_audio_in_video: bool = False, talker_eos: int | None = None):
        if model.processor is None:
            raise InputError(f"{model.path}: the checkpoint has no tokenizer.json; training needs its tokenizer")
        self.model = model
        self.proc = model.processor
        self.max_length = max_length
        self.aiv = use_audio_in_video
        self.header = self.proc.encode("<|im_start|>assistant\n")
        end = self.proc.token_id("<|im_end|>")
        if end is None:
            raise InputError(f"{model.path}: the tokenizer has no <|im_end|> token")
        self.end_id = end
        tc = model.config.talker
        self.talker_eos = talker_eos if talker_eos is not None else (tc.tts_codec_end_token_id if tc else None)
        self.talker_eos_ids = {tc.tts_codec_end_token_id, tc.tts_codec_pad_token_id} if tc else set()

    def __call__(self, rec: Record) -> Example:
        try:
            enc = process_conversations(self.proc, [rec.messages], directory=self.model.path,
                                        use_audio_in_video=self.aiv, thinker_cfg=self.model.config.thinker,
                                        add_generation_prompt=False)
        except InputError as e:
            raise DataError(f"{rec.where}: {e}") from None
        ids = enc.pop("input_ids")[0]
        enc.pop("attention_mask")
        if len(ids) > self.max_length:
            raise DataError(f"{rec.where}: {len(ids)} tokens, longer than --max-length {self.max_length}")
        spans = assistant_spans(ids, self.header, self.end_id)
        labels = np.full(ids.shape, IGNORE, np.int32)
        for s, e in spans:
            labels[s:e] = ids[s:e]
        ex = Example(rec.where, ids.astype(np.int32), labels, {k: v for k, v in enc.items() if v is not None})
        if rec.codec_ids is not None:
            s, e = spans[-1]
            codes = list(rec.codec_ids)
            if codes[-1] not in self.talker_eos_ids:
                codes.append(self.talker_eos)
            ex.reply = (s, e - s)
            ex.codes = np.asarray(codes, np.int32)
            ex.speaker_bos = self.model.voices[rec.speaker or "Chelsie"].bos_token if self.model.voices else None
            if ex.speaker_bos is None:
                raise DataError(f"{rec.where}: codec_ids need the checkpoint's voices (spk_dict.pt)")
        return ex


def targets(examples: list[Example]) -> tuple[int, int]:
    """Thinker and talker target tokens of ``examples`` (the loss normalisers of one optimizer step)."""
    return (sum(int((e.labels[1:] != IGNORE).sum()) for e in examples),
            sum(len(e.codes) for e in examples if e.codes is not None))


def collate(config, examples: list[Example], *, length: int, num_targets: float, speech: bool,
            talker_targets: float = 0.0,
            talker_length: int | None = None, num_chunks: int | None = None, num_patches: int | None = None,
            use_audio_in_video: bool = False) -> dict:
    """Left-padded batch of ``examples`` at ``length`` tokens, laid out by :func:`omni_jax.training.make_batch`."""
    ids, mask = left_pad([e.ids for e in examples], length)
    labels = np.full(ids.shape, IGNORE, np.int32)
    for i, e in enumerate(examples):
        labels[i, length - len(e.ids):] = e.labels
    mm: dict = {}
    feats = [e.media for e in examples if "input_features" in e.media]
    if feats:
        frames = max(m["input_features"].shape[-1] for m in feats)
        fs, fm = [], []
        for m in feats:
            f, k = m["input_features"], m["feature_attention_mask"]
            pad = frames - f.shape[-1]
            fs.append(np.pad(f, ((0, 0), (0, 0), (0, pad))))
            fm.append(np.pad(k, ((0, 0), (0, pad))))
        mm["input_features"] = np.concatenate(fs)
        mm["feature_attention_mask"] = np.concatenate(fm)
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "video_second_per_grid"):
        parts = [e.media[key] for e in examples if key in e.media]
        if parts:
            mm[key] = np.concatenate(parts)
    mm["use_audio_in_video"] = use_audio_in_video
    talker = None
    if speech:
        replies = []
        for i, e in enumerate(examples):
            if e.codes is None:
                replies.append(None)
            else:
                off = length - len(e.ids)
                replies.append((off + e.reply[0], e.reply[1], e.codes, e.speaker_bos))
        talker = talker_layout(config, ids, mask, replies, mm, length=talker_length)
        talker["talker_num_targets"] = np.float32(talker_targets)
    return make_batch(config, ids, mask, labels, mm, num_targets=num_targets, num_chunks=num_chunks,
                      num_patches=num_patches, talker=talker)
