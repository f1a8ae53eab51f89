"""The Thinker's audio encoder (Whisper-style, attention inside fixed-size chunks).

What it computes (transformers' ``Qwen2_5OmniAudioEncoder``): each audio's log-mel frames
``[num_mel_bins, L]`` are cut into chunks of ``2 * n_window`` frames (the last one shorter);
every chunk goes, on its own, through ``conv1`` (k=3, pad 1) + GELU, is zeroed past its
length, through ``conv2`` (k=3, stride 2, pad 1) + GELU, and gets sinusoidal positions
``0 .. n_window-1``. The transformer layers attend only inside a chunk. The chunk tokens of
one audio are then concatenated, averaged in pairs (stride-2 average pooling, an odd last
token dropped), normalised (``ln_post``) and projected to the thinker width. An audio of
``L`` frames gives ``((L - 1) // 2 + 1 - 2) // 2 + 1`` embeddings.

Static shapes. The chunks are the *batch* axis of the encoder: ``[N, 2 * n_window]``
frames each, with ``N`` padded to a bucket (:func:`chunk_bucket`). Inside a chunk the
``n_window`` token slots are fixed, and the real tokens of a chunk (``(len - 1) // 2 + 1``)
are given to attention as key validity (``MaskSpec(kv_valid=...)``). A chunk is therefore
the segment of the reference's ``cu_seqlens``, expressed as one batch row: the attention
cost is ``N * n_window^2`` instead of ``(N * n_window)^2`` for a flat sequence with segment
ids, and a kernel never meets a cross-chunk block. The pooling is a gather with indices
computed on the host (padded to a bucket derived from ``N``), so one compile serves every
request whose chunk count falls in the same bucket.

Parameter tree (NNX; paths mirror the Hugging Face keys ``thinker.audio_tower.*``)::

    conv1/weight [D, mels, 3]  conv1/bias [D]        (torch Conv1d layout, not transposed)
    conv2/weight [D, D, 3]     conv2/bias [D]
    audio_bos_eos_token/embedding [2, out]           (used by the thinker's prompt, not here)
    layers/...                 stacked [L, ...]: self_attn_layer_norm, self_attn.{q,k,v,out}_proj
                               (k_proj has no bias), final_layer_norm, fc1, fc2
    ln_post/{weight,bias}      proj/{kernel,bias}
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .attention import MaskSpec, attention
from .config import AudioConfig
from .errors import CheckpointError, InputError
from .layers import Embed, Linear, half_octave_bucket, scan_layers
from .layers import activation as _activation
from .sharding import constrain

HF_PREFIX = "thinker.audio_tower."
# Hugging Face key map (omni_jax.checkpoint.tree.hf_name): every parameter <- thinker.audio_tower.*, stacked over "layers"
AUDIO_PREFIXES = {"": HF_PREFIX}
AUDIO_STACK_NAMES = ("layers",)

def activation(name: str):
    return _activation(name, "audio activation_function")


# --------------------------------------------------------------------------------------
# modules


class LayerNorm(nnx.Module):
    """torch ``nn.LayerNorm`` (with bias); statistics in float32, result in the input dtype."""

    def __init__(self, dim: int, *, eps: float = 1e-5, dtype, stack: tuple[int, ...] = ()):
        self.weight = nnx.Param(jnp.ones((*stack, dim), dtype))
        self.bias = nnx.Param(jnp.zeros((*stack, dim), dtype))
        self.eps = eps

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        mu = jnp.mean(xf, axis=-1, keepdims=True)
        xc = xf - mu
        var = jnp.mean(xc * xc, axis=-1, keepdims=True)
        y = xc * jax.lax.rsqrt(var + self.eps)
        y = y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


class Conv1d(nnx.Module):
    """torch ``nn.Conv1d`` with its ``[out, in, k]`` weight layout; inputs are ``[B, T, C]``."""

    def __init__(self, cin: int, cout: int, k: int, *, stride: int, padding: int, dtype, rngs: nnx.Rngs):
        self.weight = nnx.Param((jax.random.normal(rngs.params(), (cout, cin, k), jnp.float32) * 0.02).astype(dtype))
        self.bias = nnx.Param(jnp.zeros((cout,), dtype))
        self.stride, self.padding = stride, padding

    def __call__(self, x):
        w = self.weight[...]
        y = jax.lax.conv_general_dilated(
            x.astype(w.dtype), w, window_strides=(self.stride,), padding=[(self.padding, self.padding)],
            dimension_numbers=("NWC", "OIW", "NWC"), preferred_element_type=jnp.float32)
        return (y + self.bias[...].astype(jnp.float32)).astype(w.dtype)


class AudioAttention(nnx.Module):
    def __init__(self, d: int, *, dtype, rngs, stack):
        self.q_proj = Linear(d, d, bias=True, dtype=dtype, rngs=rngs, stack=stack)
        self.k_proj = Linear(d, d, bias=False, dtype=dtype, rngs=rngs, stack=stack)
        self.v_proj = Linear(d, d, bias=True, dtype=dtype, rngs=rngs, stack=stack)
        self.out_proj = Linear(d, d, bias=True, dtype=dtype, rngs=rngs, stack=stack)


class AudioLayers(nnx.Module):
    """``num_layers`` pre-norm encoder layers with parameters stacked on a leading axis."""

    def __init__(self, cfg: AudioConfig, *, dtype, rngs):
        stack = (cfg.encoder_layers,)
        d, f = cfg.d_model, cfg.encoder_ffn_dim
        self.self_attn_layer_norm = LayerNorm(d, dtype=dtype, stack=stack)
        self.self_attn = AudioAttention(d, dtype=dtype, rngs=rngs, stack=stack)
        self.final_layer_norm = LayerNorm(d, dtype=dtype, stack=stack)
        self.fc1 = Linear(d, f, bias=True, dtype=dtype, rngs=rngs, stack=stack)
        self.fc2 = Linear(f, d, bias=True, dtype=dtype, rngs=rngs, stack=stack)


class AudioEncoder(nnx.Module):
    def __init__(self, cfg: AudioConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        d = cfg.d_model
        if d % cfg.encoder_attention_heads:
            raise CheckpointError(f"config.json: audio d_model ({d}) is not a multiple of "
                                  f"encoder_attention_heads ({cfg.encoder_attention_heads})")
        if cfg.n_window > cfg.max_source_positions:
            raise CheckpointError(f"config.json: audio n_window ({cfg.n_window}) exceeds "
                                  f"max_source_positions ({cfg.max_source_positions})")
        self.conv1 = Conv1d(cfg.num_mel_bins, d, 3, stride=1, padding=1, dtype=dtype, rngs=rngs)
        self.conv2 = Conv1d(d, d, 3, stride=2, padding=1, dtype=dtype, rngs=rngs)
        self.audio_bos_eos_token = Embed(2, cfg.output_dim, dtype=dtype, rngs=rngs)
        self.layers = AudioLayers(cfg, dtype=dtype, rngs=rngs)
        self.ln_post = LayerNorm(d, dtype=dtype)
        self.proj = Linear(d, cfg.output_dim, bias=True, dtype=dtype, rngs=rngs)


# --------------------------------------------------------------------------------------
# lengths and host-side layout


def feat_extract_output_lengths(lengths):
    """transformers' ``_get_feat_extract_output_lengths``: (after the conv stem, after pooling)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    after_cnn = (lengths - 1) // 2 + 1
    return after_cnn, (after_cnn - 2) // 2 + 1


def chunk_bucket(n: int) -> int:
    """Default bucket for a chunk count: 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (waste below 50%)."""
    return half_octave_bucket(n)


class AudioBatch(NamedTuple):
    """Host-side, bucketed layout of a set of audios (see the module docstring)."""

    chunks: np.ndarray  # [N, 2 * n_window, mels] frames, zero past each chunk's length
    chunk_lens: np.ndarray  # [N] int32 frames per chunk (0 for padding chunks)
    pool_a: np.ndarray  # [P] int32 flat token slot (chunk * n_window + pos) of a pair's first token
    pool_b: np.ndarray  # [P] int32 ... and of its second token
    num_tokens: int  # real output embeddings (sum over audios)
    tokens_per_audio: tuple[int, ...]


def prepare_audio(cfg: AudioConfig, input_features, feature_lens, *, num_chunks: int | None = None) -> AudioBatch:
    """Chunk concatenated features ``[mels, sum(L)]`` of audios with lengths ``feature_lens``.

    ``num_chunks`` pads the chunk axis to that size (default: :func:`chunk_bucket`).
    """
    feats = np.asarray(input_features)
    lens = np.asarray(feature_lens, dtype=np.int64).reshape(-1)
    if feats.ndim != 2 or feats.shape[0] != cfg.num_mel_bins:
        raise InputError(f"input_features: expected [num_mel_bins={cfg.num_mel_bins}, frames], got {list(feats.shape)}")
    if lens.size == 0 or (lens < 1).any():
        raise InputError(f"feature_lens: every audio needs at least one frame, got {lens.tolist()}")
    if int(lens.sum()) != feats.shape[1]:
        raise InputError(f"feature_lens sum to {int(lens.sum())} frames, input_features has {feats.shape[1]}")
    n, win = cfg.n_window, 2 * cfg.n_window
    per_audio = -(-lens // win)  # chunks per audio
    total = int(per_audio.sum())
    nb = chunk_bucket(total) if num_chunks is None else int(num_chunks)
    if nb < total:
        raise InputError(f"audio needs {total} chunks of {win} frames, more than num_chunks={nb}")

    chunks = np.zeros((nb, win, feats.shape[0]), dtype=feats.dtype)
    chunk_lens = np.zeros((nb,), np.int32)
    after_cnn, out_lens = feat_extract_output_lengths(lens)
    pool_a, pool_b = [], []
    c = 0
    start = 0
    for length, k, ac, no in zip(lens.tolist(), per_audio.tolist(), after_cnn.tolist(), out_lens.tolist()):
        for j in range(k):
            seg = feats[:, start + j * win: start + min((j + 1) * win, length)]
            chunks[c + j, : seg.shape[1]] = seg.T
            chunk_lens[c + j] = seg.shape[1]
        tok = np.arange(2 * no)  # token index within the audio (pairs 2i, 2i+1; an odd last one dropped)
        slot = (c + tok // n) * n + tok % n
        pool_a.append(slot[0::2])
        pool_b.append(slot[1::2])
        c += k
        start += length
    num_tokens = int(out_lens.sum())
    pb = (nb * n) // 2  # an upper bound of the pooled count for nb chunks
    pa_arr = np.zeros((pb,), np.int32)
    pb_arr = np.zeros((pb,), np.int32)
    if num_tokens:
        pa_arr[:num_tokens] = np.concatenate(pool_a)
        pb_arr[:num_tokens] = np.concatenate(pool_b)
    return AudioBatch(chunks, chunk_lens, pa_arr, pb_arr, num_tokens, tuple(int(x) for x in out_lens))


@functools.lru_cache(maxsize=8)
def sinusoid_positions(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """Whisper's sinusoidal table ``[length, channels]`` (sin half, then cos half), float32."""
    if channels % 2:
        raise CheckpointError("audio d_model must be even for sinusoidal positions")
    inc = np.log(max_timescale) / (channels // 2 - 1)
    inv = np.exp((-inc * np.arange(channels // 2, dtype=np.float32)).astype(np.float32)).astype(np.float32)
    t = np.arange(length, dtype=np.float32)[:, None] * inv[None, :]
    return np.concatenate([np.sin(t), np.cos(t)], axis=1).astype(np.float32)


# --------------------------------------------------------------------------------------
# forward


def audio_forward(model: AudioEncoder, cfg: AudioConfig, chunks, chunk_lens, pool_a, pool_b, *, impl="xla",
                  remat=False):
    """The encoder on a bucketed batch: ``chunks [N, 2n, mels]`` -> embeddings ``[P, output_dim]``.

    Pure (jit it with the model split into graphdef and state); rows of the result past the
    real token count are padding.
    """
    act = activation(cfg.activation_function)
    nb, win, _ = chunks.shape
    n = cfg.n_window
    d, nh = cfg.d_model, cfg.encoder_attention_heads
    hd = d // nh
    dtype = model.conv1.weight[...].dtype

    frame_ok = jnp.arange(win)[None, :] < chunk_lens[:, None]  # [N, 2n]
    x = act(model.conv1(chunks.astype(dtype)))
    x = x * frame_ok[..., None].astype(x.dtype)
    x = act(model.conv2(x))  # [N, n, D]
    # (transformers computes an embed_scale from scale_embedding but never applies it: neither do we)
    x = x + jnp.asarray(sinusoid_positions(cfg.max_source_positions, d)[:n]).astype(x.dtype)[None]
    tok_ok = jnp.arange(n)[None, :] < ((chunk_lens - 1) // 2 + 1)[:, None]  # [N, n]
    mask = MaskSpec(kv_valid=tok_ok)
    x = constrain(x, ("batch", "seq", "act_embed"))

    def body(layer: AudioLayers, h, _):
        y = layer.self_attn_layer_norm(h)
        att = layer.self_attn
        q = att.q_proj(y).reshape(nb, n, nh, hd)
        k = att.k_proj(y).reshape(nb, n, nh, hd)
        v = att.v_proj(y).reshape(nb, n, nh, hd)
        o = attention(q, k, v, mask, impl=impl)
        h = h + att.out_proj(o.reshape(nb, n, d))
        h = h + layer.fc2(act(layer.fc1(layer.final_layer_norm(h))))
        return constrain(h, ("batch", "seq", "act_embed")), None

    x, _ = scan_layers(model.layers, body, x, None, remat=remat)
    flat = x.reshape(nb * n, d)
    pooled = (jnp.take(flat, pool_a, axis=0) + jnp.take(flat, pool_b, axis=0)) / 2
    return model.proj(model.ln_post(pooled))


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "impl"))
def _audio_jit(graphdef, state, cfg, chunks, chunk_lens, pool_a, pool_b, impl):
    model = nnx.merge(graphdef, state)
    return audio_forward(model, cfg, chunks, chunk_lens, pool_a, pool_b, impl=impl)


@functools.lru_cache(maxsize=8)
def _audio_mesh_jit(mesh):
    """The encoder jitted with declared shardings on ``mesh`` (parameters keep theirs, chunks over the batch
    axes, the output replicated)."""
    from .sharding import MeshJit

    def fn(graphdef, state, cfg, chunks, chunk_lens, pool_a, pool_b, impl):
        return audio_forward(nnx.merge(graphdef, state), cfg, chunks, chunk_lens, pool_a, pool_b, impl=impl)

    return MeshJit(fn, mesh, [None, "own", None, ("batch", None, None), ("batch",), None, None, None],
                   static_argnums=(0, 2, 7))


def encode_audio(model: AudioEncoder, cfg: AudioConfig, input_features, feature_lens, impl="xla", *,
                 num_chunks: int | None = None, mesh=None):
    """Audio embeddings ``[sum(tokens), output_dim]`` for audios given as the reference takes them:
    ``input_features [num_mel_bins, sum(L)]`` (the audios' frames concatenated) and
    ``feature_lens [num_audios]``. One compile per chunk-count bucket.
    """
    batch = prepare_audio(cfg, input_features, feature_lens, num_chunks=num_chunks)
    graphdef, state = nnx.split(model)
    fn = _audio_jit if mesh is None else _audio_mesh_jit(mesh)
    out = fn(graphdef, state, cfg, jnp.asarray(batch.chunks), jnp.asarray(batch.chunk_lens),
             jnp.asarray(batch.pool_a), jnp.asarray(batch.pool_b), impl)
    return out[: batch.num_tokens]


def encode_audio_padded(model: AudioEncoder, cfg: AudioConfig, input_features, feature_attention_mask,
                        impl="xla", **kw):
    """The processor's form: ``input_features [B, mels, T]`` padded, ``feature_attention_mask [B, T]``."""
    feats = np.asarray(input_features)
    m = np.asarray(feature_attention_mask).astype(bool)
    if feats.ndim != 3 or m.shape != (feats.shape[0], feats.shape[2]):
        raise InputError(f"input_features {list(feats.shape)} and feature_attention_mask {list(m.shape)} "
                         "do not match ([B, mels, T] and [B, T])")
    flat = np.transpose(feats, (0, 2, 1))[m].T  # [mels, sum(L)], as transformers trims them
    return encode_audio(model, cfg, flat, m.sum(axis=1), impl, **kw)
