"""Multi-turn sessions (omni_jax.session) on the embedded default model, float32: a session's greedy
replies equal ``generate`` on the whole conversation from scratch, turn after turn; the cache holds
exactly the template's rendering of the conversation; streamed audio equals whole-utterance audio
within the documented bound (docs/realtime.md)."""

from __future__ import annotations

import numpy as np
import pytest

import omni_jax
from omni_jax import InputError

MAX_NEW = 8


@pytest.fixture(scope="module")
def model():
    return omni_jax.load(omni_jax.default_model_path(), dtype="float32")


def scratch(model, conv, max_new=MAX_NEW):
    """Greedy reply ids of ``generate`` on ``conv`` from scratch (cut after the first EOS)."""
    out = model.generate(messages=conv, max_new_tokens=max_new)
    ids = [int(x) for x in out.sequences[0, out.prompt_length:]]
    eos = model.generation_config["eos_token_id"]
    cut = next((i + 1 for i, x in enumerate(ids) if x in eos), len(ids))
    return ids[:cut]


def prompt_ids(model, conv):
    return [int(x) for x in model.encode_messages(conv)["input_ids"][0]]


def test_turns_match_generate_from_scratch(model):
    s = model.session(system="You are a helpful assistant.", minimum_slots=32)
    conv = [{"role": "system", "content": "You are a helpful assistant."}]
    slots = []
    for text in ["Hello there, how are you?", "Tell me about Paris in the spring.", "And London?"]:
        before = s.prefilled_tokens
        s.add_user(text)
        conv.append({"role": "user", "content": text})
        whole = prompt_ids(model, conv)
        # the cache holds exactly the whole conversation's prompt, and this turn prefilled only part of it
        assert s.cached_ids.tolist() == whole
        if len(conv) > 2:
            assert s.prefilled_tokens - before < len(whole) // 2
        reply = s.respond(max_new_tokens=MAX_NEW)
        assert reply.token_ids == scratch(model, conv)
        assert reply.finish_reason in ("stop", "length")
        conv.append({"role": "assistant", "content": reply.text})
        assert s.messages == conv
        slots.append(s.cache_slots)
    # the history renders as the chat template renders the whole conversation, each reply as
    # <|im_start|>assistant\n{text}<|im_end|>\n
    rendered = model.processor.apply_chat_template(conv, add_generation_prompt=False)
    assert s.rendered() == rendered
    assert rendered.endswith("<|im_start|>assistant\n" + conv[-1]["content"] + "<|im_end|>\n")
    # the cache grew by reallocation (32 slots at first), keeping what it held
    assert slots[-1] > 32 and s.cache_slots & (s.cache_slots - 1) == 0


def test_context_limit(model):
    with pytest.raises(InputError, match="max_position_embeddings"):
        model.session(max_context=model.config.thinker.text.max_position_embeddings + 1)
    s = model.session(max_context=48)
    with pytest.raises(InputError, match=r"max_context \(48\)"):
        s.add_user("word " * 60)
    assert s.messages == [] and s.cached_ids.tolist() == []  # the failed turn left nothing behind
    s.add_user("Hi")
    n = len(s.cached_ids)
    with pytest.raises(InputError, match=r"max_context \(48\)"):
        s.respond(max_new_tokens=48 - n + 1)
    reply = s.respond(max_new_tokens=48 - n)  # exactly at the limit is allowed
    assert len(reply.token_ids) <= 48 - n
    assert [m["role"] for m in s.messages] == ["user", "assistant"]


def test_cancel_keeps_what_was_produced(model):
    s = model.session()
    conv = [{"role": "user", "content": "Count from one to twenty."}]
    s.add_user(conv[0]["content"])
    seen = []
    for ev in s.respond_stream(max_new_tokens=32, steps_per_event=2):
        if ev.kind == "text":
            seen += ev.token_ids
            if len(seen) >= 5:
                s.cancel()
    reply = s.last_reply
    full = scratch(model, conv, 32)
    assert reply.finish_reason == "cancelled" and reply.cancelled
    assert reply.token_ids == seen == full[:len(seen)] and 5 <= len(seen) < len(full)
    truncated = model.processor.decode(seen)
    assert s.messages[-1] == {"role": "assistant", "content": truncated}
    conv.append({"role": "assistant", "content": truncated})
    conv.append({"role": "user", "content": "Go on."})
    s.add_user("Go on.")
    assert s.cached_ids.tolist() == prompt_ids(model, conv)
    assert s.respond(max_new_tokens=MAX_NEW).token_ids == scratch(model, conv)


def test_image_turn_positions_continue(model):
    """An image's TMRoPE positions (t, h, w over its grid) make later positions jump past the image's
    largest; a session's prefills and decode steps continue from there as generate does."""
    img = (np.random.default_rng(0).random((84, 112, 3)) * 255).astype(np.uint8)
    conv = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "What is this?"}]}]
    s = model.session()
    s.add_user(content=conv[0]["content"])
    assert s.cached_ids.tolist() == prompt_ids(model, conv)
    for follow in ("And?", None):
        reply = s.respond(max_new_tokens=MAX_NEW)
        assert reply.token_ids == scratch(model, conv)
        conv.append({"role": "assistant", "content": reply.text})
        if follow:
            conv.append({"role": "user", "content": follow})
            s.add_user(follow)
            assert s.cached_ids.tolist() == prompt_ids(model, conv)


def test_video_turn_matches_generate(model, codes_model):
    """A video part (frames sampled at 2 fps, TMRoPE's time axis over its temporal grids) in a session:
    the cache holds the prompt generate builds, greedy replies equal generate's turn after turn, and a
    spoken reply's talker (positions from the video's grid and time step) gives generate's codec ids."""
    rng = np.random.default_rng(1)
    vid = (rng.random((8, 56, 84, 3)) * 255).astype(np.uint8)
    conv = [{"role": "user", "content": [{"type": "video", "video": vid, "fps": 4.0},
                                         {"type": "text", "text": "What happens?"}]}]
    s = model.session()
    s.add_user(content=conv[0]["content"])
    assert s.cached_ids.tolist() == prompt_ids(model, conv)
    assert (s.cached_ids == model.config.thinker.video_token_id).sum() > 0
    reply = s.respond(max_new_tokens=MAX_NEW)
    assert reply.token_ids == scratch(model, conv)
    conv += [{"role": "assistant", "content": reply.text}, {"role": "user", "content": "And then?"}]
    s.add_user("And then?")
    assert s.cached_ids.tolist() == prompt_ids(model, conv)
    assert s.respond(max_new_tokens=MAX_NEW).token_ids == scratch(model, conv)
    kw = dict(talker_do_sample=False, talker_max_new_tokens=16, talker_min_new_tokens=8)
    sp = codes_model.session()
    sp.add_user(content=conv[0]["content"])
    spoken = sp.respond(max_new_tokens=MAX_NEW, return_audio=True, **kw)
    out = codes_model.generate(messages=conv[:1], max_new_tokens=MAX_NEW, return_audio=True, **kw)
    np.testing.assert_array_equal(spoken.codec_ids, out.codec_ids[0])


def test_video_with_its_audio_matches_generate(model, codes_model, tmp_path):
    """use_audio_in_video in a session: the video's audio track interleaved with its frames per 2 s chunk
    (placeholders and TMRoPE positions as generate(use_audio_in_video=True) lays them out), the same
    greedy ids and a spoken reply's codec ids."""
    from test_media import write_mp4

    path = tmp_path / "clip.mp4"
    write_mp4(path, n_frames=30, fps=10, seconds=3.0)
    conv = [{"role": "user", "content": [{"type": "video", "video": str(path)},
                                         {"type": "text", "text": "What do you hear?"}]}]
    s = model.session(use_audio_in_video=True)
    s.add_user(content=conv[0]["content"])
    ids = model.encode_messages(conv, use_audio_in_video=True)["input_ids"][0].tolist()
    assert s.cached_ids.tolist() == ids
    tc = model.config.thinker
    assert (s.cached_ids == tc.audio_token_id).sum() > 0 and (s.cached_ids == tc.video_token_id).sum() > 0
    out = model.generate(messages=conv, max_new_tokens=MAX_NEW, use_audio_in_video=True)
    assert s.respond(max_new_tokens=MAX_NEW).token_ids == [int(x) for x in out.sequences[0, out.prompt_length:]][
        :len(s.last_reply.token_ids)]
    # the random weights' reply starts with the audio-bracket id: the talker's positions take it as text
    # (it once counted as the start of another audio span: an InputError in generate and sessions alike)
    assert s.last_reply.token_ids[0] == tc.audio_start_token_id
    kw = dict(talker_do_sample=False, talker_max_new_tokens=16, talker_min_new_tokens=8)
    sp = codes_model.session(use_audio_in_video=True)
    sp.add_user(content=conv[0]["content"])
    spoken = sp.respond(max_new_tokens=MAX_NEW, return_audio=True, **kw)
    ref = codes_model.generate(messages=conv, max_new_tokens=MAX_NEW, return_audio=True, use_audio_in_video=True, **kw)
    np.testing.assert_array_equal(spoken.codec_ids, ref.codec_ids[0])
    with pytest.raises(InputError, match="no audio track"):
        silent = tmp_path / "silent.mp4"
        write_mp4(silent, n_frames=9, fps=4, with_audio=False)
        model.session(use_audio_in_video=True).add_user(content=[{"type": "video", "video": str(silent)}])


def speech_like(seconds: float, loud_at: float, quiet: float = 0.05, noise: float = 0.002, seed: int = 0) -> np.ndarray:
    """16 kHz vowel-like audio: syllables of harmonics under a pitch glide, ``quiet`` times softer
    than one loud syllable at ``loud_at`` seconds (where the utterance's maximum log-mel value
    lies), over white noise of amplitude ``noise``."""
    rng = np.random.default_rng(seed)
    sr = 16000
    t = np.arange(int(seconds * sr)) / sr
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    x = sum(rng.uniform(0.2, 1.0) / k * np.sin(k * phase) for k in range(1, 12))
    env = 0.3 + 0.7 * np.abs(np.sin(2 * np.pi * 2.5 * t))
    env = env * np.where(np.abs(t - loud_at) < 0.2, 1.0, quiet)  # everything but the loud syllable quieter
    x = 0.1 * x * env + noise * rng.standard_normal(len(t))
    return x.astype(np.float32)


def stream_in(model, wav, sizes_seed=0, max_piece=3000, audio_clamp="running"):
    s = model.session(audio_clamp=audio_clamp)
    rng = np.random.default_rng(sizes_seed)
    i = 0
    while i < len(wav):
        k = int(rng.integers(1, max_piece))
        s.append_audio(wav[i:i + k])
        i += k
    return s


def whole_logits(model, conv):
    enc = model.encode_messages(conv)
    return model.thinker_logits(enc["input_ids"], enc["attention_mask"], input_features=enc["input_features"],
                                feature_attention_mask=enc["feature_attention_mask"])[0, -1]


def test_streamed_audio_loudest_first_is_exact(model):
    """With the utterance's maximum in its first chunk the running-max floor is the whole-utterance
    floor, so streaming changes nothing but rounding: greedy ids equal, logits within 1e-4."""
    wav = speech_like(2.7, loud_at=0.5)
    conv = [{"role": "user", "content": [{"type": "audio", "audio": wav, "sampling_rate": 16000}]}]
    s = stream_in(model, wav)
    audio_id = model.config.thinker.audio_token_id
    # the first 2 s chunk was encoded and prefilled while the user was still speaking
    assert int(np.sum(s.cached_ids == audio_id)) == 50
    s.end_user_turn()
    assert s.cached_ids.tolist() == prompt_ids(model, conv)
    ref = whole_logits(model, conv)
    got = s.next_token_logits()
    assert np.abs(got - ref).max() < 1e-4
    # another chunking of the same audio gives the same numbers
    other = stream_in(model, wav, sizes_seed=1, max_piece=700)
    other.end_user_turn()
    np.testing.assert_allclose(other.next_token_logits(), got, rtol=0, atol=1e-5)
    assert s.respond(max_new_tokens=MAX_NEW).token_ids == scratch(model, conv)
    assert s.messages[0]["content"][0]["audio"].shape == wav.shape


def test_streamed_audio_loudest_late_within_bound(model):
    """With the maximum after the first chunk, the first chunk is floored at its own maximum - 8
    (docs/realtime.md, "the log-mel clamp"): a start 40 dB below the loudest syllable moves the
    logits by more than rounding, within the documented bound (1% of the logit range), greedy ids
    equal; and a second text turn reuses the cache as before."""
    wav = speech_like(4.6, loud_at=3.5, quiet=0.01, noise=1e-4)
    conv = [{"role": "user", "content": [{"type": "audio", "audio": wav, "sampling_rate": 16000}]}]
    s = stream_in(model, wav)
    s.end_user_turn()
    assert s.cached_ids.tolist() == prompt_ids(model, conv)
    ref = whole_logits(model, conv)
    diff = np.abs(s.next_token_logits() - ref).max()
    assert 1e-4 < diff < 0.01 * (ref.max() - ref.min())
    reply = s.respond(max_new_tokens=MAX_NEW)
    assert reply.token_ids == scratch(model, conv)
    conv.append({"role": "assistant", "content": reply.text})
    conv.append({"role": "user", "content": "Thanks."})
    s.add_user("Thanks.")
    assert s.cached_ids.tolist() == prompt_ids(model, conv)


def test_streamed_audio_exact_clamp(model):
    """``audio_clamp="exact"``: at the end of the turn the chunks whose features the whole turn's
    floor changes are encoded and prefilled again, so a turn whose start is 50 dB quieter than its
    loudest syllable (where the running floor changes the greedy ids) gives the whole utterance's
    numbers."""
    wav = speech_like(4.6, loud_at=3.5, quiet=0.003, noise=1e-5)
    conv = [{"role": "user", "content": [{"type": "audio", "audio": wav, "sampling_rate": 16000}]}]
    ref = whole_logits(model, conv)
    running = stream_in(model, wav)
    running.end_user_turn()
    assert np.abs(running.next_token_logits() - ref).max() > 0.01  # the running floor matters here
    s = stream_in(model, wav, audio_clamp="exact")
    s.end_user_turn()
    assert s.cached_ids.tolist() == prompt_ids(model, conv)
    assert np.abs(s.next_token_logits() - ref).max() < 1e-4
    assert s.respond(max_new_tokens=MAX_NEW).token_ids == scratch(model, conv)


@pytest.fixture(scope="module")
def codes_model():
    """The default model without its token2wav weights: spoken replies give codec ids only (no vocoder
    compile in this file; the streamed vocoder is StreamingToken2Wav's, tested in test_streaming)."""
    m = omni_jax.load(omni_jax.default_model_path(), dtype="float32")
    m.token2wav_params = None
    return m


def test_spoken_replies_match_generate(codes_model):
    """With return_audio, the talker's prompt is the whole conversation (hidden states and embeddings
    kept beside the cache), so each turn's codec ids equal generate(return_audio=True)'s."""
    m = codes_model
    kw = dict(talker_do_sample=False, talker_max_new_tokens=24, talker_min_new_tokens=12)
    s = m.session()
    conv = []
    for text in ["Hello", "How are you today?"]:
        s.add_user(text)
        conv.append({"role": "user", "content": text})
        reply = s.respond(max_new_tokens=MAX_NEW, return_audio=True, **kw)
        out = m.generate(messages=conv, max_new_tokens=MAX_NEW, return_audio=True, **kw)
        assert reply.token_ids == scratch(m, conv)
        assert len(reply.codec_ids) >= 12
        np.testing.assert_array_equal(reply.codec_ids, out.codec_ids[0])
        conv.append({"role": "assistant", "content": reply.text})
    with pytest.raises(InputError, match="speaker"):
        s.respond(return_audio=True, speaker="Nobody")
    with pytest.raises(InputError, match="unknown argument"):
        s.respond(talker_speed=2)


def test_session_input_errors(model):
    s = model.session()
    with pytest.raises(InputError, match="16000 Hz"):
        s.append_audio(np.zeros(100, np.float32), sampling_rate=8000)
    with pytest.raises(InputError, match="no streamed user turn"):
        s.end_user_turn()
    with pytest.raises(InputError, match="conversation is empty"):
        s.respond()
    with pytest.raises(InputError, match="frame rate"):  # a video array without its fps
        s.add_user(content=[{"type": "video", "video": np.zeros((2, 28, 28, 3), np.uint8)}])
    assert s.messages == []
    s.add_user("Hi")
    with pytest.raises(InputError, match="NaN"):
        s.append_audio(np.array([0.0, np.nan], np.float32))
    with pytest.raises(InputError, match="audio_clamp"):
        model.session(audio_clamp="none")
    # a discarded streamed turn leaves nothing behind: the next text turn is the conversation without it
    s.append_audio(np.zeros(40000, np.float32))
    assert int(np.sum(s.cached_ids == model.config.thinker.audio_token_id)) == 50
    s.discard_user_turn()
    s.add_user("Again")
    conv = [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Again"}]
    assert s.cached_ids.tolist() == prompt_ids(model, conv)


def test_new_instructions_apply_from_the_next_turn(model):
    """set_system replaces the system message mid-conversation: the next reply is generate's on the
    conversation with the new system message (the cache is rewritten from its first changed token),
    and a reply without audio cannot be truncated by audio time."""
    from omni_jax import InputError

    s = model.session(system="Be brief.", minimum_slots=32)
    s.add_user("Hello there")
    first = s.respond(max_new_tokens=MAX_NEW)
    s.set_system("Answer in French.")
    s.add_user("And now?")
    conv = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello there"},
            {"role": "assistant", "content": first.text}, {"role": "user", "content": "And now?"}]
    assert s.cached_ids.tolist() == prompt_ids(model, conv)
    assert s.respond(max_new_tokens=MAX_NEW).token_ids == scratch(model, conv)
    with pytest.raises(InputError, match="truncate_reply: the last reply has no audio"):
        s.truncate_reply(0.5)
    s.set_system(None)
    assert s.messages[0]["role"] == "user"


def av_logits(model, conv, aiv):
    enc = model.encode_messages(conv, use_audio_in_video=aiv)
    mm = {k: enc[k] for k in ("input_features", "feature_attention_mask", "pixel_values_videos", "video_grid_thw",
                              "video_second_per_grid") if enc.get(k) is not None}
    return enc["input_ids"][0].tolist(), model.thinker_logits(enc["input_ids"], enc["attention_mask"],
                                                               use_audio_in_video=aiv, **mm)[0, -1]


def test_streamed_video_with_its_audio_matches_the_whole_turn(model):
    """Camera and microphone streamed together (use_audio_in_video): each 2 s chunk is prefilled once
    its frames and its audio are in (video tokens, then audio tokens, TMRoPE positions time-aligned), so
    the end of the turn leaves only the last partial chunk. Frames captured at 6 fps are sampled at
    2 fps (the first frame at or after each half second), an odd count padded by repeating the last;
    an audio-only start gains its video when the first frame arrives. The result is the whole turn's:
    the cache holds generate's prompt, logits within 1e-4, the same greedy ids, and the next turn
    reuses the cache."""
    tc = model.config.thinker
    rng = np.random.default_rng(3)
    captured = (rng.random((27, 56, 84, 3)) * 255).astype(np.uint8)  # 4.5 s at 6 fps
    wav = speech_like(4.6, loud_at=0.5)
    s = model.session(use_audio_in_video=True)
    s.add_user("Hello")
    conv = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": s.respond(max_new_tokens=4).text}]
    s.append_audio(wav[:40000], text="Look and listen:")  # 2.5 s of audio before the first frame
    assert int(np.sum(s.cached_ids == tc.audio_token_id)) == 50  # an audio turn so far
    i, j, during = 40000, 0, []
    while i < len(wav) or j < len(captured):
        s.append_video(captured[j:j + 4], fps=6.0)
        j += 4
        s.append_audio(wav[i:i + 5000])
        i += 5000
        during.append((int(np.sum(s.cached_ids == tc.video_token_id)), int(np.sum(s.cached_ids == tc.audio_token_id))))
    # two complete chunks (8 samples, 4 s) were prefilled while the user was still speaking
    per_chunk = during[-1][0] // 2
    assert during[-1] == (2 * per_chunk, 100) and per_chunk > 0
    s.end_user_turn()
    part = s.messages[-1]["content"][-1]
    np.testing.assert_array_equal(part["video"], np.concatenate([captured[::3], captured[24:25]]))
    np.testing.assert_array_equal(part["audio"], wav)
    conv.append({"role": "user", "content": [{"type": "text", "text": "Look and listen:"}, part]})
    assert [m["role"] for m in s.messages] == [m["role"] for m in conv]
    ids, ref = av_logits(model, conv, True)
    assert s.cached_ids.tolist() == ids
    assert np.abs(s.next_token_logits() - ref).max() < 1e-4
    reply = s.respond(max_new_tokens=MAX_NEW)
    out = model.generate(messages=conv, max_new_tokens=MAX_NEW, use_audio_in_video=True)
    assert reply.token_ids == [int(x) for x in out.sequences[0, out.prompt_length:]][:len(reply.token_ids)]
    conv += [{"role": "assistant", "content": reply.text}, {"role": "user", "content": "And then?"}]
    before = s.prefilled_tokens
    s.add_user("And then?")
    assert s.cached_ids.tolist() == model.encode_messages(conv, use_audio_in_video=True)["input_ids"][0].tolist()
    assert s.prefilled_tokens - before < 40


def test_streamed_video_alone_and_its_errors(model):
    """A video-only streamed turn (frames given as 2 fps samples) prefills each 2 s chunk as it completes
    and equals the whole video; mixing streamed audio and video without use_audio_in_video, a frame
    size change, a capture rate under 2 fps and non-uint8 frames are refused without harm to the turn;
    with use_audio_in_video a turn cannot end with video and no audio."""
    tc = model.config.thinker
    rng = np.random.default_rng(4)
    frames = (rng.random((10, 56, 56, 3)) * 255).astype(np.uint8)
    s = model.session()
    s.append_video(frames[:3], text="What is this?")
    assert int(np.sum(s.cached_ids == tc.video_token_id)) == 0
    with pytest.raises(InputError, match="use_audio_in_video"):
        s.append_audio(np.zeros(1600, np.float32))
    with pytest.raises(InputError, match="frame size cannot change"):
        s.append_video(np.zeros((1, 56, 84, 3), np.uint8))
    with pytest.raises(InputError, match="fps"):
        s.append_video(frames[3:4], fps=1.0)
    with pytest.raises(InputError, match="uint8"):
        s.append_video(frames[3:4].astype(np.float32))
    s.append_video(frames[3])  # one [H, W, 3] frame
    k = int(np.sum(s.cached_ids == tc.video_token_id))
    assert k > 0  # the first chunk (4 samples) is in the cache
    s.append_video(frames[4:])
    assert int(np.sum(s.cached_ids == tc.video_token_id)) == 2 * k
    s.end_user_turn()
    conv = [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                         {"type": "video", "video": frames, "fps": 2.0}]}]
    ids, ref = av_logits(model, conv, False)
    assert s.cached_ids.tolist() == ids
    assert np.abs(s.next_token_logits() - ref).max() < 1e-4
    assert s.respond(max_new_tokens=MAX_NEW).token_ids == scratch(model, conv)
    a = model.session(use_audio_in_video=True)
    a.append_video(frames[:2])
    with pytest.raises(InputError, match="no audio"):
        a.end_user_turn()
    a.discard_user_turn()
    a.add_user("Hi")
    assert a.cached_ids.tolist() == prompt_ids(model, [{"role": "user", "content": "Hi"}])
