#!/usr/bin/env bash
# scripts/launch_gpus.sh without GPUs (the command is a stand-in): every rank gets its DSV3_* variables,
# a failing rank stops the others quickly and its exit status comes back, bad arguments are refused,
# and `dsv3 train` started by the launcher without --device cuda says what to add.
#   launch_gpus_test.sh SCRIPT DSV3
set -u
launch=$1 dsv3=$2
fail() { echo "FAIL: $*"; exit 1; }
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT

out=$(bash "$launch" -n 3 --log-dir "$logs" -- bash -c 'echo "rank=$DSV3_RANK of $DSV3_WORLD_SIZE local=$DSV3_LOCAL_WORLD_SIZE rdv=${DSV3_RENDEZVOUS:+set}"') ||
  fail "three healthy ranks: exit $?"
[ "$out" = "rank=0 of 3 local=3 rdv=set" ] || fail "rank 0 printed '$out'"
for r in 1 2; do
  [ "$(cat "$logs/rank$r.log")" = "rank=$r of 3 local=3 rdv=set" ] || fail "rank $r logged '$(cat "$logs/rank$r.log")'"
done

start=$(date +%s)
bash "$launch" -n 2 --log-dir "$logs" -- bash -c '[ "$DSV3_RANK" = 1 ] && exit 7; sleep 30' 2>"$logs/err"
rc=$?
[ $rc -eq 7 ] || fail "a rank exiting with 7 gave launcher exit $rc"
[ $(( $(date +%s) - start )) -lt 20 ] || fail "the other rank was not stopped (the launcher waited for it)"
grep -q "rank 1 exited with 7" "$logs/err" || fail "no message naming the failed rank: $(cat "$logs/err")"

bash "$launch" -n 0 -- true 2>/dev/null; [ $? -eq 2 ] || fail "-n 0 accepted"
bash "$launch" -n 2 2>/dev/null; [ $? -eq 2 ] || fail "no command accepted"
bash "$launch" --bogus -- true 2>/dev/null; [ $? -eq 2 ] || fail "unknown option accepted"

msg=$(DSV3_WORLD_SIZE=2 DSV3_RANK=0 DSV3_RENDEZVOUS="$logs/id" "$dsv3" train --steps 1 --data "$logs/none" --out "$logs/run" 2>&1)
rc=$?
[ $rc -eq 2 ] || fail "dsv3 train under the launcher without --device cuda: exit $rc ($msg)"
echo "$msg" | grep -q -- "--device cuda" || fail "the error does not say to add --device cuda: $msg"
echo PASS
