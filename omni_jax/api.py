"""The public API: ``omni_jax.load`` and :class:`OmniModel`."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import layers
from . import thinker as th
from .attention import default_impl
from .config import OmniConfig, load_config
from .decoder import cache_for, stacked_state, to_per_layer
from .errors import CheckpointError, InputError
from .generate import DecodeState, decode_loop, initial_state, make_sampling
from .processor import TextProcessor, TextStreamer, is_batch_of_conversations, left_pad
from .sharding import MeshJit, as_auto_mesh, outside_context_mesh, to_host, use_mesh
from .tmrope import decode_start
from .validate import check_finite


DTYPES = {"bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16, "float32": jnp.float32, "fp32": jnp.float32}
MULTIMODAL_ARGS = ("input_features", "feature_attention_mask", "pixel_values", "image_grid_thw",
                   "pixel_values_videos", "video_grid_thw", "video_second_per_grid")
# components whose tensors are recognised but not loaded by this version
PENDING_PREFIXES = ()


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
        return int(self.state.n) >= self.max_new_tokens or bool(np.all(np.asarray(self.state.done)))

    def new_tokens(self) -> np.ndarray:
        """Generated ids so far ``[B, n]`` (finished rows padded with the pad id)."""
        return np.asarray(self.state.tokens[:, :int(self.state.n)])


@outside_context_mesh
@dataclass
class TalkerRun:
    """A talker generation in progress (see OmniModel._talker_start)."""

    state: Any
    sp: Any
    eos: list
    eos_arr: np.ndarray
    pad: Any
    do_sample: bool
    max_new: int
    thinker_eos: np.ndarray
    extra: np.ndarray
    rest: tuple = (0, None)  # (thinker tokens, reply parts built from them)
    taken: int = 0  # codes handed out so far (streaming)

    @property
    def finished(self) -> bool:
        return int(self.state.n) >= self.max_new or bool(np.all(np.asarray(self.state.done)))

    def codes(self) -> list[np.ndarray]:
        """Codec ids per row, cut at the row's first talker EOS."""
        out = []
        for row in np.asarray(self.state.tokens[:, :int(self.state.n)]):
            hit = np.nonzero(np.isin(row, self.eos))[0]
            out.append(row[:hit[0]] if len(hit) else row)
        return out


def bucket(n: int, minimum: int = 16) -> int:
    """Static-shape bucket: the next power of two >= n (at least ``minimum``)."""
    b = minimum
    while b < n:
        b *= 2
    return b


def _dtype(name) -> Any:
    if isinstance(name, str) and name.lower() in DTYPES:
        return DTYPES[name.lower()]
    if name in (jnp.bfloat16, jnp.float32):
        return name
    raise InputError(f"dtype '{name}' is not supported (bfloat16 or float32)")


@outside_context_mesh
def load(path, *, dtype="bfloat16", mesh=None, attention=None) -> "OmniModel":
    """Load a Hugging Face Qwen2.5-Omni checkpoint directory.

    ``dtype``: thinker/talker parameters and activations (``"bfloat16"`` or ``"float32"``).
    ``mesh``: a ``jax.sharding.Mesh`` over axes among data/fsdp/tensor (Auto, Explicit or mixed axis
    types: ``jax.make_mesh``'s or :func:`omni_jax.make_mesh`'s), a spec such as ``"data=2,tensor=4"``,
    or None (one device). The model computes on the same devices and axes with Auto axis types
    (omni_jax.sharding.as_auto_mesh); ``model.mesh`` is that mesh, and the model's own device arrays
    (parameters, a Generation's state) carry shardings on it. Results come back as numpy arrays.
    ``attention``: ``"xla"``, ``"pallas"`` or None (``$OMNI_JAX_ATTENTION`` if set, else Pallas on GPU/TPU
    and XLA on CPU; see omni_jax.attention.default_impl).

    ``load`` and the model's methods may be called inside ``with jax.set_mesh(m):`` (any mesh, any
    axis types): they run with the context mesh cleared and give it back on return (a stream,
    between events), so it only governs the caller's own code (omni_jax.sharding.no_context_mesh).
    """
    path = os.path.expanduser(os.fspath(path))  # "~/ckpt" from Python as from a shell
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory (expected a Qwen2.5-Omni checkpoint directory)")
    dt = _dtype(dtype)
    impl = attention or default_impl()
    if impl not in ("xla", "pallas"):
        raise InputError(f"attention '{attention}' is not one of 'xla', 'pallas'")
    mesh = as_auto_mesh(mesh)  # Explicit or mixed axis types -> the same mesh with Auto axes
    cfg = load_config(path)
    from convert.orbax_io import is_converted

    if is_converted(path):  # a directory written by `omni-jax convert`
        from convert.convert import load_converted

        parts = load_converted(path, cfg, dtype=dt, mesh=mesh)
        graphdef, state = parts["thinker"]
        audio, vision, talker, t2w = parts["audio"], parts["vision"], parts["talker"], parts["token2wav"]
    else:
        graphdef, state, audio, vision, talker, t2w = _load_hf(path, cfg, dt, mesh)
    voices = None
    if os.path.exists(os.path.join(path, "spk_dict.pt")):
        from .voices import load_voices

        voices = load_voices(os.path.join(path, "spk_dict.pt"))
    processor = TextProcessor.from_dir(path)
    # decoder layers as per-layer buffers (see omni_jax.decoder); the stacked arrays are ours: free them
    # as they are sliced, so loading never holds two copies of the layers
    graphdef, state = to_per_layer(graphdef, state, free=True)
    if talker is not None:
        talker = to_per_layer(*talker, free=True)
    return OmniModel(cfg, graphdef, state, processor=processor, dtype=dt, mesh=mesh, attention=impl,
                     generation_config=_generation_config(path, processor), path=path, audio=audio, vision=vision,
                     talker=talker, voices=voices, token2wav=t2w)


def _load_hf(path, cfg, dt, mesh):
    """The components of a Hugging Face checkpoint directory (memory-mapped, one tensor at a time)."""
    from convert.hf import THINKER_LM_PREFIXES, check_unexpected, load_component
    from convert.safetensors_io import Checkpoint

    ckpt = Checkpoint(path)
    consumed: set[str] = set()
    abstract = nnx.eval_shape(lambda: th.ThinkerLM(cfg.thinker, dtype=dt, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    state = load_component(ckpt, state, prefixes=THINKER_LM_PREFIXES, dtype=dt, mesh=mesh, consumed=consumed)
    if cfg.thinker.tie_word_embeddings and "thinker.lm_head.weight" in ckpt:
        consumed.add("thinker.lm_head.weight")  # tied: transformers ignores a stored head too
    keys = list(ckpt.keys())
    audio = vision = None
    if any(k.startswith("thinker.audio_tower.") for k in keys):
        from .audio import load_audio

        audio = load_audio(ckpt, cfg.thinker.audio, dt, consumed, mesh=mesh)
    if any(k.startswith("thinker.visual.") for k in keys):
        from .vision import load_vision

        vision = load_vision(ckpt, cfg.thinker.vision, dt, consumed, mesh=mesh)
    talker = None
    if cfg.talker is not None and any(k.startswith("talker.") for k in keys):
        from .talker import TALKER_PREFIXES, Talker

        abstract_t = nnx.eval_shape(lambda: Talker(cfg.talker, dtype=dt, rngs=nnx.Rngs(0)))
        tg, ts = nnx.split(abstract_t)
        talker = (tg, load_component(ckpt, ts, prefixes=TALKER_PREFIXES, dtype=dt, mesh=mesh, consumed=consumed,
                                     sharding_prefix="talker/"))
    t2w = None
    if cfg.token2wav is not None and any(k.startswith("token2wav.") for k in keys):
        from .token2wav import load_token2wav

        t2w = load_token2wav(ckpt, cfg.token2wav, consumed)
    check_unexpected(ckpt, consumed, PENDING_PREFIXES)
    return graphdef, state, audio, vision, talker, t2w


# transformers' GenerationConfig defaults for the fields a caller and the checkpoint's
# generation_config.json may both leave unset (GenerationConfig._get_default_generation_params)
GENERATION_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0}
# new tokens when neither the caller nor generation_config.json gives max_new_tokens or max_length: the
# thinker_max_new_tokens default of transformers' Qwen2.5-Omni generate (GenerationConfig's own fallback,
# max_length=20 in all, is a model-agnostic placeholder that transformers warns about)
DEFAULT_MAX_NEW_TOKENS = 1024
# generation_config.json fields read (beside EOS and pad) and the types each must have
_GC_FIELDS = {"do_sample": (bool,), "temperature": (int, float), "top_k": (int,), "top_p": (int, float),
              "repetition_penalty": (int, float), "max_new_tokens": (int,), "max_length": (int,)}


def _generation_config(path: str, processor: TextProcessor | None) -> dict:
    """The checkpoint's ``generation_config.json`` as the fields generation reads: ``eos_token_id``
    (a list; the tokenizer's ``<|im_end|>``/``<|endoftext|>`` when the file has none),
    ``pad_token_id`` (the first EOS when none), and ``do_sample``, ``temperature``, ``top_k``,
    ``top_p``, ``repetition_penalty``, ``max_new_tokens``, ``max_length`` (None where the file is
    silent or null, like an unset field of transformers' GenerationConfig)."""
    gc: dict = {}
    p = os.path.join(path, "generation_config.json")
    if os.path.exists(p):
        try:
            with open(p, encoding="utf-8") as f:
                gc = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{p}: cannot read ({e})") from None
        if not isinstance(gc, dict):
            raise CheckpointError(f"{p}: expected a JSON object")
    out: dict = {}
    for name, types in _GC_FIELDS.items():
        v = gc.get(name)
        bad = v is not None and (not isinstance(v, types) or (bool not in types and isinstance(v, bool)))
        if not bad and v is not None and name != "do_sample":
            bad = v < 0 or (name in ("repetition_penalty", "max_new_tokens", "max_length") and v == 0) or \
                (name == "top_p" and v > 1)
        if bad:
            raise CheckpointError(f"{p}: {name} {v!r} is not a valid value")
        out[name] = v
    eos = gc.get("eos_token_id")
    if eos is None and processor is not None:
        eos = [i for i in (processor.token_id("<|im_end|>"), processor.token_id("<|endoftext|>")) if i is not None]
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    pad = gc.get("pad_token_id")
    if pad is None:
        pad = eos[0] if eos else 0
    return {"eos_token_id": eos, "pad_token_id": int(pad), **out}


@outside_context_mesh
class OmniModel:
    """A loaded Qwen2.5-Omni. Methods take numpy/lists and return numpy; all compute is jitted."""

    def __init__(self, config: OmniConfig, graphdef, params, *, processor, dtype, mesh, attention,
                 generation_config, path=None, audio=None, vision=None, talker=None, voices=None, token2wav=None):
        self.config = config
        self.processor = processor
        self.dtype = dtype
        self.mesh = mesh
        self.attention = attention
        self.generation_config = generation_config
        self.path = path
        # the thinker LM and the talker hold their decoder layers as per-layer buffers (layers/<i>/...;
        # omni_jax.decoder.to_per_layer): the jitted programs read each weight once per step
        self._graphdef, self._params = to_per_layer(graphdef, params)
        self.audio = audio  # AudioEncoder (nnx module) or None when the checkpoint has none
        self.vision = vision  # VisionEncoder or None
        self.talker = None if talker is None else to_per_layer(*talker)  # (graphdef, params) of the Talker
        self.voices: dict = voices or {}  # speaker name -> omni_jax.voices.Voice (from spk_dict.pt)
        # the Token2Wav module (float32), or None; its DiT blocks per layer (token2wav.dit_per_layer:
        # an ODE solve then reads each layer's weights in place instead of slicing the stacked ones)
        self.token2wav_params = token2wav
        if token2wav is not None:
            from .token2wav import dit_per_layer

            dit_per_layer(token2wav.code2wav_dit_model)
            self.token2wav_parts  # split now, not at the first reply's speech
        self._build()

    @property
    def token2wav_parts(self):
        """``token2wav_params`` split once for calls (:func:`omni_jax.token2wav.presplit_token2wav`:
        splitting the module per call costs ~40 ms of Python, per chunk in a stream), kept until
        ``token2wav_params`` is replaced; None without token2wav weights."""
        t2w = self.token2wav_params
        if t2w is None:
            return None
        cached = getattr(self, "_t2w_parts", None)
        if cached is None or cached[0] is not t2w:
            from .token2wav import presplit_token2wav

            cached = self._t2w_parts = (t2w, presplit_token2wav(t2w))
        return cached[1]

    @property
    def params(self):
        """The thinker LM's ``nnx.State``, decoder layers as per-layer buffers (``layers/<i>/...``).
        Assigning a state in the checkpoint's stacked layout (``layers/...`` with a leading layer
        axis, as training produces) converts it (a copy)."""
        return self._params

    @params.setter
    def params(self, state):
        from .training import graphdefs

        try:
            state = to_per_layer(graphdefs(self.config)["thinker"], state)[1]
            same = jax.tree.structure(state) == jax.tree.structure(self._params)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError):
            same = False
        if not same:
            raise InputError("params: the state does not have this model's thinker structure")
        self._params = state

    def stacked_params(self) -> dict:
        """The thinker LM (``"thinker"``) and talker (``"talker"``, when loaded) states in the
        checkpoint's stacked layer layout (copies of the layer weights): what training and
        conversion take."""
        out = {"thinker": stacked_state(self._graphdef, self._params)}
        if self.talker is not None:
            out["talker"] = stacked_state(*self.talker)
        return out

    # ---------------------------------------------------------------------------------
    # jitted programs (one compile per shape bucket)
    def _build(self):
        gdef, tcfg, impl = self._graphdef, self.config.thinker.text, self.attention
        vocab = tcfg.vocab_size

        def embed_fn(model, ids, mm_embeds, mm_idx):
            b, t = ids.shape
            emb = th.embed(model, ids)
            flat = emb.reshape(b * t, -1).at[mm_idx].set(mm_embeds.astype(emb.dtype), mode="drop")
            return flat.reshape(emb.shape)

        def logits_fn(params, ids, mask, pos, mm_embeds, mm_idx, keep):
            model = nnx.merge(gdef, params)
            h, _ = th.hidden_states(model, tcfg, embed_fn(model, ids, mm_embeds, mm_idx), pos,
                                    kv_valid=mask.astype(bool), impl=impl)
            return th.lm_logits(model, h[:, -keep:])

        def step_fn(model, s: DecodeState):
            emb = th.embed(model, s.last[:, None])
            h, cache = th.hidden_states(model, tcfg, emb, s.next_pos[:, :, None], cache=s.cache, start=s.slot,
                                        kv_valid=s.kv_valid, impl=impl)
            return th.lm_logits(model, h[:, 0]), cache, h[:, 0]

        def prefill_fn(params, ids, mask, pos, mm_embeds, mm_idx, sp, rng, max_new, eos, pad, n_bucket, do_sample,
                       collect):
            """Prefill; with ``collect`` also the talker's inputs: the prompt's post-norm hidden states and
            its input embeddings with media positions zeroed, and a per-token hidden buffer."""
            model = nnx.merge(gdef, params)
            b, t = ids.shape
            cache = cache_for(model.layers, th.decoder_shape(tcfg), b, t + n_bucket, self.dtype)
            kv_valid = jnp.concatenate([mask.astype(bool), jnp.ones((b, n_bucket), bool)], axis=1)
            h, cache = th.hidden_states(model, tcfg, embed_fn(model, ids, mm_embeds, mm_idx), pos, cache=cache,
                                        start=0, kv_valid=kv_valid, impl=impl)
            logits = th.lm_logits(model, h[:, -1])
            seen = jnp.zeros((b, vocab), jnp.int32).at[jnp.arange(b)[:, None], ids].max(mask) > 0
            # each stream goes on from its last prompt position + 1, as transformers' generate extends the
            # thinker's position ids (GenerationMixin._update_model_kwargs_for_generation); the talker differs
            state = initial_state(logits, cache, kv_valid, seen, pos[:, :, -1] + 1, t, sp, rng, max_new, eos, pad,
                                  n_bucket, do_sample, hidden_dim=tcfg.hidden_size if collect else 0,
                                  hidden_dtype=self.dtype)
            if not collect:
                return state, None
            plain = embed_fn(model, ids, jnp.zeros_like(mm_embeds), mm_idx)  # media positions zeroed
            return state, {"prompt_hidden": h, "prompt_embeds": plain}

        def decode_fn(params, state, n_steps, sp, eos, pad, do_sample):
            model = nnx.merge(gdef, params)
            return decode_loop(partial(step_fn, model), state, n_steps, sp, eos_ids=eos, pad_id=pad,
                               do_sample=do_sample)

        def embed_tokens_fn(params, ids):
            return th.embed(nnx.merge(gdef, params), ids)

        self._embed_jit = jax.jit(embed_tokens_fn)
        mesh, bt, bt3 = self.mesh, ("batch", None), (None, "batch", None)
        self._logits_jit = MeshJit(logits_fn, mesh, ["own", bt, bt, bt3, None, None, None], static_argnums=(6,),
                                   out_axes=lambda path, nd: ("batch", None, "act_vocab")[:nd])
        if self.talker is not None:
            self._build_talker()
        self._prefill_jit = MeshJit(prefill_fn, mesh, ["own", bt, bt, bt3, None, None, None, ("batch",), None, None,
                                                       None, None, None, None], static_argnums=(11, 12, 13))
        self._decode_jit = MeshJit(decode_fn, mesh, ["own", "io", None, None, None, None, None], static_argnums=(6,),
                                   donate_argnums=(1,))

    def _build_talker(self):
        from . import talker as tk

        tgdef = self.talker[0]
        cfg, impl = self.config.talker, self.attention

        def prefill_fn(tparams, embeds, mask, pos, seen, sp, rng, max_new, eos, pad, min_new, suppress, n_bucket,
                       do_sample):
            model = nnx.merge(tgdef, tparams)
            b, t, _ = embeds.shape
            codec = model.embed_tokens(jnp.asarray([cfg.tts_codec_pad_token_id, cfg.tts_codec_start_token_id]))
            embeds = embeds.at[:, -2].add(codec[0]).at[:, -1].add(codec[1])
            cache = cache_for(model.layers, tk.decoder_shape(cfg), b, t + n_bucket, self.dtype)
            kv_valid = jnp.concatenate([mask.astype(bool), jnp.ones((b, n_bucket), bool)], axis=1)
            logits, cache = tk.logits(model, cfg, embeds, pos, cache=cache, start=0, kv_valid=kv_valid,
                                      impl=impl)
            # the talker decodes from its prompt's largest position + 1 (transformers' talker rope_deltas)
            return initial_state(logits[:, -1], cache, kv_valid, seen, decode_start(pos, mask), t, sp, rng, max_new,
                                 eos, pad, n_bucket, do_sample, min_new=min_new, suppress=suppress)

        def decode_fn(tparams, state, rest, n_steps, sp, eos, pad, do_sample):
            model = nnx.merge(tgdef, tparams)
            r = rest.shape[1]

            def step_fn(s):
                inp = jax.lax.dynamic_index_in_dim(rest, jnp.minimum(s.n - 1, r - 1), 1, keepdims=False)
                emb = (model.embed_tokens(s.last) + inp)[:, None]
                logits, cache = tk.logits(model, cfg, emb, s.next_pos[:, :, None], cache=s.cache, start=s.slot,
                                          kv_valid=s.kv_valid, impl=impl)
                return logits[:, 0], cache, logits[:, 0, :0]

            return decode_loop(step_fn, state, n_steps, sp, eos_ids=eos, pad_id=pad, do_sample=do_sample)

        def reply_fn(params, gen_tokens, gen_hidden, n, eos_ids, extra_ids):
            model = nnx.merge(self._graphdef, params)
            ex = th.embed(model, extra_ids)  # text bos (speaker), text eos, text pad
            first, rest = tk.reply_parts(gen_tokens, gen_hidden, n, lambda x: th.embed(model, x), eos_ids, ex[1],
                                         ex[2])
            return ex[0], first, rest

        mesh, bt = self.mesh, ("batch", None)
        self._talker_prefill_jit = MeshJit(
            prefill_fn, mesh, ["own", ("batch", None, "act_embed"), bt, (None, "batch", None), bt, None, ("batch",),
                               None, None, None, None, None, None, None], static_argnums=(12, 13))
        self._talker_decode_jit = MeshJit(
            decode_fn, mesh, ["own", "io", ("batch", None, "act_embed"), None, None, None, None, None],
            static_argnums=(7,), donate_argnums=(1,))
        self._reply_jit = jax.jit(reply_fn)

    def _talker_codes(self, gen: "Generation", **kw) -> list[np.ndarray]:
        """Run the talker on a finished thinker generation; returns one codec-id array per row."""
        run = self._talker_start(gen, **kw)
        if run is None:
            return [np.zeros((0,), np.int32) for _ in range(gen.state.tokens.shape[0])]
        self._talker_advance(run, gen, None)
        return run.codes()

    def _talker_start(self, gen: "Generation", *, speaker_bos: int, mm: dict, seed: int, talker_max_new_tokens=4096,
                      talker_min_new_tokens=0, talker_do_sample=True, talker_top_k=40, talker_top_p=0.8,
                      talker_temperature=0.9, talker_repetition_penalty=1.05, talker_eos_token_id=None):
        """The talker's prefill, as soon as the thinker has fed its first reply token (n >= 2); None before."""
        from .talker import rope_view
        from .tmrope import media_rope_kwargs, rope_index

        cfg = self.config.talker
        self._check_sampling(talker_max_new_tokens, talker_do_sample, talker_temperature, talker_top_k,
                             talker_top_p, talker_repetition_penalty)
        st = gen.state
        n = int(st.n)
        b = st.tokens.shape[0]
        if n < 2:
            return None
        eos = np.asarray(gen.eos if gen.eos else [-1], np.int32)
        extra = np.asarray([speaker_bos, cfg.tts_text_end_token_id, cfg.tts_text_pad_token_id], np.int32)
        bos_e, first, rest = self._reply_jit(self.params, st.tokens, st.hidden, st.n, eos, extra)
        ti = gen.talker_inputs
        e = ti["prompt_hidden"].shape[-1]
        embeds = jnp.concatenate([ti["prompt_hidden"] + ti["prompt_embeds"], jnp.broadcast_to(bos_e, (b, 1, e)),
                                  first[:, None]], axis=1)
        mask = np.concatenate([gen.aligned_mask, np.ones((b, 2), np.int32)], axis=1)
        text_ids = np.concatenate([gen.aligned_ids, np.full((b, 1), speaker_bos, np.int32),
                                   np.asarray(st.tokens[:, :1])], axis=1)
        pos = rope_index(rope_view(cfg), text_ids, mask, **media_rope_kwargs(mm))
        v = cfg.vocab_size
        seen = np.zeros((b, v), bool)
        seen[:, [cfg.tts_codec_mask_token_id, cfg.tts_codec_pad_token_id, cfg.tts_codec_start_token_id]] = True
        teos = talker_eos_token_id if talker_eos_token_id is not None else [cfg.tts_codec_pad_token_id,
                                                                            cfg.tts_codec_end_token_id]
        teos = [teos] if isinstance(teos, (int, np.integer)) else list(teos)
        suppress = np.zeros((v,), bool)
        suppress[cfg.tts_codec_start_token_id] = True
        sp = make_sampling(talker_temperature, talker_top_k, talker_top_p, talker_repetition_penalty, v)
        rng = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(int(seed) + 1), i))(jnp.arange(b))
        run = TalkerRun(state=None, sp=sp, eos=teos, eos_arr=np.asarray(teos if teos else [-1], np.int32),
                        pad=np.int32(cfg.tts_codec_pad_token_id), do_sample=bool(talker_do_sample),
                        max_new=int(talker_max_new_tokens), thinker_eos=eos, extra=extra, rest=(n, rest))
        with use_mesh(self.mesh):
            run.state = self._talker_prefill_jit(self.talker[1], embeds, mask, pos, seen, sp, rng,
                                                 np.int32(talker_max_new_tokens), run.eos_arr, run.pad,
                                                 np.int32(talker_min_new_tokens), suppress,
                                                 bucket(talker_max_new_tokens), run.do_sample)
        return run

    def _talker_advance(self, run: "TalkerRun", gen: "Generation", final: int | None, limit: int | None = None):
        """Advance the talker while its next input is final: reply entries ``k < final`` (None: the
        thinker has finished, run to the end), at most ``limit`` steps."""
        if run.finished:
            return
        st = gen.state
        todo = run.max_new if final is None else final - (int(run.state.n) - 1)
        if limit is not None:
            todo = min(todo, limit)
        if todo <= 0:
            return
        n = int(st.n)
        if run.rest[0] != n:  # the thinker moved on since the reply parts were built
            run.rest = (n, self._reply_jit(self.params, st.tokens, st.hidden, st.n, run.thinker_eos, run.extra)[2])
        rest = run.rest[1]
        with use_mesh(self.mesh):
            run.state = self._talker_decode_jit(self.talker[1], run.state, rest, np.int32(todo), run.sp,
                                                run.eos_arr, run.pad, run.do_sample)

    def _batch(self, x, axis: int = 0):
        """Place a host batch array with its batch axis sharded over the mesh's data/fsdp axes."""
        if self.mesh is None:
            return x
        from jax.sharding import NamedSharding

        from .sharding import logical_to_spec, put

        names = [None] * np.ndim(x)
        names[axis] = "batch"
        return put(x, NamedSharding(self.mesh, logical_to_spec(names, np.shape(x), self.mesh)))

    def compile_counts(self) -> dict[str, int]:
        """How many programs each jitted entry point has compiled (one per shape bucket)."""
        return {name: getattr(self, f"_{name}_jit")._cache_size() for name in ("logits", "prefill", "decode")}

    # ---------------------------------------------------------------------------------
    # input checking
    def _ids_and_mask(self, input_ids, attention_mask):
        if input_ids is None:
            raise InputError("input_ids: required (or pass messages=...)")
        try:
            ids = np.asarray(input_ids)
        except Exception:
            raise InputError("input_ids: not an array of token ids") from None
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.shape[1] == 0 or ids.dtype.kind not in "iu":
            raise InputError(f"input_ids: expected a non-empty int array [batch, length], got shape {ids.shape} "
                             f"and dtype {ids.dtype}")
        v = self.config.thinker.text.vocab_size
        if ids.min() < 0 or ids.max() >= v:
            raise InputError(f"input_ids: token ids must be in [0, {v}) (vocab_size); got {ids.min()}..{ids.max()}")
        if attention_mask is None:
            mask = np.ones(ids.shape, np.int32)
        else:
            mask = np.asarray(attention_mask)
            if mask.ndim == 1:
                mask = mask[None]
            if mask.shape != ids.shape:
                raise InputError(f"attention_mask: shape {mask.shape} does not match input_ids {ids.shape}")
            if not np.isin(mask, (0, 1)).all():
                raise InputError("attention_mask: values must be 0 or 1")
            mask = mask.astype(np.int32)
        if (mask.sum(1) == 0).any():
            raise InputError("attention_mask: a row has no unmasked token")
        limit = self.config.thinker.text.max_position_embeddings
        if int(mask.sum(1).max()) > limit:
            raise InputError(f"prompt of {int(mask.sum(1).max())} tokens is longer than max_position_embeddings "
                             f"({limit})")
        return ids.astype(np.int32), mask

    def _check_position_ids(self, position_ids, shape):
        pos = np.asarray(position_ids)
        if pos.ndim == 2:
            pos = np.broadcast_to(pos[None], (3, *pos.shape))
        if pos.shape != (3, *shape):
            raise InputError(f"position_ids: expected shape [3, {shape[0]}, {shape[1]}], got {list(pos.shape)}")
        return pos.astype(np.int32)

    def _multimodal(self, ids, mask, mm: dict, position_ids=None):
        """Encode the media and lay them out for ``ids [B, T]`` (as given to the jitted program).

        Returns ``(mm_embeds [M, E], mm_idx [M], position_ids [3, B, T])``: the encoder outputs in
        placeholder order (row-major, like transformers' ``masked_scatter``) and their flat
        positions in ``ids``; M is bucketed (padding rows point past the end and are dropped).
        """
        tc = self.config.thinker
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
            if self.audio is None:
                raise InputError(f"input_features: {self.path} has no audio encoder (thinker.audio_tower)")
            from .audio import encode_audio_padded

            feats = np.asarray(feats)
            fmask = np.ones((feats.shape[0], feats.shape[-1]), np.int32) if fmask is None else np.asarray(fmask)
            seqlens = fmask.sum(-1)
            pieces.append(("input_features", tc.audio_token_id,
                           encode_audio_padded(self.audio, tc.audio, feats, fmask, self.attention, mesh=self.mesh)))
        elif aiv:
            raise InputError("use_audio_in_video: needs the video's audio as input_features")
        for name, px, grid, tok in (("pixel_values", images, igrid, tc.image_token_id),
                                    ("pixel_values_videos", videos, vgrid, tc.video_token_id)):
            if px is None:
                continue
            if self.vision is None:
                raise InputError(f"{name}: {self.path} has no vision encoder (thinker.visual)")
            if grid is None:
                raise InputError(f"{name}: needs its grid_thw")
            from .vision import encode_vision

            pieces.append((name, tok, encode_vision(self.vision, tc.vision, np.asarray(px), np.asarray(grid),
                                                    self.attention, mesh=self.mesh)))
        b, t = ids.shape
        idx_parts, emb_parts = [], []
        for name, tok, emb in pieces:
            where = np.flatnonzero((ids == tok) & (mask == 1))
            if len(where) != emb.shape[0]:
                raise InputError(f"{name}: the media give {emb.shape[0]} embeddings but the prompt has {len(where)} "
                                 f"placeholder tokens (id {tok})")
            idx_parts.append(where)
            emb_parts.append(jnp.asarray(emb, self.dtype))
        if emb_parts:
            m = sum(len(x) for x in idx_parts)
            mb = bucket(m)
            mm_idx = np.full((mb,), b * t, np.int32)
            mm_idx[:m] = np.concatenate(idx_parts)
            mm_embeds = jnp.concatenate(emb_parts + [jnp.zeros((mb - m, e), self.dtype)], axis=0)
        else:
            mm_idx = np.zeros((0,), np.int32)
            mm_embeds = jnp.zeros((0, e), self.dtype)
        if position_ids is None:
            from .tmrope import rope_index

            position_ids = rope_index(tc, ids, mask, image_grid_thw=igrid, video_grid_thw=vgrid,
                                      audio_seqlens=seqlens, second_per_grids=spg, use_audio_in_video=aiv)
        return mm_embeds, mm_idx, position_ids

    # ---------------------------------------------------------------------------------
    def thinker_logits(self, input_ids, attention_mask=None, position_ids=None, *, logits_to_keep=None,
                       **multimodal) -> np.ndarray:
        """Thinker logits ``np.float32 [B, T, V]`` (the last ``logits_to_keep`` positions if given)."""
        unknown = set(multimodal) - set(MULTIMODAL_ARGS) - {"use_audio_in_video"}
        if unknown:
            raise InputError(f"unknown argument(s): {', '.join(sorted(unknown))}")
        ids, mask = self._ids_and_mask(input_ids, attention_mask)
        b, t = ids.shape
        pos = self._check_position_ids(position_ids, (b, t)) if position_ids is not None else None
        tb = bucket(t)
        pad = tb - t
        ids_p = np.pad(ids, ((0, 0), (pad, 0)))
        mask_p = np.pad(mask, ((0, 0), (pad, 0)))
        if pos is not None:
            pos = np.pad(pos, ((0, 0), (0, 0), (pad, 0)), constant_values=1)
        mm_embeds, mm_idx, pos_p = self._multimodal(ids_p, mask_p, multimodal, pos)
        if logits_to_keep:
            if not isinstance(logits_to_keep, (int, np.integer)) or logits_to_keep < 0:
                raise InputError(f"logits_to_keep: expected a non-negative int, got {logits_to_keep!r}")
            keep = min(int(logits_to_keep), t)
        else:
            keep = t
        with use_mesh(self.mesh):
            out = self._logits_jit(self.params, self._batch(ids_p), self._batch(mask_p), self._batch(pos_p, 1),
                                   mm_embeds, mm_idx, bucket(keep, 1) if keep < t else tb)
        return to_host(out[:, -keep:]).astype(np.float32)

    # ---------------------------------------------------------------------------------
    def _encode_messages(self, messages, use_audio_in_video=False):
        """Conversations -> processor outputs (ids, mask and media tensors), see processor.py."""
        from .processor import process_conversations

        if self.processor is None:
            raise InputError(f"{self.path}: this checkpoint has no tokenizer.json, so messages/text cannot be "
                             "used; pass input_ids")
        convs = messages if is_batch_of_conversations(messages) else [messages]
        return process_conversations(self.processor, convs, directory=self.path,
                                     use_audio_in_video=use_audio_in_video, thinker_cfg=self.config.thinker)

    def _check_sampling(self, max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty):
        if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
        for name, v in (("temperature", temperature), ("top_p", top_p), ("repetition_penalty", repetition_penalty)):
            if v is not None:
                check_finite(v, name)
        if do_sample and not (temperature is not None and temperature > 0):
            raise InputError(f"temperature: must be > 0 when sampling, got {temperature!r}")
        if top_k is not None and (not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or top_k < 0):
            raise InputError(f"top_k: expected an int >= 0 (0: no top-k) or None, got {top_k!r}")
        if top_p is not None and not (0.0 < float(top_p) <= 1.0):
            raise InputError(f"top_p: must be in (0, 1], got {top_p!r}")
        if not (repetition_penalty is not None and repetition_penalty > 0):
            raise InputError(f"repetition_penalty: must be > 0, got {repetition_penalty!r}")

    def sampling_settings(self, *, max_new_tokens=None, do_sample=None, temperature=None, top_k=None, top_p=None,
                          repetition_penalty=None, prompt_length: int = 0, longest_prompt: int | None = None) -> dict:
        """The thinker's sampling settings, each argument left as None filled in as transformers does:
        from the checkpoint's ``generation_config.json``, else from transformers' ``GenerationConfig``
        defaults (greedy; when sampling, temperature 1.0, top-k 50, top-p 1.0; repetition penalty 1.0).
        ``top_k=0`` means no top-k. ``max_new_tokens``: the argument, else the file's ``max_new_tokens``,
        else its ``max_length`` minus ``prompt_length`` (the prompt's padded width, as transformers counts
        it), else 1024 (Qwen2.5-Omni's ``thinker_max_new_tokens`` default), cut to what
        ``max_position_embeddings`` leaves after ``longest_prompt`` tokens. Returns a dict with those six
        keys (values not yet validated)."""
        gc = self.generation_config
        out = {}
        for name, given in (("do_sample", do_sample), ("temperature", temperature), ("top_k", top_k),
                            ("top_p", top_p), ("repetition_penalty", repetition_penalty)):
            v = given if given is not None else gc.get(name)
            out[name] = GENERATION_DEFAULTS[name] if v is None else v
        out["do_sample"] = bool(out["do_sample"])
        if max_new_tokens is None:
            max_new_tokens = gc.get("max_new_tokens")
        if max_new_tokens is None and gc.get("max_length") is not None:
            max_new_tokens = int(gc["max_length"]) - int(prompt_length)
            if max_new_tokens < 1:
                raise InputError(f"the checkpoint's generation_config.json max_length ({gc['max_length']}) leaves no "
                                 f"room after a prompt of {prompt_length} tokens; pass max_new_tokens")
        if max_new_tokens is None:
            room = self.config.thinker.text.max_position_embeddings - int(longest_prompt or prompt_length)
            max_new_tokens = max(1, min(DEFAULT_MAX_NEW_TOKENS, room))
        out["max_new_tokens"] = max_new_tokens
        return out

    def prefill(self, input_ids=None, attention_mask=None, messages=None, *, max_new_tokens=None, do_sample=None,
                temperature=None, top_k=None, top_p=None, repetition_penalty=None, seed=0, eos_token_id=None,
                **kwargs) -> "Generation":
        """Validate, left-align and bucket the prompt and run the prefill (which also picks the first new
        token). Returns a :class:`Generation`; advance it with :meth:`decode_steps`.

        Sampling arguments left as None take the checkpoint's ``generation_config.json`` values, then
        transformers' defaults (:meth:`sampling_settings`); explicit arguments win."""
        if kwargs.get("return_audio"):
            self._check_speech(kwargs.get("speaker", "Chelsie"), kwargs.get("talker_max_new_tokens", 4096))
        unknown = set(kwargs) - set(MULTIMODAL_ARGS) - {"use_audio_in_video", "return_audio", "speaker",
                                                        "talker_max_new_tokens", "talker_min_new_tokens",
                                                        "talker_do_sample", "talker_top_k", "talker_top_p",
                                                        "talker_temperature", "talker_repetition_penalty",
                                                        "talker_eos_token_id", "dit_noise"}
        if unknown:
            raise InputError(f"unknown argument(s): {', '.join(sorted(unknown))}")
        if messages is not None:
            if input_ids is not None:
                raise InputError("pass either messages or input_ids, not both")
            given = [k for k in MULTIMODAL_ARGS if kwargs.get(k) is not None]
            if given:
                raise InputError(f"pass media either in messages or as {', '.join(given)}, not both")
            enc = self._encode_messages(messages, bool(kwargs.get("use_audio_in_video")))
            ids, mask = enc.pop("input_ids"), enc.pop("attention_mask")
            kwargs.update(enc)
        else:
            ids, mask = self._ids_and_mask(input_ids, attention_mask)
        limit = self.config.thinker.text.max_position_embeddings
        longest = int(mask.sum(1).max())
        st = self.sampling_settings(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                    top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                                    prompt_length=ids.shape[1], longest_prompt=longest)
        max_new_tokens, do_sample, temperature = st["max_new_tokens"], st["do_sample"], st["temperature"]
        top_k, top_p, repetition_penalty = st["top_k"], st["top_p"], st["repetition_penalty"]
        self._check_sampling(max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty)
        check_seed(seed)
        if longest + max_new_tokens > limit:
            raise InputError(f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} exceeds "
                             f"max_position_embeddings ({limit})")
        b, t = ids.shape
        # left-align every row (any padding pattern in, left padding inside), then bucket
        ids_l, mask_l = left_pad([ids[i][mask[i] == 1] for i in range(b)], bucket(t))
        mm_embeds, mm_idx, pos = self._multimodal(ids_l, mask_l, kwargs)
        collect_hidden = bool(kwargs.get("return_audio"))
        eos = eos_token_id if eos_token_id is not None else self.generation_config["eos_token_id"]
        eos = [eos] if isinstance(eos, (int, np.integer)) else list(eos)
        eos_arr = np.full((max(1, len(eos)),), -1, np.int32)
        eos_arr[:len(eos)] = eos
        pad = np.int32(self.generation_config["pad_token_id"])
        sp = make_sampling(temperature, top_k, top_p, repetition_penalty, self.config.thinker.text.vocab_size)
        rng = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(int(seed)), i))(jnp.arange(b))
        nb = bucket(max_new_tokens)
        with use_mesh(self.mesh):
            state, talker_inputs = self._prefill_jit(self.params, self._batch(ids_l), self._batch(mask_l),
                                                     self._batch(pos, 1), mm_embeds, mm_idx, sp, rng,
                                                     np.int32(max_new_tokens), eos_arr, pad, nb, bool(do_sample),
                                                     bool(collect_hidden))

        def run(state, n):
            with use_mesh(self.mesh):
                return self._decode_jit(self.params, state, np.int32(n), sp, eos_arr, pad, bool(do_sample))

        return Generation(state=state, prompt_ids=ids, eos=eos, max_new_tokens=max_new_tokens, _run=run,
                          talker_inputs=talker_inputs, aligned_ids=ids_l, aligned_mask=mask_l,
                          mm={k: kwargs.get(k) for k in (*MULTIMODAL_ARGS, "use_audio_in_video")})

    def decode_steps(self, gen: "Generation", n: int) -> "Generation":
        """Advance ``gen`` by up to ``n`` tokens in one on-device loop (stops early when every row is done)."""
        if not gen.finished:
            gen.state = gen._run(gen.state, n)
        return gen

    def generate(self, input_ids=None, attention_mask=None, messages=None, *, max_new_tokens=None,
                 do_sample=None, temperature=None, top_k=None, top_p=None, repetition_penalty=None, seed=0,
                 eos_token_id=None, **kwargs) -> GenerateOutput:
        """Generate a reply for each row; with ``return_audio=True`` also its speech.

        Thinker sampling arguments left as None (``max_new_tokens``, ``do_sample``, ``temperature``,
        ``top_k``, ``top_p``, ``repetition_penalty``, ``eos_token_id``) take the checkpoint's
        ``generation_config.json`` values, then transformers' ``GenerationConfig`` defaults
        (:meth:`sampling_settings`); ``top_k=0`` means no top-k."""
        gen = self.prefill(input_ids, attention_mask, messages, max_new_tokens=max_new_tokens, do_sample=do_sample,
                           temperature=temperature, top_k=top_k, top_p=top_p,
                           repetition_penalty=repetition_penalty, seed=seed, eos_token_id=eos_token_id, **kwargs)
        self.decode_steps(gen, gen.max_new_tokens)
        ids, eos, new = gen.prompt_ids, gen.eos, gen.new_tokens()
        out = GenerateOutput(sequences=np.concatenate([ids, new.astype(ids.dtype)], axis=1),
                             text=[self._decode_reply(row, eos) for row in new], prompt_length=ids.shape[1])
        if kwargs.get("return_audio"):
            speaker = kwargs.get("speaker", "Chelsie")
            talker_kw = {k: v for k, v in kwargs.items() if k.startswith("talker_")}
            out.codec_ids = self._talker_codes(gen, speaker_bos=self.voices[speaker].bos_token, mm=gen.mm, seed=seed,
                                               **talker_kw)
            if self.token2wav_params is not None:
                noise = kwargs.get("dit_noise")
                if noise is not None and not isinstance(noise, (list, tuple)):
                    noise = [noise]
                if noise is not None and len(noise) != len(out.codec_ids):
                    raise InputError(f"dit_noise: {len(noise)} arrays for a batch of {len(out.codec_ids)}")
                out.audio = self._speak(out.codec_ids, speaker, noise, seed)
        return out

    def token2wav(self, codes, speaker: str = "Chelsie", noise=None) -> np.ndarray:
        """Codec ids -> waveform ``np.float32 [samples]`` at 24 kHz, with ``speaker``'s voice.

        ``noise``: the DiT's initial state ``[repeats * n_codes, mel_dim]`` (float32); drawn from a
        fixed seed when None."""
        return self._speak([codes], speaker, None if noise is None else [noise], seed=0)[0]

    def _speak(self, codes_list, speaker, noise_list, seed) -> list[np.ndarray]:
        """Rows decoded together: the DiT runs the rows as one batch with key padding and each row's
        own noise (the reference decodes one row at a time: the same numbers); BigVGAN per row."""
        from .token2wav import bigvgan, dit_sample

        if self.token2wav_params is None:
            raise InputError(f"{self.path} has no token2wav weights (token2wav.*), so it cannot make audio")
        voice = self._voice(speaker)
        dcfg, vcfg = self.config.token2wav.dit, self.config.token2wav.bigvgan
        rows = []
        for r, c in enumerate(codes_list):
            c = np.asarray(c)
            if c.ndim != 1 or (c.size and (c.dtype.kind not in "iu" or c.min() < 0 or c.max() >= dcfg.num_embeds)):
                raise InputError(f"codes: expected a 1-D array of codec ids in [0, {dcfg.num_embeds}), got "
                                 f"shape {list(c.shape)}")
            if c.size * dcfg.repeats > dcfg.max_position_embeddings:
                raise InputError(f"codes: {c.size} codes make {c.size * dcfg.repeats} mel frames, beyond the DiT's "
                                 f"max_position_embeddings ({dcfg.max_position_embeddings})")
            rows.append(c.astype(np.int32))
        lens = np.asarray([len(c) for c in rows], np.int32)
        out = [np.zeros((0,), np.float32) for _ in rows]
        live = [r for r in range(len(rows)) if lens[r] > 0]
        if not live:
            return out
        # the DiT's code bucket from 32: padding below a third (powers of two ran 65 codes as 128)
        n = layers.half_octave_bucket(int(lens.max()), 32)
        codes = np.zeros((len(live), n), np.int32)
        noise = np.zeros((len(live), n * dcfg.repeats, dcfg.mel_dim), np.float32)
        for i, r in enumerate(live):
            codes[i, :lens[r]] = rows[r]
            if noise_list is not None:
                nz = np.asarray(noise_list[r], np.float32)
                if nz.shape != (lens[r] * dcfg.repeats, dcfg.mel_dim):
                    raise InputError(f"dit_noise[{r}]: expected shape [{lens[r] * dcfg.repeats}, {dcfg.mel_dim}] "
                                     f"(2 x codes, mel_dim), got {list(nz.shape)}")
            else:  # counter-based per mel frame: the streamed decode draws the same noise
                from .streaming import frame_noise

                nz = frame_noise(_noise_key(seed, r), 0, int(lens[r]) * dcfg.repeats, dcfg.mel_dim)
            noise[i, :lens[r] * dcfg.repeats] = nz
        t2w = self.token2wav_parts
        mel = dit_sample(t2w.code2wav_dit_model, dcfg, codes, voice.cond, voice.ref_mel, noise,
                         code_lengths=lens[live], impl=self.attention)
        # the vocoder at the DiT's bucketed length with the row's valid frames: one compiled program per
        # bucket, and the row's samples equal the vocoder on it alone (token2wav.bigvgan_fn); a row at a
        # time, as the vocoder's activations are large (hundreds of MB per row for a long reply)
        for i, r in enumerate(live):
            frames = int(lens[r]) * dcfg.repeats
            wav = np.asarray(bigvgan(t2w.code2wav_bigvgan_model, vcfg, mel[i:i + 1], lengths=[frames])[0], np.float32)
            out[r] = wav[:frames * (wav.shape[0] // mel.shape[1])].copy()
        return out

    def _check_speech(self, speaker, talker_max_new_tokens=4096):
        if self.talker is None:
            raise InputError(f"return_audio: {self.path} has no talker weights (talker.*), so it cannot speak")
        if self.config.token2wav is not None:
            d = self.config.token2wav.dit
            if int(talker_max_new_tokens) * d.repeats > d.max_position_embeddings:
                raise InputError(f"talker_max_new_tokens ({talker_max_new_tokens}) x {d.repeats} mel frames per code "
                                 f"exceeds the DiT's max_position_embeddings ({d.max_position_embeddings})")
        if not self.voices:
            raise InputError(f"return_audio: {self.path} has no spk_dict.pt, so there is no voice to speak with")
        self._voice(speaker)

    def _voice(self, speaker: str):
        if speaker not in self.voices:
            raise InputError(f"speaker '{speaker}' is not available; voices: {', '.join(sorted(self.voices))}")
        return self.voices[speaker]

    def _decode_reply(self, row, eos) -> str:
        if self.processor is None:
            return ""
        row = list(row)
        for i, tok in enumerate(row):
            if tok in eos:
                row = row[:i]
                break
        return self.processor.decode(row)

    def stream(self, input_ids=None, attention_mask=None, messages=None, *, max_new_tokens=None,
               do_sample=None, temperature=None, top_k=None, top_p=None, repetition_penalty=None, seed=0,
               eos_token_id=None, steps_per_event=4, **kwargs) -> Iterator[StreamEvent]:
        """Yield :class:`StreamEvent` s for one conversation, in order: ``text`` deltas (whole UTF-8
        characters) as the thinker produces tokens and, with ``return_audio=True``, ``audio`` chunks
        (float32, 24 kHz) as soon as enough codec ids exist; then ``done``.

        The talker runs alongside the thinker: after every ``steps_per_event`` thinker tokens it
        advances over the reply tokens whose inputs are final, and its new codec ids go through
        :class:`omni_jax.streaming.StreamingToken2Wav` (the chunk algorithm documented there).
        Text and codec ids equal :meth:`generate`'s; the audio is the chunked decode of the same
        codes and noise. The ``done`` event carries all reply ids in ``token_ids``; the codec ids
        are in ``codec_ids`` of the last ``audio`` event's ... see ``StreamEvent``. Sampling
        arguments left as None are filled in as :meth:`generate` does (:meth:`sampling_settings`).
        """
        t0 = time.perf_counter()
        if messages is not None and is_batch_of_conversations(messages):
            raise InputError("stream: takes one conversation, not a batch")
        speech = bool(kwargs.get("return_audio"))
        speaker = kwargs.get("speaker", "Chelsie")
        talker_kw = {k: v for k, v in kwargs.items() if k.startswith("talker_")}
        dit_noise = kwargs.get("dit_noise")
        gen = self.prefill(input_ids, attention_mask, messages, max_new_tokens=max_new_tokens, do_sample=do_sample,
                           temperature=temperature, top_k=top_k, top_p=top_p,
                           repetition_penalty=repetition_penalty, seed=seed, eos_token_id=eos_token_id, **kwargs)
        ids, eos = gen.prompt_ids, gen.eos
        if ids.shape[0] != 1:
            raise InputError(f"stream: takes one prompt, got a batch of {ids.shape[0]}")
        if speech and self.token2wav_params is None:
            raise InputError(f"return_audio: {self.path} has no token2wav weights (token2wav.*)")
        streamer = TextStreamer(self.processor) if self.processor is not None else None
        sent = 0
        all_ids: list[int] = []
        run = vocoder = None
        if speech:
            from .streaming import StreamingToken2Wav

            voice = self.voices[speaker]
            noise_fn = None
            if dit_noise is not None:
                full = np.asarray(dit_noise[0] if isinstance(dit_noise, (list, tuple)) else dit_noise, np.float32)
                noise_fn = lambda start, n: full[start:start + n]  # noqa: E731
            vocoder = StreamingToken2Wav(self.token2wav_parts, self.config.token2wav, voice.cond, voice.ref_mel,
                                         key=None if noise_fn else _noise_key(seed, 0), noise_fn=noise_fn,
                                         impl=self.attention)

        def audio_events(chunks):
            for a in chunks:
                if len(a):
                    yield StreamEvent("audio", audio=np.asarray(a, np.float32), t=time.perf_counter() - t0)

        def talk(final, limit=None):
            """Advance the talker over final inputs (at most ``limit`` steps); push its new codec ids
            to the vocoder."""
            nonlocal run
            if run is None:
                run = self._talker_start(gen, speaker_bos=self.voices[speaker].bos_token, mm=gen.mm, seed=seed,
                                         **talker_kw)
                if run is None:
                    return []
            self._talker_advance(run, gen, final, limit)
            codes = run.codes()[0]
            new = codes[run.taken:]
            run.taken = len(codes)
            return vocoder.push(new) if len(new) else []

        while True:
            n = int(gen.state.n)
            new = [int(x) for x in np.asarray(gen.state.tokens[0, sent:n])]
            sent = n
            reply = [x for x in new if x not in eos]
            all_ids.extend(new)
            if new:
                delta = streamer.push(reply) if streamer else ""
                yield StreamEvent("text", text=delta, token_ids=new, t=time.perf_counter() - t0)
            if gen.finished:
                break
            if speech and n >= 2:
                yield from audio_events(talk(n - 2))
            self.decode_steps(gen, steps_per_event)
        tail = streamer.flush() if streamer else ""
        if tail:
            yield StreamEvent("text", text=tail, t=time.perf_counter() - t0)
        codec_ids = None
        if speech:
            # the thinker is done; the talker goes on alone, one steady chunk's codec ids per call, so
            # each chunk's audio is out as soon as its ids exist (not once the whole reply's are)
            while True:
                yield from audio_events(talk(None, vocoder.cf // vocoder.rep))
                if run is None or run.finished:
                    break
            yield from audio_events(vocoder.finish())
            codec_ids = run.codes()[0] if run is not None else np.zeros((0,), np.int32)
        yield StreamEvent("done", token_ids=all_ids, codec_ids=codec_ids, t=time.perf_counter() - t0)

    # ---------------------------------------------------------------------------------
    def loss(self, input_ids, labels, attention_mask=None, **processor_outputs) -> float:
        """The thinker's mean token cross-entropy on ``labels`` (transformers' convention: unshifted,
        -100 ignored), with the model's weights: the value :func:`omni_jax.train_loss` gives."""
        from . import training

        unknown = set(processor_outputs) - set(MULTIMODAL_ARGS) - {"use_audio_in_video"}
        if unknown:
            raise InputError(f"unknown argument(s): {', '.join(sorted(unknown))}")
        ids, mask = self._ids_and_mask(input_ids, attention_mask)
        lab = np.asarray(labels)
        if lab.ndim == 1:
            lab = lab[None]
        if lab.shape != ids.shape or lab.dtype.kind not in "iu":
            raise InputError(f"labels: expected an int array shaped like input_ids {list(ids.shape)}, got "
                             f"{list(lab.shape)} ({lab.dtype})")
        v = self.config.thinker.text.vocab_size
        bad = (lab != training.IGNORE) & ((lab < 0) | (lab >= v))
        if bad.any():
            raise InputError(f"labels: values must be -100 or token ids in [0, {v})")
        if training.count_targets(lab) == 0:
            raise InputError("labels: no target token (every label after the first position is -100)")
        batch = training.make_batch(self.config, ids, mask, lab, processor_outputs)
        # the model's own per-layer parameters (no stacked copy); train_loss takes either layout
        params = {"thinker": self._params}
        if self.audio is not None:
            params["audio"] = nnx.split(self.audio)[1]
        if self.vision is not None:
            params["vision"] = nnx.split(self.vision)[1]
        if not hasattr(self, "_loss_jit"):
            cfg, impl = self.config, self.attention
            self._loss_jit = jax.jit(lambda p, b: training.train_loss(p, b, cfg, impl=impl)[0])
        with use_mesh(self.mesh):
            return float(self._loss_jit(params, batch))


def check_seed(seed) -> None:
    """Seeds are integers that fit jax's 64-bit keys (with the offsets the talker and the DiT add)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not -(2 ** 63) <= int(seed) < 2 ** 63 - 8:
        raise InputError(f"seed: expected an integer in [-2**63, 2**63 - 8), got {seed!r}")


def _noise_key(seed: int, row: int):
    """The DiT noise key of batch row ``row``: streamed and whole decodes share it (frame_noise)."""
    return jax.random.fold_in(jax.random.key(int(seed) + 2), row)
