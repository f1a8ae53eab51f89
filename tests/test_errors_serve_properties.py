"""Property-based checks of the server's request parsing and the message validator: for arbitrary JSON
and malformed parts, the answer is a valid request or a 4xx error with a message, never another
exception (which the server would turn into a 500). Derandomized, so every run checks the same cases."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from omni_jax import InputError
from omni_jax.processor import validate_messages
from omni_jax.serve import ServeLimits
from omni_jax.serve.app import _no_constant
from omni_jax.serve.openai_format import RequestError, parse_chat_request

SETTINGS = settings(derandomize=True, max_examples=250, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# text with lone surrogates and other odd characters, as JSON escapes can carry them
TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=12)
SCALARS = st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | TEXT
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                    max_leaves=20)
PART_TYPES = st.sampled_from(["text", "image_url", "input_audio", "video_url", "image", "audio", "bogus", None])


def _url(kind):
    junk = st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode())
    return st.one_of(junk.map(lambda d: f"data:{kind};base64,{d}"), TEXT, st.just("https://example.com/x"),
                     st.just("/etc/hostname"), JSON)


PART = st.fixed_dictionaries({"type": PART_TYPES}, optional={
    "text": TEXT | JSON,
    "image_url": st.fixed_dictionaries({}, optional={"url": _url("image/png")}) | JSON,
    "video_url": st.fixed_dictionaries({}, optional={"url": _url("video/mp4")}) | JSON,
    "input_audio": st.fixed_dictionaries({}, optional={
        "data": st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode()) | JSON,
        "format": st.sampled_from(["wav", "mp3", "flac", "x"]) | JSON}) | JSON,
})
MESSAGE = st.fixed_dictionaries({}, optional={
    "role": st.sampled_from(["system", "user", "assistant", "tool", "developer"]) | JSON,
    "content": TEXT | st.lists(PART | JSON, max_size=3) | JSON,
})
FIELDS = st.fixed_dictionaries({}, optional={
    name: JSON | st.floats() | st.integers(-5, 5000)
    for name in ("temperature", "top_p", "top_k", "max_tokens", "max_completion_tokens", "seed", "stream",
                 "modalities", "audio", "n", "stop", "repetition_penalty", "stream_options", "user")})
BODY = st.builds(lambda m, f: {"messages": m, **f}, st.lists(MESSAGE, max_size=3) | JSON, FIELDS) | JSON


def _parse(body):
    return parse_chat_request(body, limits=ServeLimits(max_media_seconds=1.0), voices=["Chelsie", "Ethan"],
                              allow_local_media=False, speech_ok=True)


@SETTINGS
@given(BODY)
@example({"messages": [{"role": []}]})  # an unhashable role once raised TypeError (a 500)
@example({"messages": [{"role": "user", "content": [{"type": {"a": 1}}]}]})
def test_parse_answers_a_request_or_a_4xx(body):
    assert_request_or_4xx(body)


def assert_request_or_4xx(body):
    try:
        req = _parse(body)
    except RequestError as e:
        assert 400 <= e.status < 500 and e.message
        return
    try:
        assert req.messages  # a parsed request has something to answer
    finally:
        req.cleanup()


FIELD_NAMES = ("temperature", "top_p", "top_k", "max_tokens", "max_completion_tokens", "seed", "stream",
               "modalities", "audio", "n", "stop", "repetition_penalty", "stream_options", "user",
               "response_format", "ignore_eos", "return_token_ids", "use_audio_in_video", "presence_penalty")


@pytest.mark.parametrize("value", [[[]], [{}], {"a": []}, [1], "text", -1e309, 2 ** 70], ids=repr)
@pytest.mark.parametrize("name", FIELD_NAMES)
def test_every_field_with_an_odd_value_is_a_request_or_a_4xx(name, value):
    """Each top-level field, alone, with values of the wrong shape (unhashable lists and dicts once raised
    TypeError inside a set comparison); with speech asked for, the audio object's own fields too."""
    text = [{"role": "user", "content": "hi"}]
    assert_request_or_4xx({"messages": text, name: value})
    assert_request_or_4xx(
        {"messages": text, "modalities": ["text", "audio"], "audio": {"voice": "Chelsie", "format": "pcm16"},
         "stream": True, name: value} if name != "audio" else
        {"messages": text, "modalities": ["text", "audio"], "audio": {"voice": value, "format": value}})


@SETTINGS
@given(st.lists(MESSAGE | JSON, max_size=4) | JSON)
def test_message_validator_accepts_or_raises_input_error(messages):
    try:
        validate_messages(messages)
    except InputError as e:
        assert str(e)


@SETTINGS
@given(st.binary(max_size=64) | JSON.map(lambda v: json.dumps(v).encode()))
def test_body_decoding_is_json_or_a_400(raw):
    """The server's first step: bytes to a JSON value (no NaN/Infinity), else a 400."""
    try:
        json.loads(raw, parse_constant=_no_constant)
    except RequestError as e:
        assert e.status == 400
    except (json.JSONDecodeError, UnicodeDecodeError):
        pass  # the server answers these with its own 400


def test_the_strategies_reach_the_interesting_cases():
    """The generated bodies include accepted requests and refused ones (a property that only ever saw
    one kind would test nothing)."""
    from hypothesis import find

    find(BODY, lambda b: _accepts(b), settings=settings(derandomize=True, max_examples=2000, deadline=None))
    with pytest.raises(RequestError):
        _parse({"messages": [{"role": "user", "content": "hi"}], "temperature": float("nan")})


def _accepts(body):
    try:
        _parse(body).cleanup()
        return True
    except RequestError:
        return False
