"""Train steps on 8 host CPU devices vs one device (run by tests/test_train.py in a subprocess,
because the device count must be fixed before JAX starts). Prints one JSON line."""

from __future__ import annotations

import json
import os
import sys

assert "xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", ""), "set XLA_FLAGS"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402

import omni_jax  # noqa: E402
from omni_jax.training import make_batch, model_params, train_loss  # noqa: E402
# run as a script (sys.path[0] is tests/, not the repo root): the trainer by its installed name
from omni_jax.train.trainer import Options, Trainer  # noqa: E402

# "fsdp=8": an omni_jax.make_mesh spec (Auto axes); "explicit data=2,tensor=4": jax.make_mesh's default
# mesh (Explicit axes, no fsdp axis) handed to Options as a Mesh, the trainer built and stepped inside
# `with jax.set_mesh(mesh)`
EXPLICIT = "explicit data=2,tensor=4"
MESHES = ["fsdp=8", EXPLICIT]


def trained(data, out, mesh):
    o = Options(model=omni_jax.default_model_path(), data=data, out=out, steps=2, batch_size=4, grad_accum=2, lr=3e-3,
                dtype="float32", max_length=64, save_model=False, progress=False, mesh=mesh)
    if mesh == EXPLICIT:
        user = jax.make_mesh((2, 4), ("data", "tensor"))
        assert set(user.axis_types) == {AxisType.Explicit}, user.axis_types
        o.mesh = user
        with jax.set_mesh(user):
            tr = Trainer(o)
            losses = [tr.train_step()["loss"] for _ in range(2)]
            assert jax.sharding.get_abstract_mesh() == user.abstract_mesh  # the caller's context is back
        # the trainer computes on the same devices and axes with Auto axis types
        assert tr.mesh.devices.tolist() == user.devices.tolist() and tr.mesh.axis_names == user.axis_names
        assert set(tr.mesh.axis_types) == {AxisType.Auto}
        with open(os.path.join(out, "run.json"), encoding="utf-8") as f:
            assert json.load(f)["mesh"] == "data=2,tensor=4"
        train_loss_on(omni_jax.load(o.model, dtype="float32", mesh=user), user)  # the trainer's holds donated buffers
    else:
        tr = Trainer(o)
        losses = [tr.train_step()["loss"] for _ in range(2)]
    flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tr.trainable)[0]}
    sharded = sum(1 for x in jax.tree.leaves(tr.trainable)
                  if isinstance(x.sharding, NamedSharding) and any(a is not None for a in x.sharding.spec))
    return np.asarray(losses), flat, sharded


def train_loss_on(model, user):
    """omni_jax.train_loss under the caller's own jax.jit: parameters on the model's Auto mesh and
    moved to the caller's Explicit one, inside and outside ``jax.set_mesh``, equal one device."""
    rs = np.random.RandomState(1)
    ids = rs.randint(0, 200, (4, 12))
    mask = np.ones_like(ids)
    mask[0, :2] = 0
    batch = make_batch(model.config, ids, mask, np.where(mask == 1, ids, -100))
    auto = {"thinker": model_params(model)["thinker"]}
    explicit = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(user, x.sharding.spec)), auto)
    host = jax.tree.map(np.asarray, auto)

    def loss(p, b):
        return train_loss(p, b, model.config)[0]

    ref = float(jax.jit(loss)(host, batch))
    ref_g = jax.tree.leaves(jax.jit(jax.grad(loss))(host, batch))
    got = [float(jax.jit(loss)(auto, batch)), float(jax.jit(loss)(explicit, batch))]
    with jax.set_mesh(user):
        got += [float(jax.jit(loss)(auto, batch)), float(jax.jit(loss)(explicit, batch))]
        g = jax.jit(jax.grad(loss))(explicit, batch)
        assert all(x.sharding.mesh == user for x in jax.tree.leaves(g))  # gradients where the parameters are
        g = jax.tree.leaves(jax.tree.map(np.asarray, g))
    for x in got:
        assert abs(x - ref) <= 1e-5 * abs(ref), (got, ref)
    num = sum(float(np.sum((a - b) ** 2)) for a, b in zip(g, ref_g))
    assert np.sqrt(num / sum(float(np.sum(b ** 2)) for b in ref_g)) <= 1e-5


def main():
    data, tmp = sys.argv[1], sys.argv[2]
    assert len(jax.devices()) == 8
    ref_l, ref_p, _ = trained(data, os.path.join(tmp, "single"), None)
    out = {}
    for mesh in MESHES:
        l, p, sharded = trained(data, os.path.join(tmp, mesh.replace(",", "_")), mesh)
        keys = sorted(ref_p)
        assert keys == sorted(p)
        num = sum(float(np.sum((p[k] - ref_p[k]) ** 2)) for k in keys)
        den = sum(float(np.sum(ref_p[k] ** 2)) for k in keys)
        out[mesh] = {"loss_rel": float(np.max(np.abs(l - ref_l) / np.abs(ref_l))),
                     "param_rel": float(np.sqrt(num / den)), "sharded_params": sharded}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
