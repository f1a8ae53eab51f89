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
from jax.sharding import NamedSharding  # noqa: E402

import omni_jax  # noqa: E402
from train.trainer import Options, Trainer  # noqa: E402

MESHES = ["fsdp=8", "data=2,tensor=4"]


def trained(data, out, mesh):
    o = Options(model=omni_jax.default_model_path(), data=data, out=out, steps=2, batch_size=4, grad_accum=2, lr=3e-3,
                dtype="float32", max_length=64, save_model=False, progress=False, mesh=mesh)
    tr = Trainer(o)
    losses = [tr.train_step()["loss"] for _ in range(2)]
    flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tr.trainable)[0]}
    sharded = sum(1 for x in jax.tree.leaves(tr.trainable)
                  if isinstance(x.sharding, NamedSharding) and any(a is not None for a in x.sharding.spec))
    return np.asarray(losses), flat, sharded


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
