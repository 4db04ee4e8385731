"""Perplexity of a fixed 256-token segment of a book given the N tokens before it, per method.

    python eval/ppl.py --lengths 1024 4096 8192 16384 32768 65536 131072 --out results/ppl

Every method prefills the N tokens (with BOS) as its context and leaves room for the segment,
which is then scored as the continuation of its cache: full attention over all N; truncate keeps
the first and last halves of what the window leaves; streaming, StreamingLLM's cache. A method
that scores by a question (parallelcomp) takes the last --query-tokens of the N as the question
(never the segment itself). Prints a table of perplexity per N, writes PREFIX.json and a plot PREFIX.png.
"""

import math
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from common import Rows, length_label, load_engine, log, markdown_table, output_path, parser, runs
from methods import METHODS  # after common, which puts the repository on sys.path
from prefill import Prompt

BOOK = Path(__file__).resolve().parents[2] / "shared" / "data" / "books" / "war_and_peace.txt"


def book_tokens(tokenizer, path, offset, n_tokens):
    """n_tokens tokens of the book from character `offset` on."""
    text = Path(path).read_text(encoding="utf-8")[offset:]
    ids = tokenizer.encode(text[:8 * n_tokens])  # about 8 characters per token covers every tokenizer here
    if len(ids) < n_tokens:
        raise ValueError(f"{path} from character {offset} has {len(ids)} tokens, {n_tokens} needed")
    return ids[:n_tokens]


def continuation_nll(model, prefilled, target):
    """Mean NLL of `target` after a prefilled cache whose last logits (vocab,) predict target[0]:
    target[:-1] is fed at positions next_position.. after each layer's live entries."""
    device, position = model.device, prefilled.next_position
    positions = torch.arange(position, position + len(target) - 1, device=device)[None]
    hidden = model(torch.tensor([target[:-1]], device=device), positions, prefilled.cache.append_attend)
    predictions = torch.cat([prefilled.logits[None], model.logits(hidden[0])])
    return F.cross_entropy(predictions, torch.tensor(target, device=device)).item()


def context_prompt(engine, name, context, query_len):
    """The N tokens as a prompt: all context, or for a method that scores by a question, the last
    query_len of them as its question."""
    tok = engine.tokenizer
    split = len(context) - query_len if METHODS[name].needs_question else len(context)
    return Prompt(tok.bos_prefix, context[:split], context[split:], tok.bos_id, tok.eos_ids)


def run(engine, tokens, lengths, target_len, query_len, methods, rows):
    """tokens: max(lengths) tokens of context then the target; methods: {label: (method, {field: value})};
    one row per (N, label), appended to rows."""
    target, end = tokens[-target_len:], len(tokens) - target_len
    for n in lengths:
        for method, (name, overrides) in methods.items():
            start = time.perf_counter()
            with torch.inference_mode():
                prompt = context_prompt(engine, name, tokens[end - n:end], query_len)
                config = engine.method_config(name, overrides=overrides)
                prefilled = METHODS[name].prefill(engine.model, prompt, config, target_len)
                nll = continuation_nll(prefilled.model or engine.model, prefilled, target)
            rows.append(dict(context_tokens=n, method=method, nll=nll, ppl=math.exp(nll),
                             seconds=time.perf_counter() - start))
            log(f"N={n} {method}: ppl {rows[-1]['ppl']:.2f}")


def ppl_of(rows, n, method):
    return next(r["ppl"] for r in rows if r["context_tokens"] == n and r["method"] == method)


def plot(rows, lengths, methods, path):
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method in methods:
        ax.plot(lengths, [ppl_of(rows, n, method) for n in lengths], marker="o", label=method)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [length_label(n) for n in lengths])
    ax.minorticks_off()
    ax.set_yscale("log")
    ax.set(xlabel="preceding tokens N", ylabel="perplexity of the target segment")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv=None):
    p = parser(__doc__, "ppl", ["full", "truncate", "parallelcomp"])
    p.add_argument("--book", default=str(BOOK), help="UTF-8 text file")
    p.add_argument("--offset", type=int, default=200_000, help="character where the first context begins")
    p.add_argument("--lengths", type=int, nargs="+",
                   default=[1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072], help="preceding tokens N")
    p.add_argument("--target-tokens", type=int, default=256)
    p.add_argument("--query-tokens", type=int, default=256,
                   help="methods that score by a question: the context tokens that stand in for it")
    args = p.parse_args(argv)
    methods = runs(p, args)
    lengths = sorted(args.lengths)
    if args.target_tokens < 2:
        p.error("--target-tokens must be at least 2")
    if not 0 < args.query_tokens < lengths[0]:
        p.error(f"--query-tokens must be between 1 and the shortest N ({lengths[0]})")
    engine = load_engine(args)
    if len(engine.tokenizer.bos_prefix) + args.query_tokens + args.target_tokens >= engine.window:
        p.error(f"--query-tokens and --target-tokens must leave room for context in the {engine.window}-token window")
    tokens = book_tokens(engine.tokenizer, args.book, args.offset, lengths[-1] + args.target_tokens)
    rows = Rows(args.out, args)
    run(engine, tokens, lengths, args.target_tokens, args.query_tokens, methods, rows)
    rows.finish()
    plot(rows, lengths, args.methods, output_path(args.out, ".png"))
    print(markdown_table(["N"] + args.methods,
                         [[n] + [f"{ppl_of(rows, n, m):.2f}" for m in args.methods] for n in lengths]))


if __name__ == "__main__":
    main()
