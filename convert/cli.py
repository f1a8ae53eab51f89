"""``omni-jax convert`` and ``omni-jax export`` subcommands.

``omni_jax.cli`` adds them with :func:`add_subcommands`, which it finds through the
``omni_jax.commands`` entry-point group (pyproject.toml); each sets ``func(args) -> int``. Errors are
:class:`~omni_jax.errors.OmniError` subclasses, which the CLI prints as one ``error: ...`` line
(exit status 2; ``--debug`` shows the traceback). ``python -m convert.cli`` runs them standalone.
"""

from __future__ import annotations

import argparse
import sys
import time


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def run_convert(args) -> int:
    from .convert import convert

    t0 = time.time()
    man = convert(args.hf_dir, args.out_dir, dtype=args.dtype, components=args.components,
                  overwrite=args.overwrite, progress=not args.quiet)
    n = len({it[2] for c in man["components"].values() for g in c["groups"] for it in g["items"]})
    print(f"converted {n} tensors ({', '.join(man['components'])}; {_size(man['source']['bytes'])} read, "
          f"{len(man['passthrough']['tensors'])} passthrough) to {args.out_dir} in {time.time() - t0:.1f} s; "
          f"{_dtype_summary(man)}", file=sys.stderr)
    return 0


def _dtype_summary(man: dict) -> str:
    """One phrase saying what dtypes were stored and whether anything was cast from the source."""
    comps = man["components"]
    stored = sorted({d for c in comps.values() for d in c["stored_dtypes"]})
    cast = [f"{name} {'/'.join(c['source_dtypes'])} -> {c['dtype']}" for name, c in comps.items() if c["cast"]]
    return f"stored {'/'.join(stored)}, " + (f"cast: {', '.join(cast)}" if cast else "as in the source (lossless)")


def parse_size(text: str) -> int:
    """``"4GB"``, ``"500MB"``, ``"100KB"``, ``"2GiB"`` or a byte count -> bytes."""
    from omni_jax.errors import InputError

    t = str(text).strip().upper()
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for unit, mult in units.items():
        if t.endswith(unit):
            t, scale = t[: -len(unit)], mult
            break
    else:
        scale = 1
    try:
        n = int(float(t) * scale)
    except ValueError:
        raise InputError(f"size '{text}' is not like 4GB, 500MB or 100KB") from None
    if n <= 0:
        raise InputError(f"size '{text}' must be positive")
    return n


def run_export(args) -> int:
    from .export import export

    t0 = time.time()
    index = export(args.converted_dir, args.hf_dir, overwrite=args.overwrite, progress=not args.quiet,
                   max_shard_bytes=parse_size(args.max_shard_size))
    print(f"exported {len(index['weight_map'])} tensors ({_size(index['metadata']['total_size'])}) to "
          f"{args.hf_dir} in {time.time() - t0:.1f} s", file=sys.stderr)
    return 0


def add_subcommands(subparsers) -> None:
    """Add ``convert`` and ``export`` to an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "convert", help="convert a Hugging Face checkpoint to the omni-jax (orbax) format",
        description="Convert a Hugging Face Qwen2.5-Omni checkpoint directory into an orbax checkpoint plus "
                    "config, tokenizer, preprocessor files and voices; streamed, atomic, verified. Lossless by "
                    "default: every tensor keeps the dtype it is stored in (bfloat16 stays bfloat16, float32 "
                    "stays float32); --dtype casts. Loading (omni_jax.load, generate --dtype) casts to the load "
                    "dtype either way.")
    p.add_argument("hf_dir", metavar="HF_DIR")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                   help="cast the floating tensors of thinker/talker/encoders to this dtype and store token2wav "
                        "in float32 (the dtype it runs in); default: keep each tensor's stored dtype, so "
                        "nothing is rounded")
    p.add_argument("--components", default=None,
                   help="comma-separated subset of thinker,audio,vision,talker,token2wav (thinker includes its "
                        "audio and vision encoders); default: all present")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    p.set_defaults(func=run_convert)

    e = subparsers.add_parser(
        "export", help="export a converted checkpoint back to Hugging Face safetensors",
        description="Write safetensors shards, index, config, tokenizer files and spk_dict.pt from a directory "
                    "written by 'convert', loadable by transformers.")
    e.add_argument("converted_dir", metavar="CONVERTED_DIR")
    e.add_argument("hf_dir", metavar="HF_DIR")
    e.add_argument("--overwrite", action="store_true", help="replace an existing HF_DIR")
    e.add_argument("--max-shard-size", default="4GiB", help="largest safetensors shard (default 4GiB)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    e.set_defaults(func=run_export)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m convert.cli")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv=None) -> int:
    """Standalone entry point, handling errors as ``omni-jax`` does."""
    from omni_jax.cli import run

    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
