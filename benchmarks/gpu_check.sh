#!/usr/bin/env bash
# The GPU check, run as it is on a GPU machine that has PyTorch, Triton, numba, transformers and pytest but no
# SGLang (the device machine of docs/gpu.md):
#
#     benchmarks/gpu_check.sh [OUT_DIR]        (default: $OUT, else ./gpu-check-out)
#
# It stages the package without SGLang (sglang_mezo/ with kernels/ inside it, as the wheel installs them; server/
# needs SGLang and is left out), runs the tests that exercise CUDA (the z stream, the kernels on CUDA against the CPU
# paths bit for bit, the fp32 masters), then benchmarks/bench_gpu.py, and writes to OUT_DIR:
#   env.txt        the GPU, driver and package versions
#   tests.txt      pytest's report
#   bench_gpu.md   the benchmark's tables; bench_gpu.json its numbers
# Four files, each small. Each part has its own time limit so that the whole ends within 4 minutes; a part that
# fails or times out is reported and the next one still runs. Exit status: non-zero if any part failed.
set -uo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-${OUT:-$root/gpu-check-out}}
mkdir -p "$out"
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
cp -r "$root/sglang_mezo" "$stage/sglang_mezo"
cp -r "$root/kernels" "$stage/sglang_mezo/kernels"
export PYTHONPATH="$stage${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
cd "$root"
status=0

{
  date -u '+%Y-%m-%d %H:%M UTC'
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1
  "$python" - <<'EOF'
import sys, torch, triton, numba, transformers
import sglang_mezo.kernels as k
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton "
      f"{triton.__version__}, numba {numba.__version__}, transformers {transformers.__version__}")
print(f"cuda available: {torch.cuda.is_available()}; staged package: {k.__file__}")
EOF
} > "$out/env.txt" 2>&1 || status=1
cat "$out/env.txt"

# the tests that touch CUDA when it is there (the compile test is left to CI: it needs no GPU)
timeout 150 "$python" -m pytest -q -p no:cacheprovider --durations=5 \
  tests/test_z_stream.py tests/test_z_kernels.py tests/test_master.py > "$out/tests.txt" 2>&1 || status=1
# the low-rank z's CUDA path against the CPU's (its other tests need no GPU)
timeout 60 "$python" -m pytest -q -p no:cacheprovider -k cuda tests/test_lowrank.py >> "$out/tests.txt" 2>&1 || status=1
tail -n 15 "$out/tests.txt"

if timeout 170 "$python" benchmarks/bench_gpu.py --out "$out" > "$out/bench.log" 2>&1; then
  rm -f "$out/bench.log"
else  # kept (a fifth file): what the benchmark printed before it failed
  status=1
  tail -n 40 "$out/bench.log"
fi
[ -f "$out/bench_gpu.md" ] && cat "$out/bench_gpu.md"
exit $status
