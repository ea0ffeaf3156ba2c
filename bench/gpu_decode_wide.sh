#!/usr/bin/env bash
# Decode beyond batch 32 on the GPU engine (bench-0.7b, prompt 128, 128 new tokens, BF16 and FP8
# weights): batches 32, 64, 96 and 128 with the GEMV kernels and CUDA graphs up to 128 rows (the
# default) against the limit of before 2026-12-02 (steps beyond 32 rows on the backend's linears,
# eagerly), in the same call; batch 128 against a limit of 64; and batch 64 with the k-loop GEMV
# kernel instead of the row-range one in parts of 32 rows (DSV3_DECODE_MMA_GEMV_ROWS=0).
# Writes bench/results/gpu_decode_wide{,_base64,_kloop}.json (commit, date, GPU) and the logs to
# $OUT (default /tmp/gpu_decode_wide).
#   bench/gpu_decode_wide.sh BUILD_DIR     (DSV3_COMMIT names the commit when BUILD_DIR is prebuilt)
# ~100 s on the H200 (2026-12-02).
set -euo pipefail
build=${1:?usage: $0 BUILD_DIR}
bench="$build/dsv3_bench_gpu_decode"
[ -x "$bench" ] || { echo "gpu_decode_wide.sh: $bench is not an executable (build the CUDA targets first)" >&2; exit 2; }
OUT=${OUT:-/tmp/gpu_decode_wide}
mkdir -p "$OUT"
"$bench" --batch 32,64,96,128 --weights bf16,fp8 --variants none --out gpu_decode_wide | tee "$OUT/wide.txt"
"$bench" --batch 128 --weights bf16,fp8 --variants none --base-gemv-rows 64 --out gpu_decode_wide_base64 |
  tee "$OUT/base64.txt"
DSV3_DECODE_MMA_GEMV_ROWS=0 "$bench" --batch 64 --weights bf16 --variants none --gemv-rows 64 --base-gemv-rows 64 \
  --out gpu_decode_wide_kloop | tee "$OUT/kloop.txt"
