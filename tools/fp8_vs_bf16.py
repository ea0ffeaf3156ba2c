#!/usr/bin/env python3
"""Summarise BF16 / FP8 / negative-control training runs (dsv3 train metrics.jsonl) into
bench/results/fp8_vs_bf16.json and one SVG plot per experiment (gnuplot).

usage: fp8_vs_bf16.py OUT_JSON NAME CONFIG_JSON RUN_DIR... [NAME CONFIG_JSON RUN_DIR...]...
Each experiment is NAME, a JSON object describing the configuration, and its run directories, named
<first word of NAME>-<tag> with tag bf16, fp8 (both required), fp8-dgrad-128x128 (the negative control),
bf16-seed1235 / fp8-seed1235 (a second seed), fp8-moments-bf16.
Smoothing: EMA with coefficient 0.9 (as [V3] Fig. 10), bias-corrected; the relative difference is
(fp8 - bf16) / bf16 of the smoothed training loss at the last step and of the last validation loss.
"""
import json
import os
import subprocess
import sys


def load(run):
    rows = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl")) if l.strip()]
    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    skipped = sum(1 for r in rows if r.get("skipped"))
    return train, val, skipped, len(rows)


def ema(series, beta=0.9):
    out, m = [], 0.0
    for i, (s, v) in enumerate(series, 1):
        m = beta * m + (1 - beta) * v
        out.append((s, m / (1 - beta**i)))
    return out


def summary(run):
    train, val, skipped, steps = load(run)
    sm = ema(train)
    return {
        "dir": run,
        "steps_logged": steps,
        "skipped_steps": skipped,
        "final_train_loss_ema": sm[-1][1] if sm else None,
        "final_val_loss": val[-1][1] if val else None,
        "val_curve": val,
        "train_ema_every_10": [p for i, p in enumerate(sm) if i % 10 == 9 or i == len(sm) - 1],
    }, sm, val


def plot(name, curves, path):
    data = []
    for label, pts in curves:
        data.append("\n".join(f"{s} {v}" for s, v in pts) or "0 0")
    script = [
        "set terminal svg size 800,480",
        f"set output '{path}'",
        f"set title 'dsv3 {name}: training loss (EMA 0.9) and validation loss'",
        "set xlabel 'step'",
        "set ylabel 'loss'",
        "set key top right",
        "plot " + ", ".join(f"'-' with lines title '{label}'" for label, _ in curves),
    ]
    body = "\n".join(script) + "\n" + "\ne\n".join(data) + "\ne\n"
    subprocess.run(["gnuplot"], input=body.encode(), check=True)


# Run directories are named <experiment>-<tag>; the tag says what the run is.
LABELS = {
    "bf16": "bf16",
    "fp8": "fp8",
    "fp8-dgrad-128x128": "fp8 dgrad 128x128",
    "bf16-seed1235": "bf16 other seed",
    "fp8-seed1235": "fp8 other seed",
    "fp8-moments-bf16": "fp8 bf16 moments",
}


def rel(a, b):
    return None if a is None or b is None else (b - a) / a


def flatness(val):
    """Relative change of the validation loss over the last fifth of the run (negative: still falling)."""
    if len(val) < 2:
        return None
    last_step = val[-1][0]
    earlier = [v for s, v in val if s <= 0.8 * last_step]
    return rel(earlier[-1], val[-1][1]) if earlier else None


def main(argv):
    out_json = argv[1]
    args = argv[2:]
    experiments = []
    while args:
        name, config = args[0], json.loads(args[1])
        dirs = {}
        args = args[2:]
        while args and os.path.isdir(args[0]):
            tag = os.path.basename(os.path.normpath(args[0]))[len(name.split("-")[0]) + 1:]
            if tag not in LABELS:
                sys.exit(f"fp8_vs_bf16.py: {args[0]}: unknown run tag '{tag}' (expected one of {sorted(LABELS)})")
            dirs[tag] = args[0]
            args = args[1:]
        for need in ("bf16", "fp8"):
            if need not in dirs:
                sys.exit(f"fp8_vs_bf16.py: experiment {name} has no '{need}' run")
        runs = {tag: summary(d) for tag, d in dirs.items()}
        bf16, fp8 = runs["bf16"][0], runs["fp8"][0]
        res = {"name": name, "config": config, "bf16": bf16, "fp8": fp8}
        curves = []
        for tag in LABELS:
            if tag in runs:
                s, sm, val = runs[tag]
                curves.append((LABELS[tag] + " train", sm))
                curves.append((LABELS[tag] + " val", val))
        res["rel_diff_train_loss"] = rel(bf16["final_train_loss_ema"], fp8["final_train_loss_ema"])
        res["rel_diff_val_loss"] = rel(bf16["final_val_loss"], fp8["final_val_loss"])
        res["val_change_last_fifth"] = {tag: flatness(runs[tag][2]) for tag in runs}
        if "fp8-dgrad-128x128" in runs:
            nc = runs["fp8-dgrad-128x128"][0]
            res["negative_control_dgrad_128x128"] = nc
            res["negative_control_rel_diff_train_loss"] = rel(bf16["final_train_loss_ema"], nc["final_train_loss_ema"])
            res["negative_control_rel_diff_val_loss"] = rel(bf16["final_val_loss"], nc["final_val_loss"])
        for tag in ("bf16-seed1235", "fp8-moments-bf16"):
            if tag in runs:
                # Noise scale: how far a run that differs only by seed lands; and the paper's BF16
                # AdamW moments on top of FP8.
                s = runs[tag][0]
                res.setdefault("references", {})[LABELS[tag]] = {
                    "summary": s,
                    "rel_diff_train_loss": rel(bf16["final_train_loss_ema"], s["final_train_loss_ema"]),
                    "rel_diff_val_loss": rel(bf16["final_val_loss"], s["final_val_loss"]),
                }
        if "bf16-seed1235" in runs and "fp8-seed1235" in runs:
            # A second FP8-vs-BF16 pair from another seed: the mean of the two pairs halves the variance
            # of the seed-to-seed spread that a single pair carries.
            b2, f2 = runs["bf16-seed1235"][0], runs["fp8-seed1235"][0]
            res["references"]["fp8 other seed"] = {"summary": f2}
            pairs_t = [res["rel_diff_train_loss"], rel(b2["final_train_loss_ema"], f2["final_train_loss_ema"])]
            pairs_v = [res["rel_diff_val_loss"], rel(b2["final_val_loss"], f2["final_val_loss"])]
            res["per_seed_rel_diff_train_loss"] = pairs_t
            res["per_seed_rel_diff_val_loss"] = pairs_v
            res["mean_rel_diff_train_loss"] = sum(pairs_t) / 2
            res["mean_rel_diff_val_loss"] = sum(pairs_v) / 2
        svg = os.path.join(os.path.dirname(out_json), f"fp8_vs_bf16_{name}.svg")
        plot(name, curves, svg)
        res["plot"] = os.path.relpath(svg, os.path.dirname(os.path.dirname(os.path.dirname(out_json))))
        experiments.append(res)
    top = dict(experiments[0])
    top["steps"] = top["config"].get("steps")
    top["tokens"] = top["config"].get("tokens")
    top["paper_bar"] = "relative loss error below 0.25% ([V3] 3.3)"
    top["experiments"] = experiments
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    top["commit"] = commit
    top["date"] = subprocess.run(["date", "-u", "+%Y-%m-%dT%H:%M:%SZ"], capture_output=True, text=True).stdout.strip()
    top["machine"] = {"cores": os.cpu_count(), "loadavg": os.getloadavg()}
    with open(out_json + ".tmp", "w") as f:
        json.dump(top, f, indent=1)
    os.replace(out_json + ".tmp", out_json)
    for e in experiments:
        line = f"{e['name']}: rel_diff_train_loss {e['rel_diff_train_loss']:+.4%}  rel_diff_val_loss {e['rel_diff_val_loss']:+.4%}"
        if "mean_rel_diff_val_loss" in e:
            line += f"  (mean of 2 seeds: {e['mean_rel_diff_train_loss']:+.4%} / {e['mean_rel_diff_val_loss']:+.4%})"
        print(line)
        print("  val change over the last fifth: " +
              ", ".join(f"{t} {v:+.3%}" for t, v in e["val_change_last_fifth"].items() if v is not None))


if __name__ == "__main__":
    main(sys.argv)
