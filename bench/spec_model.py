"""Train a small DeepSeek-V3-shaped model WITH one MTP module on tinyshakespeare bytes, and write it
in the hub layout, so that bench/decode.cpp can measure MTP speculative decoding on a trained model
(`dsv3_bench_decode --spec-model DIR`) until `dsv3 train` produces one.

Runs where torch and transformers 5 are (the GPU machine); uses transformers' DeepseekV3ForCausalLM
for the main model and tools/mtp_reference.py for the MTP module (DESIGN §3 semantics), loss
L_main + 0.3 · L_MTP. Byte-level: token id = byte value (vocab 256), BOS = 0 is never used.

    python3 bench/spec_model.py --data tinyshakespeare.txt --out DIR [--steps 800]
Prints the prompt ids the benchmark uses (the first bytes of the held-out tail).
"""
import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
from mtp_reference import build_mtp_layers, mtp_forward  # noqa: E402
from hub_layout import module_to_hub  # noqa: E402

CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "attention_bias": False,
    "bos_token_id": 0, "eos_token_id": 1, "first_k_dense_replace": 1, "hidden_act": "silu",
    "hidden_size": 256, "intermediate_size": 768, "kv_lora_rank": 64, "max_position_embeddings": 1024,
    "moe_intermediate_size": 192, "moe_layer_freq": 1, "n_group": 4, "n_routed_experts": 8,
    "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 4, "num_experts_per_tok": 2,
    "num_hidden_layers": 4, "num_key_value_heads": 4, "num_nextn_predict_layers": 1, "q_lora_rank": 128,
    "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "rms_norm_eps": 1e-6, "rope_interleave": True,
    "rope_scaling": None, "rope_theta": 10000.0, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid",
    "tie_word_embeddings": False, "topk_group": 2, "topk_method": "noaux_tc", "torch_dtype": "float32",
    "v_head_dim": 32, "vocab_size": 256, "initializer_range": 0.02,
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    a = ap.parse_args()
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_default_device(dev)  # mtp_reference builds positions and masks on the default device
    data = torch.tensor(list(open(a.data, "rb").read()), dtype=torch.long)
    train, held = data[: int(0.95 * len(data))], data[int(0.95 * len(data)):]
    cfg = DeepseekV3Config(**{k: v for k, v in CONFIG.items() if k not in ("architectures", "model_type")})
    model = DeepseekV3ForCausalLM(cfg).to(dev)
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")
    mtp = build_mtp_layers(cfg).to(dev)
    params = list(model.parameters()) + list(mtp.parameters())
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.95), weight_decay=0.1)
    ce = torch.nn.functional.cross_entropy
    t0 = time.time()
    for step in range(a.steps):
        lr = a.lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / a.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        ix = torch.randint(0, len(train) - a.seq - 1, (a.batch,)).tolist()
        x = torch.stack([train[i:i + a.seq + 1] for i in ix]).to(dev)
        ids = x[:, :-1]
        h0 = model.model(input_ids=ids).last_hidden_state  # after model.norm
        logits = model.lm_head(h0)
        loss_main = ce(logits.reshape(-1, 256), x[:, 1:].reshape(-1))
        (lk, _), = mtp_forward(model, mtp, ids, h0)
        k = 1
        loss_mtp = ce(lk[:, : a.seq - k - 1].reshape(-1, 256), ids[:, k + 1:].reshape(-1))
        loss = loss_main + 0.3 * loss_mtp
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 100 == 0 or step == a.steps - 1:
            print(f"step {step:4d} loss {loss_main.item():.4f} mtp {loss_mtp.item():.4f} lr {lr:.2e} "
                  f"{time.time() - t0:.0f}s", flush=True)

    os.makedirs(a.out, exist_ok=True)
    hub = module_to_hub(dict(model.state_dict()), cfg.hidden_size, cfg.moe_intermediate_size)
    for layer in mtp:
        hub.update(layer.hub_tensors(cfg))
        pre = layer.prefix()
        hub[pre + "embed_tokens.weight"] = model.model.embed_tokens.weight
        hub[pre + "shared_head.head.weight"] = model.lm_head.weight
    from safetensors.torch import save_file

    save_file({n: t.detach().float().cpu().contiguous() for n, t in hub.items()},
              os.path.join(a.out, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(CONFIG, f, indent=2, sort_keys=True)
        f.write("\n")
    prompt = held[:64].tolist()
    print("prompt ids:", " ".join(str(i) for i in prompt))
    with open(os.path.join(a.out, "prompt_ids.txt"), "w") as f:
        f.write(" ".join(str(i) for i in prompt) + "\n")


if __name__ == "__main__":
    main()
