"""Ahead-of-time compilation of every omni-jax program for a TPU topology that is not present.

With libtpu installed, JAX compiles for a described TPU slice (``jax.experimental.topologies``)
from any host: the real XLA:TPU compiler and, for the Pallas kernels, the real Mosaic compiler.
Inputs are abstract (``jax.ShapeDtypeStruct`` with a ``NamedSharding`` on the topology's mesh;
parameters from ``nnx.eval_shape``, never materialised), so a 7B model compiles on a laptop. Per
program this reports the per-chip memory from ``compiled.memory_analysis()`` against the chip's
HBM, FLOPs and bytes from ``compiled.cost_analysis()``, the number of Mosaic kernels
(``tpu_custom_call``) in the compiled program, the compile time, and a roofline estimate
``max(FLOPs / peak, bytes / HBM bandwidth)`` from published chip figures. These are compiled
estimates, not runs.

    python -m bench tpu --preset 7b --topology v5e:2x2 --mesh tensor=4 --json bench/results/tpu_v5e_2x2_7b.json
    python -m bench tpu --preset 3b --topology v6e:1x1 --mesh tensor=1 --only prefill,decode
    python -m bench tpu --kernels --topology v5e:2x2 --mesh tensor=4      # the attention kernels alone

Programs (``--only`` takes their kinds): ``prefill`` (thinker prefill, batch 1, per prompt bucket,
with the talker's inputs collected), ``decode`` (the thinker's on-device decode loop per batch, one
token per loop step), ``vision`` (a 1280x720 image; 60 s of video at 2 fps), ``audio`` (30 s),
``talker`` (prefill and decode loop), ``dit`` (the ODE solve of a streaming first chunk, a steady
chunk and 10 s of audio), ``bigvgan`` (the same lengths), ``train`` (the 3B-style training step:
LoRA and full, remat, AdamW); ``--match REGEX`` keeps the programs whose name matches (one vocoder
shape per process: XLA:TPU compiles each BigVGAN program at the published widths for 14-18 minutes on
a 2-core host). Each row also counts the compiled program's collectives (:func:`count_collectives`).
``--fits`` reads result files and, per preset, topology and mesh, takes each program from its newest
compile. The thinker and talker programs are ``omni_jax.engine``'s (the functions
``OmniModel`` binds and jits); the encoders', DiT's and BigVGAN's are their modules' traceable
bodies (``vision_forward``, ``audio_forward``, ``dit_sample_fn``, ``bigvgan_fn``), and the training
step is ``train_loss`` under the trainer's optimiser.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from functools import partial

import numpy as np

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm: int  # bytes per chip
    peak: float  # bf16 FLOP/s per chip
    bw: float  # HBM bytes/s per chip


# published per-chip figures (Cloud TPU documentation): bf16 matrix peak, HBM capacity and bandwidth
CHIPS = {
    "v5e": Chip("v5e", 16 * GiB, 197e12, 819e9),
    "v6e": Chip("v6e", 32 * GiB, 918e12, 1640e9),
    "v5p": Chip("v5p", 95 * GiB, 459e12, 2765e9),
    "v4": Chip("v4", 32 * GiB, 275e12, 1228e9),
}
# float32 matrix products at HIGHEST precision run on the MXU as 6 bfloat16 passes: the token2wav
# programs (float32 throughout, "highest") are estimated against peak / 6
F32_HIGHEST_PASSES = 6


def chip_of(topology: str) -> Chip:
    kind = topology.split(":")[0].lower()
    if kind.startswith("v5litepod") or kind == "v5lite":
        kind = "v5e"
    if kind not in CHIPS:
        raise SystemExit(f"--topology {topology}: chip '{kind}' is not one of {', '.join(CHIPS)}")
    return CHIPS[kind]


def libtpu_env():
    """Environment for compile-only use of libtpu on a host without a TPU (set before jax starts):
    no query of a TPU VM's metadata server, and no exclusive lock on ``/tmp/libtpu_lockfile``,
    which libtpu takes per process by default (any other JAX process on the host that loaded the
    TPU plugin would otherwise make this one fail to start)."""
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def require_libtpu():
    """Import libtpu or stop with the command that installs it."""
    try:
        import libtpu  # noqa: F401
    except ImportError as e:
        raise RuntimeError("libtpu is not importable: install it with `pip install \"jax[tpu]==<your jax version>\"` "
                           "(it is in omni-jax's `test` extra); ahead-of-time TPU compilation needs it") from e


def topology_mesh(topology: str, spec: str):
    """The mesh ``spec`` (``"tensor=4"``, ``"fsdp=2,tensor=2"``) over the compile-only devices of ``topology``."""
    from jax.experimental import mesh_utils, topologies

    from omni_jax.sharding import make_mesh

    topo = topologies.get_topology_desc(topology_name=topology, platform="tpu")
    devices = list(topo.devices)
    sizes = {}
    for part in spec.split(","):
        k, _, v = part.partition("=")
        sizes[k.strip()] = int(v)
    n = int(np.prod(list(sizes.values())))
    if n > len(devices):
        raise SystemExit(f"--mesh {spec} needs {n} devices; {topology} has {len(devices)}")
    order = mesh_utils.create_device_mesh((n,), devices[:n]).reshape(-1) if n > 1 else devices[:1]
    return make_mesh(spec, devices=list(order))


# --------------------------------------------------------------------------------------------
# abstract inputs


def abstract_module(build, mesh, prefix: str = "", *, per_layer: bool = False):
    """``(graphdef, state)`` of the module ``build()`` makes, with every parameter an abstract array
    laid out as the sharding rules say (``prefix`` + its path, as loading places it). ``per_layer``:
    decoder layers as per-layer buffers, the layout a loaded model serves from."""
    import jax
    from flax import nnx

    from omni_jax.decoder import to_per_layer
    from omni_jax.sharding import param_sharding

    def make():
        m = build()
        # the loader's one layout conversion, traced (no arrays are made)
        return nnx.merge(*to_per_layer(*nnx.split(m))) if per_layer else m

    graphdef, state = nnx.split(nnx.eval_shape(make))

    def place(path, x):
        # the State's dict keys; the trailing attribute key (a Variable's `.value`) is not part of the name
        p = prefix + "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=param_sharding(p, x.shape, mesh))

    return graphdef, jax.tree_util.tree_map_with_path(place, state)


def named(mesh, names, shape, dtype):
    """An abstract array with logical axes ``names`` (axes that do not divide are replicated)."""
    import jax
    from jax.sharding import NamedSharding

    from omni_jax.sharding import logical_to_spec

    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=NamedSharding(mesh, logical_to_spec(names, shape, mesh)))


def rep(mesh, shape, dtype):
    return named(mesh, (None,) * len(shape), shape, dtype)


def io_tree(mesh, tree):
    """Abstract arrays for a pytree of shapes (``jax.eval_shape`` output), named by the library's
    ``IO_AXES`` table from their paths, as ``MeshJit`` names a program's state and outputs."""
    import jax

    from omni_jax.sharding import io_axes

    return jax.tree_util.tree_map_with_path(
        lambda p, x: named(mesh, io_axes(jax.tree_util.keystr(p), len(x.shape)), x.shape, x.dtype), tree)


def shardings(tree):
    import jax

    return jax.tree.map(lambda x: x.sharding, tree)


def per_chip_bytes(tree) -> int:
    """Bytes one chip holds of the abstract arrays of ``tree`` (each its shard)."""
    import jax

    total = 0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape)
        total += int(np.prod(shard)) * np.dtype(x.dtype).itemsize
    return total


# --------------------------------------------------------------------------------------------
# programs


@dataclasses.dataclass
class Program:
    """One program to compile: ``fn(*args)`` with abstract ``args``; ``static`` closes over the rest.
    ``tokens`` is what one run produces or consumes (for rates); ``f32`` marks float32-at-highest
    programs (estimated at peak / 6); ``steps`` the loop steps one run stands for when the cost is
    of one step (decode). ``out_shardings``: the outputs' layout when the ``IO_AXES`` names, which
    replicate any output they do not name, are not it (the training step's new parameters and
    optimiser state keep their inputs' layouts, as the trainer declares them)."""

    name: str
    kind: str
    fn: object
    args: tuple
    tokens: int = 0
    f32: bool = False
    donate: tuple = ()
    note: str = ""
    out_shardings: object = None  # the outputs' layout; None: named by IO_AXES (as MeshJit names them)
    resident: int = 0  # bytes per chip its caller keeps in HBM beside it (a micro-step: the optimiser state)


class Builder:
    """Builds the programs of one preset on one mesh."""

    def __init__(self, cfg, mesh, dtype, impl="pallas"):
        import jax.numpy as jnp

        self.cfg, self.mesh, self.dtype, self.impl = cfg, mesh, dtype, impl
        self.jnp = jnp
        self._parts = {}

    # parameters, each component once
    def part(self, name):
        if name in self._parts:
            return self._parts[name]
        from flax import nnx

        from omni_jax import thinker as th
        from omni_jax.audio import AudioEncoder
        from omni_jax.talker import Talker
        from omni_jax.token2wav import BigVGAN, DiT, dit_per_layer
        from omni_jax.vision import VisionEncoder

        cfg, dt, mesh = self.cfg, self.dtype, self.mesh
        if name == "thinker":
            out = abstract_module(lambda: th.ThinkerLM(cfg.thinker, dtype=dt, rngs=nnx.Rngs(0)), mesh, per_layer=True)
        elif name == "thinker_stacked":  # the training layout, float32 masters
            out = abstract_module(lambda: th.ThinkerLM(cfg.thinker, dtype=self.jnp.float32, rngs=nnx.Rngs(0)), mesh)
        elif name == "talker":
            out = abstract_module(lambda: Talker(cfg.talker, dtype=dt, rngs=nnx.Rngs(0)), mesh, "talker/", per_layer=True)
        elif name == "audio":
            out = abstract_module(lambda: AudioEncoder(cfg.thinker.audio, dtype=dt, rngs=nnx.Rngs(0)), mesh, "audio/")
        elif name == "vision":
            out = abstract_module(lambda: VisionEncoder(cfg.thinker.vision, dtype=dt, rngs=nnx.Rngs(0)), mesh, "vision/")
        elif name == "dit":  # float32, per-layer blocks, as load_token2wav returns it
            out = abstract_module(lambda: dit_per_layer(DiT(cfg.token2wav.dit, rngs=nnx.Rngs(0))), mesh, "token2wav/")
        elif name == "bigvgan":
            out = abstract_module(lambda: BigVGAN(cfg.token2wav.bigvgan, rngs=nnx.Rngs(0)), mesh, "token2wav/")
        else:
            raise KeyError(name)
        self._parts[name] = out
        return out

    def resident_bytes(self, names=("thinker", "talker", "audio", "vision", "dit", "bigvgan")) -> dict:
        return {n: per_chip_bytes(self.part(n)[1]) for n in names}

    # ---- thinker
    def _sampling(self):
        jnp, mesh = self.jnp, self.mesh
        return dict(temperature=rep(mesh, (), jnp.float32), top_k=rep(mesh, (), jnp.int32),
                    top_p=rep(mesh, (), jnp.float32), repetition_penalty=rep(mesh, (), jnp.float32))

    def _rng(self, b):
        import jax

        return named(self.mesh, ("batch",), (b,), jax.random.key(0).dtype)

    def prefill(self, t: int, n_new: int, batch: int = 1, collect: bool = True) -> Program:
        """``omni_jax.engine.thinker_prefill``: ``batch`` text prompts of ``t`` (bucketed) tokens into
        a cache of ``t + n_new`` slots, choosing the first token; with ``collect`` the talker's inputs
        too (a spoken reply's prefill)."""
        from omni_jax import engine
        from omni_jax.generate import Sampling

        jnp, mesh, dt = self.jnp, self.mesh, self.dtype
        gdef, params = self.part("thinker")
        tcfg = self.cfg.thinker.text
        e = tcfg.hidden_size

        def fn(params, ids, mask, pos, mm_embeds, mm_idx, sp, rng, max_new, eos, pad):
            return engine.thinker_prefill(params, ids, mask, pos, mm_embeds, mm_idx, Sampling(**sp), rng, max_new, eos,
                                          pad, n_new, False, collect, graphdef=gdef, cfg=tcfg, dtype=dt, impl=self.impl)

        bt = ("batch", None)
        args = (params, named(mesh, bt, (batch, t), jnp.int32), named(mesh, bt, (batch, t), jnp.int32),
                named(mesh, (None, "batch", None), (3, batch, t), jnp.int32), rep(mesh, (0, e), dt),
                rep(mesh, (0,), jnp.int32), self._sampling(), self._rng(batch), rep(mesh, (), jnp.int32),
                rep(mesh, (2,), jnp.int32), rep(mesh, (), jnp.int32))
        return Program(f"prefill {t}" + (f" b{batch}" if batch > 1 else ""), "prefill", fn, args, tokens=t * batch)

    def decode_state(self, batch: int, t: int, n_new: int, collect: bool = False):
        """The abstract DecodeState after a prefill of ``batch`` x ``t`` tokens (``t + n_new`` slots)."""
        import jax

        p = self.prefill(t, n_new, batch, collect=collect)
        state, _ = jax.eval_shape(p.fn, *p.args)
        return io_tree(self.mesh, state)

    def decode(self, batch: int, context: int, n_new: int | None = None) -> Program:
        """``omni_jax.engine.thinker_decode``: the on-device decode loop (``n_steps`` traced) over a
        cache of ``context`` slots at ``batch`` rows. The compiled cost analysis counts the loop's
        body once: one token per row."""
        from omni_jax import engine
        from omni_jax.generate import Sampling

        jnp, mesh = self.jnp, self.mesh
        gdef, params = self.part("thinker")
        tcfg = self.cfg.thinker.text
        n_new = n_new or context // 2
        state = self.decode_state(batch, context - n_new, n_new)

        def fn(params, state, n_steps, sp, eos, pad):
            return engine.thinker_decode(params, state, n_steps, Sampling(**sp), eos, pad, False, graphdef=gdef,
                                         cfg=tcfg, impl=self.impl)

        args = (params, state, rep(mesh, (), jnp.int32), self._sampling(), rep(mesh, (2,), jnp.int32),
                rep(mesh, (), jnp.int32))
        return Program(f"decode b{batch} ctx {context}", "decode", fn, args, tokens=batch, donate=(1,))

    # ---- talker
    def talker_prefill(self, t: int, n_new: int) -> Program:
        """``omni_jax.engine.talker_prefill`` over a prompt of ``t`` thinker-space embeddings."""
        from omni_jax import engine
        from omni_jax.generate import Sampling

        jnp, mesh, dt = self.jnp, self.mesh, self.dtype
        gdef, params = self.part("talker")
        cfg = self.cfg.talker
        e = self.cfg.thinker.text.hidden_size

        def fn(tparams, embeds, mask, pos, seen, sp, rng, max_new, eos, pad, min_new, suppress):
            return engine.talker_prefill(tparams, embeds, mask, pos, seen, Sampling(**sp), rng, max_new, eos, pad,
                                         min_new, suppress, n_new, True, graphdef=gdef, cfg=cfg, dtype=dt,
                                         impl=self.impl)

        bt = ("batch", None)
        v = cfg.vocab_size
        args = (params, named(mesh, ("batch", None, "act_embed"), (1, t, e), dt), named(mesh, bt, (1, t), jnp.int32),
                named(mesh, (None, "batch", None), (3, 1, t), jnp.int32), named(mesh, bt, (1, v), jnp.bool_),
                self._sampling(), self._rng(1), rep(mesh, (), jnp.int32), rep(mesh, (2,), jnp.int32),
                rep(mesh, (), jnp.int32), rep(mesh, (), jnp.int32), rep(mesh, (v,), jnp.bool_))
        return Program(f"talker prefill {t}", "talker", fn, args, tokens=t)

    def talker_decode(self, t: int, n_new: int) -> Program:
        """``omni_jax.engine.talker_decode``: the talker's decode loop, each step reading its input
        from the thinker's reply buffers (``n_new`` tokens and hidden states)."""
        import jax

        from omni_jax import engine
        from omni_jax.generate import Sampling

        jnp, mesh = self.jnp, self.mesh
        gdef, tparams = self.part("talker")
        thgdef, params = self.part("thinker")
        cfg = self.cfg.talker
        e = self.cfg.thinker.text.hidden_size
        pre = self.talker_prefill(t, n_new)
        state = io_tree(mesh, jax.eval_shape(pre.fn, *pre.args))

        def fn(tparams, state, params, th_tokens, th_hidden, th_n, n_steps, sp, eos, pad, thinker_eos, extra_ids):
            return engine.talker_decode(tparams, state, params, th_tokens, th_hidden, th_n, n_steps, Sampling(**sp),
                                        eos, pad, True, thinker_eos, extra_ids, graphdef=gdef, thinker_graphdef=thgdef,
                                        cfg=cfg, impl=self.impl)

        i32 = jnp.int32
        args = (tparams, state, params, named(mesh, ("batch", None), (1, n_new), i32),
                named(mesh, ("batch", None, "act_embed"), (1, n_new, e), self.dtype), rep(mesh, (), i32),
                rep(mesh, (), i32), self._sampling(), rep(mesh, (2,), i32), rep(mesh, (), i32), rep(mesh, (2,), i32),
                rep(mesh, (3,), i32))
        return Program(f"talker decode ctx {t + n_new}", "talker", fn, args, tokens=1, donate=(1,))

    # ---- encoders
    def vision(self, what: str) -> Program:
        from flax import nnx

        from omni_jax.media import VisionProcessConfig, smart_resize, video_frame_size
        from omni_jax.vision import prepare_vision, vision_forward

        jnp, mesh, dt, impl = self.jnp, self.mesh, self.dtype, self.impl
        vcfg = self.cfg.thinker.vision
        pc = VisionProcessConfig()
        p = vcfg.patch_size
        if what == "image":  # 1280x720, resized as the image processor does
            h, w = smart_resize(720, 1280, pc.factor, pc.min_pixels, pc.max_pixels)
            grid = [[1, h // p, w // p]]
            label = f"vision image 1280x720 ({w}x{h})"
        else:  # 60 s at 2 fps: 120 frames, 2 per temporal patch
            h, w = video_frame_size(720, 1280, 120, pc)
            grid = [[120 // vcfg.temporal_patch_size, h // p, w // p]]
            label = f"vision video 60 s 2 fps ({w}x{h}, 120 frames)"
        vb = prepare_vision(vcfg, grid)
        gdef, params = self.part("vision")
        width = vcfg.in_channels * vcfg.temporal_patch_size * p * p
        tb, ub = len(vb.order), len(vb.restore)

        def fn(params, pixels, order, positions, window_ids, frame_ids, restore):
            return vision_forward(nnx.merge(gdef, params), vcfg, pixels, order, positions, window_ids, frame_ids,
                                  restore, impl=impl)

        i32 = jnp.int32
        args = (params, rep(mesh, (tb, width), dt), rep(mesh, (tb,), i32), rep(mesh, (tb, 2), i32),
                rep(mesh, (tb,), i32), rep(mesh, (tb,), i32), rep(mesh, (ub,), i32))
        return Program(label, "vision", fn, args, tokens=vb.num_tokens,
                       note=f"{vb.num_patches} patches (bucket {tb}), {vb.num_tokens} tokens")

    def audio(self, seconds: float = 30.0) -> Program:
        from flax import nnx

        from omni_jax.audio import audio_forward, prepare_audio

        jnp, mesh, dt, impl = self.jnp, self.mesh, self.dtype, self.impl
        acfg = self.cfg.thinker.audio
        frames = int(seconds * 100)  # 16 kHz, hop 160
        ab = prepare_audio(acfg, np.zeros((acfg.num_mel_bins, frames), np.float32), [frames])
        gdef, params = self.part("audio")
        nb, win = ab.chunks.shape[:2]

        def fn(params, chunks, chunk_lens, pool_a, pool_b):
            return audio_forward(nnx.merge(gdef, params), acfg, chunks, chunk_lens, pool_a, pool_b, impl=impl)

        args = (params, named(mesh, ("batch", None, None), (nb, win, acfg.num_mel_bins), dt),
                named(mesh, ("batch",), (nb,), jnp.int32), rep(mesh, ab.pool_a.shape, jnp.int32),
                rep(mesh, ab.pool_b.shape, jnp.int32))
        return Program(f"audio {seconds:g} s", "audio", fn, args, tokens=ab.num_tokens,
                       note=f"{nb} chunks of {win} frames, {ab.num_tokens} tokens")

    # ---- token2wav
    def dit(self, n_codes: int, label: str, ref_frames: int = 300) -> Program:
        import jax

        from flax import nnx

        from omni_jax.token2wav import MATMUL_PRECISION, dit_sample_fn

        jnp, mesh, impl = self.jnp, self.mesh, self.impl
        dcfg = self.cfg.token2wav.dit
        gdef, params = self.part("dit")
        f32 = jnp.float32
        tlen = n_codes * dcfg.repeats

        def fn(params, codes, cond, ref_mel, noise, code_lengths, time_points, guidance):
            with jax.default_matmul_precision(MATMUL_PRECISION):
                return dit_sample_fn(nnx.merge(gdef, params), dcfg, codes, cond, ref_mel, noise, guidance_scale=guidance,
                                     code_lengths=code_lengths, impl=impl, use_cfg=True, time_points=time_points)

        args = (params, rep(mesh, (1, n_codes), jnp.int32), rep(mesh, (1, dcfg.enc_emb_dim), f32),
                rep(mesh, (1, ref_frames, dcfg.mel_dim), f32), rep(mesh, (1, tlen, dcfg.mel_dim), f32),
                rep(mesh, (1,), jnp.int32), rep(mesh, (10,), f32), rep(mesh, (), f32))
        return Program(f"DiT {label}", "dit", fn, args, tokens=n_codes, f32=True,
                       note=f"{n_codes} codes, {tlen} frames, 36 evaluations x 2 CFG rows")

    def bigvgan(self, frames: int, label: str) -> Program:
        import jax
        from flax import nnx

        from omni_jax.token2wav import MATMUL_PRECISION, bigvgan_fn

        mesh = self.mesh
        bcfg = self.cfg.token2wav.bigvgan
        gdef, params = self.part("bigvgan")

        def fn(params, mel):
            with jax.default_matmul_precision(MATMUL_PRECISION):
                return bigvgan_fn(nnx.merge(gdef, params), bcfg, mel)

        args = (params, rep(mesh, (1, frames, bcfg.mel_dim), self.jnp.float32))
        return Program(f"BigVGAN {label}", "bigvgan", fn, args, tokens=frames, f32=True, note=f"{frames} mel frames")

    # ---- training
    def train(self, mode: str, batch: int, seq: int, rank: int = 8, program: str = "step") -> Program:
        """One of the trainer's own programs (``train/trainer.py``) at its shapes: ``train_loss`` with
        remat and bf16 compute from float32 masters, global-norm clipping and AdamW; ``mode``
        ``"lora"`` (rank-``rank`` adapters on the attention and MLP kernels, base frozen in bf16) or
        ``"full"`` (thinker LM trained). ``program``: ``"step"`` (``fused_step``: gradient and update in
        one program, what ``--grad-accum 1`` runs), ``"micro-step"`` (``micro_step``: the gradient added
        into a float32 accumulator, with the optimiser state resident beside it) or ``"update"``
        (``apply_update``), the two programs of ``--grad-accum`` above 1."""
        import jax
        import optax
        from flax import nnx

        from omni_jax.training import train_loss

        from train.lora import TARGETS, apply_lora, lora_axes
        from train.trainer import apply_update, fused_step, micro_step

        jnp, mesh, impl, cfg = self.jnp, self.mesh, self.impl, self.cfg
        _, masters = self.part("thinker_stacked")
        pure = {"thinker": nnx.to_pure_dict(masters)}
        tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4, weight_decay=0.0))

        def cast(tree, dt):
            return jax.tree.map(lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

        if mode == "lora":
            ad = {}
            for path, w in _flatten(pure["thinker"]):
                key = "/".join(path)
                if not TARGETS.match(key):
                    continue
                *lead, din, dout = w.shape
                ax_a, ax_b = lora_axes(key, w.ndim)
                ad[key] = {"a": named(mesh, ax_a, (*lead, din, rank), jnp.float32),
                           "b": named(mesh, ax_b, (*lead, rank, dout), jnp.float32)}
            trainable = {"lora": {"thinker": ad}}
            frozen = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16, sharding=x.sharding), pure)
        else:
            trainable, frozen = pure, {}
        # optimizer moments take their parameter's layout (the trainer places them so); counters replicate
        opt = _like_params(tx, jax.eval_shape(tx.init, trainable), trainable, mesh)

        def params_of(tr, fr):
            p = apply_lora(fr, tr["lora"], 2.0) if "lora" in tr else {**fr, **tr}
            return cast(p, jnp.bfloat16)

        def loss_fn(tr, fr, batch_arrays):
            return train_loss(params_of(tr, fr), batch_arrays, cfg, impl=impl, remat=True)

        bt = ("batch", None)
        i32 = jnp.int32
        data = {"input_ids": named(mesh, bt, (batch, seq), i32), "attention_mask": named(mesh, bt, (batch, seq), i32),
                "labels": named(mesh, bt, (batch, seq), i32),
                "position_ids": named(mesh, (None, "batch", None), (3, batch, seq), i32),
                "num_targets": rep(mesh, (), jnp.float32)}
        # the new parameters, moments and accumulator in their inputs' layouts, as the trainer's jits declare
        # them (train/trainer.py); left to IO_AXES they would come out replicated
        one = rep(mesh, (), jnp.float32)
        tr_sh, opt_sh, r = shardings(trainable), shardings(opt), one.sharding
        name = f"train {program} {mode} b{batch}x{seq}"
        if program == "step":
            return Program(name, "train", fused_step(loss_fn, tx), (trainable, frozen, opt, data), tokens=batch * seq,
                           donate=(0, 2), out_shardings=(tr_sh, opt_sh, r, r, r))
        if program == "micro-step":
            return Program(name, "train", micro_step(loss_fn), (trainable, frozen, trainable, data),
                           tokens=batch * seq, donate=(2,), out_shardings=(tr_sh, r, r), resident=per_chip_bytes(opt),
                           note="with the optimiser state resident")
        if program == "update":
            return Program(name, "train", apply_update(tx), (trainable, opt, trainable, one), donate=(0, 1),
                           out_shardings=(tr_sh, opt_sh, r), resident=per_chip_bytes(frozen),
                           note="with the frozen parameters resident")
        raise ValueError(f"program: step, micro-step or update, got {program!r}")


def _flatten(d, prefix=()):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, prefix + (str(k),))
        else:
            yield prefix + (str(k),), v


def _like_params(tx, opt, trainable, mesh):
    """Abstract optimiser state: every leaf that stands for a trainable parameter (AdamW's moments)
    takes that parameter's sharding, matched by its place in the tree (``optax.tree_map_params``;
    matching by shape would give ``q_proj``'s moments ``o_proj``'s transposed layout, both being
    ``[L, E, E]``), and the rest (step counters) are replicated."""
    import jax
    import optax
    from jax.sharding import NamedSharding, PartitionSpec as P

    return optax.tree_map_params(
        tx, lambda x, p: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=p.sharding), opt, trainable,
        transform_non_params=lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P())))


# --------------------------------------------------------------------------------------------
# compile and measure


def count_kernels(text: str) -> int:
    """Mosaic kernels (``tpu_custom_call`` custom calls) in a compiled program's text."""
    return len(re.findall(r'custom_call_target="tpu_custom_call"', text))


_COLLECTIVE = re.compile(r"=\s*(.*?)\s(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(-start)?\(")
_ARRAY = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|bf16|f16|f32|f64)\[([\d,]*)\]")
_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
             "s64": 8, "u64": 8, "f64": 8}


def count_collectives(text: str) -> dict:
    """Collectives in a compiled program's text: per kind, how many and the bytes of their results
    (per chip; an op in a loop body counts once). An async ``-start``/``-done`` pair counts once, by its
    start."""
    out: dict = {}
    for line in text.splitlines():
        m = _COLLECTIVE.search(line)
        if m is None:
            continue
        shapes = [(t, d) for t, d in _ARRAY.findall(m.group(1)) if d]  # scalars: an async op's contexts
        if m.group(3) and m.group(2) != "all-reduce":  # the start's tuple: operands, then results
            shapes = shapes[len(shapes) // 2:]
        nbytes = sum(_ITEMSIZE[t] * int(np.prod([int(d) for d in dims.split(",") if d])) for t, dims in shapes)
        c = out.setdefault(m.group(2), {"count": 0, "bytes": 0})
        c["count"] += 1
        c["bytes"] += nbytes
    return out


def compile_program(p: Program, mesh, chip: Chip) -> dict:
    """Compile ``p`` ahead of time for ``mesh``'s topology and read its analyses."""
    import jax

    from omni_jax.kernels import target_platform
    from omni_jax.sharding import use_mesh

    out_sh = None
    t0 = time.perf_counter()
    with target_platform("tpu"), use_mesh(mesh):
        if p.out_shardings is not None:
            out_sh = p.out_shardings
        else:
            shapes = jax.eval_shape(p.fn, *p.args)
            out_sh = jax.tree.map(lambda x: x.sharding, io_tree(mesh, shapes))
        jitted = jax.jit(p.fn, in_shardings=shardings(p.args), out_shardings=out_sh, donate_argnums=p.donate)
        lowered = jitted.lower(*p.args)
        compiled = lowered.compile()
    dt = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    text = compiled.as_text()
    arg, out, tmp, alias = (int(getattr(mem, f"{n}_size_in_bytes")) for n in ("argument", "output", "temp", "alias"))
    code = int(getattr(mem, "generated_code_size_in_bytes", 0))
    total = arg + out + tmp - alias + code + p.resident
    flops = float(cost.get("flops", 0.0))
    nbytes = float(cost.get("bytes accessed", 0.0))
    peak = chip.peak / (F32_HIGHEST_PASSES if p.f32 else 1)
    est = max(flops / peak, nbytes / chip.bw)
    return dict(name=p.name, kind=p.kind, note=p.note, tokens=p.tokens, arg_bytes=arg, out_bytes=out,
                temp_bytes=tmp, alias_bytes=alias, code_bytes=code, resident_bytes=p.resident, total_bytes=total,
                hbm_bytes=chip.hbm,
                fits=total <= chip.hbm, flops=flops, bytes_accessed=nbytes, pallas_kernels=count_kernels(text),
                compile_s=round(dt, 2), est_s=est, bound="compute" if flops / peak >= nbytes / chip.bw else "memory",
                f32_highest=p.f32, xla_optimal_s=float(cost.get("optimal_seconds", -1.0)),
                collectives=count_collectives(text))


def program_list(b: Builder, kinds, prompts, batches, context, train_seq, preset) -> list:
    progs = []
    cfg = b.cfg
    n_new = 512
    if "prefill" in kinds:
        progs += [b.prefill(t, n_new) for t in prompts]
    if "decode" in kinds:
        progs += [b.decode(bb, context) for bb in batches]
    if "vision" in kinds:
        progs += [b.vision("image"), b.vision("video")]
    if "audio" in kinds:
        progs.append(b.audio(30.0))
    if "talker" in kinds and cfg.talker is not None:
        progs += [b.talker_prefill(1024, 1024), b.talker_decode(1024, 1024)]
    if "dit" in kinds and cfg.token2wav is not None:
        progs += [b.dit(36, "streaming first chunk (3 blocks)"), b.dit(72, "streaming chunk (6 blocks)"),
                  b.dit(512, "10 s (500 codes, bucket 512)")]
    if "bigvgan" in kinds and cfg.token2wav is not None:
        progs += [b.bigvgan(48, "streaming first chunk"), b.bigvgan(120, "streaming chunk"),
                  b.bigvgan(1000, "10 s")]
    if "train" in kinds:
        progs += [b.train(mode, 1, train_seq, program=prog) for mode in ("lora", "full")
                  for prog in ("step", "micro-step", "update")]
    return progs


def estimates(rows: list, chip: Chip) -> dict:
    """Rates and latencies from the per-program estimates: decode tokens/s per batch, prefill
    tokens/s per prompt, and the first audio of a spoken reply (prefill of a 1k prompt, 25 thinker
    decode steps at batch 1, the talker's prefill and 24 steps for the first chunk's codes, the
    first chunk's DiT solve and vocoder)."""
    by = {r["name"]: r for r in rows if "est_s" in r}
    out = {"decode_tok_s": {}, "prefill_tok_s": {}}
    for r in rows:
        if r.get("kind") == "decode" and "est_s" in r:
            out["decode_tok_s"][r["name"]] = r["tokens"] / r["est_s"]
        if r.get("kind") == "prefill" and "est_s" in r:
            out["prefill_tok_s"][r["name"]] = r["tokens"] / r["est_s"]
    need = ["prefill 1024", "talker prefill 1024", "talker decode ctx 2048",
            "DiT streaming first chunk (3 blocks)", "BigVGAN streaming first chunk"]
    dec1 = [r for r in rows if r.get("kind") == "decode" and r["name"].startswith("decode b1 ") and "est_s" in r]
    if all(n in by for n in need) and dec1:
        parts = {"thinker prefill 1024": by[need[0]]["est_s"], "thinker 25 steps": 25 * dec1[0]["est_s"],
                 "talker prefill": by[need[1]]["est_s"], "talker 24 steps": 24 * by[need[2]]["est_s"],
                 "DiT first chunk": by[need[3]]["est_s"], "BigVGAN first chunk": by[need[4]]["est_s"]}
        out["first_audio_s"] = sum(parts.values())
        out["first_audio_parts_s"] = parts
    return out


def fmt_bytes(n) -> str:
    return f"{n / GiB:.2f}"


def print_table(rows, chip, file=sys.stdout):
    hdr = (f"{'program':44s} {'arg GiB':>8s} {'out':>6s} {'temp':>6s} {'total':>6s} {'fits':>4s} "
           f"{'GFLOP':>10s} {'GB acc':>8s} {'pallas':>6s} {'compile s':>9s} {'est ms':>9s}")
    print(f"per chip, {chip.name}: HBM {chip.hbm / GiB:.0f} GiB, {chip.peak / 1e12:.0f} TFLOP/s, "
          f"{chip.bw / 1e9:.0f} GB/s (compiled estimates, not runs)", file=file)
    print(hdr, file=file)
    for r in rows:
        if "error" in r:
            print(f"{r['name']:44s} FAILED: {r['error'][:160]}", file=file)
            continue
        print(f"{r['name'][:44]:44s} {fmt_bytes(r['arg_bytes']):>8s} {fmt_bytes(r['out_bytes']):>6s} "
              f"{fmt_bytes(r['temp_bytes']):>6s} {fmt_bytes(r['total_bytes']):>6s} {'yes' if r['fits'] else 'NO':>4s} "
              f"{r['flops'] / 1e9:>10.1f} {r['bytes_accessed'] / 1e9:>8.2f} {r['pallas_kernels']:>6d} "
              f"{r['compile_s']:>9.1f} {r['est_s'] * 1e3:>9.3f}", file=file)


def versions() -> dict:
    import importlib.metadata as md

    import jax

    out = {"jax": jax.__version__}
    for name in ("jaxlib", "libtpu", "flax"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def load_preset(name: str):
    import omni_jax

    if name == "default":
        from omni_jax.default_model import default_config

        return default_config()
    return omni_jax.preset(name)


def _progress(total):
    try:
        from tqdm import tqdm

        return tqdm(total=total, unit="program", file=sys.stderr)
    except ImportError:
        return None


def run_programs(progs, mesh, chip, log=print) -> list:
    rows = []
    bar = _progress(len(progs))
    for p in progs:
        if bar is not None:
            bar.set_description(p.name[:40])
        try:
            r = compile_program(p, mesh, chip)
        except Exception as e:  # a program that does not compile is a result: record why, go on
            r = dict(name=p.name, kind=p.kind, error=f"{type(e).__name__}: {str(e).splitlines()[0][:600]}")
        rows.append(r)
        if bar is not None:
            bar.update(1)
        else:
            log(f"[{len(rows)}/{len(progs)}] {p.name}: " + (r.get("error") or f"{r['compile_s']} s"))
    if bar is not None:
        bar.close()
    return rows


# --------------------------------------------------------------------------------------------
# the attention kernels alone


def kernel_cases(mesh, head_dims=(64, 80, 128), dtypes=("bfloat16", "float32"), t=2048, b=None):
    """Every structural mask the models use, at each head dim and dtype, sharded as the models shard
    them (batch rows over data/fsdp, heads over tensor): causal prefill with left padding into a
    cache chunk, segment ids (vision windows), the DiT block band with key padding, key padding
    alone (audio chunks), the causal forward + backward (training), and decode over a cache."""
    import jax
    import jax.numpy as jnp

    from omni_jax.attention import MaskSpec, attention

    n = mesh.shape.get("tensor", 1)
    h, kvh = 4 * n, 2 * n
    dp = int(np.prod([mesh.shape[a] for a in ("data", "fsdp")]))
    b = b or max(2, dp)
    cases = []
    for dname in dtypes:
        dt = jnp.dtype(dname)
        for d in head_dims:
            kv = named(mesh, ("batch", None, "act_kv_heads", None), (b, 2 * t, kvh, d), dt)
            kv1 = named(mesh, ("batch", None, "act_kv_heads", None), (b, t, kvh, d), dt)
            qm = named(mesh, ("batch", None, "act_heads", None), (b, t, h, d), dt)
            valid2 = named(mesh, ("batch", None), (b, 2 * t), jnp.bool_)
            valid = named(mesh, ("batch", None), (b, t), jnp.bool_)
            seg = named(mesh, ("batch", None), (b, t), jnp.int32)
            q1 = named(mesh, ("batch", None, "act_heads", None), (b, 1, h, d), dt)

            def mk(kind, d=d, dname=dname):
                def causal_cache(q, k, v, valid, impl):  # a prompt chunk written at slots [t/2, 3t/2) of 2t
                    m = MaskSpec(causal=True, q_slots=t // 2 + jnp.arange(t), kv_valid=valid)
                    return attention(q, k, v, m, impl=impl)

                def segments(q, k, v, seg, impl):
                    return attention(q, k, v, MaskSpec(q_segment_ids=seg, kv_segment_ids=seg), impl=impl)

                def band(q, k, v, valid, impl):  # the DiT's: 24-frame blocks, 1 back, 1 ahead, padded keys
                    return attention(q, k, v, MaskSpec(block_band=(24, 1, 1), kv_valid=valid), impl=impl)

                def padding(q, k, v, valid, impl):
                    return attention(q, k, v, MaskSpec(kv_valid=valid), impl=impl)

                def backward(q, k, v, valid, impl):
                    f = lambda q, k, v: attention(q, k, v, MaskSpec(causal=True, kv_valid=valid),
                                                  impl=impl).astype(jnp.float32).sum()
                    return jax.grad(f, (0, 1, 2))(q, k, v)

                def decode(q, k, v, valid, impl):
                    m = MaskSpec(causal=True, q_slots=jnp.full((q.shape[0], 1), 2 * t - 1), kv_valid=valid)
                    return attention(q, k, v, m, impl=impl)

                table = {"causal+padding+cache": (causal_cache, (qm, kv, kv, valid2)),
                         "segment ids": (segments, (qm, kv1, kv1, seg)),
                         "DiT band+padding": (band, (qm, kv1, kv1, valid)),
                         "key padding": (padding, (qm, kv1, kv1, valid)),
                         "causal backward": (backward, (qm, kv1, kv1, valid)),
                         "decode": (decode, (q1, kv, kv, valid2))}
                return table[kind]

            for kind in ("causal+padding+cache", "segment ids", "DiT band+padding", "key padding", "causal backward",
                         "decode"):
                fn, args = mk(kind)
                cases.append((f"{kind} d{d} {dname}", fn, args, dname == "float32"))
    return cases


def run_kernels(mesh, chip, log=print, **kw) -> list:
    """Each kernel case compiled twice, with the Pallas kernels and with XLA's attention, and
    compared by the roofline estimate of their cost analyses."""
    import jax

    from omni_jax.kernels import target_platform
    from omni_jax.sharding import use_mesh

    rows = []
    cases = kernel_cases(mesh, **kw)
    bar = _progress(len(cases))
    for name, fn, args, f32 in cases:
        r = {"name": name}
        for impl in ("pallas", "xla"):
            t0 = time.perf_counter()
            try:
                with target_platform("tpu"), use_mesh(mesh):
                    c = jax.jit(partial(fn, impl=impl), in_shardings=shardings(args)).lower(*args).compile()
            except Exception as e:
                r[impl] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:400]}"}
                continue
            cost = c.cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            mem = c.memory_analysis()
            fl, by = float(cost.get("flops", 0)), float(cost.get("bytes accessed", 0))
            peak = chip.peak / (F32_HIGHEST_PASSES if f32 else 1)
            r[impl] = dict(flops=fl, bytes_accessed=by, est_s=max(fl / peak, by / chip.bw),
                           temp_bytes=int(mem.temp_size_in_bytes), pallas_kernels=count_kernels(c.as_text()),
                           compile_s=round(time.perf_counter() - t0, 2))
        if "est_s" in r.get("pallas", {}) and "est_s" in r.get("xla", {}):
            r["speedup_vs_xla"] = r["xla"]["est_s"] / r["pallas"]["est_s"]
        rows.append(r)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return rows


def print_kernels(rows, file=sys.stdout):
    print(f"{'case':34s} {'pallas':>6s} {'est us':>9s} {'temp MiB':>8s} {'xla est us':>10s} {'xla temp':>8s} "
          f"{'xla/pallas':>10s}", file=file)
    for r in rows:
        p, x = r.get("pallas", {}), r.get("xla", {})
        if "error" in p:
            print(f"{r['name']:34s} FAILED: {p['error'][:150]}", file=file)
            continue
        xs = f"{x['est_s'] * 1e6:10.1f} {x['temp_bytes'] / 2**20:8.1f}" if "est_s" in x else f"{'-':>10s} {'-':>8s}"
        print(f"{r['name']:34s} {p['pallas_kernels']:6d} {p['est_s'] * 1e6:9.1f} {p['temp_bytes'] / 2**20:8.1f} {xs} "
              f"{r.get('speedup_vs_xla', float('nan')):10.2f}", file=file)


# --------------------------------------------------------------------------------------------


def fits(results: list[dict], names: list[str] | None = None) -> list[dict]:
    """What fits where, from result files of this script: per (preset, topology, mesh), the largest
    compiled prompt bucket whose prefill and the largest decode batch whose decode loop fit a chip
    with every other component resident (talker, audio and vision encoders, DiT, BigVGAN: their
    per-chip parameter bytes). A program's own total (arguments, including the thinker's
    parameters and the KV cache, outputs, temporaries, code, less donated buffers) comes from its
    compiled memory analysis; a program that failed to compile for lack of memory does not fit.

    Files may overlap: a program compiled in several files counts by its newest compile (the file's
    ``date``; on the same date, the file later in ``results``), and the resident bytes are the newest
    file's of the group, so recompiling one program into a new file supersedes only that program.
    ``names``: the files' names, to say which file each figure came from."""
    names = names or [f"#{i}" for i in range(len(results))]
    groups: dict = {}
    for i, res in enumerate(results):
        if "programs" not in res:
            continue
        when = (res.get("date") or "", i)
        for r in res["programs"]:
            key = (res.get("preset"), res.get("topology"), r.get("mesh") or res.get("mesh"))
            g = groups.setdefault(key, {"programs": {}, "resident": None, "res": res})
            if r.get("kind") in ("prefill", "decode"):
                old = g["programs"].get(r["name"])
                if old is None or when >= old[0]:
                    g["programs"][r["name"]] = (when, r, names[i])
        key = (res.get("preset"), res.get("topology"), res.get("mesh"))
        if res.get("resident_bytes_per_chip") and key in groups:
            g = groups[key]
            if g["resident"] is None or when >= g["resident"][0]:
                g["resident"] = (when, res["resident_bytes_per_chip"], names[i])
                g["res"] = res
    out = []
    for (preset, topology, mesh), g in groups.items():
        if g["resident"] is None or not g["programs"]:  # no resident bytes, or no serving program
            continue
        resident = g["resident"][1]
        others = sum(v for k, v in resident.items() if k != "thinker")
        hbm = g["res"]["chip"]["hbm"]
        row = {"preset": preset, "topology": topology, "mesh": mesh, "hbm_gib": hbm / GiB,
               "resident_gib": sum(resident.values()) / GiB, "others_gib": others / GiB,
               "largest_prompt": None, "prefill_total_gib": None, "largest_decode_batch": None,
               "decode_total_gib": None, "resident_from": g["resident"][2], "prefill_from": None, "decode_from": None}
        for _, r, src in g["programs"].values():
            if "total_bytes" not in r:
                continue
            ok = r["total_bytes"] + others <= hbm
            if r["kind"] == "prefill" and ok and r["tokens"] > (row["largest_prompt"] or 0):
                row["largest_prompt"], row["prefill_total_gib"] = r["tokens"], (r["total_bytes"] + others) / GiB
                row["prefill_from"] = src
            if r["kind"] == "decode" and ok and r["tokens"] > (row["largest_decode_batch"] or 0):
                row["largest_decode_batch"], row["decode_total_gib"] = r["tokens"], (r["total_bytes"] + others) / GiB
                row["decode_from"] = src
        out.append(row)
    return out


def print_fits(rows, file=sys.stdout):
    print(f"{'preset':6s} {'topology':9s} {'mesh':16s} {'HBM':>5s} {'weights':>8s} {'prompt':>7s} {'GiB':>6s} "
          f"{'decode b':>8s} {'GiB':>6s}", file=file)
    for r in rows:
        f = lambda x: "-" if x is None else f"{x:.2f}"
        print(f"{r['preset']:6s} {r['topology']:9s} {r['mesh']:16s} {r['hbm_gib']:5.0f} {r['resident_gib']:8.2f} "
              f"{str(r['largest_prompt'] or 'none'):>7s} {f(r['prefill_total_gib']):>6s} "
              f"{str(r['largest_decode_batch'] or 'none'):>8s} {f(r['decode_total_gib']):>6s}  "
              f"(from {r['resident_from']}, {r['prefill_from']}, {r['decode_from']})", file=file)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench tpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="7b", help="3b, 7b or default (the embedded tiny model)")
    ap.add_argument("--topology", default="v5e:2x2", help="e.g. v5e:2x2, v6e:2x2, v5p:2x2x1, v4:2x2x1, v5e:1x1")
    ap.add_argument("--mesh", default="tensor=4", help="mesh spec over the topology's chips, e.g. fsdp=2,tensor=2")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--attention", default="pallas", choices=["pallas", "xla"])
    ap.add_argument("--only", default="prefill,decode,vision,audio,talker,dit,bigvgan,train",
                    help="comma-separated program kinds")
    ap.add_argument("--prompts", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--context", type=int, default=4096, help="decode: KV cache slots (half prompt, half new)")
    ap.add_argument("--train-seq", type=int, default=2048)
    ap.add_argument("--match", default=None, metavar="REGEX",
                    help="compile only the programs whose name matches (e.g. 'first chunk')")
    ap.add_argument("--kernels", action="store_true", help="compile the attention kernels alone (Pallas vs XLA)")
    ap.add_argument("--fits", nargs="+", metavar="RESULT.json", help="print what fits where from result files")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.fits:
        rows = fits([json.load(open(p, encoding="utf-8")) for p in a.fits], [os.path.basename(p) for p in a.fits])
        print_fits(rows)
        if a.json:
            from .util import write_json

            write_json(a.json, {"fits": rows, "sources": a.fits})
        return 0

    libtpu_env()
    require_libtpu()
    import jax.numpy as jnp

    chip = chip_of(a.topology)
    mesh = topology_mesh(a.topology, a.mesh)
    print(f"{a.topology} ({len(mesh.devices.flat)} of its chips in mesh {dict(mesh.shape)}), "
          f"{mesh.devices.flat[0].device_kind}; {versions()}", file=sys.stderr)
    res = {"date": time.strftime("%Y-%m-%d"), "topology": a.topology, "mesh": a.mesh, "chip": dataclasses.asdict(chip),
           "versions": versions(), "command": "python -m bench tpu " + " ".join(argv if argv is not None else sys.argv[1:]),
           "note": "compiled estimates, not runs: memory from compiled.memory_analysis(), FLOPs and bytes from "
                   "compiled.cost_analysis() (per chip), time = max(FLOPs / peak, bytes / HBM bandwidth)"}
    if a.kernels:
        rows = run_kernels(mesh, chip)
        print_kernels(rows)
        res["kernels"] = rows
    else:
        cfg = load_preset(a.preset)
        b = Builder(cfg, mesh, jnp.dtype(a.dtype), a.attention)
        kinds = set(a.only.split(","))
        progs = program_list(b, kinds, a.prompts, a.batches, a.context, a.train_seq, a.preset)
        if a.match:
            progs = [p for p in progs if re.search(a.match, p.name)]
        rows = run_programs(progs, mesh, chip, log=lambda s: print(s, file=sys.stderr))
        print_table(rows, chip)
        res.update(preset=a.preset, dtype=a.dtype, attention=a.attention, programs=rows,
                   resident_bytes_per_chip=b.resident_bytes() if cfg.talker is not None else None,
                   estimates=estimates(rows, chip))
        est = res["estimates"]
        for k, v in est["decode_tok_s"].items():
            print(f"estimated {k}: {v:,.0f} tokens/s")
        for k, v in est["prefill_tok_s"].items():
            print(f"estimated {k}: {v:,.0f} tokens/s")
        if "first_audio_s" in est:
            print(f"estimated first audio: {est['first_audio_s'] * 1e3:.1f} ms "
                  + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in est["first_audio_parts_s"].items()))
    if a.json:
        from .util import write_json

        write_json(a.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
