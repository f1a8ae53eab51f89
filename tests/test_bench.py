"""The side-by-side benchmark (bench.compare) end to end on a tiny random model: its command line,
its JSON, and the correctness figures it reports beside the timings (same text, mel and waveform
as transformers). Timings themselves are not asserted (they belong to bench/, not to tests)."""

import json
import os

import pytest

TINY = {
    "text": {"vocab_size": 152064, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "mrope_section": [2, 3, 3],
             "max_position_embeddings": 4096},
    "prompt": 16, "new_tokens": 6, "batches": [1, 2], "threads": None,
    "talker": {"vocab_size": 8448, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "mrope_section": [2, 3, 3]},
    "token2wav": {
        "dit": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "head_dim": 16, "ff_mult": 2,
                "emb_dim": 32, "mel_dim": 80, "enc_emb_dim": 192, "enc_dim": 32, "num_embeds": 8193, "repeats": 2,
                "block_size": 24, "look_backward_layers": [0], "look_ahead_layers": [1],
                "enc_channels": [32, 32, 32, 32, 96]},
        "bigvgan": {"mel_dim": 80, "upsample_initial_channel": 128, "resblock_kernel_sizes": [3],
                    "resblock_dilation_sizes": [[1, 3, 5]], "upsample_rates": [5, 3, 2, 2, 2, 2],
                    "upsample_kernel_sizes": [11, 7, 4, 4, 4, 4]}},
    "speech": {"codes": 8, "ode_steps": 3, "ref_mel_frames": 30, "voice_bos": 151870},
}


def test_compare_runs_and_reports_matching_outputs(tmp_path, capsys):
    from bench import compare

    cfg_path, out = tmp_path / "tiny.json", tmp_path / "out.json"
    cfg_path.write_text(json.dumps(TINY))
    passes = [{"session": 1, "change": "recorded by hand"}]
    out.write_text(json.dumps({"rows": "an earlier run's", "profile_passes": passes}))
    compare.main(["--config", str(cfg_path), "--no-memory", "--json", str(out)])
    table = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["profile_passes"] == passes  # the hand-kept record survives a re-run; the figures are new
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "tiny.json"]  # no temporary left behind
    assert res["precision"] == "float32" and res["config"] == TINY
    assert [r["batch"] for r in res["rows"]] == [1, 2]
    for r in res["rows"]:
        for fig in (r["prefill_tok_s"], r["decode_tok_s"]):
            assert fig["jax"] > 0 and fig["torch"] > 0
            assert fig["ratio"] == pytest.approx(fig["jax"] / fig["torch"], rel=0.02)
    assert res["rows"][0]["decode_tok_s"]["target"].startswith(">= 3x transformers")
    s = res["speech"]
    assert s["codes"] == 8 and s["mel_frames"] == 16
    # the same random weights on both sides: the reported errors are float32 agreement
    assert s["dit"]["mel_rel_err"] <= 1e-5
    assert s["bigvgan"]["wav_rel_err"] <= 1e-5
    assert s["e2e"]["text_equal"] is True
    # the reference talker runs with its attention mask restored (bench.util.talker_mask_restored): same codes
    assert s["talker"]["codes_equal"] is True and s["e2e"]["codes_equal"] is True
    assert s["e2e"]["wav_rel_err"] <= 1e-3
    assert s["dit"]["evals"] == 4 * (TINY["speech"]["ode_steps"] - 1) and s["dit"]["rows_per_eval"] == 2
    assert "thinker batch" in table and "DiT s per audio s" in table and "end-to-end turn s" in table


def test_compare_gpu_mode_refuses_without_a_gpu(tmp_path):
    from bench import compare

    cfg_path = tmp_path / "tiny.json"
    cfg_path.write_text(json.dumps(TINY))
    with pytest.raises(SystemExit, match="needs a GPU"):
        compare.main(["--config", str(cfg_path), "--device", "gpu"])
    with pytest.raises(SystemExit):
        compare.main(["--config", str(cfg_path), "--dtype", "int8"])


def test_compare_removes_its_checkpoint_when_a_run_fails(tmp_path, monkeypatch):
    import os

    from bench import compare

    made = tmp_path / "omni-bench-x"

    def mkdtemp(prefix=""):
        made.mkdir()
        return str(made)

    def broken(cfg, directory):
        (made / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("boom")

    monkeypatch.setattr(compare.tempfile, "mkdtemp", mkdtemp)
    monkeypatch.setattr(compare, "build_checkpoint", broken)
    with pytest.raises(RuntimeError, match="boom"):
        compare.run(TINY, None, memory=False)
    assert not os.path.exists(made)


def test_token2wav_bench_reports_precisions_against_the_matmul_limit():
    """bench.gpu_token2wav's rows on a tiny token2wav (both sides really run, at TF32, which a CPU
    runs as float32): the FLOPs are the shapes' (bench.compare's counts), the throughput and its
    share of the limit follow from them, the ratio pairs rows of the same precision and length, and
    the model's and torch's matmul precisions are restored afterwards."""
    import dataclasses

    import torch

    from bench import gpu_token2wav as G
    from bench.compare import bigvgan_flops, dit_flops
    from omni_jax import token2wav as T
    from omni_jax.config import Token2WavConfig

    t = TINY["token2wav"]
    cfg = Token2WavConfig.from_dict({"dit_config": t["dit"], "bigvgan_config": t["bigvgan"]})
    # the limit (FLOP/s) is given: measuring it is timing
    tf32 = torch.backends.cuda.matmul.allow_tf32
    rows = [G.timed_row(G.jax_timer(cfg, "xla", 1), cfg, 8, "tensorfloat32", 4e11),
            G.timed_row(G.torch_timer(cfg, 1), cfg, 8, "tensorfloat32", 4e11)]
    assert T.MATMUL_PRECISION == "highest" and torch.backends.cuda.matmul.allow_tf32 == tf32
    assert [r["impl"].split()[0] for r in rows] == ["omni_jax", "transformers"]
    assert "TF32 on" in rows[1]["impl"]
    w = G.work(cfg, 8)
    assert w["dit_flops"] == dit_flops(dataclasses.asdict(cfg.dit), 16, 10)["total"]
    assert w["bigvgan_flops"] == bigvgan_flops(dataclasses.asdict(cfg.bigvgan), 16)
    assert w["audio_s"] == pytest.approx(16 * 240 / 24000)
    for r in rows:
        assert r["precision"] == "tensorfloat32" and r["codes"] == 8 and r["dit_s"] > 0 and r["bigvgan_s"] > 0
        assert r["rtf"] == pytest.approx((r["dit_s"] + r["bigvgan_s"]) / w["audio_s"], rel=2e-3)
        assert r["dit_of_limit"] == pytest.approx(w["dit_flops"] / r["dit_s"] / 4e11, rel=1e-3)
        assert r["bigvgan_tflops"] == pytest.approx(w["bigvgan_flops"] / r["bigvgan_s"] / 1e12, rel=1e-3)
        assert r["rtf_at_limit"] == pytest.approx((w["dit_flops"] + w["bigvgan_flops"]) / 4e11 / w["audio_s"],
                                                  rel=1e-3)
    (ratio,) = G.ratios(rows)
    assert ratio["precision"] == "tensorfloat32" and ratio["codes"] == 8
    assert ratio["dit"] == pytest.approx(rows[1]["dit_s"] / rows[0]["dit_s"], rel=1e-2)
    assert ratio["total"] == pytest.approx((rows[1]["dit_s"] + rows[1]["bigvgan_s"])
                                           / (rows[0]["dit_s"] + rows[0]["bigvgan_s"]), rel=1e-2)
    assert G.ratios(rows[:1]) == []  # no transformers row: no ratio


def test_stream_figures_from_events():
    """bench.streaming's figures (used by bench.streaming and bench.gpu_stream) from a made-up
    event sequence: first text / audio, RTF, and the playback check chunk by chunk."""
    import numpy as np

    from bench.streaming import stream_figures
    from omni_jax import StreamEvent

    def audio(t, seconds):
        return StreamEvent("audio", audio=np.zeros(int(seconds * 24000), np.float32), t=t)

    events = [StreamEvent("text", "Hi", [1, 2], t=0.05), audio(0.2, 0.24), StreamEvent("text", "!", [3], t=0.3),
              audio(0.35, 0.24), audio(0.66, 0.5), StreamEvent("done", t=0.7)]
    f = stream_figures(events)
    assert f["time_to_first_text_s"] == 0.05 and f["time_to_first_audio_s"] == 0.2 and f["text_tokens"] == 3
    assert f["audio_s"] == pytest.approx(0.98) and f["rtf"] == pytest.approx(0.7 / 0.98, abs=1e-3)
    # playback from 0.2 s: chunk 2 is due at 0.44 s (0.09 s early), chunk 3 at 0.68 s (0.02 s early)
    assert f["min_slack_s"] == pytest.approx(0.02) and f["ahead_of_playback"] is True and f["start_buffer_s"] == 0
    assert f["chunk_times_s"] == [0.2, 0.35, 0.66] and f["chunk_seconds"] == [0.24, 0.24, 0.5]
    late = stream_figures(events[:4] + [audio(0.71, 0.5), StreamEvent("done", t=0.75)])
    assert late["min_slack_s"] == pytest.approx(-0.03) and late["ahead_of_playback"] is False
    assert late["start_buffer_s"] == pytest.approx(0.03)  # playing from 0.23 s, chunk 3 is due at 0.71 s
    silent = stream_figures([StreamEvent("text", "a", [1], t=0.1), StreamEvent("done", t=0.2)])
    assert silent["time_to_first_audio_s"] is None and silent["rtf"] is None and silent["ahead_of_playback"] is None
    assert silent["start_buffer_s"] is None


def test_bench_results_are_written_atomically(tmp_path):
    """A result that fails to serialise leaves the previous file as it was and no temporary behind;
    ``keep`` carries the named keys of the previous file over."""
    from bench.util import write_json

    out = tmp_path / "r.json"
    write_json(str(out), {"figure": 1, "profile_passes": ["by hand"]})
    with pytest.raises(TypeError):
        write_json(str(out), {"figure": object()})
    assert json.loads(out.read_text()) == {"figure": 1, "profile_passes": ["by hand"]}
    write_json(str(out), {"figure": 2}, keep=("profile_passes", "absent"))
    assert json.loads(out.read_text()) == {"figure": 2, "profile_passes": ["by hand"]}
    write_json(str(out), {"figure": 3})
    assert json.loads(out.read_text()) == {"figure": 3}
    write_json(None, {"figure": 4})  # no path: nothing written
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_paired_alternates_the_sides_and_keeps_each_best():
    """bench.compare times both sides in alternation (machine drift hits both) and keeps each side's best."""
    from bench.compare import _paired

    calls = []
    jx_times, pt_times = iter([3.0, 1.0, 2.0]), iter([5.0, 6.0, 4.0])

    def jx():
        calls.append("jax")
        return next(jx_times)

    def pt():
        calls.append("torch")
        return next(pt_times)

    assert _paired(jx, pt, 3) == (1.0, 4.0)
    assert calls == ["jax", "torch"] * 3


def test_bench_entry_lists_and_dispatches_every_benchmark(capsys):
    """``python -m bench`` lists every benchmark module of the package, each one resolves to a
    module with a ``main``, and an unknown name is one error line and exit 2."""
    import importlib
    import pathlib

    from bench.__main__ import BENCHMARKS, main

    assert main([]) == 0
    listing = capsys.readouterr().out
    here = pathlib.Path(__file__).resolve().parents[1] / "bench"
    modules = {p.stem for p in here.glob("*.py")} - {"__init__", "__main__", "util"}
    assert {m for m, _, _ in BENCHMARKS.values()} == modules  # nothing left out of the entry
    for name, (mod, _, _) in BENCHMARKS.items():
        assert name in listing
        assert callable(importlib.import_module(f"bench.{mod}").main)
    assert main(["no-such-bench"]) == 2
    assert "no benchmark named 'no-such-bench'" in capsys.readouterr().err


def test_bench_json_target_is_checked_before_any_work(tmp_path, capsys, monkeypatch):
    """A ``--json`` path that cannot be written (here a directory) is refused before the benchmark
    runs: its main is never called."""
    import bench.thinker
    from bench.__main__ import main

    called = []
    monkeypatch.setattr(bench.thinker, "main", lambda argv: called.append(argv))
    assert main(["thinker", "--json", str(tmp_path)]) == 2
    assert called == []
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--json" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("how", ["relative", "home", "symlink"])
def test_bench_json_takes_paths_as_typed(tmp_path, monkeypatch, how):
    """``python -m bench NAME --json PATH`` relative to the working directory, under ``~`` (as ``--json=~/x``
    hands it over) and through a symlink to an earlier result: the result is written there, and a symlink
    stays a link to the file it names (the atomic rename used to replace the link itself)."""
    import bench.thinker
    from bench.__main__ import main
    from bench.util import write_json

    monkeypatch.setattr(bench.thinker, "main", lambda argv: write_json(argv[argv.index("--json") + 1], {"x": 1}))
    (tmp_path / "results").mkdir()
    target = tmp_path / "results" / "r.json"
    target.write_text("{}")
    os.symlink(target, tmp_path / "latest.json")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    path = {"relative": "results/r.json", "home": "~/results/r.json", "symlink": "latest.json"}[how]
    assert main(["thinker", "--json", path]) == 0
    assert json.loads(target.read_text()) == {"x": 1}
    assert os.path.islink(tmp_path / "latest.json") and os.readlink(tmp_path / "latest.json") == str(target)
    assert sorted(os.listdir(tmp_path / "results")) == ["r.json"]


def test_realtime_bench_times_both_paths_and_their_ratio(tmp_path, capsys):
    """``bench.realtime`` on the embedded model with a short question sent at once: a real server, one
    warm-up and one timed run of each path; both report a first audio chunk, and the ratio is the chat
    path's median over the realtime path's from the same run."""
    from bench import realtime

    out = tmp_path / "rt.json"
    assert realtime.main(["--seconds", "2.5", "--runs", "1", "--no-pace", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["model"] == "embedded default model" and res["precision"] == "float32"
    assert res["seconds"] == 2.5 and res["runs"] == 1 and res["pace"] is False
    assert len(res["realtime"]) == len(res["chat"]) == 1
    a, b = res["realtime"][0], res["chat"][0]
    assert a["first_audio_s"] > 0 and b["first_audio_s"] > 0 and a["audio_s"] > 0 and b["audio_s"] > 0
    assert res["median"]["realtime"]["first_audio_s"] == a["first_audio_s"]
    assert res["median"]["chat"]["first_audio_s"] == b["first_audio_s"]
    assert res["ratio"]["first_audio"] == round(b["first_audio_s"] / a["first_audio_s"], 3)
    assert res["ratio"]["first_text"] == round(b["first_text_s"] / a["first_text_s"], 3)
    assert 1 <= a["output_tokens"] <= res["max_tokens"] and 1 <= b["output_tokens"] <= res["max_tokens"]
    for key in ("machine", "date", "jax"):
        assert res[key]
    assert "ratio chat / realtime" in capsys.readouterr().out


def test_band_attention_switch_takes_effect_and_is_restored():
    """bench.util.band_attention(False) routes block bands through the dense XLA path (the A/B of the
    vision-window and DiT-length benches) and puts the band path back after."""
    import jax.numpy as jnp
    import numpy as np

    from bench.util import band_attention
    from omni_jax import attention_xla
    from omni_jax.attention_xla import MaskSpec

    mask = MaskSpec(causal=False, block_band=(4, 1, 1))
    assert attention_xla._band_only(mask, 16, 16)
    with band_attention(False):
        assert attention_xla.BAND_PATH is False and not attention_xla._band_only(mask, 16, 16)
        q = jnp.asarray(np.random.RandomState(0).randn(1, 16, 2, 8), jnp.float32)
        dense = attention_xla.xla_attention(q, q, q, mask)
    assert attention_xla.BAND_PATH is True
    band = attention_xla.xla_attention(q, q, q, mask)
    np.testing.assert_allclose(np.asarray(band), np.asarray(dense), rtol=1e-5, atol=1e-6)
