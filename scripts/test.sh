#!/usr/bin/env bash
# The test command (README, .ci/run): deps, a warnings-as-errors build, every CPU test, the I/O
# tests under ASan+UBSan, and a bounded libFuzzer run per target. No GPU needed.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --deps
jobs=$(nproc)
t0=$(date +%s)

echo "== build (Release, -Werror)"
cmake -S . -B build-ci -G Ninja -DCMAKE_BUILD_TYPE=Release -DDSV3_WERROR=ON >/dev/null
cmake --build build-ci -j "$jobs"
# Every CUDA source must compile here when nvcc is present; say which it was, since CMake's AUTO
# skips them quietly without one.
cu_objs=$(grep -c '^build [^:]*\.cu\.o:' build-ci/build.ninja || true)
if [ "$cu_objs" -gt 0 ]; then echo "== CUDA sources compiled: $cu_objs objects (no GPU tests run here)"
else echo "== note: no CUDA compiler found, the CUDA sources were not compiled"; fi
echo "== tests"
(cd build-ci && ctest --output-on-failure -j "$jobs" --timeout 900 -LE gpu)

echo "== sanitizers + fuzzers (clang, address,undefined): I/O and core"
cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_C_COMPILER=clang \
  -DCMAKE_CXX_COMPILER=clang++ -DDSV3_CUDA=OFF -DDSV3_MPI=OFF -DDSV3_WERROR=ON \
  -DDSV3_SANITIZE=address,undefined -DDSV3_FUZZ=ON >/dev/null
asan_targets=(dsv3_core_tests)
[ -f build-asan/build.ninja ] && grep -q 'dsv3_io_tests' build-asan/build.ninja && asan_targets+=(dsv3_io_tests)
fuzzers=()
for f in fuzz/*.cpp; do [ -e "$f" ] && fuzzers+=("$(basename "$f" .cpp)"); done
cmake --build build-asan -j "$jobs" --target "${asan_targets[@]}" "${fuzzers[@]}"
(cd build-asan && ctest --output-on-failure -j "$jobs" -L 'core|io')
# A fixed seed and a fixed number of runs (about a minute each on a 2-core machine) make CI's fuzzing
# reproducible: a run that passes here passes in CI. Set DSV3_FUZZ_SCALE to fuzz longer.
fuzz_seconds=${DSV3_FUZZ_SECONDS:-120}
declare -A fuzz_runs=([fuzz_tokenizer]=600000 [fuzz_config]=600000 [fuzz_index]=600000 [fuzz_safetensors]=600000)
for f in "${fuzzers[@]}"; do
  corpus=build-asan/fuzz-corpus/$f
  mkdir -p "$corpus"
  seeds=fuzz/corpus/$f
  runs=$(( ${fuzz_runs[$f]:-300000} * ${DSV3_FUZZ_SCALE:-1} ))
  echo "== fuzz $f: $runs runs, seed 1"
  log=build-asan/fuzz-$f.log
  # The fuzzer's own exit status decides (a crash, leak or sanitizer report fails the run).
  if ! ./build-asan/"$f" -seed=1 -runs="$runs" -max_total_time="$fuzz_seconds" -print_final_stats=1 -artifact_prefix=build-asan/ \
      "$corpus" $( [ -d "$seeds" ] && echo "$seeds" ) > "$log" 2>&1; then
    grep -E -A20 'ERROR|SUMMARY|Test unit written' "$log" | head -60
    echo "fuzzer $f failed (full log: $log)"
    exit 1
  fi
  grep -E 'stat::number_of_executed_units' "$log" || true
done

echo "== done in $(( $(date +%s) - t0 ))s"
