"""LoRA adapters on the decoder's attention and MLP kernels, applied as ``W + (alpha / r) A B``.

Adapters are a dict ``{component: {param path: {"a": [..., in, r], "b": [..., r, out]}}}`` over the
stacked ``[L, in, out]`` kernels of the thinker (and the talker when it trains). ``b`` starts at
zero, so a fresh adapter leaves the model unchanged; ``a`` is uniform in +-1/sqrt(in) (as PEFT
initialises it). :func:`apply_lora` adds the low-rank products to the kernels; merging for export
is the same function applied once.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from omni_jax.checkpoint.tree import flatten_dict

TARGETS = re.compile(r"^layers/(self_attn/(q_proj|k_proj|v_proj|o_proj)|mlp/(gate_proj|up_proj|down_proj))/kernel$")


def _path(p: tuple) -> str:
    return "/".join(str(x) for x in p)


def init_lora(params: dict, components, rank: int, seed: int = 0) -> dict:
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    rs = np.random.RandomState(seed)
    out = {}
    for comp in components:
        ad = {}
        for path, w in flatten_dict(params[comp]):
            key = _path(path)
            if not TARGETS.match(key):
                continue
            *lead, din, dout = w.shape
            bound = 1.0 / np.sqrt(din)
            ad[key] = {"a": jnp.asarray(rs.uniform(-bound, bound, (*lead, din, rank)).astype(np.float32)),
                       "b": jnp.zeros((*lead, rank, dout), jnp.float32)}
        out[comp] = ad
    return out


def _set(tree: dict, path: tuple, value) -> dict:
    """A copy of nested dict ``tree`` with ``path`` replaced (untouched branches shared)."""
    out = dict(tree)
    if len(path) == 1:
        out[path[0]] = value
    else:
        out[path[0]] = _set(tree[path[0]], path[1:], value)
    return out


def apply_lora(params: dict, lora: dict, scale: float) -> dict:
    """``params`` with ``scale * a @ b`` added to every adapted kernel (functional; jit-friendly)."""
    out = dict(params)
    for comp, ad in lora.items():
        tree = out[comp]
        for key, ab in ad.items():
            path = tuple(key.split("/"))
            w = tree
            for k in path:
                w = w[k]
            delta = jnp.einsum("...ir,...ro->...io", ab["a"].astype(jnp.float32), ab["b"].astype(jnp.float32))
            tree = _set(tree, path, (w.astype(jnp.float32) + scale * delta).astype(w.dtype))
        out[comp] = tree
    return out


def lora_axes(key: str, ndim: int):
    """Logical axes of an adapter's ``a`` and ``b`` from its kernel's (the rank axis replicated)."""
    from omni_jax.sharding import param_axes

    axes = param_axes(key, ndim)
    return (*axes[:-1], None), (*axes[:-2], None, axes[-1])


merge_lora = jax.jit(apply_lora, static_argnums=(2,))
