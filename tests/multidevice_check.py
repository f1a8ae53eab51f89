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
from jax.sharding import AxisType, NamedSharding, PartitionSpec  # noqa: E402

import omni_jax  # noqa: E402
from conftest import build_hf_checkpoint, rel_err  # noqa: E402
from omni_jax.sharding import logical_to_spec, param_axes  # noqa: E402
from test_multimodal import _inputs  # noqa: E402

# "explicit": jax.make_mesh's default mesh (Explicit axis types, no fsdp axis); the others are
# omni_jax.make_mesh specs (Auto axes)
EXPLICIT = "explicit data=4,tensor=2"
MESHES = [EXPLICIT, "fsdp=8", "tensor=8"]
# the "odd" variant (head and MLP widths that divide no mesh axis) is checked on tensor=8 only:
# replication of the dimensions that do not divide is its point, the other meshes repeat "gqa"
VARIANT_MESHES = {"odd": ["tensor=8"]}


def build_mesh(spec: str):
    if spec == EXPLICIT:
        mesh = jax.make_mesh((4, 2), ("data", "tensor"))
        assert set(mesh.axis_types) == {AxisType.Explicit}, mesh.axis_types  # what the check is about
        return mesh
    return omni_jax.make_mesh(spec)


def stream_ids(model, ids, mask, **kw):
    """The reply ids of model.stream (one conversation) and whether every event came back as numpy
    and with the caller's context mesh in place between events."""
    ctx = jax.sharding.get_abstract_mesh()
    got, ok = [], True
    for ev in model.stream(ids, mask, **kw):
        ok &= jax.sharding.get_abstract_mesh() == ctx
        ok &= ev.audio is None or type(ev.audio) is np.ndarray
        if ev.kind == "done":
            got = list(ev.token_ids)
    return got, ok


def served_ids(model, ids, mask):
    """The reply ids of one greedy request through the serving engine (continuous batching)."""
    from omni_jax.serve import Engine, ServeLimits
    from omni_jax.serve.scheduler import GenParams, ServeRequest

    engine = Engine(model, ServeLimits(max_batch=2, max_tokens=8, max_prompt_tokens=16, steps_per_call=4)).start()
    events = []
    try:
        req = ServeRequest(inputs={"input_ids": ids, "attention_mask": mask}, sink=events.append,
                           params=GenParams(max_tokens=8, do_sample=False, ignore_eos=True))
        engine.submit(req)
        assert req.finished.wait(300), events
    finally:
        engine.stop()
    done = [p for k, p in events if k == "done"]
    assert done, events
    return done[0]["token_ids"]


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
    t2w = ref.token2wav_params
    ref.token2wav_params = None  # codec ids are compared; the DiT's own sharding is not under test here
    r_text = ref.thinker_logits(ids, mask)
    r_mm = ref.thinker_logits(mm_ids, mm_mask, **mm)
    r_gen = ref.generate(ids, mask, **gen_kw)
    r_gen_mm = ref.generate(mm_ids, mm_mask, **gen_kw, **mm)
    labels = np.where(mask == 1, ids, -100)
    r_loss = ref.loss(ids, labels, mask)
    r_stream, _ = stream_ids(ref, ids[:1], mask[:1], max_new_tokens=8, eos_token_id=[])
    assert len(r_stream) == 8, r_stream
    codes = r_gen.codec_ids[0]
    noise = rs.standard_normal((2 * len(codes), ref.config.token2wav.dit.mel_dim)).astype(np.float32)
    ref.token2wav_params = t2w
    r_wav = ref.token2wav(codes, noise=noise) if variant == "gqa" else None
    ref.token2wav_params = None
    out = {}
    for spec in VARIANT_MESHES.get(variant, MESHES):
        mesh = build_mesh(spec)
        m = omni_jax.load(d, dtype="float32", mesh=mesh)
        m.token2wav_params = None
        logits = m.thinker_logits(ids, mask)
        res = {"text_err": rel_err(logits, r_text),
               "mm_err": rel_err(m.thinker_logits(mm_ids, mm_mask, **mm), r_mm),
               # the model computes on the user's devices and axes with Auto axis types; results are numpy
               "auto_mesh": (m.mesh.devices.tolist() == mesh.devices.tolist() and m.mesh.axis_names == mesh.axis_names
                             and set(m.mesh.axis_types) == {AxisType.Auto} and type(logits) is np.ndarray)}
        g = m.generate(ids, mask, **gen_kw)
        g_mm = m.generate(mm_ids, mm_mask, **gen_kw, **mm)
        res["ids_equal"] = bool(np.array_equal(g.sequences, r_gen.sequences)
                                and np.array_equal(g_mm.sequences, r_gen_mm.sequences))
        res["codes_equal"] = all(np.array_equal(a, b) for a, b in zip(g.codec_ids + g_mm.codec_ids,
                                                                     r_gen.codec_ids + r_gen_mm.codec_ids))
        res["loss_rel"] = abs(m.loss(ids, labels, mask) - r_loss) / abs(r_loss)
        s_ids, s_ok = stream_ids(m, ids[:1], mask[:1], max_new_tokens=8, eos_token_id=[])
        res["stream_equal"] = s_ids == r_stream and s_ok
        if spec == EXPLICIT:
            res["serve_equal"] = served_ids(m, ids[:1], mask[:1]) == r_stream
            res["set_mesh"] = under_set_mesh(d, mesh, m, ids, mask, labels, mm_ids, mm_mask, mm, gen_kw, r_text, r_mm,
                                             r_gen, r_gen_mm, r_loss, r_stream, codes, noise, r_wav)
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


def under_set_mesh(d, mesh, m, ids, mask, labels, mm_ids, mm_mask, mm, gen_kw, r_text, r_mm, r_gen, r_gen_mm, r_loss,
                   r_stream, codes, noise, r_wav) -> dict:
    """Every entry point called inside ``with jax.set_mesh(mesh)`` (current JAX's idiom): the same
    results, and the caller's context mesh in place afterwards. ``load`` runs there too; the calls go
    to ``m``, the model loaded outside, whose programs are compiled already (the same parameters)."""
    with jax.set_mesh(mesh):
        inside = omni_jax.load(d, dtype="float32", mesh=mesh)
        wav = inside.token2wav(codes, noise=noise)  # the vocoder too (the DiT's blocks sharded over tensor)
        q = inside.token2wav_params.code2wav_dit_model.transformer_blocks[0].attn.to_q.kernel[...]
        c1 = inside.token2wav_params.code2wav_bigvgan_model.resblocks[0].convs1[0].weight[...]
        same = jax.tree.map(lambda a, b: a.sharding == b.sharding and np.array_equal(a, b), inside.params, m.params)
        g = m.generate(ids, mask, **gen_kw)
        g_mm = m.generate(mm_ids, mm_mask, **gen_kw, **mm)
        s_ids, s_ok = stream_ids(m, ids[:1], mask[:1], max_new_tokens=8, eos_token_id=[])
        res = {"text_err": rel_err(m.thinker_logits(ids, mask), r_text),
               "mm_err": rel_err(m.thinker_logits(mm_ids, mm_mask, **mm), r_mm),
               "ids_equal": bool(np.array_equal(g.sequences, r_gen.sequences)
                                 and np.array_equal(g_mm.sequences, r_gen_mm.sequences)),
               "codes_equal": all(np.array_equal(a, b) for a, b in zip(g.codec_ids + g_mm.codec_ids,
                                                                      r_gen.codec_ids + r_gen_mm.codec_ids)),
               "loss_rel": abs(m.loss(ids, labels, mask) - r_loss) / abs(r_loss),
               "stream_equal": s_ids == r_stream and s_ok,
               "wav_err": rel_err(wav, r_wav), "dit_q_spec": str(q.sharding.spec),
               "bigvgan_conv_spec": str(c1.sharding.spec),
               "load_equal": all(jax.tree.leaves(same)),
               "context_kept": jax.sharding.get_abstract_mesh() == mesh.abstract_mesh}
        # numpy results mix freely with the caller's Explicit-mesh code
        x = jax.device_put(m.thinker_logits(ids, mask), NamedSharding(mesh, PartitionSpec("data")))
        res["user_code"] = bool(np.isfinite(float(jax.jit(lambda a: (a * 2).sum())(x))))
    return res


if __name__ == "__main__":
    print(json.dumps({v: run(v) for v in sys.argv[1:] or ["gqa", "odd"]}))
