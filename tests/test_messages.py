"""Typed-part messages with real media files end to end, on the embedded default model, and the CLI flags."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import omni_jax
from omni_jax import InputError
from omni_jax.cli import main
from omni_jax.processor import process_conversations
from test_media import tone, write_mp4, write_wav


@pytest.fixture(scope="module")
def model():
    return omni_jax.load(omni_jax.default_model_path(), dtype="float32")


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    png = str(d / "pic.png")
    Image.fromarray((np.random.RandomState(0).rand(70, 100, 3) * 255).astype(np.uint8)).save(png)
    wav = str(d / "voice.wav")
    write_wav(wav, tone(24000, sr=16000), 16000)
    mp4 = str(d / "clip.mp4")
    write_mp4(mp4, n_frames=25, fps=10, seconds=2.5)
    bad = d / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    return dict(png=png, wav=wav, mp4=mp4, bad=str(bad))


def _conv(parts, text="What do you notice?"):
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


def test_messages_equal_processor_tensors(model, media):
    conv = _conv([{"type": "image", "image": media["png"]}, {"type": "audio", "audio": media["wav"]},
                  {"type": "video", "video": media["mp4"]}])
    enc = process_conversations(model.processor, [conv], directory=model.path, thinker_cfg=model.config.thinker)
    assert enc["input_features"].shape[0] == 1 and enc["image_grid_thw"].shape == (1, 3)
    assert enc["video_grid_thw"].shape == (1, 3)
    ids, mask = enc.pop("input_ids"), enc.pop("attention_mask")
    a = model.generate(messages=conv, max_new_tokens=6)
    b = model.generate(ids, mask, max_new_tokens=6, **enc)
    np.testing.assert_array_equal(a.sequences, b.sequences)
    # the media are really used: with the image's pixels changed the logits change
    other = dict(enc, pixel_values=enc["pixel_values"] + 1.0)
    assert not np.allclose(model.thinker_logits(ids, mask, **enc), model.thinker_logits(ids, mask, **other))


def test_audio_in_video_and_batch(model, media):
    conv1 = _conv([{"type": "video", "video": media["mp4"]}])
    conv2 = _conv([{"type": "image", "image": media["png"]}], "Describe.")
    out = model.generate(messages=[conv1, conv2], max_new_tokens=5, use_audio_in_video=True)
    assert out.sequences.shape[0] == 2
    alone = model.generate(messages=conv2, max_new_tokens=5)
    np.testing.assert_array_equal(out.sequences[1, out.prompt_length:], alone.sequences[0, alone.prompt_length:])


def test_bad_media_name_the_file(model, media):
    with pytest.raises(InputError, match="broken.png"):
        model.generate(messages=_conv([{"type": "image", "image": media["bad"]}]), max_new_tokens=2)
    with pytest.raises(InputError, match="needs 'audio'"):
        model.generate(messages=_conv([{"type": "audio"}]), max_new_tokens=2)
    with pytest.raises(InputError, match="no such file"):
        model.generate(messages=_conv([{"type": "video", "video": media["png"] + ".missing.mp4"}]), max_new_tokens=2)


def test_cli_media_flags(media, capsys):
    assert main(["generate", "--image", media["png"], "--audio", media["wav"], "--prompt", "Hi",
                 "--max-new-tokens", "4", "--json", "--greedy"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["token_ids"]) >= 1
    assert main(["generate", "--image", "/nope.png", "--prompt", "x"]) == 2
    assert capsys.readouterr().err.strip() == "error: --image /nope.png: no such file"
    assert main(["generate", "--use-audio-in-video", "--prompt", "x"]) == 2


def test_cli_speaks_to_a_wav(tmp_path, capsys):
    import wave

    out = tmp_path / "reply.wav"
    assert main(["generate", "--prompt", "Hi", "--max-new-tokens", "4", "--greedy", "--speaker", "Ethan",
                 "--out", str(out), "--talker-max-new-tokens", "30", "--json"]) == 0
    captured = capsys.readouterr()
    assert "wrote" in captured.err and "Ethan" in captured.err
    audio = json.loads(captured.out)["audio"]
    assert audio == {"path": str(out), "seconds": 30 * 2 * 240 / 24000, "sample_rate": 24000, "speaker": "Ethan"}
    with wave.open(str(out)) as w:
        assert w.getframerate() == 24000 and w.getnchannels() == 1 and w.getsampwidth() == 2
        assert w.getnframes() == 30 * 2 * 240  # 30 codes x 2 mel frames x 240 samples
    assert [p.name for p in tmp_path.iterdir()] == ["reply.wav"]  # no temp file left
    assert main(["generate", "--prompt", "Hi", "--out", str(tmp_path / "x.wav"), "--speaker", "Nobody"]) == 2
    assert "voices: Chelsie, Ethan" in capsys.readouterr().err
    assert not (tmp_path / "x.wav").exists()
    assert main(["generate", "--prompt", "Hi", "--out", "/no/such/dir/x.wav"]) == 2
    assert "the directory /no/such/dir does not exist" in capsys.readouterr().err
    # speech-only flags without --out would be ignored: refused before the model loads
    for extra in (["--speaker", "Ethan"], ["--talker-max-new-tokens", "30"]):
        assert main(["generate", "--prompt", "Hi", *extra]) == 2
        assert capsys.readouterr().err.strip() == f"error: {extra[0]} needs --out (the spoken reply is only " \
                                                  "made when it is written to a WAV)"
    assert main(["generate", "--prompt", "Hi", "--out", str(tmp_path / "y.wav"), "--talker-max-new-tokens", "0"]) == 2
    assert "--talker-max-new-tokens: must be >= 1, got 0" in capsys.readouterr().err
    assert main(["generate", "--prompt", "Hi", "--stream", "--json"]) == 2
    assert "--stream and --json contradict each other" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["reply.wav"]


@pytest.mark.parametrize("content", ["caf\udce9", [{"type": "text", "text": "x\ud800y"}]])
def test_text_that_is_not_unicode_is_refused(model, content):
    """A lone surrogate (invalid UTF-8 decoded with surrogateescape, or a JSON escape) is an InputError
    naming where it is, from messages and from the id-level encoder alike."""
    with pytest.raises(InputError, match=r"messages\[0\]\.content.*not valid UTF-8"):
        model.generate(messages=[{"role": "user", "content": content}], max_new_tokens=2)
    with pytest.raises(InputError, match="not valid UTF-8"):
        model.processor.encode("caf\udce9")


def test_cli_prompt_with_invalid_utf8(capsys):
    """Invalid bytes on the command line reach Python as lone surrogates: one error line, status 2."""
    prompt = b"caf\xe9".decode("utf-8", "surrogateescape")
    assert main(["generate", "--prompt", prompt, "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "not valid UTF-8" in err[-1]
    assert not any("Traceback" in line for line in err)
