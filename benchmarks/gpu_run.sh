#!/usr/bin/env bash
# The whole GPU check as one device call (the `device` tool's `run`), from the repository root:
#
#     bash benchmarks/gpu_run.sh            # carry: [".whl"]; writes $OUT/gpu_bench.json and $OUT/gpu_bench.log
#
# The device's python3 has torch and triton but not gguf: its wheel travels in .whl/ (git-ignored; fill it here
# with `pip download gguf==0.19.0 --no-deps -d .whl`). Everything else gpu_bench.py needs is on the device.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu_bench.log"
if ! python3 -c "import gguf" 2>/dev/null; then  # into a directory of its own: the image's venv may be read-only
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/gguf-*.whl 2>&1 | tail -2 | tee -a "$OUT/gpu_bench.log"
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import gguf, tokenizers, jinja2, numpy, triton" 2>&1 | tee -a "$OUT/gpu_bench.log"  # what it imports
timeout "${GPU_BENCH_TIMEOUT:-560}" python3 -u benchmarks/gpu_bench.py --out "$OUT/gpu_bench.json" \
    --budget "${GPU_BENCH_BUDGET:-380}" "$@" 2>&1 | tee -a "$OUT/gpu_bench.log"
