"""Small helpers shared by the bench scripts."""

from __future__ import annotations

import contextlib
import json
import os


@contextlib.contextmanager
def band_attention(enabled: bool = True):
    """Run omni-jax's XLA attention with (``enabled``) or without the block-by-block band path
    (:func:`omni_jax.attention.xla_band_attention`; without it, block bands are computed densely,
    all ``T x T`` scores: the formulation before that path, for A/B runs in one process). jax's
    caches are cleared on entry and exit, so jitted programs are traced again with the choice."""
    import jax

    from omni_jax import attention

    orig = attention._band_only
    if not enabled:
        attention._band_only = lambda mask, tq, tk: False
    jax.clear_caches()
    try:
        yield
    finally:
        attention._band_only = orig
        jax.clear_caches()


@contextlib.contextmanager
def talker_mask_restored(full):
    """transformers' ``Qwen2_5OmniForConditionalGeneration`` (``full``) with its talker's attention mask
    restored inside ``generate``.

    Since transformers 5.18, ``generate`` drops an attention mask that is all ones (no padding) before
    calling the model. The Qwen2.5-Omni talker's forward computes its TMRoPE positions and adds its
    codec pad/bos embeddings to the prompt only when it gets a mask, so an unpadded batch skips both
    (its first code's logits move by a few percent) while a padded batch does not. omni-jax follows the
    talker's forward as the model defines it; reference runs use this to compare against that: each
    talker call without a mask gets the all-ones mask of its cache length plus its input length (what
    transformers before 5.18 passed). On exit ``full.talker.forward`` is what it was before."""
    import functools

    import torch

    talker = full.talker
    orig = talker.forward
    own = vars(talker).get("forward")  # a caller's wrapper (an instance attribute), kept on exit

    @functools.wraps(orig)  # generate() validates its kwargs against forward's signature
    def forward(*args, **kw):
        if kw.get("attention_mask") is None:
            x = kw["inputs_embeds"] if kw.get("inputs_embeds") is not None else kw["input_ids"]
            cache = kw.get("past_key_values")
            past = 0 if cache is None else cache.get_seq_length()
            kw["attention_mask"] = torch.ones(x.shape[0], past + x.shape[1], dtype=torch.long, device=x.device)
        return orig(*args, **kw)

    talker.forward = forward
    talker.rope_deltas = None  # the module keeps the last run's; the prefill sets it again
    try:
        yield
    finally:
        if own is None:
            del talker.forward  # the instance attribute: the class's forward again
        else:
            talker.forward = own


def write_json(path: str | None, res: dict, keep: tuple[str, ...] = ()) -> None:
    """Write a bench result to ``path`` (nothing when ``path`` is None), atomically: a temporary
    file renamed over ``path``, so a failed write leaves the previous file, not half a new one.
    ``keep``: top-level keys carried over from the file already at ``path`` (records kept by hand
    beside the figures, such as ``bench/results_cpu_compare.json``'s ``profile_passes``)."""
    if not path:
        return
    if keep:
        try:
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
        except (OSError, ValueError):
            old = None
        if isinstance(old, dict):
            res = dict(res, **{k: old[k] for k in keep if k in old})
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def random_module(make, seed: int = 0):
    """The NNX module ``make()`` builds, with random weights. On a CPU the weights are drawn with
    numpy into the abstract module (``default_model._numpy_init``) and put on the device: the
    module's own JAX initialisers compile a program per parameter shape, which took 25 s for a
    tiny DiT + BigVGAN on this project's 2-core CPU (numpy: 1 s). Elsewhere the module is built
    as it is (fast on an accelerator; numpy draws every weight on one CPU core)."""
    import jax
    import numpy as np
    from flax import nnx

    if jax.default_backend() != "cpu":
        return make()
    from omni_jax.default_model import _numpy_init

    graphdef, state = nnx.split(nnx.eval_shape(make))
    state = jax.tree.map(jax.numpy.asarray, _numpy_init(state, np.random.RandomState(seed)))
    return nnx.merge(graphdef, state)
