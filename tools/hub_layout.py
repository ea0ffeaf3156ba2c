"""Conversions between a transformers module's parameters and the hub checkpoint layout.

transformers 5 keeps routed experts fused (`mlp.experts.gate_up_proj` [E, 2I, H] with the gate rows
first, `mlp.experts.down_proj` [E, H, I]); the hub stores them per expert
(`mlp.experts.E.gate_proj.weight` [I, H], `up_proj` [I, H], `down_proj` [H, I]). Older transformers
keep a ModuleList, whose names are already the hub's. Everything else has the same name in both.

Also: block-wise FP8 quantization as DeepSeek-V3's hub release stores it, and a reader for a
checkpoint directory (one file or a sharded index).
"""

import json
import math
import os
import re

import torch

FUSED_RE = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<kind>gate_up_proj|down_proj)$")


def _fused_orientation(kind, shape, hidden, inter):
    """Returns True when the fused tensor is stored transposed ([E, in, out])."""
    e, a, b = shape
    if kind == "gate_up_proj":
        if (a, b) == (2 * inter, hidden):
            return False
        if (a, b) == (hidden, 2 * inter):
            return True
    else:
        if (a, b) == (hidden, inter):
            return False
        if (a, b) == (inter, hidden):
            return True
    raise RuntimeError(f"fused expert tensor {kind} has unexpected shape {tuple(shape)} "
                       f"(hidden {hidden}, moe_intermediate_size {inter}); choose hidden != I and != 2I")


def module_to_hub(named_tensors, hidden, inter, prefix=""):
    """{module name: tensor} -> {hub name: tensor}; fused experts are split per expert."""
    out = {}
    for name, t in named_tensors.items():
        m = FUSED_RE.match(name)
        if m is None:
            out[prefix + name] = t
            continue
        base = prefix + m.group("prefix")
        transposed = _fused_orientation(m.group("kind"), t.shape, hidden, inter)
        for e in range(t.shape[0]):
            w = t[e].t() if transposed else t[e]  # now [out, in]
            if m.group("kind") == "gate_up_proj":
                out[f"{base}.{e}.gate_proj.weight"] = w[:inter].contiguous()
                out[f"{base}.{e}.up_proj.weight"] = w[inter:].contiguous()
            else:
                out[f"{base}.{e}.down_proj.weight"] = w.contiguous()
    return out


def hub_to_module(ref_state, hub, hidden, inter, prefix=""):
    """Builds a state dict shaped like `ref_state` ({module name: tensor}) from hub-named tensors
    (prefix + module name, experts per expert). Returns (state, hub names used)."""
    state = {}
    used = set()
    for name, ref in ref_state.items():
        m = FUSED_RE.match(name)
        if m is None:
            key = prefix + name
            if key not in hub:
                raise KeyError(f"hub tensor {key} is missing")
            state[name] = hub[key].to(ref.dtype)
            used.add(key)
            continue
        base = prefix + m.group("prefix")
        transposed = _fused_orientation(m.group("kind"), ref.shape, hidden, inter)
        rows = []
        for e in range(ref.shape[0]):
            if m.group("kind") == "gate_up_proj":
                keys = [f"{base}.{e}.gate_proj.weight", f"{base}.{e}.up_proj.weight"]
                w = torch.cat([hub[k] for k in keys], dim=0)
            else:
                keys = [f"{base}.{e}.down_proj.weight"]
                w = hub[keys[0]]
            used.update(keys)
            rows.append(w.t() if transposed else w)
        state[name] = torch.stack(rows).to(ref.dtype).contiguous()
    return state, used


def fp8_block_quantize(w, block=128):
    """[N, K] float32 -> (F8_E4M3 [N, K], scale_inv F32 [ceil(N/128), ceil(K/128)], dequantized F32).

    One scale per 128x128 block (edge blocks partial); dequantized value = fp8 value * scale_inv,
    computed in float32 as a loader would.
    """
    n, k = w.shape
    nb, kb = math.ceil(n / block), math.ceil(k / block)
    padded = torch.zeros(nb * block, kb * block, dtype=torch.float32)
    padded[:n, :k] = w.float()
    blocks = padded.view(nb, block, kb, block)
    amax = blocks.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax)).float()
    expand = scale[:, None, :, None]
    # Clamp: amax / (amax / 448) can round to just above 448, which E4M3FN would turn into NaN.
    q = (blocks / expand).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    deq = (q.float() * expand).view(nb * block, kb * block)[:n, :k].contiguous()
    q = q.view(nb * block, kb * block)[:n, :k].contiguous()
    if torch.isnan(deq).any():
        raise RuntimeError("FP8 quantization produced NaN")
    return q, scale.contiguous(), deq


def fp8_dequantize(q, scale_inv, block=128):
    n, k = q.shape
    s = scale_inv.float().repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :k]
    return q.float() * s


def read_checkpoint(path):
    """All tensors of a checkpoint directory (model.safetensors or a sharded index), FP8 dequantized.

    Returns ({name: tensor}, config dict). `<name>_scale_inv` tensors are consumed.
    """
    from safetensors.torch import load_file

    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    raw = {}
    for fn in files:
        for name, t in load_file(os.path.join(path, fn)).items():
            if name in raw:
                raise RuntimeError(f"{name} appears in two shards")
            raw[name] = t
    out = {}
    for name, t in raw.items():
        if name.endswith("_scale_inv"):
            continue
        if t.dtype == getattr(torch, "float8_e4m3fn", None):
            s = raw.get(name + "_scale_inv")
            if s is None:
                raise RuntimeError(f"{name} is F8_E4M3 but {name}_scale_inv is missing")
            out[name] = fp8_dequantize(t, s)
        else:
            out[name] = t.float()
    return out, config
