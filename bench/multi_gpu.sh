#!/usr/bin/env bash
# Several GPUs of one machine (docs/distributed.md, "Several GPUs"):
#   1. the NCCL communicator tests on one rank, on N ranks through scripts/launch_gpus.sh, and on N
#      ranks under mpirun (the MPI bootstrap);
#   2. equality: bench-0.7b trained 2 steps in FP32 on N GPUs, data parallel and expert parallel,
#      against one GPU on the same global batch (whole batch in one micro-batch, and the same N
#      micro-batches accumulated), compared by tools/compare_runs.py under the DP tolerance;
#   3. scaling: bench-0.7b, B 8 × T 2048 per GPU, BF16, tokens/s on 1 GPU and on N (DP, and DP + EP).
# Writes $OUT/multi_gpu.json (commit, date, GPUs), which the caller commits as
# bench/results/multi_gpu.json, plus every run's log and metrics under $OUT.
# Usage: OUT=DIR BIN=DIR [N=2] [DATA=dataset dir] [TOK=tokenizer.json] [DSV3_COMMIT=sha] bench/multi_gpu.sh
#   BIN holds dsv3 and dsv3_dist_tests built with -DDSV3_CUDA=ON (NCCL found). DATA/TOK: the Brown
#   corpus with a 32,768-id BPE (bench-0.7b's vocabulary), which `dsv3 train --preset bench-0.7b`
#   prepares on first use, or by hand:
#     dsv3 tokenizer train --vocab-size 32768 --output data/brown-bpe32768/tokenizer.json data/brown/brown-train.txt
#     dsv3 data prepare --tokenizer data/brown-bpe32768 --output data/brown-bpe32768/dataset \
#       --val data/brown/brown-val.txt data/brown/brown-train.txt
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/multi_gpu_run}
BIN=${BIN:-build-gpu}
N=${N:-2}
DATA=${DATA:-data/brown-bpe32768/dataset}
TOK=${TOK:-data/brown-bpe32768/tokenizer.json}
PY=${PY:-python3}
export DSV3_COMMIT=${DSV3_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0
mkdir -p "$OUT"
# Run directories in memory: a bench-0.7b checkpoint is 8.4 GB (weights and AdamW moments), and a
# run of them on a slow disk outlasts the training.
R=${RUNS:-/dev/shm/dsv3_multi_gpu}
rm -rf "$R" && mkdir -p "$R"
L="bash scripts/launch_gpus.sh -n $N"
# Every process, the one-GPU baseline too, gets its GPU's share of the host's cores (weak scaling
# per GPU); the trainer's host work is mostly the launching thread, so this mainly bounds OpenMP.
threads=$(( $(nproc) / N ))
status=0
step() { echo "== $*" | tee -a "$OUT/summary.txt"; }
for f in "$BIN/dsv3" "$BIN/dsv3_dist_tests" "$DATA/dataset.json" "$TOK"; do
  [ -e "$f" ] || { echo "multi_gpu.sh: $f is missing (BIN, DATA, TOK: see the header of this script)" |
    tee -a "$OUT/summary.txt"; exit 2; }
done
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader > "$OUT/gpus.txt"
cat "$OUT/gpus.txt" | tee -a "$OUT/summary.txt"

step "NCCL communicator tests: 1 rank, $N ranks (launch_gpus.sh), $N ranks (mpirun)"
timeout 60 "$BIN/dsv3_dist_tests" --gtest_filter='Nccl.*' > "$OUT/nccl_1.log" 2>&1
rc=$?; echo "1 rank: rc=$rc" | tee -a "$OUT/summary.txt"; [ $rc -eq 0 ] || status=1
timeout 90 $L --log-dir "$OUT/nccl_launch" -- "$BIN/dsv3_dist_tests" --gtest_filter='Nccl.*' > "$OUT/nccl_launch.log" 2>&1
rc=$?; echo "$N ranks, launch_gpus.sh: rc=$rc" | tee -a "$OUT/summary.txt"; [ $rc -eq 0 ] || status=1
timeout 90 mpirun -np "$N" --bind-to none "$BIN/dsv3_dist_tests" --gtest_filter='Nccl.*' > "$OUT/nccl_mpi.log" 2>&1
rc=$?; echo "$N ranks, mpirun: rc=$rc" | tee -a "$OUT/summary.txt"; [ $rc -eq 0 ] || status=1

run() {  # name launcher... -- train args
  local name=$1; shift
  local s; s=$(date +%s%N)
  OMP_NUM_THREADS=$threads timeout "${RUN_TIMEOUT:-150}" "$@" --out "$R/$name" --threads "$threads" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc, $(( ($(date +%s%N) - s) / 1000000 )) ms" | tee -a "$OUT/summary.txt"
  cp "$R/$name/metrics.jsonl" "$OUT/$name.metrics.jsonl" 2>/dev/null
  [ "${KEEP:-1}" = 1 ] || rm -rf "${R:?}/$name"
  return $rc
}

step "equality: bench-0.7b, 2 FP32 steps, global batch $((2 * N)) x 256 (DP tolerance, docs/distributed.md)"
eq="--device cuda --preset bench-0.7b --data $DATA --tokenizer $TOK --seq-len 256 --steps 2 --lr 1e-2 --adam-eps 1e-3
    --eval-every 0 --sample-tokens 0 --checkpoint-every 0 --keep-checkpoints 1 --no-resume"
run one "$BIN/dsv3" train $eq --batch $((2 * N))
run accum "$BIN/dsv3" train $eq --batch 2 --grad-accum "$N"
run dp $L --log-dir "$OUT/dp_ranks" -- "$BIN/dsv3" train $eq --batch 2 || status=1
run ep $L --log-dir "$OUT/ep_ranks" -- "$BIN/dsv3" train $eq --batch 2 --ep "$N" || status=1
$PY tools/compare_runs.py --ref "$R/one" "$R/dp" "$R/ep" --json "$OUT/equal_vs_one.json" > "$OUT/equal.txt" 2>&1 ||
  status=1
$PY tools/compare_runs.py --ref "$R/accum" "$R/dp" "$R/ep" --json "$OUT/equal_vs_accum.json" >> "$OUT/equal.txt" 2>&1 ||
  status=1
tee -a "$OUT/summary.txt" < "$OUT/equal.txt"
rm -rf "$R"/*

step "scaling: bench-0.7b, B 8 x T 2048 per GPU, BF16"
KEEP=0
sc="--device cuda --preset bench-0.7b --data $DATA --tokenizer $TOK --precision bf16 --batch 8 --seq-len 2048
    --eval-every 0 --sample-tokens 0 --checkpoint-every 0 --keep-checkpoints 1 --no-resume"
run s1 "$BIN/dsv3" train $sc --steps "${SCALE_STEPS:-12}"
run sdp $L --log-dir "$OUT/sdp_ranks" -- "$BIN/dsv3" train $sc --steps "${SCALE_STEPS:-12}" || status=1
run sep $L --log-dir "$OUT/sep_ranks" -- "$BIN/dsv3" train $sc --steps "${EP_STEPS:-6}" --ep "$N" || status=1

rm -rf "$R"
step "summary"
$PY - "$OUT" "$N" <<'PY' | tee -a "$OUT/summary.txt"
import json, os, statistics, sys, datetime
out, n = sys.argv[1], int(sys.argv[2])
def load(name):
    p = os.path.join(out, name)
    return json.load(open(p)) if os.path.exists(p) else None
def scaling(name, gpus):
    p = os.path.join(out, name + ".metrics.jsonl")
    if not os.path.exists(p):
        return None
    rows = [json.loads(l) for l in open(p)]
    ms = [r["ms"] for r in rows[2:]] or [r["ms"] for r in rows]  # the first two steps warm up
    tokens = 8 * 2048 * gpus
    med = statistics.median(ms)
    red = [r["reduce_ms"] for r in rows[2:] if "reduce_ms" in r]
    return {"gpus": gpus, "steps_timed": len(ms), "step_ms_median": med, "tokens_per_step": tokens,
            "tokens_per_s": tokens / med * 1e3,
            "reduce_ms_median": statistics.median(red) if red else None}
gpus = [l.strip() for l in open(os.path.join(out, "gpus.txt"))]
s1, sdp, sep = scaling("s1", 1), scaling("sdp", n), scaling("sep", n)
for s in (sdp, sep):
    if s and s1:
        s["speedup_vs_1gpu"] = s["tokens_per_s"] / s1["tokens_per_s"]
        s["scaling_efficiency"] = s["speedup_vs_1gpu"] / n
res = {"bench": "multi_gpu", "commit": os.environ.get("DSV3_COMMIT"),
       "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
       "gpus": gpus, "ranks": n, "preset": "bench-0.7b",
       "equality": {"vs_one_gpu_whole_batch": load("equal_vs_one.json"),
                    "vs_one_gpu_same_microbatches": load("equal_vs_accum.json"),
                    "setup": "2 FP32 steps, lr 1e-2, AdamW eps 1e-3, per-rank batch 2 x 256; tolerance: loss and "
                             "grad norm rel 1e-5, parameters abs 1e-5 (docs/distributed.md)"},
       "scaling": {"setup": "BF16, per-GPU batch 8 x 2048 (weak scaling), step time median after 2 warm-up steps; "
                            "every process (the one-GPU baseline too) --threads nproc/N",
                   "one_gpu": s1, "data_parallel": sdp, "expert_parallel": sep}}
json.dump(res, open(os.path.join(out, "multi_gpu.json"), "w"), indent=1)
for k in ("one_gpu", "data_parallel", "expert_parallel"):
    s = res["scaling"][k]
    if s:
        print(f"{k:16s} {s['gpus']} GPU(s): {s['tokens_per_s']:9.0f} tok/s, step {s['step_ms_median']:.0f} ms"
              + (f", {s['speedup_vs_1gpu']:.2f}x one GPU, efficiency {s['scaling_efficiency']:.2f}" if 'speedup_vs_1gpu' in s else "")
              + (f", gradient/loads exchange {s['reduce_ms_median']:.0f} ms" if s.get('reduce_ms_median') is not None else ""))
PY
exit $status
