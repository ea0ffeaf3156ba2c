#!/usr/bin/env python3
"""Kernel time by kernel name from an Nsight Compute CSV of gpu__time_duration.

  ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum --csv \
      --print-units base --log-file step.csv dsv3_bench_gpu_train --precisions bf16 --steps 1
  tools/ncu_kernel_table.py step.csv [--top 40]

Prints total kernel time, launches, and per name: ms, share, launches, mean µs (the profiler
serialises kernels, so this is GPU work, not the overlapped wall clock). When the CSV also holds
smsp__inst_executed.sum (add it to --metrics), a column gives each name's warp instructions in
millions: a kernel whose count fell while its time did not is no longer bound by issue."""
import argparse
import csv
import collections
import sys


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--width", type=int, default=70, help="kernel name column width")
    a = ap.parse_args()
    with open(a.csv, newline="") as f:
        lines = [l for l in f if l.startswith('"')]  # ncu's own log lines ("==PROF==") are not CSV
    if not lines:
        sys.exit(f"{a.csv}: no CSV rows (was ncu run with --csv and the gpu__time_duration metric?)")
    ns = collections.defaultdict(float)
    n = collections.Counter()
    inst = collections.defaultdict(float)
    for row in csv.DictReader(lines):
        if row.get("Metric Name") == "smsp__inst_executed.sum":
            inst[row["Kernel Name"]] += float(row["Metric Value"].replace(",", ""))
            continue
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        unit = row.get("Metric Unit", "ns")
        v = float(row["Metric Value"].replace(",", ""))
        v *= {"ns": 1, "nsecond": 1, "us": 1e3, "usecond": 1e3, "ms": 1e6, "msecond": 1e6}.get(unit, 1)
        name = row["Kernel Name"]
        ns[name] += v
        n[name] += 1
    total = sum(ns.values())
    if total == 0:
        sys.exit(f"{a.csv}: no gpu__time_duration.sum rows")
    print(f"{total / 1e6:.2f} ms of kernels over {sum(n.values())} launches, {len(ns)} kernel names")
    head = f"{'kernel':<{a.width}} {'ms':>8} {'share':>6} {'launches':>8} {'mean us':>8}"
    print(head + (f" {'Minstr':>9}" if inst else ""))
    for name, v in sorted(ns.items(), key=lambda kv: -kv[1])[: a.top]:
        short = name if len(name) <= a.width else name[: a.width - 1] + "…"
        line = f"{short:<{a.width}} {v / 1e6:8.3f} {v / total:6.1%} {n[name]:8d} {v / n[name] / 1e3:8.1f}"
        print(line + (f" {inst[name] / 1e6:9.1f}" if inst else ""))


if __name__ == "__main__":
    main()
