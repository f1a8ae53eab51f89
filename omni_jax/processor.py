"""Text processing without torch: the checkpoint's tokenizer and chat template.

The tokenizer is read from ``tokenizer.json`` with the ``tokenizers`` library; the chat
template from ``chat_template.json``, ``chat_template.jinja`` or ``tokenizer_config.json``
and rendered with a sandboxed Jinja2 environment (as transformers does). Text deltas for
streaming are cut at whole UTF-8 characters.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from .errors import CheckpointError, InputError

DEFAULT_SYSTEM_PROMPT = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving "
    "auditory and visual inputs, as well as generating text and speech."
)

# ChatML, used when a checkpoint ships no template of its own
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'audio' %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif part['type'] == 'image' %}<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif part['type'] == 'video' %}<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from None


class TextProcessor:
    """Tokenizer + chat template of a checkpoint directory."""

    def __init__(self, tokenizer, chat_template: str | None, directory: str):
        self.tokenizer = tokenizer
        self.chat_template = chat_template or CHATML_TEMPLATE
        self.directory = directory
        self._special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}

    @classmethod
    def from_dir(cls, directory: str) -> "TextProcessor | None":
        """The checkpoint's text processor, or None when it ships no ``tokenizer.json``."""
        path = os.path.join(directory, "tokenizer.json")
        if not os.path.exists(path):
            return None
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a plain Exception on bad files
            raise CheckpointError(f"{path}: cannot load tokenizer ({e})") from None
        template = None
        for name in ("chat_template.jinja",):
            p = os.path.join(directory, name)
            if os.path.exists(p):
                with open(p, encoding="utf-8") as f:
                    template = f.read()
        if template is None and os.path.exists(os.path.join(directory, "chat_template.json")):
            template = _read_json(os.path.join(directory, "chat_template.json")).get("chat_template")
        if template is None and os.path.exists(os.path.join(directory, "tokenizer_config.json")):
            template = _read_json(os.path.join(directory, "tokenizer_config.json")).get("chat_template")
        return cls(tok, template, directory)

    # -- ids ----------------------------------------------------------------------------
    def token_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        check_text(text, "text")
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # -- chat ---------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        validate_messages(messages)
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise InputError(f"chat template: {msg}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt)
        except TemplateError as e:
            raise CheckpointError(f"{self.directory}: chat template failed to render ({e})") from None


def check_text(text: str, where: str) -> None:
    """Refuse text that is not valid Unicode: lone surrogates (what Python makes of invalid UTF-8 bytes
    in command-line arguments, or of ``\\udXXX`` escapes in JSON) cannot be tokenized or written back."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{where}: not valid UTF-8 text (a lone surrogate {text[e.start]!r} at character "
                         f"{e.start}; invalid bytes in the input?)") from None


def validate_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise InputError("messages: expected a non-empty list of {'role', 'content'} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise InputError(f"messages[{i}]: expected a dict with 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant"):
            raise InputError(f"messages[{i}]: unknown role '{m['role']}' (system, user or assistant)")
        c = m["content"]
        if isinstance(c, str):
            check_text(c, f"messages[{i}].content")
            continue
        if not isinstance(c, list):
            raise InputError(f"messages[{i}].content: expected a string or a list of typed parts")
        for j, part in enumerate(c):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in ("text", "audio", "image", "video"):
                raise InputError(f"messages[{i}].content[{j}]: unknown part type '{kind}'")
            if kind == "text" and not isinstance(part.get("text"), str):
                raise InputError(f"messages[{i}].content[{j}]: a text part needs a string 'text'")
            if kind == "text":
                check_text(part["text"], f"messages[{i}].content[{j}].text")


def left_pad(rows, width: int | None = None):
    """Token-id rows -> ``(ids, attention_mask)`` int32 ``[B, width]``, each row right-aligned
    (left padding with id 0), ``width`` defaulting to the longest row."""
    import numpy as np

    width = max(len(r) for r in rows) if width is None else width
    ids = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, width - len(r):] = r
            mask[i, width - len(r):] = 1
    return ids, mask


def is_batch_of_conversations(messages) -> bool:
    return isinstance(messages, list) and bool(messages) and isinstance(messages[0], list)


class TextStreamer:
    """Turns a growing list of token ids into text deltas of whole UTF-8 characters."""

    def __init__(self, processor: TextProcessor):
        self.processor = processor
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, ids: Sequence[int]) -> str:
        self.ids.extend(int(i) for i in ids)
        text = self.processor.decode(self.ids)
        # an incomplete multi-byte character decodes to U+FFFD at the end: hold it back
        stable = text.rstrip("\ufffd")
        if not stable.startswith(self.emitted):
            return ""
        delta = stable[len(self.emitted):]
        self.emitted = stable
        return delta

    def flush(self) -> str:
        text = self.processor.decode(self.ids)
        delta = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        self.emitted = text
        return delta


def collect_media(conv: list) -> list[dict]:
    """The media parts of one conversation, in order of appearance."""
    out = []
    for i, m in enumerate(conv):
        if isinstance(m.get("content"), list):
            for j, part in enumerate(m["content"]):
                if part.get("type") in ("audio", "image", "video"):
                    out.append(dict(part, _where=f"messages[{i}].content[{j}]"))
    return out


def _media_source(part: dict, key: str):
    src = part.get(key)
    if src is None:
        raise InputError(f"{part['_where']}: a {part['type']} part needs '{key}' (a path or an array)")
    return src


def process_conversations(text_proc: TextProcessor, convs: list, *, directory: str | None,
                          use_audio_in_video: bool = False, thinker_cfg=None,
                          add_generation_prompt: bool = True) -> dict:
    """Conversations with typed parts -> the processor outputs the thinker takes (numpy, left-padded):
    ``input_ids``, ``attention_mask`` and, when present, ``input_features`` +
    ``feature_attention_mask``, ``pixel_values`` + ``image_grid_thw``, ``pixel_values_videos`` +
    ``video_grid_thw`` + ``video_second_per_grid``. Media are read and preprocessed as the
    reference does (:mod:`omni_jax.media`); placeholders are expanded like
    ``Qwen2_5OmniProcessor``."""
    import numpy as np

    from . import media

    acfg, vcfg = media.processor_configs(directory)  # defaults when directory is None
    texts, audios, images, videos = [], [], [], []
    for conv in convs:
        validate_messages(conv)
        for part in collect_media(conv):
            kind, where = part["type"], part["_where"]
            if kind == "audio":
                src = _media_source(part, "audio")
                audios.append(media.load_audio(src, part.get("sampling_rate")))
            elif kind == "image":
                images.append(media.load_image(_media_source(part, "image")))
            else:
                v = media.load_video(_media_source(part, "video"), part.get("fps"), cfg=vcfg,
                                     load_audio=use_audio_in_video and not hasattr(part.get("video"), "shape"))
                if use_audio_in_video and v.audio is None and part.get("audio") is not None:
                    v.audio = media.load_audio(part["audio"], part.get("sampling_rate"))
                if use_audio_in_video and v.audio is None:
                    raise InputError(f"{where}: use_audio_in_video, but the video has no audio track")
                videos.append(v)
                if use_audio_in_video:
                    audios.append(v.audio)  # the video's audio, in order of appearance
        texts.append(text_proc.apply_chat_template(conv, add_generation_prompt=add_generation_prompt))
    out: dict = {}
    audio_lengths, video_audio_lengths = [], []
    if audios:
        a = media.audio_inputs(audios, acfg)
        out.update(a)
        lengths = [int(x) for x in a["feature_attention_mask"].sum(-1)]
        # standalone audios vs videos' tracks, in the order they were collected
        k = 0
        for conv in convs:
            for part in collect_media(conv):
                if part["type"] == "audio":
                    audio_lengths.append(lengths[k])
                    k += 1
                elif part["type"] == "video" and use_audio_in_video:
                    video_audio_lengths.append(lengths[k])
                    k += 1
    if images:
        out.update(media.image_inputs(images, vcfg))
    if videos:
        per = [media.video_inputs([v], vcfg, fps=v.sample_fps) for v in videos]
        out["pixel_values_videos"] = np.concatenate([p["pixel_values_videos"] for p in per])
        out["video_grid_thw"] = np.concatenate([p["video_grid_thw"] for p in per])
        out["video_second_per_grid"] = np.concatenate([p["video_second_per_grid"] for p in per])
    kw = {}
    if thinker_cfg is not None:
        kw = dict(merge_size=thinker_cfg.vision.spatial_merge_size,
                  position_id_per_seconds=thinker_cfg.position_id_per_seconds,
                  seconds_per_chunk=thinker_cfg.seconds_per_chunk)
    expanded = media.expand_placeholders(
        texts, audio_lengths=audio_lengths, image_grids=[tuple(g) for g in out.get("image_grid_thw", [])],
        video_grids=[tuple(g) for g in out.get("video_grid_thw", [])],
        video_seconds=list(out.get("video_second_per_grid", [])), use_audio_in_video=use_audio_in_video,
        video_audio_lengths=video_audio_lengths if use_audio_in_video else None, **kw)
    ids, mask = left_pad([text_proc.encode(t) for t in expanded])
    out.update(input_ids=ids, attention_mask=mask)
    return out
