#!/usr/bin/env python3
"""Writes tiny random DeepSeek-V3 / V2 checkpoints in hub layout, with reference outputs.

    python3 tools/gen_fixtures.py --out tests/data/fixtures

Needs torch and transformers (written against transformers 5.x; CPU only). For each fixture it
writes tests/data/fixtures/<name>/config.json, the weights (model.safetensors, or shards plus
model.safetensors.index.json) and expected.safetensors. See tools/README.md for what each covers.

Reference values: logits from transformers' model in float64 (stored F32); MTP logits from
tools/mtp_reference.py; losses and the gradient of every parameter by autograd in float64.
Every fixture is reloaded with from_pretrained and checked; any mismatch aborts with exit code 1.
"""

import argparse
import copy
import json
import math
import os
import shutil
import sys
import tempfile

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hub_layout import fp8_block_quantize, module_to_hub, read_checkpoint  # noqa: E402
from mtp_reference import MTPLayer, mtp_forward  # noqa: E402

MTP_LAMBDA = 0.3
SEQ_LEN = 16
MIN_ROUTING_MARGIN = 2e-4   # score gap at every top-k / group cut, so float noise cannot flip a choice
MAX_F32_VS_F64 = 1e-5       # max|f32 - f64| / max|f64| of HF's own logits; the C++ tests use 1e-4
MAX_ATTEMPTS = 200


class Retry(Exception):
    pass


def fail(msg):
    print(f"FAIL: {msg}", flush=True)
    sys.exit(1)


def log(msg):
    print(msg, flush=True)


# ----------------------------------------------------------------------------- configurations

def v3_config(**over):
    c = dict(
        architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3",
        vocab_size=160, hidden_size=40, intermediate_size=72, moe_intermediate_size=12,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        n_shared_experts=1, n_routed_experts=8, routed_scaling_factor=2.5,
        kv_lora_rank=24, q_lora_rank=32, qk_rope_head_dim=8, v_head_dim=12, qk_nope_head_dim=12,
        n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
        norm_topk_prob=True, hidden_act="silu", max_position_embeddings=4096,
        initializer_range=0.02, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1,
        tie_word_embeddings=False, rope_interleave=True, attention_bias=False,
        attention_dropout=0.0, topk_method="noaux_tc", scoring_func="sigmoid", moe_layer_freq=1,
        ep_size=1, num_nextn_predict_layers=0, use_cache=True)
    c.update(over)
    return c


def v2_config(**over):
    c = dict(
        architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2",
        vocab_size=160, hidden_size=40, intermediate_size=72, moe_intermediate_size=12,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        n_shared_experts=2, n_routed_experts=8, routed_scaling_factor=1.0,
        kv_lora_rank=24, q_lora_rank=None, qk_rope_head_dim=8, v_head_dim=12, qk_nope_head_dim=12,
        n_group=1, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
        norm_topk_prob=False, topk_method="greedy", scoring_func="softmax", moe_layer_freq=1,
        hidden_act="silu", max_position_embeddings=4096, initializer_range=0.02,
        rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
        attention_bias=False, attention_dropout=0.0, ep_size=1, use_cache=True)
    c.update(over)
    return c


def rope_hub(c, yarn=None, theta=10000.0):
    """Hub spelling: top-level rope_theta and rope_scaling {"type": ...} (or null)."""
    c["rope_theta"] = theta
    c["rope_scaling"] = None
    if yarn:
        c["rope_scaling"] = dict(type="yarn", **yarn)
        c["max_position_embeddings"] = int(yarn["factor"] * yarn["original_max_position_embeddings"])
    return c


def rope_tf5(c, yarn=None, theta=10000.0):
    """transformers 5 spelling: rope_parameters {"rope_type": ..., "rope_theta": ...}."""
    if yarn:
        c["rope_parameters"] = dict(rope_type="yarn", rope_theta=theta, **yarn)
        c["max_position_embeddings"] = int(yarn["factor"] * yarn["original_max_position_embeddings"])
    else:
        c["rope_parameters"] = dict(rope_type="default", rope_theta=theta)
    return c


YARN_HUB = dict(factor=4.0, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1,
                mscale=1.0, mscale_all_dim=1.0)
YARN_B = dict(factor=8.0, original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0,
              mscale=0.707, mscale_all_dim=0.707)
FP8_QUANT = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
             "weight_block_size": [128, 128]}

FIXTURES = [
    dict(name="v3_hub_yarn_mtp1", weights="bf16", shards=1, seed=11, grads=True,
         what="hub spelling (rope_theta + rope_scaling type yarn, mscale 1/1); q_lora_rank 32; "
              "n_group 2 topk_group 1; first_k_dense_replace 1; norm_topk_prob true; "
              "routed_scaling_factor 2.5; 1 shared expert; 1 MTP module; BF16",
         config=rope_hub(v3_config(num_nextn_predict_layers=1), yarn=YARN_HUB)),
    dict(name="v3_qnull_groups_mtp2", weights="f32", shards=3, shard_digits=6, round_robin=True,
         seed=22, grads=True,
         what="transformers-5 spelling (rope_parameters, default rope); q_lora_rank null; "
              "n_group 4 topk_group 2, top-3; first_k_dense_replace 0; norm_topk_prob false; "
              "routed_scaling_factor 1.5; 2 shared experts; 2 MTP modules; F32; 3 shards "
              "(6-digit names, tensors of one layer spread over shards)",
         config=rope_tf5(v3_config(q_lora_rank=None, n_group=4, topk_group=2, num_experts_per_tok=3,
                                   first_k_dense_replace=0, norm_topk_prob=False,
                                   routed_scaling_factor=1.5, n_shared_experts=2,
                                   num_nextn_predict_layers=2, rope_interleave=True))),
    dict(name="v3_tf5_yarn_mtp1_sharded", weights="bf16", shards=2, shard_digits=5, seed=33,
         grads=True,
         what="transformers-5 spelling with yarn (factor 8, mscale 0.707/0.707); q_lora_rank 32; "
              "n_group 1; 6 experts top-2; 3 layers, first_k_dense_replace 1; "
              "routed_scaling_factor 1.0; 1 MTP module; BF16; 2 shards",
         config=rope_tf5(v3_config(num_hidden_layers=3, n_routed_experts=6, n_group=1,
                                   topk_group=1, routed_scaling_factor=1.0,
                                   num_nextn_predict_layers=1), yarn=YARN_B)),
    dict(name="v3_fp8_h160", weights="fp8", shards=1, seed=44, grads=False,
         what="F8_E4M3 weights + weight_scale_inv (128x128 blocks, partial edges): hidden 160, "
              "q_lora_rank 136, moe_intermediate 136, intermediate 200, vocab 192; hub spelling, "
              "no yarn; n_group 2 topk_group 1; expected values from the dequantized weights",
         config=dict(rope_hub(v3_config(vocab_size=192, hidden_size=160, intermediate_size=200,
                                        moe_intermediate_size=136, q_lora_rank=136,
                                        kv_lora_rank=72, num_attention_heads=2,
                                        num_key_value_heads=2, qk_nope_head_dim=32,
                                        qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=4,
                                        n_group=2, topk_group=1)),
                     quantization_config=FP8_QUANT)),
    dict(name="v2_lite_greedy", weights="bf16", shards=1, seed=55, grads=True,
         what="deepseek_v2, V2-Lite-like: softmax scores, topk_method greedy, q_lora_rank null, "
              "2 shared experts, first_k_dense_replace 1, no router bias; hub rope spelling",
         config=rope_hub(v2_config())),
    dict(name="v2_group_limited", weights="f32", shards=1, seed=66, grads=True,
         what="deepseek_v2: softmax, topk_method group_limited_greedy (n_group 4, topk_group 2), "
              "top-3, routed_scaling_factor 2.0, q_lora_rank null, first_k_dense_replace 0; "
              "transformers-5 rope spelling",
         config=rope_tf5(v2_config(topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                   num_experts_per_tok=3, routed_scaling_factor=2.0,
                                   first_k_dense_replace=0, n_shared_experts=1))),
]


for _spec in FIXTURES:
    # Hub configs say torch_dtype; transformers 5 writes dtype.
    _key = "torch_dtype" if "rope_theta" in _spec["config"] else "dtype"
    _spec["config"][_key] = "float32" if _spec["weights"] == "f32" else "bfloat16"


# ----------------------------------------------------------------------------- model helpers

def model_class(cfg_dict):
    import transformers
    return getattr(transformers, cfg_dict["architectures"][0])


def force_eager(model):
    """Eager attention and the eager (looped, differentiable, exact) experts path."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    else:
        model.config._attn_implementation = "eager"
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")
    if model.config._attn_implementation != "eager":
        fail(f"attention implementation is {model.config._attn_implementation}, wanted eager")
    impl = getattr(model.config, "_experts_implementation", "eager")
    if impl not in ("eager", None):
        fail(f"experts implementation is {impl}, wanted eager")
    for m in model.modules():
        # Some transformers 5 releases read self.num_experts in DeepseekV2Moe without setting it.
        if type(m).__name__ == "DeepseekV2Moe" and not hasattr(m, "num_experts"):
            m.num_experts = model.config.n_routed_experts


def moe_modules(*roots):
    out = []
    for root in roots:
        for name, m in root.named_modules():
            if hasattr(m, "gate") and hasattr(m, "experts") and hasattr(m, "shared_experts"):
                out.append((name, m))
    return out


def is_norm(name):
    return name.endswith("norm.weight")


@torch.no_grad()
def init_weights(named_params, named_buffers, gen, hidden):
    for name, p in named_params:
        if is_norm(name):
            p.copy_(torch.empty_like(p).uniform_(0.5, 1.5, generator=gen))
        elif name.endswith("embed_tokens.weight"):
            p.copy_(torch.empty_like(p).normal_(0.0, 1.0, generator=gen))
        elif name.endswith("mlp.gate.weight"):
            p.copy_(torch.empty_like(p).normal_(0.0, 1.5 / math.sqrt(hidden), generator=gen))
        else:
            fan_in = hidden if name.endswith("gate_up_proj") and p.shape[1] == hidden else p.shape[-1]
            p.copy_(torch.empty_like(p).normal_(0.0, 1.0 / math.sqrt(fan_in), generator=gen))
    for name, b in named_buffers:
        if name.endswith("e_score_correction_bias"):
            b.copy_(torch.empty_like(b).uniform_(-0.03, 0.1, generator=gen))


def fp8_names(hub_names):
    """Hub names stored as F8_E4M3 in DeepSeek-V3's release: the projections inside decoder layers
    (attention, dense MLP, experts, shared experts); not the router, norms, embeddings, heads or
    the MTP eh_proj."""
    out = set()
    for n in hub_names:
        module = n[:-len(".weight")].rsplit(".", 1)[-1] if n.endswith(".weight") else ""
        if n.startswith("model.layers.") and module != "eh_proj" and \
                (module.endswith("_proj") or module == "kv_a_proj_with_mqa"):
            out.add(n)
    return out


# ----------------------------------------------------------------------------- routing margins

def routing_margin(cfg, moe, x):
    """Smallest score gap at a selection cut for the tokens x (and, for V3, the smallest biased
    score); returns (margin, number of distinct experts chosen)."""
    h = cfg.hidden_size
    logits = x.reshape(-1, h).float() @ moe.gate.weight.float().t()
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    margins = []
    if cfg.model_type == "deepseek_v3":
        c = logits.sigmoid() + moe.gate.e_score_correction_bias.float()
        # Older transformers mask excluded groups with 0 rather than -inf; positive scores make
        # both spellings choose the same experts.
        margins.append(c.min().item())
        g, tg = cfg.n_group, cfg.topk_group
        gscore = c.view(-1, g, e // g).topk(2, dim=-1).values.sum(-1) if g > 1 else None
    else:
        c = logits.softmax(dim=-1)
        if cfg.topk_method == "group_limited_greedy":
            g, tg = cfg.n_group, cfg.topk_group
            gscore = c.view(-1, g, e // g).max(dim=-1).values
        else:
            g, tg, gscore = 1, 1, None
    if gscore is not None and tg < g:
        s = gscore.sort(dim=-1, descending=True).values
        margins.append((s[:, tg - 1] - s[:, tg]).min().item())
        keep = torch.zeros_like(gscore).scatter_(1, gscore.topk(tg, dim=-1).indices, 1.0)
        mask = keep.unsqueeze(-1).expand(-1, g, e // g).reshape(-1, e).bool()
        c = c.masked_fill(~mask, float("-inf"))
    s = c.sort(dim=-1, descending=True).values
    if k < s.shape[1] and torch.isfinite(s[:, k]).all():
        margins.append((s[:, k - 1] - s[:, k]).min().item())
    chosen = c.topk(k, dim=-1).indices
    return min(margins), chosen.unique().numel()


# ----------------------------------------------------------------------------- reference run

def run_reference(model, mtp_layers, ids, with_grad):
    """Forward (and backward) of main model + MTP; returns a dict of tensors in the model dtype."""
    captured = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: captured.append((mod, args[0].detach())))
             for _, m in moe_modules(model, mtp_layers)]
    try:
        out = model.model(input_ids=ids, use_cache=False)
        h0 = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        logits = model.lm_head(h0)
        mtp = mtp_forward(model, mtp_layers, ids, h0) if len(mtp_layers) else []
    finally:
        for hk in hooks:
            hk.remove()
    res = {"h0": h0[0], "logits": logits[0], "captured": captured}
    for k, (lk, _) in enumerate(mtp, start=1):
        res[f"mtp_logits_{k}"] = lk[0]
    t = ids.shape[1]
    tgt = ids[0]
    loss_main = F.cross_entropy(logits[0, :-1], tgt[1:])
    res["loss_main"] = loss_main
    total = loss_main
    d = len(mtp)
    for k in range(1, d + 1):
        lk = res[f"mtp_logits_{k}"]
        res[f"loss_mtp_{k}"] = F.cross_entropy(lk[: t - k - 1], tgt[k + 1:])
        total = total + (MTP_LAMBDA / d) * res[f"loss_mtp_{k}"]
    res["loss_total"] = total
    if with_grad:
        total.backward()
    return res


def collect_grads(model, mtp_layers, cfg):
    h, inter = cfg.hidden_size, cfg.moe_intermediate_size
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        grads[name] = g
    out = module_to_hub(grads, h, inter)
    for layer in mtp_layers:
        lg = {n: (p.grad if p.grad is not None else torch.zeros_like(p))
              for n, p in layer.named_parameters()}
        out.update(layer.hub_tensors(cfg, lg))
    return out


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------- writing

def hub_state(model, mtp_layers, cfg):
    h, inter = cfg.hidden_size, cfg.moe_intermediate_size
    hub = module_to_hub(dict(model.state_dict()), h, inter)
    for layer in mtp_layers:
        hub.update(layer.hub_tensors(cfg))
        pre = layer.prefix()
        # The hub release stores copies of the shared embedding and head in each MTP layer.
        hub[pre + "embed_tokens.weight"] = model.model.embed_tokens.weight.detach().clone()
        hub[pre + "shared_head.head.weight"] = model.lm_head.weight.detach().clone()
    return {n: t.detach().clone().contiguous() for n, t in hub.items()}


def storage_tensors(hub, weights, gen):
    """{hub name: float tensor} -> ({stored name: stored tensor}, {hub name: float value as stored})."""
    stored, values = {}, {}
    quant = fp8_names(hub) if weights == "fp8" else set()
    for name, t in sorted(hub.items()):
        if name.endswith("e_score_correction_bias"):
            stored[name] = t.float().contiguous()
        elif name in quant:
            # Row and column gains spread the block scales, so a wrong block index shows.
            rows = torch.empty(t.shape[0], 1).uniform_(-1.0, 1.0, generator=gen).exp()
            cols = torch.empty(1, t.shape[1]).uniform_(-1.0, 1.0, generator=gen).exp()
            q, s, deq = fp8_block_quantize(t.float() * rows * cols)
            stored[name] = q
            stored[name + "_scale_inv"] = s
            values[name] = deq
            continue
        elif weights in ("bf16", "fp8"):
            stored[name] = t.to(torch.bfloat16).contiguous()
        else:
            stored[name] = t.float().contiguous()
        values[name] = stored[name].float()
    return stored, values


def write_weights(path, stored, spec):
    from safetensors.torch import save_file

    n = spec.get("shards", 1)
    meta = {"format": "pt"}
    if n == 1:
        save_file(stored, os.path.join(path, "model.safetensors"), metadata=meta)
        return ["model.safetensors"]
    names = sorted(stored)
    digits = spec.get("shard_digits", 5)
    files = [f"model-{i + 1:05d}-of-{n:0{digits}d}.safetensors" for i in range(n)]
    assign = {}
    if spec.get("round_robin"):
        # Keep each weight next to its scale; otherwise spread neighbours over different shards.
        base = sorted({nm[:-len("_scale_inv")] if nm.endswith("_scale_inv") else nm for nm in names})
        for i, b in enumerate(base):
            assign[b] = i % n
        for nm in names:
            assign[nm] = assign[nm[:-len("_scale_inv")] if nm.endswith("_scale_inv") else nm]
    else:
        per = math.ceil(len(names) / n)
        for i, nm in enumerate(names):
            assign[nm] = i // per
    weight_map, total = {}, 0
    for i, fn in enumerate(files):
        part = {nm: stored[nm] for nm in names if assign[nm] == i}
        if not part:
            fail(f"shard {fn} would be empty")
        save_file(part, os.path.join(path, fn), metadata=meta)
        for nm, t in part.items():
            weight_map[nm] = fn
            total += t.numel() * t.element_size()
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2,
                  sort_keys=True)
        f.write("\n")
    return files


def info_keys(info, key):
    """A list from from_pretrained's loading info (a dict, or an object with attributes)."""
    v = info.get(key) if isinstance(info, dict) else getattr(info, key, None)
    return [str(x) for x in (v or [])]


def load_pretrained(cls, path):
    kwargs = dict(attn_implementation="eager", output_loading_info=True)
    try:
        res = cls.from_pretrained(path, dtype=torch.float32, experts_implementation="eager", **kwargs)
    except TypeError:
        res = cls.from_pretrained(path, torch_dtype=torch.float32, **kwargs)
    model, info = res if isinstance(res, tuple) else (res, {})
    force_eager(model)
    model.float().eval()
    return model, info


# ----------------------------------------------------------------------------- one fixture

def set_values(model, mtp_layers, cfg, values):
    """Loads the as-stored values (bf16-rounded or FP8-dequantized) back into the modules."""
    from hub_layout import hub_to_module

    h, inter = cfg.hidden_size, cfg.moe_intermediate_size
    state, used = hub_to_module(dict(model.state_dict()), values, h, inter)
    model.load_state_dict(state, strict=True)
    for layer in mtp_layers:
        used |= layer.load_hub(values, cfg)
    for layer in mtp_layers:
        pre = layer.prefix()
        for extra in ("embed_tokens.weight", "shared_head.head.weight"):
            used.add(pre + extra)
    left = set(values) - used
    if left:
        fail(f"tensors written but not used by the model: {sorted(left)[:8]}")


def build_candidate(spec, cfg_dict, seed, tmp):
    from transformers import AutoConfig

    # The model is built unquantized; FP8 is only the storage format.
    plain = {k: v for k, v in cfg_dict.items() if k != "quantization_config"}
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(plain, f)
    cfg = AutoConfig.from_pretrained(tmp)
    torch.manual_seed(seed)
    model = model_class(cfg_dict)(cfg)
    force_eager(model)
    model.float().eval()
    cfg = model.config
    if model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr():
        fail("lm_head is tied to embed_tokens; the fixtures need tie_word_embeddings false")
    n_mtp = int(cfg_dict.get("num_nextn_predict_layers", 0) or 0)
    mtp_layers = torch.nn.ModuleList([MTPLayer(cfg, cfg.num_hidden_layers + k) for k in range(n_mtp)])
    mtp_layers.float().eval()
    gen = torch.Generator().manual_seed(seed)
    init_weights(list(model.named_parameters()), list(model.named_buffers()), gen, cfg.hidden_size)
    init_weights(list(mtp_layers.named_parameters()), list(mtp_layers.named_buffers()), gen,
                 cfg.hidden_size)
    hub = hub_state(model, mtp_layers, cfg)
    stored, values = storage_tensors(hub, spec["weights"], gen)
    set_values(model, mtp_layers, cfg, values)
    gen_ids = torch.Generator().manual_seed(seed + 7)
    ids = torch.randint(2, cfg.vocab_size, (1, SEQ_LEN), generator=gen_ids)
    ids[0, 0] = cfg_dict.get("bos_token_id", 0) or 0
    return cfg, model, mtp_layers, stored, values, ids


def check_routing(cfg, captured):
    worst, used_min = float("inf"), None
    for mod, x in captured:
        m, used = routing_margin(cfg, mod, x)
        worst = min(worst, m)
        used_min = used if used_min is None else min(used_min, used)
    if captured:
        if worst < MIN_ROUTING_MARGIN:
            raise Retry(f"routing margin {worst:.2e} < {MIN_ROUTING_MARGIN:.0e}")
        if used_min < max(2, cfg.n_routed_experts // 2):
            raise Retry(f"a MoE layer used only {used_min} of {cfg.n_routed_experts} experts")
    return worst


def make_fixture(spec, out_root):
    name = spec["name"]
    log(f"\n=== {name}: {spec['what']}")
    final = os.path.join(out_root, name)
    cls = model_class(spec["config"])
    for attempt in range(MAX_ATTEMPTS):
        seed = spec["seed"] * 1000 + attempt
        with tempfile.TemporaryDirectory() as tmp:
            cfg, model, mtp_layers, stored, values, ids = build_candidate(spec, spec["config"], seed, tmp)
        m64 = copy.deepcopy(model).double()
        t64 = copy.deepcopy(mtp_layers).double()
        ref = run_reference(m64, t64, ids, with_grad=spec["grads"])
        try:
            margin = check_routing(cfg, ref["captured"])
            with torch.no_grad():
                r32 = run_reference(model, mtp_layers, ids, with_grad=False)
            for key in ["logits"] + [k for k in ref if k.startswith("mtp_logits_")]:
                e = rel_err(r32[key], ref[key])
                if e > MAX_F32_VS_F64:
                    raise Retry(f"{key}: float32 vs float64 rel. error {e:.2e}")
        except Retry as why:
            log(f"  seed {seed}: retry ({why})")
            continue
        log(f"  seed {seed}: routing margin {margin:.2e}, loss_total {ref['loss_total'].item():.6f}")
        break
    else:
        fail(f"{name}: no seed passed the routing/precision checks in {MAX_ATTEMPTS} attempts")

    if os.path.exists(final):
        shutil.rmtree(final)
    os.makedirs(final)
    with open(os.path.join(final, "config.json"), "w") as f:
        json.dump(spec["config"], f, indent=2, sort_keys=True)
        f.write("\n")
    files = write_weights(final, stored, spec)
    log(f"  wrote {', '.join(files)} ({sum(t.numel() * t.element_size() for t in stored.values())} bytes of tensors)")

    verify_checkpoint(spec, final, cls, cfg, model, mtp_layers, values, ids, r32)

    exp = {"input_ids": ids[0].to(torch.int64).contiguous(),
           "logits": ref["logits"].detach().float().contiguous(),
           "hidden_final": ref["h0"].detach().float().contiguous()}
    for k in range(1, len(mtp_layers) + 1):
        exp[f"mtp_logits_{k}"] = ref[f"mtp_logits_{k}"].detach().float().contiguous()
    if spec["grads"]:
        exp["mtp_lambda"] = torch.tensor([MTP_LAMBDA], dtype=torch.float32)
        for key in ["loss_main", "loss_total"] + [f"loss_mtp_{k}" for k in range(1, len(mtp_layers) + 1)]:
            exp[key] = ref[key].detach().float().reshape(1)
        grads = collect_grads(m64, t64, cfg)
        copies = {l.prefix() + s for l in mtp_layers for s in ("embed_tokens.weight",
                                                              "shared_head.head.weight")}
        want = {n for n in values if not n.endswith("e_score_correction_bias") and n not in copies}
        have = {n for n in grads if not n.endswith("e_score_correction_bias")}
        if want != have:
            fail(f"{name}: gradient names differ from parameter names: {sorted(want ^ have)[:8]}")
        for n, g in grads.items():
            if n.endswith("e_score_correction_bias"):
                continue
            if not torch.isfinite(g).all():
                fail(f"{name}: non-finite gradient for {n}")
            exp["grad." + n] = g.detach().float().contiguous()
    from safetensors.torch import save_file
    import transformers
    meta = {"format": "pt", "fixture": name, "covers": spec["what"], "seed": str(seed),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "mtp_lambda": str(MTP_LAMBDA),
            "reference": "logits/losses/grads: transformers model in float64 (router and norms "
                         "compute in float32 inside transformers); MTP: tools/mtp_reference.py"}
    save_file(exp, os.path.join(final, "expected.safetensors"), metadata=meta)
    size = sum(os.path.getsize(os.path.join(final, f)) for f in os.listdir(final))
    log(f"  wrote expected.safetensors ({len(exp)} tensors); fixture size {size} bytes")
    return size


def verify_checkpoint(spec, path, cls, cfg, model, mtp_layers, values, ids, r32):
    name = spec["name"]
    # 1. Our own reader (index, shards, FP8 dequantization) gives back the values the model uses.
    back, _ = read_checkpoint(path)
    if set(back) != set(values):
        fail(f"{name}: reread names differ: {sorted(set(back) ^ set(values))[:8]}")
    for n, t in values.items():
        if not torch.equal(back[n].float(), t.float()):
            fail(f"{name}: reread tensor {n} differs")
    # 2. MTP modules rebuilt from the files give the same logits.
    if len(mtp_layers):
        fresh = torch.nn.ModuleList([MTPLayer(cfg, l.layer_idx) for l in mtp_layers]).float().eval()
        for l in fresh:
            l.load_hub(back, cfg)
        with torch.no_grad():
            again = run_reference(model, fresh, ids, with_grad=False)
        for k in range(1, len(mtp_layers) + 1):
            e = rel_err(again[f"mtp_logits_{k}"], r32[f"mtp_logits_{k}"])
            if e > 1e-6:
                fail(f"{name}: MTP logits from the reread files differ (rel {e:.2e})")
    # 3. transformers' from_pretrained loads the hub layout into the same model.
    load_dir = path
    tmp = None
    if spec["weights"] == "fp8":
        # transformers' FP8 loader wants a GPU; check the layout on a dequantized F32 copy.
        tmp = tempfile.mkdtemp()
        cfgd = {k: v for k, v in spec["config"].items() if k != "quantization_config"}
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfgd, f)
        from safetensors.torch import save_file
        save_file({n: t.float().contiguous() for n, t in back.items()},
                  os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        load_dir = tmp
    try:
        loaded, info = load_pretrained(cls, load_dir)
    finally:
        if tmp:
            shutil.rmtree(tmp)
    for l in mtp_layers:
        pre = l.prefix()
        if not (torch.equal(back[pre + "embed_tokens.weight"], back["model.embed_tokens.weight"]) and
                torch.equal(back[pre + "shared_head.head.weight"], back["lm_head.weight"])):
            fail(f"{name}: the MTP copies of embed_tokens / lm_head differ from the main ones")
    mtp_prefixes = tuple(l.prefix() for l in mtp_layers)
    missing = info_keys(info, "missing_keys")
    unexpected = [k for k in info_keys(info, "unexpected_keys") if not k.startswith(mtp_prefixes)]
    mismatched = info_keys(info, "mismatched_keys")
    if missing or unexpected or mismatched:
        fail(f"{name}: from_pretrained missing={missing[:8]} unexpected={unexpected[:8]} "
             f"mismatched={mismatched[:8]}")
    ref_sd = model.state_dict()
    got_sd = loaded.state_dict()
    for n, t in ref_sd.items():
        if n not in got_sd or not torch.equal(got_sd[n].float(), t.float()):
            fail(f"{name}: from_pretrained tensor {n} differs from the in-memory model")
    with torch.no_grad():
        full = loaded(input_ids=ids, use_cache=False).logits[0]
        again = run_reference(loaded, torch.nn.ModuleList(), ids, with_grad=False)
    e1 = rel_err(full, r32["logits"])
    e2 = rel_err(again["logits"], r32["logits"])
    if e1 > 1e-6 or e2 > 1e-6:
        fail(f"{name}: logits after from_pretrained differ (forward {e1:.2e}, model+lm_head {e2:.2e})")
    log(f"  from_pretrained reload: tensors equal, logits rel. diff {e1:.1e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="tests/data/fixtures", help="output folder (default: %(default)s)")
    ap.add_argument("--only", default="", help="comma-separated fixture names (default: all)")
    args = ap.parse_args()
    import transformers

    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_num_threads(1)
    log(f"torch {torch.__version__}, transformers {transformers.__version__}, out {args.out}")
    os.makedirs(args.out, exist_ok=True)
    only = {s for s in args.only.split(",") if s}
    total = 0
    for spec in FIXTURES:
        if only and spec["name"] not in only:
            continue
        total += make_fixture(spec, args.out)
    log(f"\nOK: all fixtures written and verified; {total} bytes in all")


if __name__ == "__main__":
    main()
