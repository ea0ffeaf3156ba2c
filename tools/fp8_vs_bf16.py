#!/usr/bin/env python3
"""Summarise BF16 / FP8 / negative-control training runs (dsv3 train metrics.jsonl) into
bench/results/fp8_vs_bf16.json and one SVG plot per experiment (gnuplot).

usage: fp8_vs_bf16.py [--keep-existing] OUT_JSON NAME CONFIG_JSON RUN_DIR... [NAME CONFIG_JSON RUN_DIR...]...
--keep-existing: experiments already in OUT_JSON under other names stay (after the new ones).
Each experiment is NAME, a JSON object describing the configuration, and its run directories, named
<first word of NAME>-<tag> with tag bf16, fp8 (both required), fp8-dgrad-128x128 (the negative control),
bf16-seed1235 / fp8-seed1235 (a second seed), fp8-moments-bf16; bf16-seedN / fp8-seedN (further seeds:
more pairs at the flat point and in the per-seed lists).
Smoothing: EMA with coefficient 0.9 (as [V3] Fig. 10), bias-corrected; the relative difference is
(fp8 - bf16) / bf16 of the smoothed training loss at the last step and of the last validation loss.
Where the loss flattens: the flat point is the evaluation step where the mean validation loss of the
experiment's runs is lowest (past it, runs that repeat their data start to over-fit); around it, a
window of +-10% of the steps, the mean raw training loss and mean validation loss of each run give the
relative differences in `flat_point` (a window, because a single step's smoothed loss moves by more
than the 0.25% bar from one step to the next). A run counts as flat when its validation loss moved by
less than the bar over its last fifth, or its lowest validation loss came before its last fifth.
"""
import json
import os
import re
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


def label(tag):
    if tag in LABELS:
        return LABELS[tag]
    m = re.fullmatch(r"(bf16|fp8)-seed(\d+)", tag)
    return f"{m.group(1)} seed {m.group(2)}" if m else None


def seed_pairs(tags):
    """(bf16, fp8) tag pairs of the same seed: the first seed, then every further one present."""
    seeds = sorted({t.split("-seed")[1] for t in tags if re.fullmatch(r"(bf16|fp8)-seed\d+", t)}, key=int)
    return [("bf16", "fp8")] + [(f"bf16-seed{n}", f"fp8-seed{n}") for n in seeds
                                if f"bf16-seed{n}" in tags and f"fp8-seed{n}" in tags]


def rel(a, b):
    return None if a is None or b is None else (b - a) / a


def flatness(val):
    """Relative change of the validation loss over the last fifth of the run (negative: still falling)."""
    if len(val) < 2:
        return None
    last_step = val[-1][0]
    earlier = [v for s, v in val if s <= 0.8 * last_step]
    return rel(earlier[-1], val[-1][1]) if earlier else None


BAR = 0.0025


def window_means(run, step, half):
    rows = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl")) if l.strip()]
    tr = [r["loss"] for r in rows if r.get("loss") is not None and not r.get("skipped") and abs(r["step"] - step) <= half]
    va = [r["val_loss"] for r in rows if r.get("val_loss") is not None and abs(r["step"] - step) <= half]
    return (sum(tr) / len(tr) if tr else None), (sum(va) / len(va) if va else None)


def flat_point(runs, dirs):
    """The flat point and the windowed relative differences there (see the module comment)."""
    curves = {tag: dict(runs[tag][2]) for tag in runs}
    common = sorted(set.intersection(*(set(c) for c in curves.values())))
    if not common:
        return None
    step = min(common, key=lambda s: sum(c[s] for c in curves.values()) / len(curves))
    half = max(1, round(0.1 * max(common)))
    means = {tag: window_means(dirs[tag], step, half) for tag in runs}
    out = {"step": step, "window": [step - half, step + half],
           "train_loss_mean": {t: m[0] for t, m in means.items()},
           "val_loss_mean": {t: m[1] for t, m in means.items()}}
    out["pairs"] = []
    for b, f in seed_pairs(set(means)):
        if b in means and f in means:
            out["pairs"].append({"bf16": b, "fp8": f, "rel_diff_train_loss": rel(means[b][0], means[f][0]),
                                 "rel_diff_val_loss": rel(means[b][1], means[f][1])})
    if "fp8-dgrad-128x128" in means:
        out["negative_control_rel_diff_train_loss"] = rel(means["bf16"][0], means["fp8-dgrad-128x128"][0])
        out["negative_control_rel_diff_val_loss"] = rel(means["bf16"][1], means["fp8-dgrad-128x128"][1])
    if "bf16-seed1235" in means:
        out["bf16_seed_spread_train_loss"] = rel(means["bf16"][0], means["bf16-seed1235"][0])
        out["bf16_seed_spread_val_loss"] = rel(means["bf16"][1], means["bf16-seed1235"][1])
    return out


def is_flat(val):
    if len(val) < 2:
        return False
    change = flatness(val)
    best_step = min(val, key=lambda p: p[1])[0]
    return (change is not None and abs(change) < BAR) or best_step <= 0.8 * val[-1][0]


def mean_sd(xs):
    m = sum(xs) / len(xs)
    sd = (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else None
    return m, sd


def main(argv):
    keep = "--keep-existing" in argv[1:]
    argv = [a for a in argv if a != "--keep-existing"]
    out_json = argv[1]
    args = argv[2:]
    experiments = []
    while args:
        name, config = args[0], json.loads(args[1])
        dirs = {}
        args = args[2:]
        while args and os.path.isdir(args[0]):
            tag = os.path.basename(os.path.normpath(args[0]))[len(name.split("-")[0]) + 1:]
            if label(tag) is None:
                sys.exit(f"fp8_vs_bf16.py: {args[0]}: unknown run tag '{tag}' "
                         f"(expected one of {sorted(LABELS)} or bf16-seedN / fp8-seedN)")
            dirs[tag] = args[0]
            args = args[1:]
        for need in ("bf16", "fp8"):
            if need not in dirs:
                sys.exit(f"fp8_vs_bf16.py: experiment {name} has no '{need}' run")
        runs = {tag: summary(d) for tag, d in dirs.items()}
        bf16, fp8 = runs["bf16"][0], runs["fp8"][0]
        res = {"name": name, "config": config, "bf16": bf16, "fp8": fp8}
        curves = []
        for tag in list(LABELS) + sorted(t for t in runs if t not in LABELS):
            if tag in runs:
                s, sm, val = runs[tag]
                curves.append((label(tag) + " train", sm))
                curves.append((label(tag) + " val", val))
        res["rel_diff_train_loss"] = rel(bf16["final_train_loss_ema"], fp8["final_train_loss_ema"])
        res["rel_diff_val_loss"] = rel(bf16["final_val_loss"], fp8["final_val_loss"])
        res["val_change_last_fifth"] = {tag: flatness(runs[tag][2]) for tag in runs}
        res["val_min"] = {tag: dict(zip(("step", "val_loss"), min(runs[tag][2], key=lambda p: p[1])))
                          for tag in runs if runs[tag][2]}
        res["flat"] = {tag: is_flat(runs[tag][2]) for tag in runs}
        fp = flat_point(runs, dirs)
        if fp and all(res["flat"].values()):
            res["flat_point"] = fp
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
            # A second FP8-vs-BF16 pair from another seed (and any further ones): the mean of n pairs
            # divides the variance of the seed-to-seed spread that a single pair carries by n.
            res["references"]["fp8 other seed"] = {"summary": runs["fp8-seed1235"][0]}
            pairs = [(runs[b][0], runs[f][0]) for b, f in seed_pairs(set(runs))]
            pairs_t = [rel(b["final_train_loss_ema"], f["final_train_loss_ema"]) for b, f in pairs]
            pairs_v = [rel(b["final_val_loss"], f["final_val_loss"]) for b, f in pairs]
            res["per_seed_rel_diff_train_loss"] = pairs_t
            res["per_seed_rel_diff_val_loss"] = pairs_v
            res["mean_rel_diff_train_loss"] = sum(pairs_t) / len(pairs_t)
            res["mean_rel_diff_val_loss"] = sum(pairs_v) / len(pairs_v)
        for b, f in seed_pairs(set(runs))[2:]:
            res.setdefault("references", {})[label(b)] = {"summary": runs[b][0]}
            res["references"][label(f)] = {"summary": runs[f][0]}
        svg = os.path.join(os.path.dirname(out_json), f"fp8_vs_bf16_{name}.svg")
        plot(name, curves, svg)
        res["plot"] = os.path.relpath(svg, os.path.dirname(os.path.dirname(os.path.dirname(out_json))))
        experiments.append(res)
    if keep and os.path.exists(out_json):
        names = {e["name"] for e in experiments}
        experiments += [e for e in json.load(open(out_json)).get("experiments", []) if e["name"] not in names]
    top = dict(experiments[0])
    # Every FP8-vs-BF16 pair measured at a flat point, over all experiments: the mean and its spread.
    flat_pairs = [dict(p, experiment=e["name"]) for e in experiments for p in e.get("flat_point", {}).get("pairs", [])]
    if flat_pairs:
        tm, tsd = mean_sd([p["rel_diff_train_loss"] for p in flat_pairs])
        vm, vsd = mean_sd([p["rel_diff_val_loss"] for p in flat_pairs])
        n = len(flat_pairs)
        top["flat_pairs"] = {"pairs": flat_pairs, "n": n, "mean_rel_diff_train_loss": tm,
                             "mean_rel_diff_val_loss": vm,
                             "stderr_rel_diff_train_loss": tsd / n ** 0.5 if tsd is not None else None,
                             "stderr_rel_diff_val_loss": vsd / n ** 0.5 if vsd is not None else None}
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
            line += f"  (mean of {len(e['per_seed_rel_diff_train_loss'])} seeds: {e['mean_rel_diff_train_loss']:+.4%} / {e['mean_rel_diff_val_loss']:+.4%})"
        print(line)
        print("  val change over the last fifth: " +
              ", ".join(f"{t} {v:+.3%}" for t, v in e["val_change_last_fifth"].items() if v is not None))
        for p in e.get("flat_point", {}).get("pairs", []):
            print(f"  flat point (step {e['flat_point']['step']}, window {e['flat_point']['window']}): {p['fp8']} vs "
                  f"{p['bf16']}: train {p['rel_diff_train_loss']:+.3%}  val {p['rel_diff_val_loss']:+.3%}")
    if "flat_pairs" in top:
        f = top["flat_pairs"]
        se = lambda x: "n/a" if x is None else f"{x:.3%}"
        print(f"all {f['n']} pairs at flat points: train {f['mean_rel_diff_train_loss']:+.3%} "
              f"(standard error {se(f['stderr_rel_diff_train_loss'])})  val {f['mean_rel_diff_val_loss']:+.3%} "
              f"(standard error {se(f['stderr_rel_diff_val_loss'])})")


if __name__ == "__main__":
    main(sys.argv)
