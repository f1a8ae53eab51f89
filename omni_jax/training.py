"""The training objective: ``train_loss(params, batch, config) -> (loss, aux)``.

Pure and differentiable with respect to ``params`` (a dict of ``nnx.State``: ``"thinker"`` (the
language model), and when they train or are needed ``"audio"``, ``"vision"``, ``"talker"``),
end to end through the encoders. ``batch`` is a dict of arrays laid out on the host by
:func:`make_batch` (fixed shapes per bucket, so a training step compiles once):

* thinker: ``input_ids``, ``attention_mask``, ``position_ids [3, B, T]`` (TMRoPE), ``labels``
  (transformers' convention: unshifted, ``-100`` ignored; the logits at ``t`` predict
  ``labels[t + 1]``), ``num_targets`` (the normaliser: target tokens across the whole
  gradient-accumulation step);
* media (optional): the audio encoder's chunk layout (``audio_*``), the vision encoder's window
  layout for images and videos together (``vision_*``), and where their outputs go in the
  sequence (``audio_idx``, ``vision_idx``: flat positions, padding entries past the end);
* talker (optional): the teacher-forced talker sequence, built from the thinker's hidden states
  of the same forward pass exactly as ``generate`` builds the talker's inputs (see
  :func:`talker_layout`), its positions, codec targets and ``talker_num_targets``.

The loss is the mean token cross-entropy as transformers computes it; the thinker's and the
talker's are summed (``talker_weight``). The cross-entropy runs over chunks of tokens, each
chunk's ``[chunk, vocab]`` logits recomputed in the backward pass, so the float32
``[tokens, vocab]`` logits never exist at once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import thinker as th
from .config import OmniConfig
from .engine import REPLY_EOS, REPLY_TOKEN, reply_kind
from .errors import InputError

IGNORE = -100
# talker sequence entry kinds (see talker_layout)
PAD, HIDDEN, TEXT = 0, 1, 2


# ---------------------------------------------------------------------------------------------
# parameters


@functools.lru_cache(maxsize=16)
def graphdefs(config: OmniConfig) -> dict:
    """The ``nnx`` graph definitions of each component (structure only; no weights allocated), the
    thinker's and talker's decoder layers stacked: the layout training takes (a loaded model's
    per-layer buffers convert with :func:`omni_jax.decoder.stacked_state`, as :func:`model_params`
    does)."""
    from .audio import AudioEncoder
    from .talker import Talker
    from .vision import VisionEncoder

    def shaped(build):
        return nnx.split(nnx.eval_shape(build))[0]

    out = {"thinker": shaped(lambda: th.ThinkerLM(config.thinker, rngs=nnx.Rngs(0)))}
    out["audio"] = shaped(lambda: AudioEncoder(config.thinker.audio, rngs=nnx.Rngs(0)))
    out["vision"] = shaped(lambda: VisionEncoder(config.thinker.vision, rngs=nnx.Rngs(0)))
    if config.talker is not None:
        out["talker"] = shaped(lambda: Talker(config.talker, rngs=nnx.Rngs(0)))
    return out


def _merge_decoder(config: OmniConfig, name: str, state, graphdef=None):
    """The thinker's or talker's module from ``state`` in the stacked layout (or in the layout of
    ``graphdef`` when one is given: a loaded model's per-layer one, see :func:`thinker_loss`)."""
    try:
        return nnx.merge(graphdefs(config)[name] if graphdef is None else graphdef, state)
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"params['{name}']: expected the stacked layer layout of checkpoints and training "
                         f"(omni_jax.training.model_params, OmniModel.stacked_params): {e}") from None


def model_params(model) -> dict:
    """The trainable components of a loaded :class:`omni_jax.OmniModel` as a ``params`` dict
    (decoder layers in the stacked layout training scans over: a copy of the model's per-layer
    buffers)."""
    stacked = model.stacked_params()
    p = {"thinker": stacked["thinker"]}
    if model.audio is not None:
        p["audio"] = nnx.split(model.audio)[1]
    if model.vision is not None:
        p["vision"] = nnx.split(model.vision)[1]
    if model.talker is not None:
        p["talker"] = stacked["talker"]
    return p


# ---------------------------------------------------------------------------------------------
# host side: laying out a batch


def _placement(ids, mask, token_id):
    return np.flatnonzero((ids == token_id) & (mask == 1)).astype(np.int32)


def make_batch(config: OmniConfig, input_ids, attention_mask, labels, mm: dict | None = None, *,
               num_targets=None, num_chunks: int | None = None, num_patches: int | None = None,
               talker: dict | None = None) -> dict:
    """Lay out one (micro-)batch for :func:`train_loss` (numpy arrays).

    ``mm``: the processor's media outputs (``input_features`` + ``feature_attention_mask``,
    ``pixel_values`` + ``image_grid_thw``, ``pixel_values_videos`` + ``video_grid_thw`` +
    ``video_second_per_grid``, ``use_audio_in_video``). ``num_chunks``/``num_patches`` fix the
    media buckets (default: the next bucket). ``talker``: the output of :func:`talker_layout`.
    """
    from .audio import prepare_audio
    from .tmrope import media_rope_kwargs, rope_index
    from .vision import prepare_vision

    tc = config.thinker
    mm = dict(mm or {})
    ids = np.asarray(input_ids, np.int32)
    mask = np.asarray(attention_mask, np.int32)
    lab = np.asarray(labels, np.int32)
    if ids.ndim != 2 or mask.shape != ids.shape or lab.shape != ids.shape:
        raise InputError(f"input_ids {list(ids.shape)}, attention_mask {list(mask.shape)} and labels "
                         f"{list(lab.shape)} must all be [batch, length]")
    b, t = ids.shape
    out: dict = {"input_ids": ids, "attention_mask": mask, "labels": lab}
    feats, fmask = mm.get("input_features"), mm.get("feature_attention_mask")
    seqlens = None
    if feats is not None:
        feats = np.asarray(feats, np.float32)
        fm = np.ones((feats.shape[0], feats.shape[-1]), bool) if fmask is None else np.asarray(fmask).astype(bool)
        seqlens = fm.sum(-1)
        flat = np.transpose(feats, (0, 2, 1))[fm].T
        ab = prepare_audio(tc.audio, flat, seqlens, num_chunks=num_chunks)
        where = _placement(ids, mask, tc.audio_token_id)
        if len(where) != ab.num_tokens:
            raise InputError(f"input_features: the audios give {ab.num_tokens} embeddings but the prompt has "
                             f"{len(where)} audio placeholder tokens")
        idx = np.full((len(ab.pool_a),), b * t, np.int32)
        idx[:len(where)] = where
        out.update(audio_chunks=ab.chunks.astype(np.float32), audio_chunk_lens=ab.chunk_lens,
                   audio_pool_a=ab.pool_a, audio_pool_b=ab.pool_b, audio_idx=idx)
    pix, grids, where = [], [], []
    for key, gkey, tok in (("pixel_values", "image_grid_thw", tc.image_token_id),
                           ("pixel_values_videos", "video_grid_thw", tc.video_token_id)):
        if mm.get(key) is not None:
            if mm.get(gkey) is None:
                raise InputError(f"{key}: needs its {gkey}")
            pix.append(np.asarray(mm[key], np.float32))
            grids.append(np.asarray(mm[gkey]).reshape(-1, 3))
            where.append(_placement(ids, mask, tok))
    if pix:
        vb = prepare_vision(tc.vision, np.concatenate(grids), num_patches=num_patches)
        px = np.concatenate(pix)
        if px.shape[0] != vb.num_patches:
            raise InputError(f"pixel values: the grids imply {vb.num_patches} patches, got {px.shape[0]}")
        padded = np.zeros((len(vb.order), px.shape[1]), np.float32)
        padded[:vb.num_patches] = px
        w = np.concatenate(where)
        if len(w) != vb.num_tokens:
            raise InputError(f"pixel values: the images/videos give {vb.num_tokens} embeddings but the prompt has "
                             f"{len(w)} image/video placeholder tokens")
        idx = np.full((len(vb.restore),), b * t, np.int32)
        idx[:len(w)] = w
        out.update(vision_pixels=padded, vision_order=vb.order, vision_positions=vb.positions,
                   vision_window_ids=vb.window_ids, vision_frame_ids=vb.frame_ids, vision_restore=vb.restore,
                   vision_idx=idx)
    out["position_ids"] = rope_index(tc, ids, mask, **media_rope_kwargs(mm, seqlens))
    out["num_targets"] = np.float32(count_targets(lab) if num_targets is None else num_targets)
    if talker is not None:
        out.update(talker)
        if "talker_num_targets" not in talker:
            out["talker_num_targets"] = np.float32((talker["talker_labels"] != IGNORE).sum())
    return out


def count_targets(labels) -> int:
    """Target tokens of a batch: labels after the shift that are not ignored."""
    lab = np.asarray(labels)
    return int((lab[:, 1:] != IGNORE).sum())


def talker_layout(config: OmniConfig, input_ids, attention_mask, replies, mm: dict | None = None, *,
                  length: int | None = None) -> dict:
    """The teacher-forced talker sequence of a batch, as ``generate`` feeds the talker.

    ``replies``: per row None (no speech target) or ``(start, reply_len, codec_ids, speaker_bos)``:
    the thinker's reply occupies columns ``[start, start + reply_len)`` of the row (its last token
    is its EOS), ``codec_ids`` are the spoken reply's codes ending with a talker EOS id, and
    ``speaker_bos`` is the voice's text-bos token. A talker row (left-padded to ``length``) is:
    per thinker prompt position, its hidden state + input embedding (media embeddings zeroed);
    the speaker bos embedding (+ codec pad); the first reply token (hidden + embedding, + codec
    bos); then, with each following code's input adding the previous code's embedding, reply
    tokens 1 .. reply_len - 2 (hidden + embedding), the text-eos embedding, and text-pad
    embeddings (:func:`omni_jax.engine.reply_kind`, the rule inference feeds the talker by). Targets: the codes, each at the
    position that predicts it.
    """
    from .talker import rope_view
    from .tmrope import media_rope_kwargs, rope_index

    cfg = config.talker
    if cfg is None:
        raise InputError("codec targets given, but the checkpoint has no talker")
    ids = np.asarray(input_ids)
    mask = np.asarray(attention_mask)
    b, t = ids.shape
    rows = []
    for r, rep in enumerate(replies):
        if rep is None:
            rows.append(None)
            continue
        start, m, codes, spk = rep
        first_col = int(np.argmax(mask[r])) if mask[r].any() else start
        if m < 2 or start + m > t or start <= first_col:
            raise InputError(f"row {r}: a spoken reply needs a prompt and at least one token before its EOS")
        if len(codes) < 1:
            raise InputError(f"row {r}: empty codec ids")
        rows.append((first_col, int(start), int(m), np.asarray(codes, np.int32), int(spk)))
    live = [x for x in rows if x is not None]
    need = max([(s - f) + len(c) + 1 for f, s, m, c, _ in live], default=1)
    tt = need if length is None else int(length)
    if tt < need:
        raise InputError(f"the talker sequence needs {need} positions, more than the configured {tt}")
    kind = np.zeros((b, tt), np.int32)
    src = np.zeros((b, tt), np.int32)
    extra = np.zeros((b, tt), np.int32)
    codec_in = np.full((b, tt), -1, np.int32)
    tlabels = np.full((b, tt), IGNORE, np.int32)
    tpos = np.ones((3, b, tt), np.int32)
    # positions: rope_index over [prompt, speaker bos, first reply token], as the talker's prefill sees them
    lp_max = max([(s - f) for f, s, _, _, _ in live], default=0) + 2
    p_ids = np.zeros((b, lp_max), np.int32)
    p_mask = np.zeros((b, lp_max), np.int32)
    for r, row in enumerate(rows):
        if row is None:
            p_mask[r, -1] = 1  # a placeholder token keeps rope_index's rows non-empty; the row stays masked
            continue
        f, s, m, c, spk = row
        lp = s - f
        p_ids[r, lp_max - lp - 2:] = np.concatenate([ids[r, f:s], [spk, ids[r, s]]])
        p_mask[r, lp_max - lp - 2:] = 1
    ppos = rope_index(rope_view(cfg), p_ids, p_mask, **media_rope_kwargs(mm or {}))
    for r, row in enumerate(rows):
        if row is None:
            continue
        f, s, m, c, spk = row
        lp, k = s - f, len(c)
        off = tt - (lp + 1 + k)
        kind[r, off:off + lp + 2] = HIDDEN
        src[r, off:off + lp] = r * t + np.arange(f, s)
        kind[r, off + lp] = TEXT
        extra[r, off + lp] = spk
        src[r, off + lp + 1] = r * t + s
        codec_in[r, off + lp] = cfg.tts_codec_pad_token_id
        codec_in[r, off + lp + 1] = cfg.tts_codec_start_token_id
        # step j = 1 .. k-1 takes reply entry j - 1 (engine.reply_kind, as inference feeds it; the
        # reply's EOS is its token m - 1, so entries from m - 1 on are text-pad): reply token j, then
        # text eos, then text pad
        for j in range(1, k):
            col = off + lp + 1 + j
            what = reply_kind(j - 1, m - 1)
            if what == REPLY_TOKEN:
                kind[r, col], src[r, col] = HIDDEN, r * t + s + j
            else:
                kind[r, col] = TEXT
                extra[r, col] = cfg.tts_text_end_token_id if what == REPLY_EOS else cfg.tts_text_pad_token_id
            codec_in[r, col] = c[j - 1]
        tlabels[r, off + lp + 1 + np.arange(k)] = c
        tpos[:, r, off:off + lp + 2] = ppos[:, r, lp_max - lp - 2:]
        # decoding goes on from the prompt's largest position + 1 (tmrope.decode_start), as in inference
        tpos[:, r, off + lp + 2:] = ppos[:, r, p_mask[r] == 1].max() + np.arange(1, k)[None, :]
    return dict(talker_kind=kind, talker_src=src, talker_extra=extra, talker_codec_in=codec_in,
                talker_labels=tlabels, talker_position_ids=tpos)


# ---------------------------------------------------------------------------------------------
# device side


def cross_entropy_sum(h, w, labels, *, transposed: bool, chunk: int = 256):
    """Sum of token cross-entropies of ``h [N, E]`` through the head ``w`` (``[E, V]``, or ``[V, E]``
    when ``transposed``) against ``labels [N]`` (negative: ignored). Logits are float32, computed
    ``chunk`` tokens at a time and recomputed in the backward pass."""
    n, e = h.shape
    c = max(1, min(chunk, n))
    pad = (-n) % c
    hs = jnp.pad(h, ((0, pad), (0, 0))).reshape(-1, c, e)
    ls = jnp.pad(labels, (0, pad), constant_values=IGNORE).reshape(-1, c)
    spec = "ce,ve->cv" if transposed else "ce,ev->cv"

    @jax.checkpoint
    def one(hc, lc):
        logits = jnp.einsum(spec, hc.astype(w.dtype), w, preferred_element_type=jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        tgt = jnp.take_along_axis(logits, jnp.maximum(lc, 0)[:, None], axis=-1)[:, 0]
        return jnp.sum(jnp.where(lc >= 0, lse - tgt, 0.0))

    def body(acc, x):
        return acc + one(*x), None

    total, _ = jax.lax.scan(body, jnp.float32(0.0), (hs, ls))
    return total


def _media_embeds(params, gdefs, config, batch, dtype, impl, remat):
    """Encoder outputs and their flat positions (both concatenated; empty when no media)."""
    from .audio import audio_forward
    from .vision import vision_forward

    tc = config.thinker
    embs, idxs = [], []
    if "audio_chunks" in batch:
        audio = nnx.merge(gdefs["audio"], params["audio"])
        embs.append(audio_forward(audio, tc.audio, batch["audio_chunks"], batch["audio_chunk_lens"],
                                  batch["audio_pool_a"], batch["audio_pool_b"], impl=impl, remat=remat))
        idxs.append(batch["audio_idx"])
    if "vision_pixels" in batch:
        vision = nnx.merge(gdefs["vision"], params["vision"])
        embs.append(vision_forward(vision, tc.vision, batch["vision_pixels"], batch["vision_order"],
                                   batch["vision_positions"], batch["vision_window_ids"], batch["vision_frame_ids"],
                                   batch["vision_restore"], impl=impl, remat=remat))
        idxs.append(batch["vision_idx"])
    if not embs:
        return None, None
    return jnp.concatenate([x.astype(dtype) for x in embs]), jnp.concatenate(idxs)


def thinker_forward(params, batch, config: OmniConfig, *, impl="xla", remat=False, thinker_graphdef=None):
    """Post-norm hidden states ``[B, T, E]`` of the thinker over the batch, and its input embeddings
    with media positions zeroed (the talker's embedding term). ``thinker_graphdef``: the graph
    definition ``params["thinker"]`` goes with when it is not the stacked one (:func:`thinker_loss`)."""
    gdefs = graphdefs(config)
    model = _merge_decoder(config, "thinker", params["thinker"], thinker_graphdef)
    ids = batch["input_ids"]
    b, t = ids.shape
    emb = th.embed(model, ids)
    plain = emb
    mm, idx = _media_embeds(params, gdefs, config, batch, emb.dtype, impl, remat)
    if mm is not None:
        flat = emb.reshape(b * t, -1)
        emb = flat.at[idx].set(mm, mode="drop").reshape(emb.shape)
        plain = flat.at[idx].set(jnp.zeros_like(mm), mode="drop").reshape(emb.shape)
    h, _ = th.hidden_states(model, config.thinker.text, emb, batch["position_ids"],
                            kv_valid=batch["attention_mask"].astype(bool), impl=impl, remat=remat)
    return h, plain, model


def _head(model):
    if model.lm_head is not None:
        return model.lm_head.kernel[...], False
    return model.embed_tokens.embedding[...], True


def talker_inputs(params, batch, config: OmniConfig, h, plain, thinker_model):
    """The teacher-forced talker input embeddings ``[B, Tt, E_thinker]`` (see :func:`talker_layout`)."""
    talker = _merge_decoder(config, "talker", params["talker"])
    b, t, e = h.shape
    kind = batch["talker_kind"]
    summed = (h + plain).reshape(b * t, e)
    x = jnp.take(summed, batch["talker_src"], axis=0)
    x = jnp.where((kind == TEXT)[..., None], th.embed(thinker_model, batch["talker_extra"]).astype(x.dtype), x)
    ci = batch["talker_codec_in"]
    x = x + jnp.where((ci >= 0)[..., None], talker.embed_tokens(jnp.maximum(ci, 0)).astype(x.dtype), 0)
    return jnp.where((kind == PAD)[..., None], 0, x), talker


def _talker_hidden(params, batch, config, h, plain, model, *, impl, remat, train_thinker):
    from . import talker as tk

    if not train_thinker:
        h, plain = jax.lax.stop_gradient(h), jax.lax.stop_gradient(plain)
    x, talker = talker_inputs(params, batch, config, h, plain, model)
    ht, _ = tk.hidden_states(talker, config.talker, x, batch["talker_position_ids"],
                             kv_valid=batch["talker_kind"] != PAD, impl=impl, remat=remat)
    return ht, talker


def talker_logits(params, batch, config: OmniConfig, *, impl="xla", remat=False):
    """Teacher-forced talker logits ``[B, Tt, codec_vocab]`` (float32); position ``j`` predicts
    ``talker_labels[j]``."""
    h, plain, model = thinker_forward(params, batch, config, impl=impl, remat=remat)
    ht, talker = _talker_hidden(params, batch, config, h, plain, model, impl=impl, remat=remat, train_thinker=False)
    w = talker.codec_head.kernel[...]
    return jnp.einsum("bth,hv->btv", ht.astype(w.dtype), w, preferred_element_type=jnp.float32)


def train_loss(params, batch, config: OmniConfig, *, impl: str = "xla", remat: bool = False,
               talker_weight: float = 1.0, talker_trains_thinker: bool = False, ce_chunk: int = 256):
    """``(loss, aux)``: the thinker's mean token cross-entropy over its targets (``labels``), plus
    ``talker_weight`` x the talker's over its codec targets when the batch has them; each is a sum
    divided by the batch's ``num_targets`` / ``talker_num_targets`` (counts over the whole
    accumulation step, so micro-batch losses add up to the mean). The talker sees the thinker's
    states through ``stop_gradient`` unless ``talker_trains_thinker``.
    ``aux``: ``thinker_loss_sum``, ``thinker_tokens``, and ``talker_loss_sum``/``talker_tokens``.
    ``params["thinker"]``/``params["talker"]`` hold their decoder layers stacked (the checkpoint and
    training layout, one ``lax.scan``: :func:`model_params`; a loaded model's per-layer buffers
    convert with :func:`omni_jax.decoder.stacked_state`).

    Meshes: ``params`` may lie on a mesh of Auto axes (as :func:`model_params` and the trainer place
    them) or of Explicit ones (``jax.make_mesh``'s default), and the call may sit inside a caller's
    ``jax.set_mesh``: the loss runs on the parameters' mesh with its axes Auto
    (:func:`omni_jax.sharding.on_arrays_mesh`) and returns replicated scalars."""
    from .sharding import on_arrays_mesh

    return on_arrays_mesh(lambda p, b: _train_loss(p, b, config, impl=impl, remat=remat, talker_weight=talker_weight,
                                                   talker_trains_thinker=talker_trains_thinker, ce_chunk=ce_chunk),
                          params, batch)


def thinker_loss(params, batch, config: OmniConfig, thinker_graphdef, *, impl: str = "xla", ce_chunk: int = 256):
    """The thinker's term of :func:`train_loss` (forward only), with ``params["thinker"]`` in the
    layout of ``thinker_graphdef``: a loaded model's per-layer buffers as they are (its layers run as
    the Python loop of inference), so evaluating a loaded model's loss copies no weights."""
    h, _, model = thinker_forward(params, batch, config, impl=impl, thinker_graphdef=thinker_graphdef)
    return _thinker_term(h, model, batch, ce_chunk)[0]


def _thinker_term(h, model, batch, ce_chunk):
    b, t, e = h.shape
    labels = jnp.concatenate([batch["labels"][:, 1:], jnp.full((b, 1), IGNORE, jnp.int32)], axis=1)
    w, transposed = _head(model)
    tsum = cross_entropy_sum(h.reshape(b * t, e), w, labels.reshape(-1), transposed=transposed, chunk=ce_chunk)
    loss = tsum / jnp.maximum(batch["num_targets"], 1.0)
    return loss, {"thinker_loss_sum": tsum, "thinker_tokens": jnp.sum(labels >= 0)}


def _train_loss(params, batch, config: OmniConfig, *, impl, remat, talker_weight, talker_trains_thinker, ce_chunk):
    h, plain, model = thinker_forward(params, batch, config, impl=impl, remat=remat)
    loss, aux = _thinker_term(h, model, batch, ce_chunk)
    if "talker_kind" in batch and "talker" in params:
        ht, talker = _talker_hidden(params, batch, config, h, plain, model, impl=impl, remat=remat,
                                    train_thinker=talker_trains_thinker)
        tl = batch["talker_labels"]
        bt, tt, hd = ht.shape
        csum = cross_entropy_sum(ht.reshape(bt * tt, hd), talker.codec_head.kernel[...], tl.reshape(-1),
                                 transposed=False, chunk=ce_chunk)
        loss = loss + talker_weight * csum / jnp.maximum(batch["talker_num_targets"], 1.0)
        aux.update(talker_loss_sum=csum, talker_tokens=jnp.sum(tl >= 0))
    return loss, aux
