"""Bad numbers through the Python API and the generate CLI: one InputError (CLI: one `error:` line,
status 2) naming the argument, never a traceback or a silently accepted nan/inf."""

from __future__ import annotations

import math

import pytest

import omni_jax
from omni_jax import InputError
from omni_jax.cli import main


@pytest.fixture(scope="module")
def model():
    return omni_jax.load(omni_jax.default_model_path(), dtype="float32")


@pytest.mark.parametrize("kw,message", [
    (dict(do_sample=True, temperature=math.inf), "temperature: expected a finite number, got inf"),
    (dict(do_sample=True, temperature=math.nan), "temperature: expected a finite number, got nan"),
    (dict(do_sample=True, top_p=math.nan), "top_p: expected a finite number"),
    (dict(repetition_penalty=math.inf), "repetition_penalty: expected a finite number"),
    (dict(seed=2 ** 70), r"seed: expected an integer in \[-2\*\*63, 2\*\*63 - 8\)"),
    (dict(seed=1.5), "seed: expected an integer"),
])
def test_api_refuses_bad_numbers(model, kw, message):
    with pytest.raises(InputError, match=message):
        model.generate([[1, 2, 3]], max_new_tokens=2, **kw)


@pytest.mark.parametrize("argv,message", [
    (["--temperature=inf"], "argument --temperature: not a finite number: 'inf'"),
    (["--top-p", "nan"], "argument --top-p: not a finite number: 'nan'"),
    (["--repetition-penalty", "1e999"], "argument --repetition-penalty: not a finite number: '1e999'"),
    (["--seed", str(2 ** 70)], "error: seed: expected an integer in [-2**63, 2**63 - 8)"),
])
def test_cli_refuses_bad_numbers(capsys, argv, message):
    try:
        status = main(["generate", "--prompt", "hi", "--max-new-tokens", "2"] + argv)
    except SystemExit as e:  # argparse refuses the value before anything runs
        status = e.code
    err = capsys.readouterr().err
    assert status == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize("how", ["relative", "home", "symlink"])
def test_load_takes_paths_as_typed(tmp_path, monkeypatch, how):
    """``omni_jax.load`` takes a checkpoint directory relative to the working directory, under ``~`` and
    through a symlink: the same weights as the directory itself."""
    import os

    import numpy as np

    os.symlink(omni_jax.default_model_path(), tmp_path / "linked")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    path = {"relative": "./linked/", "home": "~/linked", "symlink": str(tmp_path / "linked")}[how]
    ids = np.array([[1, 2, 3, 4]])
    want = omni_jax.load(omni_jax.default_model_path(), dtype="float32").thinker_logits(ids)
    np.testing.assert_array_equal(omni_jax.load(path, dtype="float32").thinker_logits(ids), want)
