"""Passkey retrieval: a 5-digit key hidden in filler text at a given depth, asked for at the end.

    python eval/passkey.py --lengths 16384 32768 65536 --methods parallelcomp full truncate

Each prompt is the instruction, filler with the needle at `depth`, then the question; a run is
correct when the generated text contains the key. Prints an accuracy table and writes JSON.
"""

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import Engine  # noqa: E402
from parallelcomp import ParallelCompConfig  # noqa: E402

INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. "
               "Find it and memorize it. I will quiz you about the important information there.\n\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"


def passkey_document(tokenizer, n_tokens, depth, key):
    """Filler of about n_tokens tokens with the needle inserted at `depth` (0..1) of it."""
    per_filler = len(tokenizer.encode(FILLER))
    n_fill = max(1, (n_tokens - len(tokenizer.encode(INSTRUCTION + QUESTION))) // per_filler)
    at = round(depth * n_fill)
    return FILLER * at + NEEDLE.format(key=key) + FILLER * (n_fill - at)


def passkey_keys(n, seed=0):
    rng = random.Random(seed)
    return [str(rng.randrange(10000, 100000)) for _ in range(n)]


def run(engine, lengths, depths, keys, methods, parallel, max_new_tokens=8):
    rows = []
    for n_tokens in lengths:
        for depth in depths:
            for key in keys:
                document = passkey_document(engine.tokenizer, n_tokens, depth, key)
                for method in methods:
                    start = time.perf_counter()
                    out = engine.generate(document, QUESTION, instruction=INSTRUCTION, method=method,
                                          max_new_tokens=max_new_tokens, parallel=parallel)
                    rows.append(dict(length=n_tokens, depth=depth, key=key, method=method,
                                     prompt_tokens=out.stats["prompt_tokens"], answer=out.text,
                                     correct=key in out.text, seconds=time.perf_counter() - start))
    return rows


def accuracy_table(rows, methods):
    lengths = sorted({r["length"] for r in rows})
    lines = ["| length | " + " | ".join(methods) + " |", "|---:|" + "---:|" * len(methods)]
    for n in lengths:
        cells = []
        for m in methods:
            hits = [r["correct"] for r in rows if r["length"] == n and r["method"] == m]
            cells.append(f"{100 * sum(hits) / len(hits):.0f} % ({sum(hits)}/{len(hits)})")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768, 65536])
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    p.add_argument("--keys", type=int, default=3, help="keys per (length, depth)")
    p.add_argument("--methods", nargs="+", default=["parallelcomp", "full", "truncate"])
    p.add_argument("--chunk-tokens", type=int)
    p.add_argument("--top-k-chunks", type=int, default=1, help="1, as the original forces for passkey")
    p.add_argument("--device")
    p.add_argument("--out", default="passkey.json")
    args = p.parse_args()
    engine = Engine(args.model, args.device, log=lambda m: print(m, file=sys.stderr))
    parallel = ParallelCompConfig(chunk_tokens=args.chunk_tokens, top_k_chunks=args.top_k_chunks)
    rows = run(engine, args.lengths, args.depths, passkey_keys(args.keys), args.methods, parallel)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    print(accuracy_table(rows, args.methods))


if __name__ == "__main__":
    main()
