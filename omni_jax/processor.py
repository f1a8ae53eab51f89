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
            continue
        if not isinstance(c, list):
            raise InputError(f"messages[{i}].content: expected a string or a list of typed parts")
        for j, part in enumerate(c):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in ("text", "audio", "image", "video"):
                raise InputError(f"messages[{i}].content[{j}]: unknown part type '{kind}'")
            if kind == "text" and not isinstance(part.get("text"), str):
                raise InputError(f"messages[{i}].content[{j}]: a text part needs a string 'text'")


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
