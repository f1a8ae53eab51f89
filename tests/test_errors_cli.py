"""Output targets on the command line: checked before any work, never replaced unless they are what the
command writes (a regular file, or a directory for run and checkpoint directories)."""

from __future__ import annotations

import os
import stat

import pytest

import omni_jax
from omni_jax.cli import main


def _no_load(*a, **k):
    raise AssertionError("the model was loaded before the output target was checked")


def _chardev(path) -> str:
    """A character device node at ``path`` (what /dev/null is, 1:3) where the process may make one (root,
    as in CI); elsewhere a FIFO, the other special file the writer must never replace."""
    try:
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))
        return "chardev"
    except PermissionError:
        os.mkfifo(path)
        return "fifo"


@pytest.mark.parametrize("kind", ["chardev", "fifo", "directory", "dangling-link", "missing-parent"])
def test_generate_out_refuses_what_is_not_a_regular_file(tmp_path, capsys, monkeypatch, kind):
    target = tmp_path / "reply.wav"
    if kind == "chardev":
        kind = _chardev(target)
    elif kind == "missing-parent":
        target = tmp_path / "no" / "reply.wav"
    elif kind == "fifo":
        os.mkfifo(target)
    elif kind == "directory":
        target.mkdir()
    else:
        os.symlink(tmp_path / "missing" / "x.wav", target)
    monkeypatch.setattr(omni_jax, "load", _no_load)
    assert main(["generate", "--prompt", "Hi", "--out", str(target)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: --out {target}: ") and "Traceback" not in err
    assert ("not a regular file" in err or "is a directory" in err or "does not exist" in err), err
    if kind == "chardev":
        st = os.lstat(target)
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)  # left as it was
    elif kind == "fifo":
        assert stat.S_ISFIFO(os.lstat(target).st_mode)  # left as it was
    elif kind == "directory":
        assert target.is_dir() and not any(target.iterdir())
    elif kind == "missing-parent":
        assert sorted(os.listdir(tmp_path)) == []
    else:
        assert os.path.islink(target)


def test_write_wav_never_replaces_a_device_node(tmp_path):
    """The library's writer checks too (a caller other than the CLI): a FIFO stays a FIFO."""
    from omni_jax import InputError
    from omni_jax.media import write_wav

    fifo = tmp_path / "out.wav"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="exists and is not a regular file; not replacing it"):
        write_wav(str(fifo), [0.0, 0.1])
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and sorted(os.listdir(tmp_path)) == ["out.wav"]


def test_a_failing_wav_write_is_one_error_with_nothing_left(tmp_path, monkeypatch):
    """A write that fails after the checks (here: the disk fills up) is one InputError naming the
    file; the previous file stays, no temporary is left, and no finaliser reports a second error
    later (a half-built ``wave.Wave_write`` printed "Exception ignored in ... __del__")."""
    import builtins
    import errno
    import gc
    import sys

    from omni_jax import InputError
    from omni_jax.media import write_wav

    out = tmp_path / "reply.wav"
    write_wav(str(out), [0.0, 0.5])
    before = out.read_bytes()
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    real_open, real_fdopen = builtins.open, os.fdopen

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: full() if "tmp" in str(f) else real_open(f, *a, **k))
    monkeypatch.setattr(os, "fdopen", full)
    with pytest.raises(InputError, match=f"{out}: cannot write \\(No space left on device\\)"):
        write_wav(str(out), [0.25] * 100)
    monkeypatch.setattr(os, "fdopen", real_fdopen)
    gc.collect()
    assert unraisable == []
    assert out.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["reply.wav"]


def test_train_out_naming_a_file(tmp_path, capsys):
    from train.cli import main as train_main

    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n')
    out = tmp_path / "run"
    out.write_text("precious")
    assert train_main(["--model", omni_jax.default_model_path(), "--data", str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"error: --out {out}: exists and is not a directory; not replacing it" in err and "Traceback" not in err
    assert out.read_text() == "precious"


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A short WAV, a PNG and a four-frame MP4 for the path tests."""
    import av
    import numpy as np
    from PIL import Image

    from omni_jax.media import write_wav

    d = tmp_path_factory.mktemp("media")
    write_wav(str(d / "a.wav"), 0.1 * np.sin(np.arange(8000) / 7.0), sampling_rate=16000)
    rng = np.random.RandomState(0)
    Image.fromarray(rng.randint(0, 255, (32, 32, 3), np.uint8)).save(d / "i.png")
    with av.open(str(d / "v.mp4"), "w") as c:
        s = c.add_stream("mpeg4", rate=4)
        s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
        for _ in range(4):
            for pkt in s.encode(av.VideoFrame.from_ndarray(rng.randint(0, 255, (32, 32, 3), np.uint8),
                                                           format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    return d


@pytest.mark.parametrize("how", ["relative", "home", "symlink"])
def test_generate_takes_paths_as_typed(media, tmp_path, monkeypatch, capsys, how):
    """Every path of `generate` (--model, --audio, --image, --video, --out) relative to the working
    directory, under ``~`` as ``--flag=~/x`` hands it over unexpanded (the shell expands only a word that
    starts with ``~``), and through symlinks; a symlinked --out keeps the link and fills the file it
    points to."""
    work = tmp_path / "work"
    (work / "files").mkdir(parents=True)
    os.symlink(omni_jax.default_model_path(), work / "model")
    for name in ("a.wav", "i.png", "v.mp4"):
        os.symlink(media / name, work / "files" / name)
    (work / "replies").mkdir()
    target = work / "replies" / "reply.wav"
    target.write_bytes(b"old")
    if how == "symlink":
        os.symlink(target, work / "reply.wav")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(work))
    p = {"relative": lambda x: x, "home": lambda x: f"~/{x}", "symlink": lambda x: str(work / x)}[how]
    out = p("reply.wav" if how == "symlink" else "replies/reply.wav")
    argv = ["generate", "--prompt", "Hi", "--max-new-tokens", "2", f"--model={p('model')}",
            f"--audio={p('files/a.wav')}", f"--image={p('files/i.png')}", f"--video={p('files/v.mp4')}",
            f"--out={out}", "--talker-max-new-tokens", "8"]
    assert main(argv) == 0, capsys.readouterr().err
    assert target.read_bytes()[:4] == b"RIFF" and os.path.getsize(target) > 44
    if how == "symlink":
        assert os.path.islink(work / "reply.wav") and os.readlink(work / "reply.wav") == str(target)
    assert sorted(os.listdir(work / "replies")) == ["reply.wav"]
