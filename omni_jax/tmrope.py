"""TMRoPE position ids: the thinker's time-aligned multimodal positions (host-side numpy).

Equal to transformers' ``get_rope_index`` (Qwen2.5-Omni), including its quirks:

* text: consecutive positions, the three streams equal;
* each media item sits between its start and end markers, which take text positions;
* audio: one position per audio token (25 per second of audio), streams equal;
* image: streams (t, h, w) over the merged patch grid, t = 0;
* video: t = frame-group index * ``second_per_grid`` * 25 (float32, truncated), h and w as images;
* ``use_audio_in_video``: the video's tokens and its audio's tokens are interleaved in
  2-second chunks (video chunk first) by their temporal position, with the chunk rule of
  the reference (at most one chunk boundary per token);
* media positions are only used when a prompt has images or videos (audio-only prompts get
  plain text positions, as in the reference: the same numbers);
* padding positions get 1;
* a video's ``second_per_grid`` (``temporal_patch_size / fps`` of its sampled frames, which
  the processor computes) is required: the positions cannot be known without it, and
  transformers' ``get_rope_index`` cannot compute them either.

Decoding positions follow transformers, which treats the two decoders differently:

* the thinker (``generate``) extends each stream from its last prompt position + 1, as the
  positions of a full-sequence forward continue (text after media continues from the last
  media part);
* the talker decodes from the largest position of its prompt + 1, in all three streams
  (:func:`decode_start`; its forward's ``rope_deltas``).

The two differ when the last interleaved chunk of a ``use_audio_in_video`` span is an audio
chunk whose positions lie below the video's (a wide frame's width positions, a late frame):
its end markers, and any text after them, take that chunk's largest position + 1.
"""

from __future__ import annotations

import numpy as np

from .config import ThinkerConfig
from .errors import InputError


def decode_start(position_ids, attention_mask):
    """The talker's position ids ``[3, B]`` for each row's first decoded token: the largest position
    of the row's valid prompt tokens (over all three streams) + 1, every stream equal. The
    reference talker keeps ``rope_deltas = max + 1 - n_valid`` per row and decodes token ``k`` at
    ``n_valid + k + rope_deltas``. Works on numpy and jax arrays (``position_ids [3, B, T]``,
    ``attention_mask [B, T]``; every row has a valid token)."""
    import jax.numpy as jnp

    valid = jnp.asarray(attention_mask).astype(bool)[None]
    start = jnp.max(jnp.where(valid, position_ids, 0), axis=(0, 2)) + 1
    return jnp.broadcast_to(start[None].astype(jnp.int32), (3, start.shape[0]))


def audio_token_count(feature_len: int) -> int:
    return ((int(feature_len) - 1) // 2 + 1 - 2) // 2 + 1


def _vision_positions(start: int, t_index: np.ndarray, grid_h: int, grid_w: int, merge: int) -> np.ndarray:
    gh, gw = grid_h // merge, grid_w // merge
    t = np.repeat(t_index.astype(np.int64), gh * gw)
    h = np.tile(np.repeat(np.arange(gh), gw), len(t_index))
    w = np.tile(np.arange(gw), len(t_index) * gh)
    return np.stack([t, h, w]) + start


def _chunks(values: np.ndarray, per_chunk: int, offset: int) -> list[tuple[int, int]]:
    out, start, chunk = [], 0, 1
    for i, v in enumerate(values):
        if v - offset >= chunk * per_chunk:
            out.append((start, i))
            start = i
            chunk += 1
    out.append((start, len(values)))
    return out


def _text(n: int, start: int) -> np.ndarray:
    return np.broadcast_to(np.arange(n) + start, (3, n))


def _video_t_index(grid_t: int, second_per_grid: float, per_second: int) -> np.ndarray:
    # float32 arithmetic then truncation, as torch does it
    return (np.arange(grid_t, dtype=np.float32) * np.float32(second_per_grid) * np.float32(per_second)) \
        .astype(np.int64)


def rope_index(cfg: ThinkerConfig, input_ids, attention_mask=None, *, image_grid_thw=None, video_grid_thw=None,
               audio_seqlens=None, second_per_grids=None, use_audio_in_video=False) -> np.ndarray:
    """Position ids ``[3, B, T]`` (int32) for a batch of prompts."""
    ids = np.asarray(input_ids)
    b, t = ids.shape
    mask = np.ones((b, t), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    if image_grid_thw is None and video_grid_thw is None:
        pos = np.cumsum(mask, axis=-1) - 1
        pos = np.where(mask, pos, 1)
        return np.broadcast_to(pos[None], (3, b, t)).astype(np.int32)
    merge = cfg.vision.spatial_merge_size
    per_s = cfg.position_id_per_seconds
    images = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw).reshape(-1, 3)
    videos = np.zeros((0, 3), np.int64) if video_grid_thw is None else np.asarray(video_grid_thw).reshape(-1, 3)
    audios = [] if audio_seqlens is None else [int(x) for x in np.asarray(audio_seqlens).reshape(-1)]
    spg = [] if second_per_grids is None else [float(x) for x in np.asarray(second_per_grids).reshape(-1)]
    if len(videos) and len(spg) != len(videos):
        raise InputError(f"video_second_per_grid: {len(videos)} video(s) need one value each (temporal_patch_size "
                         f"/ fps of the sampled frames, e.g. 1.0 at 2 fps), got "
                         f"{'none' if second_per_grids is None else len(spg)}")
    out = np.ones((3, b, t), np.int64)
    img_i = vid_i = aud_i = 0
    for r in range(b):
        toks = ids[r][mask[r]].tolist()
        starts = [i for i, x in enumerate(toks) if x == cfg.vision_start_token_id]
        after = [toks[i + 1] for i in starts if i + 1 < len(toks)]
        n_img = sum(1 for x in after if x == cfg.image_token_id)
        n_vid = sum(1 for x in after if x == (cfg.audio_start_token_id if use_audio_in_video else cfg.video_token_id))
        n_aud = sum(1 for x in toks if x == cfg.audio_start_token_id)
        parts: list[np.ndarray] = []
        st = 0
        left = {"image": n_img, "video": n_vid, "audio": n_aud}

        def nxt():
            return int(parts[-1].max()) + 1 if parts else 0

        def find(tok, kind):
            if left[kind] > 0 and tok in toks[st:]:
                return toks.index(tok, st)
            return len(toks) + 1

        for _ in range(n_img + n_aud if use_audio_in_video else n_img + n_vid + n_aud):
            e_img, e_vid, e_aud = (find(cfg.image_token_id, "image"), find(cfg.video_token_id, "video"),
                                   find(cfg.audio_token_id, "audio"))
            first = min(e_img, e_vid, e_aud)
            try:
                if first == e_aud:
                    n_text = first - st - 1
                    if n_text:
                        parts.append(_text(n_text, nxt()))
                    parts.append(_text(1, nxt()))
                    n = audio_token_count(audios[aud_i])
                    parts.append(_text(n, nxt()))
                    parts.append(_text(1, nxt()))
                    st += n_text + 1 + n + 1
                    aud_i += 1
                    left["audio"] -= 1
                elif first == e_img:
                    n_text = first - st - 1
                    if n_text:
                        parts.append(_text(n_text, nxt()))
                    parts.append(_text(1, nxt()))
                    gt, gh, gw = (int(x) for x in images[img_i])
                    parts.append(_vision_positions(nxt(), np.arange(gt) * per_s, gh, gw, merge))
                    parts.append(_text(1, nxt()))
                    st += n_text + 1 + gt * gh * gw // merge ** 2 + 1
                    img_i += 1
                    left["image"] -= 1
                elif not use_audio_in_video:
                    n_text = first - st - 1
                    if n_text:
                        parts.append(_text(n_text, nxt()))
                    parts.append(_text(1, nxt()))
                    gt, gh, gw = (int(x) for x in videos[vid_i])
                    parts.append(_vision_positions(nxt(), _video_t_index(gt, spg[vid_i], per_s), gh, gw, merge))
                    parts.append(_text(1, nxt()))
                    st += n_text + 1 + gt * gh * gw // merge ** 2 + 1
                    vid_i += 1
                    left["video"] -= 1
                else:
                    n_text = first - st - 2
                    if n_text:
                        parts.append(_text(n_text, nxt()))
                    s0 = nxt()
                    parts += [_text(1, s0), _text(1, s0)]
                    s1 = nxt()
                    n_a = audio_token_count(audios[aud_i])
                    a_pos = _text(n_a, s1)
                    gt, gh, gw = (int(x) for x in videos[vid_i])
                    v_pos = _vision_positions(s1, _video_t_index(gt, spg[vid_i], per_s), gh, gw, merge)
                    per_chunk = int(per_s * cfg.seconds_per_chunk)
                    vc, ac = _chunks(v_pos[0], per_chunk, s1), _chunks(a_pos[0], per_chunk, s1)
                    for j in range(max(len(vc), len(ac))):
                        if j < len(vc):
                            parts.append(v_pos[:, vc[j][0]:vc[j][1]])
                        if j < len(ac):
                            parts.append(a_pos[:, ac[j][0]:ac[j][1]])
                    s2 = nxt()
                    parts += [_text(1, s2), _text(1, s2)]
                    st += n_text + 2 + n_a + gt * gh * gw // merge ** 2 + 2
                    aud_i += 1
                    vid_i += 1
                    left["audio"] -= 1
                    left["video"] -= 1
            except IndexError:
                raise InputError("the prompt has more media placeholders than audio/image/video inputs") from None
        if st < len(toks):
            parts.append(_text(len(toks) - st, nxt()))
        pos = np.concatenate(parts, axis=1) if parts else np.zeros((3, 0), np.int64)
        if pos.shape[1] != len(toks):
            raise InputError(f"prompt row {r}: placeholder tokens do not match the media inputs "
                             f"({pos.shape[1]} positions for {len(toks)} tokens)")
        out[:, r, mask[r]] = pos
    return out.astype(np.int32)


def media_rope_kwargs(mm: dict, audio_seqlens=None) -> dict:
    """:func:`rope_index`'s media arguments from processor outputs ``mm`` (``input_features`` /
    ``feature_attention_mask``, image and video grids, ``video_second_per_grid`` (required with
    videos, see :func:`rope_index`), ``use_audio_in_video``); ``audio_seqlens`` when already known."""
    if audio_seqlens is None:
        if mm.get("feature_attention_mask") is not None:
            audio_seqlens = np.asarray(mm["feature_attention_mask"]).sum(-1)
        elif mm.get("input_features") is not None:
            feats = np.asarray(mm["input_features"])
            audio_seqlens = [feats.shape[-1]] * feats.shape[0]
    return dict(image_grid_thw=mm.get("image_grid_thw"), video_grid_thw=mm.get("video_grid_thw"),
                audio_seqlens=audio_seqlens, second_per_grids=mm.get("video_second_per_grid"),
                use_audio_in_video=bool(mm.get("use_audio_in_video")))
