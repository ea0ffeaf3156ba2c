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
chain, say), so a per-launch figure quoted in the docs can be read back from the CSV.

  tools/ncu_kernel_table.py new.csv --against old.csv

compares two profiles of the same work (two builds, two settings): per kernel name the ms and
launches of each and the difference, largest change first, so a step that got slower shows
whether any kernel did."""
import argparse
import csv
import collections
import signal
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
    ap.add_argument("--against", metavar="OTHER_CSV", help="compare with another profile, kernel by kernel")
    a = ap.parse_args()
    lines = csv_lines(a.csv)
    if a.launches:
        return list_launches(lines, a)
    ns, n, inst = totals(lines, a.csv)
    if a.against:
        return compare(a, ns, n, *totals(csv_lines(a.against), a.against)[:2])
    total = sum(ns.values())
    print(f"{total / 1e6:.2f} ms of kernels over {sum(n.values())} launches, {len(ns)} kernel names")
    head = f"{'kernel':<{a.width}} {'ms':>8} {'share':>6} {'launches':>8} {'mean us':>8}"
    print(head + (f" {'Minstr':>9}" if inst else ""))
    for name, v in sorted(ns.items(), key=lambda kv: -kv[1])[: a.top]:
        short = name if len(name) <= a.width else name[: a.width - 1] + "…"
        line = f"{short:<{a.width}} {v / 1e6:8.3f} {v / total:6.1%} {n[name]:8d} {v / n[name] / 1e3:8.1f}"
        print(line + (f" {inst[name] / 1e6:9.1f}" if inst else ""))


def csv_lines(path):
    try:
        with open(path, newline="") as f:
            lines = [l for l in f if l.startswith('"')]  # ncu's own log lines ("==PROF==") are not CSV
    except OSError as e:
        sys.exit(f"{path}: {e.strerror}")
    if not lines:
        sys.exit(f"{path}: no CSV rows (was ncu run with --csv and the gpu__time_duration metric?)")
    return lines


# Per kernel name: ns of gpu__time_duration.sum, launches, and warp instructions (when recorded).
def totals(lines, path):
    ns = collections.defaultdict(float)
    n = collections.Counter()
    inst = collections.defaultdict(float)
    for row in csv.DictReader(lines):
        if row.get("Metric Name") == "smsp__inst_executed.sum":
            inst[row["Kernel Name"]] += float(row["Metric Value"].replace(",", ""))
            continue
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        name = row["Kernel Name"]
        ns[name] += duration_ns(row)
        n[name] += 1
    if sum(ns.values()) == 0:
        sys.exit(f"{path}: no gpu__time_duration.sum rows")
    return ns, n, inst


def compare(a, ns, n, ons, on):
    total, other = sum(ns.values()), sum(ons.values())
    print(f"{a.csv}: {total / 1e6:.3f} ms over {sum(n.values())} launches; "
          f"{a.against}: {other / 1e6:.3f} ms over {sum(on.values())} launches; "
          f"difference {(total - other) / 1e6:+.3f} ms")
    print(f"{'kernel':<{a.width}} {'ms':>8} {'launches':>8} {'other ms':>8} {'launches':>8} {'diff us':>9}")
    names = sorted(set(ns) | set(ons), key=lambda k: -abs(ns.get(k, 0.0) - ons.get(k, 0.0)))
    for name in names[: a.top]:
        short = name if len(name) <= a.width else name[: a.width - 1] + "…"
        v, o = ns.get(name, 0.0), ons.get(name, 0.0)
        print(f"{short:<{a.width}} {v / 1e6:8.3f} {n[name]:8d} {o / 1e6:8.3f} {on[name]:8d} {(v - o) / 1e3:+9.1f}")


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
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `| head` ends the output quietly
    main()
