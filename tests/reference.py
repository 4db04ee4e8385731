"""An independent float64 Llama forward, the oracle of the tests.

Written from the Hugging Face Llama / Qwen2 definitions (modeling_llama.py, modeling_rope_utils.py),
not from model.py: it works on Hugging Face tensor names, loops over heads and query positions, and
rotates q/k by an explicit rotation matrix per position. It can also attend to a given prefix of
per-layer keys and values (`past`) and hand back each layer's rotated q, k, v (`record`), which is
what checking ParallelComp's chunk caches and query pass takes.
"""

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file


def load_float64(path):
    """A checkpoint directory -> (HF name -> float64 tensor, config.json dict)."""
    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    return {k: v.double() for k, v in load_file(path / "model.safetensors").items()}, cfg


def ref_head_dim(cfg):
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def ref_rope_type(cfg):
    scaling = cfg.get("rope_scaling") or {}
    return scaling.get("rope_type", scaling.get("type", "default"))


def ref_inv_freq(cfg, seq_len):
    """HF's ROPE_INIT_FUNCTIONS in float64: default, linear (applied to positions instead, see
    ref_rotations), dynamic NTK, llama3 and YaRN. seq_len = the forward's largest position + 1."""
    d = ref_head_dim(cfg)
    base = float(cfg.get("rope_theta", 10000.0))
    kind, scaling = ref_rope_type(cfg), cfg.get("rope_scaling") or {}
    if kind == "dynamic":
        window, factor = cfg["max_position_embeddings"], scaling["factor"]
        if seq_len > window:
            base = base * ((factor * seq_len / window) - (factor - 1)) ** (d / (d - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    if kind == "llama3":
        factor = scaling["factor"]
        low_freq_factor, high_freq_factor = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context_len = scaling["original_max_position_embeddings"]
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
        is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        inv_freq = torch.where(is_medium, smoothed, inv_freq_llama)
    if kind == "yarn":
        inv_freq = torch.tensor([yarn_frequency(cfg, i, float(f)) for i, f in enumerate(inv_freq)], dtype=torch.float64)
    return inv_freq


def yarn_window(cfg):
    scaling = cfg["rope_scaling"]
    return scaling.get("original_max_position_embeddings") or cfg["max_position_embeddings"]


def yarn_frequency(cfg, i, frequency):
    """YaRN (arXiv 2309.00071; HF's _compute_yarn_parameters) for pair i of frequency theta^(-2i/d):
    with r(n) = d ln(L / (2 pi n)) / (2 ln theta) the pair that turns n times over the original
    window L, pairs up to r(beta_fast) keep their frequency, pairs from r(beta_slow) on divide it
    by the factor, and the share divided rises linearly in i between (bounds floored/ceiled unless
    truncate is false, clipped to [0, d - 1], a zero-width ramp widened to 0.001)."""
    s, d, theta = cfg["rope_scaling"], ref_head_dim(cfg), float(cfg.get("rope_theta", 10000.0))

    def r(turns):
        return d * math.log(yarn_window(cfg) / (2 * math.pi * turns)) / (2 * math.log(theta))

    low, high = r(s.get("beta_fast") or 32), r(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    divided = min(1.0, max(0.0, (i - low) / (high - low)))
    return frequency * (1 - divided) + frequency / s["factor"] * divided


def ref_temperature(cfg):
    """YaRN's scale of cos and sin: attention_factor; else 0.1 mscale ln(factor) + 1 over the same
    at mscale_all_dim when both are given, else 0.1 ln(factor) + 1 (1 at factor <= 1)."""
    if ref_rope_type(cfg) != "yarn":
        return 1.0
    s = cfg["rope_scaling"]
    if s.get("attention_factor") is not None:
        return s["attention_factor"]
    f = s["factor"]
    if s.get("mscale") and s.get("mscale_all_dim"):
        return (0.1 * s["mscale"] * math.log(f) + 1) / (0.1 * s["mscale_all_dim"] * math.log(f) + 1)
    return 0.1 * math.log(f) + 1 if f > 1 else 1.0


def ref_rotations(cfg, positions):
    """(T, d, d) float64 matrices R_t with rope(x at position t) = R_t @ x, half-split pairing:
    out[i] = x[i] cos - x[i + d/2] sin, out[i + d/2] = x[i + d/2] cos + x[i] sin (HF rotate_half);
    YaRN's temperature multiplies cos and sin (HF's attention_scaling), so R_t too."""
    d = ref_head_dim(cfg)
    inv_freq = ref_inv_freq(cfg, max(positions) + 1)
    scaling = cfg.get("rope_scaling") or {}
    divisor = scaling["factor"] if ref_rope_type(cfg) == "linear" else 1.0
    angles = torch.tensor(positions, dtype=torch.float64)[:, None] / divisor * inv_freq  # (T, d/2)
    c, s = angles.cos() * ref_temperature(cfg), angles.sin() * ref_temperature(cfg)
    i = torch.arange(d // 2)
    mats = torch.zeros(len(positions), d, d, dtype=torch.float64)
    mats[:, i, i], mats[:, i, i + d // 2] = c, -s
    mats[:, i + d // 2, i], mats[:, i + d // 2, i + d // 2] = s, c
    return mats


def ref_rmsnorm(x, weight, eps):
    return weight * (x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps))


def ref_forward(w, cfg, tokens, positions, past=None, record=None, mask=None):
    """Logits (T, vocab) in float64 for one sequence; w: HF name -> float64 tensor; cfg: config.json dict.

    Causal by sequence index (as HF's mask), RoPE by the given positions. past: per layer (K, V)
    of shape (P, H_kv, d), already rotated, that every token attends to before its own causal
    part. record: a list that receives per layer {"q": (T, H, d), "k", "v": (T, H_kv, d)}.
    mask: mask(layer) -> None (causal) or (T, T) bool, True where token t attends to token s <= t.
    """
    T, d = len(tokens), ref_head_dim(cfg)
    H = cfg["num_attention_heads"]
    Hkv = cfg.get("num_key_value_heads") or H
    eps = cfg["rms_norm_eps"]
    rot = ref_rotations(cfg, positions)
    x = w["model.embed_tokens.weight"][torch.tensor(tokens)]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."

        def proj(name, inp):
            out = inp @ w[p + name + ".weight"].T
            bias = w.get(p + name + ".bias")
            return out if bias is None else out + bias

        h = ref_rmsnorm(x, w[p + "input_layernorm.weight"], eps)
        q = proj("self_attn.q_proj", h).reshape(T, H, d)
        k = proj("self_attn.k_proj", h).reshape(T, Hkv, d)
        v = proj("self_attn.v_proj", h).reshape(T, Hkv, d)
        q = torch.einsum("tij,thj->thi", rot, q)
        k = torch.einsum("tij,thj->thi", rot, k)
        if record is not None:
            record.append({"q": q, "k": k, "v": v})
        past_k, past_v = past[layer] if past else (k[:0], v[:0])
        allowed = mask(layer) if mask else None
        heads = []
        for head in range(H):
            kv_head = head // (H // Hkv)  # HF repeat_kv: each KV head serves H/Hkv consecutive heads
            rows = []
            for t in range(T):
                own = torch.arange(t + 1) if allowed is None else allowed[t, : t + 1].nonzero()[:, 0]
                keys = torch.cat([past_k[:, kv_head], k[own, kv_head]])
                values = torch.cat([past_v[:, kv_head], v[own, kv_head]])
                scores = (keys @ q[t, head]) / math.sqrt(d)
                weights = torch.exp(scores - scores.max())
                weights = weights / weights.sum()
                rows.append(weights @ values)
            heads.append(torch.stack(rows))  # (T, d)
        attn = torch.cat(heads, dim=-1)  # (T, H*d), head-major as HF's reshape
        x = x + proj("self_attn.o_proj", attn)
        h = ref_rmsnorm(x, w[p + "post_attention_layernorm.weight"], eps)
        gate, up = proj("mlp.gate_proj", h), proj("mlp.up_proj", h)
        x = x + proj("mlp.down_proj", gate / (1 + torch.exp(-gate)) * up)
    x = ref_rmsnorm(x, w["model.norm.weight"], eps)
    head = w["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else w["lm_head.weight"]
    return x @ head.T


def ref_greedy(w, cfg, ids, n, eos):
    """The decode loop's greedy tokens after `ids`, at most n: each the argmax of ref_forward over
    everything before it at positions 0.., the first never `eos`, none from an `eos` on."""
    out = []
    while len(out) < n:
        logits = ref_forward(w, cfg, ids + out, list(range(len(ids) + len(out))))[-1]
        if not out:
            logits[eos] = float("-inf")
        if int(logits.argmax()) == eos:
            break
        out.append(int(logits.argmax()))
    return out


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()
