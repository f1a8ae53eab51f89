"""The public API: ``omni_jax.load`` and :class:`OmniModel`."""

from __future__ import annotations

import os
import time
from functools import partial
from typing import TYPE_CHECKING, Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import engine
from .attention import default_impl
from .checkpoint.loader import read_checkpoint
from .config import OmniConfig
from .decoder import stacked_state, to_per_layer
from .engine import PROGRAMS, ThinkerReply, bucket, noise_key
from .errors import CheckpointError, InputError
from .generate import generated, make_sampling
from .generation_config import DEFAULT_MAX_NEW_TOKENS, GENERATION_DEFAULTS
from .multimodal import media_layout
from .outputs import GenerateOutput, Generation, StreamEvent, TalkerRun  # noqa: F401  (re-exported)
from .processor import TextStreamer, is_batch_of_conversations, left_pad
from .sharding import as_auto_mesh, outside_context_mesh, to_host, use_mesh
from .speech import speak
from .validate import check_position_ids, check_sampling, check_seed, check_token_ids

if TYPE_CHECKING:
    from .session import Session


DTYPES = {"bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16, "float32": jnp.float32, "fp32": jnp.float32}
MULTIMODAL_ARGS = ("input_features", "feature_attention_mask", "pixel_values", "image_grid_thw",
                   "pixel_values_videos", "video_grid_thw", "video_second_per_grid")


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
    ck = read_checkpoint(path, dtype=dt, mesh=mesh)  # HF or converted: omni_jax.checkpoint.loader
    return OmniModel(ck.config, ck.graphdef, ck.params, processor=ck.processor, dtype=dt, mesh=mesh, attention=impl,
                     generation_config=ck.generation_config, path=ck.path, audio=ck.audio, vision=ck.vision,
                     talker=ck.talker, voices=ck.voices, token2wav=ck.token2wav)


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
    # the engine's programs (omni_jax.engine), bound to this model: one compile per shape bucket
    def _build(self):
        tcfg, impl, mesh = self.config.thinker.text, self.attention, self.mesh
        thinker = dict(graphdef=self._graphdef, cfg=tcfg, impl=impl)
        self._logits_jit = PROGRAMS["thinker_logits"].bind(mesh, **thinker)
        self._prefill_jit = PROGRAMS["thinker_prefill"].bind(mesh, dtype=self.dtype, **thinker)
        self._decode_jit = PROGRAMS["thinker_decode"].bind(mesh, **thinker)
        self._embed_jit = PROGRAMS["embed_tokens"].bind(None, graphdef=self._graphdef)
        # a session's programs (omni_jax.session): extend the cache by a turn, start a reply from it
        self._extend_jit = PROGRAMS["thinker_extend"].bind(mesh, **thinker)
        self._begin_jit = PROGRAMS["thinker_begin"].bind(mesh, dtype=self.dtype)
        if self.talker is not None:
            talker = dict(graphdef=self.talker[0], cfg=self.config.talker, impl=impl)
            self._talker_prompt_jit = PROGRAMS["talker_prompt"].bind(None, graphdef=self._graphdef)
            self._talker_prefill_jit = PROGRAMS["talker_prefill"].bind(mesh, dtype=self.dtype, **talker)
            self._talker_decode_jit = PROGRAMS["talker_decode"].bind(mesh, thinker_graphdef=self._graphdef, **talker)

    BOUND = {"thinker_logits": "_logits_jit", "thinker_prefill": "_prefill_jit", "thinker_decode": "_decode_jit",
             "embed_tokens": "_embed_jit", "thinker_extend": "_extend_jit", "thinker_begin": "_begin_jit",
             "talker_prompt": "_talker_prompt_jit", "talker_prefill": "_talker_prefill_jit",
             "talker_decode": "_talker_decode_jit"}

    def program(self, name: str):
        """The engine program ``name`` (a key of :data:`omni_jax.engine.PROGRAMS`) bound to this model:
        its parameters' graphdef, config, attention implementation and mesh fixed, called with the
        program's own arguments (``params`` first); each compiles once per shape bucket and is shared
        by everything using the model (generate, stream, sessions, the server)."""
        attr = self.BOUND.get(name)
        if attr is None or not hasattr(self, attr):
            have = [n for n, a in self.BOUND.items() if hasattr(self, a)]
            raise InputError(f"program '{name}' is not bound for this model; bound: {', '.join(have)}")
        return getattr(self, attr)

    @property
    def talker_params(self):
        """The talker's ``nnx.State`` (decoder layers per layer), or None without talker weights."""
        return None if self.talker is None else self.talker[1]

    def decode_rows_fn(self, part: str = "thinker"):
        """The per-row decode chunk of continuous batching, bound to this model
        (:func:`omni_jax.engine.thinker_decode_rows` or, for ``part="talker"``,
        :func:`omni_jax.engine.talker_decode_rows`): a pure function to jit over a
        :class:`~omni_jax.generate.DecodeState` of slots."""
        if part == "thinker":
            return partial(engine.thinker_decode_rows, graphdef=self._graphdef, cfg=self.config.thinker.text,
                           impl=self.attention)
        if part == "talker" and self.talker is not None:
            return partial(engine.talker_decode_rows, graphdef=self.talker[0], thinker_graphdef=self._graphdef,
                           cfg=self.config.talker, impl=self.attention)
        raise InputError(f"decode_rows_fn: no {part!r} decoder in this model")

    def _talker_codes(self, gen: "Generation", **kw) -> list[np.ndarray]:
        """Run the talker on a finished thinker generation; returns one codec-id array per row."""
        run = self.talker_start(gen, **kw)
        if run is None:
            return [np.zeros((0,), np.int32) for _ in range(gen.state.tokens.shape[0])]
        self.talker_advance(run, gen, None)
        return run.codes()

    def talker_start(self, gen: "Generation", *, speaker: str = "Chelsie", seed: int = 0, reply=None,
                     talker_max_new_tokens=4096, talker_min_new_tokens=0, talker_do_sample=True, talker_top_k=40,
                     talker_top_p=0.8, talker_temperature=0.9, talker_repetition_penalty=1.05,
                     talker_eos_token_id=None) -> "TalkerRun | None":
        """The talker's prefill for ``gen`` (made by :meth:`prefill` with ``return_audio=True``), as
        soon as the thinker has fed its first reply token (2 tokens exist); None before.

        ``reply``: the thinker's reply so far as an :class:`omni_jax.engine.ThinkerReply` when it is
        decoded elsewhere (a server's slot); by default ``gen``'s own state. Returns a
        :class:`TalkerRun` to advance with :meth:`talker_advance`."""
        from .talker import rope_view
        from .tmrope import media_rope_kwargs, rope_index

        if gen.talker_inputs is None:
            raise InputError("talker_start: the generation was prefilled without return_audio=True")
        cfg = self.config.talker
        check_sampling(talker_max_new_tokens, talker_do_sample, talker_temperature, talker_top_k,
                             talker_top_p, talker_repetition_penalty)
        speaker_bos = self._voice(speaker).bos_token
        st = gen.state
        reply = ThinkerReply(st.tokens, st.hidden, generated(st)) if reply is None else reply
        b = reply.tokens.shape[0]
        if int(reply.n) < 2:
            return None
        eos = np.asarray(gen.eos if gen.eos else [-1], np.int32)
        extra = np.asarray([speaker_bos, cfg.tts_text_end_token_id, cfg.tts_text_pad_token_id], np.int32)
        bos_e, first = self._talker_prompt_jit(self.params, reply.tokens, reply.hidden, extra)
        ti = gen.talker_inputs
        e = ti["prompt_hidden"].shape[-1]
        embeds = jnp.concatenate([ti["prompt_hidden"] + ti["prompt_embeds"], jnp.broadcast_to(bos_e, (b, 1, e)),
                                  first[:, None]], axis=1)
        mask = np.concatenate([gen.aligned_mask, np.ones((b, 2), np.int32)], axis=1)
        # the speaker's bos and the reply's first token take text positions (the largest so far + 1, + 2):
        # the reply token is given as the bos id, so that one which happens to be a media bracket or
        # placeholder id (a random model's) is not read as the start of a media span
        text_ids = np.concatenate([gen.aligned_ids, np.full((b, 2), speaker_bos, np.int32)], axis=1)
        pos = rope_index(rope_view(cfg), text_ids, mask, **media_rope_kwargs(gen.mm or {}))
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
                        max_new=int(talker_max_new_tokens), thinker_eos=eos, extra=extra)
        with use_mesh(self.mesh):
            run.state = self._talker_prefill_jit(self.talker[1], embeds, mask, pos, seen, sp, rng,
                                                 np.int32(talker_max_new_tokens), run.eos_arr, run.pad,
                                                 np.int32(talker_min_new_tokens), suppress,
                                                 bucket(talker_max_new_tokens), run.do_sample)
        return run

    def talker_advance(self, run: "TalkerRun", gen: "Generation", final: int | None, limit: int | None = None):
        """Advance the talker while its next input is final: reply entries ``k < final`` (None: the
        thinker has finished, run to the end), at most ``limit`` steps."""
        if run.finished:
            return
        st = gen.state
        todo = run.max_new if final is None else final - (generated(run.state) - 1)
        if limit is not None:
            todo = min(todo, limit)
        if todo <= 0:
            return
        with use_mesh(self.mesh):
            run.state = self._talker_decode_jit(self.talker[1], run.state, self.params, st.tokens, st.hidden, st.n,
                                                np.int32(todo), run.sp, run.eos_arr, run.pad, run.do_sample,
                                                run.thinker_eos, run.extra)

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
        """How many programs each jitted entry point has compiled (one per shape bucket): the
        thinker's ``logits``, ``prefill`` and ``decode``; with a talker also ``talker_prefill`` and
        ``talker_decode``."""
        names = ("logits", "prefill", "decode") + (("talker_prefill", "talker_decode") if self.talker else ())
        return {name: getattr(self, f"_{name}_jit")._cache_size() for name in names}

    # ---------------------------------------------------------------------------------
    # input checking
    # ---------------------------------------------------------------------------------
    def _token_ids(self, input_ids, attention_mask):
        t = self.config.thinker.text
        return check_token_ids(input_ids, attention_mask, vocab_size=t.vocab_size, max_positions=t.max_position_embeddings)

    def thinker_logits(self, input_ids, attention_mask=None, position_ids=None, *, logits_to_keep=None,
                       **multimodal) -> np.ndarray:
        """Thinker logits ``np.float32 [B, T, V]`` (the last ``logits_to_keep`` positions if given)."""
        unknown = set(multimodal) - set(MULTIMODAL_ARGS) - {"use_audio_in_video"}
        if unknown:
            raise InputError(f"unknown argument(s): {', '.join(sorted(unknown))}")
        ids, mask = self._token_ids(input_ids, attention_mask)
        b, t = ids.shape
        pos = check_position_ids(position_ids, (b, t)) if position_ids is not None else None
        tb = bucket(t)
        pad = tb - t
        ids_p = np.pad(ids, ((0, 0), (pad, 0)))
        mask_p = np.pad(mask, ((0, 0), (pad, 0)))
        if pos is not None:
            pos = np.pad(pos, ((0, 0), (0, 0), (pad, 0)), constant_values=1)
        mm_embeds, mm_idx, pos_p = media_layout(self, ids_p, mask_p, multimodal, pos)
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
    def encode_messages(self, messages, use_audio_in_video=False) -> dict:
        """One conversation or a batch of them -> the processor's outputs: ``input_ids``,
        ``attention_mask`` and the media tensors (see omni_jax.processor), ready for :meth:`prefill`."""
        from .processor import process_conversations

        if self.processor is None:
            raise InputError(f"{self.path}: this checkpoint has no tokenizer.json, so messages/text cannot be "
                             "used; pass input_ids")
        convs = messages if is_batch_of_conversations(messages) else [messages]
        return process_conversations(self.processor, convs, directory=self.path,
                                     use_audio_in_video=use_audio_in_video, thinker_cfg=self.config.thinker)

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
            self.check_speech(kwargs.get("speaker", "Chelsie"), kwargs.get("talker_max_new_tokens", 4096))
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
            enc = self.encode_messages(messages, bool(kwargs.get("use_audio_in_video")))
            ids, mask = enc.pop("input_ids"), enc.pop("attention_mask")
            kwargs.update(enc)
        else:
            ids, mask = self._token_ids(input_ids, attention_mask)
        limit = self.config.thinker.text.max_position_embeddings
        longest = int(mask.sum(1).max())
        st = self.sampling_settings(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                    top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                                    prompt_length=ids.shape[1], longest_prompt=longest)
        max_new_tokens, do_sample, temperature = st["max_new_tokens"], st["do_sample"], st["temperature"]
        top_k, top_p, repetition_penalty = st["top_k"], st["top_p"], st["repetition_penalty"]
        check_sampling(max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty)
        check_seed(seed)
        if longest + max_new_tokens > limit:
            raise InputError(f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} exceeds "
                             f"max_position_embeddings ({limit})")
        b, t = ids.shape
        # left-align every row (any padding pattern in, left padding inside), then bucket
        ids_l, mask_l = left_pad([ids[i][mask[i] == 1] for i in range(b)], bucket(t))
        mm_embeds, mm_idx, pos = media_layout(self, ids_l, mask_l, kwargs)
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
            out.codec_ids = self._talker_codes(gen, speaker=speaker, seed=seed, **talker_kw)
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
        if self.token2wav_params is None:
            raise InputError(f"{self.path} has no token2wav weights (token2wav.*), so it cannot make audio")
        return speak(self.token2wav_parts, self.config.token2wav, self._voice(speaker), codes_list, noise_list, seed,
                     impl=self.attention)

    def check_speech(self, speaker, talker_max_new_tokens=4096) -> None:
        """Raise :class:`InputError` unless this model can speak with ``speaker`` for up to
        ``talker_max_new_tokens`` codec ids (talker weights, a voice file, the voice, the DiT's length)."""
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
                                         key=None if noise_fn else noise_key(seed, 0), noise_fn=noise_fn,
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
                run = self.talker_start(gen, speaker=speaker, seed=seed, **talker_kw)
                if run is None:
                    return []
            self.talker_advance(run, gen, final, limit)
            codes = run.codes()[0]
            new = codes[run.taken:]
            run.taken = len(codes)
            return vocoder.push(new) if len(new) else []

        while True:
            n = generated(gen.state)
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

    def session(self, system: str | None = None, max_context: int | None = None, *, seed: int = 0,
                minimum_slots: int = 256, audio_clamp: str = "running", use_audio_in_video: bool = False) -> "Session":
        """A multi-turn conversation over one thinker KV cache (:class:`omni_jax.session.Session`):
        each turn prefills only its new tokens; ``system``: the system message, ``max_context``: a
        context limit below ``max_position_embeddings``; ``minimum_slots``: the smallest cache it
        allocates (it grows by powers of two); ``audio_clamp``: how streamed audio applies the
        log-mel floor (``"running"`` or ``"exact"``); ``use_audio_in_video``: videos' audio tracks join
        their frames, as in ``generate``. See docs/realtime.md."""
        from .session import Session

        return Session(self, system=system, max_context=max_context, seed=seed, minimum_slots=minimum_slots,
                       audio_clamp=audio_clamp, use_audio_in_video=use_audio_in_video)

    # ---------------------------------------------------------------------------------
    def loss(self, input_ids, labels, attention_mask=None, **processor_outputs) -> float:
        """The thinker's mean token cross-entropy on ``labels`` (transformers' convention: unshifted,
        -100 ignored), with the model's weights: the value :func:`omni_jax.train_loss` gives."""
        from . import training

        unknown = set(processor_outputs) - set(MULTIMODAL_ARGS) - {"use_audio_in_video"}
        if unknown:
            raise InputError(f"unknown argument(s): {', '.join(sorted(unknown))}")
        ids, mask = self._token_ids(input_ids, attention_mask)
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
        # the model's own per-layer parameters as they are (no stacked copy of the layer weights)
        params = {"thinker": self._params}
        if self.audio is not None:
            params["audio"] = nnx.split(self.audio)[1]
        if self.vision is not None:
            params["vision"] = nnx.split(self.vision)[1]
        if not hasattr(self, "_loss_jit"):
            cfg, impl, gdef = self.config, self.attention, self._graphdef
            self._loss_jit = jax.jit(lambda p, b: training.thinker_loss(p, b, cfg, gdef, impl=impl))
        with use_mesh(self.mesh):
            return float(self._loss_jit(params, batch))
