"""Peak device memory of a long thinker prefill (the target: 25k tokens at 3B under 14 GB).

    python -m bench gpu_memory [--preset 3b] [--tokens 25000] [--attention pallas] [--json out.json]

Random weights at the published shape (``bench.__main__.random_model``), bfloat16, one row of
``--tokens`` random ids, ``model.prefill(ids, max_new_tokens=8)`` then one decode step. Reports
the allocator's peak (``peak_bytes_in_use``), which also covers parameter initialisation (the
largest parameter's float32 draw on top of the bfloat16 parameters): the prefill's own peak is
at most the reported figure. Also the prefill's wall time after a compiling run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

from .util import write_json


def _stats():
    try:
        return jax.devices()[0].memory_stats() or {}
    except Exception:
        return {}


def run(preset="3b", tokens=25000, attention="pallas", dtype="bfloat16") -> dict:
    os.environ["OMNI_JAX_ATTENTION"] = attention
    from bench.__main__ import random_model

    t0 = time.perf_counter()
    model = random_model(preset, dtype)
    jax.block_until_ready(model.params)
    init_s = time.perf_counter() - t0
    after_init = _stats()
    pbytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(model.params))
    vocab = model.config.thinker.text.vocab_size
    ids = np.random.RandomState(0).randint(0, vocab, (1, tokens))
    t0 = time.perf_counter()
    gen = model.prefill(ids, max_new_tokens=8)
    jax.block_until_ready(gen.state.tokens)
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    gen = model.prefill(ids, max_new_tokens=8)
    jax.block_until_ready(gen.state.tokens)
    prefill_s = time.perf_counter() - t0
    model.decode_steps(gen, 2)
    jax.block_until_ready(gen.state.tokens)
    st = _stats()
    gib = 2 ** 30
    return dict(device=str(jax.devices()[0].device_kind), backend=jax.default_backend(), jax=jax.__version__,
                date=time.strftime("%Y-%m-%d"), preset=preset, dtype=dtype, attention=attention, tokens=tokens,
                command=f"python -m bench gpu_memory --preset {preset} --tokens {tokens} --attention {attention}",
                param_GiB=round(pbytes / gib, 3), init_s=round(init_s, 1),
                peak_after_init_GiB=round(after_init.get("peak_bytes_in_use", -1) / gib, 3),
                peak_GiB=round(st.get("peak_bytes_in_use", -1) / gib, 3),
                in_use_after_GiB=round(st.get("bytes_in_use", -1) / gib, 3),
                first_prefill_s=round(first_s, 2), prefill_s=round(prefill_s, 3),
                prefill_tok_s=round(tokens / prefill_s, 1), target_GiB=14 * 1e9 / gib)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench gpu_memory")
    p.add_argument("--preset", default="3b")
    p.add_argument("--tokens", type=int, default=25000)
    p.add_argument("--attention", default="pallas")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    res = run(a.preset, a.tokens, a.attention, a.dtype)
    print(json.dumps(res), flush=True)
    write_json(a.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
