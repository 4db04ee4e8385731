"""hybrid.py (LongGen's pattern) against the float64 reference forward with the same masks, and
the RoPE tables and a ProLong-shaped checkpoint at 512K positions.

stories260K (5 layers: 1-2 full, 0, 3, 4 sparse; window 512) with a 4 + 60 window or 8-token
blocks (3 local, every 4th kept) over ~260 tokens: every ring wraps several times. The masks are
written here from the pattern's definition, by position, not from hybrid.py's slot bookkeeping.
Tolerance: relative error of float32 logits <= 1e-5, as tests/test_model.py (measured 2-3e-7),
and no logit off by more than 1e-4 (measured 3e-5).
"""

import json
from dataclasses import fields

import pytest
import torch
from safetensors.torch import save_file

import hybrid
from checkpoint import load_model
from conftest import BOOKS, STORIES, Stories
from hybrid import HybridCache, HybridConfig, layout_from_config, parse_layers
from model import KVCache, ModelConfig, build_model
from prefill import OptionError, Prompt, causal_prefill
from reference import load_float64, ref_forward, rel_err
from test_model import hf_config, random_tensors
from tokenizer import Tokenizer

TOL = 1e-5
FULL = range(1, 3)  # stories260K's middle third: layers 5 // 3 .. 10 // 3 - 1
WINDOW = HybridConfig(sink_tokens=4, window_tokens=60)
BLOCK = HybridConfig(pattern="block", block_tokens=8, local_blocks=3, vert_stride=4)
# (pieces, tokens): prefill [0, 37), [37, 150), [150, 200) and decode the rest of 260 tokens; or
# decode 130 tokens from the third on, through the sinks, the ring filling and wrapping
RUNS = (([0, 37, 150, 200], 260), ([0, 2], 130))


class Setup(Stories):
    def __init__(self):
        super().__init__()
        text = (BOOKS / "frankenstein.txt").read_text()[30000:33000]
        self.ids = [1] + Tokenizer.from_dir(STORIES).encode(text)[:259]  # 260 tokens
        self.references = {}

    def reference(self, config):
        """Float64 logits (T, vocab) of one forward with the pattern's masks in the sparse layers."""
        if config not in self.references:
            T = len(self.ids)
            p, k = torch.arange(T)[:, None], torch.arange(T)[None, :]
            if config.pattern == "window":
                sparse = (k <= p) & ((k < config.sink_tokens) | (p - k < config.window_tokens))
            else:
                qb, kb = p // config.block_tokens, k // config.block_tokens
                sparse = (k <= p) & ((qb - kb < config.local_blocks) | (kb % config.vert_stride == 0))
            mask = lambda layer: None if layer in config.full_range(5) else sparse
            self.references[config] = ref_forward(self.w, self.cfg, self.ids, list(range(T)), mask=mask)
        return self.references[config]


@pytest.fixture(scope="module")
def setup():
    return Setup()


def held_tokens(config, n):
    """Distinct tokens a sparse layer needs after n tokens, counted from the pattern's definition."""
    if config.pattern == "window":
        return min(n, config.sink_tokens + config.window_tokens)
    b = config.block_tokens
    ring = config.local_blocks * b
    return len({k for k in range(n) if (k // b) % config.vert_stride == 0 or k >= n - ring})


def run_hybrid(model, ids, config, pieces, check):
    """Prefill ids[:pieces[-1]] in the given pieces, then decode the rest one token at a time
    through decode_attend with a device position, calling check(cache, tokens seen) after each
    forward; logits (T, vocab) of every token."""
    cache = HybridCache(model.config, config, 1, 260, model.device, model.dtype)
    tokens, rows = torch.tensor([ids]), []
    for a, b in zip(pieces, pieces[1:]):
        rows.append(model.logits(model(tokens[:, a:b], torch.arange(a, b)[None], cache.prefill_attend(a))[0]))
        check(cache, b)
    pos = torch.tensor([[pieces[-1]]])
    for n in range(pieces[-1], len(ids)):
        rows.append(model.logits(model(tokens[:, n:n + 1], pos, cache.decode_attend)[0]))
        pos += 1
        check(cache, n + 1)
    return torch.cat(rows)


@pytest.mark.parametrize("query_block", [1024, 16])
@pytest.mark.parametrize("run", RUNS, ids=["pieces", "decode"])
@pytest.mark.parametrize("config", [WINDOW, BLOCK], ids=["window", "block"])
def test_pieces_and_decode_match_masked_reference(setup, config, run, query_block, monkeypatch):
    """Prefill in pieces (longer and shorter than the ring), with the sparse layers' queries in
    one block or in blocks of 16, and decoding step by step give the logits of one float64
    forward with the pattern's masks; sparse caches never hold more than the pattern needs:
    4 + 60 slots (window), strided blocks + 3 local blocks (block)."""
    monkeypatch.setattr(hybrid, "QUERY_BLOCK", query_block)
    (pieces, T), model = run, setup.model
    # block: the strided blocks of the capacity (260, 256-aligned: 512) and 3 local blocks
    slots = 4 + 60 if config.pattern == "window" else 512 // 32 * 8 + 3 * 8

    def check(cache, n):
        assert cache.k_sparse.shape == (3, 1, 4, slots, 8)
        live = cache.live_tokens().tolist()
        assert [live[i] for i in FULL] == [n, n]
        assert [live[i] for i in (0, 3, 4)] == [held_tokens(config, n)] * 3
        assert cache.lens.tolist() == [n] * 5

    logits = run_hybrid(model, setup.ids[:T], config, pieces, check)
    expected = setup.reference(config)[:T]  # causal: the first T rows of the 260-token forward
    assert rel_err(logits, expected) <= TOL
    assert (logits - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("config", [HybridConfig(sink_tokens=4, window_tokens=300),
                                    HybridConfig(pattern="block", block_tokens=16, local_blocks=19)],
                         ids=["window", "block"])
def test_window_covering_the_prompt_is_full_attention(setup, config):
    """With the window (or the local blocks) covering prompt and answer, the hybrid is plain
    causal attention: prefill and decode logits equal causal prefill's within float32 rounding
    (other summation orders: measured 5e-7)."""
    model, ids = setup.model, setup.ids[:250]
    prefilled = hybrid.prefill(model, Prompt([], ids, []), config, 10)
    cache, logits = causal_prefill(model, ids, 10)
    assert rel_err(prefilled.logits, logits) <= 2e-6
    tok, pos = torch.tensor([[7]]), torch.tensor([[250]])
    for _ in range(10):
        ours = model.logits(model(tok, pos, prefilled.cache.decode_attend))
        plain = model.logits(model(tok, pos, cache.decode_attend))
        assert rel_err(ours, plain) <= 2e-6
        tok, pos = plain[:, -1].argmax(-1, keepdim=True), pos + 1


def test_prefill_result_and_stats(setup):
    model, ids = setup.model, setup.ids
    prefilled = hybrid.prefill(model, Prompt(ids[:10], ids[10:], []), WINDOW, 8)
    assert rel_err(prefilled.logits, setup.reference(WINDOW)[-1]) <= TOL
    per_entry = 2 * 4 * 8 * 4  # K and V, 4 KV heads of 8 float32
    T = len(ids)
    assert prefilled.next_position == T
    assert prefilled.stats == dict(kv_bytes=(2 * T + 3 * 64) * per_entry, full_kv_bytes=5 * T * per_entry,
                                   forwards=[[T, T]], scored_tokens=0)


@pytest.mark.parametrize("config", [WINDOW, BLOCK], ids=["window", "block"])
def test_decode_state_is_what_a_graph_warm_up_must_restore(setup, config):
    """Decoder.capture runs two steps, then restores the buffers. At 223 tokens the second step
    (224) overwrites the ring slot of a key that 223 sees (164 or 200) and, with blocks, writes
    a strided block's fixed slot: restoring lens alone is not enough, decode_state() is."""
    model, ids = setup.model, setup.ids[:223]

    def step(cache, token, position):
        return model.logits(model(torch.tensor([[token]]), torch.tensor([[position]]), cache.decode_attend))

    def after_warm_up(restore):
        cache = hybrid.prefill(model, Prompt([], ids, []), config, 8).cache
        saved = [t.clone() for t in restore(cache)]
        step(cache, 5, 223)
        step(cache, 9, 224)
        for t, value in zip(restore(cache), saved):
            t.copy_(value)
        return step(cache, 5, 223)

    exact = step(hybrid.prefill(model, Prompt([], ids, []), config, 8).cache, 5, 223)
    assert torch.equal(after_warm_up(HybridCache.decode_state), exact)
    assert rel_err(after_warm_up(lambda cache: (cache.lens,)), exact) > 1e-4


def test_config_validation_and_parsing():
    c = ModelConfig(512, 64, 5, 8, 4, 8, 172, 1e-5, 1e4, None, 512, True, False, False)
    HybridConfig().validate(c)
    for bad, param in ((dict(pattern="sink"), "pattern"), (dict(sink_tokens=-1), "sink_tokens"),
                       (dict(window_tokens=0), "window_tokens"), (dict(block_tokens=0), "block_tokens"),
                       (dict(local_blocks=0), "local_blocks"), (dict(vert_stride=0), "vert_stride"),
                       (dict(full_layers=(3, 5)), "full_layers"), (dict(full_layers=(3, 2)), "full_layers")):
        with pytest.raises(OptionError) as e:
            HybridConfig(**bad).validate(c)
        assert e.value.param == param
    assert parse_layers("10-19") == (10, 19) and parse_layers("7") == (7, 7)
    parse_pattern = next(f for f in fields(HybridConfig) if f.name == "pattern").metadata["parse"]
    assert parse_pattern("block") == "block"
    for parse, text in ((parse_layers, "10:19"), (parse_layers, "-3"), (parse_pattern, "sink")):
        with pytest.raises(ValueError):
            parse(text)
    # LongGen's middle third: SmolLM2 (30 layers) 10-19, Llama-2-7B (32) 10-20
    assert HybridConfig().full_range(30) == range(10, 20) and HybridConfig().full_range(32) == range(10, 21)
    assert HybridConfig(full_layers=(2, 4)).full_range(30) == range(2, 5)


def test_layout_from_config():
    c = ModelConfig(512, 64, 30, 8, 4, 8, 172, 1e-5, 1e4, None, 512, True, False, False)  # 30 layers
    assert layout_from_config({"hidden_size": 64}, c) is None
    spec = {"full_layers": [10, 19], "pattern": "window", "sink_tokens": 64, "window_tokens": 1984}
    assert layout_from_config({"hybrid_attention": spec}, c) == HybridConfig(full_layers=(10, 19))
    block = {"pattern": "block", "block_tokens": 32, "local_blocks": 8, "vert_stride": 4}
    assert layout_from_config({"hybrid_attention": block}, c) == HybridConfig("block", block_tokens=32, local_blocks=8,
                                                                               vert_stride=4)
    for bad in ([1, 2], {"sink": 64}, {"sink_tokens": "64"}, {"full_layers": [10]}, {"full_layers": [1.0, 2]},
                {"pattern": 3}):
        with pytest.raises(ValueError):
            layout_from_config({"hybrid_attention": bad}, c)


@pytest.mark.parametrize("bad, message", [
    ({"window_tokens": 0}, "hybrid_attention.window_tokens must be at least 1"),
    ({"pattern": "block", "block_tokens": 0}, "hybrid_attention.block_tokens must be at least 1"),
    ({"full_layers": [3, 1]}, "hybrid_attention.full_layers must have 0 <= first <= last < 30"),
    ({"full_layers": [10, 30]}, "hybrid_attention.full_layers must have 0 <= first <= last < 30"),
])
def test_a_layout_that_does_not_fit_the_model_is_refused_naming_its_key(bad, message):
    """A layout the config.json of a 30-layer checkpoint gives is checked as HybridConfig.validate
    checks the command line's: before 6d6fb5c, window 0 and block 0 ended in ZeroDivisionError
    and [3, 1] made every layer sparse."""
    c = ModelConfig(512, 64, 30, 8, 4, 8, 172, 1e-5, 1e4, None, 512, True, False, False)
    with pytest.raises(ValueError) as e:
        layout_from_config({"hybrid_attention": bad}, c)
    assert str(e.value) == message


# ---------------------------------------------------------------------------- 512K positions

def hf_rope(x, positions, theta):
    """Hugging Face's default RoPE (_compute_default_rope_parameters, apply_rotary_pos_emb) in
    float64: x (T, H, d) at positions (T,)."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64).double() / d))
    freqs = positions.double()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[:, None], emb.sin()[:, None]
    rotate_half = torch.cat((-x[..., d // 2:], x[..., :d // 2]), dim=-1)
    return x * cos + rotate_half * sin


def test_rope_tables_at_512k_positions_match_hf_formula():
    """ProLong's θ = 1.28e8 and head_dim 128: q and k as the model rotates them (model.py's
    frequencies and the cos/sin its forward computes) against HF's formula in float64, at
    positions up to 524,287. Tolerance: relative error 1e-6 per position, as cos/sin and the
    rotation are float32, a few roundings of 2^-24 = 6e-8 each (measured 4e-8). Angles formed in
    float32, as model.py did before this test, gave 3.4e-3: near 5e5 a float32 angle's ulp is
    0.03 rad, and the float32 frequency's own rounding moves position * frequency as much."""
    c = ModelConfig(8, 128, 1, 2, 1, 128, 8, 1e-5, 1.28e8, None, 524288, True, False, False)
    model = build_model(c, "cpu", torch.float32)
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.copy_(torch.randn(p.shape, generator=g))
    positions = torch.cat([torch.tensor([0, 1, 4095, 131071, 262143, 400000, 524286, 524287]),
                           torch.randint(0, 524288, (56,), generator=g)])
    seen = {}

    def attend(layer, q, k, v):
        seen["q"], seen["k"] = q[0].transpose(0, 1), k[0].transpose(0, 1)  # (T, H, d)
        return q

    def observe(layer, qkv):
        seen["raw"] = qkv[0].view(len(positions), 4, 128)  # [q q | k | v] heads before RoPE
    model(torch.zeros(1, len(positions), dtype=torch.long), positions[None], attend, observe)
    for ours, raw in ((seen["q"], seen["raw"][:, :2]), (seen["k"], seen["raw"][:, 2:3])):
        expected = hf_rope(raw.double(), positions, 1.28e8)
        err = (ours.double() - expected).norm(dim=(1, 2)) / expected.norm(dim=(1, 2))
        assert err.max() <= 1e-6


def test_prolong_shaped_checkpoint_generates_at_512k_positions(tmp_path):
    """ProLong-512K's config.json (methods.md §5.1) with tiny sizes and random weights: it loads,
    then prefills and decodes greedily at positions 524,276..524,287 through KVCache and
    decode_attend, matching the float64 reference forward at those positions (with float32
    angles the logits were 6e-4 off)."""
    cfg = hf_config(vocab_size=128256, hidden_size=64, intermediate_size=224, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=1, head_dim=16, rope_theta=1.28e8,
                    max_position_embeddings=524288, bos_token_id=128000, eos_token_id=128009,
                    mlp_bias=False, torch_dtype="bfloat16")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file(random_tensors(cfg, seed=3), tmp_path / "model.safetensors")
    model = load_model(tmp_path, "cpu", torch.float32)
    assert (model.config.rope_theta, model.config.max_position_embeddings) == (1.28e8, 524288)
    start, ids = 524276, [128000, 791, 4062, 14198, 39935, 35308, 927, 279]
    cache = KVCache(model.config, 1, 16, "cpu", torch.float32)
    hidden = model(torch.tensor([ids]), torch.arange(start, start + 8)[None], cache.prefill_attend(0))
    rows = [model.logits(hidden[0, -1])]
    pos = torch.tensor([[start + 8]])
    for _ in range(4):
        ids.append(int(rows[-1].argmax()))
        rows.append(model.logits(model(torch.tensor([ids[-1:]]), pos, cache.decode_attend))[0, 0])
        pos += 1
    assert pos.item() == 524288
    w, _ = load_float64(tmp_path)
    expected = ref_forward(w, cfg, ids, list(range(start, start + len(ids))))[7:]
    assert rel_err(torch.stack(rows), expected) <= TOL
