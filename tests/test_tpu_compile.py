"""Ahead-of-time TPU compilation from this CPU host (libtpu, in the test extra).

The embedded tiny model's thinker prefill, decode loop, talker prefill and decode loop, and DiT
ODE solve are compiled for a ``v5e:2x2`` topology (4 chips, mesh ``tensor=4``) with the Pallas
attention kernels, by the real XLA:TPU and Mosaic compilers, from abstract inputs
(:mod:`bench.tpu`). Each must compile, hold one Mosaic kernel per attention layer in its compiled
text (so the kernels were lowered for the TPU, not interpreted or dropped), take at least its
parameters' per-chip bytes as arguments, and fit a v5e chip's 16 GiB.
"""

from __future__ import annotations

import os

import pytest

# before libtpu starts in this process: no TPU VM metadata query, no exclusive libtpu lockfile
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


@pytest.fixture(scope="module")
def tpu():
    from bench import tpu as bt

    try:
        bt.require_libtpu()
    except RuntimeError as e:
        pytest.fail(str(e))
    import jax.numpy as jnp

    from omni_jax.default_model import default_config

    mesh = bt.topology_mesh("v5e:2x2", "tensor=4")
    cfg = default_config()
    return bt, cfg, mesh, bt.Builder(cfg, mesh, jnp.float32, impl="pallas")


def _check(bt, builder, program, part: str, layers: int):
    chip = bt.CHIPS["v5e"]
    r = bt.compile_program(program, builder.mesh, chip)
    assert r["pallas_kernels"] == layers, (program.name, r["pallas_kernels"])
    params = bt.per_chip_bytes(builder.part(part)[1])
    assert r["arg_bytes"] >= params > 0, (program.name, r["arg_bytes"], params)
    assert r["total_bytes"] <= chip.hbm and r["fits"]
    assert r["flops"] > 0 and r["bytes_accessed"] > 0
    return r


def test_thinker_prefill_and_decode_compile_for_v5e(tpu):
    bt, cfg, mesh, b = tpu
    assert [d.device_kind for d in mesh.devices.flat] == ["TPU v5 lite"] * 4
    n = cfg.thinker.text.num_hidden_layers
    pre = _check(bt, b, b.prefill(128, 64), "thinker", n)
    dec = _check(bt, b, b.decode(1, 256), "thinker", n)
    # the prefill's output is the decode state: its KV cache (256 slots) is part of decode's arguments
    assert dec["arg_bytes"] > pre["arg_bytes"] - pre["out_bytes"]


def test_talker_compiles_for_v5e(tpu):
    bt, cfg, mesh, b = tpu
    n = cfg.talker.num_hidden_layers
    pre = _check(bt, b, b.talker_prefill(128, 64), "talker", n)
    dec = _check(bt, b, b.talker_decode(128, 64), "talker", n)
    assert pre["pallas_kernels"] == dec["pallas_kernels"] == n  # one kernel per talker layer in each


def test_dit_solve_compiles_for_v5e(tpu):
    bt, cfg, mesh, b = tpu
    r = _check(bt, b, b.dit(36, "first chunk"), "dit", cfg.token2wav.dit.num_hidden_layers)
    assert r["f32_highest"]


def test_fits_takes_each_program_from_its_newest_compile():
    """``--fits`` over overlapping result files: a program recompiled into a newer file supersedes its
    older figures (and only those), and the resident bytes are the newest file's."""
    from bench import tpu as bt

    gib = bt.GiB
    chip = {"hbm": 16 * gib}

    def res(date, resident, *programs):
        return {"date": date, "preset": "3b", "topology": "v5e:2x2", "mesh": "tensor=4", "chip": chip,
                "resident_bytes_per_chip": resident,
                "programs": [{"name": n, "kind": k, "tokens": t, "total_bytes": g * gib} for n, k, t, g in programs]}

    old = res("2026-12-02", {"thinker": 2 * gib, "vision": 3 * gib},
              ("prefill 32768", "prefill", 32768, 4.0), ("decode b32 ctx 4096", "decode", 32, 12.0))
    new = res("2026-12-04", {"thinker": 2 * gib, "vision": 1 * gib}, ("decode b32 ctx 4096", "decode", 32, 3.0))
    for files in ([old, new], [new, old]):  # the date decides, not the order
        (row,) = bt.fits(files, ["old.json", "new.json"] if files[0] is old else ["new.json", "old.json"])
        assert row["others_gib"] == 1.0 and row["resident_from"] == "new.json"
        assert row["largest_prompt"] == 32768 and row["prefill_total_gib"] == 5.0 and row["prefill_from"] == "old.json"
        assert row["largest_decode_batch"] == 32 and row["decode_total_gib"] == 4.0 and row["decode_from"] == "new.json"


def test_collectives_are_counted_from_the_compiled_text():
    from bench import tpu as bt

    text = "\n".join([
        "  %all-reduce.1 = f32[1,480,768]{2,1,0:T(8,128)} all-reduce(f32[1,480,768]{2,1,0} %fusion.3), channel_id=1",
        "  %ars = f32[2,3]{1,0} all-reduce-start(f32[2,3]{1,0} %x), channel_id=2",
        "  %ard = f32[2,3]{1,0} all-reduce-done(f32[2,3]{1,0} %ars)",
        "  %ags = (bf16[1,64]{1,0}, bf16[4,64]{1,0}) all-gather-start(bf16[1,64]{1,0} %y), dimensions={0}",
        "  %agd = bf16[4,64]{1,0} all-gather-done(%ags)",
        "  %add = f32[2,3]{1,0} add(f32[2,3]{1,0} %a, f32[2,3]{1,0} %b)"])
    assert bt.count_collectives(text) == {"all-reduce": {"count": 2, "bytes": 4 * 480 * 768 + 4 * 6},
                                          "all-gather": {"count": 1, "bytes": 2 * 4 * 64}}
