"""One process of the two-process multi-host check (tests/test_sharding.py starts two of these).

Each process has 2 CPU devices; jax.distributed joins them into 4 global devices on 127.0.0.1,
loads the checkpoint onto a data=2 x tensor=2 mesh spanning both processes, runs one sharded
forward and writes the logits (gathered to every process) to OUT."""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
try:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
except Exception:
    pass

import numpy as np  # noqa: E402

ckpt, port, pid, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                           initialization_timeout=120)
assert jax.process_count() == 2 and len(jax.devices()) == 4, (jax.process_count(), jax.devices())

import omni_jax  # noqa: E402

mesh = omni_jax.make_mesh("data=2,tensor=2")
model = omni_jax.load(ckpt, dtype="float32", mesh=mesh)
ids = np.random.RandomState(0).randint(0, 280, (2, 9))
logits = model.thinker_logits(ids)
np.save(out, logits)
jax.distributed.shutdown()
