"""The Llama decoder and its KV cache (checkpoint.py loads weights into it; rope.py and attention.py
hold RoPE and the attention backends it calls).

Every forward takes explicit positions (ParallelComp restarts them in each chunk) and an
`attend(layer, q, k, v)` function that decides where keys and values go and what each query
sees: a static KV cache for plain prefill and decoding, chunk caches and the query pass in
parallelcomp.py. Keys reach `attend` already rotated, so a cached key keeps its position.
"""

import copy
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from attention import attention, decode_attention, matmul_f32
from rope import apply_rope, dynamic_ntk_frequencies, rope_frequencies, rope_temperature

try:
    import llama_triton as kernels  # Triton kernels for CUDA tensors; the PyTorch code here otherwise
except ImportError:
    kernels = None
if getattr(kernels, "KERNELS_FOR", None) != "model.py":  # a module of that name that is not ours
    kernels = None

CACHE_ALIGN = 256  # KV cache capacity granularity, in tokens


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int  # the trained window
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v biases
    output_bias: bool  # o_proj bias: Llama's attention_bias has one, Qwen2 has none

    @property
    def rope_type(self):
        return scaling_type(self.rope_scaling)


def scaling_type(rope_scaling):
    """The type of a Hugging Face RoPE scaling dict (None: "default"); older files call it "type"."""
    s = rope_scaling or {}
    return s.get("rope_type", s.get("type", "default"))


class KVCache:
    """Per-generation static cache, GQA-native: k, v (L, B, H_kv, capacity, D).

    lens (L,) counts the live entries of each layer on the device; they differ between layers
    only after ParallelComp's attention calibration. The capacity is rounded up to a multiple of
    CACHE_ALIGN: rows of attention probabilities whose length is not a multiple of 8 push
    cuBLAS off its tensor-core kernels ([H200] 2-3x slower decode).

    The contract of every cache the decode loop (decoding.py) continues from (hybrid.HybridCache
    and distributed.ShardedCache keep it too): `k`, a tensor on the cache's device; `lens`, the
    live entries on the device; `graph_safe`, whether decode_attend may be captured in a CUDA graph
    (no host sync, no collective); decode_attend(layer, q, k, v), the `attend` of one new token per
    sequence after the live entries; and, where graph_safe, decode_state(), the tensors a decode
    step changes that are live before it, which a graph's warm-up restores. prefill.extend also
    asks for append_attend(layer, q, k, v), tokens after each layer's live entries.
    """

    graph_safe = True

    def __init__(self, config, batch, capacity, device, dtype):
        capacity = -(-capacity // CACHE_ALIGN) * CACHE_ALIGN
        shape = (config.n_layers, batch, config.n_kv_heads, capacity, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lens = torch.zeros(config.n_layers, device=device, dtype=torch.long)
        self.capacity = capacity
        # decode steps run in inference, where only the device and the head size decide
        fits = kernels is not None and self.k.is_cuda and kernels.supports(config.head_dim)
        self.kernels = kernels if fits else None

    def prefill_attend(self, start):
        """An `attend` for tokens that follow `start` cached ones: write them, attend causally."""
        return lambda layer, q, k, v: self.write_attend(layer, start, q, k, v)

    def append_attend(self, layer, q, k, v):
        """An `attend` for tokens after each layer's own live entries (they differ after calibration)."""
        return self.write_attend(layer, int(self.lens[layer]), q, k, v)

    def write_attend(self, layer, start, q, k, v):
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        self.lens[layer] = end
        return attention(q, self.k[layer, :, :, :end], self.v[layer, :, :, :end])

    def decode_state(self):
        """What a decode step changes that is live before it: what a CUDA-graph warm-up must restore."""
        return (self.lens,)

    def decode_attend(self, layer, q, k, v):
        """An `attend` for one new token per sequence, written at lens[layer] (graph-safe)."""
        if self.kernels is not None:
            return self.kernels.decode_attend(q, k, v, self.k[layer], self.v[layer], self.lens[layer])
        at = self.lens[layer:layer + 1]
        self.k[layer].index_copy_(2, at, k)
        self.v[layer].index_copy_(2, at, v)
        self.lens[layer] += 1
        live = torch.arange(self.capacity, device=q.device) < self.lens[layer]
        return decode_attention(q, self.k[layer], self.v[layer], live)


# ---------------------------------------------------------------------------- the model

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x, delta=None, fast=None):
        """x (..., dim), the float32 residual stream -> normalised, in the weights' dtype.

        delta: the output of the sublayer before, added to x in place first (one kernel on a GPU).
        fast: the Triton kernels when they serve this forward (Llama.kernels_for), else None.
        """
        if fast is not None:
            return fast.rms_norm(x, self.weight, self.eps, delta)
        if delta is not None:
            x += delta
        if torch.is_grad_enabled() and x.requires_grad:
            x = x.clone()  # what autograd saves: the caller's x changes in place at the next norm
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(self.weight.dtype)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        q_size, kv_size = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
        self.split = [q_size, kv_size, kv_size]
        self.wqkv = nn.Linear(config.dim, q_size + 2 * kv_size, bias=config.attention_bias)
        self.wo = nn.Linear(q_size, config.dim, bias=config.output_bias)

    def forward(self, x, cos, sin, attend, observe, fast):
        B, T, _ = x.shape
        qkv = self.wqkv(x)
        if observe is not None:
            observe(qkv)
        q, k, v = qkv.split(self.split, dim=-1)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        if fast is not None and fast.supports(self.head_dim):
            q, k = fast.rotary(qkv, cos, sin, self.n_heads, self.n_kv_heads, self.head_dim)
        else:
            q = apply_rope(q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2), cos, sin)  # (B, H, T, D)
            k = apply_rope(k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2), cos, sin)
        o = attend(q, k, v)
        return self.wo(o.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.w_gate_up = nn.Linear(config.dim, 2 * config.ffn_dim, bias=False)
        self.w_down = nn.Linear(config.ffn_dim, config.dim, bias=False)

    def forward(self, x, fast):
        gate_up = self.w_gate_up(x)
        if fast is not None:
            return self.w_down(fast.silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.w_down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, delta, cos, sin, attend, observe, fast):
        """Adds `delta`, the block before's output, to the residual stream x in place; returns
        this block's MLP output, which the next norm adds in turn."""
        h = self.attn_norm(x, delta, fast)
        h = self.mlp_norm(x, self.attn(h, cos, sin, attend, observe, fast), fast)
        return self.mlp(h, fast)

    def decode_step(self, x, cos, sin, attend):
        """One token on a GPU (see Llama.forward) in six kernels; x (1, 1, dim) gains both sublayers in place."""
        a, mlp, D = self.attn, self.mlp, self.attn.head_dim
        qkv = kernels.norm_rotary_gemv(x, self.attn_norm.weight, self.attn_norm.eps, a.wqkv.weight, a.wqkv.bias,
                                       cos.view(-1), sin.view(-1), a.n_heads + a.n_kv_heads, D)
        q, k, v = (t.view(1, 1, -1, D).transpose(1, 2) for t in qkv.split(a.split, dim=-1))  # (1, heads, 1, D)
        o = attend(q, k, v)
        kernels.residual_gemv(o.contiguous().view(-1), a.wo.weight, a.wo.bias, x.view(-1))
        h = kernels.norm_silu_gemv(x, self.mlp_norm.weight, self.mlp_norm.eps, mlp.w_gate_up.weight)
        kernels.residual_gemv(h.view(-1), mlp.w_down.weight, None, x.view(-1))


class Llama(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_frequencies(config), persistent=False)
        self.rope_temperature = rope_temperature(config)

    def rope(self, positions, temperature=True):
        """cos, sin (B, 1, T, D/2) float32 of RoPE at positions (B, T): every rotation of q and k
        takes them from here. The angles are formed in float64 (rope_frequencies says why), and
        YaRN's temperature scales both unless temperature=False, for keys that already carry it
        and are only turned by a relative angle (baselines.shift_back)."""
        scale = self.rope_temperature if temperature else 1.0
        dynamic = self.config.rope_type == "dynamic"
        if not dynamic and kernels is not None and positions.is_cuda and kernels.supports(self.config.head_dim):
            return kernels.rope(positions, self.inv_freq, scale)  # the lines below in one kernel
        inv_freq = dynamic_ntk_frequencies(self.config, self.inv_freq, positions) if dynamic else self.inv_freq
        angles = positions[:, None, :, None].double() * inv_freq  # (B, 1, T, D/2)
        return (angles.cos() * scale).float(), (angles.sin() * scale).float()

    def with_rope_scaling(self, rope_scaling, max_position_embeddings):
        """This model under another RoPE scaling and window (YaRN on a checkpoint trained without
        it, baselines.prefill_yarn): a Llama sharing every module, so every parameter, with its own
        config, frequencies and temperature. Nothing is copied."""
        view = copy.copy(self)
        view._buffers = dict(self._buffers)  # its own inv_freq; _modules, and with them the weights, shared
        view.config = replace(self.config, rope_scaling=rope_scaling, max_position_embeddings=max_position_embeddings)
        view.inv_freq = rope_frequencies(view.config).to(self.device)
        view.rope_temperature = rope_temperature(view.config)
        return view

    def forward(self, tokens, positions, attend, observe=None):
        """tokens, positions (B, T) -> final-norm hidden states (B, T, dim).

        attend(layer, q, k, v) -> (B, H, T, D) receives rotated q (B, H, T, D) and k, v (B, H_kv, T, D).
        observe(layer, qkv), when given, sees each layer's fused projection (B, T, (H + 2 H_kv) D)
        before RoPE: the raw keys that a compacted cache re-rotates, what trained scorers read.
        """
        cos, sin = self.rope(positions)
        x = self.embed(tokens).float()  # the residual stream stays in float32 whatever the weights' dtype
        fast = self.kernels_for(x)
        # one token in six kernels a layer; not with `observe`, which sees q/k/v before RoPE, which they fuse
        if fast is not None and fast.supports(self.config.head_dim) and x.shape[0] * x.shape[1] == 1 \
                and observe is None and not torch.is_grad_enabled():
            for i, layer in enumerate(self.layers):
                layer.decode_step(x, cos, sin, lambda q, k, v, i=i: attend(i, q, k, v))
            return self.norm(x, fast=fast)
        delta = None
        for i, layer in enumerate(self.layers):
            delta = layer(x, delta, cos, sin, lambda q, k, v, i=i: attend(i, q, k, v),
                          observe and (lambda qkv, i=i: observe(i, qkv)), fast)
        return self.norm(x, delta, fast)

    def kernels_for(self, x):
        """The Triton kernels when they serve a forward of x, else None (PyTorch serves): a CUDA
        tensor, and autograd not recording, since they have no backward. Decided once per forward."""
        if kernels is None or not x.is_cuda:
            return None
        recorded = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        return None if recorded else kernels

    @property
    def device(self):
        return self.embed.weight.device

    @property
    def dtype(self):
        return self.embed.weight.dtype

    def causal_logits(self, tokens):
        """Logits (B, T, vocab) in float32 of plain causal attention at positions 0..T-1, no cache."""
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        return self.logits(self(tokens, positions, lambda layer, q, k, v: attention(q, k, v)))

    def logits(self, hidden):
        """(..., dim) -> float32 (..., vocab): call it only where a token is sampled or scored."""
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        flat = hidden.reshape(1, -1, hidden.shape[-1])
        return matmul_f32(flat, weight.t()[None]).view(*hidden.shape[:-1], -1)


def build_model(config, device, dtype):
    """An inference-mode Llama with uninitialised weights, allocated once on `device`."""
    with torch.device("meta"):
        model = Llama(config).to(dtype)
    model = model.to_empty(device=device)
    model.inv_freq = rope_frequencies(config).to(device)
    return model.eval().requires_grad_(False)
