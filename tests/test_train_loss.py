"""train_loss and its gradients vs transformers (thinker text and multimodal), the talker's
teacher-forced logits vs its step-by-step forward, chunked cross-entropy, model.loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import VOICE_BOS, rel_err
from omni_jax.checkpoint.hf import iter_hf_tensors
from omni_jax.thinker import THINKER_LM_PREFIXES
from omni_jax import training as T
from test_multimodal import _inputs

# saved (checkpoint) key prefixes -> transformers 5's module names
_INTERNAL = (("thinker.model.", "thinker.model.language_model."), ("thinker.audio_tower.", "thinker.model.audio_tower."),
             ("thinker.visual.", "thinker.model.visual."))


def _internal(key):
    for a, b in _INTERNAL:
        if key.startswith(a):
            return b + key[len(a):]
    return key


def _labels(ids, mask, tail):
    """Targets on the last ``tail`` real tokens of each row (a reply), -100 elsewhere."""
    lab = np.full_like(ids, -100)
    for b in range(ids.shape[0]):
        lab[b, -tail:] = ids[b, -tail:]
    lab[mask == 0] = -100
    return lab


def _torch_loss_and_grads(tm, ids, mask, labels, kw=None, aiv=False):
    tm.zero_grad(set_to_none=True)
    t = {k: torch.tensor(v) for k, v in (kw or {}).items()}
    with torch.enable_grad():
        out = tm.thinker(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask),
                         labels=torch.tensor(labels).long(), use_audio_in_video=aiv, **t)
        out.loss.backward()
    grads = {k: p.grad.numpy().copy() for k, p in tm.named_parameters() if p.grad is not None}
    tm.zero_grad(set_to_none=True)
    return out.loss.item(), grads


def _compare_grads(g, ref, components):
    from omni_jax.audio import HF_PREFIX as AUDIO
    from omni_jax.vision import HF_PREFIX as VISION

    spec = {"thinker": (THINKER_LM_PREFIXES, ("layers",)), "audio": ({"": AUDIO}, ("layers",)),
            "vision": ({"": VISION}, ("blocks",))}
    n = 0
    for comp in components:
        prefixes, stack = spec[comp]
        for key, arr in iter_hf_tensors(g[comp], prefixes, stack):
            want = ref.get(_internal(key))
            if want is None:  # unused by the forward (e.g. audio_bos_eos_token): no gradient in torch either
                assert not np.any(arr), key
                continue
            assert rel_err(arr, want) <= 1e-4, key
            n += 1
    return n


@pytest.mark.parametrize("variant", ["gqa", "mha_tied"])
def test_text_loss_and_grads_match_transformers(variant, hf_models, jax_model):
    _, tm = hf_models(variant)
    model = jax_model(variant)
    rs = np.random.RandomState(3)
    ids = rs.randint(0, 280, (2, 14)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # left padding
    labels = _labels(ids, mask, 6)
    ref_loss, ref_grads = _torch_loss_and_grads(tm, ids, mask, labels)
    batch = T.make_batch(model.config, ids, mask, labels)
    params = {"thinker": T.model_params(model)["thinker"]}
    (loss, aux), g = jax.value_and_grad(lambda p: T.train_loss(p, batch, model.config), has_aux=True)(params)
    assert rel_err(loss, ref_loss) <= 1e-5
    assert int(aux["thinker_tokens"]) == T.count_targets(labels) == 12
    assert _compare_grads(g, ref_grads, ["thinker"]) > 10
    # model.loss gives the same value as a float
    assert rel_err(model.loss(ids, labels, mask), ref_loss) <= 1e-5
    # train_loss takes the stacked (training) layout only; the model's per-layer buffers are refused
    from omni_jax.errors import InputError

    with pytest.raises(InputError, match="stacked layer layout"):
        T.train_loss({"thinker": model.params}, batch, model.config)


def _stacked_shapes(fn, *args):
    """Output shapes of the program's equations that look like a stack of all layers' q_proj kernels."""
    out = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            out.extend(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
            for p in eqn.params.values():
                if hasattr(p, "jaxpr"):
                    walk(p.jaxpr if hasattr(p.jaxpr, "eqns") else p.jaxpr.jaxpr)
    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return out


def test_model_loss_uses_the_per_layer_weights_as_they_are(jax_model):
    """model.loss runs the loaded per-layer buffers through inference's layer loop: its program holds
    no [layers, ...] stack of the layer weights (a transient copy of the whole thinker's layer weights at
    7B), while the stacked-layout program it replaced does (the check sees a stack when there is one)."""
    from omni_jax.decoder import stacked_state

    model = jax_model("gqa")
    ids = np.random.RandomState(1).randint(0, 280, (1, 10)).astype(np.int32)
    labels = _labels(ids, np.ones_like(ids), 4)
    batch = T.make_batch(model.config, ids, np.ones_like(ids), labels)
    gdef, p = model._graphdef, model.params  # the loaded (per-layer) graph and buffers
    n = model.config.thinker.text.num_hidden_layers
    q = p["layers"][0]["self_attn"]["q_proj"]["kernel"][...].shape
    stack = (n, *q)
    new = _stacked_shapes(lambda p_, b: T.thinker_loss({"thinker": p_}, b, model.config, gdef), p, batch)
    old = _stacked_shapes(lambda p_, b: T.train_loss({"thinker": stacked_state(gdef, p_)}, b, model.config)[0],
                          p, batch)
    assert stack in old and stack not in new
    assert rel_err(float(jax.jit(lambda p_, b: T.thinker_loss({"thinker": p_}, b, model.config, gdef))(p, batch)),
                   float(T.train_loss({"thinker": stacked_state(gdef, p)}, batch, model.config)[0])) <= 1e-6


@pytest.mark.parametrize("name", ["all_mixed", "audio_in_video"])
def test_multimodal_loss_and_grads_match_transformers(name, hf_models, jax_model):
    """End to end through both encoders: their gradients too."""
    _, tm = hf_models("gqa")
    model = jax_model("gqa")
    ids, mask, kw, aiv = _inputs(name)
    labels = _labels(ids, mask, 2)
    ref_loss, ref_grads = _torch_loss_and_grads(tm, ids, mask, labels, kw, aiv)
    mm = dict(kw, use_audio_in_video=aiv)
    batch = T.make_batch(model.config, ids, mask, labels, mm)
    params = T.model_params(model)
    params = {k: params[k] for k in ("thinker", "audio", "vision")}
    (loss, _), g = jax.value_and_grad(lambda p: T.train_loss(p, batch, model.config), has_aux=True)(params)
    assert rel_err(loss, ref_loss) <= 1e-5
    assert _compare_grads(g, ref_grads, ["thinker", "audio", "vision"]) > 30
    assert rel_err(model.loss(ids, labels, mask, use_audio_in_video=aiv, **kw), ref_loss) <= 1e-5


def _talker_reference(tm, ids, reply, codes, speaker):
    """transformers' talker run step by step on its own generate inputs: the prompt built by
    ``Qwen2_5OmniForConditionalGeneration.generate`` (captured), then one forward per code with the
    KV cache and the attention mask (so its codec bos/pad embeddings and TMRoPE positions apply, as
    the talker's forward defines them)."""
    captured = {}
    orig = tm.talker.generate

    def capture(**kw):
        captured.update(emb=kw["inputs_embeds"].clone(), part=kw["thinker_reply_part"].clone(),
                        text=kw["input_text_ids"].clone())
        return torch.cat([kw["input_ids"], torch.full((1, 2), 112)], 1)

    t2w = tm.token2wav.forward
    tm.talker.generate = capture
    tm.token2wav.forward = lambda code, **kw: torch.zeros(1, 10)
    try:
        with torch.no_grad():
            seqs, _ = tm.generate(input_ids=torch.tensor(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long),
                                  speaker=speaker, thinker_max_new_tokens=reply, thinker_do_sample=False,
                                  thinker_eos_token_id=None, talker_do_sample=False)
    finally:
        tm.talker.generate = orig
        tm.token2wav.forward = t2w
    emb, part, text = captured["emb"], captured["part"], captured["text"]
    p = emb.shape[1]
    tm.talker.rope_deltas = None
    steps = []
    with torch.no_grad():
        out = tm.talker(inputs_embeds=emb, attention_mask=torch.ones(1, p, dtype=torch.long), input_text_ids=text,
                        thinker_reply_part=part, use_cache=True)
        steps.append(out.logits[0, -1].numpy())
        for k, c in enumerate(codes[:-1]):
            out = tm.talker(input_ids=torch.tensor([[int(c)]]), attention_mask=torch.ones(1, p + k + 1, dtype=torch.long),
                            past_key_values=out.past_key_values, thinker_reply_part=out.thinker_reply_part,
                            input_text_ids=text, use_cache=True)
            steps.append(out.logits[0, -1].numpy())
    return seqs.numpy(), np.stack(steps)


def test_talker_teacher_forcing_matches_step_by_step(hf_models, jax_model):
    _, tm = hf_models("gqa")
    model = jax_model("gqa")
    rs = np.random.RandomState(11)
    ids = rs.randint(0, 280, (1, 9))
    out = model.generate(ids, max_new_tokens=12, eos_token_id=[], return_audio=True, talker_do_sample=False,
                         talker_max_new_tokens=24, talker_min_new_tokens=10)
    codes = np.concatenate([out.codec_ids[0], [111]])  # the spoken reply's codes, ending with codec EOS
    seqs, ref = _talker_reference(tm, ids, 12, codes, "Chelsie")
    np.testing.assert_array_equal(seqs, out.sequences)
    full = out.sequences.astype(np.int32)
    mask = np.ones_like(full)
    layout = T.talker_layout(model.config, full, mask, [(9, 12, codes, VOICE_BOS["Chelsie"])])
    batch = T.make_batch(model.config, full, mask, np.full_like(full, -100), talker=layout)
    params = T.model_params(model)
    logits = np.asarray(T.talker_logits(params, batch, model.config))[0]
    got = logits[layout["talker_labels"][0] != -100]
    assert got.shape == ref.shape == (len(codes), model.config.talker.vocab_size)
    assert rel_err(got, ref) <= 1e-4
    # greedy generation picked the argmax of its (repetition-penalised) logits: the codes follow the logits
    assert (got.argmax(-1)[:5] == codes[:5]).mean() >= 0.6
    loss, aux = T.train_loss(params, batch, model.config)
    ce = torch.nn.functional.cross_entropy(torch.tensor(ref), torch.tensor(codes).long()).item()
    assert int(aux["talker_tokens"]) == len(codes)
    assert rel_err(float(aux["talker_loss_sum"]) / len(codes), ce) <= 1e-5
    assert rel_err(float(loss), ce) <= 1e-5  # no thinker targets: the loss is the talker's


def test_talker_batch_rows_independent(jax_model):
    """Two rows of different prompt, reply and code lengths (left-padded) give each row's own logits."""
    model = jax_model("gqa")
    rs = np.random.RandomState(2)
    rows = [(rs.randint(0, 280, 7), rs.randint(0, 280, 5), rs.randint(0, 110, 6)),
            (rs.randint(0, 280, 10), rs.randint(0, 280, 8), rs.randint(0, 110, 9))]
    params = T.model_params(model)

    def logits_of(sel):
        seqs = [np.concatenate([rows[i][0], rows[i][1]]) for i in sel]
        w = max(len(s) for s in seqs)
        ids = np.zeros((len(sel), w), np.int32)
        mask = np.zeros_like(ids)
        reps = []
        for j, (i, s) in enumerate(zip(sel, seqs)):
            ids[j, w - len(s):] = s
            mask[j, w - len(s):] = 1
            reps.append((w - len(rows[i][1]), len(rows[i][1]), rows[i][2], VOICE_BOS["Ethan"]))
        lay = T.talker_layout(model.config, ids, mask, reps)
        b = T.make_batch(model.config, ids, mask, np.full_like(ids, -100), talker=lay)
        lg = np.asarray(T.talker_logits(params, b, model.config))
        return [lg[j][lay["talker_labels"][j] != -100] for j in range(len(sel))]

    both = logits_of([0, 1])
    for i in range(2):
        alone = logits_of([i])[0]
        assert alone.shape[0] == len(rows[i][2])
        assert rel_err(both[i], alone) <= 1e-5


def test_cross_entropy_chunks_and_memory():
    rs = np.random.RandomState(0)
    n, e, v = 50, 16, 1000
    h = jnp.asarray(rs.randn(n, e).astype(np.float32))
    w = jnp.asarray(rs.randn(e, v).astype(np.float32) * 0.3)
    lab = rs.randint(0, v, n)
    lab[::4] = -100
    lab = jnp.asarray(lab)
    logits = h @ w
    ref = -jnp.sum(jnp.where(lab >= 0, jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.maximum(lab, 0)[:, None],
                                                             1)[:, 0], 0))
    for chunk in (1, 7, 16, 50, 64):
        got = T.cross_entropy_sum(h, w, lab, transposed=False, chunk=chunk)
        assert rel_err(got, ref) <= 1e-6
        assert rel_err(T.cross_entropy_sum(h, w.T, lab, transposed=True, chunk=chunk), ref) <= 1e-6
    g = jax.grad(lambda w_: T.cross_entropy_sum(h, w_, lab, transposed=False, chunk=8))(w)
    g_ref = jax.grad(lambda w_: -jnp.sum(jnp.where(
        lab >= 0, jnp.take_along_axis(jax.nn.log_softmax(h @ w_), jnp.maximum(lab, 0)[:, None], 1)[:, 0], 0)))(w)
    assert rel_err(g, g_ref) <= 1e-5
    # the compiled gradient never holds [tokens, vocab] logits: only [chunk, vocab] ones
    hlo = jax.jit(jax.grad(lambda w_: T.cross_entropy_sum(h, w_, lab, transposed=False, chunk=8))).lower(w).as_text()
    assert f"tensor<{n}x{v}xf32>" not in hlo and f"tensor<8x{v}xf32>" in hlo
