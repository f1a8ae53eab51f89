"""train/: data, overfitting, exact resume after SIGKILL, LoRA merge and export, bad data lines,
and the train step on 8 devices (embedded default model, float32)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import omni_jax
from omni_jax import InputError
from omni_jax.training import IGNORE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "alpha beta gamma delta one two three red green blue cat dog sun moon".split()


def write_data(path, n=8, speech_every=2, seed=0):
    rs = np.random.RandomState(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            q = " ".join(rs.choice(WORDS, 4))
            a = " ".join(rs.choice(WORDS, 6))
            rec = {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            if speech_every and i % speech_every == 0:
                rec["codec_ids"] = [int(x) for x in rs.randint(0, 100, 5)]
            f.write(json.dumps(rec) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("train-data") / "train.jsonl")


def _opts(data, out, **kw):
    from train.trainer import Options

    base = dict(model=omni_jax.default_model_path(), data=data, out=str(out), steps=4, batch_size=4, grad_accum=2,
                lr=3e-3, dtype="float32", max_length=64, save_model=False, progress=False, save_every=100)
    base.update(kw)
    return Options(**base)


def test_labels_cover_assistant_replies_only(data):
    from train.data import Encoder, read_jsonl

    model = omni_jax.load(omni_jax.default_model_path(), dtype="float32")
    recs, skipped = read_jsonl(data, talker_vocab=model.config.talker.vocab_size, voices=model.voices)
    assert len(recs) == 8 and skipped == 0
    enc = Encoder(model, max_length=128)
    ex = enc(recs[0])
    target = ex.labels != IGNORE
    reply = recs[0].messages[-1]["content"]
    assert model.processor.decode(ex.ids[target], skip_special_tokens=False) == reply + "<|im_end|>"
    # the reply ends the sequence but for the template's trailing newline; the speech covers it
    s, m = ex.reply
    assert np.array_equal(ex.ids[s:s + m], ex.ids[target])
    assert list(ex.codes[:-1]) == recs[0].codec_ids and ex.codes[-1] == model.config.talker.tts_codec_end_token_id
    # a multi-turn conversation: both replies are targets, the user turns are not
    multi = recs[1].messages + [{"role": "user", "content": "again"}, {"role": "assistant", "content": "moon sun"}]
    ex2 = enc(type(recs[1])("x:1", multi))
    text = model.processor.decode(ex2.ids[ex2.labels != IGNORE], skip_special_tokens=False)
    assert text == recs[1].messages[-1]["content"] + "<|im_end|>" + "moon sun<|im_end|>"


def test_overfits_eight_examples(data, tmp_path):
    from train.trainer import Trainer

    tr = Trainer(_opts(data, tmp_path, steps=30))
    losses = [tr.train_step()["loss"] for _ in range(30)]
    assert tr.speech and "talker" in tr.trainable  # thinker and talker both train
    assert losses[-1] < losses[0] / 10
    assert tr.history[-1]["talker_loss"] < tr.history[0]["talker_loss"] / 10


def test_one_micro_batch_is_one_program_with_the_accumulated_numbers(data, tmp_path):
    """--grad-accum 1 runs the gradient and the update as one program (no float32 gradient
    accumulator held beside the parameters); its steps give the numbers of the same examples split into
    two accumulated micro-batches (micro-step + update programs): losses, gradient norms and parameters."""
    import jax
    from train.trainer import Trainer

    fused = Trainer(_opts(data, tmp_path / "fused", steps=2, batch_size=4, grad_accum=1, talker_weight=1.0))
    accum = Trainer(_opts(data, tmp_path / "accum", steps=2, batch_size=2, grad_accum=2, talker_weight=1.0))
    assert [[e.ids.tolist() for e in m] for m in accum.step_examples(0)] == \
        [[e.ids.tolist() for e in fused.step_examples(0)[0][i:i + 2]] for i in (0, 2)]
    for _ in range(2):
        a, b = fused.train_step(), accum.train_step()
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(b["loss"]) and abs(a["grad_norm"] - b["grad_norm"]) <= \
            1e-4 * b["grad_norm"]
    assert {k[0] for k in fused._jits} == {"step"} and {k[0] for k in accum._jits} == {"micro"}
    # AdamW divides by the root of the squared-gradient average: where a gradient is near zero in both runs
    # their rounding moves the parameter by different fractions of the learning rate (3e-3), hence atol
    for x, y in zip(jax.tree.leaves(fused.trainable), jax.tree.leaves(accum.trainable)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-4)


def _losses(path):
    with open(path, encoding="utf-8") as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def test_sigkill_and_resume_repeat_the_losses(data, tmp_path):
    from train.trainer import Trainer

    steps = 40
    ref_dir = tmp_path / "ref"
    ref = Trainer(_opts(data, ref_dir, steps=steps, save_every=5))
    ref.run()
    want = _losses(ref_dir / "metrics.jsonl")
    assert sorted(want) == list(range(1, steps + 1))

    out = tmp_path / "killed"
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=os.path.join(os.environ["OMNI_JAX_CACHE"], "xla"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5", JAX_DEFAULT_MATMUL_PRECISION="highest")
    cmd = [sys.executable, "-m", "train", "--model", omni_jax.default_model_path(), "--data", data, "--out", str(out),
           "--steps", str(steps), "--batch-size", "4", "--grad-accum", "2", "--lr", "3e-3", "--dtype", "float32",
           "--max-length", "64", "--save-every", "5", "--no-save-model", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 12:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    done = len(metrics.read_text().splitlines())
    assert 12 <= done < steps  # killed mid-run
    res = subprocess.run(cmd + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resumed from step" in res.stderr
    got = _losses(metrics)
    assert sorted(got) == list(range(1, steps + 1))  # every step once: lines after the checkpoint were redone
    np.testing.assert_allclose([got[s] for s in range(1, steps + 1)], [want[s] for s in range(1, steps + 1)],
                               rtol=1e-6)
    kept = sorted(int(x) for x in os.listdir(out / "checkpoints") if x.isdigit())
    assert kept == [30, 35, 40]  # the newest --keep 3


def test_run_dir_is_not_overwritten(data, tmp_path):
    from train.trainer import Trainer

    Trainer(_opts(data, tmp_path, steps=2, save_every=1)).run()
    with pytest.raises(InputError, match="--resume"):
        Trainer(_opts(data, tmp_path, steps=2))
    with pytest.raises(InputError, match="--lr"):
        Trainer(_opts(data, tmp_path, steps=2, lr=1e-4, resume=True))


def test_lora_merge_export_and_hf_roundtrip(data, tmp_path):
    """Merged LoRA weights give the logits of the adapters applied; the run's model/ loads with
    omni_jax and exports to a checkpoint transformers loads with the same logits."""
    import torch
    from transformers import Qwen2_5OmniForConditionalGeneration

    from train.lora import apply_lora
    from train.trainer import Trainer

    tr = Trainer(_opts(data, tmp_path / "run", steps=6, train="lora", lora_rank=4, lr=1e-2, save_model=True))
    summary = tr.run()
    lora = tr.trainable["lora"]
    assert set(lora) == {"thinker", "talker"}
    assert len(lora["thinker"]) == 7 and float(np.abs(np.asarray(lora["thinker"][
        "layers/self_attn/q_proj/kernel"]["b"])).max()) > 0  # adapters on q,k,v,o,gate,up,down; trained
    ids = np.asarray([[5, 17, 42, 99, 7, 3, 250, 11]], np.int32)
    base = omni_jax.load(omni_jax.default_model_path(), dtype="float32")
    from omni_jax.training import model_params
    from flax import nnx

    params = {"thinker": nnx.to_pure_dict(model_params(base)["thinker"])}
    applied = apply_lora(params, {"thinker": lora["thinker"]}, tr.lora_scale)
    base.params = applied["thinker"]  # the adapters applied on the fly
    want = base.thinker_logits(ids)
    merged = omni_jax.load(summary["model"], dtype="float32")  # the run's merged, converted model
    got = merged.thinker_logits(ids)
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-5
    assert np.abs(got - omni_jax.load(omni_jax.default_model_path(), dtype="float32").thinker_logits(ids)).max() > 1e-3
    hf_dir = tmp_path / "hf"
    from omni_jax.cli import main

    assert main(["export", summary["model"], str(hf_dir)]) == 0
    tm = Qwen2_5OmniForConditionalGeneration.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = tm.thinker(input_ids=torch.tensor(ids).long()).logits.numpy()
    assert np.abs(ref - got).max() / np.abs(ref).max() <= 1e-4


def test_bad_lines_named_then_skipped_or_fatal(tmp_path, capsys):
    from train.trainer import Trainer

    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "red cat"}]}
    lines = [json.dumps(good),
             "{not json",
             json.dumps({"messages": [{"role": "user", "content": [{"type": "image", "image": "missing.png"},
                                                                   {"type": "text", "text": "x"}]},
                                      {"role": "assistant", "content": "no"}]}),
             json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
             json.dumps({"messages": good["messages"], "codec_ids": [1, "two"]}),
             json.dumps({"messages": good["messages"], "extra": 1}),
             json.dumps({"messages": [{"role": "user", "content": "w " * 80}, {"role": "assistant", "content": "x"}]}),
             json.dumps(good)]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"bad\.jsonl:2: not valid JSON"):
        Trainer(_opts(str(path), tmp_path / "a"))
    assert not (tmp_path / "a").exists()  # a failed start leaves no run directory behind
    logged = []
    tr = Trainer(_opts(str(path), tmp_path / "b", on_error="skip"), log=logged.append)
    assert len(tr.examples) == 2 and tr.skipped == 6
    text = "\n".join(logged)
    for n, what in [(2, "not valid JSON"), (3, "image file not found"), (4, "no assistant message"),
                    (5, "codec_ids must be"), (6, "unknown field"), (7, "longer than --max-length")]:
        assert f"bad.jsonl:{n}: " in text and what in text, (n, what)
    # the CLI: one error line, status 2, no traceback
    from train.cli import main

    assert main(["--model", omni_jax.default_model_path(), "--data", str(path), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.strip().startswith("error:") and "bad.jsonl:2" in err and "Traceback" not in err
    assert not (tmp_path / "c").exists()
    # flags that another flag governs are refused where they would be ignored, before anything is read
    base = ["--model", omni_jax.default_model_path(), "--data", str(path), "--out", str(tmp_path / "d")]
    for extra, msg in [(["--lora-rank", "4"], "--lora-rank needs --train lora"),
                       (["--lora-alpha", "8", "--train", "full"], "--lora-alpha needs --train lora"),
                       (["--eval-every", "2"], "--eval-every needs --eval")]:
        assert main(base + extra) == 2
        assert capsys.readouterr().err.strip() == f"error: {msg} (it would be ignored)"
    assert not (tmp_path / "d").exists()


def test_train_step_on_eight_devices(data, tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "train_multidevice_check.py"), data,
                          str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(out) == {"fsdp=8", "explicit data=2,tensor=4"}  # Auto axes, and jax.make_mesh's Explicit ones
    for mesh, r in out.items():
        assert r["loss_rel"] <= 1e-5 and r["param_rel"] <= 1e-5, (mesh, r)
        assert r["sharded_params"] > 0, mesh
