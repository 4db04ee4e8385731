"""Passkey and needle retrieval over a grid of context lengths × depths, one heatmap per method.

    python eval/passkey.py --tasks passkey needle --lengths 4096 8192 16384 32768 65536 --out results/retrieval

passkey: a 5-digit key hidden in filler text at a depth, asked for at the end; a trial scores 1
when the answer contains the key. needle: a sentence about San Francisco inserted at a sentence
boundary into essays cut to the length; a trial scores the share of the needle's key words (eat,
sandwich, sit, Dolores, Park, sunny) that the answer contains. Writes PREFIX.json and
PREFIX_{task}_{method}.png (mean score per length × depth), prints mean scores per length.
"""

import json
import random
import re
import time
from pathlib import Path

from common import (METHODS, Rows, draw_heatmap, file_label, length_label, load_engine, log, markdown_table,
                    mean_score, output_path, parser, runs)

INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. "
               "Find it and memorize it. I will quiz you about the important information there.\n\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"

ESSAYS = Path(__file__).resolve().parents[2] / "shared" / "data" / "essays" / "paul_graham_essays.json"
SF_INSTRUCTION = "Read the essays below and answer the question after them.\n\n"
SF_NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
SF_QUESTION = "What is the best thing to do in San Francisco? The best thing to do in San Francisco is"
SF_KEYWORDS = ("eat", "sandwich", "sit", "dolores", "park", "sunny")
MAX_NEW_TOKENS = {"passkey": 8, "needle": 32}


def passkey_document(tokenizer, n_tokens, depth, key):
    """Filler of about n_tokens tokens with the needle inserted at `depth` (0..1) of it."""
    per_filler = len(tokenizer.encode(FILLER))
    n_fill = max(1, (n_tokens - len(tokenizer.encode(INSTRUCTION + QUESTION))) // per_filler)
    at = round(depth * n_fill)
    return FILLER * at + NEEDLE.format(key=key) + FILLER * (n_fill - at)


def passkey_keys(n, seed=0):
    rng = random.Random(seed)
    return [str(rng.randrange(10000, 100000)) for _ in range(n)]


def read_haystack(path):
    """The text of a .json file holding {"text": ...} (RULER's essays), or of a text file."""
    text = Path(path).read_text(encoding="utf-8")
    return json.loads(text)["text"] if Path(path).suffix == ".json" else text


def needle_document(tokenizer, haystack_ids, n_tokens, depth):
    """Haystack text of about n_tokens tokens (counting the prompt's other parts) with the needle
    at the last sentence boundary before `depth` (0..1) of its characters."""
    budget = n_tokens - len(tokenizer.encode(SF_INSTRUCTION + SF_NEEDLE + SF_QUESTION))
    if budget > len(haystack_ids):
        raise ValueError(f"the haystack has {len(haystack_ids)} tokens, {budget} needed")
    text = tokenizer.decode(haystack_ids[:max(budget, 0)])
    boundary = text.rfind(". ", 0, round(depth * len(text)))
    at = boundary + 2 if boundary >= 0 else 0
    return text[:at] + SF_NEEDLE + " " + text[at:]


def needle_score(answer):
    words = set(re.findall(r"[a-z]+", answer.lower()))
    return sum(w in words for w in SF_KEYWORDS) / len(SF_KEYWORDS)


def trials(tokenizer, task, n_tokens, depth, keys, haystack_ids):
    """(document, instruction, question, score function) of each trial in one grid cell."""
    if task == "passkey":
        return [(passkey_document(tokenizer, n_tokens, depth, key), INSTRUCTION, QUESTION,
                 lambda answer, key=key: float(key in answer)) for key in keys]
    return [(needle_document(tokenizer, haystack_ids, n_tokens, depth), SF_INSTRUCTION, SF_QUESTION, needle_score)]


def run(engine, tasks, lengths, depths, keys, haystack_ids, methods, rows):
    """methods: {label: (method, {field: value})}; one row per trial and label, appended to rows."""
    for task in tasks:
        for n_tokens in lengths:
            for depth in depths:
                cell = trials(engine.tokenizer, task, n_tokens, depth, keys, haystack_ids)
                for trial, (document, instruction, question, score) in enumerate(cell):
                    for method, (name, overrides) in methods.items():
                        start = time.perf_counter()
                        out = engine.generate(document, question, instruction=instruction, method=name,
                                              max_new_tokens=MAX_NEW_TOKENS[task], options={name: overrides})
                        rows.append(dict(task=task, length=n_tokens, depth=depth, trial=trial, method=method,
                                         prompt_tokens=out.stats["prompt_tokens"], answer=out.text,
                                         score=score(out.text), seconds=time.perf_counter() - start))
                        log(f"{task} {n_tokens} depth {depth} #{trial} {method}: {rows[-1]['score']:.2f} {out.text!r}")


def heatmap(rows, task, method, path):
    """Mean score per (depth, length) cell: lengths across, depths down."""
    lengths, depths = sorted({r["length"] for r in rows}), sorted({r["depth"] for r in rows})
    grid = [[mean_score(rows, task=task, method=method, length=n, depth=d) for n in lengths] for d in depths]
    draw_heatmap(grid, [length_label(n) for n in lengths], [f"{d:.0%}" for d in depths],
                 "context length (tokens)", "depth", f"{task}, {method}", path)


def score_table(rows, tasks, methods):
    lines = [[task, length_label(n)] + [f"{100 * mean_score(rows, task=task, length=n, method=m):.0f}"
                                        for m in methods]
             for task in tasks for n in sorted({r["length"] for r in rows})]
    return markdown_table(["task", "length"] + list(methods), lines)


def main(argv=None):
    p = parser(__doc__, "passkey", list(METHODS))
    p.set_defaults(**{"parallelcomp.top_k_chunks": 1})  # as the original forces for passkey
    p.add_argument("--tasks", nargs="+", choices=("passkey", "needle"), default=["passkey", "needle"])
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536])
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    p.add_argument("--keys", type=int, default=3, help="passkey trials per (length, depth)")
    p.add_argument("--haystack", default=str(ESSAYS) if ESSAYS.exists() else None,
                   help="needle: essays JSON ({\"text\": ...}) or a text file")
    args = p.parse_args(argv)
    methods = runs(p, args)
    if "needle" in args.tasks and not args.haystack:
        p.error(f"{ESSAYS} is absent: give the needle task a --haystack")
    engine = load_engine(args)
    haystack_ids = []
    if "needle" in args.tasks:  # about 8 characters per token covers every tokenizer here
        haystack_ids = engine.tokenizer.encode(read_haystack(args.haystack)[:8 * max(args.lengths)])
    rows = Rows(args.out, args)
    run(engine, args.tasks, args.lengths, args.depths, passkey_keys(args.keys), haystack_ids, methods, rows)
    rows.finish()
    for task in args.tasks:
        for method in args.methods:
            heatmap(rows, task, method, output_path(args.out, f"_{task}_{file_label(method)}.png"))
    print(score_table(rows, args.tasks, args.methods))


if __name__ == "__main__":
    main()
