"""Token2Wav's Hugging Face key map and :func:`load_token2wav`.

Parameter tree (NNX; a path joined with ``.`` is the Hugging Face key under ``token2wav.``,
with ``kernel`` = ``weight`` transposed and ``embedding`` = ``weight``)::

    code2wav_dit_model/
        time_embed/time_mlp/{0,2}/{kernel,bias}
        text_embed/codec_embed/embedding            [num_embeds + 1, emb_dim]
        input_embed/proj/{kernel,bias}
        input_embed/spk_encoder/...                 ECAPA-TDNN, convs in torch layout [out, in, k]
        transformer_blocks/...                      stacked over a leading layer axis [L, ...]
                                                    (a loaded model: a list of per-layer modules,
                                                    see :func:`omni_jax.token2wav.dit.dit_per_layer`)
        norm_out/linear/{kernel,bias}, proj_out/{kernel,bias}
    code2wav_bigvgan_model/
        conv_pre/{weight,bias}, ups/i/0/{weight,bias} (torch ConvTranspose1d layout [in, out, k]),
        resblocks/j/{convs1,convs2}/n/{weight,bias}, resblocks/j/activations/n/act/{alpha,beta},
        activation_post/act/{alpha,beta}, conv_post/weight

Convolution weights stay in torch's layout, so loading is a plain copy. The anti-aliasing filters
and the DiT's RoPE frequencies are not parameters: they are rebuilt from the config, and a
checkpoint that holds them as buffers has them checked against the rebuilt values.
"""

from __future__ import annotations

import re

import jax
import numpy as np
from flax import nnx

from ..checkpoint.tree import flatten_dict, set_path
from ..config import Token2WavConfig
from ..errors import CheckpointError
from ..rope import inv_freq
from .bigvgan import kaiser_sinc_filter
from .dit import dit_per_layer
from .model import Token2Wav


HF_PREFIX = "token2wav."


_STACKED = ("code2wav_dit_model", "transformer_blocks")


def hf_key(path: tuple, layer: int | None = None) -> tuple[str, bool]:
    """HF key of a parameter path (one layer of a stacked path) and whether it is transposed."""
    parts = [str(p) for p in path]
    leaf = parts[-1]
    body = parts[:-1]
    if layer is not None:
        body = body[:2] + [str(layer)] + body[2:]
    name = {"kernel": "weight", "embedding": "weight"}.get(leaf, leaf)
    return HF_PREFIX + ".".join(body + [name]), leaf == "kernel"


def _where(ckpt) -> str:
    return str(getattr(ckpt, "directory", "checkpoint"))


def _read(ckpt, key: str, transpose: bool, shape: tuple) -> np.ndarray:
    if key not in ckpt.keys():
        raise CheckpointError(f"{_where(ckpt)}: missing tensor '{key}'")
    src_shape = tuple(ckpt.shape(key)) if hasattr(ckpt, "shape") else tuple(np.shape(ckpt.get(key)))
    want = tuple(reversed(shape)) if transpose else tuple(shape)
    if src_shape != want:
        raise CheckpointError(f"{_where(ckpt)}: tensor '{key}' has shape {list(src_shape)}, "
                              f"the config implies {list(want)}")
    a = np.asarray(ckpt.get(key))
    if transpose:
        a = a.T
    return np.ascontiguousarray(a.astype(np.float32, copy=False))


def load_token2wav(ckpt, cfg: Token2WavConfig, consumed: set | None = None, *, mesh=None,
                   sharding_prefix: str = "token2wav/") -> Token2Wav:
    """Build :class:`Token2Wav` (float32) from the ``token2wav.*`` tensors of ``ckpt``.

    ``ckpt``: a :class:`convert.safetensors_io.Checkpoint` (anything with ``keys()``, ``get(key)``
    and optionally ``shape(key)``). Every key read is added to ``consumed``. Raises
    :class:`CheckpointError` naming a missing or wrong-shaped tensor. With ``mesh`` each parameter is
    placed as the sharding rules say for ``sharding_prefix`` + its path (the DiT's blocks shard over the
    tensor axis), as a converted checkpoint's restore places it.
    """
    consumed = consumed if consumed is not None else set()
    abstract = nnx.eval_shape(lambda: Token2Wav(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    pure = nnx.to_pure_dict(state)
    for path, sds in list(flatten_dict(pure)):
        shape = tuple(sds.shape)
        if tuple(str(p) for p in path[:2]) == _STACKED:
            host = np.empty(shape, np.float32)
            for i in range(shape[0]):
                key, tr = hf_key(path, layer=i)
                host[i] = _read(ckpt, key, tr, shape[1:])
                consumed.add(key)
        else:
            key, tr = hf_key(path)
            host = _read(ckpt, key, tr, shape)
            consumed.add(key)
        set_path(pure, path, jax.device_put(host))
    _check_buffers(ckpt, cfg, consumed)
    nnx.replace_by_pure_dict(state, pure)
    model = nnx.merge(graphdef, state)
    dit_per_layer(model.code2wav_dit_model, free=True)
    if mesh is not None:
        from ..sharding import param_sharding, put

        gdef, st = nnx.split(model)

        def place(path, x):
            name = sharding_prefix + "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
            return put(np.asarray(x), param_sharding(name, x.shape, mesh))

        model = nnx.merge(gdef, jax.tree_util.tree_map_with_path(place, st))
    return model


# Buffers that are not parameters here (rebuilt from the config) but that checkpoints written
# by other versions may contain: checked against what we rebuild, then counted as consumed.
_BUFFER_RE = re.compile(r"^token2wav\.(code2wav_dit_model\.rotary_embed\.(original_)?inv_freq|"
                        r"code2wav_bigvgan_model\..*\.(upsample|downsample)(\.lowpass)?\.filter)$")


def is_token2wav_buffer(key: str) -> bool:
    """Whether ``key`` is a token2wav buffer (RoPE inverse frequencies, anti-aliasing filter)."""
    return _BUFFER_RE.match(key) is not None


def _check_buffers(ckpt, cfg: Token2WavConfig, consumed: set) -> None:
    for key in ckpt.keys():
        if not is_token2wav_buffer(key):
            continue
        if key.endswith("inv_freq"):
            want = inv_freq(cfg.dit.head_dim, cfg.dit.rope_theta)
        else:
            want = kaiser_sinc_filter(0.25, 0.3, 12)
        got = np.asarray(ckpt.get(key), np.float32).reshape(-1)
        # loose: a bf16 checkpoint rounds these; a config mismatch is far larger
        if got.shape != want.shape or not np.allclose(got, want, rtol=1e-2, atol=1e-3):
            raise CheckpointError(f"{_where(ckpt)}: buffer '{key}' does not match the config "
                                  f"(shape {list(got.shape)}, expected {list(want.shape)} with the rebuilt values)")
        consumed.add(key)
