"""Sessions (Engine.open): how soon a later question answers from a document's encoding, against a
fresh prefill of the same method, with memory.

    python eval/session_bench.py --model llama3-8b --contexts 32768 131072 524288 --out results/session_llama3_8b
    python eval/session_bench.py --model qwen2.5-1.5b --contexts 32768 131072 524288 --out results/session_qwen

Models: bench.py's random bf16 shapes (llama3-8b, ...), the embedded checkpoints by name, or a
checkpoint directory (tests/assets/stories260K runs on a CPU, in float32). For each context length
and method (default parallelcomp): bench.py's random prompt (its last QUESTION_TOKENS tokens the
question) is prefilled afresh, the median of --repeats after a warm-up on its first tokens; then a
session encodes the document (the method's open) and is asked --questions questions of
QUESTION_TOKENS random tokens in turn, the first of them the fresh prefill's. A question's latency
is its time to the first token's logits (encoding.ask), as the fresh prefill's is. Reported: the
fresh prefill, the encoding, question 1 and the median and slowest of questions 2..N, the speed-up
of those over the fresh prefill, the session's cache (bytes, and where: the GPU, or the CPU where
ParallelComp's store was offloaded, see --session-cache-gib), the peak memory of the fresh prefill
and of the questions, and whether question 1 chose the fresh prefill's chunks and first token.
Writes PREFIX.json after every row and prints the table.
"""

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import (DECODE_STEPS, QUESTION_TOKENS, RANDOM_SHAPES, WARM_UP_TOKENS, random_model,  # noqa: E402
                   random_prompt, ready_config, seconds)
from checkpoint import load_model  # noqa: E402
from engine import peak_memory  # noqa: E402
from methods import METHODS, add_options, parse_specs  # noqa: E402
from prefill import MemoryShortage, OptionError, Prompt  # noqa: E402
from weights import MODELS, resolve  # noqa: E402


def load(name, device):
    """A random shape of bench.py, an embedded checkpoint by name, or a checkpoint directory."""
    if name in RANDOM_SHAPES:
        return random_model(RANDOM_SHAPES[name], device)
    path = resolve(name) if name in MODELS else Path(name)
    return load_model(path, device, torch.bfloat16 if device.type == "cuda" else torch.float32)


def question(config, context, i):
    """Question i of a session over the context of that length: the prompt's own for i = 0."""
    if i == 0:
        return random_prompt(config, context).question
    generator = torch.Generator().manual_seed(context + i)
    return torch.randint(0, config.vocab_size, (QUESTION_TOKENS,), generator=generator).tolist()


def reset_peak(device):
    gc.collect()  # a failed row's exception chain holds its frames, and their tensors, in a cycle
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def document_of(prompt):
    """The prompt without its question: what a session encodes."""
    return Prompt(prompt.head, prompt.context, [], prompt.bos_id, prompt.eos_ids)


def clocked(fn, device):
    """(fn(), the seconds it took on the device)."""
    out = []
    return out, seconds(lambda: out.append(fn()), device)


def bench_row(model, context, method, config, questions, repeats, limit):
    """One method at one context length: the fresh prefill, then a session of `questions`."""
    device = model.device
    prompt = random_prompt(model.config, context)
    prefill, opened = METHODS[method].prefill, METHODS[method].open
    warm_up = Prompt([], prompt.context[:WARM_UP_TOKENS - QUESTION_TOKENS], prompt.question)
    with torch.inference_mode():
        prefill(model, warm_up, config, DECODE_STEPS)  # the attention plans of its shapes
        opened(model, document_of(warm_up), config, DECODE_STEPS, limit).ask(warm_up, DECODE_STEPS)
        reset_peak(device)
        fresh = [clocked(lambda: prefill(model, prompt, config, DECODE_STEPS), device) for _ in range(repeats)]
        fresh_s, fresh_peak = statistics.median(s for _, s in fresh), peak_memory(device)
        expected = fresh[-1][0].pop()
        first, stats = int(expected.logits.argmax()), expected.stats
        del fresh, expected
        reset_peak(device)
        (encoding,), open_s = clocked(lambda: opened(model, document_of(prompt), config, DECODE_STEPS, limit), device)
        asked, same = [], None
        for i in range(questions):
            ask = Prompt(prompt.head, prompt.context, question(model.config, context, i))
            (answer,), s = clocked(lambda: encoding.ask(ask, DECODE_STEPS), device)
            asked.append(s)
            if i == 0:
                same = int(answer.logits.argmax()) == first and \
                    answer.stats.get("kept_chunks") == stats.get("kept_chunks")
            del answer
        session_peak = peak_memory(device)
    later = asked[1:] or asked
    return dict(fresh_s=fresh_s, open_s=open_s, question_s=asked, first_s=asked[0], later_s=statistics.median(later),
                later_max_s=max(later), speedup=fresh_s / statistics.median(later), cache_bytes=encoding.nbytes,
                cache_home=str(encoding.home), fresh_peak_bytes=fresh_peak, session_peak_bytes=session_peak,
                same_as_fresh=same, chunks=stats.get("chunks"))


def table(rows):
    lines = ["| model | method | context | fresh s | open s | question 1 s | questions 2+ s (median, max) | "
             "speed-up | cache GiB (where) | peak GiB fresh, session | as fresh |", "|---" * 11 + "|"]
    for r in rows:
        head = f"| {r['model']} | {r['method']} | {r['context']} |"
        if "error" in r:
            lines.append(f"{head} {r['error']} | | | | | | | |")
            continue
        lines.append(f"{head} {r['fresh_s']:.3f} | {r['open_s']:.3f} | {r['first_s']:.3f} | "
                     f"{r['later_s']:.3f}, {r['later_max_s']:.3f} | {r['speedup']:.1f}x | "
                     f"{r['cache_bytes'] / 2**30:.2f} ({r['cache_home']}) | {r['fresh_peak_bytes'] / 2**30:.1f}, "
                     f"{r['session_peak_bytes'] / 2**30:.1f} | {'yes' if r['same_as_fresh'] else 'NO'} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", nargs="+", default=["llama3-8b"],
                   help=f"{', '.join(RANDOM_SHAPES)} (random weights), {', '.join(MODELS)}, or a checkpoint directory")
    p.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072, 524288])
    p.add_argument("--methods", nargs="+", default=["parallelcomp"], metavar="METHOD[:FLAG=VALUE,...]",
                   help="methods of the table, each in the settings after its colon")
    p.add_argument("--questions", type=int, default=10, help="questions per session")
    p.add_argument("--repeats", type=int, default=1, help="fresh prefills timed (the median)")
    p.add_argument("--session-cache-gib", type=float,
                   help="the most device memory a session's encoding takes (default: the engine's)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--out", default="results/session", help="writes PREFIX.json")
    add_options(p)
    args = p.parse_args(argv)
    try:
        runs = parse_specs(args.methods, args)
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    if args.questions < 1 or args.repeats < 1:
        p.error("--questions and --repeats must be at least 1")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    limit = None if args.session_cache_gib is None else int(args.session_cache_gib * 2**30)
    result = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", rows=[])

    def add(row):
        """Print the row and rewrite the JSON: a run stopped midway keeps what it measured."""
        result["rows"].append(row)
        print(table(result["rows"][-1:]).splitlines()[-1], flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(f"{args.out}.json").write_text(json.dumps(result, indent=1))

    print(result["device"])
    for name in args.model:
        model = load(name, device)
        for context in args.contexts:
            for label, (method, overrides) in runs.items():
                row = dict(model=name, method=label, context=context)
                start = time.perf_counter()
                try:
                    row.update(bench_row(model, context, method, ready_config(model, method, overrides),
                                         args.questions, args.repeats, limit))
                except (MemoryShortage, OptionError, torch.OutOfMemoryError) as e:
                    row.update(error=str(e).strip().splitlines()[0])
                add(dict(row, wall_s=time.perf_counter() - start))
        del model
        reset_peak(device)
    print(table(result["rows"]))


if __name__ == "__main__":
    main()
