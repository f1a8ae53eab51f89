"""The one loader: a checkpoint directory (Hugging Face or converted) -> every component of a model.

:func:`read_checkpoint` decides what ``path`` is (a directory written by ``omni-jax convert`` has
the manifest of :mod:`omni_jax.checkpoint.orbax_io`; anything else is read as a Hugging Face
directory) and builds each component of :data:`omni_jax.checkpoint.components.COMPONENTS` the same
way: its abstract module (``nnx.eval_shape``, no parameter memory), then its parameters filled one
tensor (HF: :func:`omni_jax.checkpoint.hf.load_component` from memory-mapped shards, or the
component's own reader) or one group (converted: :func:`omni_jax.checkpoint.orbax_io.restore_component`)
at a time, placed on device in their sharded layout when a mesh is given. Voices (``spk_dict.pt``),
the tokenizer and ``generation_config.json`` are read the same way for both.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from ..config import OmniConfig, load_config
from ..decoder import to_per_layer
from ..errors import CheckpointError
from ..generation_config import read_generation_config
from ..processor import TextProcessor
from ..voices import load_voices
from . import orbax_io
from .components import COMPONENT_ORDER, COMPONENTS, build_abstract
from .hf import check_unexpected, load_component
from .safetensors_io import Checkpoint

__all__ = ["LoadedCheckpoint", "read_checkpoint", "load_components", "load_hf", "load_hf_component",
           "load_converted", "load_converted_component", "PENDING_PREFIXES"]

# HF key prefixes of components that are recognised but not loaded by this version
PENDING_PREFIXES = ()


@dataclasses.dataclass
class LoadedCheckpoint:
    """Everything :class:`omni_jax.OmniModel` is built from (the thinker and talker decoder layers as
    per-layer buffers, :func:`omni_jax.decoder.to_per_layer`)."""

    path: str
    config: OmniConfig
    graphdef: Any  # the thinker LM's
    params: Any  # its nnx.State
    processor: TextProcessor
    generation_config: dict
    audio: Any = None  # AudioEncoder or None
    vision: Any = None  # VisionEncoder or None
    talker: Any = None  # (graphdef, state) or None
    token2wav: Any = None  # Token2Wav (float32) or None
    voices: dict | None = None  # name -> omni_jax.voices.Voice, or None without spk_dict.pt


def read_checkpoint(path, *, dtype, mesh=None) -> LoadedCheckpoint:
    """Read the checkpoint directory ``path`` (Hugging Face or converted) in the load dtype ``dtype``
    (a jnp dtype; token2wav is float32 whatever it is), placed on ``mesh`` (an Auto-axes mesh, or None
    for one device)."""
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory (expected a Qwen2.5-Omni checkpoint directory)")
    cfg = load_config(path)
    parts = load_components(path, cfg, dtype=dtype, mesh=mesh)
    voices = None
    if os.path.exists(os.path.join(path, "spk_dict.pt")):
        voices = load_voices(os.path.join(path, "spk_dict.pt"))
    processor = TextProcessor.from_dir(path)
    # decoder layers as per-layer buffers (see omni_jax.decoder); the stacked arrays are ours: free them
    # as they are sliced, so loading never holds two copies of the layers
    graphdef, state = to_per_layer(*parts["thinker"], free=True)
    talker = parts["talker"]
    if talker is not None:
        talker = to_per_layer(*talker, free=True)
    return LoadedCheckpoint(path, cfg, graphdef, state, processor, read_generation_config(path, processor),
                            audio=parts["audio"], vision=parts["vision"], talker=talker,
                            token2wav=parts["token2wav"], voices=voices)


def load_components(path, cfg: OmniConfig, *, dtype, mesh=None) -> dict:
    """Every component of the checkpoint directory ``path``, as a loaded model holds them::

        {"thinker": (graphdef, state), "audio": AudioEncoder | None, "vision": VisionEncoder | None,
         "talker": (graphdef, state) | None, "token2wav": Token2Wav | None}
    """
    if orbax_io.is_converted(path):  # a directory written by `omni-jax convert`
        return load_converted(path, cfg, dtype=dtype, mesh=mesh)
    return load_hf(path, cfg, dtype=dtype, mesh=mesh)


def _hold(comp, graphdef, state):
    if comp.as_module:
        from flax import nnx

        return nnx.merge(graphdef, state)
    return graphdef, state


# --------------------------------------------------------------------------------------
# Hugging Face directories


def load_hf_component(ckpt: Checkpoint, name: str, cfg, *, dtype, consumed: set | None = None, mesh=None):
    """Component ``name`` from the HF keys of ``ckpt``, as a loaded model holds it (a module for audio,
    vision and token2wav, ``(graphdef, state)`` for thinker and talker).

    ``cfg`` is the component's own config (``OmniConfig.thinker``, ``.thinker.audio``,
    ``.thinker.vision``, ``.talker``, ``.token2wav``); every key read is added to ``consumed``.
    Raises :class:`CheckpointError` naming a missing or wrong-shaped tensor."""
    comp = COMPONENTS[name]
    consumed = consumed if consumed is not None else set()
    if comp.read_hf is not None:
        return comp.read_hf(ckpt, cfg, consumed, mesh)
    from flax import nnx

    dt = comp.dtype(dtype)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: comp.build(cfg, dt)))
    state = load_component(ckpt, state, prefixes=comp.prefixes, dtype=dt, mesh=mesh, consumed=consumed,
                           sharding_prefix=comp.sharding_prefix, stack_names=comp.stack_names)
    if name == "thinker" and cfg.tie_word_embeddings and "thinker.lm_head.weight" in ckpt:
        consumed.add("thinker.lm_head.weight")  # tied: transformers ignores a stored head too
    return _hold(comp, graphdef, state)


def load_hf(path, cfg: OmniConfig, *, dtype, mesh=None) -> dict:
    """The components of a Hugging Face checkpoint directory (memory-mapped, one tensor at a time);
    every tensor must belong to one of them (:func:`omni_jax.checkpoint.hf.check_unexpected`)."""
    ckpt = Checkpoint(path)
    consumed: set[str] = set()
    keys = list(ckpt.keys())
    parts: dict = {}
    for name in COMPONENT_ORDER:
        comp = COMPONENTS[name]
        present = name == "thinker" or any(k.startswith(comp.hf_prefix) for k in keys)
        parts[name] = (load_hf_component(ckpt, name, comp.config(cfg), dtype=dtype, consumed=consumed, mesh=mesh)
                       if present and comp.available(cfg) else None)
    check_unexpected(ckpt, consumed, PENDING_PREFIXES)
    return parts


# --------------------------------------------------------------------------------------
# converted directories


def load_converted_component(out_dir, name: str, cfg: OmniConfig, *, dtype, mesh=None):
    """``(graphdef, state)`` of component ``name`` restored from a converted directory.

    ``dtype`` is the load dtype of thinker, audio, vision and talker; token2wav is always float32.
    ``nnx.merge(graphdef, state)`` gives the module (audio/vision/token2wav are used as modules).
    """
    comp = COMPONENTS[name]
    dt = comp.dtype(dtype)
    graphdef, state = build_abstract(cfg, name, dt)
    return graphdef, orbax_io.restore_component(out_dir, name, state, dtype=dt, mesh=mesh)


def load_converted(out_dir, cfg: OmniConfig, *, dtype, mesh=None) -> dict:
    """Every converted component of ``out_dir``, as :func:`load_components` returns them.

    ``cfg`` is ``omni_jax.load_config(out_dir)`` (config.json is copied there); ``dtype`` the load
    dtype (token2wav is float32 whatever it is); ``mesh`` as for ``omni_jax.load``.
    """
    have = orbax_io.converted_components(out_dir)
    if "thinker" not in have:
        raise CheckpointError(f"{out_dir}: the thinker was not converted (it holds {', '.join(have)}); "
                              "convert with --components thinker")
    parts: dict = {}
    for name in COMPONENT_ORDER:
        comp = COMPONENTS[name]
        parts[name] = (_hold(comp, *load_converted_component(out_dir, name, cfg, dtype=dtype, mesh=mesh))
                       if name in have and comp.available(cfg) else None)
    return parts
