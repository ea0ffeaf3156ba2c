#!/usr/bin/env bash
# The one script for the GPU machine: configure and build with CUDA (sm_90a), run the GPU backend
# tests (every op on CUDA vs the CPU reference), compute-sanitizer memcheck on the GPU test binary,
# and the GPU benchmarks. Logs and JSON go to $OUT (default bench/results/gpu_run); the summary is
# $OUT/gpu_latest.json, which the caller commits as bench/results/gpu_latest.json.
# With HF=1 it also builds `dsv3` and runs tools/hf_gpu_bench.py (transformers' baseline).
# With PREBUILT=DIR it skips the build and runs the binaries in DIR (built elsewhere for sm_90a with
# -DDSV3_CUDA=ON; the GPU image need not carry our Debian build dependencies).
# MEMCHECK_FILTER (a gtest filter) narrows the memcheck run to the suites a change touched;
# TRAIN_ARGS adds flags to dsv3_bench_gpu_train (e.g. --precisions bf16,fp8 when device time is short).
# SPEC_MODEL=DIR (a checkpoint with an MTP module, e.g. from `dsv3 train`; SPEC_PROMPT its prompt
# text) adds MTP speculation at batch 1 on the GPU engine (dsv3_bench_decode --device cuda).
# STEPS (comma-separated, default all): tests gemm mla hf attention decode chain stream prefill spec accum
# train memcheck summary. A lease too short for all of them runs them over several calls; the summary reads
# the JSON of earlier calls from $OUT (copy them there first).
# PACKED=FILE runs the binaries of a tarball from bench/gpu_pack.sh (PREBUILT with the libraries
# they need beside them), so that a lease's minutes go to the runs rather than to a build.
# Usage: OUT=/some/dir DSV3_COMMIT=$(git rev-parse --short HEAD) [HF=1] [PREBUILT=DIR] bench/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu_run}
mkdir -p "$OUT"
export DSV3_COMMIT=${DSV3_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
jobs=$(nproc)
status=0
step() { echo "== $*" | tee -a "$OUT/summary.txt"; }
want() { [ -z "${STEPS:-}" ] || [[ ",$STEPS," == *",$1,"* ]]; }
# A benchmark step: bench NAME JSON TITLE CMD…: runs CMD when STEPS wants NAME, its output to
# $OUT/JSON.txt and the summary, then takes bench/results/JSON.json.
bench() {
  local name=$1 json=$2 title=$3
  shift 3
  want "$name" || return 0
  step "$title"
  "$@" 2>&1 | tee "$OUT/$json.txt" | tee -a "$OUT/summary.txt"
  take "$json.json"
}
# A bench's JSON is taken only if this run wrote it (newer than the stamp): a bench that could not
# write must not leave the checkout's committed file in its place.
stamp=$(mktemp)
take() {
  if [ "bench/results/$1" -nt "$stamp" ]; then cp "bench/results/$1" "$OUT/"
  else echo "bench/results/$1 was not written by this run" | tee -a "$OUT/summary.txt"; status=1; fi
}

# The binaries this script runs (bench/gpu_pack.sh packs the same list).
GPU_TARGETS="dsv3 dsv3_gpu_tests dsv3_bench_gpu_gemm dsv3_bench_gpu_mla_decode dsv3_bench_gpu_train dsv3_bench_gpu_attention dsv3_bench_gpu_decode dsv3_bench_gpu_chain dsv3_bench_gpu_stream dsv3_bench_gpu_prefill dsv3_bench_gpu_fp8_accum dsv3_bench_decode"
# PACKED=FILE: a tarball from bench/gpu_pack.sh, unpacked and run as PREBUILT with its libraries.
if [ -n "${PACKED:-}" ]; then
  [ -f "$PACKED" ] || { echo "gpu.sh: PACKED=$PACKED: no such file" >&2; exit 2; }
  unpacked=$(mktemp -d)
  tar -xJf "$PACKED" -C "$unpacked" ||
    { echo "gpu.sh: PACKED=$PACKED: could not unpack it (an xz tarball of bench/gpu_pack.sh; needs xz)" >&2; exit 2; }
  PREBUILT=$unpacked/bin
  # Python (transformers' baseline, the summary) keeps the image's own libraries: ours are older
  # builds of some.
  python_ld=${LD_LIBRARY_PATH:-}
  lib="$unpacked/lib"
  # The CLI links NCCL, which a GPU image may have only inside torch's environment.
  if ! ldconfig -p 2>/dev/null | grep 'libnccl\.so\.2' >/dev/null; then
    if nccl=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null) &&
      [ -d "$nccl" ]; then lib="$lib:$nccl"
    else echo "gpu.sh: warning: no libnccl.so.2 for the loader nor in torch's environment: dsv3 will not start" |
      tee -a "$OUT/summary.txt"; fi
  fi
  export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  # The binaries look for fixtures and data under the source directory they were built from.
  src=$(cat "$unpacked/source_dir")
  if [ "$src" != "$PWD" ] && [ ! -e "$src" ] && ! { mkdir -p "$(dirname "$src")" && ln -s "$PWD" "$src"; }; then
    echo "gpu.sh: cannot link $src to this checkout: the fixture tests will fail and results go elsewhere" |
      tee -a "$OUT/summary.txt"
    status=1
  fi
  step "packed binaries of $(cat "$unpacked/commit") (source dir $src)"
  [ "$(cat "$unpacked/commit")" = "$DSV3_COMMIT" ] ||
    echo "gpu.sh: warning: the binaries are of $(cat "$unpacked/commit"), the results are labelled $DSV3_COMMIT" |
    tee -a "$OUT/summary.txt"
fi
B=${PREBUILT:-build-gpu}
if [ -z "${PREBUILT:-}" ]; then
  step "configure + build (CUDA, sm_90a)"
  cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DDSV3_CUDA=ON -DDSV3_CUDA_ARCHS=90a >"$OUT/build.log" 2>&1
  # -k 0: a target that fails to build does not stop the others (each step checks its binary).
  # shellcheck disable=SC2086
  cmake --build build-gpu -j "$jobs" --target $GPU_TARGETS \
    -- -k 0 >>"$OUT/build.log" 2>&1 || { status=1; grep -E "error|FAILED" "$OUT/build.log" | head -30; }
else
  step "prebuilt binaries from $B"
fi
# The CLI tests in the GPU binary run this dsv3 (a prebuilt set is away from its build directory).
[ -x "$B/dsv3" ] && export DSV3_CLI="$(cd "$B" && pwd)/dsv3"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/summary.txt"

if want tests; then
  step "GPU backend tests (every op on CUDA vs CPU and the double reference)"
  timeout ${TEST_TIMEOUT:-300} "$B"/dsv3_gpu_tests --gtest_filter='-*CpuIsDeterministic*' --gtest_output=json:"$OUT/gpu_tests.json" \
    >"$OUT/gpu_tests.log" 2>&1
  rc=$?
  grep -E "^\[  (PASSED|FAILED) |tests? ran|FAILED  \]" "$OUT/gpu_tests.log" | tee -a "$OUT/summary.txt"
  [ $rc -eq 0 ] || status=1
fi

bench gemm gpu_gemm "GEMM benchmark (FP8 block-scaled ours vs cuBLASLt direct, BF16)" \
  timeout 120 "$B"/dsv3_bench_gpu_gemm
bench mla gpu_mla_decode "absorbed-MLA decode kernel bandwidth (batch 64, context 4096)" \
  timeout 120 "$B"/dsv3_bench_gpu_mla_decode

if [ "${HF:-0}" = 1 ] && want hf; then
  step "transformers baseline (bench-0.7b: training B=8 T=2048, decode batch 1/32)"
  "$B"/dsv3 info --preset bench-0.7b --json >"$OUT/bench07b_info.json" &&
    env LD_LIBRARY_PATH="${python_ld-${LD_LIBRARY_PATH:-}}" python3 tools/hf_gpu_bench.py --info "$OUT/bench07b_info.json" --out "$OUT/hf_gpu.json" 2>&1 |
    tee "$OUT/hf_gpu.txt" | tee -a "$OUT/summary.txt" ||
    { status=1; echo "transformers baseline failed: needs $B/dsv3 (for the config) and torch; see $OUT/hf_gpu.txt" |
        tee -a "$OUT/summary.txt"; }
fi

bench attention gpu_attention "BF16 tensor-core attention vs the FP32 kernels (bench-0.7b shape, forward and backward)" \
  timeout 180 "$B"/dsv3_bench_gpu_attention
bench decode gpu_decode \
  "decode on the GPU engine (bench-0.7b, prompt 128, 128 new tokens, batch 1 and 32; vs transformers when HF=1)" \
  timeout 240 "$B"/dsv3_bench_gpu_decode --hf "$OUT/hf_gpu.json"
bench chain gpu_chain "dependent launches (the floor kernel boundaries put under a batch-1 decode step of 168 kernels)" \
  timeout 60 "$B"/dsv3_bench_gpu_chain
bench stream gpu_stream "read orders of the batch-32 experts' weights (bench-0.7b's 33 groups of gate and up; no arithmetic)" \
  timeout 60 "$B"/dsv3_bench_gpu_stream
bench prefill gpu_prefill \
  "prefill on the GPU engine (bench-0.7b, one prompt of 1,024-4,000 tokens; the latent attention's prefill kernel vs its row kernel)" \
  timeout 180 "$B"/dsv3_bench_gpu_prefill --prompts 1024,2048,4000 --rows 0,2

if [ -n "${SPEC_MODEL:-}" ] && want spec; then
  step "MTP speculation on the GPU engine (batch 1, greedy, BF16 weights, graphs and eager; $SPEC_MODEL)"
  timeout 240 "$B"/dsv3_bench_decode --device cuda --weights bf16 --spec-model "$SPEC_MODEL" \
    ${SPEC_PROMPT:+--spec-prompt "$SPEC_PROMPT"} 2>&1 | tee "$OUT/gpu_spec.txt" | grep -v "^dsv3: " | tee -a "$OUT/summary.txt"
  take gpu_spec.json
fi

bench accum gpu_fp8_accum "FP8 accumulation on the tensor cores (no promotion vs every 128) beside the CPU emulation" \
  timeout 120 "$B"/dsv3_bench_gpu_fp8_accum
# TRAIN_ARGS is split into words on purpose (flags and their values).
# shellcheck disable=SC2086
bench train gpu_train "training throughput on the GPU (bench-0.7b, B=8, T=2048; vs transformers when HF=1)" \
  timeout "${TRAIN_TIMEOUT:-240}" "$B"/dsv3_bench_gpu_train --hf "$OUT/hf_gpu.json" ${TRAIN_ARGS:-}

if want memcheck; then
  step "compute-sanitizer memcheck on the GPU test binary"
  if command -v compute-sanitizer >/dev/null || [ -x /usr/local/cuda/bin/compute-sanitizer ]; then
    CS=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
    # --report-api-errors no: a decode step whose capture into a CUDA graph fails (a launch on the
    # legacy stream, which CUDA refuses during a capture) runs eagerly instead, by design, and the
    # graph tests provoke that on purpose; memcheck would count each refused call as an error. Every
    # CUDA call of ours is checked by the code itself (DSV3_CUDA_CHECK), so API errors are not lost.
    # Every GPU test but CudaCli's (they start `dsv3` as child processes, which memcheck instruments
    # too: over 7 minutes for the first) and the bench-0.7b-sized cases; the binary's CPU-only tests
    # (ParallelBackward, the CPU determinism cases) are left out too. Written as exclusions so that a
    # new GPU suite is checked without being listed here. ~230 s on the H200 (2026-12-01); on
    # 2026-12-03 it had reached 67 of the suites' tests after 420 s (CudaEngine and CudaAttnBf16 the
    # long ones), so under a lease's 10-minute command limit split it with MEMCHECK_FILTER.
    timeout ${MEMCHECK_TIMEOUT:-1200} "$CS" --tool memcheck --report-api-errors no --error-exitcode 3 "$B"/dsv3_gpu_tests \
      --gtest_filter="${MEMCHECK_FILTER:-*:-CudaCli.*:ParallelBackward.*:*CpuIsDeterministic*:*Bench07b*}" >"$OUT/memcheck.log" 2>&1
    rc=$?
    tail -3 "$OUT/memcheck.log" | tee -a "$OUT/summary.txt"
    echo "memcheck exit code $rc" | tee -a "$OUT/summary.txt"
    [ $rc -eq 0 ] || status=1
  else
    echo "compute-sanitizer not found" | tee -a "$OUT/summary.txt"
    status=1
  fi
fi

if want summary; then
step "summary"
env LD_LIBRARY_PATH="${python_ld-${LD_LIBRARY_PATH:-}}" python3 - "$OUT" <<'PY' | tee -a "$OUT/summary.txt"
import json, os, sys
out = sys.argv[1]
def load(name):
    p = os.path.join(out, name)
    return json.load(open(p)) if os.path.exists(p) else None
gemm = load("gpu_gemm.json")
mla = load("gpu_mla_decode.json")
hf = load("hf_gpu.json")
train = load("gpu_train.json")
tests = load("gpu_tests.json")
decode = load("gpu_decode.json")
attn = load("gpu_attention.json")
accum = load("gpu_fp8_accum.json")
spec = load("gpu_spec.json")
s = {"commit": os.environ.get("DSV3_COMMIT"), "date": gemm.get("date") if gemm else None,
     "gpu": (gemm or {}).get("machine", {}).get("gpu"),
     "gpu_tests": {"tests": tests.get("tests"), "failures": tests.get("failures")} if tests else None,
     # null when a step did not produce its JSON: never a guess.
     "train_speedup_vs_hf_bf16": None, "train_fp8_over_bf16": None,
     "decode_bs1_speedup_vs_hf": None, "decode_bs32_speedup_vs_hf": None, "mla_decode_bw_fraction": None,
     "fp8_gemm_vs_cublaslt": None, "gemm": gemm["rows"] if gemm else None}
if hf:
    s["hf"] = hf
if train:
    s["train"] = train
    # Ours in BF16 over transformers in BF16, and our FP8 over our BF16 (dsv3_bench_gpu_train).
    s["train_speedup_vs_hf_bf16"] = train.get("train_speedup_vs_hf_bf16")
    s["train_fp8_over_bf16"] = train.get("train_fp8_over_bf16")
if mla:
    s["mla_decode_bw_fraction"] = mla["mla_decode_bw_fraction_h16"]
    s["mla_decode"] = mla["rows"]
    s["copy_gbps_read_plus_write"] = mla["copy_gbps_read_plus_write"]
if decode:
    s["decode_bs1_speedup_vs_hf"] = decode.get("decode_bs1_speedup_vs_hf")
    s["decode_bs32_speedup_vs_hf"] = decode.get("decode_bs32_speedup_vs_hf")
    # Those are BF16 weights (transformers' precision); F32 and FP8 weights beside them.
    s["decode_weights"] = "bf16"
    for b in (1, 32):
        for f in ("f32", "fp8"):
            k = "decode_bs%d_speedup_vs_hf_%s_weights" % (b, f)
            s[k] = decode.get(k)
    s["decode"] = decode.get("runs")
if attn:
    s["attention_bf16"] = {k: attn.get(k) for k in ("shape", "bf16_fwd_tflops", "bf16_bwd_tflops", "speedup_fwd",
                                                    "speedup_bwd", "roofline_tflops_bf16_dense")}
if accum:
    s["fp8_accum_rows"] = accum.get("rows")
if spec:
    # Speed-up over plain decoding of the same engine with graphs, per draft count (batch 1, greedy).
    s["mtp_spec_speedup_graphs"] = {str(r["draft_tokens"]): r["speedup"] for r in spec.get("speculative", [])
                                    if r.get("step_path") == "graphs"}
if gemm:
    s["fp8_gemm_vs_cublaslt"] = {r["shape"]: r["fp8_ours_over_cublaslt"] for r in gemm["rows"]}
json.dump(s, open(os.path.join(out, "gpu_latest.json"), "w"), indent=1)
print(json.dumps({k: v for k, v in s.items() if k not in ("gemm", "mla_decode", "hf", "decode", "fp8_accum_rows", "train")},
                 indent=1))
PY
fi
exit $status
