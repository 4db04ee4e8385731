"""model.py against the independent float64 Llama forward of tests/reference.py, on random tiny checkpoints.

The reference is written from the Hugging Face Llama / Qwen2 definitions, not from model.py (HF
tensor names, loops over heads and query positions, an explicit rotation matrix per position);
test_reference_reproduces_stories260K_golden checks it against numbers computed with transformers.
Every model under test is built by writing a safetensors checkpoint with HF names and calling
`load_model`, so the loader (q/k/v and gate/up fusion, tied heads, biases) is covered too.
Tolerance: relative error ||a - b|| / ||b|| of the float32 logits <= 1e-5 (measured: 4e-7 to 2e-6).
"""

import copy
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attention import attention
from checkpoint import load_model
from compaction import RawKeyCache
from conftest import REPO, STORIES, hf_config, random_tensors, write_checkpoint
from model import KVCache
from rope import rope_frequencies, rope_temperature
from reference import (load_float64, ref_forward, ref_head_dim, ref_inv_freq, ref_rope_type, ref_rotations,
                       ref_temperature, rel_err)

REL_TOL = 1e-5


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 256}

QWEN2 = {k: v for k, v in hf_config(architectures=["Qwen2ForCausalLM"], model_type="qwen2").items()
         if k != "attention_bias"}  # real Qwen2 configs have no attention_bias key
# as Qwen2.5's model card writes it: the window stays, YaRN stretches the original one 4 times
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
# every option: a ramp not rounded outwards, other betas, the temperature from mscale / mscale_all_dim
YARN_OPTIONS = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64, "beta_fast": 4,
                "beta_slow": 0.5, "truncate": False, "mscale": 1.0, "mscale_all_dim": 0.5}

# name -> (config, sequence length of the full forward)
CONFIGS = {
    "gqa_untied": (hf_config(), 20),
    "mha_tied": (hf_config(num_key_value_heads=4, tie_word_embeddings=True), 20),
    "mqa_head_dim_not_dim_over_heads": (hf_config(hidden_size=48, num_key_value_heads=1), 20),
    "linear": (hf_config(rope_scaling={"type": "linear", "factor": 4.0}), 20),
    # max_position_embeddings 16 < 24 tokens: the NTK base is scaled in the full forward
    "dynamic": (hf_config(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=16), 24),
    "llama3": (hf_config(rope_scaling=LLAMA3_SCALING, max_position_embeddings=2048, tie_word_embeddings=True), 20),
    "llama_attention_bias": (hf_config(attention_bias=True), 20),  # q/k/v and o_proj biases
    "qwen2_qkv_bias": (QWEN2, 20),  # q/k/v biases only
    "qwen2_qkv_bias_mha_tied": ({**QWEN2, "num_key_value_heads": 4, "tie_word_embeddings": True}, 20),
    "qwen2_yarn": ({**QWEN2, "rope_scaling": YARN}, 20),
    "yarn_options": (hf_config(rope_scaling=YARN_OPTIONS), 20),
}


class Case:
    def __init__(self, name, tmp_path_factory):
        self.name = name
        self.cfg, self.T = CONFIGS[name]
        seed = sorted(CONFIGS).index(name)
        tensors = random_tensors(self.cfg, seed)
        self.w64 = {k: v.double() for k, v in tensors.items()}
        self.dir = write_checkpoint(tmp_path_factory.mktemp(name), self.cfg, tensors)
        self.model = load_model(self.dir, "cpu", torch.float32)
        g = torch.Generator().manual_seed(100 + seed)
        self.tokens = torch.randint(0, self.cfg["vocab_size"], (self.T,), generator=g).tolist()
        self.memo = {}

    def ref(self, tokens=None, positions=None):
        tokens = self.tokens if tokens is None else tokens
        positions = list(range(len(tokens))) if positions is None else positions
        key = (tuple(tokens), tuple(positions))
        if key not in self.memo:
            self.memo[key] = ref_forward(self.w64, self.cfg, tokens, positions)
        return self.memo[key]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory):
    return Case(request.param, tmp_path_factory)


def causal_logits(model, tokens):
    with torch.inference_mode():
        return model.causal_logits(torch.tensor([tokens]))[0]


def prefill_logits(model, tokens, positions):
    """Logits of one forward at explicit positions through a cache (prefill_attend)."""
    cache = KVCache(model.config, 1, len(tokens), "cpu", torch.float32)
    with torch.inference_mode():
        hidden = model(torch.tensor([tokens]), torch.tensor([positions]), cache.prefill_attend(0))
        assert hidden.shape == (1, len(tokens), model.config.dim)
        return model.logits(hidden)[0]


# ---------------------------------------------------------------------------- the tests

def test_reference_reproduces_stories260K_golden(reference):
    """The float64 reference itself, on a real checkpoint, against reference.json (HF-computed)."""
    w, cfg = load_float64(STORIES)
    ids = [1] + reference["stories260K"]["greedy_200_from_bos"]
    logits = ref_forward(w, cfg, ids, list(range(len(ids))))
    nll = -torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])
    ppl = math.exp(nll.mean().item())
    assert ppl == pytest.approx(reference["stories260K"]["ppl_of_own_greedy_sample"], rel=1e-5)
    assert logits.argmax(-1)[:-1].tolist() == ids[1:]


def test_configs_exercise_what_they_claim():
    """Guards on the test data: dynamic scaling is active, llama3 hits all three frequency bands."""
    cfg, T = CONFIGS["dynamic"]
    assert T > cfg["max_position_embeddings"]
    assert not torch.equal(ref_inv_freq(cfg, T), ref_inv_freq(cfg, cfg["max_position_embeddings"]))
    for name, q_bias, o_bias in (("qwen2_qkv_bias", True, False), ("llama_attention_bias", True, True),
                                 ("gqa_untied", False, False)):
        w = random_tensors(CONFIGS[name][0], 0)
        assert ("model.layers.0.self_attn.q_proj.bias" in w, "model.layers.0.self_attn.o_proj.bias" in w) == (
            q_bias, o_bias)
    cfg = CONFIGS["llama3"][0]
    d = ref_head_dim(cfg)
    wavelen = 2 * math.pi * cfg["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    old = LLAMA3_SCALING["original_max_position_embeddings"]
    assert (wavelen < old / LLAMA3_SCALING["high_freq_factor"]).any()
    assert (wavelen > old / LLAMA3_SCALING["low_freq_factor"]).any()
    assert ((wavelen > old / 4) & (wavelen < old / 1)).any()
    for name in ("qwen2_yarn", "yarn_options"):  # YaRN: pairs kept, blended and divided by the factor
        cfg = CONFIGS[name][0]
        d = ref_head_dim(cfg)
        kept = ref_inv_freq(cfg, 1) / (1.0 / cfg["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        factor = cfg["rope_scaling"]["factor"]
        assert kept[0] == 1 and kept[-1] == 1 / factor and ((kept < 1) & (kept > 1 / factor)).any(), name
        assert ref_temperature(cfg) > 1


def test_full_forward_matches_reference(case):
    ref = case.ref()
    assert 1 < ref.std() < 20, "random weights should give O(1-10) logits"
    ours = causal_logits(case.model, case.tokens)
    assert ours.dtype == torch.float32 and ours.shape == (case.T, case.cfg["vocab_size"])
    assert rel_err(ours, ref) <= REL_TOL


def test_loaded_config(case):
    c, cfg = case.model.config, case.cfg
    assert (c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.tie_word_embeddings) == (
        cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"],
        cfg["tie_word_embeddings"])
    assert (case.model.lm_head is None) == cfg["tie_word_embeddings"]
    attn = case.model.layers[0].attn
    assert (attn.wqkv.bias is not None) == ("model.layers.0.self_attn.q_proj.bias" in case.w64)
    assert (attn.wo.bias is not None) == ("model.layers.0.self_attn.o_proj.bias" in case.w64)


def usable_length(case):
    # dynamic NTK changes with the longest position: stay inside the window so that it is off
    if ref_rope_type(case.cfg) == "dynamic":
        return case.cfg["max_position_embeddings"]
    return case.T


def test_decode_one_token_at_a_time_matches_full_forward(case):
    T = usable_length(case)
    tokens = case.tokens[:T]
    full = causal_logits(case.model, tokens)
    cache = KVCache(case.model.config, 1, T, "cpu", torch.float32)
    steps = []
    with torch.inference_mode():
        for t, tok in enumerate(tokens):
            hidden = case.model(torch.tensor([[tok]]), torch.tensor([[t]]), cache.decode_attend)
            steps.append(case.model.logits(hidden)[0, 0])
    steps = torch.stack(steps)
    assert cache.lens.tolist() == [T] * case.cfg["num_hidden_layers"]
    assert rel_err(steps, full) <= REL_TOL
    assert rel_err(steps, case.ref(tokens)) <= REL_TOL


def test_prefill_blocks_then_decode_matches_full_forward(case):
    T = usable_length(case)
    tokens = case.tokens[:T]
    full = causal_logits(case.model, tokens)
    capacity = T + 3  # spare room: attention must only see the live part of the cache
    cache = KVCache(case.model.config, 1, capacity, "cpu", torch.float32)
    pieces = []
    with torch.inference_mode():
        for start, end in ((0, 5), (5, 11)):
            hidden = case.model(torch.tensor([tokens[start:end]]), torch.arange(start, end)[None],
                                cache.prefill_attend(start))
            pieces.append(case.model.logits(hidden)[0])
        for t in range(11, T):
            hidden = case.model(torch.tensor([[tokens[t]]]), torch.tensor([[t]]), cache.decode_attend)
            pieces.append(case.model.logits(hidden)[0])
    mixed = torch.cat(pieces)
    assert mixed.shape == full.shape
    assert rel_err(mixed, full) <= REL_TOL
    assert rel_err(mixed, case.ref(tokens)) <= REL_TOL


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("H, H_kv, D, T, before", [(4, 2, 16, 5, 7), (9, 3, 64, 33, 100), (2, 2, 8, 1, 3)])
def test_attention_after_a_cache(dtype, tol, H, H_kv, D, T, before):
    """Bottom-right causal attention (query i sees keys up to before + i), GQA, against float64
    softmax attention with every query head given its KV head's keys."""
    gen = torch.Generator().manual_seed(T)
    q = torch.randn(2, H, T, D, generator=gen).to(dtype)
    k, v = (torch.randn(2, H_kv, before + T, D, generator=gen).to(dtype) for _ in range(2))
    k64, v64 = (x.double().repeat_interleave(H // H_kv, 1) for x in (k, v))
    scores = q.double() @ k64.transpose(-1, -2) / math.sqrt(D)
    hidden = torch.arange(before + T)[None] > torch.arange(T)[:, None] + before
    expected = scores.masked_fill(hidden, float("-inf")).softmax(-1) @ v64
    assert (attention(q, k, v).double() - expected).abs().max() <= tol


def test_explicit_positions_100_to_109(case):
    tokens = case.tokens[:10]
    positions = list(range(100, 110))
    ours = prefill_logits(case.model, tokens, positions)
    assert rel_err(ours, case.ref(tokens, positions)) <= REL_TOL


def test_explicit_positions_with_a_gap(case):
    """A prefix at 0..5, a block at 100..109, one decoded token at 250: unlike a uniform shift, the
    gaps change relative distances, so a model that ignored the given positions would fail here."""
    if ref_rope_type(case.cfg) == "dynamic":
        pytest.skip("dynamic NTK: each forward scales by its own largest position")
    tokens = case.tokens[:17]
    positions = list(range(6)) + list(range(100, 110)) + [250]
    ref = case.ref(tokens, positions)
    assert rel_err(case.ref(tokens), ref) > 1e-3  # the gaps matter
    cache = KVCache(case.model.config, 1, 17, "cpu", torch.float32)
    with torch.inference_mode():
        a = case.model(torch.tensor([tokens[:6]]), torch.tensor([positions[:6]]), cache.prefill_attend(0))
        b = case.model(torch.tensor([tokens[6:16]]), torch.tensor([positions[6:16]]), cache.prefill_attend(6))
        c = case.model(torch.tensor([tokens[16:]]), torch.tensor([positions[16:]]), cache.decode_attend)
        ours = torch.cat([case.model.logits(h)[0] for h in (a, b, c)])
    assert rel_err(ours, ref) <= REL_TOL


def test_batch_rows_are_independent(case):
    """Two sequences in one forward (different tokens, different positions) equal each alone."""
    if ref_rope_type(case.cfg) == "dynamic":
        pytest.skip("dynamic NTK takes the largest position over the whole batch")
    T = 12
    rows = [case.tokens[:T], case.tokens[-T:][::-1]]
    positions = [list(range(T)), list(range(40, 40 + T))]
    cache = KVCache(case.model.config, 2, T, "cpu", torch.float32)
    with torch.inference_mode():
        hidden = case.model(torch.tensor(rows), torch.tensor(positions), cache.prefill_attend(0))
        logits = case.model.logits(hidden)
    for b in range(2):
        assert rel_err(logits[b], case.ref(rows[b], positions[b])) <= REL_TOL


# ---------------------------------------------------------------------------- YaRN

def hf_to_model_config(cfg, tmp_path):
    return load_model(write_checkpoint(tmp_path, cfg, random_tensors(cfg, 0)), "cpu", torch.float32)


@pytest.mark.parametrize("scaling", [YARN, YARN_OPTIONS, {**YARN, "attention_factor": 1.5, "beta_fast": 8},
                                     {**YARN, "factor": 1.0}])
def test_yarn_rope_against_the_float64_formula(scaling, tmp_path):
    """Frequencies, temperature and the cos/sin every rotation takes (Llama.rope), at positions far
    past the original window, against tests/reference.py's pair-by-pair formula."""
    cfg = hf_config(rope_scaling=scaling)
    model = hf_to_model_config(cfg, tmp_path)
    assert torch.allclose(rope_frequencies(model.config), ref_inv_freq(cfg, 1), rtol=1e-15, atol=0)
    assert rope_temperature(model.config) == pytest.approx(ref_temperature(cfg), rel=1e-15)
    positions = torch.tensor([[0, 1, 63, 64, 1000, 200000]])
    angles = positions[0, :, None].double() * ref_inv_freq(cfg, 1)
    cos, sin = model.rope(positions)
    assert cos.shape == (1, 1, 6, 8) and cos.dtype == torch.float32
    assert (cos[0, 0].double() - angles.cos() * ref_temperature(cfg)).abs().max() <= 1e-6
    assert (sin[0, 0].double() - angles.sin() * ref_temperature(cfg)).abs().max() <= 1e-6
    cos, sin = model.rope(positions, temperature=False)  # a relative turn of keys that carry it
    assert (cos[0, 0].double() - angles.cos()).abs().max() <= 1e-6


def transformers_config(cfg):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed "
                                                              "(pip install -r requirements-dev.txt)")
    # a copy: transformers 5 writes rope_theta and rope_type into the rope_scaling dict it is given
    return getattr(transformers, cfg["architectures"][0].replace("ForCausalLM", "Config"))(**copy.deepcopy(cfg))


@pytest.mark.parametrize("scaling", [YARN, YARN_OPTIONS, {**YARN, "attention_factor": 1.5, "beta_fast": 8}])
def test_yarn_rope_against_transformers(scaling, tmp_path):
    """The frequencies and temperature of transformers' own YaRN (modeling_rope_utils), which it
    computes in float32."""
    cfg = hf_config(rope_scaling=scaling)
    config = transformers_config(cfg)  # skips where transformers is not installed
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    inv_freq, temperature = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    model = hf_to_model_config(cfg, tmp_path)
    assert torch.allclose(rope_frequencies(model.config).float(), inv_freq, rtol=1e-6, atol=0)
    assert rope_temperature(model.config) == pytest.approx(temperature, rel=1e-12)


@pytest.mark.parametrize("name", ["qwen2_yarn", "yarn_options"])
def test_yarn_model_against_transformers(name, tmp_path_factory):
    """The logits of transformers' Qwen2/Llama with the same checkpoint and rope_scaling, at positions
    0..19 and 300..319 (past the original window)."""
    transformers_config(CONFIGS[name][0])
    from transformers import AutoModelForCausalLM
    case = Case(name, tmp_path_factory)
    hf = AutoModelForCausalLM.from_pretrained(case.dir, dtype=torch.float32, attn_implementation="eager").eval()
    tokens = torch.tensor([case.tokens])
    for start in (0, 300):
        positions = torch.arange(start, start + case.T)[None]
        with torch.inference_mode():
            theirs = hf(tokens, position_ids=positions).logits[0]
        assert rel_err(prefill_logits(case.model, case.tokens, positions[0].tolist()), theirs) <= REL_TOL


@pytest.mark.parametrize("name", ["gqa_untied", "llama3", "qwen2_yarn", "yarn_options"])
def test_a_config_json_written_by_transformers_5(name, tmp_path):
    """transformers 5 writes rope_theta and the scaling into rope_parameters: the model must be
    the one the transformers 4 keys describe, which the reference forward reads, with a base of
    500,000 (before, a default 10,000 and no scaling were taken silently)."""
    cfg = {**CONFIGS[name][0], "rope_theta": 500000.0}
    written = transformers_config(cfg).to_dict()  # skips where transformers is not installed
    assert "rope_parameters" in written and "rope_theta" not in written and "rope_scaling" not in written
    tensors = random_tensors(cfg, 0)
    model = load_model(write_checkpoint(tmp_path, written, tensors), "cpu", torch.float32)
    tokens, positions = list(range(1, 21)), list(range(300, 320))
    ref = ref_forward({k: v.double() for k, v in tensors.items()}, cfg, tokens, positions)
    assert rel_err(prefill_logits(model, tokens, positions), ref) <= REL_TOL


@pytest.mark.parametrize("name", ["llama3", "qwen2_qkv_bias_mha_tied"])
def test_a_checkpoint_saved_by_transformers(name, tmp_path):
    """transformers' own model written by its save_pretrained (config.json, tensor names and
    dtype as that version writes them) gives its logits at positions 300..319."""
    config = transformers_config({**CONFIGS[name][0], "rope_theta": 500000.0})
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in hf.parameters():  # its own init is near zero (and biases zero): logits would be nearly flat
            p.normal_(0, 0.3)
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path, "cpu", torch.float32)
    tokens, positions = list(range(1, 21)), list(range(300, 320))
    with torch.inference_mode():
        theirs = hf(torch.tensor([tokens]), position_ids=torch.tensor([positions])).logits[0]
    assert theirs.std() > 0.3 and rel_err(prefill_logits(model, tokens, positions), theirs) <= REL_TOL


def test_with_rope_scaling_is_a_view_sharing_every_weight(tmp_path):
    """A YaRN view of a checkpoint without scaling: the same parameters (no copy), its own config,
    frequencies and temperature, the original untouched; its logits are the float64 forward's with
    YaRN in the config."""
    cfg = hf_config()
    model = hf_to_model_config(cfg, tmp_path)
    view = model.with_rope_scaling(YARN, 256)
    assert all(a is b for a, b in zip(model.parameters(), view.parameters()))
    assert (view.config.rope_scaling, view.config.max_position_embeddings) == (YARN, 256)
    assert (model.config.rope_scaling, model.rope_temperature) == (None, 1.0)
    assert torch.equal(model.inv_freq, rope_frequencies(model.config)) and view.rope_temperature > 1
    tokens = torch.randint(0, cfg["vocab_size"], (20,), generator=torch.Generator().manual_seed(1)).tolist()
    positions = list(range(100, 120))
    w64 = {k: v.double() for k, v in random_tensors(cfg, 0).items()}
    ref = ref_forward(w64, {**cfg, "rope_scaling": YARN}, tokens, positions)
    assert rel_err(prefill_logits(view, tokens, positions), ref) <= REL_TOL
    assert rel_err(prefill_logits(model, tokens, positions), ref) > 1e-2  # the view changes the logits


def test_compaction_rotates_with_the_yarn_temperature(tmp_path):
    """RawKeyCache.compact (InfiniPot, Locret) rotates the kept raw keys to positions 0..n-1 as a forward
    would: YaRN's frequencies and temperature."""
    cfg = hf_config(rope_scaling=YARN)
    model = hf_to_model_config(cfg, tmp_path)
    cache = RawKeyCache(model.config, 1, 300, "cpu", torch.float32)
    g = torch.Generator().manual_seed(5)
    cache.k_raw.normal_(generator=g)
    keep = torch.stack([torch.randperm(300, generator=g)[:200].sort().values for _ in range(4)]).view(2, 2, 200)
    raw = cache.k_raw[:, 0].double().clone()  # (L, H_kv, S, D)
    cache.compact(keep, model.rope)
    kept = raw.gather(2, keep[..., None].expand(-1, -1, -1, raw.shape[-1]))
    expected = torch.einsum("tij,lhtj->lhti", ref_rotations(cfg, list(range(200))), kept)
    assert rel_err(cache.k[:, 0, :, :200], expected) <= 1e-6


# ---------------------------------------------------------------------------- model.py on its own

ALONE = """
import json, sys
import torch
import model
config = model.ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=48,
                           norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None, max_position_embeddings=64,
                           tie_word_embeddings=True, attention_bias=False, output_bias=False)
llama = model.build_model(config, "cpu", torch.float32)
torch.manual_seed(0)
for p in llama.parameters():
    p.normal_(0, 0.3)
logits = llama.causal_logits(torch.randint(0, 50, (2, 7)))
print(json.dumps(dict(model=model.__file__, modules=sorted(sys.modules), path=sys.path, prefix=sys.prefix,
                      shape=list(logits.shape), finite=bool(logits.isfinite().all()))))
"""


def test_model_py_and_its_three_modules_are_all_a_copy_needs(tmp_path):
    """model.py, rope.py, attention.py and llama_triton.py copied into another project run a Llama
    there: no other module of this repository is imported (nor on the path; torch comes from the
    interpreter's site-packages)."""
    for name in ("model.py", "rope.py", "attention.py", "llama_triton.py"):
        shutil.copy(REPO / name, tmp_path / name)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    p = subprocess.run([sys.executable, "-c", ALONE], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["model"] == str(tmp_path / "model.py")
    # "" is the cwd; the interpreter's own site-packages may lie in the repository (a venv in .venv)
    in_repo = [entry for entry in out["path"] if (tmp_path / entry).resolve().is_relative_to(REPO)
               and not Path(entry).resolve().is_relative_to(Path(out["prefix"]).resolve())]
    assert in_repo == []
    ours = {f.stem for f in REPO.glob("*.py")} | {"weights", "tests", "eval", "tools", "reference", "conftest"}
    assert set(out["modules"]) & ours <= {"model", "rope", "attention", "llama_triton"}  # llama_triton: with Triton
    assert out["shape"] == [2, 7, 50] and out["finite"]


def test_a_foreign_module_named_llama_triton_is_not_used(tmp_path):
    """Another package's llama_triton, first on the path, is imported but model.py does not take
    it for its kernels: it lacks KERNELS_FOR = "model.py"."""
    (tmp_path / "llama_triton.py").write_text('"""Some other project\'s module of that name."""\nFOREIGN = True\n')
    script = "import llama_triton, model; print(llama_triton.__file__, llama_triton.FOREIGN, model.kernels)"
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
    p = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == [str(tmp_path / "llama_triton.py"), "True", "None"]
