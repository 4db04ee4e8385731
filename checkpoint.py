"""Hugging Face Llama checkpoints: config.json -> ModelConfig, safetensors -> the model's fused parameters.

    model = load_model("path/to/checkpoint", "cuda", torch.bfloat16)

Weights are read with `safetensors` one tensor at a time, straight into the (possibly fused)
parameters of model.py's Llama; every problem is a CheckpointError naming the file, the tensor or
the config.json key. config.json is read once (read_hf_config) into a dict that every reader
takes: the model here, the tokenizer, the methods that a checkpoint may configure (methods.py).
"""

import json
import math
import re
from pathlib import Path

from safetensors import SafetensorError, safe_open

from model import ModelConfig, build_model, scaling_type

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")
# rope_scaling type -> the numbers it needs, and those it may give (a number or null)
ROPE_KEYS = {"default": (), "linear": ("factor",), "dynamic": ("factor",),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
             "yarn": ("factor",)}
OPTIONAL_ROPE_KEYS = {"yarn": ("original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor",
                               "mscale", "mscale_all_dim")}


class CheckpointError(Exception):
    """A checkpoint directory that cannot be loaded; the message names the file or tensor."""


def read_hf_config(directory):
    """The config.json of checkpoint `directory` as a dict; CheckpointError when the directory or
    the file is missing or it is not a JSON object."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory")
    path = directory / "config.json"
    try:
        hf = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found: a checkpoint directory needs config.json")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})")
    if not isinstance(hf, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return hf


def entry(hf, key, kind, default=None):
    """hf[key], or `default` where it is absent or null (None: a required key), checked: int (a
    positive JSON integer), float (a positive finite JSON number) or bool (true or false)."""
    value = hf.get(key)
    if value is None:
        if default is None:
            raise KeyError(key)
        return default
    if kind is bool:
        if type(value) is not bool:
            raise ValueError(f"{key} must be true or false, not {value!r}")
        return value
    number = type(value) is int or (kind is float and type(value) is float and math.isfinite(value))
    if not number or value <= 0:
        raise ValueError(f"{key} must be a positive {'integer' if kind is int else 'number'}, not {value!r}")
    return kind(value)


def head_dim(hf, dim, n_heads):
    """config.json's head_dim, else hidden_size / num_attention_heads: even, as RoPE rotates pairs."""
    given = entry(hf, "head_dim", int, 0)
    size = given or dim // n_heads
    if given and size % 2:
        raise ValueError(f"head_dim must be even, not {size}")
    if not given and (size < 2 or size % 2):
        raise ValueError(f"hidden_size / num_attention_heads ({dim} / {n_heads}) makes head_dim {size}, which must "
                         "be even and at least 2: correct them, or give head_dim")
    return size


def model_config(hf, path):
    """config.json (hf, a dict) of a Hugging Face Llama or Qwen2 checkpoint -> ModelConfig;
    CheckpointError names what is wrong, and `path`."""
    arch = (hf.get("architectures") or ["<none>"])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"{path}: architecture {arch} is not supported "
                              f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    try:
        if entry(hf, "use_sliding_window", bool, False):
            raise CheckpointError(f"{path}: sliding-window attention is not supported")
        if hf.get("hidden_act", "silu") != "silu" or entry(hf, "mlp_bias", bool, False):
            raise CheckpointError(f"{path}: only the SwiGLU MLP (hidden_act silu, no mlp_bias) is supported")
        dim, n_heads = entry(hf, "hidden_size", int), entry(hf, "num_attention_heads", int)
        # transformers' Qwen2 has q/k/v biases whatever attention_bias says (its config has no such key)
        bias = arch == "Qwen2ForCausalLM" or entry(hf, "attention_bias", bool, False)
        theta, scaling, rope_key = rope_entries(hf)
        config = ModelConfig(
            vocab_size=entry(hf, "vocab_size", int),
            dim=dim,
            n_layers=entry(hf, "num_hidden_layers", int),
            n_heads=n_heads,
            n_kv_heads=entry(hf, "num_key_value_heads", int, n_heads),
            head_dim=head_dim(hf, dim, n_heads),
            ffn_dim=entry(hf, "intermediate_size", int),
            norm_eps=entry(hf, "rms_norm_eps", float, 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=entry(hf, "max_position_embeddings", int, 2048),
            tie_word_embeddings=entry(hf, "tie_word_embeddings", bool, False),
            attention_bias=bias,
            output_bias=arch == "LlamaForCausalLM" and bias,
        )
    except KeyError as e:
        raise CheckpointError(f"{path}: missing key {e.args[0]}")
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}")
    check_config(config, path, rope_key)
    return config


def rope_entries(hf):
    """(rope_theta, rope_scaling, the key that gave the scaling) of config.json: transformers 5
    writes both into rope_parameters (rope_type "default": none), transformers 4 as rope_theta
    and rope_scaling. Reading only the latter would take a 5.x Llama-3's base of 500,000 for 10,000."""
    params = hf.get("rope_parameters")
    if params is None:
        return entry(hf, "rope_theta", float, 10000.0), hf.get("rope_scaling"), "rope_scaling"
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise ValueError("rope_parameters must be one object of numbers (not one per layer type)")
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    default = scaling_type(scaling) == "default"
    return entry(params, "rope_theta", float, 10000.0), None if default else scaling, "rope_parameters"


def check_config(c, path, rope_key):
    """What entry() cannot check alone: the sizes that must agree, and RoPE's scaling (read from
    config.json's `rope_key`)."""
    if c.n_heads % c.n_kv_heads:
        raise CheckpointError(f"{path}: num_attention_heads ({c.n_heads}) must be a multiple of "
                              f"num_key_value_heads ({c.n_kv_heads})")
    if c.rope_scaling is not None and not isinstance(c.rope_scaling, dict):
        raise CheckpointError(f"{path}: {rope_key} must be an object or null")
    if c.rope_type not in ROPE_KEYS:
        raise CheckpointError(f"{path}: {rope_key} type {c.rope_type!r} is not "
                              f"supported (supported: {', '.join(ROPE_KEYS)})")
    missing = [k for k in ROPE_KEYS[c.rope_type] if not isinstance(c.rope_scaling.get(k), (int, float))]
    if missing:
        raise CheckpointError(f"{path}: {rope_key} of type {c.rope_type} needs a number for "
                              f"{', '.join(missing)}")
    bad = [k for k in OPTIONAL_ROPE_KEYS.get(c.rope_type, ())
           if c.rope_scaling.get(k) is not None and not isinstance(c.rope_scaling[k], (int, float))]
    if bad:
        raise CheckpointError(f"{path}: {rope_key} of type {c.rope_type}: {', '.join(bad)} must be a number "
                              "or null")
    yarn = c.rope_scaling if c.rope_type == "yarn" else {}
    if yarn and (yarn["factor"] < 1 or not isinstance(yarn.get("truncate", True), bool)):
        raise CheckpointError(f"{path}: {rope_key} of type yarn needs a factor of at least 1 and truncate "
                              "true or false")


def checkpoint_tensors(config):
    """Hugging Face tensor name -> (parameter name, row slice into a fused parameter, shape as
    (size, the config.json fields that make it) per dimension)."""
    H, Hkv, D, F = config.n_heads, config.n_kv_heads, config.head_dim, config.ffn_dim
    q, kv = H * D, Hkv * D
    vocab, dim, ffn = (config.vocab_size, "vocab_size"), (config.dim, "hidden_size"), (F, "intermediate_size")
    q_rows, kv_rows = (q, "num_attention_heads * head_dim"), (kv, "num_key_value_heads * head_dim")
    names = {"model.embed_tokens.weight": ("embed.weight", None, (vocab, dim)),
             "model.norm.weight": ("norm.weight", None, (dim,))}
    if not config.tie_word_embeddings:
        names["lm_head.weight"] = ("lm_head.weight", None, (vocab, dim))
    for i in range(config.n_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        names[hf + "input_layernorm.weight"] = (ours + "attn_norm.weight", None, (dim,))
        names[hf + "post_attention_layernorm.weight"] = (ours + "mlp_norm.weight", None, (dim,))
        for proj, rows, size in (("q", slice(0, q), q_rows), ("k", slice(q, q + kv), kv_rows),
                                 ("v", slice(q + kv, q + 2 * kv), kv_rows)):
            names[f"{hf}self_attn.{proj}_proj.weight"] = (ours + "attn.wqkv.weight", rows, (size, dim))
            if config.attention_bias:
                names[f"{hf}self_attn.{proj}_proj.bias"] = (ours + "attn.wqkv.bias", rows, (size,))
        names[hf + "self_attn.o_proj.weight"] = (ours + "attn.wo.weight", None, (dim, q_rows))
        if config.output_bias:
            names[hf + "self_attn.o_proj.bias"] = (ours + "attn.wo.bias", None, (dim,))
        names[hf + "mlp.gate_proj.weight"] = (ours + "mlp.w_gate_up.weight", slice(0, F), (ffn, dim))
        names[hf + "mlp.up_proj.weight"] = (ours + "mlp.w_gate_up.weight", slice(F, 2 * F), (ffn, dim))
        names[hf + "mlp.down_proj.weight"] = (ours + "mlp.w_down.weight", None, (dim, ffn))
    return names


def layer_of(name):
    """The layer index in a Hugging Face tensor name, None outside the layers."""
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return int(m[1]) if m else None


def shape_error(name, shape, dims):
    """A tensor's `shape` against the (size, fields) dims config.json gives it, naming the fields that differ."""
    expected = tuple(size for size, _ in dims)
    wrong = [f for (size, f), n in zip(dims, shape) if size != n] if len(shape) == len(dims) else [f for _, f in dims]
    return f"tensor {name} has shape {shape}, expected {expected} from config.json's {', '.join(wrong)}"


def ignored_tensor(name, config):
    """Tensors some checkpoints carry that the model does not use."""
    return name.endswith("rotary_emb.inv_freq") or (config.tie_word_embeddings and name == "lm_head.weight")


def safetensors_files(path):
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid index ({e})")
        return sorted({path / f for f in weight_map.values()})
    if (path / "model.safetensors").exists():
        return [path / "model.safetensors"]
    raise CheckpointError(f"{path}: no model.safetensors (or sharded model-*.safetensors "
                          f"with model.safetensors.index.json)")


def load_weights(model, files):
    """Copy each checkpoint tensor into its (possibly fused) parameter, one tensor at a time."""
    expected = checkpoint_tensors(model.config)
    params = dict(model.named_parameters())
    device = next(model.parameters()).device
    loaded = set()
    for file in files:
        try:
            with safe_open(file, framework="pt", device=str(device)) as f:
                for name in f.keys():
                    if ignored_tensor(name, model.config):
                        continue
                    if name not in expected:
                        layer, n = layer_of(name), model.config.n_layers
                        raise CheckpointError(f"{file.name}: tensor {name} is for layer {layer}, past config.json's "
                                              f"num_hidden_layers ({n})" if layer is not None and layer >= n else
                                              f"{file.name}: unexpected tensor {name}")
                    param_name, rows, dims = expected[name]
                    tensor = f.get_tensor(name)
                    if tuple(tensor.shape) != tuple(size for size, _ in dims):
                        raise CheckpointError(f"{file.name}: {shape_error(name, tuple(tensor.shape), dims)}")
                    if not tensor.is_floating_point():
                        raise CheckpointError(f"{file.name}: tensor {name} has dtype "
                                              f"{tensor.dtype}, expected a floating-point type")
                    target = params[param_name].data
                    (target if rows is None else target[rows]).copy_(tensor)
                    loaded.add(name)
        except FileNotFoundError:
            raise CheckpointError(f"{file} not found")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file}: not a readable safetensors file ({e})")
    missing = sorted(set(expected) - loaded)
    absent = sorted(set(range(model.config.n_layers)) - {layer_of(name) for name in loaded})
    if absent and absent[0] > 0 and absent == list(range(absent[0], model.config.n_layers)):
        raise CheckpointError(f"{files[0].parent}: no tensors for layers {absent[0]} and above: the checkpoint has "
                              f"{absent[0]} layers, config.json's num_hidden_layers says {model.config.n_layers}")
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{files[0].parent}: missing tensors {', '.join(missing[:3])}{more}")


def load_model(path, device, dtype, hf=None):
    """A Hugging Face Llama checkpoint directory -> Llama in eval mode on `device` in `dtype`.
    hf: its config.json, when the caller has read it (read_hf_config)."""
    path = Path(path)
    config = model_config(read_hf_config(path) if hf is None else hf, path / "config.json")
    files = safetensors_files(path)
    model = build_model(config, device, dtype)
    load_weights(model, files)
    return model
