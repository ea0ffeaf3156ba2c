#!/usr/bin/env python3
"""Decode A/B on the GPU machine: several builds (or environment settings) of dsv3_bench_gpu_decode,
run in turn for a number of rounds in one command, so that every variant sees the same machine
state; prints the per-step time and the prefill (one per run) of each (weights, batch) as min–max
over the rounds and writes bench/results/<out>.json (commit, date, machine, every round's figures).

  bench/gpu_decode_ab.py [--rounds 2] [--batch 1,32] [--weights bf16,fp8] [--new 128]
                         [--out gpu_decode_ab] LABEL=BINARY[:NAME=VALUE...] ...

A variant is a label, the bench binary and optional environment settings, e.g.
  base=/tmp/old/dsv3_bench_gpu_decode  new=build-gpu/dsv3_bench_gpu_decode
  x32=build-gpu/dsv3_bench_gpu_decode:DSV3_DECODE_GEMV_XROWS=32
Settings are split at a ':' that starts another NAME=, so a value may hold ':' (LD_LIBRARY_PATH).
Round r runs the variants in an order rotated by r, so none always goes first. Each run is
`BINARY --batch B --weights W --variants none --new N --out ab_<pid>_<label>_<round>`; its JSON
(written under the binary's source tree, bench/results) is read back and removed. The output
records each binary's SHA-256 beside the checkout's commit. Exit status 1 when a run fails, 2 on
bad input.
"""
import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import subprocess
import sys

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def bad(msg):
    print(f"gpu_decode_ab.py: {msg}", file=sys.stderr)
    sys.exit(2)


def parse_variant(text):
    label, sep, rest = text.partition("=")
    if not sep or not label or not rest:
        bad(f"variant '{text}': expected LABEL=BINARY[:NAME=VALUE...]")
    if not all(c.isalnum() or c in "-_" for c in label):
        bad(f"variant '{text}': a label is letters, digits, '-' and '_' (it names the runs' files)")
    binary, *settings = re.split(r":(?=[A-Za-z_][A-Za-z0-9_]*=)", rest)
    env = {}
    for s in settings:
        name, sep, value = s.partition("=")
        if not sep or not name:
            bad(f"variant '{label}': setting '{s}' is not NAME=VALUE")
        env[name] = value
    if not os.path.isfile(binary) or not os.access(binary, os.X_OK):
        bad(f"variant '{label}': {binary} is not an executable file")
    with open(binary, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return {"label": label, "binary": os.path.abspath(binary), "sha256": digest, "env": env}


def git_commit():
    # As the C++ benches (bench_util.cpp): DSV3_COMMIT first, for a copy of the tree without .git.
    if os.environ.get("DSV3_COMMIT"):
        return os.environ["DSV3_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def gpu_name():
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, check=True).stdout.strip().splitlines()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "unknown"


def run_once(v, args, rnd):
    name = f"ab_{os.getpid()}_{v['label']}_{rnd}"
    cmd = [v["binary"], "--batch", args.batch, "--weights", args.weights, "--variants", "none", "--new",
           str(args.new), "--out", name]
    env = dict(os.environ, **v["env"])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-2000:] + proc.stderr[-2000:], file=sys.stderr)
        print(f"gpu_decode_ab.py: {v['label']} round {rnd} exited with {proc.returncode}", file=sys.stderr)
        sys.exit(1)
    # The bench prints the path it wrote; fall back to this checkout's results folder.
    path = next((line.split("wrote ", 1)[1].strip() for line in proc.stdout.splitlines() if line.startswith("wrote ")),
                os.path.join(RESULTS, name + ".json"))
    try:
        with open(path) as f:
            data = json.load(f)
        os.remove(path)
    except (OSError, ValueError) as e:
        print(f"gpu_decode_ab.py: {v['label']} round {rnd}: no readable result at '{path}' ({e})", file=sys.stderr)
        sys.exit(1)
    return ({f"{r['weights']} b{r['batch']}": r["step_ms_median"] for r in data["runs"]},
            {f"{r['weights']} b{r['batch']}": r["prefill_ms"] for r in data["runs"]})


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch", default="1,32")
    ap.add_argument("--weights", default="bf16,fp8")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--out", default="gpu_decode_ab")
    ap.add_argument("variants", nargs="+")
    args = ap.parse_args()
    if args.rounds < 1:
        bad("--rounds must be at least 1")
    if not re.fullmatch(r"[1-9][0-9]*(,[1-9][0-9]*)*", args.batch):
        bad(f"--batch '{args.batch}': a comma-separated list of positive row counts")
    if not re.fullmatch(r"(f32|bf16|fp8)(,(f32|bf16|fp8))*", args.weights):
        bad(f"--weights '{args.weights}': a comma-separated list of f32, bf16, fp8")
    if args.new < 1:
        bad("--new must be at least 1")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", args.out):
        bad(f"--out '{args.out}': a file name (letters, digits, '-', '_'), written under bench/results")
    variants = [parse_variant(t) for t in args.variants]
    if len({v["label"] for v in variants}) != len(variants):
        bad("variant labels must differ")
    rounds = {v["label"]: [] for v in variants}
    prefill = {v["label"]: [] for v in variants}
    for rnd in range(1, args.rounds + 1):
        for i in range(len(variants)):
            v = variants[(i + rnd - 1) % len(variants)]
            step, pre = run_once(v, args, rnd)
            rounds[v["label"]].append(step)
            prefill[v["label"]].append(pre)
            print(f"round {rnd}: {v['label']} done", flush=True)
    keys = sorted({k for rs in rounds.values() for r in rs for k in r},
                  key=lambda k: (k.split()[0], int(k.split()[1][1:])))
    for title, table in (("ms per decode step", rounds), ("ms per prefill (one per run)", prefill)):
        print(f"{title} (min-max over rounds)")
        print(f"{'variant':<12}" + "".join(f"{k:>18}" for k in keys))
        for v in variants:
            cells = []
            for k in keys:
                xs = [r[k] for r in table[v["label"]] if k in r]
                cells.append(f"{min(xs):.3f}-{max(xs):.3f}" if xs else "-")
            print(f"{v['label']:<12}" + "".join(f"{c:>18}" for c in cells))
    out = {"bench": "gpu_decode_ab", "commit": git_commit(),
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "machine": {"gpu": gpu_name(), "host": platform.node()},
           "batch": args.batch, "weights": args.weights, "new_tokens": args.new, "rounds": args.rounds,
           "variants": [{"label": v["label"], "binary": v["binary"], "sha256": v["sha256"], "env": v["env"],
                         "step_ms": rounds[v["label"]], "prefill_ms": prefill[v["label"]]} for v in variants]}
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, args.out + ".json")
    with open(path + ".tmp", "w") as f:
        json.dump(out, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
