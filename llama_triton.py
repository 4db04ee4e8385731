"""Triton kernels for the GPU: one launch where plain PyTorch needs five to twenty.

Decoding one token is launch-bound (engine_notes.md §2.11): inside a CUDA graph every kernel
costs ~2-3 µs however little it does, and a Llama layer written with PyTorch ops launches ~50.
These kernels bring a decode layer to 10 launches: the four projections as GEMVs, residual add +
RMSNorm (twice), rotary q/k, split-KV attention that also stores the new K/V, its merge, SiLU·up.
model.py uses them for CUDA tensors when Triton imports and falls back to its own PyTorch code
otherwise; tests/test_llama_triton.py checks each against that code on a GPU. The module's name is one
no PyPI package uses, and model.py checks KERNELS_FOR before it trusts a module of that name.
"""

from functools import cache

import torch
import triton
import triton.language as tl

KERNELS_FOR = "model.py"


def supports(head_dim):
    """Head sizes the attention kernels take: tl.dot needs a power of two of at least 16."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


@cache
def sm_count(device):
    return torch.cuda.get_device_properties(device).multi_processor_count


@triton.jit
def _rms_norm(x_ptr, delta_ptr, w_ptr, out_ptr, n_cols, eps, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0)
    if HAS_DELTA:  # the residual add of the sublayer before, in place
        x += tl.load(delta_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(x_ptr + row * n_cols + cols, x, mask=mask)
    x = x * tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask)
    tl.store(out_ptr + row * n_cols + cols, x.to(w.dtype) * w, mask=mask)


def rms_norm(x, weight, eps, delta=None):
    """RMSNorm of float32 rows x (..., dim), contiguous -> the weights' dtype. With `delta`
    (same shape, contiguous), x += delta first, in place: one kernel for the residual add and the norm."""
    out = torch.empty(x.shape, device=x.device, dtype=weight.dtype)
    n = x.shape[-1]
    _rms_norm[(x.numel() // n,)](x, x if delta is None else delta, weight, out, n, eps, HAS_DELTA=delta is not None,
                                 BLOCK=triton.next_power_of_2(n))
    return out


@triton.jit
def _rotary(qkv_ptr, cos_ptr, sin_ptr, out_ptr, qkv_stride, heads, HALF: tl.constexpr):
    row, head = tl.program_id(0).to(tl.int64), tl.program_id(1)
    i = tl.arange(0, HALF)
    src = qkv_ptr + row * qkv_stride + head * 2 * HALF
    x1 = tl.load(src + i).to(tl.float32)
    x2 = tl.load(src + HALF + i).to(tl.float32)
    c = tl.load(cos_ptr + row * HALF + i)
    s = tl.load(sin_ptr + row * HALF + i)
    dst = out_ptr + (row * heads + head) * 2 * HALF
    tl.store(dst + i, (x1 * c - x2 * s).to(out_ptr.dtype.element_ty))
    tl.store(dst + HALF + i, (x2 * c + x1 * s).to(out_ptr.dtype.element_ty))


def rotary(qkv, cos, sin, n_heads, n_kv_heads, head_dim):
    """Rotate the q and k heads of qkv (B, T, (H + 2 H_kv) D) by cos/sin (B, 1, T, D/2) float32.

    Returns q (B, H, T, D) and k (B, H_kv, T, D), views of one new buffer (B, T, H + H_kv, D).
    """
    B, T, _ = qkv.shape
    heads = n_heads + n_kv_heads
    out = torch.empty(B, T, heads, head_dim, device=qkv.device, dtype=qkv.dtype)
    _rotary[(B * T, heads)](qkv, cos.contiguous(), sin.contiguous(), out, qkv.stride(1), heads,
                            HALF=head_dim // 2)
    return out[:, :, :n_heads].transpose(1, 2), out[:, :, n_heads:].transpose(1, 2)


@triton.jit
def _silu_mul(gate_up_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):
    row, block = tl.program_id(0).to(tl.int64), tl.program_id(1)
    cols = block * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(gate_up_ptr + row * 2 * n_cols + cols, mask=mask).to(tl.float32)
    up = tl.load(gate_up_ptr + row * 2 * n_cols + n_cols + cols, mask=mask).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, (gate * tl.sigmoid(gate) * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate_up):
    """silu(gate) * up for gate_up (..., 2F) contiguous -> (..., F)."""
    F = gate_up.shape[-1] // 2
    out = torch.empty(*gate_up.shape[:-1], F, device=gate_up.device, dtype=gate_up.dtype)
    rows, block = gate_up.numel() // (2 * F), 1024
    _silu_mul[(rows, triton.cdiv(F, block))](gate_up, out, F, BLOCK=block)
    return out


@triton.jit
def _gemv(x_ptr, w_ptr, b_ptr, out_ptr, K, HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program n: out[n] = w[n] · x (+ b[n]), accumulated in float32."""
    n = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_K], tl.float32)
    for k in range(0, K, BLOCK_K):
        mask = k + cols < K
        w = tl.load(w_ptr + n * K + k + cols, mask=mask, other=0.0)
        acc += w.to(tl.float32) * tl.load(x_ptr + k + cols, mask=mask, other=0.0).to(tl.float32)
    out = tl.sum(acc, axis=0)
    if HAS_BIAS:
        out += tl.load(b_ptr + n).to(tl.float32)
    tl.store(out_ptr + n, out.to(out_ptr.dtype.element_ty))


def gemv(x, weight, bias=None):
    """x (..., K) holding one row, contiguous; weight (N, K) contiguous -> x @ weightᵀ + bias (..., N).

    One program per output row. At batch 1 it beats cuBLAS on every projection measured ([H100] in
    CUDA graphs: SmolLM2's 576×1536 down projection 2.9 µs against 5.1 µs, Llama-3-8B's 4096×4096
    13.5 against 16.5 µs and its 28672×4096 gate/up 78 against 87 µs, 3.0 TB/s).
    """
    N, K = weight.shape
    out = torch.empty(*x.shape[:-1], N, device=x.device, dtype=x.dtype)
    _gemv[(N,)](x, weight, weight if bias is None else bias, out, K, HAS_BIAS=bias is not None, BLOCK_K=512,
                num_warps=4)
    return out


@triton.jit
def _decode_attention_split(q_ptr, q_stride_b, q_stride_h, k_ptr, k_stride_b, k_stride_h, v_ptr, v_stride_b,
                            v_stride_h, n_kv_heads, k_cache, v_cache, lens_ptr, capacity, split, acc_ptr, m_ptr, l_ptr,
                            scale, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                            PRECISION: tl.constexpr):
    """Program (b·h_kv, s): the G query heads of one KV head over keys [s·split, (s+1)·split) ∩ live.

    The live keys are the `lens` cached ones and the new token's, which counts as key `lens`: it
    comes from k/v, and the program whose part holds that slot writes it to the cache (no program
    reads the slot from the cache in this launch). Writes the unnormalised output, the running
    max and the sum of exponentials of its part.
    """
    bh, part = tl.program_id(0).to(tl.int64), tl.program_id(1)
    n_parts = tl.num_programs(1)
    g, d = tl.arange(0, G_PAD), tl.arange(0, D)
    b, h = bh // n_kv_heads, bh % n_kv_heads
    heads = q_ptr + b * q_stride_b + (h * G + g[:, None]) * q_stride_h + d[None, :]
    q = tl.load(heads, mask=g[:, None] < G, other=0.0)
    k_new = tl.load(k_ptr + b * k_stride_b + h * k_stride_h + d)
    v_new = tl.load(v_ptr + b * v_stride_b + h * v_stride_h + d)
    new = tl.load(lens_ptr)
    start = part * split
    end = tl.minimum(start + split, new + 1)
    base = bh * capacity * D
    if (start <= new) & (new < start + split):
        tl.store(k_cache + base + new * D + d, k_new)
        tl.store(v_cache + base + new * D + d, v_new)
    m = tl.full([G_PAD], float("-inf"), tl.float32)
    l = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    for n in range(start, end, BLOCK_N):  # parts past the live length run no iteration
        keys = n + tl.arange(0, BLOCK_N)
        cached, is_new = (keys < new)[:, None], (keys == new)[:, None]
        k = tl.load(k_cache + base + keys[:, None] * D + d[None, :], mask=cached, other=0.0)
        k = tl.where(is_new, k_new[None, :], k)
        s = tl.where(keys[None, :] < end, tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: every block has a live key
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        v = tl.load(v_cache + base + keys[:, None] * D + d[None, :], mask=cached, other=0.0)
        v = tl.where(is_new, v_new[None, :], v)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        l = l * alpha + tl.sum(p, axis=1)
        m = m_new
    out = (bh * G + g) * n_parts + part
    tl.store(acc_ptr + out[:, None] * D + d[None, :], acc, mask=g[:, None] < G)
    tl.store(m_ptr + out, m, mask=g < G)
    tl.store(l_ptr + out, l, mask=g < G)


@triton.jit
def _decode_attention_merge(acc_ptr, m_ptr, l_ptr, out_ptr, lens_ptr, N_PARTS: tl.constexpr, D: tl.constexpr):
    """Program (b·h): the log-sum-exp merge of its parts; empty parts have m = -inf, weight 0.
    Program 0 then counts the new token in: nothing reads the length after the split kernel."""
    head = tl.program_id(0).to(tl.int64)
    parts, d = tl.arange(0, N_PARTS), tl.arange(0, D)
    m = tl.load(m_ptr + head * N_PARTS + parts)
    l = tl.load(l_ptr + head * N_PARTS + parts)
    acc = tl.load(acc_ptr + (head * N_PARTS + parts)[:, None] * D + d[None, :])
    top = tl.max(m, axis=0)
    w = tl.where(m > float("-inf"), tl.exp(m - top), 0.0)
    o = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    tl.store(out_ptr + head * D + d, o.to(out_ptr.dtype.element_ty))
    if head == 0:
        tl.store(lens_ptr, tl.load(lens_ptr) + 1)


def decode_attend(q, k, v, k_cache, v_cache, length):
    """Append one token per sequence to the caches and attend to everything cached, in two
    launches: split-KV attention (flash-decoding) that also stores the token, and the merge.

    q (B, H, 1, D), k and v (B, H_kv, 1, D), each with a unit stride in D; caches (B, H_kv,
    capacity, D); length: 0-dim device tensor of live entries, where the token goes and which
    it is advanced by one. Keys are split into parts so that every SM has work at batch 1; parts
    past the live length exit at once, so one captured graph serves every length.
    """
    B, H, _, D = q.shape
    Hkv, capacity = k_cache.shape[1], k_cache.shape[2]
    G = H // Hkv
    # [H200] a sweep of the launch (blocks of 32-128 keys, 16-128 parts, 2-8 warps, 1-3 stages) at
    # 8K and 128K keys: 8B's D = 128 fastest in blocks of 32 keys, SmolLM2's D = 64 in blocks of 64
    # with 128 parts; 16 keys a warp and 3 stages served both lengths.
    n_parts = min(128, triton.next_power_of_2(triton.cdiv(2 * sm_count(q.device), B * Hkv)))
    block_n = 32 if D >= 128 else 64
    split = triton.cdiv(triton.cdiv(capacity, n_parts), block_n) * block_n
    acc = torch.empty(B * H * n_parts, D, device=q.device, dtype=torch.float32)
    m = torch.empty(B * H * n_parts, device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    _decode_attention_split[(B * Hkv, n_parts)](q, q.stride(0), q.stride(1), k, k.stride(0), k.stride(1), v,
                                                v.stride(0), v.stride(1), Hkv, k_cache, v_cache, length, capacity,
                                                split, acc, m, l, D ** -0.5, G=G,
                                                G_PAD=max(16, triton.next_power_of_2(G)), D=D, BLOCK_N=block_n,
                                                PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                                                num_warps=block_n // 16, num_stages=3)
    out = torch.empty(B, H, 1, D, device=q.device, dtype=q.dtype)
    _decode_attention_merge[(B * H,)](acc, m, l, out, length, N_PARTS=n_parts, D=D)
    return out
