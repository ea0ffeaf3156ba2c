#!/usr/bin/env python3
"""Loads a checkpoint directory with transformers and compares its logits with `dsv3 forward`.

    dsv3 forward -m DIR --tokens "0 17 42 7" --output dsv3.safetensors
    python3 tools/hf_load_check.py -m DIR --tokens "0 17 42 7" --dsv3 dsv3.safetensors \
        [--output hf.safetensors] [--tol 1e-4] [--dtype float32|float64]

Prints from_pretrained's loading report, writes F32 `logits` [T, vocab] and `mtp_logits_k`
[T-k, vocab] (MTP through tools/mtp_reference.py) to --output, and with --dsv3 prints
max|Δ| / max|reference| for every tensor; exit code 1 when one exceeds --tol or is missing.
FP8 checkpoints (weight_scale_inv) are dequantized into a temporary F32 copy first, because
transformers' FP8 loader needs a GPU.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_fixtures import force_eager, info_keys, model_class  # noqa: E402
from hub_layout import read_checkpoint  # noqa: E402
from mtp_reference import MTPLayer, mtp_forward  # noqa: E402


def load(path, dtype):
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    if "architectures" not in cfg:
        cfg["architectures"] = ["DeepseekV2ForCausalLM" if cfg.get("model_type") == "deepseek_v2"
                                else "DeepseekV3ForCausalLM"]
    cls = model_class(cfg)
    tensors, _ = read_checkpoint(path)
    tmp = None
    load_dir = path
    if "quantization_config" in cfg:
        tmp = tempfile.mkdtemp()
        from safetensors.torch import save_file
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump({k: v for k, v in cfg.items() if k != "quantization_config"}, f)
        save_file({n: t.float().contiguous() for n, t in tensors.items()},
                  os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        load_dir = tmp
    try:
        kwargs = dict(attn_implementation="eager", output_loading_info=True)
        try:
            res = cls.from_pretrained(load_dir, dtype=dtype, experts_implementation="eager", **kwargs)
        except TypeError:
            res = cls.from_pretrained(load_dir, torch_dtype=dtype, **kwargs)
    finally:
        if tmp:
            shutil.rmtree(tmp)
    model, info = res if isinstance(res, tuple) else (res, {})
    force_eager(model)
    model.to(dtype).eval()
    return model, info, tensors, cfg


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", required=True, help="checkpoint directory (HF layout)")
    ap.add_argument("--tokens", required=True, help='token ids, e.g. "0 17 42 7"')
    ap.add_argument("--output", default="", help="write the HF logits here (default: none)")
    ap.add_argument("--dsv3", default="", help="`dsv3 forward` output to compare with (default: none)")
    ap.add_argument("--tol", type=float, default=1e-4, help="max|Δ|/max|ref| allowed (default: %(default)s)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                    help="compute dtype (default: %(default)s)")
    args = ap.parse_args()
    import transformers

    dtype = getattr(torch, args.dtype)
    ids = torch.tensor([[int(t) for t in args.tokens.split()]], dtype=torch.long)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}; {ids.shape[1]} tokens")
    model, info, tensors, cfg = load(args.model, dtype)
    n_mtp = int(cfg.get("num_nextn_predict_layers", 0) or 0)
    first_mtp = f"model.layers.{model.config.num_hidden_layers}."
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        items = sorted(info_keys(info, key))
        if key == "unexpected_keys":
            items = [k for k in items if not any(k.startswith(f"model.layers.{model.config.num_hidden_layers + j}.")
                                                 for j in range(n_mtp))]
        print(f"from_pretrained {key}: {len(items)}" + (f" e.g. {items[:5]}" if items else ""))
        if items and key != "unexpected_keys":
            print("FAIL: transformers did not load every tensor")
            sys.exit(1)

    out = {}
    with torch.no_grad():
        h0 = model.model(input_ids=ids, use_cache=False).last_hidden_state
        out["logits"] = model.lm_head(h0)[0].float().contiguous()
        full = model(input_ids=ids, use_cache=False).logits[0].float()
        if not torch.allclose(full, out["logits"], rtol=0, atol=1e-6 * full.abs().max().item()):
            print("FAIL: model(...).logits differs from lm_head(model.model(...))")
            sys.exit(1)
        if n_mtp and any(k.startswith(first_mtp) for k in tensors):
            layers = torch.nn.ModuleList([MTPLayer(model.config, model.config.num_hidden_layers + k)
                                          for k in range(n_mtp)])
            for layer in layers:
                layer.load_hub(tensors, model.config)
            layers.to(dtype).eval()
            embeds, heads = [], []
            for layer in layers:
                pre = layer.prefix()
                e, h = tensors.get(pre + "embed_tokens.weight"), tensors.get(pre + "shared_head.head.weight")
                embeds.append(e)
                heads.append(h)
                for nm, t, main in ((pre + "embed_tokens.weight", e, model.model.embed_tokens.weight),
                                    (pre + "shared_head.head.weight", h, model.lm_head.weight)):
                    if t is not None and not torch.equal(t.to(main.dtype), main):
                        print(f"note: {nm} differs from the main tensor; the MTP module uses its own copy")
            for k, (lk, _) in enumerate(mtp_forward(model, layers, ids, h0, embeds, heads), start=1):
                out[f"mtp_logits_{k}"] = lk[0].float().contiguous()
        elif n_mtp:
            print(f"note: num_nextn_predict_layers = {n_mtp} but no tensors under {first_mtp}*")
    for k, v in out.items():
        print(f"  {k}: {list(v.shape)}")
    if args.output:
        from safetensors.torch import save_file
        save_file(out, args.output, metadata={"format": "pt", "source": "transformers " + transformers.__version__})
        print(f"wrote {args.output}")
    if args.dsv3:
        from safetensors.torch import load_file
        theirs = load_file(args.dsv3)
        bad = False
        print(f"{'tensor':<16} {'shape':<14} {'max|Δ|/max|ref|':>16}")
        for k, ref in out.items():
            if k not in theirs:
                print(f"{k:<16} {'missing':<14}")
                bad = True
                continue
            got = theirs[k].float()
            if tuple(got.shape) != tuple(ref.shape):
                print(f"{k:<16} shape {list(got.shape)} != {list(ref.shape)}")
                bad = True
                continue
            rel = ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
            flag = "" if rel <= args.tol else "  FAIL"
            bad |= rel > args.tol
            print(f"{k:<16} {str(list(ref.shape)):<14} {rel:>16.3e}{flag}")
        greedy_same = torch.equal(theirs["logits"].float().argmax(-1), out["logits"].argmax(-1)) \
            if "logits" in theirs else False
        print(f"greedy next tokens identical: {greedy_same}")
        if bad:
            print(f"FAIL: tolerance {args.tol}")
            sys.exit(1)
        print(f"OK: within {args.tol}")


if __name__ == "__main__":
    main()
