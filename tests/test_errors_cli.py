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


@pytest.mark.parametrize("kind", ["fifo", "directory", "dangling-link"])
def test_generate_out_refuses_what_is_not_a_regular_file(tmp_path, capsys, monkeypatch, kind):
    target = tmp_path / "reply.wav"
    if kind == "fifo":
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
    if kind == "fifo":
        assert stat.S_ISFIFO(os.lstat(target).st_mode)  # left as it was
    elif kind == "directory":
        assert target.is_dir() and not any(target.iterdir())
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
