"""The thinker language model against transformers (float32, highest matmul precision)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TEXT_VARIANTS, VOCAB, rel_err

VARIANTS = list(TEXT_VARIANTS)


def _batch(seed=0, b=3, t=13):
    rs = np.random.RandomState(seed)
    ids = rs.randint(0, VOCAB, (b, t)).astype(np.int64)
    mask = np.ones((b, t), np.int64)
    if b > 1:
        mask[1, :4] = 0  # left padding
    if b > 2:
        mask[2, :1] = 0
    return ids, mask


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers(variant, hf_models, jax_model):
    _, tm = hf_models(variant)
    model = jax_model(variant)
    ids, mask = _batch()
    got = model.thinker_logits(ids, mask)
    with torch.no_grad():
        ref = tm.thinker(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    assert got.shape == ref.shape and got.dtype == np.float32
    for b in range(ids.shape[0]):
        v = mask[b].astype(bool)
        assert rel_err(got[b][v], ref[b][v]) <= 1e-4
    # logits_to_keep gives the last positions of the same numbers
    last = model.thinker_logits(ids, mask, logits_to_keep=2)
    assert last.shape == (3, 2, VOCAB)
    np.testing.assert_allclose(last, got[:, -2:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["gqa", "hd32_kv1"])
def test_hand_built_3d_position_ids(variant, hf_models, jax_model):
    """Different temporal/height/width streams: only a correct mrope_section split matches."""
    _, tm = hf_models(variant)
    model = jax_model(variant)
    rs = np.random.RandomState(1)
    b, t = 2, 12
    ids = rs.randint(0, VOCAB, (b, t)).astype(np.int64)
    base = np.arange(t)
    pos = np.stack([base * 5, (base * 13) % 29 + 50, (base * 7) % 17 + 200])[:, None, :].repeat(b, 1)
    pos[:, 1] += rs.randint(0, 40, (3, t))
    got = model.thinker_logits(ids, position_ids=pos)
    with torch.no_grad():
        ref = tm.thinker(input_ids=torch.tensor(ids), attention_mask=torch.ones(b, t, dtype=torch.long),
                         position_ids=torch.tensor(pos)).logits.numpy()
    assert rel_err(got, ref) <= 1e-4
    # and they really differ from text positions (the test can tell a wrong split)
    plain = model.thinker_logits(ids)
    assert rel_err(plain, ref) > 1e-3
    swapped = model.thinker_logits(ids, position_ids=pos[[0, 2, 1]])  # height/width streams exchanged
    assert rel_err(swapped, ref) > 1e-3


def _margins(scores):
    top2 = np.sort(np.stack([s.numpy() for s in scores], 1), axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]


@pytest.mark.parametrize("variant", ["gqa", "mha_tied"])
@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_generation_identical(variant, penalty, hf_models, jax_model):
    _, tm = hf_models(variant)
    model = jax_model(variant)
    ids, mask = _batch(seed=3, b=1, t=9)
    n = 20
    with torch.no_grad():
        ref = tm.thinker.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, repetition_penalty=penalty, eos_token_id=None,
                                  pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    assert _margins(ref.scores).min() > 1e-4, "near-tied reference logits: pick another seed"
    out = model.generate(ids, mask, max_new_tokens=n, repetition_penalty=penalty, eos_token_id=[])
    assert out.sequences.shape == (1, 9 + n)
    np.testing.assert_array_equal(out.sequences, ref.sequences.numpy())


def test_eos_stops_each_row_and_pads(jax_model):
    model = jax_model("gqa")
    ids, mask = _batch(seed=4)
    free = model.generate(ids, mask, max_new_tokens=12, eos_token_id=[])
    new = free.sequences[:, ids.shape[1]:]
    eos = int(new[0, 3])  # row 0 emits this token at step 3: make it the EOS
    out = model.generate(ids, mask, max_new_tokens=12, eos_token_id=eos)
    got = out.sequences[:, ids.shape[1]:]
    first = int(np.argmax(new[0] == eos))
    np.testing.assert_array_equal(got[0, :first + 1], new[0, :first + 1])
    assert (got[0, first + 1:] == model.generation_config["pad_token_id"]).all()
    for r in range(1, 3):  # other rows run on unchanged until their own EOS
        hit = np.nonzero(new[r] == eos)[0]
        stop = hit[0] + 1 if len(hit) else got.shape[1]
        np.testing.assert_array_equal(got[r, :stop], new[r, :stop])


def test_batched_with_padding_equals_unbatched(jax_model):
    model = jax_model("hd32_kv1")
    rs = np.random.RandomState(5)
    prompts = [rs.randint(0, VOCAB, n) for n in (5, 11, 8)]
    t = max(len(p) for p in prompts)
    ids = np.zeros((3, t), np.int64)
    mask = np.zeros((3, t), np.int64)
    for i, p in enumerate(prompts):
        ids[i, t - len(p):] = p
        mask[i, t - len(p):] = 1
    batched = model.generate(ids, mask, max_new_tokens=16, eos_token_id=[])
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], max_new_tokens=16, eos_token_id=[])
        np.testing.assert_array_equal(batched.sequences[i, t:], alone.sequences[0, len(p):])
    # right padding in is handled too (rows are left-aligned internally)
    ids_r = np.zeros_like(ids)
    mask_r = np.zeros_like(mask)
    for i, p in enumerate(prompts):
        ids_r[i, :len(p)] = p
        mask_r[i, :len(p)] = 1
    right = model.generate(ids_r, mask_r, max_new_tokens=16, eos_token_id=[])
    np.testing.assert_array_equal(right.sequences[:, t:], batched.sequences[:, t:])


def test_prompts_in_one_bucket_compile_once(hf_models):
    import omni_jax

    model = omni_jax.load(hf_models("gqa")[0], dtype="float32")
    for n in (3, 7, 12):
        model.generate(np.arange(n)[None] + 5, max_new_tokens=5, eos_token_id=[])
    counts = model.compile_counts()
    assert counts["prefill"] == 1 and counts["decode"] == 1


def test_bf16_runs_and_stays_close(hf_models, jax_model):
    _, tm = hf_models("gqa")
    model = jax_model("gqa", "bfloat16")
    ids, mask = _batch(seed=6, b=1, t=10)
    got = model.thinker_logits(ids, mask)
    with torch.no_grad():
        ref = tm.thinker(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    assert got.dtype == np.float32
    assert rel_err(got, ref) < 3e-2
    assert np.mean(got.argmax(-1) == ref.argmax(-1)) >= 0.8
    out = model.generate(ids, mask, max_new_tokens=4, eos_token_id=[])
    assert out.sequences.shape == (1, 14)


def test_sampling_is_seeded_and_topk1_is_greedy(jax_model):
    model = jax_model("gqa")
    ids, mask = _batch(seed=7, b=2, t=6)
    kw = dict(max_new_tokens=10, eos_token_id=[])
    a = model.generate(ids, mask, do_sample=True, temperature=1.5, seed=11, **kw).sequences
    b = model.generate(ids, mask, do_sample=True, temperature=1.5, seed=11, **kw).sequences
    c = model.generate(ids, mask, do_sample=True, temperature=1.5, seed=12, **kw).sequences
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    greedy = model.generate(ids, mask, **kw).sequences
    np.testing.assert_array_equal(model.generate(ids, mask, do_sample=True, top_k=1, seed=3, **kw).sequences, greedy)
    np.testing.assert_array_equal(model.generate(ids, mask, do_sample=True, top_p=1e-6, seed=3, **kw).sequences,
                                  greedy)


def test_logits_processing_matches_transformers():
    import jax.numpy as jnp
    from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    from omni_jax.generate import make_sampling, process_logits

    rs = np.random.RandomState(0)
    logits = rs.randn(3, 50).astype(np.float32) * 3
    prev = rs.randint(0, 50, (3, 7))
    seen = np.zeros((3, 50), bool)
    seen[np.arange(3)[:, None], prev] = True
    for temp, k, p, pen in [(0.7, 10, 0.9, 1.2), (1.3, None, 0.5, 1.0), (1.0, 3, None, 0.8)]:
        ref = torch.tensor(logits)
        ids = torch.tensor(prev)
        ref = RepetitionPenaltyLogitsProcessor(pen)(ids, ref)
        ref = TemperatureLogitsWarper(temp)(ids, ref)
        if k:
            ref = TopKLogitsWarper(k)(ids, ref)
        if p:
            ref = TopPLogitsWarper(p)(ids, ref)
        got = process_logits(jnp.asarray(logits), jnp.asarray(seen), make_sampling(temp, k, p, pen, 50), True)
        got, ref = np.asarray(got), ref.numpy()
        np.testing.assert_array_equal(np.isinf(got), np.isinf(ref))
        fin = ~np.isinf(ref)
        np.testing.assert_allclose(got[fin], ref[fin], rtol=1e-6)


def test_argmax_first_equals_torch_argmax():
    """Greedy's two-reduction argmax picks what torch.argmax picks: the first maximum, ties,
    -inf rows, +inf, and NaN (the first NaN) included."""
    import jax.numpy as jnp

    from omni_jax.generate import argmax_first

    rs = np.random.RandomState(3)
    x = rs.randn(9, 1000).astype(np.float32)
    x[1, [5, 700]] = 9.0  # tie: the first
    x[2] = -np.inf  # everything banned
    x[3, [10, 20]] = np.inf
    x[4, [40, 30]] = np.nan  # the first NaN wins, as in torch and jnp.argmax
    x[5, 0] = np.nan
    x[6] = np.round(x[6])  # many ties
    x[7, -1] = 50.0  # the last entry
    x[8] = -1.0
    x[8, [3, 4]] = [-0.0, 0.0]  # -0.0 == 0.0: the first
    got = np.asarray(argmax_first(jnp.asarray(x)))
    np.testing.assert_array_equal(got, torch.argmax(torch.tensor(x), dim=-1).numpy())
    assert got[1] == 5 and got[2] == 0 and got[4] == 30 and got[5] == 0 and got[7] == 999 and got[8] == 3
    assert got.dtype == np.int32


def test_decode_steps_in_pieces_equals_one_call(jax_model):
    model = jax_model("gqa")
    ids, mask = _batch(seed=8)
    full = model.generate(ids, mask, max_new_tokens=13, eos_token_id=[])
    gen = model.prefill(ids, mask, max_new_tokens=13, eos_token_id=[])
    assert gen.new_tokens().shape == (3, 1)  # the prefill already chose the first token
    sizes, compiles = [], []
    while not gen.finished:
        model.decode_steps(gen, 5)
        sizes.append(gen.new_tokens().shape[1])
        compiles.append(model.compile_counts()["decode"])
    assert sizes == [6, 11, 13]
    np.testing.assert_array_equal(gen.new_tokens(), full.sequences[:, ids.shape[1]:])
    assert compiles[0] == compiles[-1]  # a different n does not recompile


def test_load_onto_a_mesh(hf_models, jax_model):
    import jax

    import omni_jax

    mesh = omni_jax.make_mesh({"tensor": 1}, devices=jax.devices()[:1])
    model = omni_jax.load(hf_models("gqa")[0], dtype="float32", mesh=mesh)
    k = model.params["layers"][0]["self_attn"]["q_proj"]["kernel"][...]
    assert k.sharding.mesh.shape == mesh.shape
    ids, mask = _batch(seed=9)
    np.testing.assert_allclose(model.thinker_logits(ids, mask), jax_model("gqa").thinker_logits(ids, mask),
                               rtol=1e-6, atol=1e-6)


def test_per_layer_buffers_round_trip_and_equal_the_stacked_scan(jax_model):
    """A loaded model keeps per-layer decoder buffers; the stacked (checkpoint) layout comes back
    bit for bit, runs through the scan to the same logits, and is accepted by the params setter."""
    import copy

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from omni_jax import thinker as th
    from omni_jax.decoder import is_per_layer, stacked_state, to_per_layer
    from omni_jax.errors import InputError
    from omni_jax.sharding import param_axes

    model = jax_model("gqa")
    n_layers = model.config.thinker.text.num_hidden_layers
    assert is_per_layer(model.params) and sorted(model.params["layers"].keys()) == list(range(n_layers))
    stacked = model.stacked_params()["thinker"]
    assert not is_per_layer(stacked)
    q = stacked["layers"]["self_attn"]["q_proj"]["kernel"][...]
    assert q.shape[0] == n_layers
    for i in range(n_layers):
        np.testing.assert_array_equal(q[i], model.params["layers"][i]["self_attn"]["q_proj"]["kernel"][...])
    gdef = nnx.split(nnx.eval_shape(lambda: th.ThinkerLM(model.config.thinker, rngs=nnx.Rngs(0))))[0]
    g2, s2 = to_per_layer(gdef, stacked)
    assert jax.tree.structure(s2) == jax.tree.structure(model.params)
    back = stacked_state(g2, s2)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(stacked)):
        np.testing.assert_array_equal(a, b)

    # the stacked layout through lax.scan gives the per-layer loop's hidden states
    ids, mask = _batch(seed=4)
    pos = np.broadcast_to(np.cumsum(mask, 1)[None] - 1, (3, *ids.shape)).clip(0)
    tcfg = model.config.thinker.text

    def hidden(g, s):
        m = nnx.merge(g, s)
        return th.hidden_states(m, tcfg, th.embed(m, jnp.asarray(ids)), jnp.asarray(pos),
                                kv_valid=jnp.asarray(mask, bool))[0]

    np.testing.assert_allclose(np.asarray(hidden(gdef, stacked)), np.asarray(hidden(model._graphdef, model.params)),
                               rtol=1e-5, atol=1e-5)

    # assigning the stacked layout converts it; a foreign structure is refused
    other = copy.copy(model)
    other.params = stacked
    assert is_per_layer(other.params)
    np.testing.assert_array_equal(other.thinker_logits(ids, mask), model.thinker_logits(ids, mask))
    with pytest.raises(InputError, match="thinker structure"):
        other.params = {"layers": {0: {}}}
    # load() converts with free=True: each stacked array is deleted once sliced (never two copies held)
    _, fresh = to_per_layer(gdef, stacked, free=True)
    assert all(a.is_deleted() for a in jax.tree.leaves(stacked["layers"]))
    assert not any(a.is_deleted() for a in jax.tree.leaves(fresh))
    np.testing.assert_array_equal(fresh["layers"][1]["mlp"]["up_proj"]["kernel"][...],
                                  model.params["layers"][1]["mlp"]["up_proj"]["kernel"][...])
    # per-layer parameter paths shard like their stacked rule without the layer axis
    assert param_axes("layers/3/mlp/down_proj/kernel", 2) == param_axes("layers/mlp/down_proj/kernel", 3)[1:]


def test_per_layer_kv_cache_equals_the_stacked_scan_without_cache():
    """Prefill then decode writes through ``run_layers`` with the (one, per-layer) KV cache: per-layer
    weights give the hidden states of the stacked scan (training's layout, no cache) over the whole
    sequence, for one shared start slot and for per-row slots (serving), and write only their own
    slots; a cache with stacked layers is refused; the IO sharding rules name the per-layer buffers."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from omni_jax.decoder import DecoderLayers, DecoderShape, init_cache, run_layers
    from omni_jax.layers import unstack_layers
    from omni_jax.sharding import io_axes

    shape = DecoderShape(num_layers=3, heads=4, kv_heads=2, head_dim=8)
    stacked = DecoderLayers(num_layers=3, hidden=32, intermediate=48, heads=4, kv_heads=2, head_dim=8, eps=1e-6,
                            dtype=jnp.float32, rngs=nnx.Rngs(3))
    per_layer = unstack_layers(stacked)
    rng = np.random.default_rng(5)
    b, slots = 2, 12

    def rope(t):
        ang = rng.standard_normal((b, t, 8)).astype(np.float32)
        return jnp.cos(ang), jnp.sin(ang)

    valid = np.arange(slots)[None, :] >= np.array([[0], [2]])  # row 1 left-padded by 2
    h0 = jnp.asarray(rng.standard_normal((b, 5, 32)), jnp.float32)
    steps = [(h0, *rope(5), 0)]  # prefill 5 tokens at slots 0..4
    steps.append((jnp.asarray(rng.standard_normal((b, 1, 32)), jnp.float32), *rope(1), 5))  # shared slot
    steps.append((jnp.asarray(rng.standard_normal((b, 1, 32)), jnp.float32), *rope(1),
                  jnp.asarray([6, 9], jnp.int32)))  # per-row slots: row 1 skips slots 6..8 (masked out)
    valid_last = valid.copy()
    valid_last[1, 6:9] = False
    cache = init_cache(shape, b, slots, jnp.float32)
    assert len(cache["k"]) == 3 and cache["k"][0].shape == (b, slots, 2, 8)
    outs = []
    for j, (h, cos, sin, start) in enumerate(steps):
        kv = valid_last if j == 2 else valid
        out, cache = run_layers(per_layer, shape, h, cos, sin, cache=cache, start=start, kv_valid=jnp.asarray(kv))
        outs.append(out)
    # the reference: the stacked scan without a cache over all 7 tokens (sequence index = row 0's slot)
    seq = [jnp.concatenate([s[k] for s in steps], axis=1) for k in range(3)]
    ref, none = run_layers(stacked, shape, *seq, kv_valid=jnp.asarray(valid[:, :7]))
    assert none is None
    got = np.concatenate([np.asarray(o) for o in outs], axis=1)
    keep = valid[:, :7]  # fully masked (padding) queries are unspecified
    np.testing.assert_allclose(got[keep], np.asarray(ref)[keep], rtol=1e-5, atol=1e-5)
    # the per-row step wrote only slots 6 (row 0) and 9 (row 1) beyond the prefill and slot 5
    written = np.abs(np.asarray(cache["k"][0])).sum(axis=(2, 3)) > 0
    np.testing.assert_array_equal(written, np.array([[s < 7 for s in range(slots)],
                                                     [s < 6 or s == 9 for s in range(slots)]]))
    with pytest.raises(ValueError, match="KV cache needs per-layer decoder layers"):
        run_layers(stacked, shape, h0, *rope(5), cache=init_cache(shape, b, slots, jnp.float32), start=0,
                   kv_valid=jnp.asarray(valid))
    with pytest.raises(ValueError, match="KV cache of 3 layers for 2"):
        run_layers(per_layer[:2], shape, h0, *rope(5), cache=init_cache(shape, b, slots, jnp.float32), start=0,
                   kv_valid=jnp.asarray(valid))
    assert io_axes(".cache['v'][7]", 4) == ("batch", "cache_seq", "act_kv_heads", None)
    assert io_axes(".cache['k']", 5) == (None,) * 5  # no stacked cache rule: there is no stacked cache
    assert jax.tree.structure(cache) == jax.tree.structure(init_cache(shape, 1, 4, jnp.float32))
