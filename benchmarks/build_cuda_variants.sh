#!/usr/bin/env bash
# Build standalone CUDA-only copies of the custom-op library's kernels (custom_ops/cuda/lowbit_cuda.cu) with
# different compile-time GEMV settings, for `python benchmarks/cuda_gemv.py --variant NAME=PATH ...`.
# Each argument is NAME or NAME:-DMACRO=V,-DMACRO=V (see OA_GEMV_* in lowbit_cuda.cu); SRC=path overrides
# the source (to time an older kernel), OUT the folder (build/gemv_variants), ARCH the target (sm_90).
#   benchmarks/build_cuda_variants.sh default r4u1:-DOA_GEMV_ROWS=4,-DOA_GEMV_STEPS=1
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
src=${SRC:-$root/custom_ops/cuda/lowbit_cuda.cu}
out=${OUT:-$root/build/gemv_variants}
arch=${ARCH:-sm_90}
mkdir -p "$out"
pids=()
for spec in "$@"; do
  name=${spec%%:*}
  flags=""
  [[ $spec == *:* ]] && flags=${spec#*:} && flags=${flags//,/ }
  # shellcheck disable=SC2086
  nvcc -std=c++17 -O3 -shared -Xcompiler -fPIC -cudart static -arch="$arch" -I"$root/custom_ops/include" \
    -I"$root/custom_ops/cuda" $flags "$src" -o "$out/$name.so" &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
ls -la "$out"
