"""llama_triton.py on a GPU: each Triton kernel against model.py's PyTorch code on fresh random inputs,
and the whole CUDA model (kernels, SDPA, cuBLAS) in float32 against the float64 reference.

Skipped without CUDA and Triton (CI); run on the GPU machine.
"""

import pytest
import torch
import torch.nn.functional as F

import attention
import model
import rope
from checkpoint import load_model
from reference import ref_forward, ref_rmsnorm, rel_err
from conftest import hf_config, random_tensors, write_checkpoint
from test_model import CONFIGS, YARN, Case, usable_length

kernels = pytest.importorskip("llama_triton") if torch.cuda.is_available() else None
pytestmark = pytest.mark.skipif(kernels is None, reason="needs a CUDA GPU and Triton")
DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, dim", [(1, 576), (7, 4096), (3, 100)])
@pytest.mark.parametrize("with_delta", [False, True])
def test_rms_norm(dtype, rows, dim, with_delta):
    """Normalised rows in the weights' dtype; with a delta, the residual stream is updated in place first."""
    x = torch.randn(rows, dim, device="cuda") * 3
    delta = (torch.randn(rows, dim, device="cuda") * 3).to(dtype) if with_delta else None
    weight = torch.empty(dim, device="cuda", dtype=dtype).normal_(1, 0.2)
    updated = x + delta if with_delta else x.clone()
    expected = weight * (updated * torch.rsqrt(updated.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    assert rel_err(kernels.rms_norm(x, weight, 1e-5, delta), expected) <= TOL[dtype]
    assert rel_err(x, updated) <= 1e-7


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, T, H, Hkv, D", [(1, 1, 32, 8, 128), (2, 5, 9, 3, 64), (1, 3, 4, 4, 16)])
def test_rotary(dtype, B, T, H, Hkv, D):
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D, device="cuda", dtype=dtype)
    angles = torch.rand(B, 1, T, D // 2, device="cuda") * 1000
    q, k = kernels.rotary(qkv, angles.cos(), angles.sin(), H, Hkv, D)
    q_ref = rope.apply_rope(qkv[..., :H * D].view(B, T, H, D).transpose(1, 2), angles.cos(), angles.sin())
    k_ref = rope.apply_rope(qkv[..., H * D:(H + Hkv) * D].view(B, T, Hkv, D).transpose(1, 2), angles.cos(), angles.sin())
    assert q.shape == q_ref.shape and k.shape == k_ref.shape
    assert rel_err(q, q_ref) <= TOL[dtype] and rel_err(k, k_ref) <= TOL[dtype]


@pytest.mark.parametrize("B, T, D", [(1, 1, 128), (2, 7, 64), (1, 300, 16)])
@pytest.mark.parametrize("scale", [1.0, 1.1386])
def test_rope(B, T, D, scale):
    """cos/sin against float64 angles turned in float64, at positions to 5e5 (where float32 angles
    drift by 0.03 rad): within float32's rounding, the scale's own rounding to float32 included."""
    positions = torch.randint(0, 500_000, (B, T), device="cuda")
    inv_freq = 1.0 / 1e6 ** (torch.arange(0, D, 2, dtype=torch.float64, device="cuda") / D)
    cos, sin = kernels.rope(positions, inv_freq, scale)
    angles = positions[:, None, :, None].double() * inv_freq
    assert cos.shape == sin.shape == (B, 1, T, D // 2) and cos.dtype == torch.float32
    assert (cos.double() - angles.cos() * scale).abs().max() <= 2e-7
    assert (sin.double() - angles.sin() * scale).abs().max() <= 2e-7


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H, Hkv, D, dim, bias", [(32, 8, 128, 4096, False), (9, 3, 64, 576, True),
                                                  (4, 2, 16, 1000, True), (12, 2, 128, 1536, True)])
@pytest.mark.parametrize("temperature", [1.0, 1.1386])  # YaRN's at factor 4 scales cos and sin
def test_norm_rotary_gemv(dtype, H, Hkv, D, dim, bias, temperature):
    """One token's q/k/v: RMSNorm, projection (+ bias) and RoPE of the q and k heads by cos/sin as
    the forward gives them (scaled by YaRN's temperature), against float64; v is neither rotated nor scaled."""
    N = (H + 2 * Hkv) * D
    x = torch.randn(1, 1, dim, device="cuda") * 3
    norm = torch.empty(dim, device="cuda", dtype=dtype).normal_(1, 0.2)
    weight = (torch.randn(N, dim, device="cuda") / dim ** 0.5).to(dtype)
    b = torch.randn(N, device="cuda", dtype=dtype) if bias else None
    angles = torch.rand(D // 2, device="cuda", dtype=torch.float64) * 1000
    cos, sin = (angles.cos() * temperature).float(), (angles.sin() * temperature).float()
    y = (ref_rmsnorm(x.double(), norm.double(), 1e-5) @ weight.double().t()).view(-1, D)
    if bias:
        y += b.double().view(-1, D)
    y1, y2 = y[:H + Hkv].chunk(2, dim=-1)
    c, s = angles.cos() * temperature, angles.sin() * temperature
    expected = torch.cat([torch.cat([y1 * c - y2 * s, y2 * c + y1 * s], dim=-1), y[H + Hkv:]]).view(1, 1, N)
    out = kernels.norm_rotary_gemv(x, norm, 1e-5, weight, b, cos, sin, H + Hkv, D)
    assert out.dtype == dtype and rel_err(out, expected) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim, ffn", [(4096, 14336), (576, 1536), (100, 77)])
def test_norm_silu_gemv(dtype, dim, ffn):
    """The MLP's first half for one token, silu(gate) · up of the normed row, against float64."""
    x = torch.randn(1, 1, dim, device="cuda") * 3
    norm = torch.empty(dim, device="cuda", dtype=dtype).normal_(1, 0.2)
    weight = (torch.randn(2 * ffn, dim, device="cuda") / dim ** 0.5).to(dtype)
    gate, up = (ref_rmsnorm(x.double(), norm.double(), 1e-5) @ weight.double().t()).chunk(2, dim=-1)
    out = kernels.norm_silu_gemv(x, norm, 1e-5, weight)
    assert out.dtype == dtype and rel_err(out, F.silu(gate) * up) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, K, bias", [(4096, 14336, False), (576, 576, True), (576, 1536, False), (77, 1000, True)])
def test_residual_gemv(dtype, N, K, bias):
    """residual += x Wᵀ + b in place, the residual stream in float32, K not always a multiple of the block."""
    x = torch.randn(K, device="cuda", dtype=dtype)
    weight = (torch.randn(N, K, device="cuda") / K ** 0.5).to(dtype)
    b = torch.randn(N, device="cuda", dtype=dtype) if bias else None
    residual = torch.randn(N, device="cuda")
    expected = residual.double() + x.double() @ weight.double().t() + (b.double() if bias else 0)
    kernels.residual_gemv(x, weight, b, residual)
    assert rel_err(residual, expected) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(dtype):
    gate_up = torch.randn(3, 1, 2 * 1536 + 2 * 7, device="cuda", dtype=dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    assert rel_err(kernels.silu_mul(gate_up), F.silu(gate) * up) <= TOL[dtype]


@pytest.mark.parametrize("B, V", [(1, 49152), (2, 128256), (1, 151936), (3, 5), (1, 16385), (2, 129)])
def test_argmax(B, V):
    """The first index of each row's largest value, as the CPU's argmax finds it; ties within one
    of the kernel's parts and across two neighbouring parts go to the first; a row of -inf but one."""
    x = torch.randn(B, V)
    part = -(-V // kernels.ARGMAX_PARTS)
    x[0, [V // 3, V - 1]] = 50.0
    x[-1, [part, part - 1] if V > part else [1, 0]] = 60.0
    if B > 1:
        x[B // 2] = float("-inf")
        x[B // 2, V - 1] = -1e30
    assert torch.equal(kernels.argmax(x.cuda()).cpu(), x.argmax(-1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H, Hkv, D, capacity, live", [(32, 8, 128, 8192, 8000), (9, 3, 64, 2048, 1),
                                                       (9, 3, 64, 2048, 2048), (4, 4, 16, 256, 77),
                                                       (12, 2, 128, 33024, 32769)])
def test_decode_attend(dtype, H, Hkv, D, capacity, live):
    """One token's K/V stored at `live - 1`, attention over the first `live` keys, the length advanced;
    the cache holds other values past `live`, which must not leak in nor be overwritten."""
    qkv = torch.randn(1, 1, (H + 2 * Hkv) * D, device="cuda", dtype=dtype)
    angles = torch.rand(1, 1, 1, D // 2, device="cuda")
    q, k = kernels.rotary(qkv, angles.cos(), angles.sin(), H, Hkv, D)
    v = qkv[..., (H + Hkv) * D:].view(1, 1, Hkv, D).transpose(1, 2)
    k_cache = torch.randn(1, Hkv, capacity, D, device="cuda", dtype=dtype) * 2
    v_cache = torch.randn_like(k_cache)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    expected_k[:, :, live - 1], expected_v[:, :, live - 1] = k[:, :, 0], v[:, :, 0]
    length = torch.tensor(live - 1, device="cuda")
    out = kernels.decode_attend(q, k, v, k_cache, v_cache, length)
    assert length.item() == live
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
    live = torch.arange(k_cache.shape[2], device="cuda") < length
    assert rel_err(out, attention.decode_attention(q, k_cache, v_cache, live)) <= TOL[dtype]


@pytest.mark.parametrize("B, H, Hkv, D", [(1, 9, 3, 64), (2, 32, 8, 128)])
def test_decode_attend_replays(B, H, Hkv, D):
    """One captured launch serves consecutive tokens: each replay stores its token at the current
    length, attends over it and advances the length by one."""
    capacity, start = 2048, 1000
    q, k, v = (torch.randn(B, heads, 1, D, device="cuda") for heads in (H, Hkv, Hkv))
    k_cache = torch.randn(B, Hkv, capacity, D, device="cuda")
    v_cache = torch.randn_like(k_cache)
    length = torch.tensor(start, device="cuda")
    kernels.decode_attend(q, k, v, k_cache, v_cache, length)  # compiles and allocates before the capture
    length.fill_(start)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kernels.decode_attend(q, k, v, k_cache, v_cache, length)
    for n in range(start, start + 3):
        for t in (q, k, v):
            t.normal_()
        graph.replay()
        assert length.item() == n + 1
        assert torch.equal(k_cache[:, :, n], k[:, :, 0]) and torch.equal(v_cache[:, :, n], v[:, :, 0])
        live = torch.arange(capacity, device="cuda") <= n
        assert rel_err(out, attention.decode_attention(q, k_cache, v_cache, live)) <= TOL[torch.float32]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def gpu_case(request, tmp_path_factory):
    case = Case(request.param, tmp_path_factory)
    case.model = load_model(case.dir, "cuda", torch.float32)
    return case


def test_cuda_model_matches_float64_reference(gpu_case):
    """Prefill of a block, then one token at a time through the Triton decode path, in float32 on
    the GPU: logits equal the float64 reference."""
    case = gpu_case
    T = usable_length(case)
    tokens = case.tokens[:T]
    cache = model.KVCache(case.model.config, 1, T, "cuda", torch.float32)
    with torch.inference_mode():
        hidden = case.model(torch.tensor([tokens[:5]], device="cuda"), torch.arange(5, device="cuda")[None],
                            cache.prefill_attend(0))
        logits = [case.model.logits(hidden)[0]]
        for t in range(5, T):
            hidden = case.model(torch.tensor([[tokens[t]]], device="cuda"), torch.tensor([[t]], device="cuda"),
                                cache.decode_attend)
            logits.append(case.model.logits(hidden)[0])
    ours = torch.cat(logits).cpu()
    assert rel_err(ours, ref_forward(case.w64, case.cfg, tokens, list(range(T)))) <= 1e-5


@pytest.mark.parametrize("scaling", [None, {**YARN, "original_max_position_embeddings": 32768}])
def test_qwen_shape_matches_float64_reference(scaling, tmp_path):
    """Two layers of Qwen2.5-Coder-1.5B's shape (q/k/v biases, 12/2 heads of 128, its vocabulary, an
    untied head), with and without YaRN (factor 4 over its 32,768 positions), in float32: a prefill
    at positions 40,000.., then the fused decode layers token by token, against float64."""
    cfg = {k: v for k, v in hf_config(
        architectures=["Qwen2ForCausalLM"], vocab_size=151936, hidden_size=1536, intermediate_size=8960,
        num_hidden_layers=2, num_attention_heads=12, num_key_value_heads=2, head_dim=128, max_position_embeddings=32768,
        rope_theta=1e6, rms_norm_eps=1e-6, rope_scaling=scaling).items() if k != "attention_bias"}  # as Qwen2's
    tensors = random_tensors(cfg, 0)
    qwen = load_model(write_checkpoint(tmp_path, cfg, tensors), "cuda", torch.float32)
    tokens = torch.randint(0, 151936, (12,), generator=torch.Generator().manual_seed(0)).tolist()
    positions = list(range(40000, 40012))
    cache = model.KVCache(qwen.config, 1, 12, "cuda", torch.float32)
    with torch.inference_mode():
        hidden = qwen(torch.tensor([tokens[:4]], device="cuda"), torch.tensor([positions[:4]], device="cuda"),
                      cache.prefill_attend(0))
        logits = [qwen.logits(hidden)[0]]
        for t in range(4, 12):
            hidden = qwen(torch.tensor([[tokens[t]]], device="cuda"), torch.tensor([[positions[t]]], device="cuda"),
                          cache.decode_attend)
            logits.append(qwen.logits(hidden)[0])
    w64 = {k: v.double() for k, v in tensors.items()}
    assert rel_err(torch.cat(logits).cpu(), ref_forward(w64, cfg, tokens, positions)) <= 1e-5
