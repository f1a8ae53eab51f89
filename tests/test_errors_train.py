"""Bad input to training: one error naming the problem, status 2, no traceback, nothing left on disk."""

from __future__ import annotations

import json
import os

import pytest

import omni_jax
from omni_jax import InputError

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "red cat"}]}


def _run(argv, capsys):
    from train.cli import main

    try:
        status = main(argv)
    except SystemExit as e:  # argparse refuses a value before anything runs
        status = e.code
    return status, capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--lr", "--min-lr-ratio", "--weight-decay", "--max-grad-norm",
                                  "--talker-weight"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_numbers_are_refused(tmp_path, capsys, flag, value):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(GOOD) + "\n")
    out = tmp_path / "run"
    status, err = _run(["--model", omni_jax.default_model_path(), "--data", str(data), "--out", str(out),
                        f"{flag}={value}"], capsys)
    assert status == 2
    assert f"argument {flag}: not a finite number: '{value}'" in err and "Traceback" not in err
    assert not out.exists()


def test_invalid_utf8_line_is_named_then_skipped_or_fatal(tmp_path):
    from train.data import read_jsonl

    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"messages": "caf\xe9"}\n' + json.dumps(GOOD).encode()
                     + b"\n")
    with pytest.raises(InputError, match=r"latin1\.jsonl:2: not valid UTF-8 \(byte 0xe9 at column 18\)"):
        read_jsonl(str(path))
    logged = []
    recs, skipped = read_jsonl(str(path), on_error="skip", log=logged.append)
    assert len(recs) == 2 and skipped == 1 and "latin1.jsonl:2: not valid UTF-8" in logged[0]


def test_a_non_finite_step_stops_the_run_with_the_last_good_state(tmp_path, capsys):
    """A learning rate that blows the parameters up: the first step whose loss or gradient norm is not
    finite stops the run with its step number, the state before it is checkpointed, and metrics.jsonl
    holds only valid JSON lines of the good steps."""
    import math

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(GOOD) + "\n" for _ in range(4)))
    out = tmp_path / "run"
    status, err = _run(["--model", omni_jax.default_model_path(), "--data", str(data), "--out", str(out),
                        "--steps", "6", "--batch-size", "2", "--lr", "1e30", "--warmup-steps", "0",
                        "--max-grad-norm", "1e30", "--dtype", "float32", "--no-save-model", "--no-progress",
                        "--save-every", "100"], capsys)
    assert status == 2, err
    line = err.strip().splitlines()[-1]
    m = __import__("re").match(r"error: step (\d+): the loss is .* \(not finite\); training stopped\. "
                               r"The last good state \(step (\d+)\) is in (\S+);", line)
    assert m, line
    bad, good = int(m.group(1)), int(m.group(2))
    assert bad == good + 1 and good >= 1 and os.path.isdir(m.group(3)) and m.group(3).endswith(f"checkpoints/{good}")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    recs = [json.loads(x, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl")) for x in lines]
    assert [r["step"] for r in recs] == list(range(1, good + 1))
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in recs)


def _damage(directory):
    """Overwrite every file of a checkpoint with garbage of the same length."""
    for dp, _, files in os.walk(directory):
        for f in files:
            p = os.path.join(dp, f)
            n = os.path.getsize(p)
            with open(p, "wb") as fh:
                fh.write(b"\x00garbage" * (n // 8 + 1))


def test_resume_skips_a_corrupt_checkpoint_then_stops_with_one_line(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(GOOD) + "\n" for _ in range(2)))
    out = tmp_path / "run"
    argv = ["--model", omni_jax.default_model_path(), "--data", str(data), "--out", str(out), "--steps", "2",
            "--batch-size", "2", "--dtype", "float32", "--no-save-model", "--no-progress", "--save-every", "1"]
    assert _run(argv, capsys)[0] == 0
    ck = out / "checkpoints"
    assert sorted(int(x) for x in os.listdir(ck) if x.isdigit()) == [1, 2]
    _damage(ck / "2")
    status, err = _run(argv + ["--resume"], capsys)
    assert status == 0, err
    assert f"warning: checkpoint {ck / '2'} is unusable" in err and "resumed from step 1" in err
    assert "Traceback" not in err
    for step in ("1", "2"):
        _damage(ck / step)
    status, err = _run(argv + ["--resume"], capsys)
    assert status == 2
    assert err.strip().splitlines()[-1].startswith(f"error: --resume: no usable checkpoint in {ck}")
    assert "Traceback" not in err


def test_train_takes_paths_as_typed(tmp_path, monkeypatch, capsys):
    """`train --model/--data/--out` relative to the working directory, then `--resume` of that run with
    the same paths under ``~`` (as ``--flag=~/x`` hands them over unexpanded), then through symlinks:
    the run trains and saves its checkpoint in the directory meant, and each spelling resumes it (one
    training compile for all three)."""
    work = tmp_path / "work"
    (work / "runs").mkdir(parents=True)
    os.symlink(omni_jax.default_model_path(), work / "model")
    (work / "data.jsonl").write_text(json.dumps(GOOD) + "\n")
    os.symlink(work / "data.jsonl", work / "linked.jsonl")
    os.symlink(work / "runs", work / "runs-link")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(work))
    rest = ["--steps", "1", "--dtype", "float32", "--no-save-model", "--no-progress", "--save-every", "1"]
    spellings = {"relative": ("model", "data.jsonl", "runs/run"),
                 "home": ("~/model", "~/data.jsonl", "~/runs/run"),
                 "symlink": (str(work / "model"), str(work / "linked.jsonl"), str(work / "runs-link/run"))}
    for i, (how, (model, data, out)) in enumerate(spellings.items()):
        argv = [f"--model={model}", f"--data={data}", f"--out={out}", *rest] + (["--resume"] if i else [])
        status, err = _run(argv, capsys)
        assert status == 0 and "Traceback" not in err, (how, err)
        assert sorted(os.listdir(work / "runs" / "run" / "checkpoints")) == ["1"], how
        assert sorted(os.listdir(work / "runs")) == ["run"], how
        assert not (work / "~").exists(), how  # a "~" taken literally would have made a new directory
    # another data file (same contents) is another run's setting: refused, naming the flag
    (work / "other.jsonl").write_text(json.dumps(GOOD) + "\n")
    status, err = _run(["--model=model", "--data=other.jsonl", "--out=runs/run", *rest, "--resume"], capsys)
    assert status == 2 and err.strip().splitlines()[-1].startswith("error: --resume: --data differ from the run"), err
