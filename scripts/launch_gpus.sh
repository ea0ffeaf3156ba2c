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

usage() {  # to stdout for --help, to stderr after a usage error
  if [ "${1:-0}" -eq 0 ]; then sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; else sed -n '7,8p' "$0" | sed 's/^# \{0,1\}//' >&2; fi
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
  n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ') || true
  [ "${n:-0}" -ge 1 ] || { echo "launch_gpus.sh: no GPU found by nvidia-smi; pass -n N" >&2; exit 2; }
fi
case "$n" in ''|*[!0-9]*|0) echo "launch_gpus.sh: -n '$n': expected a positive number of ranks" >&2; exit 2 ;; esac

rdv=$(mktemp -d "${TMPDIR:-/tmp}/dsv3-launch.XXXXXX")
[ -n "$logdir" ] || logdir=$rdv
mkdir -p "$logdir" || { echo "launch_gpus.sh: cannot create --log-dir $logdir" >&2; exit 2; }
[ "$n" -gt 1 ] && echo "launch_gpus.sh: $n ranks; ranks 1..$((n - 1)) log to $logdir/rank<r>.log" >&2
# NVLink multicast stays off (the machine's GPUs are shared; see docs/distributed.md).
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
export DSV3_WORLD_SIZE=$n DSV3_LOCAL_WORLD_SIZE=$n DSV3_RENDEZVOUS=$rdv/nccl-id
pids=()
for ((r = 0; r < n; r++)); do
  if [ "$r" -eq 0 ]; then
    DSV3_RANK=0 "$@" &
  else
    DSV3_RANK=$r "$@" >"$logdir/rank$r.log" 2>&1 &
  fi
  pids+=($!)
done
trap 'kill "${pids[@]}" 2>/dev/null; exit 130' INT TERM
status=0 live=("${pids[@]}")
while [ ${#live[@]} -gt 0 ]; do
  wait -n -p done_pid "${live[@]}"
  rc=$?
  rest=()
  for p in "${live[@]}"; do [ "$p" = "$done_pid" ] || rest+=("$p"); done
  live=("${rest[@]}")
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then
    status=$rc
    for ((r = 0; r < n; r++)); do [ "${pids[$r]}" = "$done_pid" ] && echo "launch_gpus.sh: rank $r exited with $rc; stopping the others" >&2; done
    [ ${#live[@]} -gt 0 ] && kill "${live[@]}" 2>/dev/null
  fi
done
[ "$logdir" = "$rdv" ] || rm -rf "$rdv"
exit "$status"
