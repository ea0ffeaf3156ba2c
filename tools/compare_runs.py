#!/usr/bin/env python3
"""Compare `dsv3 train` runs against a reference run: per-step loss and gradient norm
(metrics.jsonl) and the final parameters (the newest step-N checkpoint's safetensors).

Used by bench/multi_gpu.sh for the several-GPU equality checks (docs/distributed.md): a data- or
expert-parallel run against one process on the same global batch. Prints one line per run and, with
--json, writes the numbers.

  tools/compare_runs.py --ref DIR RUN_DIR... [--loss-rtol 1e-5] [--param-atol 1e-5] [--json OUT]

A run passes when every step's loss and gradient norm is within --loss-rtol (relative) of the
reference's and every parameter within --param-atol (absolute); "bitwise" says whether all of it
is identical. Exit status 1 when a run fails, 2 on bad input.
"""
import argparse
import glob
import json
import os
import sys


def fail_input(msg):
    print(f"compare_runs.py: {msg}", file=sys.stderr)
    sys.exit(2)


def metrics(run):
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.exists(path):
        fail_input(f"{path} is missing (not a dsv3 train run directory?)")
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                fail_input(f"{path}:{n}: {e}")
            if "loss" in r and "step" in r:
                rows.append(r)
    return {r["step"]: r for r in rows}


def newest_checkpoint(run):
    steps = []
    for d in glob.glob(os.path.join(run, "step-*")):
        tail = os.path.basename(d)[5:]
        if tail.isdigit() and glob.glob(os.path.join(d, "*.safetensors")):
            steps.append((int(tail), d))
    return max(steps)[1] if steps else None


def read_safetensors(path):
    """{name: numpy array}; BF16 widened to float32 (its bits are the top half of an F32)."""
    import numpy as np
    kinds = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "I32": np.int32, "I64": np.int64,
             "U8": np.uint8, "BF16": np.uint16}
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        if t["dtype"] not in kinds:
            fail_input(f"{path}: tensor {name} has dtype {t['dtype']}, which this tool does not read")
        b, e = t["data_offsets"]
        a = np.frombuffer(data[b:e], dtype=kinds[t["dtype"]]).reshape(t["shape"])
        if t["dtype"] == "BF16":
            a = (a.astype(np.uint32) << 16).view(np.float32)
        out[name] = a
    return out


def parameters(ckpt):
    out = {}
    for f in sorted(glob.glob(os.path.join(ckpt, "*.safetensors"))):
        if os.path.basename(f).startswith("optimizer"):
            continue
        out.update(read_safetensors(f))
    return out


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-30)


def compare(ref_dir, run_dir, args):
    import numpy as np
    ref, run = metrics(ref_dir), metrics(run_dir)
    steps = sorted(set(ref) & set(run))
    if not steps:
        fail_input(f"{run_dir} and {ref_dir} share no logged step")
    errors = []
    if set(ref) != set(run):
        errors.append(f"logged steps differ: {sorted(run)} vs {sorted(ref)}")

    def worst(field):
        # A non-finite value is logged as null: that fails, named, instead of stopping the tool.
        w = 0.0
        for s in steps:
            a, b = run[s].get(field), ref[s].get(field)
            if a is None or b is None:
                errors.append(f"step {s}: {field} is not finite ({a} vs {b})")
                return float("inf")
            w = max(w, rel(a, b))
        return w
    loss, gnorm = worst("loss"), worst("grad_norm")
    bitwise = all(run[s].get("loss") == ref[s].get("loss") and run[s].get("grad_norm") == ref[s].get("grad_norm")
                  for s in steps)
    res = {"run": run_dir, "ref": ref_dir, "steps": steps, "loss_max_rel": loss, "grad_norm_max_rel": gnorm,
           "losses": [run[s].get("loss") for s in steps], "ref_losses": [ref[s].get("loss") for s in steps]}
    ok = loss <= args.loss_rtol and gnorm <= args.loss_rtol
    rc, cc = newest_checkpoint(ref_dir), newest_checkpoint(run_dir)
    if not (rc and cc):
        res["param_max_abs"] = None
        errors.append("no pair of checkpoints to compare")  # the parameters are part of the check
    elif os.path.basename(rc) != os.path.basename(cc):
        res["param_max_abs"] = None
        errors.append(f"newest checkpoints are different steps: {cc} vs {rc}")
    else:
        pr, pc = parameters(rc), parameters(cc)
        if set(pr) != set(pc):
            fail_input(f"{cc} and {rc} hold different tensors")
        param_worst, worst_name, same = 0.0, None, True
        for name in sorted(pr):
            a, b = pc[name].astype(np.float64), pr[name].astype(np.float64)
            if a.shape != b.shape:
                fail_input(f"{name}: shape {a.shape} in {cc} but {b.shape} in {rc}")
            d = float(np.max(np.abs(a - b))) if a.size else 0.0
            if not np.isfinite(d):  # a NaN or Inf on either side is a failure, not a skipped maximum
                d = float("inf")
            same = same and bool(np.array_equal(pc[name], pr[name]))
            if d > param_worst or worst_name is None:
                param_worst, worst_name = d, name
        res.update({"param_max_abs": param_worst, "param_worst_tensor": worst_name, "tensors": len(pr),
                    "checkpoints": [cc, rc]})
        ok = ok and param_worst <= args.param_atol
        bitwise = bitwise and same
    res["bitwise"] = bitwise and not errors
    res["errors"] = errors
    res["pass"] = ok and not errors
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ref", required=True, help="reference run directory")
    ap.add_argument("runs", nargs="+", help="run directories to compare with it")
    ap.add_argument("--loss-rtol", type=float, default=1e-5)
    ap.add_argument("--param-atol", type=float, default=1e-5)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    results = [compare(args.ref, r, args) for r in args.runs]
    for r in results:
        p = "n/a" if r["param_max_abs"] is None else f"{r['param_max_abs']:.3g}"
        print(f"{r['run']} vs {r['ref']}: loss max rel {r['loss_max_rel']:.3g}, grad norm max rel "
              f"{r['grad_norm_max_rel']:.3g}, params max abs {p}, bitwise {r['bitwise']} -> "
              f"{'PASS' if r['pass'] else 'FAIL'}" + "".join(f"\n  {e}" for e in r["errors"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    sys.exit(0 if all(r["pass"] for r in results) else 1)


if __name__ == "__main__":
    main()
