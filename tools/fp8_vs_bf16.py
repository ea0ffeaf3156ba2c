#!/usr/bin/env python3
"""Summarise BF16 / FP8 / negative-control training runs (dsv3 train metrics.jsonl) into
bench/results/fp8_vs_bf16.json and one SVG plot per experiment (gnuplot).

usage: fp8_vs_bf16.py OUT_JSON NAME CONFIG_JSON BF16_DIR FP8_DIR [CONTROL_DIR [BF16_OTHER_SEED_DIR [FP8_BF16_MOMENTS_DIR]]]
                      [NAME CONFIG ...]...
Each experiment is NAME, a JSON object describing the configuration, and its run directories.
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


def main(argv):
    out_json = argv[1]
    args = argv[2:]
    experiments = []
    while args:
        name, config = args[0], json.loads(args[1])
        dirs = []
        args = args[2:]
        while args and os.path.isdir(args[0]):
            dirs.append(args[0])
            args = args[1:]
        bf16, _, _ = summary(dirs[0])
        fp8, _, _ = summary(dirs[1])
        res = {"name": name, "config": config, "bf16": bf16, "fp8": fp8}
        curves = []
        labels = ["bf16", "fp8", "fp8 dgrad 128x128", "bf16 other seed", "fp8 bf16 moments"]
        for label, d in zip(labels, dirs):
            s, sm, val = summary(d)
            curves.append((label + " train", sm))
            curves.append((label + " val", val))
            if label.startswith("fp8 dgrad"):
                res["negative_control_dgrad_128x128"] = s
            if label in ("bf16 other seed", "fp8 bf16 moments"):
                # Noise scale: how far a run that differs only by seed lands; and the paper's BF16
                # AdamW moments on top of FP8.
                res.setdefault("references", {})[label] = {
                    "summary": s,
                    "rel_diff_train_loss": (s["final_train_loss_ema"] - bf16["final_train_loss_ema"])
                    / bf16["final_train_loss_ema"],
                    "rel_diff_val_loss": (s["final_val_loss"] - bf16["final_val_loss"]) / bf16["final_val_loss"],
                }
        def rel(a, b):
            return None if a is None or b is None else (b - a) / a
        res["rel_diff_train_loss"] = rel(bf16["final_train_loss_ema"], fp8["final_train_loss_ema"])
        res["rel_diff_val_loss"] = rel(bf16["final_val_loss"], fp8["final_val_loss"])
        if "negative_control_dgrad_128x128" in res:
            nc = res["negative_control_dgrad_128x128"]
            res["negative_control_rel_diff_train_loss"] = rel(bf16["final_train_loss_ema"], nc["final_train_loss_ema"])
            res["negative_control_rel_diff_val_loss"] = rel(bf16["final_val_loss"], nc["final_val_loss"])
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
        print(f"{e['name']}: rel_diff_train_loss {e['rel_diff_train_loss']:+.4%}  rel_diff_val_loss "
              f"{e['rel_diff_val_loss']:+.4%}" if e["rel_diff_val_loss"] is not None else e["name"])


if __name__ == "__main__":
    main(sys.argv)
