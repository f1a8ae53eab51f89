"""The Thinker's vision encoder (ViT with window and full attention, 2x2 patch merger).

What it computes (transformers' ``Qwen2_5OmniVisionEncoder``): flattened patches
``[T, C * tp * p * p]`` (the processor's order: each run of ``m * m`` patches is one
``m x m`` merge unit) are embedded by a stride-equals-kernel Conv3d (a matrix product),
given 2-D rotary positions (row and column of the patch, half of the rotary frequencies
each), and run through ``depth`` pre-RMSNorm blocks. Blocks listed in
``fullatt_block_indexes`` attend within one image / video frame; the others attend within
windows of ``window_size / patch_size`` patches a side. The merger RMS-normalises each
patch, concatenates the ``m * m`` patches of a unit and maps them through a 2-layer GELU MLP.

Static shapes and masks. As in the reference, the patches are put in *window order* (the
units of each window consecutive, windows in order, frames in order) for the whole stack,
so every window and every frame is a contiguous run of the sequence; the merged tokens are
put back in the processor's order at the end. Attention masks are segment ids, never
per-window Python loops: the window id of each patch in window layers (with a block band of
one window's length either side, which bounds the work without changing the mask), the frame
id in full-attention layers (chosen per layer inside one ``lax.scan``). Padding patches (up to a
bucketed patch count, :func:`patch_bucket`) get segment id ``-1`` and are never seen by
real patches. All index arithmetic (window order, positions, segment ids) is done on the
host with numpy from ``grid_thw``; the jitted part sees only arrays of bucketed shapes.

Parameter tree (NNX; paths mirror the Hugging Face keys ``thinker.visual.*``)::

    patch_embed/proj/weight [E, C, tp, p, p]   (torch Conv3d layout, not transposed)
    blocks/...              stacked [depth, ...]: norm1, attn.{q,k,v,proj}, norm2,
                            mlp.{gate,up,down}_proj (all with bias)
    merger/ln_q/weight      merger/mlp/0/{kernel,bias}  merger/mlp/2/{kernel,bias}
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .attention import MaskSpec, attention
from .config import VisionConfig
from .errors import CheckpointError, InputError
from .layers import Linear, RMSNorm, activation, half_octave_bucket, scan_layers
from .rope import apply_rope, inv_freq
from .sharding import constrain

HF_PREFIX = "thinker.visual."
# Hugging Face key map (omni_jax.checkpoint.tree.hf_name): every parameter <- thinker.visual.*, stacked over "blocks"
VISION_PREFIXES = {"": HF_PREFIX}
VISION_STACK_NAMES = ("blocks",)

def _activation(name: str):
    return activation(name, "vision hidden_act")


# --------------------------------------------------------------------------------------
# modules


class _Conv3dWeight(nnx.Module):
    """torch ``nn.Conv3d(bias=False)``'s weight ``[E, C, tp, p, p]``, kept in torch layout."""

    def __init__(self, shape, *, dtype, rngs: nnx.Rngs):
        self.weight = nnx.Param((jax.random.normal(rngs.params(), shape, jnp.float32) * 0.02).astype(dtype))


class PatchEmbed(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        shape = (cfg.hidden_size, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = _Conv3dWeight(shape, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        w = self.proj.weight[...]
        w2 = w.reshape(w.shape[0], -1)  # Conv3d with stride == kernel: one product per patch
        return jnp.einsum("ti,ei->te", x.astype(w.dtype), w2, preferred_element_type=jnp.float32).astype(w.dtype)


class VisionAttention(nnx.Module):
    def __init__(self, e: int, *, dtype, rngs, stack):
        self.q = Linear(e, e, bias=True, dtype=dtype, rngs=rngs, stack=stack)
        self.k = Linear(e, e, bias=True, dtype=dtype, rngs=rngs, stack=stack)
        self.v = Linear(e, e, bias=True, dtype=dtype, rngs=rngs, stack=stack)
        self.proj = Linear(e, e, bias=True, dtype=dtype, rngs=rngs, stack=stack)


class VisionMLP(nnx.Module):
    """``down(act(gate(x)) * up(x))``, all with bias."""

    def __init__(self, e: int, hidden: int, *, dtype, rngs, stack):
        self.gate_proj = Linear(e, hidden, bias=True, dtype=dtype, rngs=rngs, stack=stack)
        self.up_proj = Linear(e, hidden, bias=True, dtype=dtype, rngs=rngs, stack=stack)
        self.down_proj = Linear(hidden, e, bias=True, dtype=dtype, rngs=rngs, stack=stack)


class VisionBlocks(nnx.Module):
    """``depth`` ViT blocks with parameters stacked on a leading axis."""

    def __init__(self, cfg: VisionConfig, *, dtype, rngs):
        stack = (cfg.depth,)
        e = cfg.hidden_size
        self.norm1 = RMSNorm(e, eps=1e-6, dtype=dtype, stack=stack)
        self.attn = VisionAttention(e, dtype=dtype, rngs=rngs, stack=stack)
        self.norm2 = RMSNorm(e, eps=1e-6, dtype=dtype, stack=stack)
        self.mlp = VisionMLP(e, cfg.intermediate_size, dtype=dtype, rngs=rngs, stack=stack)


class _Gelu(nnx.Module):
    """Parameter-free slot 1 of the merger's ``nn.Sequential`` (keeps HF indices 0 and 2)."""

    def __call__(self, x):
        return jax.nn.gelu(x, approximate=False)


class PatchMerger(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, rngs):
        e = cfg.hidden_size
        wide = e * cfg.spatial_merge_size ** 2
        self.ln_q = RMSNorm(e, eps=1e-6, dtype=dtype)
        self.mlp = nnx.List([Linear(wide, wide, bias=True, dtype=dtype, rngs=rngs), _Gelu(),
                             Linear(wide, cfg.out_hidden_size, bias=True, dtype=dtype, rngs=rngs)])

    def __call__(self, x, unit: int):
        x = self.ln_q(x)
        x = x.reshape(x.shape[0] // unit, unit * x.shape[-1])
        for layer in self.mlp:
            x = layer(x)
        return x


class VisionEncoder(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        e, nh = cfg.hidden_size, cfg.num_heads
        if e % nh or (e // nh) % 4:
            raise CheckpointError(f"config.json: vision hidden_size ({e}) / num_heads ({nh}) must be a "
                                  "multiple of 4 (2-D rotary embedding)")
        bad = [i for i in cfg.fullatt_block_indexes if not 0 <= i < cfg.depth]
        if bad:
            raise CheckpointError(f"config.json: vision fullatt_block_indexes {bad} outside depth {cfg.depth}")
        self.patch_embed = PatchEmbed(cfg, dtype=dtype, rngs=rngs)
        self.blocks = VisionBlocks(cfg, dtype=dtype, rngs=rngs)
        self.merger = PatchMerger(cfg, dtype=dtype, rngs=rngs)


# --------------------------------------------------------------------------------------
# host-side layout from grid_thw


def patch_bucket(n: int, multiple: int) -> int:
    """Default bucket for a patch count: 2^k or 1.5 * 2^k (rounded up to ``multiple``), at least 64."""
    return half_octave_bucket(n, 64, multiple)


class VisionBatch(NamedTuple):
    """Host-side, bucketed layout of a set of images / videos (see the module docstring)."""

    order: np.ndarray  # [Tb] int32: patch (processor order) at each window-order slot; padding: itself
    positions: np.ndarray  # [Tb, 2] int32 (row, column) of each window-order slot
    window_ids: np.ndarray  # [Tb] int32 window of each slot (-1: padding)
    frame_ids: np.ndarray  # [Tb] int32 image / frame of each slot (-1: padding)
    restore: np.ndarray  # [Ub] int32: window-order merged token of each output token
    num_patches: int
    num_tokens: int
    tokens_per_item: tuple[int, ...]


def prepare_vision(cfg: VisionConfig, grid_thw, *, num_patches: int | None = None) -> VisionBatch:
    """Window order, 2-D positions and segment ids for items of ``grid_thw [N, 3]``.

    ``num_patches`` pads the patch axis to that size (default: :func:`patch_bucket`).
    """
    grid = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    m = cfg.spatial_merge_size
    unit = m * m
    ws = cfg.window_size // m // cfg.patch_size  # window side in merge units
    if ws < 1:
        raise CheckpointError(f"config.json: vision window_size {cfg.window_size} is smaller than one merge unit")
    if grid.shape[0] == 0 or (grid < 1).any() or (grid[:, 1:] % m).any():
        raise InputError(f"grid_thw {grid.tolist()}: every t, h, w must be positive, h and w multiples of {m}")

    orders, positions, wins, frames, tokens = [], [], [], [], []
    unit_off = win_off = frame_off = 0
    for t, h, w in grid.tolist():
        lh, lw = h // m, w // m
        tt, bh, bw = (a.ravel() for a in np.meshgrid(np.arange(t), np.arange(lh), np.arange(lw), indexing="ij"))
        nwh, nww = -(-lh // ws), -(-lw // ws)
        wh, ww = bh // ws, bw // ws
        win_of_unit = (tt * nwh + wh) * nww + ww  # units are numbered (t, bh, bw)
        order = np.lexsort((bw, bh, win_of_unit))  # window order: by window, then row-major inside it
        orders.append(order + unit_off)
        wins.append(win_of_unit[order] + win_off)
        frames.append(tt[order] + frame_off)
        # (row, col) of every patch of the ordered units: unit (bh, bw), inner (ih, iw)
        ih, iw = np.divmod(np.arange(unit), m)
        rows = bh[order][:, None] * m + ih[None, :]
        cols = bw[order][:, None] * m + iw[None, :]
        positions.append(np.stack([rows.ravel(), cols.ravel()], axis=-1))
        tokens.append(t * lh * lw)
        unit_off += t * lh * lw
        win_off += t * nwh * nww
        frame_off += t

    n_units = unit_off
    total = n_units * unit
    tb = patch_bucket(total, unit) if num_patches is None else int(num_patches)
    if tb < total or tb % unit:
        raise InputError(f"images need {total} patches; num_patches={tb} is smaller or not a multiple of {unit}")
    ub = tb // unit
    unit_order = np.concatenate(orders)
    order = np.arange(tb, dtype=np.int32)
    order[:total] = (unit_order[:, None] * unit + np.arange(unit)[None, :]).ravel()
    pos = np.zeros((tb, 2), np.int32)
    pos[:total] = np.concatenate(positions)
    win_ids = np.full((tb,), -1, np.int32)
    win_ids[:total] = np.repeat(np.concatenate(wins), unit)
    frame_ids = np.full((tb,), -1, np.int32)
    frame_ids[:total] = np.repeat(np.concatenate(frames), unit)
    restore = np.arange(ub, dtype=np.int32)
    restore[:n_units] = np.argsort(unit_order)
    return VisionBatch(order, pos, win_ids, frame_ids, restore, total, n_units, tuple(tokens))


def rotary_cos_sin(cfg: VisionConfig, positions):
    """cos, sin ``[1, T, head_dim]`` (float32): rows take the first quarter of the angles'
    frequencies, columns the second, and the half is repeated (``rotate_half`` layout)."""
    hd = cfg.hidden_size // cfg.num_heads
    inv = jnp.asarray(inv_freq(hd // 2, cfg.rope_theta))  # [hd / 4]
    pos = positions.astype(jnp.float32)
    f = jnp.concatenate([pos[:, 0:1] * inv, pos[:, 1:2] * inv], axis=-1)  # [T, hd / 2]
    emb = jnp.concatenate([f, f], axis=-1)[None]
    return jnp.cos(emb), jnp.sin(emb)


# --------------------------------------------------------------------------------------
# forward


def vision_forward(model: VisionEncoder, cfg: VisionConfig, pixel_values, order, positions, window_ids,
                   frame_ids, restore, *, impl="xla", remat=False):
    """The encoder on a bucketed batch: ``pixel_values [Tb, C*tp*p*p]`` (processor order, zero
    padded) -> merged tokens ``[Tb / m^2, out_hidden_size]`` in processor order (rows past the
    real token count are padding). Pure; jit it with the model split into graphdef and state.
    """
    act = _activation(cfg.hidden_act)
    tb = pixel_values.shape[0]
    e, nh = cfg.hidden_size, cfg.num_heads
    hd = e // nh
    unit = cfg.spatial_merge_size ** 2

    x = model.patch_embed(jnp.take(pixel_values, order, axis=0))[None]  # [1, Tb, E], window order
    cos, sin = rotary_cos_sin(cfg, positions)
    full = np.zeros((cfg.depth,), bool)
    full[list(cfg.fullatt_block_indexes)] = True
    win_seg, frame_seg = window_ids[None], frame_ids[None]
    x = constrain(x, ("batch", "seq", "act_embed"))

    # A window is a contiguous run of at most `win` patches, so every key a window query sees lies in
    # its own block of `win` slots or the ones either side: the band bounds the work (O(T * 3 win),
    # not O(T^2), on the XLA path) without changing the mask.
    ws = cfg.window_size // cfg.spatial_merge_size // cfg.patch_size
    win_mask = MaskSpec(q_segment_ids=win_seg, kv_segment_ids=win_seg, block_band=(ws * ws * unit, 1, 1))
    full_mask = MaskSpec(q_segment_ids=frame_seg, kv_segment_ids=frame_seg)

    def body(blk: VisionBlocks, h, is_full):
        y = blk.norm1(h)
        att = blk.attn
        q = apply_rope(att.q(y).reshape(1, tb, nh, hd), cos, sin)
        k = apply_rope(att.k(y).reshape(1, tb, nh, hd), cos, sin)
        v = att.v(y).reshape(1, tb, nh, hd)
        o = jax.lax.cond(is_full, lambda: attention(q, k, v, full_mask, impl=impl),
                         lambda: attention(q, k, v, win_mask, impl=impl))
        h = h + att.proj(o.reshape(1, tb, e))
        y = blk.norm2(h)
        h = h + blk.mlp.down_proj(act(blk.mlp.gate_proj(y)) * blk.mlp.up_proj(y))
        return constrain(h, ("batch", "seq", "act_embed")), None

    x, _ = scan_layers(model.blocks, body, x, jnp.asarray(full), remat=remat)
    merged = model.merger(x[0], unit)  # [Tb / unit, out], window order
    return jnp.take(merged, restore, axis=0)


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "impl"))
def _vision_jit(graphdef, state, cfg, pixel_values, order, positions, window_ids, frame_ids, restore, impl):
    model = nnx.merge(graphdef, state)
    return vision_forward(model, cfg, pixel_values, order, positions, window_ids, frame_ids, restore, impl=impl)


@functools.lru_cache(maxsize=8)
def _vision_mesh_jit(mesh):
    """The encoder jitted with declared shardings on ``mesh`` (parameters keep theirs, the rest replicated)."""
    from .sharding import MeshJit

    def fn(graphdef, state, cfg, pixel_values, order, positions, window_ids, frame_ids, restore, impl):
        return vision_forward(nnx.merge(graphdef, state), cfg, pixel_values, order, positions, window_ids,
                              frame_ids, restore, impl=impl)

    return MeshJit(fn, mesh, [None, "own", None, None, None, None, None, None, None, None],
                   static_argnums=(0, 2, 9))


def encode_vision(model: VisionEncoder, cfg: VisionConfig, pixel_values, grid_thw, impl="xla", *,
                  num_patches: int | None = None, mesh=None):
    """Vision embeddings ``[sum(t*h*w) / m^2, out_hidden_size]`` for the processor's
    ``pixel_values [sum(t*h*w), C*tp*p*p]`` and ``grid_thw [N, 3]`` (images or videos).
    One compile per patch-count bucket.
    """
    batch = prepare_vision(cfg, grid_thw, num_patches=num_patches)
    pv = np.asarray(pixel_values)
    width = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
    if pv.shape != (batch.num_patches, width):
        raise InputError(f"pixel_values: grid_thw implies shape [{batch.num_patches}, {width}], got {list(pv.shape)}")
    graphdef, state = nnx.split(model)
    dtype = model.patch_embed.proj.weight[...].dtype
    padded = np.zeros((len(batch.order), width), dtype=dtype)
    padded[: batch.num_patches] = pv
    fn = _vision_jit if mesh is None else _vision_mesh_jit(mesh)
    out = fn(graphdef, state, cfg, jnp.asarray(padded), jnp.asarray(batch.order),
                      jnp.asarray(batch.positions), jnp.asarray(batch.window_ids), jnp.asarray(batch.frame_ids),
                      jnp.asarray(batch.restore), impl)
    return out[: batch.num_tokens]
