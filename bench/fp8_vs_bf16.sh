#!/usr/bin/env bash
# FP8 vs BF16 training accuracy ([V3] §3.3: relative loss error < 0.25%), plus the paper's negative
# control (128×128 block quantization of activation gradients). Three `dsv3 train` runs from the same
# seed and data, one thread each, side by side; tools/fp8_vs_bf16.py writes
# bench/results/fp8_vs_bf16.json and the SVG plot.
#   bench/fp8_vs_bf16.sh BUILD_DIR [STEPS] [BATCH] [SEQ_LEN] [PRESET]
set -euo pipefail
build=${1:?usage: $0 BUILD_DIR [STEPS] [BATCH] [SEQ_LEN] [PRESET]}
steps=${2:-120}
batch=${3:-4}
seq=${4:-64}
preset=${5:-tiny}
root=$(cd "$(dirname "$0")/.." && pwd)
runs=${RUNS_DIR:-/tmp/dsv3_fp8_vs_bf16}
mkdir -p "$runs"
eval_every=$((steps / 3))
common=(--preset "$preset" --steps "$steps" --batch "$batch" --seq-len "$seq" --seed 1234 --threads 1
        --eval-every "$eval_every" --eval-batches 4 --sample-tokens 0 --checkpoint-every 0 --no-resume)
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
start=$(date +%s)
pids=()
for p in bf16 fp8 fp8-dgrad-128x128; do
  "$build/dsv3" train "${common[@]}" --precision "$p" --out "$runs/$preset-$p" > "$runs/$preset-$p.log" 2>&1 &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid" || echo "a run exited with $? (see $runs/*.log)"; done
secs=$(( $(date +%s) - start ))
config=$(printf '{"preset":"%s","steps":%d,"batch":%d,"seq_len":%d,"tokens":%d,"seed":1234,"threads_per_run":1,"lr":"dsv3 train default","eval_batches":4,"wall_s":%d,"loadavg_before":"%s","loadavg_after":"%s"}' \
  "$preset" "$steps" "$batch" "$seq" $((steps * batch * seq)) "$secs" "$load_before" "$(cut -d' ' -f1-3 /proc/loadavg)")
python3 "$root/tools/fp8_vs_bf16.py" "${OUT_JSON:-$root/bench/results/fp8_vs_bf16.json}" "$preset" "$config" \
  "$runs/$preset-bf16" "$runs/$preset-fp8" "$runs/$preset-fp8-dgrad-128x128"
