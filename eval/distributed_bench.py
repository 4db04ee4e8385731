"""ParallelComp on one GPU beside several (torchrun), in one launch: prefill and decode speed, peak
memory, the kept chunks and passkey answers.

    torchrun --standalone --nproc-per-node 2 eval/distributed_bench.py --out results/distributed

Bench: bench.py's Llama-3-8B-shaped model with random bf16 weights (the same on every GPU), its
random prompt for each context length and its timer. Each run is ParallelComp's prefill on rank 0 alone (the
one-process code, the other ranks idle), then over every rank with kv_placement gather and sharded;
with --all-kept-context every chunk is kept (top-k = the number of chunks), a cache only sharded
may hold. Decode: the median ms per token of runs of 32 steps, a CUDA graph on rank 0 for one GPU
and gather, eager in lockstep for sharded. Passkey: SmolLM2 on eval/passkey.py's documents,
top-1 chunk, keys × depths per length, each placement's kept chunk and answer beside one GPU's.
Writes PREFIX.json after every row ("complete": false until the end) and prints both tables (rank 0).
"""

import argparse
import functools
import gc
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import distributed  # noqa: E402
import parallelcomp  # noqa: E402
import ranks  # noqa: E402
from bench import DECODE_STEPS, LLAMA3_8B, REPEATS, TIMED_STEPS, random_model, random_prompt, timed  # noqa: E402
from checkpoint import load_model  # noqa: E402
from decoding import Decoder, SamplingParams, decode  # noqa: E402
from engine import Engine  # noqa: E402
from parallelcomp import ParallelCompConfig  # noqa: E402
from passkey import INSTRUCTION, QUESTION, passkey_document, passkey_keys  # noqa: E402

PLACEMENTS = ("one", "gather", "sharded")  # one: rank 0 alone, the one-process code
PASSKEY_TOKENS = 8


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prefill(model, prompt, config, placement, answer_budget):
    """(Prefilled or None, seconds on this rank): every rank starts together."""
    dist.barrier()
    synchronize(model.device)
    start = time.perf_counter()
    if placement == "one":
        prefilled = parallelcomp.prefill(model, prompt, config, answer_budget) if ranks.rank() == 0 else None
    else:
        prefilled = distributed.prefill(model, prompt, replace(config, kv_placement=placement), answer_budget)
    synchronize(model.device)
    return prefilled, time.perf_counter() - start


def decode_ms(model, prefilled):
    """Median ms per decode step over REPEATS runs of TIMED_STEPS, after one warm-up run."""
    device = model.device
    graph = device.type == "cuda" and prefilled.cache.graph_safe
    decoder = Decoder(model, prefilled.cache, int(prefilled.logits.argmax()), prefilled.next_position, DECODE_STEPS,
                      SamplingParams().sampler(device), graph)
    return 1e3 * timed(lambda: decoder.run(TIMED_STEPS), REPEATS, device) / TIMED_STEPS


def peak_gib(device):
    if device.type != "cuda":
        return 0.0
    return torch.cuda.max_memory_allocated(device) / 2 ** 30


def bench_row(model, prompt, config, placement):
    """One placement at one context: rank 0's timings, every rank's peak memory."""
    device = model.device
    gc.collect()  # a failed row's exception chain holds its frames, and their tensors, in a cycle
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    row = dict(placement=placement, top_k_chunks=config.top_k_chunks)

    def run():
        with torch.inference_mode():
            prefilled, seconds = prefill(model, prompt, config, placement, DECODE_STEPS)
            if prefilled is None or prefilled.cache is None:  # another rank decodes
                return None
            return seconds, decode_ms(model, prefilled), prefilled.stats
    try:
        result = ranks.checked(run)
        seconds, ms, stats = ranks.from_rank0(lambda: result)
        row.update(prefill_s=seconds, decode_ms=ms, chunks=stats["chunks"], kept_chunks=stats["kept_chunks"],
                   cache_tokens=stats["forwards"][-1][1])
    except (torch.OutOfMemoryError, ranks.RankError) as e:  # one GPU's out of memory reaches every rank
        row.update(error=ranks.describe(e))
    peaks = [None] * ranks.world()
    dist.all_gather_object(peaks, peak_gib(device))
    return dict(row, peak_gib=peaks)


def bench(model, contexts, all_kept_context, add):
    """add(row) for each (context, placement)."""
    c = model.config
    runs = [(n, ParallelCompConfig()) for n in contexts]
    if all_kept_context:
        prompt = random_prompt(c, all_kept_context)
        spans = parallelcomp.context_spans(model, prompt, ParallelCompConfig(), DECODE_STEPS)
        runs.append((all_kept_context, ParallelCompConfig(top_k_chunks=len(spans))))
    warm = random_prompt(c, 3 * c.max_position_embeddings)  # several chunks: cuDNN plans, cuBLAS handles
    for placement in PLACEMENTS:
        bench_row(model, warm, ParallelCompConfig(), placement)
    for context, config in runs:
        prompt = random_prompt(c, context)
        for placement in PLACEMENTS:
            row = dict(context=context, **bench_row(model, prompt, config, placement))
            add(row)
            log(bench_table([row]).splitlines()[-1])


def bench_table(rows):
    one = {(r["context"], r["top_k_chunks"]): r for r in rows if r["placement"] == "one"}
    lines = ["| context | top-k | placement | prefill s | speed-up | decode ms/tok | peak GiB per rank | "
             "kept as one GPU |", "|---" * 8 + "|"]
    for r in rows:
        base = one.get((r["context"], r["top_k_chunks"]), {})
        if "error" in r:
            lines.append(f"| {r['context']} | {r['top_k_chunks']} | {r['placement']} | {r['error']} | | | "
                         f"{', '.join(f'{p:.1f}' for p in r['peak_gib'])} | |")
            continue
        speedup = f"{base['prefill_s'] / r['prefill_s']:.2f}x" if "prefill_s" in base else ""
        same = "" if "kept_chunks" not in base else "yes" if base["kept_chunks"] == r["kept_chunks"] else "NO"
        lines.append(f"| {r['context']} | {r['top_k_chunks']} | {r['placement']} | {r['prefill_s']:.2f} | {speedup} | "
                     f"{r['decode_ms']:.2f} | {', '.join(f'{p:.1f}' for p in r['peak_gib'])} | {same} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- passkey

def answer(engine, prompt, config, placement):
    """(text, kept chunks) of one placement; every rank returns rank 0's."""
    model, sampler = engine.model, SamplingParams().sampler(engine.device)

    def generate(prefilled):
        tokens = decode(model, prefilled, sampler, PASSKEY_TOKENS, engine.tokenizer.eos_ids,
                        engine.device.type == "cuda", lambda t: None)[0]
        return engine.tokenizer.decode(tokens), prefilled.stats["kept_chunks"]
    with torch.inference_mode():
        if placement == "one":
            return ranks.from_rank0(lambda: generate(parallelcomp.prefill(model, prompt, config,
                                                                                 PASSKEY_TOKENS)))
        prefilled = distributed.prefill(model, prompt, replace(config, kv_placement=placement), PASSKEY_TOKENS)
        return ranks.decoded(prefilled, lambda: generate(prefilled))


def passkey(engine, lengths, depths, keys, add):
    """add(row) for each (length, depth, key)."""
    config = ParallelCompConfig(top_k_chunks=1)  # top-1, as eval/passkey.py
    for n in lengths:
        for depth in depths:
            for key in passkey_keys(keys):
                prompt = engine.layout(passkey_document(engine.tokenizer, n, depth, key), QUESTION, INSTRUCTION)
                row = dict(length=n, depth=depth, key=key)
                for placement in PLACEMENTS:
                    text, kept = answer(engine, prompt, config, placement)
                    row[placement] = dict(answer=text, found=key in text, kept_chunks=kept)
                add(row)
                log(f"passkey {n} depth {depth} key {key}: " + ", ".join(
                    f"{p} {row[p]['kept_chunks']} {row[p]['answer']!r}" for p in PLACEMENTS))


def passkey_table(rows):
    lines = ["| length | " + " | ".join(f"{p} found" for p in PLACEMENTS) + " | same chunk as one GPU | same answer |",
             "|---" * (len(PLACEMENTS) + 3) + "|"]
    for n in sorted({r["length"] for r in rows}):
        cell = [r for r in rows if r["length"] == n]
        found = [f"{sum(r[p]['found'] for r in cell)}/{len(cell)}" for p in PLACEMENTS]
        same_chunk = sum(all(r[p]["kept_chunks"] == r["one"]["kept_chunks"] for p in PLACEMENTS) for r in cell)
        same_answer = sum(all(r[p]["answer"] == r["one"]["answer"] for p in PLACEMENTS) for r in cell)
        lines.append(f"| {n} | " + " | ".join(found) + f" | {same_chunk}/{len(cell)} | {same_answer}/{len(cell)} |")
    return "\n".join(lines)


def log(message):
    if ranks.rank() == 0:
        print(message, file=sys.stderr, flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[131072, 524288],
                   help="bench context lengths (0: no bench)")
    p.add_argument("--all-kept-context", type=int, default=524288,
                   help="a context benched with every chunk kept (0: none)")
    p.add_argument("--bench-model", help="a checkpoint to bench instead of the random-weight Llama-3-8B shape")
    p.add_argument("--passkey-lengths", type=int, nargs="+", default=[32768, 131072], help="0: no passkey")
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    p.add_argument("--keys", type=int, default=3, help="passkey trials per (length, depth)")
    p.add_argument("--passkey-model", help="checkpoint for the passkey runs (default: SmolLM2-135M-Instruct)")
    p.add_argument("--device", help="cuda (one GPU per process) or cpu")
    p.add_argument("--out", default="results/distributed", help="writes PREFIX.json")
    args = p.parse_args()
    device = torch.device(ranks.init(args.device))
    if ranks.world() == 1:
        p.error("start it with torchrun --nproc-per-node N (N >= 2): it compares one GPU with N")
    result = dict(processes=ranks.world(), device=torch.cuda.get_device_name(device) if device.type == "cuda"
                  else "cpu", complete=False, bench=[], passkey=[])

    def add(part, row):
        result[part].append(row)
        save()

    def save():
        """Rank 0 rewrites PREFIX.json: a run stopped midway keeps its rows."""
        if ranks.rank() == 0:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(f"{args.out}.json").write_text(json.dumps(result, indent=1))

    if any(args.contexts) or args.all_kept_context:
        if args.bench_model:
            model = load_model(args.bench_model, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
        else:
            model = random_model(LLAMA3_8B, device)
        bench(model, [n for n in args.contexts if n], args.all_kept_context, functools.partial(add, "bench"))
        del model
    if any(args.passkey_lengths):
        engine = Engine(args.passkey_model, args.device, log=log)
        lengths = [n for n in args.passkey_lengths if n]
        passkey(engine, lengths, args.depths, args.keys, functools.partial(add, "passkey"))
    result["complete"] = True
    save()
    if ranks.rank() == 0:
        print(f"{result['processes']} processes on {result['device']}")
        if result["bench"]:
            print(bench_table(result["bench"]))
        if result["passkey"]:
            print(passkey_table(result["passkey"]))


if __name__ == "__main__":
    main()
