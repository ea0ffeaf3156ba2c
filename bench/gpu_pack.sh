#!/usr/bin/env bash
# Builds the CUDA binaries that bench/gpu.sh runs and packs them, stripped, with the shared libraries
# they load that a bare GPU image may lack, into one tarball for `PACKED=FILE bench/gpu.sh` there.
# A build here takes 10-16 minutes on two cores; on the GPU machine it would take lease time.
# The tarball holds bin/ (the binaries), lib/ (every library ldd resolves, except the C and C++
# runtimes and the CUDA driver and toolkit, which the GPU image has), source_dir (the checkout the
# binaries were built from: their fixtures and data are found under it) and commit. The label is
# the source checkout's HEAD (-dirty when tracked files differ): with --no-build the binaries may be
# older than that.
# Usage: bench/gpu_pack.sh [-B BUILD_DIR] [-o OUT_TAR] [--no-build]
#   BUILD_DIR  default build-cuda (configured here with -DDSV3_CUDA=ON for sm_90a if absent)
#   OUT_TAR    default .devq/dsv3-gpu.tar.xz (keep it out of git: `run` carries ignored paths it is told of)
set -euo pipefail
# Paths given on the command line are the caller's; the defaults are the checkout's.
build=build-cuda out=.devq/dsv3-gpu.tar.xz do_build=1
while [ $# -gt 0 ]; do
  case $1 in
    -B) build=$(realpath -m "${2:?-B needs a directory}"); shift 2 ;;
    -o) out=$(realpath -m "${2:?-o needs a file}"); shift 2 ;;
    --no-build) do_build=0; shift ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_pack.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
eval "$(grep '^GPU_TARGETS=' bench/gpu.sh)"
if [ "$do_build" = 1 ] && [ ! -f "$build/CMakeCache.txt" ]; then
  cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DDSV3_CUDA=ON -DDSV3_CUDA_ARCHS=90a
fi
[ -f "$build/CMakeCache.txt" ] && grep -qE '^DSV3_CUDA:[A-Z]+=(ON|TRUE|1)$' "$build/CMakeCache.txt" ||
  { echo "gpu_pack.sh: $build is not a build directory configured with -DDSV3_CUDA=ON" >&2; exit 2; }
if [ "$do_build" = 1 ]; then
  echo "gpu_pack.sh: building $GPU_TARGETS in $build"
  # shellcheck disable=SC2086
  cmake --build "$build" -j "$(nproc)" --target $GPU_TARGETS
fi
stage=$(mktemp -d) tmp="$out.partial"
trap 'rm -rf "$stage" "$tmp"' EXIT
mkdir -p "$stage/bin" "$stage/lib"
for t in $GPU_TARGETS; do
  [ -x "$build/$t" ] || { echo "gpu_pack.sh: $build/$t is missing (build it, or drop --no-build)" >&2; exit 1; }
  strip -o "$stage/bin/$t" "$build/$t"
done
# Libraries outside the base system and the CUDA toolkit, as ldd resolves them here.
for t in "$stage"/bin/*; do ldd "$t"; done | awk '$2 == "=>" && $3 ~ /^\// { print $3 }' | sort -u |
  { grep -vE '/(libc|libm|libdl|libpthread|librt|libstdc\+\+|libgcc_s|ld-linux[^/]*|libcuda|libcudart|libcublas(Lt)?|libnccl|libnvidia[^/]*)\.so' || true; } |
  while read -r lib; do cp -L "$lib" "$stage/lib/"; done
grep -o 'CMAKE_HOME_DIRECTORY:INTERNAL=.*' "$build/CMakeCache.txt" | cut -d= -f2 >"$stage/source_dir"
src=$(cat "$stage/source_dir")
# The commit, marked -dirty when tracked files differ from it (the build then holds more than it).
if commit=$(git -C "$src" rev-parse --short HEAD 2>/dev/null); then
  [ -z "$(git -C "$src" status --porcelain --untracked-files=no)" ] || commit="$commit-dirty"
else
  commit=unknown
fi
echo "$commit" >"$stage/commit"
mkdir -p "$(dirname "$out")"
# One xz stream with a 64 MiB dictionary (-9, one thread): the binaries share most of their code,
# which a smaller window or separate blocks would store again for each (60 MB at xz's default
# against 25 MB for the twelve on 2026-12-07; `run` carries at most 64 MiB with the tree).
tar -C "$stage" -cf - bin lib source_dir commit | xz -9 -T1 >"$tmp"
mv "$tmp" "$out"
echo "gpu_pack.sh: $out ($(du -h "$out" | cut -f1); commit $(cat "$stage/commit"), libraries: $(ls "$stage/lib" | tr '\n' ' '))"
echo "on the GPU machine: OUT=\$OUT PACKED=$out bench/gpu.sh   (run's carry: [\"$(dirname "$out")\"], a path in the checkout that git ignores)"
