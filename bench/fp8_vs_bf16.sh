#!/usr/bin/env bash
# FP8 vs BF16 training accuracy ([V3] §3.3: relative loss error < 0.25%), with the paper's negative
# control (128×128 block quantization of activation gradients), a second seed (a second FP8-vs-BF16
# pair, and the seed-to-seed spread of BF16 as the noise scale) and FP8 with BF16 AdamW moments, on the
# `tiny` preset and on a larger configuration (`tiny` widened and deepened by --set, short sequences).
# All runs go side by side, THREADS each; validation every steps/20 on EVAL_BATCHES batches;
# tools/fp8_vs_bf16.py writes bench/results/fp8_vs_bf16.json (with how much the validation loss still
# moved over the last fifth of each run) and one SVG plot per configuration; experiments of other names
# already in the JSON (the GPU runs of bench/fp8_vs_bf16_gpu.sh) stay.
#   bench/fp8_vs_bf16.sh BUILD_DIR [TINY_STEPS] [LARGER_STEPS]
# Environment: RUNS_DIR (default /tmp/dsv3_fp8_vs_bf16), OUT_JSON, NICE (default 5), THREADS (default 1),
# EVAL_BATCHES (default 32), TINY_TAGS / LARGER_TAGS (the runs, see launch(); empty = skip that
# configuration; default: all six for tiny, bf16 fp8 and the control for larger), LARGER_ALL=1 (all six
# for larger too), SHAKES_TAGS / SHAKESPEARE (the runs on a small corpus, below). Cost: ~0.2 CPU s per tiny step
# and ~0.45 per larger step, per run.
set -euo pipefail
build=${1:?usage: $0 BUILD_DIR [TINY_STEPS] [LARGER_STEPS]}
tiny_steps=${2:-400}
larger_steps=${3:-300}
root=$(cd "$(dirname "$0")/.." && pwd)
runs=${RUNS_DIR:-/tmp/dsv3_fp8_vs_bf16}
mkdir -p "$runs"
bin="$runs/dsv3"  # a private copy: rebuilding the tree does not touch running jobs
cp "$build/dsv3" "$bin"
shakes_tags=${SHAKES_TAGS-bf16 fp8}
shakes=${SHAKESPEARE:-$root/../shared/data/tinyshakespeare.txt}
if [[ -n "$shakes_tags" && ! -f "$shakes" ]]; then
  echo "fp8_vs_bf16.sh: $shakes not found (set SHAKESPEARE, or SHAKES_TAGS= to skip those runs)" >&2
  exit 2
fi
larger_sets=(--set hidden_size=256 --set num_hidden_layers=6 --set intermediate_size=768
             --set num_attention_heads=8 --set num_key_value_heads=8 --set q_lora_rank=128 --set kv_lora_rank=64
             --set n_routed_experts=16 --set moe_intermediate_size=128)
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
start=$(date +%s)
pids=()
# launch NAME STEPS BATCH SEQ TAGS [extra train args...]: one run per tag (space-separated) of
#   bf16, fp8, fp8-dgrad-128x128 (the negative control), bf16-seed1235 / fp8-seed1235 (a second seed:
#   a second FP8-vs-BF16 pair and the seed-to-seed spread), fp8-moments-bf16 (the paper's BF16 moments).
launch() {
  local name=$1 steps=$2 batch=$3 seq=$4 tags=$5
  shift 5
  local common=(--preset tiny "$@" --steps "$steps" --batch "$batch" --seq-len "$seq" --threads "$threads"
                --eval-every $((steps / 20)) --eval-batches "$eval_batches" --sample-tokens 0 --checkpoint-every 0
                --no-resume)
  local tag args
  for tag in $tags; do
    case $tag in
      bf16) args="--precision bf16 --seed 1234" ;;
      fp8) args="--precision fp8 --seed 1234" ;;
      fp8-dgrad-128x128) args="--precision fp8-dgrad-128x128 --seed 1234" ;;
      bf16-seed1235) args="--precision bf16 --seed 1235" ;;
      fp8-seed1235) args="--precision fp8 --seed 1235" ;;
      fp8-moments-bf16) args="--precision fp8 --moments bf16 --seed 1234" ;;
      *) echo "fp8_vs_bf16.sh: unknown run tag '$tag'" >&2; exit 2 ;;
    esac
    # shellcheck disable=SC2086
    OMP_NUM_THREADS=$threads nice -n "${NICE:-5}" "$bin" train "${common[@]}" $args --out "$runs/$name-$tag" \
      > "$runs/$name-$tag.log" 2>&1 &
    pids+=($!)
  done
}
all_tags="bf16 fp8 fp8-dgrad-128x128 bf16-seed1235 fp8-seed1235 fp8-moments-bf16"
threads=${THREADS:-1}
eval_batches=${EVAL_BATCHES:-32}
tiny_tags=${TINY_TAGS-$all_tags}
larger_tags=${LARGER_TAGS-bf16 fp8 fp8-dgrad-128x128}
[[ "${LARGER_ALL:-0}" == 1 ]] && larger_tags=$all_tags
[[ -n "$tiny_tags" ]] && launch tiny "$tiny_steps" 8 64 "$tiny_tags"
[[ -n "$larger_tags" ]] && launch larger "$larger_steps" 8 32 "$larger_tags" "${larger_sets[@]}"
# Several passes over a small corpus: both configurations on tinyshakespeare (381k training tokens with
# the Brown BPE), 2.4 passes each (tiny 1,800 steps x 512 tokens, larger 3,600 x 256); SHAKES_TAGS
# (default bf16 fp8; empty: skip), SHAKESPEARE = the text file.
if [[ -n "$shakes_tags" ]]; then
  "$bin" data prepare --tokenizer "$root/data/brown-bpe4096" --output "$runs/shakespeare" --val-fraction 0.1 \
    "$shakes" > "$runs/shakespeare.log" 2>&1
  launch shakespeare_tiny 1800 8 64 "$shakes_tags" --data "$runs/shakespeare"
  launch shakespeare_larger 3600 8 32 "$shakes_tags" --data "$runs/shakespeare" "${larger_sets[@]}"
fi
for pid in "${pids[@]}"; do wait "$pid" || echo "a run exited with $? (see $runs/*.log)"; done
secs=$(( $(date +%s) - start ))
cfg() {  # NAME PRESET_DESC STEPS BATCH SEQ
  printf '{"model":"%s","steps":%d,"batch":%d,"seq_len":%d,"tokens":%d,"seed":1234,"threads_per_run":%d,"lr":"dsv3 train default schedule","eval_batches":%d,"moments":"f32 (fp8-moments-bf16 run: bf16)","wall_s":%d,"loadavg_before":"%s","loadavg_after":"%s"}' \
    "$1" "$2" "$3" "$4" $(($2 * $3 * $4)) "$threads" "$eval_batches" "$secs" "$load_before" "$(cut -d' ' -f1-3 /proc/loadavg)"
}
exp_args=()
for name in tiny larger shakespeare_tiny shakespeare_larger; do
  steps=$tiny_steps batch=8 seq=64 desc="tiny preset"
  [[ $name == larger ]] && steps=$larger_steps seq=32 desc="tiny ${larger_sets[*]}"
  [[ $name == shakespeare_tiny ]] && steps=1800 desc="tiny preset, tinyshakespeare"
  [[ $name == shakespeare_larger ]] && steps=3600 seq=32 desc="tiny ${larger_sets[*]}, tinyshakespeare"
  dirs=()
  for t in $all_tags; do [[ -d "$runs/$name-$t" ]] && dirs+=("$runs/$name-$t"); done
  [[ ${#dirs[@]} -ge 2 ]] && exp_args+=("$name-${steps}steps" "$(cfg "$desc" "$steps" "$batch" "$seq")" "${dirs[@]}")
done
python3 "$root/tools/fp8_vs_bf16.py" --keep-existing "${OUT_JSON:-$root/bench/results/fp8_vs_bf16.json}" "${exp_args[@]}"
