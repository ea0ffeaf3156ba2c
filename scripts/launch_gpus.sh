#!/usr/bin/env bash
# Start N ranks of a dsv3 command on this machine's GPUs without MPI: rank r runs on GPU r (of the
# visible ones), the ranks find each other through a rendezvous file (NCCL's id), and when one rank
# fails the others are stopped (a rank waiting in an NCCL collective would otherwise wait forever).
# Under mpirun no launcher is needed: `mpirun -np N dsv3 train --device cuda ...` does the same.
#
#   scripts/launch_gpus.sh [-n N] [--log-dir DIR] -- COMMAND [ARGS...]
#   e.g. scripts/launch_gpus.sh -n 2 -- build/dsv3 train --device cuda --preset bench-0.7b --ep 2
#
# N defaults to the number of GPUs nvidia-smi lists. Rank 0 prints to the terminal; the others to
# DIR/rank<r>.log (default: a temporary directory, named at the start). Exit status: the first
# failing rank's, else 0.
set -uo pipefail
if [ "${BASH_VERSINFO[0]}" -lt 5 ] || { [ "${BASH_VERSINFO[0]}" -eq 5 ] && [ "${BASH_VERSINFO[1]}" -lt 1 ]; }; then
  echo "launch_gpus.sh: needs bash 5.1 or newer (wait -n -p), this is $BASH_VERSION" >&2
  exit 2
fi

usage() {  # the header comment: to stdout for --help, to stderr after a usage error
  local text
  text=$(awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0")
  if [ "${1:-0}" -eq 0 ]; then echo "$text"; else echo "$text" >&2; fi
  exit "${1:-0}"
}
n="" logdir=""
while [ $# -gt 0 ]; do
  case "$1" in
    -n) [ $# -ge 2 ] || { echo "launch_gpus.sh: -n needs a number" >&2; exit 2; }; n=$2; shift 2 ;;
    --log-dir) [ $# -ge 2 ] || { echo "launch_gpus.sh: --log-dir needs a directory" >&2; exit 2; }; logdir=$2; shift 2 ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "launch_gpus.sh: unknown argument '$1' (the command goes after --)" >&2; usage 2 ;;
  esac
done
[ $# -gt 0 ] || { echo "launch_gpus.sh: no command given (after --)" >&2; usage 2; }
if [ -z "$n" ]; then
  if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    n=$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .)
  else
    n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ') || true
  fi
  [ "${n:-0}" -ge 1 ] || { echo "launch_gpus.sh: no GPU found by nvidia-smi; pass -n N" >&2; exit 2; }
fi
case "$n" in ''|*[!0-9]*|0) echo "launch_gpus.sh: -n '$n': expected a positive number of ranks" >&2; exit 2 ;; esac

rdv=$(mktemp -d) || { echo "launch_gpus.sh: cannot create a temporary directory" >&2; exit 2; }
[ -n "$logdir" ] || logdir=$rdv
mkdir -p "$logdir" || { echo "launch_gpus.sh: cannot create --log-dir $logdir" >&2; exit 2; }
[ "$n" -gt 1 ] && echo "launch_gpus.sh: $n ranks; ranks 1..$((n - 1)) log to $logdir/rank<r>.log" >&2
# NVLink multicast stays off (the machine's GPUs are shared; see docs/distributed.md).
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
export DSV3_WORLD_SIZE=$n DSV3_LOCAL_WORLD_SIZE=$n DSV3_RENDEZVOUS=$rdv/nccl-id
# Each rank leads its own process group (setsid), so stopping it reaches whatever it started too
# (a wrapper such as timeout or compute-sanitizer and the real rank under it).
pids=()
for ((r = 0; r < n; r++)); do
  if [ "$r" -eq 0 ]; then
    DSV3_RANK=0 setsid "$@" &
  else
    DSV3_RANK=$r setsid "$@" >"$logdir/rank$r.log" 2>&1 &
  fi
  pids+=($!)
done
live=("${pids[@]}")
stop() {  # TERM to every live rank's group, KILL to what is left after 10 s
  local p t
  for p in "${live[@]}"; do kill -TERM -- "-$p" 2>/dev/null; done
  for ((t = 0; t < 100; t++)); do
    local any=0
    for p in "${live[@]}"; do kill -0 "$p" 2>/dev/null && any=1; done
    [ $any -eq 0 ] && return
    sleep 0.1
  done
  for p in "${live[@]}"; do kill -KILL -- "-$p" 2>/dev/null; done
}
trap 'stop; wait; exit 130' INT
trap 'stop; wait; exit 143' TERM
status=0
while [ ${#live[@]} -gt 0 ]; do
  wait -n -p done_pid "${live[@]}"
  rc=$?
  rest=()
  for p in "${live[@]}"; do [ "$p" = "$done_pid" ] || rest+=("$p"); done
  live=("${rest[@]}")
  if [ "$rc" -ne 0 ]; then
    status=$rc
    for ((r = 0; r < n; r++)); do [ "${pids[$r]}" = "$done_pid" ] && echo "launch_gpus.sh: rank $r exited with $rc; stopping the others" >&2; done
    [ ${#live[@]} -gt 0 ] && stop
    wait
    break
  fi
done
rm -f "$rdv"/nccl-id.*
[ "$logdir" = "$rdv" ] || rm -rf "$rdv"
exit "$status"
