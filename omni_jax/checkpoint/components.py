"""The parts of a Qwen2.5-Omni checkpoint and how each is built: one table for loading, conversion
and export.

Each entry names the component's Hugging Face key prefix, its key map (owned by the model module
beside its definition: ``thinker.THINKER_LM_PREFIXES``, ``audio.AUDIO_PREFIXES``,
``vision.VISION_PREFIXES``, ``talker.TALKER_PREFIXES``, ``token2wav.HF_PREFIX``), the path element
whose parameters carry a layer axis, the prefix its parameter paths take in the sharding rules, and
how to build the (abstract) module from the :class:`~omni_jax.config.OmniConfig`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax.numpy as jnp
from flax import nnx

from .. import audio as _audio
from .. import talker as _talker
from .. import thinker as _thinker
from .. import token2wav as _token2wav
from .. import vision as _vision
from .orbax_io import COMPONENT_ORDER

__all__ = ["Component", "COMPONENTS", "COMPONENT_ORDER", "owner", "build_abstract"]


@dataclasses.dataclass(frozen=True)
class Component:
    name: str
    hf_prefix: str  # every HF key of the component starts with this
    prefixes: dict  # first path element (or "") -> HF key prefix, for omni_jax.checkpoint.tree.hf_name
    stack_names: tuple  # path element whose parameters carry a leading layer axis
    sharding_prefix: str  # prepended to the parameter path for omni_jax.sharding.param_sharding
    fixed_dtype: str | None  # the dtype it always runs and loads in (token2wav: float32), else None
    config: Callable  # OmniConfig -> the component's own config (None when the checkpoint has none)
    build: Callable  # (component config, jnp dtype) -> nnx.Module (called under nnx.eval_shape)
    as_module: bool  # a loaded model holds it as an nnx.Module (else as (graphdef, state))
    read_hf: Callable | None = None  # (ckpt, component config, consumed, mesh) -> module: its own HF reader

    def available(self, cfg) -> bool:
        """Whether ``cfg`` (an OmniConfig) describes this component."""
        return self.config(cfg) is not None

    def dtype(self, dtype):
        """The jnp dtype the component is built and loaded in for a load dtype ``dtype``."""
        return jnp.dtype(self.fixed_dtype or dtype)


def _read_token2wav(ckpt, cfg, consumed, mesh=None):
    return _token2wav.load_token2wav(ckpt, cfg, consumed, mesh=mesh)


COMPONENTS: dict[str, Component] = {
    "thinker": Component(
        "thinker", "thinker.", _thinker.THINKER_LM_PREFIXES, _thinker.THINKER_LM_STACK_NAMES, "", None,
        lambda c: c.thinker, lambda c, dt: _thinker.ThinkerLM(c, dtype=dt, rngs=nnx.Rngs(0)), False),
    "audio": Component(
        "audio", _audio.HF_PREFIX, _audio.AUDIO_PREFIXES, _audio.AUDIO_STACK_NAMES, "audio/", None,
        lambda c: c.thinker.audio, lambda c, dt: _audio.AudioEncoder(c, dtype=dt, rngs=nnx.Rngs(0)), True),
    "vision": Component(
        "vision", _vision.HF_PREFIX, _vision.VISION_PREFIXES, _vision.VISION_STACK_NAMES, "vision/", None,
        lambda c: c.thinker.vision, lambda c, dt: _vision.VisionEncoder(c, dtype=dt, rngs=nnx.Rngs(0)), True),
    "talker": Component(
        "talker", "talker.", _talker.TALKER_PREFIXES, ("layers",), "talker/", None,
        lambda c: c.talker, lambda c, dt: _talker.Talker(c, dtype=dt, rngs=nnx.Rngs(0)), False),
    "token2wav": Component(
        "token2wav", _token2wav.HF_PREFIX, {"": _token2wav.HF_PREFIX}, ("transformer_blocks",), "token2wav/",
        "float32", lambda c: c.token2wav, lambda c, dt: _token2wav.Token2Wav(c, rngs=nnx.Rngs(0)), True,
        read_hf=_read_token2wav),
}


def owner(key: str) -> str | None:
    """The component an HF key belongs to (longest matching prefix), or None."""
    for name in ("audio", "vision", "thinker", "talker", "token2wav"):
        if key.startswith(COMPONENTS[name].hf_prefix):
            return name
    return None


def build_abstract(cfg, name: str, dtype):
    """``(graphdef, abstract nnx.State)`` of component ``name`` of the OmniConfig ``cfg`` in the load
    dtype ``dtype`` (token2wav: float32 whatever it is); no parameter memory is allocated."""
    comp = COMPONENTS[name]
    sub, dt = comp.config(cfg), comp.dtype(dtype)
    return nnx.split(nnx.eval_shape(lambda: comp.build(sub, dt)))
