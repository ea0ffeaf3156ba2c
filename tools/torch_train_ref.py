#!/usr/bin/env python3
"""PyTorch CPU eager baseline for the training-speed benchmark (bench/train.cpp).

A plain PyTorch (1.13-compatible, no transformers) DeepSeek-V3 model for a config given as JSON
(HF field names; `dsv3 info --preset tiny --json` prints the `tiny` one), trained on random token
ids in [0, vocab_size) with AdamW. It times `--steps` training steps after `--warmup` steps and
prints one JSON line {tokens_per_s, step_ms, batch, seq_len, steps, ...}.

It is not meant to be bit-identical to dsv3's trainer, only to do the same work per step: the
same shapes and the same matrix products (MLA with q/kv LoRA, interleaved-pair RoPE, causal
softmax attention; a dense MLP for the first first_k_dense_replace layers, then MoE with a sigmoid
router, group-limited top-k, normalized weights × routed_scaling_factor and the shared expert; final
norm and lm_head; one MTP module; loss CE + λ·CE_mtp; global-norm clipping; AdamW β 0.9/0.95,
weight decay 0.1; the aux-loss-free bias update). The complementary sequence-wise balance loss
(α = 1e-4, a few vector ops) is left out.

  torch_train_ref.py --config CONFIG.json [--batch 8] [--seq-len 64] [--steps 20] [--warmup 3]
                     [--threads 2]
"""
import argparse
import json
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, n, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def linear(i, o, std):
    m = nn.Linear(i, o, bias=False)
    nn.init.normal_(m.weight, std=std)
    return m


def rope_tables(T, d, theta):
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    ang = torch.outer(torch.arange(T, dtype=torch.float32), inv)  # [T, d/2]
    return ang.cos(), ang.sin()


def rope_interleaved(x, cos, sin):
    # x [..., T, d]; pairs (x[2i], x[2i+1]) rotate by angle t·θ_i.
    x0, x1 = x[..., 0::2], x[..., 1::2]
    r0 = x0 * cos - x1 * sin
    r1 = x0 * sin + x1 * cos
    return torch.stack((r0, r1), dim=-1).flatten(-2)


class MLA(nn.Module):
    def __init__(self, c, std):
        super().__init__()
        H, nh = c["hidden_size"], c["num_attention_heads"]
        self.nh, self.dn, self.dr, self.dv = nh, c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
        self.kvr = c["kv_lora_rank"]
        qk = self.dn + self.dr
        self.q_a_proj = linear(H, c["q_lora_rank"], std)
        self.q_a_layernorm = RMSNorm(c["q_lora_rank"], c["rms_norm_eps"])
        self.q_b_proj = linear(c["q_lora_rank"], nh * qk, std)
        self.kv_a_proj_with_mqa = linear(H, self.kvr + self.dr, std)
        self.kv_a_layernorm = RMSNorm(self.kvr, c["rms_norm_eps"])
        self.kv_b_proj = linear(self.kvr, nh * (self.dn + self.dv), std)
        self.o_proj = linear(nh * self.dv, H, std)
        self.scale = 1.0 / math.sqrt(qk)

    def forward(self, x, cos, sin, mask):
        B, T, _ = x.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))).view(B, T, self.nh, -1).transpose(1, 2)
        q_nope, q_rope = q.split([self.dn, self.dr], dim=-1)
        kv_a = self.kv_a_proj_with_mqa(x)
        c_kv, k_rope = kv_a.split([self.kvr, self.dr], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(c_kv)).view(B, T, self.nh, -1).transpose(1, 2)
        k_nope, v = kv.split([self.dn, self.dv], dim=-1)
        q_rope = rope_interleaved(q_rope, cos, sin)
        k_rope = rope_interleaved(k_rope.unsqueeze(1), cos, sin).expand(B, self.nh, T, self.dr)
        qf = torch.cat((q_nope, q_rope), dim=-1)
        kf = torch.cat((k_nope, k_rope), dim=-1)
        s = torch.matmul(qf, kf.transpose(-1, -2)) * self.scale + mask
        o = torch.matmul(torch.softmax(s, dim=-1), v)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.nh * self.dv))


class MLP(nn.Module):
    def __init__(self, H, I, std):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = linear(H, I, std), linear(H, I, std), linear(I, H, std)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    def __init__(self, c, std):
        super().__init__()
        H, E = c["hidden_size"], c["n_routed_experts"]
        self.E, self.k = E, c["num_experts_per_tok"]
        self.n_group, self.topk_group = c["n_group"], c["topk_group"]
        self.scale = c["routed_scaling_factor"]
        self.gate = linear(H, E, std)
        # Not a parameter of the optimizer: moved by the aux-loss-free balancing rule.
        self.register_buffer("e_score_correction_bias", torch.zeros(E))
        self.experts = nn.ModuleList([MLP(H, c["moe_intermediate_size"], std) for _ in range(E)])
        self.shared_experts = MLP(H, c["moe_intermediate_size"] * c["n_shared_experts"], std)
        self.load = torch.zeros(E)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        N = x.shape[0]
        scores = torch.sigmoid(self.gate(x))
        with torch.no_grad():
            choice = scores + self.e_score_correction_bias
            g = choice.view(N, self.n_group, -1)
            group_score = g.topk(2, dim=-1).values.sum(-1)
            keep = torch.zeros_like(group_score).scatter_(1, group_score.topk(self.topk_group, dim=-1).indices, 1.0)
            choice = choice.masked_fill(keep.repeat_interleave(self.E // self.n_group, dim=1) == 0, float("-inf"))
            idx = choice.topk(self.k, dim=-1).indices  # [N, k]
            self.load = torch.bincount(idx.flatten(), minlength=self.E).float()
        w = scores.gather(1, idx)
        w = w / w.sum(-1, keepdim=True) * self.scale
        out = self.shared_experts(x)
        flat_idx, flat_w = idx.flatten(), w.flatten()
        tok = torch.arange(N).repeat_interleave(self.k)
        for e in range(self.E):
            sel = (flat_idx == e).nonzero().squeeze(1)
            if sel.numel() == 0:
                continue
            rows = tok.index_select(0, sel)
            y = self.experts[e](x.index_select(0, rows)) * flat_w.index_select(0, sel).unsqueeze(1)
            out = out.index_add(0, rows, y)
        return out.view(shape)


class Block(nn.Module):
    def __init__(self, c, i, std):
        super().__init__()
        self.input_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.self_attn = MLA(c, std)
        self.post_attention_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.mlp = MLP(c["hidden_size"], c["intermediate_size"], std) if i < c["first_k_dense_replace"] else MoE(c, std)

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class MTP(nn.Module):
    def __init__(self, c, i, std):
        super().__init__()
        H = c["hidden_size"]
        self.enorm, self.hnorm = RMSNorm(H, c["rms_norm_eps"]), RMSNorm(H, c["rms_norm_eps"])
        self.eh_proj = linear(2 * H, H, std)
        self.block = Block(c, i, std)
        self.norm = RMSNorm(H, c["rms_norm_eps"])  # shared_head.norm; the head is lm_head


class DeepseekV3(nn.Module):
    def __init__(self, c, std):
        super().__init__()
        H, V = c["hidden_size"], c["vocab_size"]
        self.embed_tokens = nn.Embedding(V, H)
        nn.init.normal_(self.embed_tokens.weight, std=std)
        L = c["num_hidden_layers"]
        self.layers = nn.ModuleList([Block(c, i, std) for i in range(L)])
        self.norm = RMSNorm(H, c["rms_norm_eps"])
        self.lm_head = linear(H, V, std)
        self.mtp = nn.ModuleList([MTP(c, L + d, std) for d in range(c.get("num_nextn_predict_layers", 0))])
        self.theta = c["rope_theta"]
        self.dr = c["qk_rope_head_dim"]

    def loss(self, data, lam):
        # data [B, T+1]: inputs data[:, :T], targets data[:, 1:]; MTP depth d predicts data[:, 1+d+t].
        B, T1 = data.shape
        T = T1 - 1
        V = self.lm_head.weight.shape[0]
        x_ids = data[:, :T]
        cos, sin = rope_tables(T, self.dr, self.theta)
        mask = torch.full((T, T), float("-inf")).triu(1)
        h = self.embed_tokens(x_ids)
        for layer in self.layers:
            h = layer(h, cos, sin, mask)
        logits = self.lm_head(self.norm(h))
        loss = F.cross_entropy(logits.reshape(-1, V), data[:, 1:].reshape(-1))
        if self.mtp:
            mtp_loss = 0.0
            for d, m in enumerate(self.mtp, start=1):
                Td = T - d
                e = self.embed_tokens(data[:, d:d + Td])
                h = m.eh_proj(torch.cat((m.enorm(e), m.hnorm(h[:, :Td])), dim=-1))
                h = m.block(h, cos[:Td], sin[:Td], mask[:Td, :Td])
                lg = self.lm_head(m.norm(h))
                mtp_loss = mtp_loss + F.cross_entropy(lg.reshape(-1, V), data[:, 1 + d:].reshape(-1))
            loss = loss + lam / len(self.mtp) * mtp_loss
        return loss


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="model config JSON (HF field names), or a dsv3 info --json dump")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1234)
    a = ap.parse_args()
    with open(a.config) as f:
        c = json.load(f)
    c = c.get("config", c)
    torch.set_num_threads(a.threads)
    torch.set_num_interop_threads(1)
    torch.manual_seed(a.seed)
    model = DeepseekV3(c, c.get("initializer_range", 0.02))
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8)
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    gamma = 1e-3

    def step():
        data = torch.randint(0, c["vocab_size"], (a.batch, a.seq_len + 1))
        opt.zero_grad(set_to_none=True)
        loss = model.loss(data, 0.3)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for m in moes:
                m.e_score_correction_bias += gamma * torch.sign(m.load.mean() - m.load)
        return float(loss)

    for _ in range(a.warmup):
        step()
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        last = step()
        times.append(time.perf_counter() - t0)
    total = sum(times)
    tokens = a.batch * a.seq_len
    print(json.dumps({"tokens_per_s": tokens * a.steps / total, "step_ms": 1e3 * total / a.steps,
                      "step_ms_min": 1e3 * min(times), "step_ms_median": 1e3 * sorted(times)[len(times) // 2],
                      "batch": a.batch, "seq_len": a.seq_len,
                      "steps": a.steps, "warmup": a.warmup, "threads": a.threads,
                      "torch_version": torch.__version__, "last_loss": last}))


if __name__ == "__main__":
    main()
