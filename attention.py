"""Softmax attention with GQA, as the model and the methods call it: the fastest backend for causal
prefill (flash-attn-4, cuDNN, PyTorch's SDPA), the plain matmul form with float32 scores where a
method reads the scores or merges partial results by their log-sum-exp, and decode attention
against a static cache.
"""

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

try:
    from flash_attn.cute import flash_attn_func  # flash-attn-4 (CuTe DSL): Hopper and Blackwell
except ImportError:
    flash_attn_func = None

# On H100/H200 with torch 2.11, cuDNN attention ran causal prefill about 2x faster than
# PyTorch's flash backend; SDPA skips backends that cannot take the inputs.
PREFILL_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                    SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
HALF = (torch.bfloat16, torch.float16)


def attention(q, k, v, mask=None):
    """Softmax attention with GQA. q (B, H, Tq, D); k, v (B, H_kv, Tk, D) -> (B, H, Tq, D).

    mask: bool (B|1, H|1, Tq, Tk), True = may attend; None = causal aligned to the bottom
    right (query i is the key at Tk - Tq + i), which is what prefill after a cache needs.
    """
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    if flash_attn_func is not None and q.is_cuda and q.dtype in HALF:
        out, _ = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        return out.transpose(1, 2)
    if q.shape[2] == k.shape[2]:
        with sdpa_kernel(PREFILL_BACKENDS, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    if q.is_cuda and not cudnn_takes(q):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(q.shape[2], k.shape[2]),
                                              enable_gqa=True)
    return causal_after_cache(q, k, v)


def cudnn_takes(q):
    """Whether cuDNN's attention takes these queries: 16-bit, head size a multiple of 8 up to 128."""
    D = q.shape[-1]
    return q.dtype in HALF and D % 8 == 0 and D <= 128


def causal_after_cache(q, k, v):
    """Bottom-right causal attention as two fast unmasked/top-left causal calls merged by their
    log-sum-exp: the Tk - Tq keys before the queries, all visible, and the queries' own keys,
    causal. PyTorch's SDPA serves a bottom-right mask only with its flash kernel ([H200] 346
    TFLOP/s for an 8K piece after a 120K cache, against 592 for these two cuDNN calls)."""
    before = k.shape[2] - q.shape[2]
    parts = [attention_with_lse(q, k[:, :, :before], v[:, :, :before], causal=False),
             attention_with_lse(q, k[:, :, before:], v[:, :, before:], causal=True)]
    outs, lses = (torch.stack(x) for x in zip(*parts))
    return merge_lse(outs.float(), lses).to(q.dtype)


def attention_with_lse(q, k, v, causal):
    """(out (B, H, Tq, D), lse (B, H, Tq) float32) of SDPA's flash kernels: cuDNN's on a GPU,
    which takes GQA as it is; the CPU's, which needs every query head's keys."""
    if q.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, is_causal=causal)[:2]
    else:
        G = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, is_causal=causal)
    return out, lse.reshape(q.shape[:3]).float()


def matmul_f32(a, b):
    """a (N, M, K) @ b (N, K, P) -> float32 (N, M, P). On a GPU 16-bit inputs are multiplied with
    float32 output, not rounded to 16 bits first (logits and attention scores need the digits)."""
    if a.is_cuda and a.dtype != torch.float32:
        return torch.bmm(a, b, out_dtype=torch.float32)
    return (a @ b).float()


def scores_f32(q, k):
    """q (B, H_kv, G, D) @ k (B, H_kv, S, D)ᵀ -> (B, H_kv, G, S) in float32, scaled by 1/sqrt(D)."""
    B, Hkv, G, D = q.shape
    s = matmul_f32(q.reshape(B * Hkv, G, D), k.reshape(B * Hkv, -1, D).transpose(1, 2))
    return s.view(B, Hkv, G, -1) * D ** -0.5


def merge_lse(outs, lses):
    """Attention over the union of disjoint key sets from each set's (out, lse): outs (W, ..., D),
    lses (W, ...) -> (..., D)."""
    return ((lses - lses.logsumexp(0)).exp()[..., None] * outs).sum(0)


def decode_attention(q, k, v, visible):
    """One query token per sequence against a static cache, with no host sync (graph-safe).

    q (B, H, 1, D); k, v (B, H_kv, S_max, D); visible: bool (S_max,), True for the live slots.
    The plain matmul form reads the cache once at near copy bandwidth; SDPA with a mask does not.
    """
    B, H, _, D = q.shape
    Hkv = k.shape[1]
    s = scores_f32(q.view(B, Hkv, H // Hkv, D), k)  # a KV head's query group as rows
    s = s.masked_fill(~visible, float("-inf"))
    return (s.softmax(-1).to(v.dtype) @ v).view(B, H, 1, D)
