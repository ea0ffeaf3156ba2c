#!/usr/bin/env bash
# FP8 prefill on the GPU engine: FP8 weights (E4M3, 128x128 block scales) as two BF16 terms on the
# tensor cores (the default from 256 rows, grouped_linear.cu) against widening them to F32 for SGEMM
# (DSV3_LINEAR_FP8_SPLIT=0), with BF16 weights beside them, at the prompt lengths around the
# 256-row threshold and at batch 32. One dsv3_bench_gpu_decode call per (setting, prompt, repeat),
# settings interleaved, two repeats of the FP8 settings (the median is reported; one prefill per
# call). Prints a table and writes bench/results/gpu_fp8_prefill.json (commit, date, GPU); the
# checkout's gpu_decode.json, which every call rewrites, is put back.
#   bench/gpu_fp8_prefill.sh BUILD_DIR     (DSV3_COMMIT names the commit when BUILD_DIR is prebuilt)
# 537 s on the H200 (2026-12-02; ~27 s per call, most of it building the random model).
set -euo pipefail
build=${1:?usage: $0 BUILD_DIR}
root=$(cd "$(dirname "$0")/.." && pwd)
bench="$build/dsv3_bench_gpu_decode"
[ -x "$bench" ] || { echo "gpu_fp8_prefill.sh: $bench is not an executable (build the CUDA targets first)" >&2; exit 2; }
tmp=$(mktemp -d)
keep="$root/bench/results/gpu_decode.json"
[ -f "$keep" ] && cp "$keep" "$tmp/keep"
trap '[ -f "$tmp/keep" ] && cp "$tmp/keep" "$keep"; rm -rf "$tmp"' EXIT
run() {  # NAME SPLIT WEIGHTS PROMPT BATCHES
  echo "== $1: weights $3, prompt $4, batch $5, DSV3_LINEAR_FP8_SPLIT=$2"
  DSV3_LINEAR_FP8_SPLIT=$2 "$bench" --weights "$3" --variants none --prompt "$4" --new 8 --batch "$5" >"$tmp/$1.log" 2>&1 ||
    { cat "$tmp/$1.log" >&2; exit 1; }
  mkdir -p "$tmp/runs"
  cp "$keep" "$tmp/runs/$1.json"
}
for p in 128 256 512 1024; do
  b=1; [ $p = 128 ] && b=1,32
  for r in 1 2; do
    run "split_p${p}_r$r" 1 fp8 $p $b
    run "widen_p${p}_r$r" 0 fp8 $p $b
  done
  run "bf16_p${p}_r1" 1 bf16 $p $b
done
python3 - "$tmp/runs" "$root/bench/results/gpu_fp8_prefill.json" <<'PY'
import glob, json, os, statistics, sys
tmp, out = sys.argv[1], sys.argv[2]
rows, meta = [], None
for path in sorted(glob.glob(os.path.join(tmp, "*.json"))):
    d = json.load(open(path))
    meta = meta or {k: d.get(k) for k in ("commit", "commit_source", "date", "machine", "preset")}
    setting = os.path.basename(path).split("_p")[0]
    for r in d["runs"]:
        rows.append({"setting": setting, "weights": r["weights"], "prompt": d["prompt"], "batch": r["batch"],
                     "rows": d["prompt"] * r["batch"], "prefill_ms": [r["prefill_ms"]]})
# The repeats of a point: every prefill kept, the median reported.
points = {}
for r in rows:
    key = (r["setting"], r["prompt"], r["batch"])
    if key in points: points[key]["prefill_ms"] += r["prefill_ms"]
    else: points[key] = r
res = dict(meta, bench="gpu_fp8_prefill", new_tokens=8,
           settings={"split": "FP8 weights, two BF16 terms from 256 rows (default)",
                     "widen": "FP8 weights widened to F32 for SGEMM (DSV3_LINEAR_FP8_SPLIT=0)",
                     "bf16": "BF16 weights (split x on tensor cores)"},
           points=sorted(points.values(), key=lambda r: (r["rows"], r["setting"])))
# "default" is the split setting: two BF16 terms from 256 rows, widened below (the 128-row row
# measures the same path twice).
print("%6s %6s %6s %12s %12s %12s %10s" % ("prompt", "batch", "rows", "default ms", "widen ms", "bf16 ms", "widen/dflt"))
for (p, b) in sorted({(r["prompt"], r["batch"]) for r in res["points"]}, key=lambda t: t[0] * t[1]):
    m = {s: statistics.median(points[(s, p, b)]["prefill_ms"]) for s in ("split", "widen", "bf16")}
    for s in m: points[(s, p, b)]["prefill_ms_median"] = m[s]
    print("%6d %6d %6d %12.2f %12.2f %12.2f %10.2f" % (p, b, p * b, m["split"], m["widen"], m["bf16"], m["widen"] / m["split"]))
json.dump(res, open(out, "w"), indent=1)
print("wrote", out)
PY
