"""Small helpers shared by the bench scripts."""

from __future__ import annotations

import contextlib
import json
import os


@contextlib.contextmanager
def band_attention(enabled: bool = True):
    """Run omni-jax's XLA attention with (``enabled``) or without the block-by-block band path
    (:func:`omni_jax.attention_xla.xla_band_attention`; without it, block bands are computed densely,
    all ``T x T`` scores: the formulation before that path, for A/B runs in one process). jax's
    caches are cleared on entry and exit, so jitted programs are traced again with the choice."""
    import jax

    from omni_jax import attention_xla

    before = attention_xla.BAND_PATH
    attention_xla.BAND_PATH = bool(enabled)
    jax.clear_caches()
    try:
        yield
    finally:
        attention_xla.BAND_PATH = before
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
    transformers before 5.18 passed).

    The cache argument is found by binding the call to ``forward``'s signature, under either name it has
    had (``cache`` since transformers 5.24, ``past_key_values`` before, now a deprecated alias). The
    wrapper checks that it took effect: every call's mask (given or made here) must cover the cache plus
    the input, and on a normal exit at least one decode step (a call with a non-empty cache) must have
    gone through it; otherwise it raises ``AssertionError`` rather than let a comparison run against a
    reference with a one-slot mask. The context yields a dict with the counts (``calls``, ``decode_steps``,
    ``masks_added``). On exit ``full.talker.forward`` is what it was before."""
    import functools
    import inspect

    import torch

    talker = full.talker
    orig = talker.forward
    own = vars(talker).get("forward")  # a caller's wrapper (an instance attribute), kept on exit
    sig = inspect.signature(orig)
    names = [n for n in ("cache", "past_key_values") if n in sig.parameters]
    stats = {"calls": 0, "decode_steps": 0, "masks_added": 0}

    @functools.wraps(orig)  # generate() validates its kwargs against forward's signature
    def forward(*args, **kw):
        bound = sig.bind_partial(*args, **kw)
        a = bound.arguments
        extra = a.get(next((n for n, p in sig.parameters.items() if p.kind is p.VAR_KEYWORD), ""), {})
        cache = next((c for c in (a.get(n) for n in names) if c is not None), None)
        if cache is None:
            cache = extra.get("past_key_values")  # the alias, when forward only names ``cache``
        past = 0 if cache is None else int(cache.get_seq_length())
        x = a["inputs_embeds"] if a.get("inputs_embeds") is not None else a["input_ids"]
        want = past + x.shape[1]
        if a.get("attention_mask") is None:
            bound.arguments["attention_mask"] = torch.ones(x.shape[0], want, dtype=torch.long, device=x.device)
            stats["masks_added"] += 1
        mask = bound.arguments["attention_mask"]
        assert mask.shape[-1] == want, (
            f"talker_mask_restored: the talker's mask covers {mask.shape[-1]} slots, its cache plus input {want}")
        stats["calls"] += 1
        stats["decode_steps"] += past > 0
        return orig(*bound.args, **bound.kwargs)

    talker.forward = forward
    talker.rope_deltas = None  # the module keeps the last run's; the prefill sets it again
    try:
        yield stats
    finally:
        if own is None:
            del talker.forward  # the instance attribute: the class's forward again
        else:
            talker.forward = own
    assert stats["decode_steps"] > 0, (
        f"talker_mask_restored: no talker decode step went through the wrapper ({stats}); "
        "transformers' talker call path has changed")


def check_json_target(path: str | None) -> None:
    """Refuse a ``--json`` target that cannot be written (a directory, a device, a missing or
    read-only parent) before any measuring starts, with omni_jax's one-line error."""
    if path:
        from omni_jax.validate import check_output_file

        check_output_file(path, "--json")


def write_json(path: str | None, res: dict, keep: tuple[str, ...] = ()) -> None:
    """Write a bench result to ``path`` (nothing when ``path`` is None), atomically: a temporary
    file renamed over ``path``, so a failed write leaves the previous file, not half a new one.
    ``keep``: top-level keys carried over from the file already at ``path`` (records kept by hand
    beside the figures, such as ``bench/results/cpu_compare.json``'s ``profile_passes``)."""
    if not path:
        return
    from omni_jax.validate import check_output_file

    path = check_output_file(path, "--json")
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
    numpy into the abstract module (``default_model.numpy_init``) and put on the device: the
    module's own JAX initialisers compile a program per parameter shape, which took 25 s for a
    tiny DiT + BigVGAN on this project's 2-core CPU (numpy: 1 s). Elsewhere the module is built
    as it is (fast on an accelerator; numpy draws every weight on one CPU core)."""
    import jax
    import numpy as np
    from flax import nnx

    if jax.default_backend() != "cpu":
        return make()
    from omni_jax.default_model import numpy_init

    graphdef, state = nnx.split(nnx.eval_shape(make))
    state = jax.tree.map(jax.numpy.asarray, numpy_init(state, np.random.RandomState(seed)))
    return nnx.merge(graphdef, state)
