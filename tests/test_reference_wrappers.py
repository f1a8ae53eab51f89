"""The wrappers that bench/ and the parity tests put around transformers' internals must take effect.

``bench.util.talker_mask_restored`` gives the reference talker the attention mask that transformers'
``generate`` drops (all ones, cache plus input). transformers renamed the talker's cache argument
(``past_key_values`` -> ``cache``); a wrapper that reads only one name builds a one-slot mask for every
decode step under the other, silently. These tests drive the wrapper with stand-in talkers of both
signatures and check the mask it passes and the checks it makes."""

from __future__ import annotations

import types

import pytest
import torch

from bench.util import talker_mask_restored


class _Cache:
    def __init__(self, n):
        self.n = n

    def get_seq_length(self):
        return self.n


class _NewTalker(torch.nn.Module):
    """The current signature: the cache is ``cache``, ``past_key_values`` reaches ``**kwargs``."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                **kwargs):
        return attention_mask


class _OldTalker(torch.nn.Module):
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, **kwargs):
        return attention_mask


def _full(talker):
    return types.SimpleNamespace(talker=talker)


@pytest.mark.parametrize("cls,name", [(_NewTalker, "cache"), (_NewTalker, "past_key_values"),
                                      (_OldTalker, "past_key_values")])
def test_mask_covers_cache_and_input(cls, name):
    full = _full(cls())
    x = torch.zeros(2, 1, 8)
    with talker_mask_restored(full) as stats:
        prefill = full.talker(inputs_embeds=torch.zeros(2, 5, 8), **{name: _Cache(0)})
        step = full.talker(inputs_embeds=x, **{name: _Cache(5)})
        positional = full.talker(None, None, None, _Cache(6), x)  # the cache by position
    assert prefill.shape == (2, 5) and step.shape == (2, 6) and positional.shape == (2, 7)
    assert bool((step == 1).all())
    assert stats == {"calls": 3, "decode_steps": 2, "masks_added": 3}
    assert "forward" not in vars(full.talker)  # the class's forward again


def test_given_mask_is_kept_and_checked():
    full = _full(_NewTalker())
    mask = torch.tensor([[0, 1, 1, 1]])
    with talker_mask_restored(full) as stats:
        assert full.talker(input_ids=torch.zeros(1, 1, dtype=torch.long), attention_mask=mask,
                           cache=_Cache(3)) is mask
        with pytest.raises(AssertionError, match="covers 4 slots, its cache plus input 5"):
            full.talker(input_ids=torch.zeros(1, 1, dtype=torch.long), attention_mask=mask, cache=_Cache(4))
    assert stats["masks_added"] == 0


def test_no_decode_step_is_an_error():
    """A wrapper that no decode step went through did nothing: leaving it must say so."""
    full = _full(_NewTalker())
    with pytest.raises(AssertionError, match="no talker decode step"):
        with talker_mask_restored(full):
            full.talker(inputs_embeds=torch.zeros(1, 4, 8))
    assert "forward" not in vars(full.talker)
