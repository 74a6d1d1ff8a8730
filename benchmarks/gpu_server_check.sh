#!/usr/bin/env bash
# SGLang itself, with --enable-mezo, on CUDA weights, on a GPU machine that has no SGLang and no network (docs/gpu.md).
#
#   benchmarks/gpu_server_check.sh build           here: .gpu-bundle/ (about 31 MiB) from the package registry:
#                                                  SGLang 0.5.23's cp312 wheel, stripped and patched, and the 32
#                                                  small packages the GPU machine lacks (benchmarks/gpu_bundle.py)
#   benchmarks/gpu_server_check.sh run [OUT_DIR] [--adapters [--lora-backend B]]
#                                                  there, with .gpu-bundle carried beside the working tree
#                                                  (default OUT_DIR: $OUT, else ./gpu-server-check-out);
#                                                  --adapters adds the adapter check (second server, < 9 min in all)
#
# `run` unpacks the bundle, stages this package (sglang_mezo with kernels/ and server/ inside it, and the entry point
# SGLang loads plugins by), puts the sgl_kernel stand-in first on the path (the real wheel and flashinfer cannot
# travel), and runs tests/gpu_server_probe.py: a random-weight Llama served in bf16 with fp32 masters, an lr = 0
# job (bit-identical after it?), a short job, a generate from the fine-tuned weights, a reset. It writes
# server_check.json and the server's log tail (2 files) and ends within 5 minutes.
set -uo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
case "${1:-}" in
  build)
    exec "${PYTHON:-$root/.venv/bin/python}" "$root/benchmarks/gpu_bundle.py" build "$root/.gpu-bundle"
    ;;
  run)
    out=${2:-${OUT:-$root/gpu-server-check-out}}
    python=${PYTHON:-python3}
    mkdir -p "$out"
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    "$python" "$root/benchmarks/gpu_bundle.py" unpack "$root/.gpu-bundle" "$work/site" || exit 1
    mkdir -p "$work/stage/sglang_mezo-0.1.0.dist-info"
    cp -r "$root/sglang_mezo" "$work/stage/sglang_mezo"
    cp -r "$root/kernels" "$work/stage/sglang_mezo/kernels"
    cp -r "$root/server" "$work/stage/sglang_mezo/server"
    printf 'Metadata-Version: 2.1\nName: sglang-mezo\nVersion: 0.1.0\n' \
      > "$work/stage/sglang_mezo-0.1.0.dist-info/METADATA"
    printf '[sglang.srt.plugins]\nmezo = sglang_mezo.plugin:register\n' \
      > "$work/stage/sglang_mezo-0.1.0.dist-info/entry_points.txt"
    export PYTHONPATH="$work/stage/sglang_mezo/cpu_stub:$work/stage:$work/site"
    export PYTHONUNBUFFERED=1
    cd "$root"
    shift $(( $# < 2 ? $# : 2 ))
    limit=280
    [[ " $* " == *" --adapters "* ]] && limit=540  # a second server, with the LoRA pool
    timeout "$limit" "$python" tests/gpu_server_probe.py "$out" "$@"
    ;;
  *)
    echo "usage: $0 build | run [OUT_DIR] [--adapters [--lora-backend B]]" >&2
    exit 2
    ;;
esac
