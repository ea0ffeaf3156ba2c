#!/usr/bin/env bash
# A rank killed mid-step must end the whole MPI job with an error, and nothing may hang:
# mpirun -np N of the MpiKill test (rank 1 raises SIGKILL after 20 all-reduces, the others keep
# calling collectives). Passes when mpirun exits non-zero within 60 s and says which rank died.
set -u
bin=$1
np=${2:-2}
out=$(mktemp)
start=$(date +%s)
DSV3_MPI_KILL_TEST=1 timeout 60 mpirun --oversubscribe -np "$np" "$bin" --gtest_filter='MpiKill.*' >"$out" 2>&1
rc=$?
elapsed=$(( $(date +%s) - start ))
cat "$out"
echo "mpi_kill_test: mpirun exit $rc after ${elapsed}s"
if [ "$rc" -eq 124 ] || [ "$elapsed" -ge 60 ]; then echo "FAIL: the job hung (killed by timeout)"; exit 1; fi
if [ "$rc" -eq 0 ]; then echo "FAIL: mpirun reported success although a rank died"; exit 1; fi
if ! grep -qiE 'signal 9|killed|exited on signal' "$out"; then echo "FAIL: no message naming the dead rank"; exit 1; fi
echo "PASS"
