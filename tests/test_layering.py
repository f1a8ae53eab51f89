"""The repository's layering, read from the source (ast, no imports run).

* the library ``omni_jax`` imports nothing from ``convert``, ``train`` or ``bench``, not even inside a
  function;
* ``convert`` and ``train`` use only the library's public names (no ``_name`` imported from it);
* there is no import cycle between the top-level folders, nor between the modules of ``omni_jax``
  (imports inside functions count: hiding an import in a function does not remove the dependency);
* the wheel installs only the library's namespace: ``convert/`` and ``train/`` as ``omni_jax.convert``
  and ``omni_jax.train``.

An import edge goes to the module named (``from pkg import name`` to ``pkg.name`` when that is a module,
else to ``pkg``), not to the packages above it. Relative imports are resolved as if the top-level
folders sat side by side under one root (``from ..convert import x`` in ``train/`` is ``convert.x``).
"""

from __future__ import annotations

import ast
import os
from collections import defaultdict

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDERS = ("omni_jax", "convert", "train", "bench")
TOOLS = ("convert", "train", "bench")
# installed names of the tools -> their folder names
INSTALLED_AS = {"omni_jax.convert": "convert", "omni_jax.train": "train"}


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].split(os.sep)
    if rel[-1] == "__init__":
        rel = rel[:-1]
    return ".".join(rel)


def _collect() -> dict[str, tuple[str, bool]]:
    """module name -> (file path, is a package)."""
    mods = {}
    for top in FOLDERS:
        for dirpath, dirnames, files in os.walk(os.path.join(ROOT, top)):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__pycache__")))
            for f in sorted(files):
                if f.endswith(".py"):
                    p = os.path.join(dirpath, f)
                    mods[_module_name(p)] = (p, f == "__init__.py")
    return mods


MODULES = _collect()


def _canonical(name: str) -> str:
    for installed, folder in INSTALLED_AS.items():
        if name == installed or name.startswith(installed + "."):
            return folder + name[len(installed):]
    return name


def _target(name: str) -> str:
    """The known module ``name`` is (or lies inside), else ``name`` itself (a third-party module)."""
    name = _canonical(name)
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in MODULES:
            return ".".join(parts[:i])
    return name


def _imports(mod: str):
    """Yield ``(imported module, imported name or None, line)`` for every import in ``mod``, at any depth."""
    path, is_pkg = MODULES[mod]
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    package = mod.split(".") if is_pkg else mod.split(".")[:-1]
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield _target(a.name), None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package[:len(package) - node.level + 1] if node.level > 1 else package
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            base = _canonical(base)
            for a in node.names:
                sub = f"{base}.{a.name}" if base else a.name
                if sub in MODULES:
                    yield sub, None, node.lineno
                else:
                    yield _target(base), a.name, node.lineno


def _runtime_nodes(tree):
    """Every node of ``tree`` except those under ``if TYPE_CHECKING:`` (imports for annotations only,
    which never run)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and (getattr(child.test, "id", None) == "TYPE_CHECKING"
                                              or getattr(child.test, "attr", None) == "TYPE_CHECKING"):
                todo.extend(child.orelse)
                continue
            todo.append(child)


def _top(name: str) -> str:
    return name.split(".")[0]


EDGES: dict[str, set[str]] = defaultdict(set)
for _m in MODULES:
    for _t, _, _ in _imports(_m):
        if _t in MODULES and _t != _m:
            EDGES[_m].add(_t)


def _cycles(nodes, edges) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in nodes:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


def test_the_modules_are_found():
    for name in ("omni_jax.api", "omni_jax.checkpoint.loader", "omni_jax.checkpoint.tree", "convert.convert",
                 "convert.export", "convert.cli", "train.cli", "train.export", "bench"):
        assert name in MODULES, name
    # the relative imports resolve: the loader's and train's edges are seen
    assert "omni_jax.checkpoint.components" in EDGES["omni_jax.checkpoint.loader"]
    assert {"convert.convert", "convert.export"} <= EDGES["train.export"]
    assert "omni_jax.checkpoint.tree" in EDGES["train.lora"]


def test_the_library_imports_no_tool():
    bad = [f"{MODULES[m][0]}:{line}: imports {t}" for m in MODULES if _top(m) == "omni_jax"
           for t, _, line in _imports(m) if _top(t) in TOOLS]
    assert not bad, "\n".join(bad)


def test_tools_use_only_public_library_names():
    bad = []
    for m in MODULES:
        if _top(m) not in ("convert", "train", "bench"):
            continue
        for t, name, line in _imports(m):
            if _top(t) != "omni_jax":
                continue
            private = [p for p in t.split(".") if p.startswith("_")]
            if private or (name is not None and name.startswith("_")):
                bad.append(f"{MODULES[m][0]}:{line}: imports {t}{'.' + name if name else ''}")
    assert not bad, "\n".join(bad)


# names with a leading underscore that are public API elsewhere: namedtuple methods, jax's compile-cache size
PUBLIC_UNDERSCORE = {"_replace", "_fields", "_asdict", "_make", "_cache_size"}


def test_engine_users_reach_no_private_attributes():
    """The server, sessions and the tools reach the model and the library through public names only:
    no ``x._name`` attribute access on anything but their own ``self`` / ``cls``."""
    import ast

    bad = []
    for m, (path, *_) in MODULES.items():
        if not (m.startswith("omni_jax.serve") or m == "omni_jax.session" or _top(m) in TOOLS):
            continue
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__") \
                    and node.attr not in PUBLIC_UNDERSCORE \
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                bad.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
    assert not bad, "\n".join(bad)


def test_no_cycle_between_top_level_folders():
    tops = defaultdict(set)
    for m, ts in EDGES.items():
        for t in ts:
            if _top(t) != _top(m):
                tops[_top(m)].add(_top(t))
    assert not _cycles(set(FOLDERS), tops), dict(tops)
    assert not tops["omni_jax"]


def test_no_cycle_between_library_modules():
    lib = {m for m in MODULES if _top(m) == "omni_jax"}
    edges = {m: EDGES[m] & lib for m in lib}
    cycles = _cycles(lib, edges)
    assert not cycles, "import cycles in omni_jax:\n" + "\n".join(
        " <-> ".join(c) + "\n    edges: " + ", ".join(f"{a} -> {b}" for a in c for b in sorted(edges[a]) if b in c)
        for c in cycles)


def test_the_cycle_check_sees_a_cycle():
    """The check itself: a two-module cycle, and one closed through a third module, are found."""
    assert _cycles({"a", "b", "c"}, {"a": {"b"}, "b": {"a"}}) == [["a", "b"]]
    assert _cycles({"a", "b", "c"}, {"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c"]]
    assert not _cycles({"a", "b", "c"}, {"a": {"b", "c"}, "b": {"c"}})
    # the attention interface and its kernels both sit above the XLA implementation
    assert "omni_jax.attention_xla" in EDGES["omni_jax.kernels"]
    assert "omni_jax.attention_xla" in EDGES["omni_jax.kernels.flash"]
    assert not EDGES["omni_jax.attention_xla"] & {m for m in MODULES if _top(m) == "omni_jax"}


def _setup_packages():
    """The packages setup.py installs, computed the way it computes them, with their folders."""
    from setuptools import find_packages

    src = open(os.path.join(ROOT, "setup.py"), encoding="utf-8").read()
    tree = ast.parse(src)
    tools = next(ast.literal_eval(n.value) for n in ast.walk(tree)
                 if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) == "TOOLS")
    pkgs = find_packages(where=ROOT, include=["omni_jax", "omni_jax.*"])
    for name, folder in tools.items():
        pkgs += [name] + [f"{name}.{s}" for s in find_packages(where=os.path.join(ROOT, folder))]
    return tools, pkgs


def test_only_the_library_namespace_is_installed():
    tools, pkgs = _setup_packages()
    assert tools == {"omni_jax.convert": "convert", "omni_jax.train": "train"}
    assert {p.split(".")[0] for p in pkgs} == {"omni_jax"}
    # every package folder of the library and its tools is installed
    for m, (path, is_pkg) in MODULES.items():
        if is_pkg and _top(m) in ("omni_jax", "convert", "train"):
            installed = m if _top(m) == "omni_jax" else "omni_jax." + m
            assert installed in pkgs, installed
    pyproject = open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8").read()
    assert 'convert = "omni_jax.convert.cli:add_subcommands"' in pyproject
    assert 'train = "omni_jax.train.cli:add_subcommand"' in pyproject


@pytest.mark.parametrize("tool", ["convert", "train"])
def test_tools_import_their_own_modules_relatively(tool):
    """A tool works under its folder name and its installed name only if it never names itself."""
    bad = []
    for m, (path, _) in MODULES.items():
        if _top(m) != tool:
            continue
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in _runtime_nodes(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            bad += [f"{path}:{node.lineno}: {n}" for n in names if _top(n) == tool or n == f"omni_jax.{tool}"
                    or n.startswith(f"omni_jax.{tool}.")]
    assert not bad, "\n".join(bad)


def test_cli_finds_the_tools_through_entry_points(monkeypatch, capsys):
    """``omni-jax`` gets convert/export/train from the ``omni_jax.commands`` entry points; without them
    each subcommand fails with one line naming the missing package (exit status 2)."""
    import importlib.metadata

    from omni_jax import cli

    sub = cli.build_parser()._subparsers._group_actions[0]
    assert {"generate", "serve", "convert", "export", "train"} <= set(sub.choices)
    assert sub.choices["convert"].get_default("func").__module__.endswith("convert.cli")
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: [])
    assert cli.main(["export", "--max-shard-size", "1GB", "a", "b"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: 'omni-jax export' needs the omni_jax.convert package, but it is not installed "
                   "(pip install omni-jax provides it)"]
