"""Rotary position embeddings (RoPE) and their scalings, read from a Hugging Face config.json's
rope_theta and rope_scaling: none, linear, dynamic NTK, Llama 3.1's and YaRN. Frequencies are
computed in float64; model.Llama.rope turns positions into the cos/sin every rotation uses.
"""

import math

import torch


def rope_frequencies(config):
    """Inverse frequencies (head_dim/2,) in float64, with linear, Llama-3.1 or YaRN scaling applied.

    Angles (position * frequency) are formed in float64: in float32, the frequency's rounding
    (2^-24 relative) and the product's (an ulp is 0.03 rad just below 2^19) each move an angle
    at position 5e5 by up to 0.016-0.03 rad, and rotated vectors came out 3e-3 off there."""
    d = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    s = config.rope_scaling or {}
    if config.rope_type == "linear":
        inv_freq = inv_freq / s["factor"]
    elif config.rope_type == "llama3":
        # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_window = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        blend = ((old_window / wavelen - low) / (high - low)).clamp(0, 1)
        inv_freq = (1 - blend) * inv_freq / factor + blend * inv_freq
    elif config.rope_type == "yarn":
        inv_freq = yarn_frequencies(config, inv_freq)
    return inv_freq


def yarn_frequencies(config, inv_freq):
    """YaRN (Peng et al., arXiv 2309.00071), as Hugging Face reads its rope_scaling: a dimension pair
    that turns fewer than beta_slow (1) times over the original window is slowed by `factor`, one
    that turns more than beta_fast (32) times is kept, and a ramp in the pair's index blends those
    between (its ends rounded outwards unless `truncate` is false). Unlike Hugging Face, `factor`
    must be given (it does not default to the ratio of the two windows)."""
    s, d = config.rope_scaling, config.head_dim
    window = s.get("original_max_position_embeddings", config.max_position_embeddings)

    def pair_turning(turns):  # the (fractional) pair index whose wavelength fits `turns` times in the window
        return d * math.log(window / (turns * 2 * math.pi)) / (2 * math.log(config.rope_theta))

    low, high = pair_turning(s.get("beta_fast") or 32), pair_turning(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    ramp = ((torch.arange(d // 2, dtype=torch.float64) - low) / (high - low or 1e-3)).clamp(0, 1)
    return (1 - ramp) * inv_freq + ramp * inv_freq / s["factor"]


def rope_temperature(config):
    """The factor YaRN scales cos and sin by, so q·k by its square: `attention_factor`, else
    0.1 ln(factor) + 1, or that formula's ratio at `mscale` and `mscale_all_dim` when both are
    given (DeepSeek's configs; their attention layers also scale q·k by mscale_all_dim, which a
    Llama or Qwen2 has no use for). 1 for every other RoPE."""
    if config.rope_type != "yarn":
        return 1.0
    s = config.rope_scaling
    if s.get("attention_factor") is not None:
        return float(s["attention_factor"])

    def mscale(scale=1.0):
        return 1.0 if s["factor"] <= 1 else 0.1 * scale * math.log(s["factor"]) + 1.0

    if s.get("mscale") and s.get("mscale_all_dim"):
        return mscale(s["mscale"]) / mscale(s["mscale_all_dim"])
    return mscale()


def dynamic_ntk_frequencies(config, inv_freq, positions):
    """Dynamic NTK scaling: the base grows with the longest position in this forward, as in
    Hugging Face, computed on the device so that a captured decode step stays valid."""
    d, window, factor = config.head_dim, config.max_position_embeddings, config.rope_scaling["factor"]
    seq_len = (positions.max() + 1).clamp(min=window).float()
    base = config.rope_theta * (factor * seq_len / window - (factor - 1)) ** (d / (d - 2))
    exponents = torch.arange(0, d, 2, device=positions.device, dtype=torch.float32) / d
    return base ** -exponents


def apply_rope(x, cos, sin):
    """Rotate the half-split pairs (i, i + D/2) of x (B, H, T, D) by angles given as cos/sin (B, 1, T, D/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
