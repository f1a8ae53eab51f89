"""model.stream with speech: the talker alongside the thinker, audio chunks before the reply ends."""

from __future__ import annotations

import numpy as np
import pytest

import omni_jax


@pytest.fixture(scope="module")
def model():
    return omni_jax.load(omni_jax.default_model_path(), dtype="float32")


CONV = [{"role": "user", "content": "Tell me a story about the sea."}]
KW = dict(max_new_tokens=48, eos_token_id=[], return_audio=True, talker_do_sample=False,
          talker_max_new_tokens=120, talker_min_new_tokens=100, speaker="Chelsie")


def test_stream_speaks_while_thinking(model):
    list(model.stream(messages=CONV, **KW))  # compile everything once: timings below are steady state
    full = model.generate(messages=CONV, **KW)
    events = list(model.stream(messages=CONV, steps_per_event=4, **KW))
    kinds = [e.kind for e in events]
    assert kinds[-1] == "done" and kinds.count("done") == 1
    text = [e for e in events if e.kind == "text"]
    audio = [e for e in events if e.kind == "audio"]
    last_text_token = max(i for i, e in enumerate(events) if e.kind == "text" and e.token_ids)
    first_audio = kinds.index("audio")
    assert len([t for e in text for t in e.token_ids]) >= 40
    assert first_audio < last_text_token  # spoken before the thinker's last token...
    assert audio[0].t < text[-1].t  # ...in wall time too, not produced whole and replayed
    # streamed text and codec ids equal the non-streamed ones
    ids = [t for e in text for t in e.token_ids]
    np.testing.assert_array_equal(ids, full.sequences[0, full.prompt_length:])
    assert "".join(e.text for e in events) == full.text[0]
    np.testing.assert_array_equal(events[-1].codec_ids, full.codec_ids[0])
    # the audio is the documented chunked decode of those codes with the same noise
    from omni_jax.engine import noise_key
    from omni_jax.streaming import StreamingToken2Wav

    voice = model.voices["Chelsie"]
    ref = StreamingToken2Wav(model.token2wav_params, model.config.token2wav, voice.cond, voice.ref_mel,
                             key=noise_key(0, 0))
    chunks = ref.push(full.codec_ids[0]) + ref.finish()
    wav = np.concatenate([e.audio for e in audio])
    np.testing.assert_allclose(wav, np.concatenate(chunks), rtol=1e-5, atol=1e-6)
    assert wav.shape == full.audio[0].shape  # same length as the whole decode


def test_talker_after_the_text_runs_chunk_by_chunk(model, monkeypatch):
    """Once the thinker is done the talker goes on alone: in steps of one steady chunk's codec ids,
    each chunk's audio yielded before the next step (not every remaining id first, then all the
    audio at once: the stream fell behind playback that way)."""
    log = []  # ("advance", codes after the call) and ("audio", samples), in the order they happened
    real = model.talker_advance

    def advance(run, gen, final, limit=None):
        real(run, gen, final, limit)
        log.append(("advance", int(np.max(run.state.n)), final is None))

    monkeypatch.setattr(model, "talker_advance", advance)
    for e in model.stream(messages=CONV, **KW):
        if e.kind == "audio":
            log.append(("audio", len(e.audio), None))
    after = log[next(i for i, x in enumerate(log) if x[0] == "advance" and x[2]):]  # the thinker is done
    counts = [n for kind, n, _ in after if kind == "advance"]
    first_after = max(n for kind, n, done in log if kind == "advance" and not done)
    steps = np.diff([first_after] + counts)
    assert len(counts) >= 3 and steps.max() <= 36, counts  # KW: ~100 ids, 48 of them while thinking
    # between the talker's steps, the audio their ids completed
    kinds = [kind for kind, _, _ in after]
    assert kinds.index("audio") < len(kinds) - 1 - kinds[::-1].index("advance"), kinds


def test_token2wav_parts_split_once_and_follow_the_module(model):
    """The model splits its token2wav module once (not per streamed chunk) and splits again when
    the module is replaced; the parts hold the module's own arrays, not copies."""
    import jax
    from flax import nnx

    from omni_jax.token2wav import presplit

    parts = model.token2wav_parts
    assert model.token2wav_parts is parts
    old = model.token2wav_params
    for module, split in ((old.code2wav_dit_model, parts.code2wav_dit_model),
                          (old.code2wav_bigvgan_model, parts.code2wav_bigvgan_model)):
        mine, theirs = jax.tree.leaves(nnx.state(module)), jax.tree.leaves(split.state)
        assert len(mine) == len(theirs) > 10 and all(a is b for a, b in zip(mine, theirs))
        assert len(split.leaves) == len(mine) and all(a is b for a, b in zip(mine, split.leaves))
        # the static half jit keys on: equal (and equally hashed) for another split of the same module
        again = presplit(module)
        assert again.structure is not split.structure and again.structure == split.structure
        assert hash(again.structure) == hash(split.structure)
    other = nnx.clone(old)
    other.code2wav_bigvgan_model.conv_post.weight.value = old.code2wav_bigvgan_model.conv_post.weight.value * 2
    try:
        model.token2wav_params = other
        new = model.token2wav_parts
        assert new is not parts and model.token2wav_parts is new
        wav = model.token2wav(np.arange(8) % 200)
    finally:
        model.token2wav_params = old
    assert model.token2wav_parts is not new
    base = model.token2wav(np.arange(8) % 200)
    small = np.abs(base) < 0.45  # not clipped at either weight: the replaced module's output is twice this one's
    assert small.mean() > 0.5
    np.testing.assert_allclose(wav[small], 2 * base[small], rtol=1e-4, atol=1e-6)


def test_stream_stops_midway_and_model_stays_usable(model):
    it = model.stream(messages=CONV, **KW)
    for e in it:
        if e.kind == "audio":
            break
    it.close()
    out = model.generate(messages=CONV, max_new_tokens=8, eos_token_id=[])
    assert out.sequences.shape[1] == out.prompt_length + 8


def test_cli_stream_with_speech(tmp_path, capsys):
    import wave

    from omni_jax.cli import main

    out = tmp_path / "reply.wav"
    assert main(["generate", "--prompt", "Hi", "--max-new-tokens", "6", "--greedy", "--stream", "--out", str(out),
                 "--talker-max-new-tokens", "40"]) == 0
    captured = capsys.readouterr()
    assert captured.out.endswith("\n") and "streamed" in captured.err
    with wave.open(str(out)) as w:
        assert w.getframerate() == 24000 and w.getnframes() == 40 * 2 * 240
