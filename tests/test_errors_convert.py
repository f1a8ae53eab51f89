"""Bad input and faults of `omni-jax convert` and `export` (and of loading what they write): exit status 2,
one `error:` line naming the file, tensor, component or argument, no traceback, and nothing partial left
on disk; paths as users type them (relative, under ``~``, through symlinks) work."""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest

import omni_jax
from omni_jax import CheckpointError
from omni_jax.checkpoint import orbax_io as oio
from omni_jax.checkpoint.loader import load_converted_component
from omni_jax.cli import main
from convert.cli import main as cli_main
from convert.convert import convert

from test_convert import _add_tensor, converted, src  # noqa: F401  (module fixtures, built again here)


def _leftovers(parent, name):
    return [p for p in os.listdir(parent) if p.startswith(f".{name}.")]


# --------------------------------------------------------------------------------------
# failures: exit status 2, one line naming the file or tensor, nothing left behind


def _run_fail(args, capsys):
    capsys.readouterr()
    rc = cli_main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _edit_config(d, fn):
    p = os.path.join(d, "config.json")
    with open(p) as f:
        cfg = json.load(f)
    fn(cfg)
    with open(p, "w") as f:
        json.dump(cfg, f)


def _shard_of(d, key):
    with open(os.path.join(d, "model.safetensors.index.json")) as f:
        return json.load(f)["weight_map"][key]


def test_convert_failures_leave_nothing(src, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "out")
    key = "thinker.model.layers.1.mlp.down_proj.weight"

    def case(name):
        d = str(tmp_path / name)
        shutil.copytree(src, d)
        return d

    # a truncated shard
    d = case("trunc")
    shard = _shard_of(d, key)
    with open(os.path.join(d, shard), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(d, shard)) - 100)
    msg = _run_fail(["convert", d, out, "--quiet"], capsys)
    assert shard in msg and "truncated" in msg
    # a corrupt header
    d = case("corrupt")
    with open(os.path.join(d, shard), "r+b") as f:
        f.write(b"\xff" * 16)
    assert shard in _run_fail(["convert", d, out, "--quiet"], capsys)
    # the index names a missing shard
    d = case("missing")
    os.remove(os.path.join(d, shard))
    msg = _run_fail(["convert", d, out, "--quiet"], capsys)
    assert shard in msg and "does not exist" in msg
    # config and tensors disagree: a shape ...
    d = case("shape")
    _edit_config(d, lambda c: c["thinker_config"]["text_config"].update(intermediate_size=100))
    msg = _run_fail(["convert", d, out, "--quiet"], capsys)
    assert "model-000" in msg and "tensor 'thinker.model.layers.0.mlp." in msg and "100]" in msg
    # ... fewer layers than the tensors have ...
    d = case("layers")
    _edit_config(d, lambda c: c["talker_config"].update(num_hidden_layers=1))
    msg = _run_fail(["convert", d, out, "--quiet"], capsys)
    assert "talker.model.layers.1." in msg and "do not match" in msg
    # ... and a tensor of no component
    d = case("stray")
    _add_tensor(d, "vocoder.weight", np.ones(3, np.float32), shard="model-vocoder.safetensors")
    assert "'vocoder.weight'" in _run_fail(["convert", d, out, "--quiet"], capsys)
    # a corrupt spk_dict.pt
    d = case("voices")
    with open(os.path.join(d, "spk_dict.pt"), "wb") as f:
        f.write(b"not a zip")
    assert "spk_dict.pt" in _run_fail(["convert", d, out, "--quiet"], capsys)
    # a write failing half-way (disk full), after some groups were written
    calls = []
    real = oio.save_group

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(oio, "save_group", flaky)
    msg = _run_fail(["convert", src, out, "--quiet"], capsys)
    assert "No space left on device" in msg and len(calls) == 3
    monkeypatch.undo()
    assert not os.path.exists(out) and not _leftovers(tmp_path, "out")

    # bad arguments
    assert "unknown component 'speaker'" in _run_fail(["convert", src, out, "--quiet", "--components", "speaker"],
                                                      capsys)
    assert "source directory" in _run_fail(["convert", src, os.path.join(src, "sub"), "--quiet"], capsys)
    assert not os.path.exists(out)

    # an existing OUT_DIR needs --overwrite; with it, the old content is replaced
    os.makedirs(out)
    with open(os.path.join(out, "keep.txt"), "w") as f:
        f.write("old")
    assert "already exists" in _run_fail(["convert", src, out, "--quiet", "--components", "token2wav"], capsys)
    assert os.listdir(out) == ["keep.txt"]
    assert cli_main(["convert", src, out, "--quiet", "--components", "token2wav", "--overwrite"]) == 0
    assert oio.is_converted(out) and not os.path.exists(os.path.join(out, "keep.txt"))
    assert oio.converted_components(out) == ["token2wav"]
    assert not _leftovers(tmp_path, "out")


def test_export_failures_leave_nothing(src, converted, tmp_path, capsys):
    out, _ = converted
    back = str(tmp_path / "back")
    assert "not a converted omni-jax checkpoint" in _run_fail(["export", src, back, "--quiet"], capsys)
    os.makedirs(back)
    assert "already exists" in _run_fail(["export", out, back, "--quiet"], capsys)
    os.rmdir(back)
    # a damaged group: orbax's files of one group removed
    broken = str(tmp_path / "broken")
    shutil.copytree(out, broken)
    man = oio.read_manifest(broken)
    gdir = os.path.join(broken, man["components"]["talker"]["groups"][0]["dir"])
    shutil.rmtree(gdir)
    assert gdir in _run_fail(["export", broken, back, "--quiet"], capsys)
    assert not os.path.exists(back) and not _leftovers(tmp_path, "back")
    # restoring it names the group too
    from omni_jax.config import load_config

    with pytest.raises(oio.CheckpointError, match="g00000"):
        load_converted_component(broken, "talker", load_config(broken), dtype="float32")




def test_a_killed_runs_work_is_removed_by_the_next_run(src, tmp_path):
    """SIGKILL leaves ``.NAME.tmp-PID-*`` beside the target; the next convert or export removes those of
    dead processes (a live writer's stay) before it starts."""
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = tmp_path / f".out.tmp-{dead.pid}-abcd"
        (stale / "params").mkdir(parents=True)
        (stale / "params" / "blob").write_bytes(b"x" * 1000)
        stale_old = tmp_path / f".out.old-{dead.pid}-efgh"
        stale_old.mkdir()
        busy = tmp_path / f".out.tmp-{live.pid}-ijkl"
        busy.mkdir()
        other = tmp_path / f".other.tmp-{dead.pid}-mnop"  # another target's: not ours to judge
        other.mkdir()
        convert(src, str(tmp_path / "out"), progress=False, components=["talker"])
        assert not stale.exists() and not stale_old.exists()
        assert busy.is_dir() and other.is_dir()
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [busy.name, other.name, "out"])
    finally:
        live.kill()
        live.wait()


# --------------------------------------------------------------------------------------
# a damaged converted checkpoint: one error, and nothing else on stderr


@pytest.fixture(scope="module")
def default_converted(tmp_path_factory):
    """The embedded default model converted (one group per component), and a copy whose thinker group (the
    first restored, with the most arrays in flight) has every array file overwritten with garbage (orbax's
    manifests intact, so the reads themselves fail)."""
    import jax

    jax.devices()  # the backend's start-up lines are printed now, not inside a test's capture
    root = tmp_path_factory.mktemp("damaged")
    good = str(root / "good")
    convert(omni_jax.default_model_path(), good, progress=False)
    bad = str(root / "bad")
    shutil.copytree(good, bad)
    gdir = os.path.join(bad, oio.read_manifest(bad)["components"]["thinker"]["groups"][0]["dir"])
    rng = np.random.RandomState(0)
    n = 0
    for dirpath, _, files in os.walk(gdir):
        if os.path.basename(dirpath) == "d":
            for f in files:
                with open(os.path.join(dirpath, f), "wb") as fh:
                    fh.write(rng.bytes(500))
                n += 1
    assert n >= 2
    return good, bad


@pytest.mark.parametrize("surface", ["load", "generate", "export"])
def test_damaged_orbax_group_is_one_error_and_nothing_else(default_converted, tmp_path, capfd, surface):
    """Garbage array files in a converted checkpoint: one CheckpointError naming the checkpoint, the component
    and the group; on stderr only that line, not tensorstore's late "RuntimeError: Event loop is closed"
    tracebacks from the group's other reads finishing after orbax closed its event loop. Each surface fails
    twice (the tracebacks came on some attempts) and then loads the good checkpoint, which finishes every
    read still in flight."""
    good, bad = default_converted
    back = tmp_path / "back"
    capfd.readouterr()
    for _ in range(2):
        if surface == "load":
            with pytest.raises(CheckpointError) as e:
                omni_jax.load(bad, dtype="float32")
            msg = str(e.value)
        else:
            argv = (["generate", "--model", bad, "--prompt", "hi", "--max-new-tokens", "2", "--no-audio"]
                    if surface == "generate" else ["export", bad, str(back), "--quiet"])
            assert main(argv) == 2
            msg = capfd.readouterr().err.strip()
            assert msg.startswith("error: ") and "\n" not in msg, msg
        assert f"{bad}/params/thinker/g00000: component 'thinker': cannot restore parameter group" in msg, msg
        assert "its files are damaged" in msg and "tensorstore_spec" not in msg and len(msg) < 500, msg
    omni_jax.load(good, dtype="float32")
    out, err = capfd.readouterr()
    assert err == "" and "Traceback" not in out and "Event loop is closed" not in out, err[:2000]
    assert not back.exists() and not _leftovers(tmp_path, "back")


def test_orbax_loops_drop_late_callbacks_only_once_closed():
    """The event loops orbax gets inside a restore accept callbacks from other threads as usual while
    open, and drop them once closed (a plain loop raises there); the process's policy is put back after."""
    import asyncio
    import threading

    before = asyncio.get_event_loop_policy()
    with oio._orbax_loops():
        loop = asyncio.new_event_loop()
    assert asyncio.get_event_loop_policy() is before
    got = []
    t = threading.Thread(target=lambda: loop.call_soon_threadsafe(got.append, 1))
    t.start()
    t.join()
    loop.run_until_complete(asyncio.sleep(0))
    assert got == [1]
    loop.close()
    assert loop.call_soon_threadsafe(got.append, 2) is None and got == [1]
    plain = asyncio.new_event_loop()
    plain.close()
    with pytest.raises(RuntimeError, match="Event loop is closed"):
        plain.call_soon_threadsafe(got.append, 3)


# --------------------------------------------------------------------------------------
# a checkpoint names only files inside itself


def _edit_manifest(d, fn):
    p = os.path.join(d, oio.MANIFEST)
    with open(p) as f:
        man = json.load(f)
    fn(man)
    with open(p, "w") as f:
        json.dump(man, f)


def _set_group(value):
    def fn(man):
        man["components"]["talker"]["groups"][0]["dir"] = value
    return fn


@pytest.mark.parametrize("case", ["group-absolute", "group-parent", "file-parent", "file-absolute",
                                  "voices-parent", "passthrough-absolute"])
def test_manifest_cannot_name_files_outside(converted, tmp_path, capsys, case):
    """Every name the manifest holds (parameter groups, copied files, the voices, the passthrough file) must
    lie inside the checkpoint, checked on the name: a crafted manifest pointing at valid files elsewhere
    (here: the real ones, moved out) is refused on load and on export, and export writes nothing outside
    its target (a file name with ``..`` was copied to beside the target)."""
    out, _ = converted
    d = str(tmp_path / "ckpt")
    shutil.copytree(out, d)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    man = oio.read_manifest(d)
    kind, how = case.split("-")
    if kind == "group":
        g = man["components"]["talker"]["groups"][0]["dir"]
        shutil.move(os.path.join(d, g), elsewhere / "g")
        _edit_manifest(d, _set_group("../elsewhere/g" if how == "parent" else str(elsewhere / "g")))
    elif kind in ("file", "voices"):
        name = "config.json" if kind == "file" else man["voices"]
        shutil.move(os.path.join(d, name), elsewhere / name)
        bad = f"../elsewhere/{name}" if how == "parent" else str(elsewhere / name)

        def fn(m):
            if kind == "file":
                m["files"] = [bad if f == name else f for f in m["files"]]
            else:
                m["voices"] = bad
        _edit_manifest(d, fn)
        if kind == "file":  # the config is read before the manifest: keep a copy for load_config
            shutil.copy(elsewhere / name, os.path.join(d, name))
    else:
        shutil.move(os.path.join(d, oio.PASSTHROUGH_FILE), elsewhere / oio.PASSTHROUGH_FILE)
        _edit_manifest(d, lambda m: m["passthrough"].update(file=str(elsewhere / oio.PASSTHROUGH_FILE)))
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(CheckpointError, match=f"{re.escape(d)}/{oio.MANIFEST}: names .* which is outside "
                                              "the checkpoint directory"):
        oio.read_manifest(d)
    if kind == "group":
        from omni_jax.config import load_config

        with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
            load_converted_component(d, "talker", load_config(d), dtype="float32")
    capsys.readouterr()
    assert cli_main(["export", d, str(tmp_path / "back"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "outside the checkpoint directory" in err[0], err
    assert sorted(os.listdir(tmp_path)) == before


def test_hugging_face_cache_snapshot_of_symlinks_loads_and_converts(hf_models, tmp_path):
    """A Hugging Face cache snapshot keeps every file as a symlink into the sibling ``blobs`` folder,
    outside the snapshot directory: names are checked lexically, so it loads and converts."""
    src_dir = hf_models("gqa")[0]
    repo = tmp_path / "models--org--tiny"
    blobs, snap = repo / "blobs", repo / "snapshots" / "0123abc"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, name in enumerate(sorted(os.listdir(src_dir))):
        shutil.copy(os.path.join(src_dir, name), blobs / f"blob{i}")
        os.symlink(f"../../blobs/blob{i}", snap / name)
    ids = np.array([[3, 1, 4, 1, 5]])
    want = omni_jax.load(src_dir, dtype="float32").thinker_logits(ids)
    np.testing.assert_array_equal(omni_jax.load(snap, dtype="float32").thinker_logits(ids), want)
    out = tmp_path / "conv"
    assert cli_main(["convert", str(snap), str(out), "--quiet", "--components", "thinker"]) == 0
    np.testing.assert_array_equal(omni_jax.load(out, dtype="float32").thinker_logits(ids), want)


# --------------------------------------------------------------------------------------
# paths as users type them


@pytest.mark.parametrize("how", ["relative", "home", "symlink"])
def test_convert_and_export_take_paths_as_typed(converted, jax_model, tmp_path, monkeypatch, how):
    """SRC and DST of convert and export, and the converted directory given to ``omni_jax.load``: relative to
    the working directory, under ``~`` (unexpanded, as ``--flag=~/x`` or a quoted argument arrives) and
    through a symlink (orbax itself accepts only absolute paths)."""
    work = tmp_path / "work"
    work.mkdir()
    os.symlink(converted[0], work / "linked")
    (work / "real").mkdir()
    os.symlink(work / "real", work / "outdir")  # a DST inside a symlinked directory
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(work))
    p = {"relative": lambda x: x, "home": lambda x: f"~/{x}", "symlink": lambda x: str(work / x)}[how]
    conv = "linked" if how != "relative" else os.path.relpath(converted[0], work)
    ids = np.random.RandomState(5).randint(0, 280, (1, 6))
    want = jax_model("gqa").thinker_logits(ids)
    np.testing.assert_array_equal(omni_jax.load(p(conv), dtype="float32").thinker_logits(ids), want)
    assert main(["export", p(conv), p("outdir/exported"), "--quiet"]) == 0
    assert os.path.isfile(work / "real" / "exported" / "model.safetensors.index.json")
    assert main(["convert", p("outdir/exported"), p("outdir/again"), "--quiet"]) == 0
    assert oio.is_converted(work / "real" / "again")
    np.testing.assert_array_equal(omni_jax.load(p("outdir/again"), dtype="float32").thinker_logits(ids), want)
    assert sorted(os.listdir(work / "real")) == ["again", "exported"]
