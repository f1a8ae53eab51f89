"""Logical axis names and the one table that maps them to mesh axes.

Every parameter and every large activation is described by logical axis names
(``embed``, ``heads``, ``kv_heads``, ``mlp``, ``vocab``, ``batch``, ``seq``, ...). One table,
:data:`DEFAULT_RULES`, maps each logical name to mesh axes among ``data``, ``fsdp`` and
``tensor``. Model code only names axes; with no mesh every annotation is a no-op, so the
models read (and run) as plain single-device code.

Dimensions that do not divide the mesh axis they map to are replicated on that axis
(a per-dimension fallback decided when the spec is built), never padded.
"""

from __future__ import annotations

import contextlib
import re
import threading
from typing import Iterable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None for replicated)
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "seq": None,
    "cache_seq": None,
    "layers": None,
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "vocab": "tensor",
    "norm": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_vocab": "tensor",
}

# parameter path (joined with '/') -> logical axes, first match wins
PARAM_AXES: list[tuple[str, tuple[str | None, ...]]] = [
    (r"layers/.*(q_proj)/kernel$", ("layers", "embed", "heads")),
    (r"layers/.*(q_proj)/bias$", ("layers", "heads")),
    (r"layers/.*(k_proj|v_proj)/kernel$", ("layers", "embed", "kv_heads")),
    (r"layers/.*(k_proj|v_proj)/bias$", ("layers", "kv_heads")),
    (r"layers/.*o_proj/kernel$", ("layers", "heads", "embed")),
    (r"layers/.*(gate_proj|up_proj)/kernel$", ("layers", "embed", "mlp")),
    (r"layers/.*down_proj/kernel$", ("layers", "mlp", "embed")),
    (r"layers/.*norm/weight$", ("layers", "norm")),
    # the audio encoder's MLP (its attention matches the rules above)
    (r"layers/.*fc1/kernel$", ("layers", "embed", "mlp")),
    (r"layers/.*fc1/bias$", ("layers", "mlp")),
    (r"layers/.*fc2/kernel$", ("layers", "mlp", "embed")),
    # the vision encoder's blocks (stacked over "blocks"): attention over heads, the MLP over its width
    (r"(^|/)blocks/attn/(q|k|v)/kernel$", ("layers", "embed", "heads")),
    (r"(^|/)blocks/attn/(q|k|v)/bias$", ("layers", "heads")),
    (r"(^|/)blocks/attn/proj/kernel$", ("layers", "heads", "embed")),
    (r"(^|/)blocks/mlp/(gate_proj|up_proj)/kernel$", ("layers", "embed", "mlp")),
    (r"(^|/)blocks/mlp/(gate_proj|up_proj)/bias$", ("layers", "mlp")),
    (r"(^|/)blocks/mlp/down_proj/kernel$", ("layers", "mlp", "embed")),
    # the Token2Wav DiT's blocks (component prefix "token2wav/"), stacked over "transformer_blocks" (3 dims)
    # or per layer, "transformer_blocks/<i>/" (2 dims, the layout a loaded DiT serves from): attention over
    # heads, the MLP and the AdaLN modulation (1024 -> 6 x 1024) over their output width
    *[rule for pattern, axes in (
        ("attn/to_(q|k|v)/kernel", ("embed", "heads")),
        ("attn/to_(q|k|v)/bias", ("heads",)),
        ("attn/to_out/0/kernel", ("heads", "embed")),
        ("(ff/ff/0|attn_norm/linear)/kernel", ("embed", "mlp")),
        ("(ff/ff/0|attn_norm/linear)/bias", ("mlp",)),
        ("ff/ff/3/kernel", ("mlp", "embed")),
    ) for rule in ((rf"(^|/)token2wav/(.*/)?transformer_blocks/(\d+/)?{pattern}$", ("layers", *axes)),
                   (rf"(^|/)token2wav/(.*/)?transformer_blocks/(\d+/)?{pattern}$", axes))],
    # BigVGAN's AMP residual pairs (torch layout [out, in, k]): the first convolution over its output
    # channels, the SnakeBeta between the two over the same channels, the second over its input channels
    # (its output is summed across `tensor`: one all-reduce per pair)
    (r"(^|/)token2wav/(.*/)?resblocks/\d+/convs1/\d+/weight$", ("mlp", None, None)),
    (r"(^|/)token2wav/(.*/)?resblocks/\d+/convs1/\d+/bias$", ("mlp",)),
    (r"(^|/)token2wav/(.*/)?resblocks/\d+/activations/\d*[13579]/act/(alpha|beta)$", ("mlp",)),
    (r"(^|/)token2wav/(.*/)?resblocks/\d+/convs2/\d+/weight$", (None, "mlp", None)),
    (r"embed_tokens/embedding$", ("vocab", "embed")),
    (r"lm_head/kernel$", ("embed", "vocab")),
    (r"norm/weight$", ("norm",)),
]


class _Ctx(threading.local):
    mesh: Mesh | None = None
    rules: Mapping = DEFAULT_RULES


_ctx = _Ctx()


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None, rules: Mapping | None = None):
    """Within this context, :func:`constrain` annotates activations for ``mesh``."""
    old = (_ctx.mesh, _ctx.rules)
    _ctx.mesh, _ctx.rules = mesh, (rules or DEFAULT_RULES)
    try:
        yield
    finally:
        _ctx.mesh, _ctx.rules = old


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int] | None = None, mesh: Mesh | None = None,
                    rules: Mapping | None = None) -> P:
    """PartitionSpec for logical ``names``; axes that don't divide ``shape`` are replicated."""
    rules = rules or DEFAULT_RULES
    used: set[str] = set()
    out = []
    for i, name in enumerate(names):
        target = rules.get(name) if name is not None else None
        if target is None:
            out.append(None)
            continue
        axes = (target,) if isinstance(target, str) else tuple(target)
        if mesh is not None:
            axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1 and a not in used)
            if shape is not None:
                size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
                if axes and shape[i] % size:
                    # fall back to the largest prefix of axes that divides
                    while axes and shape[i] % int(np.prod([mesh.shape[a] for a in axes])):
                        axes = axes[:-1]
        used.update(axes)
        out.append(None if not axes else (axes[0] if len(axes) == 1 else axes))
    return P(*out)


def param_axes(path: str, ndim: int) -> tuple[str | None, ...]:
    """Logical axes of the parameter at ``path`` (``/``-joined). The rules (:data:`PARAM_AXES`) are
    written for the stacked layout of checkpoints and training; a per-layer path of the inference
    layout (``layers/<i>/...``, see omni_jax.decoder.to_per_layer) takes its stacked rule without
    the layer axis (the one place that maps it)."""
    stacked = re.sub(r"(^|/)layers/\d+/", r"\1layers/", path)
    if stacked != path:
        return param_axes(stacked, ndim + 1)[1:]
    for pat, axes in PARAM_AXES:
        if re.search(pat, path) and len(axes) == ndim:
            return axes
    return (None,) * ndim


def param_sharding(path: str, shape: Sequence[int], mesh: Mesh, rules: Mapping | None = None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(param_axes(path, len(shape)), shape, mesh, rules))


def constrain(x: jax.Array, names: Iterable[str | None]) -> jax.Array:
    """Annotate an activation with logical axes (no-op without an active mesh)."""
    mesh = _ctx.mesh
    if mesh is None:
        return x
    spec = logical_to_spec(tuple(names), x.shape, mesh, _ctx.rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def put(x, sharding):
    """Place a host array with ``sharding``, each device receiving only its own slice (works across
    processes too: every process passes the same host data, none holds the whole array on a device)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def to_host(x) -> np.ndarray:
    """A (possibly multi-process) global array as a numpy array on every process."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def make_mesh(spec: str | Mapping[str, int] | None = None, devices=None) -> Mesh:
    """Build a mesh from ``"data=2,tensor=4"`` (or a dict). Missing axes get size 1."""
    devices = list(devices if devices is not None else jax.devices())
    if spec is None:
        sizes = {"data": 1, "fsdp": 1, "tensor": len(devices)}
    elif isinstance(spec, str):
        sizes = {}
        for part in spec.split(","):
            k, _, v = part.partition("=")
            k = k.strip()
            if k not in MESH_AXES or not v.strip().isdigit():
                from .errors import InputError
                raise InputError(f"mesh spec '{spec}': expected NAME=N entries with NAME in {MESH_AXES}")
            sizes[k] = int(v)
    else:
        sizes = dict(spec)
    full = {a: int(sizes.get(a, 1)) for a in MESH_AXES}
    n = int(np.prod(list(full.values())))
    if n > len(devices):
        from .errors import InputError
        raise InputError(f"mesh {full} needs {n} devices, only {len(devices)} available")
    arr = np.array(devices[:n]).reshape(tuple(full.values()))
    return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def as_auto_mesh(mesh) -> Mesh | None:
    """The mesh the library computes on, from the one a user passes: ``None`` (one device), a
    :class:`jax.sharding.Mesh` of any axis types (``jax.make_mesh`` gives Explicit axes by default,
    :func:`make_mesh` Auto ones, a hand-built mesh may mix them), or a ``"data=2,tensor=4"`` spec.

    Axis names must be among ``data``, ``fsdp``, ``tensor``. The result has the same devices and
    axes, all of type Auto: every program here declares its layouts by ``in_shardings``,
    ``out_shardings`` and :func:`constrain`, and lets the compiler propagate the rest, which is the
    Auto-axis contract. Explicit axes would instead type every intermediate's sharding, and ops
    whose output sharding is ambiguous (the embedding gather of a vocab-sharded table by
    batch-sharded ids) refuse to trace. The library's arrays therefore carry Auto-mesh shardings,
    and those it returns to the user are numpy arrays.
    """
    from .errors import InputError

    if mesh is None:
        return None
    if isinstance(mesh, (str, Mapping)):
        return make_mesh(mesh)
    if not isinstance(mesh, Mesh):
        raise InputError(f"mesh: expected a jax.sharding.Mesh (or a spec like 'data=2,tensor=4'), "
                         f"got {type(mesh).__name__}")
    bad = [a for a in mesh.axis_names if a not in MESH_AXES]
    if bad:
        raise InputError(f"mesh axis names {bad} are not among {', '.join(MESH_AXES)}")
    auto = (AxisType.Auto,) * len(mesh.axis_names)
    if tuple(mesh.axis_types) == auto:
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=auto)


def mesh_spec(mesh: Mesh | None) -> str | None:
    """``"data=2,fsdp=1,tensor=4"``: a mesh's axis sizes as a :func:`make_mesh` spec (None: None)."""
    return None if mesh is None else ",".join(f"{a}={n}" for a, n in mesh.shape.items())


@contextlib.contextmanager
def no_context_mesh():
    """Run the enclosed library code with JAX's context mesh (``jax.set_mesh``) cleared.

    The library places every array with an explicit :class:`NamedSharding` on the mesh given to
    :func:`omni_jax.load` (made Auto by :func:`as_auto_mesh`) and needs no context mesh. A user's
    ``with jax.set_mesh(m):`` would otherwise apply to the library's own programs: with Explicit
    axes JAX checks every operation's operands against the context mesh (and our Auto-mesh arrays
    never match it). A no-op when no context mesh is set, or inside a trace (``jax.set_mesh``
    cannot be entered there; code traced under a user's ``jax.jit`` keeps the user's context).
    """
    if jax.sharding.get_abstract_mesh().empty:
        yield
        return
    try:
        scope = jax.set_mesh(None)
    except ValueError:  # inside a trace: jax.set_mesh is refused there
        yield
        return
    with scope:
        yield


def outside_context_mesh(obj):
    """Decorator: the function, generator function or every public method and property of a class
    runs under :func:`no_context_mesh`. A generator runs each step under it and gives the caller's
    context back between items, so the caller's own code in the loop body keeps its mesh."""
    import functools
    import inspect

    if isinstance(obj, type):
        for name, attr in list(vars(obj).items()):
            if name.startswith("_") and name != "__call__":
                continue
            if isinstance(attr, property):
                setattr(obj, name, property(*(outside_context_mesh(f) if f is not None else None
                                              for f in (attr.fget, attr.fset, attr.fdel)), attr.__doc__))
            elif inspect.isfunction(attr):
                setattr(obj, name, outside_context_mesh(attr))
        return obj
    if inspect.isgeneratorfunction(obj):
        @functools.wraps(obj)
        def gen(*args, **kwargs):
            with no_context_mesh():
                it = obj(*args, **kwargs)
            try:
                while True:
                    with no_context_mesh():
                        try:
                            item = next(it)
                        except StopIteration as stop:
                            return stop.value
                    yield item
            finally:
                with no_context_mesh():
                    it.close()

        return gen

    @functools.wraps(obj)
    def fn(*args, **kwargs):
        with no_context_mesh():
            return obj(*args, **kwargs)

    return fn


def _tree_mesh(tree):
    """The abstract mesh the first sharded array (or tracer) of ``tree`` lives on; None if none does."""
    for x in jax.tree.leaves(tree):
        if not isinstance(x, jax.Array):
            continue
        mesh = getattr(jax.typeof(x).sharding, "mesh", None)
        if mesh is not None and not mesh.empty:
            return mesh
    return None


def on_arrays_mesh(fn, *trees):
    """``fn(*trees)`` (pytrees of arrays) with the mesh of the first sharded array as JAX's abstract
    mesh and its Explicit axes made Auto for the duration (``jax.sharding.auto_axes``), for
    functions a user traces under their own ``jax.jit`` (where :func:`no_context_mesh` cannot act).
    The model code is written for Auto axes (see :func:`as_auto_mesh`); this lets it take arrays
    placed on an Explicit mesh, and arrays on an Auto mesh inside a caller's Explicit
    ``jax.set_mesh``. On an Explicit mesh every output must be a scalar (they come back
    replicated). Arrays on no mesh: a plain call."""
    mesh = _tree_mesh(trees)
    if mesh is None:
        return fn(*trees)
    with jax.sharding.use_abstract_mesh(mesh):
        explicit = tuple(a for a, t in zip(mesh.axis_names, mesh.axis_types) if t == AxisType.Explicit)
        if not explicit:
            return fn(*trees)
        return jax.sharding.auto_axes(fn, axes=explicit, out_sharding=P())(*trees)


# logical axes of the arrays that cross the jitted entry points, by pytree path (first match wins):
# a DecodeState's fields, the talker inputs and the batch-shaped arguments
IO_AXES: list[tuple[str, tuple[str | None, ...]]] = [
    (r"\.cache\['[kv]'\]\[\d+\]$", ("batch", "cache_seq", "act_kv_heads", None)),  # one layer's KV cache
    (r"\.(kv_valid|tokens|seen)$", ("batch", None)),
    (r"\.(last|done|rng)$", ("batch",)),
    (r"\.next_pos$", (None, "batch")),
    (r"\.hidden$|prompt_hidden|prompt_embeds", ("batch", None, "act_embed")),
]


def io_axes(path: str, ndim: int) -> tuple[str | None, ...]:
    for pat, axes in IO_AXES:
        if re.search(pat, path) and len(axes) == ndim:
            return axes
    return (None,) * ndim


class MeshJit:
    """``jax.jit`` that declares its input and output shardings on a mesh.

    ``arg_axes`` gives each positional argument's logical axes: ``"own"`` (keep the arrays'
    own shardings: parameters placed at load), a tuple of names, ``"io"`` (a pytree whose leaves
    are named by :data:`IO_AXES` from their paths) or None (replicated). Outputs are named by
    :data:`IO_AXES` too, or by ``out_axes`` (a function of the output's path and ndim). The
    shardings depend on the arguments' shapes (a dimension that does not divide its mesh axis is
    replicated), so one ``jax.jit`` with explicit ``in_shardings``/``out_shardings`` is kept per
    shape signature — the same programs plain jit would compile. Without a mesh it is plain jit.
    """

    def __init__(self, fn, mesh, arg_axes, *, static_argnums=(), donate_argnums=(), out_axes=None):
        self.fn, self.mesh, self.arg_axes = fn, mesh, list(arg_axes)
        self.static = tuple(static_argnums)
        self.donate = tuple(donate_argnums)
        self.out_axes = out_axes or io_axes
        self._plain = jax.jit(fn, static_argnums=self.static, donate_argnums=self.donate)
        self._jits: dict = {}

    def _cache_size(self) -> int:
        if self.mesh is None:
            return self._plain._cache_size()
        return sum(j._cache_size() for j, _ in self._jits.values())

    def _named(self, axes_fn, tree):
        mesh = self.mesh

        def one(path, x):
            names = axes_fn(jax.tree_util.keystr(path), np.ndim(x))
            return NamedSharding(mesh, logical_to_spec(names, np.shape(x), mesh))

        return jax.tree_util.tree_map_with_path(one, tree)

    def __call__(self, *args):
        if self.mesh is None:
            return self._plain(*args)
        dyn = [i for i in range(len(args)) if i not in self.static]
        key = (tuple(args[i] for i in self.static),
               tuple(jax.tree.map(lambda x: (np.shape(x), str(getattr(x, "dtype", type(x)))), args[i]) for i in dyn)
               .__repr__())
        if key not in self._jits:
            rep = NamedSharding(self.mesh, P())
            in_sh = []
            for i in dyn:
                a, spec = args[i], self.arg_axes[i]
                if spec == "own":
                    in_sh.append(jax.tree.map(lambda x: x.sharding if isinstance(getattr(x, "sharding", None),
                                                                                NamedSharding) else rep, a))
                elif spec == "io":
                    in_sh.append(self._named(io_axes, a))
                elif spec is None:
                    in_sh.append(jax.tree.map(lambda x: rep, a))
                else:
                    in_sh.append(self._named(lambda p, nd, s=spec: s if len(s) == nd else (None,) * nd, a))
            static = self.static

            def dynamic_fn(*dargs):
                full, it = [], iter(dargs)
                for i in range(len(args)):
                    full.append(args[i] if i in static else next(it))
                return self.fn(*full)

            out = jax.eval_shape(dynamic_fn, *[args[i] for i in dyn])
            out_sh = self._named(self.out_axes, out)
            donate = tuple(dyn.index(i) for i in self.donate)
            jitted = jax.jit(dynamic_fn, in_shardings=tuple(in_sh), out_shardings=out_sh, donate_argnums=donate)
            self._jits[key] = (jitted, tuple(in_sh))
        jitted, in_sh = self._jits[key]

        def fit(x, sh):  # a device array laid out otherwise (another program's output) moves to the declared layout
            if isinstance(x, jax.Array) and x.sharding != sh:
                return jax.device_put(x, sh)
            return x

        return jitted(*[jax.tree.map(fit, args[i], s) for i, s in zip(dyn, in_sh)])
