#!/usr/bin/env python3
"""Aux-loss-free balancing experiment (issue 5): the tiny preset on the Brown corpus, same data and
seed, three ways: (a) aux-loss-free bias (gamma 1e-2, alpha 0), (b) a conventional auxiliary
balance loss only (the sequence-wise loss with alpha 1e-2, gamma 0), (c) neither.

  python3 tools/aux_balance_experiment.py [--dsv3 build/dsv3] [--steps 300] [--runs-dir /tmp/auxexp]
                                          [--skip-runs]

Writes bench/results/aux_balance.json and bench/results/aux_balance.png (gnuplot)."""
import argparse, datetime, json, os, platform, subprocess

RUNS = {
    "a_aux_free": ["--bias-gamma", "1e-2", "--balance-alpha", "0"],
    "b_aux_loss": ["--bias-gamma", "0", "--balance-alpha", "1e-2"],
    "c_neither": ["--bias-gamma", "0", "--balance-alpha", "0"],
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dsv3", default="build/dsv3")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--runs-dir", default="/tmp/auxexp")
    ap.add_argument("--skip-runs", action="store_true", help="only aggregate existing run directories")
    a = ap.parse_args()
    env = dict(os.environ, OMP_WAIT_POLICY="passive")
    procs = []
    if not a.skip_runs:
        for name, extra in RUNS.items():
            cmd = [a.dsv3, "train", "--steps", str(a.steps), "--out", f"{a.runs_dir}/{name}", "--no-resume",
                   "--eval-every", "25", "--sample-tokens", "0", "--threads", "1", "--checkpoint-every", "0"] + extra
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL))
        for p in procs:
            if p.wait() != 0:
                raise SystemExit("a run failed")
    out = {"date": datetime.datetime.utcnow().isoformat() + "Z", "machine": platform.node(),
           "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
           "steps": a.steps, "runs": {}}
    for name, extra in RUNS.items():
        recs = [json.loads(l) for l in open(f"{a.runs_dir}/{name}/metrics.jsonl")]
        val = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
        vio = [(r["step"], sum(r["max_vio"]) / len(r["max_vio"])) for r in recs]
        last = recs[-50:]
        out["runs"][name] = {
            "flags": " ".join(extra), "val_loss": val,
            "final_val_loss": val[-1][1],
            "mean_max_vio_last_50_steps": sum(v for _, v in vio[-50:]) / len(vio[-50:]),
            "max_vio_by_step": vio,
            "final_train_loss_mean_last_50": sum(r["loss"] for r in last) / len(last),
        }
        with open(f"{a.runs_dir}/{name}.dat", "w") as f:
            vd = dict(val)
            for s, v in vio:
                f.write(f"{s} {v} {vd.get(s, 'NaN')}\n")
    with open("bench/results/aux_balance.json", "w") as f:
        json.dump(out, f, indent=1)
    gp = f"""set terminal png size 1100,420
set output 'bench/results/aux_balance.png'
set multiplot layout 1,2
set xlabel 'step'; set ylabel 'MaxVio (mean over MoE layers)'; set key top right
plot for [n in 'a_aux_free b_aux_loss c_neither'] '{a.runs_dir}/'.n.'.dat' using 1:2 with lines title n noenhanced
set ylabel 'validation loss (nats/token)'
set datafile missing 'NaN'
plot for [n in 'a_aux_free b_aux_loss c_neither'] '{a.runs_dir}/'.n.'.dat' using 1:3 with linespoints title n noenhanced
unset multiplot
"""
    subprocess.run(["gnuplot"], input=gp, text=True, check=True)
    for name, r in out["runs"].items():
        print(f"{name:12s} final val loss {r['final_val_loss']:.4f}  mean MaxVio (last 50 steps) "
              f"{r['mean_max_vio_last_50_steps']:.3f}")


if __name__ == "__main__":
    main()
