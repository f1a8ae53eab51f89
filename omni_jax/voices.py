"""Speaker voices from ``spk_dict.pt``, read without torch.

``spk_dict.pt`` is a ``torch.save`` zip archive of
``{"Chelsie": {"bos_token": int, "cond": tensor, "ref_mel": tensor}, "Ethan": {...}}``.
transformers uses, per voice: ``bos_token`` as the talker's text-bos id, ``cond`` (the
speaker vector, ``[enc_emb_dim]`` or ``[1, enc_emb_dim]``) as the DiT's speaker embedding and
``ref_mel`` (``[T_ref, mel_dim]`` or ``[1, T_ref, mel_dim]``) as the DiT's reference mel, both
cast to float32.

The file is read with the restricted, torch-free reader of
:mod:`omni_jax.checkpoint.torch_pickle` (plain tensors and dicts only; any other pickled global is
refused with a :class:`CheckpointError`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .checkpoint.torch_pickle import load_torch_pickle
from .errors import CheckpointError

__all__ = ["Voice", "load_voices", "load_torch_pickle"]


@dataclass(frozen=True)
class Voice:
    """One speaker: the talker's text-bos id, the DiT speaker vector and reference mel (float32)."""

    name: str
    bos_token: int
    cond: np.ndarray  # [enc_emb_dim]
    ref_mel: np.ndarray  # [T_ref, mel_dim]


def load_voices(path: str) -> dict[str, Voice]:
    """Read ``spk_dict.pt`` into ``{name: Voice}``; a malformed file is a ``CheckpointError``."""
    name = os.path.basename(path)
    obj = load_torch_pickle(path)
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{name}: expected a non-empty dict of voices")
    out = {}
    for spk, v in obj.items():
        if not isinstance(spk, str) or not isinstance(v, dict):
            raise CheckpointError(f"{name}: voice entry {spk!r} is not a dict")
        for field in ("bos_token", "cond", "ref_mel"):
            if field not in v:
                raise CheckpointError(f"{name}: voice '{spk}' has no '{field}'")
        bos = v["bos_token"]
        if isinstance(bos, np.ndarray):
            if bos.size != 1:
                raise CheckpointError(f"{name}: voice '{spk}' bos_token is not a single id")
            bos = bos.reshape(())[()]
        try:
            bos = int(bos)
        except (TypeError, ValueError):
            raise CheckpointError(f"{name}: voice '{spk}' bos_token is not an integer") from None
        cond, mel = v["cond"], v["ref_mel"]
        if not isinstance(cond, np.ndarray) or not isinstance(mel, np.ndarray):
            raise CheckpointError(f"{name}: voice '{spk}' cond/ref_mel are not tensors")
        cond = np.asarray(cond, np.float32)
        mel = np.asarray(mel, np.float32)
        if cond.ndim == 2 and cond.shape[0] == 1:
            cond = cond[0]
        if mel.ndim == 3 and mel.shape[0] == 1:
            mel = mel[0]
        if cond.ndim != 1 or mel.ndim != 2:
            raise CheckpointError(f"{name}: voice '{spk}' has cond {list(v['cond'].shape)} and ref_mel "
                                  f"{list(v['ref_mel'].shape)}; expected [D] and [T, mel_dim]")
        out[spk] = Voice(spk, bos, cond, mel)
    return out
