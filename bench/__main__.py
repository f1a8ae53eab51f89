"""``python -m bench``: every benchmark behind one entry.

    python -m bench                 # list the benchmarks
    python -m bench NAME [ARGS...]  # run one (``python -m bench NAME --help`` for its options)

Each benchmark is a module of this package with a ``main(argv)``; results go to the ``--json``
path given (by convention under ``bench/results/``), checked before any work starts.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module, what it measures, where it runs)
BENCHMARKS = {
    "compare": ("compare", "omni-jax side by side with transformers on one random-weight model (ratios)", "CPU/GPU"),
    "thinker": ("thinker", "thinker prefill/decode throughput against the hardware limit", "CPU/GPU"),
    "serve": ("serve", "load generator for omni-jax serve against the same requests offline", "CPU/GPU"),
    "train": ("train", "training-step throughput against a transformers training loop", "CPU/GPU"),
    "streaming": ("streaming", "streamed speech: time to first text and audio, real-time factor", "CPU/GPU"),
    "realtime": ("realtime", "first audio after a spoken question: /v1/realtime against chat completions", "CPU/GPU"),
    "dit_length": ("dit_length", "the DiT against transformers as the reply grows", "CPU/GPU"),
    "decode_layers": ("decode_layers", "decode-step cost of the decoder layer layouts", "CPU/GPU"),
    "vision_window": ("vision_window", "vision window attention computed block by block", "CPU/GPU"),
    "convert_memory": ("convert_memory", "peak resident memory of convert/export on a large checkpoint", "CPU"),
    "tpu": ("tpu", "ahead-of-time compilation for a TPU topology: memory, FLOPs, estimates", "CPU + libtpu"),
    "attention": ("attention", "attention kernels against XLA and cuDNN", "GPU"),
    "gpu_check": ("gpu_check", "correctness of the Pallas kernels on the device", "GPU"),
    "gpu_memory": ("gpu_memory", "peak device memory of a long thinker prefill", "GPU"),
    "gpu_stream": ("gpu_stream", "first-audio latency of model.stream at a published shape", "GPU"),
    "gpu_token2wav": ("gpu_token2wav", "token2wav real-time factor, float32 and TF32", "GPU"),
}


def _json_arg(argv):
    for i, a in enumerate(argv):
        if a == "--json" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--json="):
            return a.split("=", 1)[1]
    return None


def list_benchmarks() -> str:
    w = max(map(len, BENCHMARKS))
    lines = ["usage: python -m bench NAME [ARGS...]", "", "benchmarks:"]
    lines += [f"  {name:<{w}}  {what} [{where}]" for name, (_, what, where) in BENCHMARKS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "list"):
        print(list_benchmarks())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        print(f"error: no benchmark named {name!r}\n\n{list_benchmarks()}", file=sys.stderr)
        return 2
    from omni_jax.errors import OmniError

    try:
        from .util import check_json_target

        check_json_target(_json_arg(rest))
        module = importlib.import_module(f"{__package__}.{BENCHMARKS[name][0]}")
        return module.main(rest) or 0
    except OmniError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
