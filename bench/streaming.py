"""Streaming speech latency: time to first text, time to first audio, real-time factor.

    python -m bench streaming [--model DIR] [--json out.json]

Runs ``model.stream(..., return_audio=True)`` once to compile, then measures a second run (the
embedded default model when no ``--model``). RTF = wall time of the stream / seconds of audio it
produced; "ahead of playback" checks that every audio chunk arrived before the audio already
delivered would have finished playing (playback starting at the first chunk), and the smallest
slack by which one did.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from .util import write_json


def stream_figures(events, sr: int = 24000) -> dict:
    """What one ``model.stream`` run measured, from its events (``t``: seconds since the call).

    RTF = the stream's wall time / the seconds of audio it produced. Ahead of playback: playback
    starts when the first chunk arrives and plays every chunk back to back; chunk ``i`` must
    arrive before the audio before it has played out. Its slack is how long before that it came
    (negative: late, a gap in the audio); ``min_slack_s`` is the smallest over the chunks after
    the first, ``ahead_of_playback`` that none was late by more than a millisecond (None: no audio),
    ``start_buffer_s`` how long a player would have to wait after the first chunk before starting
    to play the stream without a gap (0 when it is ahead of playback).
    """
    text = [e for e in events if e.kind == "text"]
    audio = [e for e in events if e.kind == "audio"]
    total = events[-1].t
    secs = sum(len(e.audio) for e in audio) / sr
    start, played, slack = audio[0].t if audio else 0.0, 0.0, []
    for i, e in enumerate(audio):
        if i:
            slack.append(start + played - e.t)
        played += len(e.audio) / sr
    return dict(time_to_first_text_s=round(text[0].t, 4) if text else None,
                time_to_first_audio_s=round(audio[0].t, 4) if audio else None, total_s=round(total, 3),
                audio_s=round(secs, 3), rtf=round(total / secs, 3) if secs else None,
                audio_chunks=len(audio), ahead_of_playback=all(x >= -1e-3 for x in slack) if audio else None,
                min_slack_s=round(min(slack), 4) if slack else None,
                start_buffer_s=round(max([0.0] + [-x for x in slack]), 4) if audio else None,
                chunk_times_s=[round(e.t, 3) for e in audio],
                chunk_seconds=[round(len(e.audio) / sr, 3) for e in audio],
                text_tokens=sum(len(e.token_ids) for e in text))


def run(model_dir=None, max_new_tokens=64, talker_max_new_tokens=250) -> dict:
    import jax

    import omni_jax

    path = model_dir or omni_jax.default_model_path()
    model = omni_jax.load(path, dtype="float32" if model_dir is None else "bfloat16")
    conv = [{"role": "user", "content": "Tell me a short story about the sea."}]
    kw = dict(max_new_tokens=max_new_tokens, return_audio=True, talker_max_new_tokens=talker_max_new_tokens,
              talker_min_new_tokens=talker_max_new_tokens // 2, eos_token_id=[])
    t0 = time.perf_counter()
    list(model.stream(messages=conv, **kw))
    compile_s = time.perf_counter() - t0
    events = list(model.stream(messages=conv, **kw))
    return dict(model=path, backend=jax.default_backend(), device=str(jax.devices()[0].device_kind),
                date=time.strftime("%Y-%m-%d"), machine=f"{os.cpu_count()} CPU cores", precision="float32",
                first_compile_run_s=round(compile_s, 2), **stream_figures(events))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench streaming")
    p.add_argument("--model", default=None)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--talker-max-new-tokens", type=int, default=250)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    res = run(a.model, a.max_new_tokens, a.talker_max_new_tokens)
    print(json.dumps(res, indent=1))
    write_json(a.json, res)


if __name__ == "__main__":
    main()
