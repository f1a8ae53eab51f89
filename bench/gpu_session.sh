#!/usr/bin/env bash
# The GPU measurements not yet in docs/performance.md, in parts that each fit one 10-minute call on a
# lent machine (run from the repository root; JSON results go to $OUT, default ./gpu_out):
#
#   bash bench/gpu_session.sh check   # versions, GPU, which imports are missing (seconds)
#   bash bench/gpu_session.sh 1       # decode layouts + 3B thinker throughput vs roofline (~5 min)
#   bash bench/gpu_session.sh 2       # 3B thinker side by side with transformers on the GPU (~8 min:
#                                     # builds a ~12 GB float32 checkpoint first)
#   bash bench/gpu_session.sh 3       # first audio of model.stream at 3B shape + token2wav vs torch,
#                                     # float32 and TF32, against the measured matmul throughput
#
# Each step runs under its own time limit and prints its last lines and exit status, so one failing
# step does not cost the others. Packages the machine lacks (check lists them) can travel as wheels:
# `pip download --no-deps --python-version 3.12 --only-binary=:all: --platform manylinux2014_x86_64
# -d .wheels PKG...` here, `.wheels` excluded from git and named in the device call's carry; this
# script installs .wheels/*.whl (no index, no dependencies) before anything else.
set -u
OUT=${OUT:-gpu_out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".wheels/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps .wheels/*.whl || echo "== installing .wheels failed"
fi

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2 start rc
    shift 2
    echo "== $name (limit ${limit} s): $*"
    start=$(date +%s)
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    tail -n 25 "$OUT/$name.log"
    echo "== $name: exit $rc after $(( $(date +%s) - start )) s$([ $rc = 124 ] && echo ' (time limit)')"
}

case "${1:-check}" in
check)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    "$PY" - <<'EOF'
import importlib
for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "numpy", "safetensors", "tokenizers",
             "jinja2", "tqdm", "PIL", "librosa", "av", "torch", "transformers", "triton"):
    try:
        m = importlib.import_module(name)
        print(f"{name:18s} {getattr(m, '__version__', 'ok')}")
    except Exception as e:  # report every missing piece at once
        print(f"{name:18s} MISSING ({type(e).__name__}: {e})")
try:
    import jax
    print("jax devices:", jax.devices())
    import omni_jax
    print("omni_jax imports; default attention:", omni_jax.attention.default_impl())
except Exception as e:
    print("omni_jax does not import:", type(e).__name__, e)
EOF
    ;;
1)
    step decode_layers 150 "$PY" -m bench decode_layers --json "$OUT/gpu_decode_layers.json"
    step thinker_3b 420 "$PY" -m bench thinker --preset 3b --batch 1 8 --json "$OUT/gpu_3b_thinker.json"
    ;;
2)
    step compare_gpu 590 "$PY" -m bench compare --device gpu --config bench/configs/gpu_3b_thinker.json \
        --json "$OUT/gpu_compare.json"
    ;;
3)
    step gpu_stream 300 "$PY" -m bench gpu_stream --preset 3b --json "$OUT/gpu_stream_3b.json"
    # 250 codes (5 s of audio) at float32 and TF32, both sides; the JSON is rewritten after each row
    step token2wav 280 "$PY" -m bench gpu_token2wav --codes 250 --torch --json "$OUT/gpu_token2wav.json"
    ;;
*)
    echo "usage: bash bench/gpu_session.sh check|1|2|3" >&2
    exit 2
    ;;
esac
