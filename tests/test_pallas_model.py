"""The whole model with attention="pallas" (kernels in interpret mode on CPU) equals attention="xla"."""

from __future__ import annotations

import numpy as np
import pytest

import omni_jax
from conftest import rel_err
from test_multimodal import _inputs


@pytest.fixture(scope="module")
def pair(hf_models):
    d, _ = hf_models("gqa")
    return (omni_jax.load(d, dtype="float32", attention="pallas"), omni_jax.load(d, dtype="float32", attention="xla"))


def test_thinker_and_encoders_pallas_equal_xla(pair):
    pallas, xla = pair
    ids, mask, mm, aiv = _inputs("all_mixed")
    a = pallas.thinker_logits(ids, mask, use_audio_in_video=aiv, **mm)
    b = xla.thinker_logits(ids, mask, use_audio_in_video=aiv, **mm)
    assert rel_err(a, b) <= 1e-5


def test_generation_talker_and_dit_pallas_equal_xla(pair):
    pallas, xla = pair
    ids = np.random.RandomState(4).randint(0, 280, (2, 7))
    mask = np.ones_like(ids)
    mask[0, :2] = 0
    kw = dict(max_new_tokens=5, eos_token_id=[], return_audio=True, talker_do_sample=False,
              talker_max_new_tokens=12, talker_min_new_tokens=6)
    a, b = pallas.generate(ids, mask, **kw), xla.generate(ids, mask, **kw)
    np.testing.assert_array_equal(a.sequences, b.sequences)
    for x, y in zip(a.codec_ids, b.codec_ids):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(a.audio, b.audio):  # the DiT's block-band attention through the kernel
        assert rel_err(x, y) <= 1e-5
