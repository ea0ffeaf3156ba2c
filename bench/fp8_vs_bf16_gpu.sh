#!/usr/bin/env bash
# FP8 vs BF16 until the loss flattens, on the GPU path (docs/fp8.md "Until the loss flattens"): the
# CPU's 2 cores cannot train these configurations over ten passes of the corpus in a session, the H200
# does it in minutes. One configuration per call, its runs side by side as separate processes on the
# one GPU, batch 256 x 64 tokens (16,384 tokens, ~96 steps per pass over the Brown corpus), validation
# over the whole validation split every STEPS/20 steps; then tools/fp8_vs_bf16.py --keep-existing adds
# the experiment to bench/results/fp8_vs_bf16.json (other experiments stay).
#   bench/fp8_vs_bf16_gpu.sh BUILD_DIR tiny|larger STEPS
# Environment: TAGS (default: bf16 fp8 fp8-dgrad-128x128 bf16-seed1235 fp8-seed1235; further seeds as
# bf16-seedN fp8-seedN — without bf16 and fp8 the runs are only trained, for adding to an experiment
# with tools/fp8_vs_bf16.py), BATCH (256),
# RUNS_DIR (/tmp/dsv3_fp8_vs_bf16_gpu), OUT_JSON. Measured on the H200: tiny 1,500 steps x 5 runs 344 s,
# 1,000 steps x 4 runs 182 s; larger 800 steps x 5 runs 361 s.
set -euo pipefail
build=${1:?usage: $0 BUILD_DIR tiny|larger STEPS}
cfg=${2:?usage: $0 BUILD_DIR tiny|larger STEPS}
steps=${3:?usage: $0 BUILD_DIR tiny|larger STEPS}
root=$(cd "$(dirname "$0")/.." && pwd)
batch=${BATCH:-256}
tags=${TAGS:-bf16 fp8 fp8-dgrad-128x128 bf16-seed1235 fp8-seed1235}
case $cfg in
  tiny) sets=(); desc="tiny preset" ;;
  larger) sets=(--set hidden_size=256 --set num_hidden_layers=6 --set intermediate_size=768
                --set num_attention_heads=8 --set num_key_value_heads=8 --set q_lora_rank=128 --set kv_lora_rank=64
                --set n_routed_experts=16 --set moe_intermediate_size=128)
          desc="tiny with hidden 256, 6 layers, 8 heads, q_lora 128, kv_lora 64, intermediate 768, 16 routed experts of 128" ;;
  *) echo "fp8_vs_bf16_gpu.sh: configuration '$cfg' is not tiny or larger" >&2; exit 2 ;;
esac
name=gpuflat$cfg
runs=${RUNS_DIR:-/tmp/dsv3_fp8_vs_bf16_gpu}/$name-$steps
rm -rf "$runs"; mkdir -p "$runs"
start=$(date +%s)
pids=() dirs=()
for tag in $tags; do
  case $tag in
    bf16) args=(--precision bf16 --seed 1234) ;;
    fp8) args=(--precision fp8 --seed 1234) ;;
    fp8-dgrad-128x128) args=(--precision fp8-dgrad-128x128 --seed 1234) ;;
    bf16-seed[0-9]*|fp8-seed[0-9]*) args=(--precision "${tag%%-seed*}" --seed "${tag##*-seed}") ;;
    *) echo "fp8_vs_bf16_gpu.sh: unknown run tag '$tag'" >&2; exit 2 ;;
  esac
  OMP_NUM_THREADS=3 "$build/dsv3" train --device cuda --preset tiny "${sets[@]}" "${args[@]}" --steps "$steps" \
    --batch "$batch" --seq-len 64 --threads 3 --eval-every $((steps / 20)) --eval-batches 8 --sample-tokens 0 \
    --checkpoint-every 0 --no-resume --out "$runs/$name-$tag" > "$runs/$name-$tag.log" 2>&1 &
  pids+=($!) dirs+=("$runs/$name-$tag")
done
for pid in "${pids[@]}"; do wait "$pid" || echo "a run exited with $? (see $runs/*.log)"; done
secs=$(( $(date +%s) - start ))
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || echo "GPU name unknown")
seeds=$(for t in $tags; do [[ $t == *-seed* ]] && echo "${t##*-seed}" || echo 1234; done | sort -un | paste -sd,)
config=$(printf '{"model":"%s","data":"Brown corpus (1.57M training tokens)","steps":%d,"batch":%d,"seq_len":64,"tokens":%d,"passes":%.1f,"seeds":[%s],"lr":"dsv3 train default schedule (5e-3, 5%% warm-up, cosine from 50%% to 5e-4)","eval_every":%d,"eval":"the whole validation split (84.5k tokens)","moments":"f32","device":"cuda (%s; cuBLASLt block-scaled FP8, BF16 tensor-core attention), runs side by side","wall_s":%d}' \
  "$desc" "$steps" "$batch" $((steps * batch * 64)) "$(python3 -c "print($steps * $batch * 64 / 1567025)")" "$seeds" \
  $((steps / 20)) "$gpu" "$secs")
if [[ " $tags " != *" bf16 "* || " $tags " != *" fp8 "* ]]; then
  echo "runs in $runs (no bf16/fp8 pair of seed 1234 among them: add them to an experiment with tools/fp8_vs_bf16.py)"
  exit 0
fi
python3 "$root/tools/fp8_vs_bf16.py" --keep-existing "${OUT_JSON:-$root/bench/results/fp8_vs_bf16.json}" \
  "$name-${steps}steps" "$config" "${dirs[@]}"
