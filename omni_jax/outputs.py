"""What the API hands back: :class:`GenerateOutput` and :class:`StreamEvent`, and the handles of
work in progress, :class:`Generation` (a thinker decode) and :class:`TalkerRun` (a talker decode),
which :class:`omni_jax.OmniModel` and a :class:`omni_jax.session.Session` advance."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .generate import DecodeState, generated
from .sharding import outside_context_mesh


@dataclass
class GenerateOutput:
    sequences: np.ndarray  # [B, T_prompt + T_new]: the prompt as given, then new ids (pad after EOS)
    text: list[str]
    codec_ids: list[np.ndarray] | None = None
    audio: list[np.ndarray] | None = None
    prompt_length: int = 0  # extension: columns of `sequences` that are the prompt


@dataclass
class StreamEvent:
    kind: str  # "text", "audio" or "done"
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    audio: np.ndarray | None = None
    t: float = 0.0
    codec_ids: np.ndarray | None = None  # extension: on "done" with return_audio, all codec ids


@outside_context_mesh
@dataclass
class Generation:
    """A generation in progress: the on-device :class:`~omni_jax.generate.DecodeState` and what
    is needed to read it. Made by :meth:`OmniModel.prefill`, advanced by :meth:`OmniModel.decode_steps`."""

    state: DecodeState
    prompt_ids: np.ndarray  # [B, T] the prompt as given
    eos: list[int]
    max_new_tokens: int
    _run: Any = None
    talker_inputs: dict | None = None  # prompt hidden states / embeddings when speech was asked for
    aligned_ids: np.ndarray | None = None  # [B, Tb] left-aligned, bucketed prompt the thinker ran on
    aligned_mask: np.ndarray | None = None
    mm: dict | None = None  # the media inputs (processor form) the prompt was built with

    @property
    def finished(self) -> bool:
        return generated(self.state) >= self.max_new_tokens or bool(np.all(np.asarray(self.state.done)))

    def new_tokens(self) -> np.ndarray:
        """Generated ids so far ``[B, n]`` (finished rows padded with the pad id)."""
        return np.asarray(self.state.tokens[:, :generated(self.state)])


@outside_context_mesh
@dataclass
class TalkerRun:
    """A talker generation in progress (see :meth:`OmniModel.talker_start`)."""

    state: Any
    sp: Any
    eos: list
    eos_arr: np.ndarray
    pad: Any
    do_sample: bool
    max_new: int
    thinker_eos: np.ndarray
    extra: np.ndarray
    taken: int = 0  # codes handed out so far (streaming)

    @property
    def finished(self) -> bool:
        return generated(self.state) >= self.max_new or bool(np.all(np.asarray(self.state.done)))

    def codes(self) -> list[np.ndarray]:
        """Codec ids per row, cut at the row's first talker EOS."""
        out = []
        for row in np.asarray(self.state.tokens[:, :generated(self.state)]):
            hit = np.nonzero(np.isin(row, self.eos))[0]
            out.append(row[:hit[0]] if len(hit) else row)
        return out
