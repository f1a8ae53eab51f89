"""Prompt placeholders: the media tokens of the chat prompt, expanded as ``Qwen2_5OmniProcessor`` does.

:func:`expand_placeholders` expands ``<|AUDIO|>``, ``<|IMAGE|>`` and ``<|VIDEO|>`` into the runs of
tokens the encoders' outputs fill, including the 2 s chunk interleaving of video and audio tokens
for ``use_audio_in_video`` (each chunk's video tokens before its audio tokens). The chat template
itself is :mod:`omni_jax.processor`'s.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import InputError
from .audio import audio_token_count


AUDIO_TOKEN = "<|AUDIO|>"


IMAGE_TOKEN = "<|IMAGE|>"


VIDEO_TOKEN = "<|VIDEO|>"


AUDIO_BOS_TOKEN = "<|audio_bos|>"


AUDIO_EOS_TOKEN = "<|audio_eos|>"


def _chunk_sizes(values: np.ndarray, per_chunk: int) -> list[int]:
    """Sizes of the runs of ``values`` (non-decreasing) cut where a value first reaches the next
    multiple of ``per_chunk``; the boundary advances one chunk per cut, as the reference does."""
    sizes = []
    start, boundary = 0, per_chunk
    for i, v in enumerate(values):
        if v >= boundary:
            sizes.append(i - start)
            start = i
            boundary += per_chunk
    sizes.append(len(values) - start)
    return sizes


def video_with_audio_placeholder(grid_thw: Sequence[int], second_per_grid: float, audio_length: int, *,
                                 merge_size: int = 2, position_id_per_seconds: float = 25,
                                 seconds_per_chunk: float = 2.0, video_token: str = VIDEO_TOKEN,
                                 audio_token: str = AUDIO_TOKEN, audio_bos: str = AUDIO_BOS_TOKEN,
                                 audio_eos: str = AUDIO_EOS_TOKEN) -> str:
    """``<|audio_bos|>`` + per 2 s chunk (video tokens, then audio tokens) + ``<|audio_eos|>``."""
    t, h, w = (int(g) for g in grid_thw)
    per_frame = (h // merge_size) * (w // merge_size)
    video_pos = np.repeat(np.arange(t), per_frame) * second_per_grid * position_id_per_seconds
    audio_pos = np.arange(audio_token_count(audio_length))
    per_chunk = int(position_id_per_seconds * seconds_per_chunk)
    v_sizes = _chunk_sizes(video_pos, per_chunk)
    a_sizes = _chunk_sizes(audio_pos, per_chunk)
    parts = [audio_bos]
    for j in range(max(len(v_sizes), len(a_sizes))):
        if j < len(v_sizes):
            parts.append(video_token * v_sizes[j])
        if j < len(a_sizes):
            parts.append(audio_token * a_sizes[j])
    parts.append(audio_eos)
    return "".join(parts)


def expand_placeholders(text: str | Sequence[str], *, audio_lengths: Sequence[int] = (),
                        image_grids: Sequence[Sequence[int]] = (), video_grids: Sequence[Sequence[int]] = (),
                        video_seconds: Sequence[float] | None = None, use_audio_in_video: bool = False,
                        video_audio_lengths: Sequence[int | None] | None = None, merge_size: int = 2,
                        position_id_per_seconds: float = 25, seconds_per_chunk: float = 2.0,
                        audio_token: str = AUDIO_TOKEN, image_token: str = IMAGE_TOKEN,
                        video_token: str = VIDEO_TOKEN, audio_bos: str = AUDIO_BOS_TOKEN,
                        audio_eos: str = AUDIO_EOS_TOKEN) -> str | list[str]:
    """Expand each placeholder token into the processor's run of tokens, in order of appearance.

    ``audio_lengths``: feature lengths (``feature_attention_mask`` sums) of the standalone
    audios, one per ``<|AUDIO|>``; ``image_grids``/``video_grids``: ``(t, h, w)`` grids, one
    per ``<|IMAGE|>``/``<|VIDEO|>``; ``video_seconds``: ``video_second_per_grid`` per video
    (needed with ``use_audio_in_video``). With ``use_audio_in_video``, ``video_audio_lengths``
    gives each video's audio-track feature length (None for a silent video, which keeps its
    plain expansion); the audio of a video has no placeholder of its own.
    ``text`` may be a list (a batch): items are consumed across it in order. A count that
    does not match the placeholders raises :class:`InputError`.
    """
    batch = [text] if isinstance(text, str) else list(text)
    if use_audio_in_video:
        if video_audio_lengths is None:
            raise InputError("use_audio_in_video: video_audio_lengths (one per video) is required")
        if len(video_audio_lengths) != len(video_grids):
            raise InputError(f"use_audio_in_video: {len(video_audio_lengths)} video audio lengths for "
                             f"{len(video_grids)} videos")
        if video_seconds is None or len(video_seconds) != len(video_grids):
            raise InputError("use_audio_in_video: video_seconds (video_second_per_grid, one per video) is required")
    m2 = merge_size * merge_size
    repl: dict[str, list[str]] = {
        audio_token: [audio_token * audio_token_count(n) for n in audio_lengths],
        image_token: [image_token * (int(np.prod(g)) // m2) for g in image_grids],
        video_token: [],
    }
    for i, g in enumerate(video_grids):
        if use_audio_in_video and video_audio_lengths[i] is not None:
            repl[video_token].append(video_with_audio_placeholder(
                g, float(video_seconds[i]), int(video_audio_lengths[i]), merge_size=merge_size,
                position_id_per_seconds=position_id_per_seconds, seconds_per_chunk=seconds_per_chunk,
                video_token=video_token, audio_token=audio_token, audio_bos=audio_bos, audio_eos=audio_eos))
        else:
            repl[video_token].append(video_token * (int(np.prod(g)) // m2))
    for tok, items in repl.items():
        found = sum(s.count(tok) for s in batch)
        if found != len(items):
            raise InputError(f"prompt has {found} {tok} placeholder(s) but {len(items)} input(s) were given")
    tokens = sorted(repl, key=len, reverse=True)
    iters = {tok: iter(items) for tok, items in repl.items()}
    out = []
    for s in batch:
        pieces, i = [], 0
        while True:
            hits = [(s.find(tok, i), tok) for tok in tokens]
            hits = [(pos, tok) for pos, tok in hits if pos >= 0]
            if not hits:
                pieces.append(s[i:])
                break
            pos, tok = min(hits)
            pieces.append(s[i:pos])
            pieces.append(next(iters[tok]))
            i = pos + len(tok)
        out.append("".join(pieces))
    return out[0] if isinstance(text, str) else out
