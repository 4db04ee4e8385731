"""Triton kernels for the GPU: one launch where plain PyTorch needs five to twenty.

Decoding one token is launch-bound (engine_notes.md §2.11): inside a CUDA graph every kernel
costs ~2-3 µs however little it does, and a Llama layer written with PyTorch ops launches ~50.
These kernels bring a decode layer to 6 launches: GEMVs that carry the work around them (RMSNorm
and RoPE in the q/k/v projection, RMSNorm and SiLU·up in gate/up, the residual adds in the o and
down projections) and split-KV attention that also stores the new K/V, with its merge. On Hopper
they launch as programmatic dependents (dependent_launch): each starts while the one before runs
and reads its weights or cached keys before it waits, so the ~2 µs gaps between them shrink. The
greedy token comes from a split argmax (a part of the row a program, then their merge). Prefill
uses the others (RMSNorm with the residual add, rotary, SiLU·up) around cuBLAS's GEMMs.
model.py uses them for CUDA tensors when Triton imports and falls back to its own PyTorch code
otherwise; tests/test_llama_triton.py checks each against that code on a GPU. The module's name is one
no PyPI package uses, and model.py checks KERNELS_FOR before it trusts a module of that name.
"""

from functools import cache

import torch
import triton
import triton.language as tl

KERNELS_FOR = "model.py"
SHORT_K = 2048  # a one-token GEMV over at most this many inputs reads each weight row in one step
MERGE_BLOCK_D = 32  # dims a program of the split attention's merge combines
ARGMAX_PARTS = 128  # programs a row of logits is split over: about one an SM


def supports(head_dim):
    """Head sizes the attention kernels take: tl.dot needs a power of two of at least 16."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


@cache
def sm_count(device):
    return torch.cuda.get_device_properties(device).multi_processor_count


@cache
def dependent_launch(device):
    """Whether the decode kernels launch as programmatic dependents (Hopper on): each lets the
    next one start as soon as all its programs run, and reads what the kernel before it writes
    only after tl.extra.cuda.gdc_wait(), which returns once that kernel has finished (and with it
    every kernel before). Before the wait a kernel reads only what no kernel of the same forward
    writes: weights, and in attention its layer's cache below the live length and the length
    itself, written by that layer's attention in an earlier forward, which the PyTorch kernels
    that begin every forward (the embedding) waited for. The launch overlaps the kernel before."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


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
def _rope(positions_ptr, inv_freq_ptr, cos_ptr, sin_ptr, scale, HALF: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, HALF)
    angle = tl.load(positions_ptr + t).to(tl.float64) * tl.load(inv_freq_ptr + i)
    tl.store(cos_ptr + t * HALF + i, (tl.cos(angle) * scale).to(tl.float32))
    tl.store(sin_ptr + t * HALF + i, (tl.sin(angle) * scale).to(tl.float32))


def rope(positions, inv_freq, scale):
    """cos, sin (B, 1, T, D/2) float32 of the angles positions (B, T) × inv_freq (D/2,) float64,
    formed and turned in float64 and scaled by `scale` (YaRN's temperature, rounded to float32):
    one kernel where PyTorch needs eight, each decode step."""
    B, T = positions.shape
    half = inv_freq.shape[0]
    cos = torch.empty(B, 1, T, half, device=positions.device, dtype=torch.float32)
    sin = torch.empty_like(cos)
    _rope[(B * T,)](positions.contiguous(), inv_freq, cos, sin, scale, HALF=half)
    return cos, sin


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
def _argmax_parts(x_ptr, value_ptr, index_ptr, n_cols, part_cols, BLOCK: tl.constexpr):
    """Program (row, part): the largest value of x[row] in columns [part·part_cols, (part+1)·part_cols)
    and the first column holding it (-inf and 0 for a part past the row's end)."""
    row, part, n_parts = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.num_programs(1)
    cols = tl.arange(0, BLOCK)
    start = part * part_cols
    stop = tl.minimum(start + part_cols, n_cols)
    best, best_at = tl.full([], float("-inf"), tl.float32), tl.full([], 0, tl.int32)
    for block in range(start, stop, BLOCK):
        x = tl.load(x_ptr + row * n_cols + block + cols, mask=block + cols < stop, other=float("-inf"))
        top = tl.max(x, axis=0)
        at = block + tl.argmax(x, axis=0)  # the first of equal values, as torch.argmax
        best_at = tl.where(top > best, at, best_at)
        best = tl.maximum(best, top)
    tl.store(value_ptr + row * n_parts + part, best)
    tl.store(index_ptr + row * n_parts + part, best_at)


@triton.jit
def _argmax_merge(value_ptr, index_ptr, out_ptr, N_PARTS: tl.constexpr):
    """Program row: the first column of the row's largest value, from its parts'."""
    row = tl.program_id(0).to(tl.int64)
    parts = row * N_PARTS + tl.arange(0, N_PARTS)
    value, index = tl.load(value_ptr + parts), tl.load(index_ptr + parts)
    top = tl.max(value, axis=0)
    tl.store(out_ptr + row, tl.min(tl.where(value == top, index, 2 ** 31 - 1), axis=0))


def argmax(x):
    """Index of the largest value of each row of x (B, V) float32 contiguous -> (B,) int64, the first
    of equal ones: ARGMAX_PARTS programs a row, then one merging them. [H100] One program a row took
    25 µs for Qwen2.5's 151,936 logits each decode step (PyTorch's reduction 13 µs for SmolLM2's 49K
    on an H200, 36 µs for Llama-3's 128K): a row is too short to keep one SM's loads in flight."""
    B, V = x.shape
    part_cols = triton.cdiv(V, ARGMAX_PARTS)
    value = torch.empty(B, ARGMAX_PARTS, device=x.device, dtype=torch.float32)
    index = torch.empty(B, ARGMAX_PARTS, device=x.device, dtype=torch.int32)
    _argmax_parts[(B, ARGMAX_PARTS)](x, value, index, V, part_cols, BLOCK=min(4096, triton.next_power_of_2(part_cols)),
                                     num_warps=4)
    out = torch.empty(B, device=x.device, dtype=torch.int64)
    _argmax_merge[(B,)](value, index, out, N_PARTS=ARGMAX_PARTS, num_warps=4)
    return out


@triton.jit
def _x_tile(x_ptr, norm_ptr, k, cols, K, NORM: tl.constexpr):
    """x at inputs [k, k + BLOCK_K) ∩ [0, K) in float32 (scaled by the norm weight when NORM) and its squares."""
    in_k = k + cols < K
    x = tl.load(x_ptr + k + cols, mask=in_k, other=0.0).to(tl.float32)
    squares = x * x
    if NORM:
        x *= tl.load(norm_ptr + k + cols, mask=in_k, other=0.0).to(tl.float32)
    return x, squares


@triton.jit
def _weight_rows(w_ptr, row, k, cols, K, live, HALF: tl.constexpr, PAIRED: tl.constexpr):
    """The weight tile of rows `row` (and row + HALF when paired) at inputs [k, k + BLOCK_K) ∩ [0, K)."""
    mask = live[:, None] & (k + cols < K)[None, :]
    w = tl.load(w_ptr + row[:, None] * K + k + cols[None, :], mask=mask, other=0.0)
    w2 = w
    if PAIRED:
        w2 = tl.load(w_ptr + (row + HALF)[:, None] * K + k + cols[None, :], mask=mask, other=0.0)
    return w, w2


@triton.jit
def _gemv(x_ptr, w_ptr, b_ptr, norm_ptr, cos_ptr, sin_ptr, out_ptr, n_out, K, eps, rotated_rows,
          HALF: tl.constexpr, NORM: tl.constexpr, HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr,
          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ONE_STEP: tl.constexpr, PDL: tl.constexpr):
    """Program p: outputs [p·BLOCK_N, (p+1)·BLOCK_N) of one row x (K,) times w (N, K)ᵀ, in float32.

    NORM: x is the float32 residual stream and the product is that of its RMSNorm, whose weight
    scales x and whose 1/rms scales the sums (the same value as the norm's, without rounding it
    to the weights' dtype first). Epilogues: "residual" adds the outputs to out in place; "rotary"
    and "silu" pair output i with i + HALF, each program computing both rows: "rotary" rotates the
    pairs of rows below rotated_rows by cos/sin (HALF = D/2, outputs in heads of D), "silu" stores
    silu(row i) · row i + HALF (HALF = the FFN size). ONE_STEP (K ≤ BLOCK_K) with PDL: the weights
    are read before the wait for the kernel before (see dependent_launch); a longer row waits first.
    """
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    i = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    live = i < n_out
    PAIRED: tl.constexpr = EPILOGUE == "rotary" or EPILOGUE == "silu"
    if PAIRED:
        row = i // HALF * 2 * HALF + i % HALF
    else:
        row = i
    cols = tl.arange(0, BLOCK_K)
    if ONE_STEP:
        w, w2 = _weight_rows(w_ptr, row, 0, cols, K, live, HALF, PAIRED)
        if PDL:
            tl.extra.cuda.gdc_wait()
        x, squares = _x_tile(x_ptr, norm_ptr, 0, cols, K, NORM)
        acc = w.to(tl.float32) * x[None, :]
        acc2 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)  # rows + HALF, when paired
        if PAIRED:
            acc2 += w2.to(tl.float32) * x[None, :]
    else:
        if PDL:
            tl.extra.cuda.gdc_wait()
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        acc2 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)  # rows + HALF, when paired
        squares = tl.zeros([BLOCK_K], tl.float32)
        for k in range(0, K, BLOCK_K):
            x, x2 = _x_tile(x_ptr, norm_ptr, k, cols, K, NORM)
            w, w2 = _weight_rows(w_ptr, row, k, cols, K, live, HALF, PAIRED)
            squares += x2
            acc += w.to(tl.float32) * x[None, :]
            if PAIRED:
                acc2 += w2.to(tl.float32) * x[None, :]
    y, y2 = tl.sum(acc, axis=1), tl.sum(acc2, axis=1)
    if NORM:
        scale = tl.rsqrt(tl.sum(squares, axis=0) / K + eps)
        y, y2 = y * scale, y2 * scale
    if HAS_BIAS:
        y += tl.load(b_ptr + row, mask=live, other=0.0).to(tl.float32)
        if PAIRED:
            y2 += tl.load(b_ptr + row + HALF, mask=live, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    if EPILOGUE == "residual":
        tl.store(out_ptr + row, tl.load(out_ptr + row, mask=live) + y, mask=live)
    elif EPILOGUE == "rotary":
        rotate = live & (row < rotated_rows)
        c = tl.load(cos_ptr + i % HALF, mask=rotate, other=1.0)
        s = tl.load(sin_ptr + i % HALF, mask=rotate, other=0.0)
        tl.store(out_ptr + row, (y * c - y2 * s).to(dtype), mask=live)
        tl.store(out_ptr + row + HALF, (y2 * c + y * s).to(dtype), mask=live)
    else:
        tl.store(out_ptr + i, (y * tl.sigmoid(y) * y2).to(dtype), mask=live)


def gemv_launch(epilogue, K):
    """(outputs a program, keys a step, warps) of a one-token GEMV over K inputs.

    [H200] From a sweep that read each launch's weights from memory, as a decode step does
    (results/gemv_sweep_h200.json; a sweep on weights left in L2 chose settings slower in the step):
    SmolLM2's K of 576 and 1536 in one step, the 8B shape's 4096 and 14336 in short ones.
    """
    if K <= SHORT_K:
        k = triton.next_power_of_2(K)
        return {"rotary": (1, k, 4), "silu": (2, k, 2), "residual": (2, k, max(2, k // 256))}[epilogue]
    return {"rotary": (1, 256, 2), "silu": (1, 512, 2), "residual": (4, 1024, 2)}[epilogue]


def _launch_gemv(x, weight, bias, out, n_out, epilogue, norm=None, eps=0.0, cos=None, sin=None, rotated_rows=0,
                 half=1):
    block_n, block_k, warps = gemv_launch(epilogue, weight.shape[1])
    pdl = dependent_launch(x.device)
    _gemv[(triton.cdiv(n_out, block_n),)](
        x, weight, weight if bias is None else bias, weight if norm is None else norm, x if cos is None else cos,
        x if sin is None else sin, out, n_out, weight.shape[1], eps, rotated_rows, HALF=half, NORM=norm is not None,
        HAS_BIAS=bias is not None, EPILOGUE=epilogue, BLOCK_N=block_n, BLOCK_K=block_k,
        ONE_STEP=weight.shape[1] <= block_k, PDL=pdl, num_warps=warps, launch_pdl=pdl)
    return out


def norm_rotary_gemv(x, norm, eps, weight, bias, cos, sin, rotated_heads, head_dim):
    """The q/k/v projection of one token: RMSNorm of x (1, 1, K) float32 by `norm`, times weight
    (N, K)ᵀ (+ bias), and RoPE by cos/sin (D/2 float32 each) on the first rotated_heads heads of D
    (q and k; v follows unrotated). -> (1, 1, N) in the weights' dtype."""
    N = weight.shape[0]
    out = torch.empty(1, 1, N, device=x.device, dtype=weight.dtype)
    return _launch_gemv(x, weight, bias, out, N // 2, "rotary", norm, eps, cos, sin, rotated_heads * head_dim,
                        head_dim // 2)


def norm_silu_gemv(x, norm, eps, weight):
    """The MLP's first half for one token: silu(gate) · up of RMSNorm(x) times weight = [gate; up]
    (2F, K)ᵀ; x (1, 1, K) float32 -> (1, 1, F) in the weights' dtype."""
    F = weight.shape[0] // 2
    out = torch.empty(1, 1, F, device=x.device, dtype=weight.dtype)
    return _launch_gemv(x, weight, None, out, F, "silu", norm, eps, half=F)


def residual_gemv(x, weight, bias, residual):
    """residual += x @ weightᵀ (+ bias) for one token: x (K,) contiguous, residual (N,) float32."""
    _launch_gemv(x, weight, bias, residual, weight.shape[0], "residual")


@triton.jit
def _cached_block(k_cache, v_cache, base, keys, stop, D: tl.constexpr):
    """K and V of the cached `keys` below `stop` (zeros elsewhere): (BLOCK_N, D) each."""
    d, cached = tl.arange(0, D), (keys < stop)[:, None]
    k = tl.load(k_cache + base + keys[:, None] * D + d[None, :], mask=cached, other=0.0)
    v = tl.load(v_cache + base + keys[:, None] * D + d[None, :], mask=cached, other=0.0)
    return k, v


@triton.jit
def _attend_block(q, k, v, k_new, v_new, keys, new, end, scale, m, l, acc, PRECISION: tl.constexpr):
    """Online softmax of q over one block of `keys` (those below `end` live; key `new` is k_new/v_new):
    the running max m, sum of exponentials l and unnormalised output acc, updated."""
    is_new = (keys == new)[:, None]
    k = tl.where(is_new, k_new[None, :], k)
    s = tl.where(keys[None, :] < end, tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: every block has a live key
    p = tl.exp(s - m_new[:, None])
    alpha = tl.exp(m - m_new)
    v = tl.where(is_new, v_new[None, :], v)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l * alpha + tl.sum(p, axis=1), acc


@triton.jit
def _decode_attention_split(q_ptr, q_stride_b, q_stride_h, k_ptr, k_stride_b, k_stride_h, v_ptr, v_stride_b,
                            v_stride_h, n_kv_heads, k_cache, v_cache, lens_ptr, capacity, split, acc_ptr, m_ptr, l_ptr,
                            scale, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                            PRECISION: tl.constexpr, PDL: tl.constexpr):
    """Program (b·h_kv, s): the G query heads of one KV head over keys [s·split, (s+1)·split) ∩ live.

    The live keys are the `lens` cached ones and the new token's, which counts as key `lens`: it
    comes from k/v, and the program whose part holds that slot writes it to the cache (no program
    reads the slot from the cache in this launch). Writes the unnormalised output, the running
    max and the sum of exponentials of its part. PDL: the first block of cached keys is read
    before the wait for the kernel before (see dependent_launch).
    """
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    bh, part = tl.program_id(0).to(tl.int64), tl.program_id(1)
    n_parts = tl.num_programs(1)
    g, d = tl.arange(0, G_PAD), tl.arange(0, D)
    b, h = bh // n_kv_heads, bh % n_kv_heads
    new = tl.load(lens_ptr)
    start = part * split
    stop, end = tl.minimum(start + split, new), tl.minimum(start + split, new + 1)  # cached keys, live keys
    base = bh * capacity * D
    keys = start + tl.arange(0, BLOCK_N)
    k, v = _cached_block(k_cache, v_cache, base, keys, stop, D)
    if PDL:
        tl.extra.cuda.gdc_wait()
    heads = q_ptr + b * q_stride_b + (h * G + g[:, None]) * q_stride_h + d[None, :]
    q = tl.load(heads, mask=g[:, None] < G, other=0.0)
    k_new = tl.load(k_ptr + b * k_stride_b + h * k_stride_h + d)
    v_new = tl.load(v_ptr + b * v_stride_b + h * v_stride_h + d)
    if (start <= new) & (new < start + split):
        tl.store(k_cache + base + new * D + d, k_new)
        tl.store(v_cache + base + new * D + d, v_new)
    m = tl.full([G_PAD], float("-inf"), tl.float32)
    l = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    if start < end:  # parts past the live length have no keys
        m, l, acc = _attend_block(q, k, v, k_new, v_new, keys, new, end, scale, m, l, acc, PRECISION)
    for n in range(start + BLOCK_N, end, BLOCK_N):
        block = n + tl.arange(0, BLOCK_N)
        k, v = _cached_block(k_cache, v_cache, base, block, stop, D)
        m, l, acc = _attend_block(q, k, v, k_new, v_new, block, new, end, scale, m, l, acc, PRECISION)
    out = (bh * G + g) * n_parts + part
    tl.store(acc_ptr + out[:, None] * D + d[None, :], acc, mask=g[:, None] < G)
    tl.store(m_ptr + out, m, mask=g < G)
    tl.store(l_ptr + out, l, mask=g < G)


@triton.jit
def _decode_attention_merge(acc_ptr, m_ptr, l_ptr, out_ptr, lens_ptr, N_PARTS: tl.constexpr, D: tl.constexpr,
                            BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    """Program (b·h, j): dims [j·BLOCK_D, (j+1)·BLOCK_D) of the log-sum-exp merge of its parts;
    empty parts have m = -inf, weight 0. Program (0, 0) then counts the new token in: nothing
    reads the length after the split kernel."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    head, block = tl.program_id(0).to(tl.int64), tl.program_id(1)
    parts, d = tl.arange(0, N_PARTS), block * BLOCK_D + tl.arange(0, BLOCK_D)
    m = tl.load(m_ptr + head * N_PARTS + parts)
    l = tl.load(l_ptr + head * N_PARTS + parts)
    acc = tl.load(acc_ptr + (head * N_PARTS + parts)[:, None] * D + d[None, :])
    top = tl.max(m, axis=0)
    w = tl.where(m > float("-inf"), tl.exp(m - top), 0.0)
    o = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    tl.store(out_ptr + head * D + d, o.to(out_ptr.dtype.element_ty))
    if (head == 0) & (block == 0):
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
    pdl = dependent_launch(q.device)
    # [H200] a sweep of the launch (blocks of 32-128 keys, 16-128 parts, 2-8 warps, 1-3 stages) at
    # 8K and 128K keys: 8B's D = 128 fastest in blocks of 32 keys and two programs an SM, SmolLM2's
    # D = 64 in blocks of 64; 16 keys a warp and 3 stages served both lengths. With dependent
    # launch, D = 64 gains from one block a part while there are at most 256 (SmolLM2 at 8K:
    # 0.530 -> 0.481 ms a token, 32K: 0.754 -> 0.670), as the block is read before the wait.
    # [H100] Qwen2.5-1.5B's 2 KV heads at 32K: 256 parts (four programs an SM) and the merge in
    # blocks of 32 dims: 1.826 against 1.939 ms a token with 128 parts merged a head a program
    # (results/decode_sweep_qwen_h100.json).
    if D >= 128:
        block_n, n_parts = 32, min(256, triton.next_power_of_2(triton.cdiv(2 * sm_count(q.device), B * Hkv)))
    else:
        block_n = 64
        n_parts = min(256, triton.next_power_of_2(triton.cdiv(capacity, block_n)))
    split = triton.cdiv(triton.cdiv(capacity, n_parts), block_n) * block_n
    acc = torch.empty(B * H * n_parts, D, device=q.device, dtype=torch.float32)
    m = torch.empty(B * H * n_parts, device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    _decode_attention_split[(B * Hkv, n_parts)](q, q.stride(0), q.stride(1), k, k.stride(0), k.stride(1), v,
                                                v.stride(0), v.stride(1), Hkv, k_cache, v_cache, length, capacity,
                                                split, acc, m, l, D ** -0.5, G=G,
                                                G_PAD=max(16, triton.next_power_of_2(G)), D=D, BLOCK_N=block_n,
                                                PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                                                PDL=pdl, num_warps=block_n // 16, num_stages=3, launch_pdl=pdl)
    out = torch.empty(B, H, 1, D, device=q.device, dtype=q.dtype)
    block_d = min(D, MERGE_BLOCK_D)
    _decode_attention_merge[(B * H, D // block_d)](acc, m, l, out, length, N_PARTS=n_parts, D=D, BLOCK_D=block_d,
                                                   PDL=pdl, num_warps=2, launch_pdl=pdl)
    return out
