"""Sharded vs single-device parity on 8 host CPU devices (run by tests/test_sharding.py in a subprocess,
because the device count must be fixed before JAX starts)."""

from __future__ import annotations

import json
import os
import sys
import tempfile

assert "xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", ""), "set XLA_FLAGS"
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import numpy as np  # noqa: E402

import omni_jax  # noqa: E402
from conftest import build_hf_checkpoint, rel_err  # noqa: E402
from omni_jax.sharding import logical_to_spec, param_axes  # noqa: E402
from test_multimodal import _inputs  # noqa: E402

MESHES = ["tensor=2,data=4", "fsdp=8", "tensor=8"]
# the "odd" variant (head and MLP widths that divide no mesh axis) is checked on tensor=8 only:
# replication of the dimensions that do not divide is its point, the other meshes repeat "gqa"
VARIANT_MESHES = {"odd": ["tensor=8"]}


def run(variant: str) -> dict:
    d = tempfile.mkdtemp(prefix=f"omni-md-{variant}-")
    build_hf_checkpoint(d, variant)
    rs = np.random.RandomState(0)
    ids = rs.randint(0, 280, (4, 9))
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    mm_ids, mm_mask, mm, _ = _inputs("audio_image_batch")
    gen_kw = dict(max_new_tokens=8, eos_token_id=[], return_audio=True, talker_do_sample=False,
                  talker_max_new_tokens=12, talker_min_new_tokens=6)
    ref = omni_jax.load(d, dtype="float32")
    ref.token2wav_params = None  # codec ids are compared; the DiT's own sharding is not under test here
    r_text = ref.thinker_logits(ids, mask)
    r_mm = ref.thinker_logits(mm_ids, mm_mask, **mm)
    r_gen = ref.generate(ids, mask, **gen_kw)
    r_gen_mm = ref.generate(mm_ids, mm_mask, **gen_kw, **mm)
    out = {}
    for spec in VARIANT_MESHES.get(variant, MESHES):
        mesh = omni_jax.make_mesh(spec)
        m = omni_jax.load(d, dtype="float32", mesh=mesh)
        m.token2wav_params = None
        res = {"text_err": rel_err(m.thinker_logits(ids, mask), r_text),
               "mm_err": rel_err(m.thinker_logits(mm_ids, mm_mask, **mm), r_mm)}
        g = m.generate(ids, mask, **gen_kw)
        g_mm = m.generate(mm_ids, mm_mask, **gen_kw, **mm)
        res["ids_equal"] = bool(np.array_equal(g.sequences, r_gen.sequences)
                                and np.array_equal(g_mm.sequences, r_gen_mm.sequences))
        res["codes_equal"] = all(np.array_equal(a, b) for a, b in zip(g.codec_ids + g_mm.codec_ids,
                                                                     r_gen.codec_ids + r_gen_mm.codec_ids))
        # every parameter carries the sharding the table gives it
        bad = []
        flat = jax.tree_util.tree_flatten_with_path(m.params)[0]
        for path, leaf in flat:
            p = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
            p = p.replace("/value", "")
            want = logical_to_spec(param_axes(p, leaf.ndim), leaf.shape, mesh)
            got = leaf.sharding.spec
            norm = lambda s: tuple(s) + (None,) * (leaf.ndim - len(tuple(s)))  # noqa: E731
            if norm(got) != norm(want):
                bad.append(f"{p}: {got} != {want}")
        # the jitted entry points declare their output shardings: the KV cache (one buffer per
        # layer, like the weights) over batch and KV heads
        gen = m.prefill(ids, mask, max_new_tokens=4)
        kcs = gen.state.cache["k"]
        if not isinstance(kcs, list) or len(kcs) != len(m.params["layers"]):
            bad.append(f"KV cache: not one buffer per layer ({type(kcs).__name__})")
            kcs = []
        for i, kc in enumerate(kcs):
            want = logical_to_spec(("batch", "cache_seq", "act_kv_heads", None), kc.shape, mesh)
            if tuple(kc.sharding.spec) + (None,) * (kc.ndim - len(kc.sharding.spec)) != \
                    tuple(want) + (None,) * (kc.ndim - len(want)):
                bad.append(f"KV cache layer {i}: {kc.sharding.spec} != {want}")
        m.decode_steps(gen, 2)
        for i, (kc, after) in enumerate(zip(kcs, gen.state.cache["k"])):
            if after.sharding != kc.sharding:
                bad.append(f"KV cache layer {i} after decode: {after.sharding.spec} != {kc.sharding.spec}")
        res["sharding_mismatches"] = bad
        q = m.params["layers"][0]["self_attn"]["q_proj"]["kernel"][...]
        res["q_proj_spec"] = str(q.sharding.spec)
        out[spec] = res
    return out


if __name__ == "__main__":
    print(json.dumps({v: run(v) for v in sys.argv[1:] or ["gqa", "odd"]}))
