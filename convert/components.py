"""The component registry as conversion uses it: which component an HF key belongs to, which
components a run selects, and why an unmapped source tensor may be kept as passthrough data.

The table itself (key prefixes, key maps, stacked axes, how each module is built) is the library's
:data:`omni_jax.checkpoint.components.COMPONENTS`, shared with loading.
"""

from __future__ import annotations

from omni_jax.checkpoint.components import COMPONENT_ORDER, COMPONENTS, Component, build_abstract, owner
from omni_jax.errors import InputError
from omni_jax.token2wav import is_token2wav_buffer

__all__ = ["COMPONENTS", "COMPONENT_ORDER", "Component", "build_abstract", "owner", "parse_components",
           "passthrough_reason"]


def parse_components(components, present: list[str], hf_dir: str) -> list[str]:
    if components is None:
        return present
    if isinstance(components, str):
        components = [c for c in components.split(",") if c.strip()]
    wanted: list[str] = []
    for c in components:
        c = c.strip().lower()
        if c not in COMPONENTS:
            raise InputError(f"unknown component '{c}' (choose from {', '.join(COMPONENTS)})")
        # "thinker" is the whole HF thinker: the language model and its audio and vision encoders
        for n in ([c] + (["audio", "vision"] if c == "thinker" else [])):
            if n not in wanted and (n in present or n == c):
                wanted.append(n)
    for c in wanted:
        if c not in present:
            raise InputError(f"component '{c}' is not in {hf_dir} (it has {', '.join(present)})")
    if not wanted:
        raise InputError("no components selected")
    return [c for c in COMPONENT_ORDER if c in wanted]


def passthrough_reason(key: str, cfg) -> str | None:
    """Why an unmapped source tensor may be kept as data, or None if it is unexpected."""
    if key == "thinker.lm_head.weight" and cfg.thinker.tie_word_embeddings:
        return "lm_head tied to embed_tokens (tie_word_embeddings); transformers ignores it"
    if key.endswith(".inv_freq") or key.endswith(".original_inv_freq"):
        return "rotary buffer rebuilt from the config"
    if is_token2wav_buffer(key):
        return "token2wav buffer rebuilt from the config"
    return None
