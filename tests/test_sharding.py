"""Sharding: logical-axis table, non-dividing sizes, and sharded == single-device on 8 host devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from omni_jax.errors import InputError
from omni_jax.sharding import as_auto_mesh, logical_to_spec, make_mesh, outside_context_mesh, param_axes


class FakeMesh:
    def __init__(self, **shape):
        self.shape = shape


def test_table_and_fallback_rule():
    mesh = FakeMesh(data=2, fsdp=1, tensor=4)
    assert param_axes("layers/self_attn/q_proj/kernel", 3) == ("layers", "embed", "heads")
    assert param_axes("layers/mlp/down_proj/kernel", 3) == ("layers", "mlp", "embed")
    assert param_axes("lm_head/kernel", 2) == ("embed", "vocab")
    # the encoders' projections: the audio MLP and the vision blocks shard like the decoder's
    assert param_axes("thinker/audio_tower/layers/fc1/kernel", 3) == ("layers", "embed", "mlp")
    assert param_axes("thinker/audio_tower/layers/fc2/kernel", 3) == ("layers", "mlp", "embed")
    assert param_axes("visual/blocks/attn/q/kernel", 3) == ("layers", "embed", "heads")
    assert param_axes("visual/blocks/attn/proj/kernel", 3) == ("layers", "heads", "embed")
    assert param_axes("visual/blocks/mlp/up_proj/bias", 2) == ("layers", "mlp")
    assert param_axes("visual/blocks/mlp/down_proj/kernel", 3) == ("layers", "mlp", "embed")
    # Token2Wav's DiT blocks (paths under token2wav/, both layouts) shard like the decoder's; BigVGAN's residual
    # pairs over their channels (the first convolution's output, the activation between, the second's input)
    assert param_axes("token2wav/code2wav_bigvgan_model/resblocks/3/convs1/1/weight", 3) == ("mlp", None, None)
    assert param_axes("token2wav/code2wav_bigvgan_model/resblocks/3/activations/3/act/alpha", 1) == ("mlp",)
    assert param_axes("token2wav/code2wav_bigvgan_model/resblocks/3/activations/2/act/alpha", 1) == (None,)
    assert param_axes("token2wav/code2wav_bigvgan_model/resblocks/3/convs2/1/weight", 3) == (None, "mlp", None)
    assert param_axes("token2wav/code2wav_dit_model/transformer_blocks/attn/to_q/kernel", 3) == \
        ("layers", "embed", "heads")
    assert param_axes("token2wav/code2wav_dit_model/transformer_blocks/0/attn/to_out/0/kernel", 2) == ("heads", "embed")
    assert param_axes("dit/transformer_blocks/attn/to_q/kernel", 3) == (None, None, None)  # outside token2wav/
    assert logical_to_spec(("layers", "embed", "heads"), (2, 64, 64), mesh) == P(None, None, "tensor")
    # 3 heads x 20 = 60 columns do not divide tensor=8: replicated on that axis
    assert logical_to_spec(("layers", "embed", "heads"), (2, 60, 60), FakeMesh(tensor=8)) == P(None, None, None)
    assert logical_to_spec(("layers", "embed", "heads"), (2, 60, 60), mesh) == P(None, None, "tensor")
    # batch maps to (data, fsdp); fsdp has size 1 and is dropped
    assert logical_to_spec(("batch", None), (8, 3), mesh) == P("data", None)
    assert logical_to_spec(("batch", None), (3, 3), mesh) == P(None, None)
    # a user table overrides the default
    assert logical_to_spec(("vocab",), (300,), FakeMesh(data=2, tensor=1), {"vocab": "data"}) == P("data")


def test_user_meshes_become_auto_meshes():
    """Explicit and mixed axis types become Auto on the same devices and axes; Auto passes through."""
    auto = (AxisType.Auto, AxisType.Auto)
    for types in [(AxisType.Explicit, AxisType.Explicit), (AxisType.Explicit, AxisType.Auto), None]:
        user = jax.make_mesh((1, 1), ("data", "tensor"), axis_types=types)
        m = as_auto_mesh(user)
        assert m.axis_names == ("data", "tensor") and tuple(m.axis_types) == auto, types
        assert m.devices.tolist() == user.devices.tolist()
    assert jax.make_mesh((1,), ("data",)).axis_types == (AxisType.Explicit,)  # JAX's default here
    ours = make_mesh("tensor=1")
    assert as_auto_mesh(ours) is ours and set(ours.axis_types) == {AxisType.Auto}
    assert as_auto_mesh(None) is None
    assert as_auto_mesh("fsdp=1").shape == {"data": 1, "fsdp": 1, "tensor": 1}
    with pytest.raises(InputError, match=r"mesh axis names \['x'\]"):
        as_auto_mesh(jax.make_mesh((1,), ("x",)))
    with pytest.raises(InputError, match="expected a jax.sharding.Mesh"):
        as_auto_mesh(jax.devices())


def test_library_calls_clear_the_callers_context_mesh():
    """Inside ``jax.set_mesh`` the library runs with no context mesh; the caller's is back after each
    call and between the items of a generator."""
    seen = []

    @outside_context_mesh
    def f():
        seen.append(jax.sharding.get_abstract_mesh().empty)
        return 1

    @outside_context_mesh
    def g():
        for i in range(2):
            seen.append(jax.sharding.get_abstract_mesh().empty)
            yield i

    @outside_context_mesh
    class C:
        def m(self):
            return jax.sharding.get_abstract_mesh().empty

        @property
        def p(self):
            return jax.sharding.get_abstract_mesh().empty

    mesh = jax.make_mesh((1,), ("data",))
    with jax.set_mesh(mesh):
        assert f() == 1
        between = []
        for _ in g():
            between.append(jax.sharding.get_abstract_mesh() == mesh.abstract_mesh)
        assert C().m() and C().p
        assert jax.sharding.get_abstract_mesh() == mesh.abstract_mesh
    assert seen == [True, True, True] and between == [True, True]


def test_sharded_equals_single_device_on_8_host_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    here = os.path.dirname(__file__)
    r = subprocess.run([sys.executable, os.path.join(here, "multidevice_check.py"), "gqa", "odd"], env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    for variant, meshes in res.items():
        for spec, m in meshes.items():
            where = f"{variant} {spec}"
            assert m["text_err"] <= 1e-5, where
            assert m["mm_err"] <= 1e-5, where
            assert m["ids_equal"], where
            assert m["codes_equal"], where
            assert m["sharding_mismatches"] == [], where
            assert m["auto_mesh"], where
            assert m["loss_rel"] <= 1e-5, where
            assert m["stream_equal"], where
    # jax.make_mesh's Explicit-axis mesh, and every entry point inside `with jax.set_mesh(...)`
    assert "explicit data=4,tensor=2" in res["gqa"] and "fsdp=8" in res["gqa"]
    sm = res["gqa"]["explicit data=4,tensor=2"]["set_mesh"]
    assert sm["text_err"] <= 1e-5 and sm["mm_err"] <= 1e-5 and sm["loss_rel"] <= 1e-5, sm
    assert sm["wav_err"] <= 1e-5, sm
    assert sm["dit_q_spec"] == str(P(None, "tensor")), sm  # loaded from the HF directory, placed by the rules
    assert sm["bigvgan_conv_spec"] == str(P("tensor", None, None)), sm  # a residual pair's first convolution
    assert sm["ids_equal"] and sm["codes_equal"] and sm["stream_equal"], sm
    assert sm["context_kept"] and sm["user_code"] and sm["load_equal"], sm
    assert res["gqa"]["explicit data=4,tensor=2"]["serve_equal"]
    assert res["gqa"]["explicit data=4,tensor=2"]["q_proj_spec"] == str(P(None, "tensor"))
    # layer 0's q_proj of the per-layer inference layout: the stacked rule without the layer axis
    assert res["gqa"]["tensor=8"]["q_proj_spec"] == str(P(None, "tensor"))
    assert res["odd"]["tensor=8"]["q_proj_spec"] == str(P(None, None))  # 60 columns: replicated
    assert res["gqa"]["fsdp=8"]["q_proj_spec"] == str(P("fsdp", None))


def test_two_processes_on_localhost_equal_one(hf_models, jax_model, tmp_path):
    """jax.distributed over 127.0.0.1: 2 processes x 2 CPU devices, one sharded forward."""
    import socket

    import numpy as np

    d, _ = hf_models("gqa")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    here = os.path.dirname(__file__)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, os.path.join(here, "multihost_check.py"), d, str(port), str(i),
                               str(tmp_path / f"out{i}.npy")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=300)
        finally:
            p.kill()
        logs.append(out)
    assert all(p.returncode == 0 for p in procs), "\n".join(x[-2000:] for x in logs)
    ref = jax_model("gqa").thinker_logits(np.random.RandomState(0).randint(0, 280, (2, 9)))
    for i in range(2):
        np.testing.assert_allclose(np.load(tmp_path / f"out{i}.npy"), ref, rtol=1e-5, atol=1e-5)
