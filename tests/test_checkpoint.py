"""load_model on checkpoints written by the test: sharded files, and every way a directory can be broken.

Each broken checkpoint must raise CheckpointError with a message that names the problem (the
tensor, the file, the shapes), never a raw SafetensorError, KeyError or JSONDecodeError.
"""

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from checkpoint import SUPPORTED_ARCHITECTURES, CheckpointError, load_model
from conftest import hf_config, random_tensors, write_checkpoint

CONFIG = hf_config(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=3, head_dim=8,
                   max_position_embeddings=128)
TOKENS = [3, 14, 15, 9, 26, 5, 35, 8, 9, 7, 9, 3, 2, 38, 4, 6]


def write_sharded(path, weights, n_shards, config=CONFIG):
    """model-0000k-of-0000n.safetensors + model.safetensors.index.json, as Hugging Face writes them."""
    path.mkdir(parents=True, exist_ok=True)
    names = sorted(weights)
    weight_map = {}
    for k in range(n_shards):
        file = f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {name: weights[name] for name in names[k::n_shards]}
        save_file(part, path / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in weights.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(config))
    return path


def logits(model, tokens=TOKENS):
    with torch.inference_mode():
        return model.causal_logits(torch.tensor([tokens]))


def load_error(path):
    with pytest.raises(CheckpointError) as info:
        load_model(path, "cpu", torch.float32)
    return str(info.value)


# ---------------------------------------------------------------------------- loads

@pytest.mark.parametrize("n_shards", [2, 3])
def test_sharded_equals_single_file(tmp_path, n_shards):
    w = random_tensors(CONFIG, 0)
    single = load_model(write_checkpoint(tmp_path / "single", CONFIG, w), "cpu", torch.float32)
    sharded = load_model(write_sharded(tmp_path / "sharded", w, n_shards), "cpu", torch.float32)
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) == n_shards
    for (name, a), (_, b) in zip(single.state_dict().items(), sharded.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(logits(single), logits(sharded))


def test_fused_parameters_hold_the_hf_tensors(tmp_path):
    """q/k/v rows and gate/up rows land in the right slices of the fused parameters."""
    w = random_tensors(CONFIG, 0)
    model = load_model(write_checkpoint(tmp_path, CONFIG, w), "cpu", torch.float32)
    q, kv = 4 * 8, 2 * 8
    layer = model.layers[1]
    p = "model.layers.1."
    assert torch.equal(layer.attn.wqkv.weight, torch.cat([w[p + f"self_attn.{x}_proj.weight"] for x in "qkv"]))
    assert torch.equal(layer.attn.wqkv.weight[q + kv:], w[p + "self_attn.v_proj.weight"])
    assert torch.equal(layer.mlp.w_gate_up.weight, torch.cat([w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"]]))
    assert torch.equal(model.lm_head.weight, w["lm_head.weight"])


def test_tied_checkpoint_carrying_lm_head_loads(tmp_path):
    config = {**CONFIG, "tie_word_embeddings": True}
    w = random_tensors(config, 0)
    plain = load_model(write_checkpoint(tmp_path / "plain", config, w), "cpu", torch.float32)
    with_head = {**w, "lm_head.weight": w["model.embed_tokens.weight"].clone()}
    model = load_model(write_checkpoint(tmp_path / "with_head", config, with_head), "cpu", torch.float32)
    assert model.lm_head is None
    assert torch.equal(logits(model), logits(plain))


def test_rotary_inv_freq_buffers_are_ignored(tmp_path):
    w = random_tensors(CONFIG, 0)
    old_style = {**w, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}
    assert torch.equal(logits(load_model(write_checkpoint(tmp_path / "a", CONFIG, old_style), "cpu", torch.float32)),
                       logits(load_model(write_checkpoint(tmp_path / "b", CONFIG, w), "cpu", torch.float32)))


def test_half_precision_checkpoint_loads_into_float32(tmp_path):
    w = {k: v.to(torch.bfloat16) for k, v in random_tensors(CONFIG, 0).items()}
    model = load_model(write_checkpoint(tmp_path, CONFIG, w), "cpu", torch.float32)
    assert model.embed.weight.dtype == torch.float32
    assert torch.equal(model.embed.weight, w["model.embed_tokens.weight"].float())


# ---------------------------------------------------------------------------- tensor errors

def test_missing_tensor_is_named(tmp_path):
    w = random_tensors(CONFIG, 0)
    del w["model.layers.2.mlp.up_proj.weight"]
    assert "model.layers.2.mlp.up_proj.weight" in load_error(write_checkpoint(tmp_path, CONFIG, w))


def test_untied_checkpoint_without_lm_head_is_an_error(tmp_path):
    w = random_tensors(CONFIG, 0)
    del w["lm_head.weight"]
    assert "lm_head.weight" in load_error(write_checkpoint(tmp_path, CONFIG, w))


def test_llama_attention_bias_needs_o_proj_bias(tmp_path):
    """Hugging Face's Llama gives o_proj a bias too when attention_bias is true (Qwen2 does not)."""
    config = {**CONFIG, "attention_bias": True}
    biases = {f"model.layers.{i}.self_attn.{x}_proj.bias": torch.zeros(32 if x == "q" else 16)
              for i in range(3) for x in "qkv"}
    w = {**random_tensors(CONFIG, 0), **biases}
    assert "o_proj.bias" in load_error(write_checkpoint(tmp_path / "a", config, w))
    w.update({f"model.layers.{i}.self_attn.o_proj.bias": torch.ones(32) for i in range(3)})
    model = load_model(write_checkpoint(tmp_path / "b", config, w), "cpu", torch.float32)
    assert torch.equal(model.layers[2].attn.wo.bias, torch.ones(32))
    qwen2 = {**config, "architectures": ["Qwen2ForCausalLM"]}
    assert "o_proj.bias" in load_error(write_checkpoint(tmp_path / "c", qwen2, w))  # unexpected there


def test_rope_parameters_per_layer_type_are_one_clear_error(tmp_path):
    config = {**CONFIG, "rope_parameters": {"full_attention": {"rope_theta": 1e6, "rope_type": "default"}}}
    message = load_error(write_checkpoint(tmp_path, config, random_tensors(CONFIG, 0)))
    assert message.endswith("rope_parameters must be one object of numbers (not one per layer type)")


def test_qwen2_has_qkv_biases_whatever_attention_bias_says(tmp_path):
    """transformers' Qwen2Attention builds q/k/v with bias=True and never reads attention_bias;
    before, a Qwen2 config.json with "attention_bias": false refused the biases as unexpected."""
    config = {**CONFIG, "architectures": ["Qwen2ForCausalLM"], "attention_bias": False}
    w = random_tensors(config, 0)
    model = load_model(write_checkpoint(tmp_path, config, w), "cpu", torch.float32)
    expected = torch.cat([w[f"model.layers.1.self_attn.{x}_proj.bias"] for x in "qkv"])
    assert torch.equal(model.layers[1].attn.wqkv.bias, expected) and model.layers[1].attn.wo.bias is None


def test_many_missing_tensors_are_summarised(tmp_path):
    w = {k: v for k, v in random_tensors(CONFIG, 0).items() if not k.startswith("model.layers.")}
    message = load_error(write_checkpoint(tmp_path, CONFIG, w))
    assert "missing" in message and "more" in message


def test_wrong_shape_names_tensor_and_both_shapes(tmp_path):
    w = random_tensors(CONFIG, 0)
    name = "model.layers.1.self_attn.k_proj.weight"
    w[name] = torch.zeros(24, 32)  # expected (2 KV heads * 8, 32) = (16, 32)
    message = load_error(write_checkpoint(tmp_path, CONFIG, w))
    assert name in message and "(24, 32)" in message and "(16, 32)" in message


def test_unexpected_tensor_is_named(tmp_path):
    w = {**random_tensors(CONFIG, 0), "model.layers.0.self_attn.q_norm.weight": torch.ones(8)}
    assert "model.layers.0.self_attn.q_norm.weight" in load_error(write_checkpoint(tmp_path, CONFIG, w))


def test_bias_in_a_checkpoint_without_attention_bias_is_unexpected(tmp_path):
    w = {**random_tensors(CONFIG, 0), "model.layers.0.self_attn.q_proj.bias": torch.zeros(32)}
    assert "model.layers.0.self_attn.q_proj.bias" in load_error(write_checkpoint(tmp_path, CONFIG, w))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool])
def test_integer_tensor_is_an_error(tmp_path, dtype):
    w = random_tensors(CONFIG, 0)
    w["model.norm.weight"] = torch.ones(32, dtype=dtype)
    message = load_error(write_checkpoint(tmp_path, CONFIG, w))
    assert "model.norm.weight" in message and "dtype" in message


# ---------------------------------------------------------------------------- file errors

@pytest.mark.parametrize("keep", [0.5, 0.9, 0.0001])
def test_truncated_safetensors_file(tmp_path, keep):
    path = write_checkpoint(tmp_path, CONFIG, random_tensors(CONFIG, 0))
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:max(1, int(len(data) * keep))])
    assert "model.safetensors" in load_error(path)


def test_garbage_safetensors_file(tmp_path):
    path = write_checkpoint(tmp_path, CONFIG, random_tensors(CONFIG, 0))
    (path / "model.safetensors").write_bytes(b"this is not a safetensors file at all" * 10)
    assert "model.safetensors" in load_error(path)


def test_no_weights_file(tmp_path):
    path = write_checkpoint(tmp_path, CONFIG, random_tensors(CONFIG, 0))
    (path / "model.safetensors").unlink()
    assert "model.safetensors" in load_error(path)


def test_index_naming_a_missing_shard(tmp_path):
    path = write_sharded(tmp_path, random_tensors(CONFIG, 0), 3)
    (path / "model-00002-of-00003.safetensors").unlink()
    assert "model-00002-of-00003.safetensors" in load_error(path)


def test_invalid_index(tmp_path):
    path = write_sharded(tmp_path, random_tensors(CONFIG, 0), 2)
    (path / "model.safetensors.index.json").write_text("{\"weight_map\": ")
    assert "model.safetensors.index.json" in load_error(path)


def test_not_a_directory(tmp_path):
    assert "not a directory" in load_error(tmp_path / "nowhere")


# ---------------------------------------------------------------------------- config errors

def test_config_missing(tmp_path):
    path = write_checkpoint(tmp_path, CONFIG, random_tensors(CONFIG, 0))
    (path / "config.json").unlink()
    assert "config.json" in load_error(path)


@pytest.mark.parametrize("text", ["{\"hidden_size\": 32,", "", "not json", "\xff\xfe"])
def test_config_invalid_json(tmp_path, text):
    path = write_checkpoint(tmp_path, CONFIG, random_tensors(CONFIG, 0))
    (path / "config.json").write_bytes(text.encode("latin-1"))
    message = load_error(path)
    assert "config.json" in message and "JSON" in message


def test_config_not_an_object(tmp_path):
    path = write_checkpoint(tmp_path, CONFIG, random_tensors(CONFIG, 0))
    (path / "config.json").write_text("[1, 2, 3]")
    assert "config.json" in load_error(path)


@pytest.mark.parametrize("architectures", [["MistralForCausalLM"], ["GPT2LMHeadModel"], [], None])
def test_unsupported_architecture(tmp_path, architectures):
    config = {**CONFIG, "architectures": architectures}
    message = load_error(write_checkpoint(tmp_path, config, random_tensors(CONFIG, 0)))
    assert "architecture" in message and "not supported" in message
    assert all(name in message for name in SUPPORTED_ARCHITECTURES)  # says what would work
    if architectures:
        assert architectures[0] in message


@pytest.mark.parametrize("scaling", [{"type": "longrope", "factor": 2.0}, {"rope_type": "su"}])
def test_unsupported_rope_type(tmp_path, scaling):
    config = {**CONFIG, "rope_scaling": scaling}
    message = load_error(write_checkpoint(tmp_path, config, random_tensors(CONFIG, 0)))
    kind = scaling.get("rope_type", scaling.get("type"))
    assert kind in message and "not supported" in message


def test_config_missing_key(tmp_path):
    config = {k: v for k, v in CONFIG.items() if k != "intermediate_size"}
    assert "intermediate_size" in load_error(write_checkpoint(tmp_path, config, random_tensors(CONFIG, 0)))


SIZE_ERRORS = [  # CONFIG: hidden 32, 4 heads, 2 KV heads, head_dim 8, 3 layers, vocabulary 61, MLP 48
    ({"num_key_value_heads": 3}, r"config.json: num_attention_heads \(4\) must be a multiple of num_key_value_heads "
                                 r"\(3\)$"),
    ({"num_attention_heads": 3}, r"num_attention_heads \(3\) must be a multiple of num_key_value_heads \(2\)$"),
    ({"head_dim": 7}, r"config.json: head_dim must be even, not 7$"),
    ({"head_dim": None, "hidden_size": 3}, r"config.json: hidden_size / num_attention_heads \(3 / 4\) makes head_dim "
                                           r"0, which must be even and at least 2: correct them, or give head_dim$"),
    ({"head_dim": None, "hidden_size": 36}, r"hidden_size / num_attention_heads \(36 / 4\) makes head_dim 9"),
    ({"hidden_size": 0}, r"config.json: hidden_size must be a positive integer, not 0$"),
    ({"vocab_size": "many"}, r"config.json: vocab_size must be a positive integer, not 'many'$"),
    # the tensors are CONFIG's: the field that disagrees with them is named
    ({"vocab_size": 100}, r"model.safetensors: tensor lm_head.weight has shape \(61, 32\), expected \(100, 32\) from "
                          r"config.json's vocab_size$"),
    ({"intermediate_size": 40}, r"tensor model.layers.0.mlp.down_proj.weight has shape \(32, 48\), expected "
                                r"\(32, 40\) from config.json's intermediate_size$"),
    ({"num_key_value_heads": 1}, r"tensor model.layers.0.self_attn.k_proj.weight has shape \(16, 32\), expected "
                                 r"\(8, 32\) from config.json's num_key_value_heads \* head_dim$"),
    ({"num_hidden_layers": 5}, r"no tensors for layers 3 and above: the checkpoint has 3 layers, config.json's "
                               r"num_hidden_layers says 5$"),
    ({"num_hidden_layers": 2}, r"model.safetensors: tensor model.layers.2.\S+ is for layer 2, past config.json's "
                               r"num_hidden_layers \(2\)$"),
]


@pytest.mark.parametrize("change, message", SIZE_ERRORS, ids=[json.dumps(change) for change, _ in SIZE_ERRORS])
def test_sizes_that_disagree_name_the_field(tmp_path, change, message):
    """Before, the heads and head_dim cases said "inconsistent sizes (heads 4, KV heads 3, head_dim
    8)", and those of the tensors named a tensor and a shape but no field of config.json."""
    config = {k: v for k, v in {**CONFIG, **change}.items() if v is not None}
    error = load_error(write_checkpoint(tmp_path, config, random_tensors(CONFIG, 0)))
    assert re.search(message, error), error


def test_sliding_window_is_refused(tmp_path):
    config = {**CONFIG, "architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True}
    assert "sliding" in load_error(write_checkpoint(tmp_path, config, random_tensors(CONFIG, 0)))


@pytest.mark.parametrize("scaling", [{"rope_type": "linear"}, {"rope_type": "llama3", "factor": 8.0},
                                     {"rope_type": "dynamic"}, [1], {"rope_type": "yarn"},
                                     {"type": "yarn", "factor": 4.0, "beta_fast": "32"},
                                     {"type": "yarn", "factor": 0.5},
                                     {"type": "yarn", "factor": 2.0, "truncate": "no"}])
def test_incomplete_rope_scaling_is_a_checkpoint_error(tmp_path, scaling):
    config = {**CONFIG, "rope_scaling": scaling}
    assert "rope_scaling" in load_error(write_checkpoint(tmp_path, config, random_tensors(CONFIG, 0)))


@pytest.mark.parametrize("change", [{"hidden_act": "gelu"}, {"mlp_bias": True}])
def test_unsupported_mlp_is_refused(tmp_path, change):
    assert "SwiGLU" in load_error(write_checkpoint(tmp_path, {**CONFIG, **change}, random_tensors(CONFIG, 0)))
