#!/usr/bin/env python3
"""Summarise a host stack profile written by bench/common/host_profile.h.

usage: host_profile.py PROFILE BINARY [--top N]

BINARY is the unstripped build of the program that wrote PROFILE (the GPU machine may have run a
stripped copy of it). Prints, as shares of all samples:
  - where the innermost frame was (our binary or which shared library);
  - inclusive time of each function of our binary (a function counted once per sample);
  - each call from our binary into a library, by the innermost frame of ours and the library.
Needs only addr2line (binutils).
"""
import collections
import os
import subprocess
import sys


def load(path):
    maps, samples = [], []
    with open(path) as f:
        for line in f:
            if line.startswith("m "):
                parts = line[2:].split(None, 5)
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                off = int(parts[2], 16)
                name = parts[5].strip() if len(parts) > 5 else ""
                maps.append((lo, hi, off, name))
            elif line.startswith("s"):
                samples.append([int(x, 16) for x in line.split()[1:]])
    return maps, samples


def main():
    args = sys.argv[1:]
    top = 40
    if "--top" in args:
        i = args.index("--top")
        top = int(args[i + 1])
        del args[i : i + 2]
    if len(args) != 2:
        sys.exit(__doc__)
    maps, samples = load(args[0])
    binary = args[1]
    if not samples:
        sys.exit(f"{args[0]}: no samples")
    exe = None
    for lo, hi, off, name in maps:
        if os.path.basename(name) == os.path.basename(binary) and off == 0:
            exe = name
            break
    if exe is None:
        sys.exit(f"{args[0]}: no mapping of {os.path.basename(binary)}")
    base = min(lo for lo, hi, off, name in maps if name == exe)

    def module(a):
        for lo, hi, off, name in maps:
            if lo <= a < hi:
                return name
        return "?"

    ours = sorted({a for s in samples for a in s if module(a) == exe})
    # Return addresses point after the call: look up a-1 so the line is the call's.
    out = subprocess.run(["addr2line", "-f", "-C", "-e", binary] + [hex(a - 1 - base) for a in ours],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    fn = {a: out[2 * i] for i, a in enumerate(ours)}

    n = len(samples)
    leaf = collections.Counter()
    incl = collections.Counter()
    calls = collections.Counter()
    for s in samples:
        mods = [module(a) for a in s]
        leaf[os.path.basename(mods[0]) if mods else "?"] += 1
        seen = set()
        for a, m in zip(s, mods):
            if m == exe and fn[a] not in seen:
                seen.add(fn[a])
                incl[fn[a]] += 1
        for j, (a, m) in enumerate(zip(s, mods)):
            if m == exe:
                callee = os.path.basename(mods[j - 1]) if j > 0 else "(self)"
                calls[(fn[a], callee)] += 1
                break

    def pct(c):
        return f"{100.0 * c / n:5.1f}%"

    print(f"{n} samples")
    print("\ninnermost frame in:")
    for k, c in leaf.most_common(12):
        print(f"  {pct(c)}  {k}")
    print("\ninclusive, functions of our binary:")
    for k, c in incl.most_common(top):
        print(f"  {pct(c)}  {k[:150]}")
    print("\ninnermost frame of ours -> where it was:")
    for (f, m), c in calls.most_common(top):
        print(f"  {pct(c)}  {f[:110]}  -> {m}")


if __name__ == "__main__":
    main()
