"""The checkpoint's ``generation_config.json``: the generation defaults a checkpoint may set."""

from __future__ import annotations

import json
import os

from .errors import CheckpointError

__all__ = ["GENERATION_DEFAULTS", "DEFAULT_MAX_NEW_TOKENS", "read_generation_config"]

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


def read_generation_config(path: str, processor=None) -> dict:
    """The checkpoint's ``generation_config.json`` as the fields generation reads: ``eos_token_id``
    (a list; ``processor``'s (a TextProcessor) ``<|im_end|>``/``<|endoftext|>`` when the file has none),
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
