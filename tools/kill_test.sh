#!/usr/bin/env bash
# Crash-safety test of training checkpoints: run `dsv3 checkpoint stress` (AdamW steps on
# model-sized tensors, a full checkpoint after every step: sharded weights + index, config,
# generation config, trainer state, optimizer moments, manifest), SIGKILL it at a random moment,
# and check that a complete checkpoint can be found and loaded and that `latest` names a
# complete one. The stress run resumes from the newest complete checkpoint each time, so resume
# is exercised too. Repeats KILLS times (default 25).
#
#   tools/kill_test.sh [DSV3_BINARY] [KILLS] [MB]
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-build/dsv3}
kills=${2:-25}
mb=${3:-8}
[ -x "$bin" ] || { echo "kill_test: $bin is not an executable (build dsv3 first)" >&2; exit 2; }
run=$(mktemp -d /tmp/dsv3-kill-test.XXXXXX)
trap 'rm -rf "$run"' EXIT
log=$run.log

# First a clean save, so every kill below lands on a run that has something to lose.
"$bin" checkpoint stress --out "$run/out" --steps 1 --mb "$mb" --keep 2 >/dev/null

ok=0 during_save=0
for i in $(seq 1 "$kills"); do
  "$bin" checkpoint stress --out "$run/out" --mb "$mb" --keep 2 >"$log" 2>&1 &
  pid=$!
  # A random moment in the first 3 s: start-up and resume, then mostly saves (each step saves).
  sleep "$(awk -v s="$RANDOM" 'BEGIN { srand(s); printf "%.3f", 0.05 + rand() * 2.95 }')"
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  # Was a save under way? A step-N.tmp directory is the footprint of an interrupted save.
  if ls -d "$run"/out/step-*.tmp >/dev/null 2>&1; then during_save=$((during_save + 1)); fi
  if ! out=$("$bin" checkpoint verify "$run/out" --load 2>&1); then
    echo "kill $i: NO loadable complete checkpoint" >&2
    echo "$out" >&2
    ls -la "$run/out" >&2
    exit 1
  fi
  newest=$(echo "$out" | sed -n 's/^newest complete: .*(step \([0-9]*\))$/\1/p')
  echo "kill $i: ok (newest complete step $newest)"
  ok=$((ok + 1))
done
echo "kill_test: $ok/$kills kills left a loadable complete checkpoint ($during_save interrupted a save in progress)"
