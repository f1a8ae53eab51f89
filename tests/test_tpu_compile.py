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
