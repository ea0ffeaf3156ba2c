#!/usr/bin/env python3
"""Hugging Face baseline for the GPU benchmarks of issue 8 (run on the GPU machine; never needed at
run time). Builds transformers' DeepseekV3ForCausalLM from our bench-0.7b configuration (the
"config" object of `dsv3 info --preset bench-0.7b --json`, so the two sides share one config) with
random weights in BF16 on the GPU, then measures
  - training: B=8, T=2048 random tokens, loss.backward(), torch.optim.AdamW(fused=True); tokens/s,
    TFLOP/s and MFU against 989 TFLOP/s dense BF16, FLOPs per token from the same info JSON
    (6 x matmul_params_active + causal attention at T; transformers has no MTP loss, so none is
    counted);
  - decode: generate() greedy, prompt 128, exactly 128 new tokens, batch 1 and 32; new tokens/s,
    the median of --decode-runs timed calls after one warm-up (a single call's rate moved between
    30 and 57 tok/s at batch 1 across leases of the same H200); every call's rate is recorded.
Writes one JSON (commit/date/gpu given by the caller's environment) and prints a table.

usage: dsv3 info --preset bench-0.7b --json > info.json
       python3 tools/hf_gpu_bench.py --info info.json --out hf_gpu.json
"""
import argparse
import json
import os
import sys
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--info", required=True, help="JSON of `dsv3 info --preset bench-0.7b --json`")
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--batch", type=int, default=8, help="training batch (default 8)")
    ap.add_argument("--seq", type=int, default=2048, help="training sequence length (default 2048)")
    ap.add_argument("--steps", type=int, default=10, help="timed training steps after 3 warm-up steps (default 10)")
    ap.add_argument("--decode-runs", type=int, default=3, help="timed generate() calls per batch (default 3)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense BF16 peak for MFU (default 989)")
    args = ap.parse_args()
    if args.decode_runs < 1:
        ap.error(f"--decode-runs must be at least 1, got {args.decode_runs}")

    import torch
    import transformers
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    info = json.load(open(args.info))
    cfg = dict(info["config"])
    cfg.pop("architectures", None)
    cfg["torch_dtype"] = "bfloat16"
    config = DeepseekV3Config(**cfg)
    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = DeepseekV3ForCausalLM(config).to(device=dev, dtype=torch.bfloat16)
    vocab = config.vocab_size
    result = {
        "bench": "hf_gpu",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0),
        "commit": os.environ.get("DSV3_COMMIT"),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }

    # Training.
    T, B = args.seq, args.batch
    flops_per_token = 6.0 * info["matmul_params_active"] + info["attention_train_flops_per_token"] * T / info["seq_len"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    model.train()
    ids = torch.randint(0, vocab, (B, T), device=dev)

    def step():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    tok_s = B * T / dt
    result["train"] = {
        "batch": B, "seq": T, "step_s": dt, "tokens_per_s": tok_s,
        "flops_per_token": flops_per_token, "tflops": tok_s * flops_per_token / 1e12,
        "mfu": tok_s * flops_per_token / (args.peak_tflops * 1e12), "final_loss": float(loss),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    }
    del opt
    model.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()

    # Decode.
    model.eval()
    result["decode"] = []
    for bs in (1, 32):
        prompt = torch.randint(2, vocab, (bs, 128), device=dev)
        kw = dict(max_new_tokens=128, min_new_tokens=128, do_sample=False, pad_token_id=0)
        runs = []
        with torch.no_grad():
            model.generate(prompt, **kw)  # warm-up
            for _ in range(args.decode_runs):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = model.generate(prompt, **kw)
                torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                new = (out.shape[1] - 128) * bs
                runs.append({"seconds": dt, "new_tokens": new, "tokens_per_s": new / dt})
        med = sorted(runs, key=lambda r: r["tokens_per_s"])[len(runs) // 2]
        result["decode"].append({"batch": bs, "prompt": 128, "new_tokens": med["new_tokens"],
                                 "seconds": med["seconds"], "tokens_per_s": med["tokens_per_s"],
                                 "runs": runs})

    print(f"{'HF transformers':<18} {result['transformers']}  torch {result['torch']}  {result['gpu']}")
    tr = result["train"]
    print(f"train B={B} T={T}: {tr['tokens_per_s']:.0f} tok/s, {tr['tflops']:.1f} TFLOP/s, MFU {tr['mfu']:.3f}")
    for d in result["decode"]:
        each = ", ".join(f"{r['tokens_per_s']:.1f}" for r in d["runs"])
        print(f"decode batch {d['batch']:>2}: {d['tokens_per_s']:.1f} new tok/s (median of {each})")
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
