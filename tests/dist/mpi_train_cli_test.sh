#!/usr/bin/env bash
# `mpirun -np N dsv3 train` end to end on the tiny preset (a small prepared dataset made here):
#  1. N ranks, expert parallel over N, ZeRO-1, --ranks-per-node 1 (N one-rank nodes): exits 0,
#     rank 0 alone writes metrics.jsonl (one line per step) and the checkpoint;
#  2. the same command with more steps resumes from that checkpoint;
#  3. ranks started with different options (MPMD: another --seed on the last rank) end the job
#     with an error naming the disagreement, within 60 s (nothing waits in a collective);
#  4. a rank killed (SIGKILL) in the middle of a run ends the whole job, with an error, within 60 s.
set -u
dsv3=$1
np=${2:-2}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
fail() { echo "FAIL: $*"; exit 1; }
for i in $(seq 1 60); do
  echo "the cat sat on the mat and the dog sat on the log. a bird in the hand is worth two in the bush."
  echo "the quick brown fox jumps over the lazy dog again and again."
  echo
done >"$dir/text.txt"
mkdir -p "$dir/tok"
"$dsv3" tokenizer train --vocab-size 300 --output "$dir/tok/tokenizer.json" "$dir/text.txt" >/dev/null || fail "tokenizer train"
"$dsv3" data prepare --tokenizer "$dir/tok" --output "$dir/data" --val-fraction 0.1 "$dir/text.txt" >/dev/null ||
  fail "data prepare"
base=(train --preset tiny --data "$dir/data" --tokenizer "$dir/tok/tokenizer.json" --batch 1 --seq-len 16 --threads 1)
common=("${base[@]}" --eval-every 2 --eval-batches 1 --sample-tokens 2 --checkpoint-every 2)
par=(--ep "$np" --zero1 --ranks-per-node 1)

timeout 120 mpirun --oversubscribe -np "$np" "$dsv3" "${common[@]}" "${par[@]}" --out "$dir/out" --steps 2 >"$dir/run1.txt" 2>&1
rc=$?
cat "$dir/run1.txt"
[ "$rc" -eq 0 ] || fail "mpirun exited $rc"
[ "$(wc -l <"$dir/out/metrics.jsonl")" -eq 2 ] || fail "metrics.jsonl should have 2 lines"
[ -e "$dir/out/latest/optimizer.safetensors" ] || fail "no checkpoint"
[ "$(grep -c '"ranks": '"$np" "$dir/run1.txt")" -eq 1 ] || fail "the configuration should be printed once, by rank 0"
grep -q "ZeRO-1: optimizer moments on rank 0" "$dir/run1.txt" || fail "no ZeRO-1 line"

timeout 120 mpirun --oversubscribe -np "$np" "$dsv3" "${common[@]}" "${par[@]}" --out "$dir/out" --steps 3 >"$dir/run2.txt" 2>&1
rc=$?
cat "$dir/run2.txt"
[ "$rc" -eq 0 ] || fail "resumed mpirun exited $rc"
grep -q "resumed from .*step-0*2 at step 2" "$dir/run2.txt" || fail "did not resume from step 2"
[ "$(wc -l <"$dir/out/metrics.jsonl")" -eq 3 ] || fail "metrics.jsonl should have 3 lines after the resume"

start=$(date +%s)
timeout 60 mpirun --oversubscribe -np $((np - 1)) "$dsv3" "${common[@]}" --out "$dir/out2" --steps 2 : \
  -np 1 "$dsv3" "${common[@]}" --out "$dir/out2" --steps 2 --seed 7 >"$dir/run3.txt" 2>&1
rc=$?
elapsed=$(( $(date +%s) - start ))
cat "$dir/run3.txt"
echo "mismatch run: mpirun exit $rc after ${elapsed}s"
[ "$rc" -ne 124 ] || fail "the mismatched job hung"
[ "$rc" -ne 0 ] || fail "mismatched ranks reported success"
grep -q "disagree on the training options" "$dir/run3.txt" || fail "no message naming the disagreement"

timeout 90 mpirun --oversubscribe -np "$np" "$dsv3" "${base[@]}" --out "$dir/out3" --steps 100000 --eval-every 0 \
  --checkpoint-every 0 >"$dir/run4.txt" 2>&1 &
job=$!
for i in $(seq 1 600); do  # until rank 0 has logged a step (at most 60 s)
  [ -s "$dir/out3/metrics.jsonl" ] && break
  sleep 0.1
done
[ -s "$dir/out3/metrics.jsonl" ] || { cat "$dir/run4.txt"; fail "the long run logged no step"; }
launcher=$(pgrep -P "$job" -x mpirun)                     # $job is timeout; its child is mpirun
victim=$(pgrep -P "$launcher" -f "$dir/out3" | tail -n 1)  # the last rank, a child of that mpirun
[ -n "$victim" ] || fail "no rank process found under mpirun $launcher"
echo "killing rank process $victim"
start=$(date +%s)
kill -9 "$victim"
wait "$job"
rc=$?
elapsed=$(( $(date +%s) - start ))
tail -n 8 "$dir/run4.txt"
echo "killed rank: mpirun exit $rc after ${elapsed}s"
[ "$rc" -ne 124 ] && [ "$elapsed" -lt 60 ] || fail "the job did not end within 60 s of the kill"
[ "$rc" -ne 0 ] || fail "the job reported success although a rank was killed"
grep -qiE 'signal 9|killed' "$dir/run4.txt" || fail "no message naming the killed rank"
echo PASS
