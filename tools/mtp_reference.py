"""A short PyTorch reference for DeepSeek-V3's multi-token-prediction (MTP) modules.

transformers' DeepseekV3ForCausalLM ignores the MTP weights, so this module supplies them, built on
transformers' own DeepseekV3DecoderLayer and DeepseekV3RMSNorm. Semantics (docs: DESIGN.md §3):

  h^0        = the main model's hidden state AFTER model.norm                      [T, H]
  module k   (k = 1..D, hub prefix model.layers.{num_hidden_layers + k - 1}.):
    x_i      = eh_proj(cat[enorm(Emb(t_{i+k})), hnorm(h^{k-1}_i)])   i = 0..T-k-1 (embedding FIRST)
    h^k      = DecoderLayer(x) at positions 0..T-k-1 with the causal mask
               (MoE or dense by first_k_dense_replace applied to its layer index)
    logits_k = shared_head.head(shared_head.norm(h^k))                              [T-k, V]
  logits_k[i] predicts token i+k+1. h^k is taken BEFORE shared_head.norm.

Emb and shared_head.head are the main model's embed_tokens and lm_head (shared, as in training);
the hub also stores copies at model.layers.{j}.embed_tokens.weight and shared_head.head.weight.
"""

import torch
import torch.nn.functional as F
from torch import nn

from hub_layout import hub_to_module, module_to_hub


class MTPLayer(nn.Module):
    """One MTP module; parameter names map to hub names by dropping `block.` and adding the prefix."""

    def __init__(self, config, layer_idx):
        super().__init__()
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
            DeepseekV3DecoderLayer,
            DeepseekV3RMSNorm,
        )

        h = config.hidden_size
        self.layer_idx = layer_idx
        self.enorm = DeepseekV3RMSNorm(h, eps=config.rms_norm_eps)
        self.hnorm = DeepseekV3RMSNorm(h, eps=config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * h, h, bias=False)
        self.block = DeepseekV3DecoderLayer(config, layer_idx)
        self.shared_head_norm = DeepseekV3RMSNorm(h, eps=config.rms_norm_eps)

    def prefix(self):
        return f"model.layers.{self.layer_idx}."

    @staticmethod
    def module_name_to_hub_suffix(name):
        if name.startswith("block."):
            return name[len("block."):]
        if name.startswith("shared_head_norm."):
            return "shared_head.norm." + name[len("shared_head_norm."):]
        return name

    def hub_tensors(self, config, tensors=None):
        """{hub name: tensor} of this module's own tensors (default: its state dict)."""
        src = self.state_dict() if tensors is None else tensors
        renamed = {self.module_name_to_hub_suffix(n): t for n, t in src.items()}
        return module_to_hub(renamed, config.hidden_size, config.moe_intermediate_size, self.prefix())

    def load_hub(self, hub, config):
        """Loads this module from hub-named tensors; returns the hub names used."""
        own = {self.module_name_to_hub_suffix(n): t for n, t in self.state_dict().items()}
        state, used = hub_to_module(own, hub, config.hidden_size, config.moe_intermediate_size,
                                    self.prefix())
        back = {}
        for name in self.state_dict():
            back[name] = state[self.module_name_to_hub_suffix(name)]
        self.load_state_dict(back, strict=True)
        return used


def build_mtp_layers(config):
    n = int(getattr(config, "num_nextn_predict_layers", 0) or 0)
    return nn.ModuleList([MTPLayer(config, config.num_hidden_layers + k) for k in range(n)])


def causal_mask(s, dtype):
    m = torch.full((s, s), torch.finfo(dtype).min, dtype=dtype).triu(1)
    return m[None, None]


def mtp_forward(model, mtp_layers, input_ids, h0, embed_weights=None, head_weights=None):
    """Returns [(logits_k [1, T-k, V], h^k [1, T-k, H]) for k = 1..D].

    model: the DeepseekV3ForCausalLM (its embed_tokens, rotary_emb and lm_head are used);
    input_ids [1, T]; h0 [1, T, H] = model(...).hidden state after model.norm.
    embed_weights / head_weights: optional per-module tensors for checkpoints whose MTP copies
    differ from the main embedding / lm_head (None: share the main ones, as in training).
    """
    rotary = model.model.rotary_emb
    t = input_ids.shape[1]
    h_prev = h0
    out = []
    for k, layer in enumerate(mtp_layers, start=1):
        s = t - k
        if s <= 0:
            break
        ew = embed_weights[k - 1] if embed_weights else None
        hw = head_weights[k - 1] if head_weights else None
        nxt = input_ids[:, k:k + s]
        e = model.model.embed_tokens(nxt) if ew is None else F.embedding(nxt, ew.to(h0.dtype))
        x = layer.eh_proj(torch.cat([layer.enorm(e), layer.hnorm(h_prev[:, :s])], dim=-1))
        pos = torch.arange(s, dtype=torch.long).unsqueeze(0)
        pe = rotary(x, pos)
        hk = layer.block(x, attention_mask=causal_mask(s, x.dtype), position_ids=pos,
                         position_embeddings=pe, use_cache=False)
        if isinstance(hk, tuple):  # transformers 4.x decoder layers return a tuple
            hk = hk[0]
        normed = layer.shared_head_norm(hk)
        logits = model.lm_head(normed) if hw is None else F.linear(normed, hw.to(normed.dtype))
        out.append((logits, hk))
        h_prev = hk
    return out
