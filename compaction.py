"""The cache InfiniPot and Locret share: a KVCache that also keeps every key before RoPE, so that
the entries kept after an eviction move to slots 0..n-1 and their keys are rotated anew to
positions 0..n-1 (InfiniPot's Context-Reset RoPE; Locret's gap-free cache). Rotating the stored
raw keys, not the rotated ones back and forth, keeps a key exact through any number of
compactions.
"""

import torch

from model import KVCache
from rope import apply_rope


class RawKeyCache(KVCache):
    """A KVCache with k_raw (L, B, H_kv, capacity, D), the keys before RoPE. A method sets k_raw to
    None once nothing more is compacted: decoding needs only k and v."""

    def __init__(self, config, batch, capacity, device, dtype):
        super().__init__(config, batch, capacity, device, dtype)
        self.k_raw = torch.zeros_like(self.k)
        self.kv_split = (config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim)  # q, k in qkv

    def store_raw_keys(self, start):
        """An `observe` for tokens written from slot `start` on: keeps their keys before RoPE."""
        def observe(layer, qkv):
            B, T, _ = qkv.shape
            q_size, kv_size = self.kv_split
            k = qkv[..., q_size:q_size + kv_size].view(B, T, self.k.shape[2], -1).transpose(1, 2)
            self.k_raw[layer, :, :, start:start + T] = k
        return observe

    def compact(self, keep, rope):
        """Keep, in each layer and KV head, the sorted slots keep (L, H_kv, n), moved to slots
        0..n-1 with RoPE positions 0..n-1 (batch 1); rope: the model's Llama.rope."""
        n = keep.shape[-1]
        index = keep[:, None, :, :, None].expand(-1, 1, -1, -1, self.k.shape[-1])
        self.v[:, :, :, :n] = self.v.gather(3, index)
        self.k_raw[:, :, :, :n] = self.k_raw.gather(3, index)
        cos, sin = rope(torch.arange(n, device=keep.device)[None])  # (1, 1, n, D/2)
        self.k[:, :, :, :n] = apply_rope(self.k_raw[:, :, :, :n], cos, sin)
        self.lens.fill_(n)
