#!/usr/bin/env python3
"""Kernel time by kernel name from an Nsight Compute CSV of gpu__time_duration.

  ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum --csv \
      --print-units base --log-file step.csv dsv3_bench_gpu_train --precisions bf16 --steps 1
  tools/ncu_kernel_table.py step.csv [--top 40]

Prints total kernel time, launches, and per name: ms, share, launches, mean µs (the profiler
serialises kernels, so this is GPU work, not the overlapped wall clock). When the CSV also holds
smsp__inst_executed.sum (add it to --metrics), a column gives each name's warp instructions in
millions: a kernel whose count fell while its time did not is no longer bound by issue.

  tools/ncu_kernel_table.py step.csv --launches 2:17

prints launches 2 to 16 instead, in launch order, with grid, block and µs each (one decode layer's
chain, say), so a per-launch figure quoted in the docs can be read back from the CSV."""
import argparse
import csv
import collections
import sys


def duration_ns(row):
    unit = {"ns": 1, "nsecond": 1, "us": 1e3, "usecond": 1e3, "ms": 1e6, "msecond": 1e6}
    return float(row["Metric Value"].replace(",", "")) * unit.get(row.get("Metric Unit", "ns"), 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--width", type=int, default=70, help="kernel name column width")
    ap.add_argument("--launches", metavar="FIRST:END", help="list launches FIRST..END-1 in order instead")
    a = ap.parse_args()
    with open(a.csv, newline="") as f:
        lines = [l for l in f if l.startswith('"')]  # ncu's own log lines ("==PROF==") are not CSV
    if not lines:
        sys.exit(f"{a.csv}: no CSV rows (was ncu run with --csv and the gpu__time_duration metric?)")
    if a.launches:
        return list_launches(lines, a)
    ns = collections.defaultdict(float)
    n = collections.Counter()
    inst = collections.defaultdict(float)
    for row in csv.DictReader(lines):
        if row.get("Metric Name") == "smsp__inst_executed.sum":
            inst[row["Kernel Name"]] += float(row["Metric Value"].replace(",", ""))
            continue
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        v = duration_ns(row)
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


def list_launches(lines, a):
    try:
        first, end = (int(v) for v in a.launches.split(":"))
    except ValueError:
        sys.exit(f"--launches {a.launches!r}: expected FIRST:END, two launch indices")
    rows = [r for r in csv.DictReader(lines) if r.get("Metric Name") == "gpu__time_duration.sum"]
    if not rows:
        sys.exit(f"{a.csv}: no gpu__time_duration.sum rows")
    print(f"{'id':>5} {'kernel':<{a.width}} {'grid':>14} {'block':>14} {'us':>8}")
    total = 0.0
    for r in rows[first:end]:
        v = duration_ns(r)
        total += v
        name = r["Kernel Name"]
        short = name if len(name) <= a.width else name[: a.width - 1] + "…"
        grid, block = r.get("Grid Size", "").replace(" ", ""), r.get("Block Size", "").replace(" ", "")
        print(f"{r['ID']:>5} {short:<{a.width}} {grid:>14} {block:>14} {v / 1e3:8.1f}")
    print(f"{len(rows[first:end])} launches, {total / 1e3:.1f} us")


if __name__ == "__main__":
    main()
