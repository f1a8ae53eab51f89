"""``omni-jax`` command line.

Errors a user can cause print ``error: <message>`` on one line and exit with status 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from .validate import check_output_file, finite_float


def _setup_jax():
    import jax

    cache = os.path.join(os.environ.get("OMNI_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                            "omni_jax"), "xla")
    try:
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    except Exception:  # an older JAX without these options: run without the persistent cache
        pass


def _add_generate(sub):
    p = sub.add_parser("generate", help="generate a reply (text) for a prompt",
                       description="Generate a reply. Without --model, uses the embedded default model (tiny, "
                                   "random weights: its output is noise).")
    p.add_argument("--model", help="checkpoint directory (Hugging Face Qwen2.5-Omni); default: embedded model")
    p.add_argument("--system", default=None, help="system prompt (default: the Qwen2.5-Omni system prompt)")
    p.add_argument("--prompt", default=None, help="the user's message")
    p.add_argument("--audio", action="append", default=[], help="audio file, any format librosa reads (repeatable)")
    p.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    p.add_argument("--video", action="append", default=[], help="video file (repeatable)")
    p.add_argument("--use-audio-in-video", action="store_true", help="also hear the videos' audio tracks")
    p.add_argument("--speaker", default=None, help="voice of the spoken reply (Chelsie or Ethan; default Chelsie); "
                                                   "needs --out")
    p.add_argument("--out", default=None, help="write the spoken reply to this 24 kHz WAV (written atomically "
                                               "when the reply is complete)")
    p.add_argument("--no-audio", action="store_true", help="text only (no talker, no WAV)")
    p.add_argument("--talker-max-new-tokens", type=int, default=None,
                   help="most codec ids (50 per second of speech; default 4096, 250 for the embedded model); "
                        "needs --out")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    # sampling options left out take the checkpoint's generation_config.json values, then transformers'
    # GenerationConfig defaults (greedy; top-k 50 when sampling), as OmniModel.generate does
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="most new text tokens (default: the checkpoint's generation config, else 1024)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--greedy", action="store_true", help="greedy decoding, whatever the checkpoint's generation "
                                                         "config says")
    p.add_argument("--temperature", type=finite_float, default=None,
                   help="sample at this temperature (default: the checkpoint's generation config)")
    p.add_argument("--top-p", type=finite_float, default=None, help="sample with this top-p (default: the checkpoint's)")
    p.add_argument("--top-k", type=int, default=None, help="sample with this top-k; 0: no top-k (default: the "
                                                            "checkpoint's, else 50)")
    p.add_argument("--repetition-penalty", type=finite_float, default=None, help="default: the checkpoint's, else 1.0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None, help="bfloat16 or float32 (default: bfloat16; float32 for the "
                                                  "embedded model)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    from .errors import InputError

    for flag, paths in (("--audio", args.audio), ("--image", args.image), ("--video", args.video)):
        # `--image=~/x.png` reaches us unexpanded (the shell expands a leading ~ only as its own word)
        paths[:] = [os.path.expanduser(p) for p in paths]
        for p in paths:
            if not os.path.isfile(p):
                raise InputError(f"{flag} {p}: no such file")
    if args.use_audio_in_video and not args.video:
        raise InputError("--use-audio-in-video needs at least one --video")
    if args.out and args.no_audio:
        raise InputError("--out and --no-audio contradict each other")
    if args.stream and args.json:
        raise InputError("--stream and --json contradict each other (--json prints one object when the reply is "
                         "complete)")
    if args.out:
        args.out = check_output_file(args.out, "--out")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens: must be >= 1, got {args.max_new_tokens}")
    for flag, value in (("--speaker", args.speaker), ("--talker-max-new-tokens", args.talker_max_new_tokens)):
        if value is not None and not args.out:
            # speech is made only to be written: without --out the flag would be silently ignored
            raise InputError(f"{flag} needs --out (the spoken reply is only made when it is written to a WAV)")
    if args.talker_max_new_tokens is not None and args.talker_max_new_tokens < 1:
        raise InputError(f"--talker-max-new-tokens: must be >= 1, got {args.talker_max_new_tokens}")
    speaker = args.speaker or "Chelsie"
    if args.greedy and (args.temperature is not None or args.top_p is not None or args.top_k is not None):
        raise InputError("--greedy cannot be combined with --temperature/--top-p/--top-k")
    _setup_jax()
    import omni_jax
    from .processor import DEFAULT_SYSTEM_PROMPT

    model_dir = args.model
    embedded = model_dir is None
    if embedded:
        model_dir = omni_jax.default_model_path()
        print("note: using the embedded default model (tiny, random weights): its output is noise. "
              "Pass --model DIR for a real checkpoint.", file=sys.stderr)
    dtype = args.dtype or ("float32" if embedded else "bfloat16")
    model = omni_jax.load(model_dir, dtype=dtype)
    media = [{"type": "audio", "audio": p} for p in args.audio] + \
        [{"type": "image", "image": p} for p in args.image] + [{"type": "video", "video": p} for p in args.video]
    prompt = args.prompt if args.prompt is not None else ("" if media else "Hello! Who are you?")
    content = media + ([{"type": "text", "text": prompt}] if prompt else [])
    messages = [{"role": "system", "content": args.system if args.system is not None else DEFAULT_SYSTEM_PROMPT},
                {"role": "user", "content": content}]
    # --greedy: greedy; --temperature/--top-p/--top-k: sampling; none of them: the checkpoint's do_sample
    sampling_flag = args.temperature is not None or args.top_p is not None or args.top_k is not None
    do_sample = False if args.greedy else (True if sampling_flag else None)
    kw = dict(max_new_tokens=args.max_new_tokens, do_sample=do_sample, use_audio_in_video=args.use_audio_in_video,
              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
              repetition_penalty=args.repetition_penalty, seed=args.seed)
    speak = bool(args.out)
    if speak:
        kw.update(return_audio=True, speaker=speaker,
                  talker_max_new_tokens=args.talker_max_new_tokens or (250 if embedded else 4096))
    if args.stream:
        # text is printed as it comes; audio chunks are collected and the WAV is written atomically
        # once the reply is complete (a reader never sees a partial file)
        chunks = []
        for ev in model.stream(messages=messages, **kw):
            if ev.text:
                sys.stdout.write(ev.text)
                sys.stdout.flush()
            if ev.kind == "audio":
                chunks.append(ev.audio)
        sys.stdout.write("\n")
        if speak:
            from .media import write_wav

            audio = np.concatenate(chunks) if chunks else np.zeros((0,), np.float32)
            write_wav(args.out, audio, 24000)
            print(f"wrote {args.out}: {len(audio) / 24000:.2f} s of speech at 24 kHz ({speaker}, streamed)",
                  file=sys.stderr)
        return 0
    out = model.generate(messages=messages, **kw)
    if speak:
        from .media import write_wav

        write_wav(args.out, out.audio[0], 24000)
        print(f"wrote {args.out}: {len(out.audio[0]) / 24000:.2f} s of speech at 24 kHz ({speaker})"
              + (" - noise: the embedded model has random weights" if embedded else ""), file=sys.stderr)
    if args.json:
        print(json.dumps({"text": out.text[0], "token_ids": [int(x) for x in out.sequences[0, out.prompt_length:]],
                          "model": model_dir, "embedded_default": embedded,
                          **({"audio": {"path": args.out, "seconds": len(out.audio[0]) / 24000, "sample_rate": 24000,
                                        "speaker": speaker}} if speak else {})}))
    else:
        print(out.text[0])
    return 0


def _add_serve(sub):
    from .serve.scheduler import ServeLimits

    d = ServeLimits()
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (continuous batching)",
                       description="Serve POST /v1/chat/completions (text and speech, streamed or not), "
                                   "the OpenAI Realtime API on the WebSocket /v1/realtime (with a browser page at "
                                   "/), GET /v1/models, /health and /metrics. Binds 127.0.0.1 unless --host says "
                                   "otherwise. Without --model, serves the embedded default model (noise).")
    p.add_argument("--model", help="checkpoint directory; default: embedded model")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0: any free port, printed at start)")
    p.add_argument("--api-key", default=os.environ.get("OMNI_JAX_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health "
                        "(default: $OMNI_JAX_API_KEY; none: no key checked)")
    p.add_argument("--mesh", default=None, help="device mesh, e.g. data=1,tensor=8 (default: one device)")
    p.add_argument("--dtype", default=None, help="bfloat16 or float32 (default: bfloat16; float32 for the "
                                                  "embedded model)")
    p.add_argument("--model-name", default=None, help="the id /v1/models reports (default: the directory name)")
    p.add_argument("--allow-local-media", action="store_true",
                   help="let requests name local files (file:// URLs or paths) as media; off by default")
    p.add_argument("--max-batch", type=int, default=d.max_batch, help="requests decoded together (slots)")
    p.add_argument("--max-queue", type=int, default=d.max_queue, help="requests waiting for a slot; beyond: 429")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="most new text tokens per request")
    p.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens)
    p.add_argument("--max-audio-tokens", type=int, default=d.max_audio_tokens,
                   help="most codec ids per spoken reply (50 per second)")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="beyond: 413")
    p.add_argument("--max-media-seconds", type=finite_float, default=d.max_media_seconds,
                   help="longest audio or video part; beyond: 413")
    p.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels,
                   help="largest image (or video frame) in pixels; beyond: 413")
    p.add_argument("--max-sessions", type=int, default=d.max_sessions,
                   help="realtime WebSocket conversations at once (each holds its own KV cache)")
    p.add_argument("--session-idle-seconds", type=finite_float, default=d.session_idle_seconds,
                   help="close a realtime connection after this long without an event from its client")
    p.add_argument("--steps-per-call", type=int, default=d.steps_per_call,
                   help="thinker tokens per decode call: requests join and leave between calls")
    p.add_argument("--log-level", default="info")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    from .errors import InputError
    from .serve.scheduler import ServeLimits

    if not 0 <= args.port < 65536:
        raise InputError(f"--port: expected 0..65535 (0: any free port), got {args.port}")
    limits = ServeLimits(max_batch=args.max_batch, max_queue=args.max_queue, max_tokens=args.max_tokens,
                         max_prompt_tokens=args.max_prompt_tokens, max_audio_tokens=args.max_audio_tokens,
                         max_body_bytes=args.max_body_bytes, max_media_seconds=args.max_media_seconds,
                         max_image_pixels=args.max_image_pixels, steps_per_call=args.steps_per_call,
                         max_sessions=args.max_sessions, session_idle_seconds=args.session_idle_seconds)
    limits.check()
    from .serve import listen_socket

    sock = listen_socket(args.host, args.port)  # before the (possibly minutes long) model load
    try:
        return _serve_on(args, limits, sock)
    finally:
        sock.close()


def _serve_on(args, limits, sock) -> int:
    _setup_jax()
    import omni_jax
    from .serve import serve

    model_dir = args.model
    embedded = model_dir is None
    if embedded:
        model_dir = omni_jax.default_model_path()
        print("note: serving the embedded default model (tiny, random weights): its output is noise. "
              "Pass --model DIR for a real checkpoint.", file=sys.stderr)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: listening on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    mesh = omni_jax.make_mesh(args.mesh) if args.mesh else None
    model = omni_jax.load(model_dir, dtype=args.dtype or ("float32" if embedded else "bfloat16"), mesh=mesh)
    name = args.model_name or ("omni-jax-default" if embedded else os.path.basename(os.path.abspath(os.path.expanduser(model_dir))))
    serve(model, host=args.host, port=args.port, api_key=args.api_key, model_name=name, limits=limits,
          allow_local_media=args.allow_local_media, log_level=args.log_level, sock=sock)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omni-jax", description="Qwen2.5-Omni in JAX")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_serve(sub)
    _add_tool_commands(sub)
    return parser


# Subcommands that tools installed beside the library provide, through the entry-point group
# COMMANDS_GROUP (pyproject.toml): entry-point name -> (its subcommands, the package providing them).
# The library never imports the tools; a tool that is missing gets a placeholder saying so.
COMMANDS_GROUP = "omni_jax.commands"
TOOL_COMMANDS = {"convert": (("convert", "export"), "omni_jax.convert"), "train": (("train",), "omni_jax.train")}


def _add_tool_commands(sub) -> None:
    from importlib.metadata import entry_points

    added: set[str] = set()
    for ep in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        if ep.name in added:
            continue  # the same tool installed twice
        commands, package = TOOL_COMMANDS.get(ep.name, ((ep.name,), ep.value.split(":")[0]))
        try:
            add = ep.load()
        except ImportError as e:
            for name in commands:
                _add_missing(sub, name, package, f"it cannot be imported: {e}")
        else:
            add(sub)
        added.add(ep.name)
    for ep_name, (commands, package) in TOOL_COMMANDS.items():
        if ep_name not in added:
            for name in commands:
                _add_missing(sub, name, package, "it is not installed (pip install omni-jax provides it)")


def _add_missing(sub, name: str, package: str, why: str) -> None:
    """A subcommand whose package is absent: it accepts any arguments and fails with one clear line."""
    def fail(args) -> int:
        from .errors import InputError

        raise InputError(f"'omni-jax {name}' needs the {package} package, but {why}")

    # no option prefix: every argument (flags included) is taken as given, so the error below is the one seen
    p = sub.add_parser(name, help=f"(unavailable: {package} is missing)", add_help=False, prefix_chars="\0")
    p.add_argument("rest", nargs="*")
    p.set_defaults(func=fail)


def main(argv=None) -> int:
    return run(build_parser(), argv)


def run(parser: argparse.ArgumentParser, argv=None) -> int:
    """Parse and run a command: user errors print one ``error:`` line and return 2."""
    from .errors import OmniError

    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except OmniError as e:
        if getattr(args, "debug", False):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
