"""Pure helpers on parameter trees and Hugging Face key names (no IO, no jax arrays required).

Our parameter paths mirror transformers' module names, so the mapping is mechanical:

* ``.../kernel`` <-> ``....weight`` transposed (torch Linear is ``[out, in]``, ours ``[in, out]``)
* ``.../embedding`` <-> ``....weight``; ``.../weight`` and ``.../bias`` unchanged
* a path under ``layers/`` is stacked over the layer axis: layer ``i`` is
  ``<prefix>layers.<i>.<rest>``.
"""

from __future__ import annotations

__all__ = ["flatten_dict", "set_path", "stack_index", "hf_name"]


def flatten_dict(d, prefix=()):
    """Yield ``(path tuple, leaf)`` for a nested dict (an ``nnx.to_pure_dict`` tree)."""
    for k, v in d.items():
        if isinstance(v, dict):
            yield from flatten_dict(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def set_path(d, path, value):
    """Set ``d[path[0]][path[1]]...[path[-1]] = value`` (the intermediate dicts must exist)."""
    for k in path[:-1]:
        d = d[k]
    d[path[-1]] = value


def stack_index(path: tuple, stack_names=("layers",)) -> int | None:
    """Position of the stacked-layers element in ``path`` (its parameters carry a layer axis), or None."""
    for j, p in enumerate(path[:-1]):
        if str(p) in stack_names:
            return j
    return None


def hf_name(path: tuple, prefixes: dict[str, str], layer: int | None = None,
            stack_names=("layers",)) -> tuple[str, bool]:
    """HF key for a parameter path (one layer of a stacked path), and whether it is transposed."""
    parts = [str(p) for p in path]
    top = parts[0]
    prefix = prefixes.get(top, prefixes.get("", ""))
    leaf = parts[-1]
    transpose = leaf == "kernel"
    suffix = {"kernel": "weight", "embedding": "weight"}.get(leaf, leaf)
    body = parts[:-1]
    if layer is not None:
        j = stack_index(tuple(body) + ("",), stack_names)
        j = 0 if j is None else j
        body = [*body[:j + 1], str(layer), *body[j + 1:]]
    return prefix + ".".join(body + [suffix]), transpose
