"""Media inputs of the thinker: encode audio, images and video with the model's encoders and
place their embeddings at the prompt's placeholder tokens, with TMRoPE position ids."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from .engine import bucket
from .errors import InputError


def media_layout(model, ids, mask, mm: dict, position_ids=None):
    """Encode the media of ``mm`` (processor outputs) with ``model``'s encoders (an OmniModel) and
    lay them out for ``ids [B, T]`` (as given to the jitted program).

    Returns ``(mm_embeds [M, E], mm_idx [M], position_ids [3, B, T])``: the encoder outputs in
    placeholder order (row-major, like transformers' ``masked_scatter``) and their flat
    positions in ``ids``; M is bucketed (padding rows point past the end and are dropped).
    """
    tc = model.config.thinker
    e = tc.text.hidden_size
    feats, fmask = mm.get("input_features"), mm.get("feature_attention_mask")
    images, igrid = mm.get("pixel_values"), mm.get("image_grid_thw")
    videos, vgrid = mm.get("pixel_values_videos"), mm.get("video_grid_thw")
    spg = mm.get("video_second_per_grid")
    aiv = bool(mm.get("use_audio_in_video"))
    if videos is not None and spg is None and position_ids is None:
        # a video's temporal positions need its frame rate, which pixel values do not carry (nor does
        # transformers' get_rope_index guess it): refuse rather than assume 2 fps
        raise InputError("video_second_per_grid: required with pixel_values_videos, one value per video "
                         "(temporal_patch_size / fps of its sampled frames, e.g. 1.0 at 2 fps; the processor "
                         "and messages=... compute it)")
    pieces = []
    seqlens = None
    if feats is not None:
        if model.audio is None:
            raise InputError(f"input_features: {model.path} has no audio encoder (thinker.audio_tower)")
        from .audio import encode_audio_padded

        feats = np.asarray(feats)
        fmask = np.ones((feats.shape[0], feats.shape[-1]), np.int32) if fmask is None else np.asarray(fmask)
        seqlens = fmask.sum(-1)
        pieces.append(("input_features", tc.audio_token_id,
                       encode_audio_padded(model.audio, tc.audio, feats, fmask, model.attention, mesh=model.mesh)))
    elif aiv:
        raise InputError("use_audio_in_video: needs the video's audio as input_features")
    for name, px, grid, tok in (("pixel_values", images, igrid, tc.image_token_id),
                                ("pixel_values_videos", videos, vgrid, tc.video_token_id)):
        if px is None:
            continue
        if model.vision is None:
            raise InputError(f"{name}: {model.path} has no vision encoder (thinker.visual)")
        if grid is None:
            raise InputError(f"{name}: needs its grid_thw")
        from .vision import encode_vision

        pieces.append((name, tok, encode_vision(model.vision, tc.vision, np.asarray(px), np.asarray(grid),
                                                model.attention, mesh=model.mesh)))
    b, t = ids.shape
    idx_parts, emb_parts = [], []
    for name, tok, emb in pieces:
        where = np.flatnonzero((ids == tok) & (mask == 1))
        if len(where) != emb.shape[0]:
            raise InputError(f"{name}: the media give {emb.shape[0]} embeddings but the prompt has {len(where)} "
                             f"placeholder tokens (id {tok})")
        idx_parts.append(where)
        emb_parts.append(jnp.asarray(emb, model.dtype))
    if emb_parts:
        m = sum(len(x) for x in idx_parts)
        mb = bucket(m)
        mm_idx = np.full((mb,), b * t, np.int32)
        mm_idx[:m] = np.concatenate(idx_parts)
        mm_embeds = jnp.concatenate(emb_parts + [jnp.zeros((mb - m, e), model.dtype)], axis=0)
    else:
        mm_idx = np.zeros((0,), np.int32)
        mm_embeds = jnp.zeros((0, e), model.dtype)
    if position_ids is None:
        from .tmrope import rope_index

        position_ids = rope_index(tc, ids, mask, image_grid_thw=igrid, video_grid_thw=vgrid,
                                  audio_seqlens=seqlens, second_per_grids=spg, use_audio_in_video=aiv)
    return mm_embeds, mm_idx, position_ids
