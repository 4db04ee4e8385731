"""Prefill and decode speed against the GPU's physical limits, beside transformers.

    python bench.py --model both --contexts 8192 32768 131072 --out bench.json
    python bench.py --model prolong-8b --contexts 65536 131072 262144 524288 \
        --methods full parallelcomp:chunk-tokens=8192 --no-transformers --out bench_prolong.json

Models: the embedded checkpoints, SmolLM2-135M (`smollm2`) and Qwen2.5-Coder-1.5B (`qwen2.5-1.5b`),
fetched on first use (`both` is smollm2 and llama3-8b), and models with random bf16 weights made on
the GPU in the shapes of Llama-3-8B (8K window), Llama-3.1-8B (128K) and ProLong-8B-512K
(Llama-3-8B with RoPE base 1.28e8 and a 512K window). A model without shipped Locret heads gets
random ones of Locret's published shape (1024 wide): speed does not depend on their values. For
each context length and method it measures prefill time (after a warm-up on the prompt's first
tokens, which builds the attention plans of its shapes) and decode time per token with CUDA
graphs, and prints each beside its floor: prefill FLOPs over the bf16 matmul rate, decode bytes
(weights + KV read per token) over the copy bandwidth, both measured in the same run. A length
whose cache does not fit, or that a method's window refuses (yarn's), is a row saying so. transformers (its class for the checkpoint, sdpa)
runs the same shapes when it is installed, twice: eager with its dynamic cache, as it runs
by default, and in the fast path its documentation recommends (a StaticCache, each decode step
compiled with torch.compile's reduce-overhead mode; the compile timed apart).
"""

import argparse
import json
import time
from dataclasses import replace

import torch

from checkpoint import load_model
from decoding import Decoder, SamplingParams
from locret import random_heads, ships_heads
from methods import METHODS, add_options, parse_specs
from model import ModelConfig, build_model
from prefill import MemoryShortage, OptionError, Prompt
from weights import MODELS, resolve

LLAMA3_8B = ModelConfig(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                        ffn_dim=14336, norm_eps=1e-5, rope_theta=500000.0, rope_scaling=None,
                        max_position_embeddings=8192, tie_word_embeddings=False, attention_bias=False,
                        output_bias=False)
# Qwen2.5-Coder-1.5B's shape: q/k/v biases, heads of 128, 12 over 2 KV heads, an untied head. Its speed
# and memory are the real checkpoint's, which a GPU machine without the 1.07 GB GGUF cannot load.
QWEN25_1_5B = ModelConfig(vocab_size=151936, dim=1536, n_layers=28, n_heads=12, n_kv_heads=2, head_dim=128,
                          ffn_dim=8960, norm_eps=1e-6, rope_theta=1e6, rope_scaling=None,
                          max_position_embeddings=32768, tie_word_embeddings=False, attention_bias=True,
                          output_bias=False)
RANDOM_SHAPES = {"llama3-8b": LLAMA3_8B,
                 "llama3.1-8b": replace(LLAMA3_8B, max_position_embeddings=131072),
                 "prolong-8b": replace(LLAMA3_8B, rope_theta=1.28e8, max_position_embeddings=524288),
                 "qwen2.5-1.5b-shape": QWEN25_1_5B}
LOCRET_HIDDEN = 1024  # the width of Locret's published heads
WARM_UP_TOKENS = 16384  # a causal-prefill piece and a piece after it; ParallelComp's chunk batches
QUESTION_TOKENS = 64
DECODE_STEPS = 256  # the answer budget: cache room for warm-up and timed decode steps
TIMED_STEPS, REPEATS = 32, 5  # decode: the median of 5 runs of 32 steps, after one warm-up run
COMPILE_CALLS = 3  # torch.compile's reduce-overhead mode records its CUDA graph by the third call


# ---------------------------------------------------------------------------- what the benchmarks share

def timed(fn, repeat=1, device="cuda"):
    """Median seconds of fn() over `repeat` runs, after one warm-up."""
    fn()
    times = sorted(seconds(fn, torch.device(device)) for _ in range(repeat))
    return times[len(times) // 2]


def seconds(fn, device):
    """The time fn() takes: between device events on a GPU, by the clock elsewhere (eval/distributed_bench.py
    runs on CPUs too)."""
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / 1e3


def random_model(config, device):
    """A Llama of `config` with random bf16 weights, N(0, 0.02) from seed 0: the same on every GPU."""
    model = build_model(config, device, torch.bfloat16)
    gen = torch.Generator(device).manual_seed(0)
    for param in model.parameters():
        param.normal_(0, 0.02, generator=gen)
    return model


def random_prompt(config, context):
    """`context` random tokens drawn from a seed of that length, the last QUESTION_TOKENS of them the question."""
    ids = torch.randint(0, config.vocab_size, (context,), generator=torch.Generator().manual_seed(context)).tolist()
    return Prompt([], ids[:-QUESTION_TOKENS], ids[-QUESTION_TOKENS:])


# ---------------------------------------------------------------------------- physical limits


def measure_limits():
    """Copy bandwidth (bytes read + written per second) and the dense bf16 matmul rate."""
    x = torch.empty(2 ** 31, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    bandwidth = 2 * x.numel() / timed(lambda: y.copy_(x), 10)
    del x, y
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    flops = 2 * 8192 ** 3 / timed(lambda: a @ b, 10)
    return bandwidth, flops


def layer_params(c):
    return c.n_layers * (c.dim * (c.n_heads + 2 * c.n_kv_heads) * c.head_dim + c.n_heads * c.head_dim * c.dim
                         + 3 * c.dim * c.ffn_dim)


def forward_flops(c, tokens, keys):
    """FLOPs of a forward of `tokens` queries over `keys` keys of which the last `tokens` are causal."""
    attention = 4 * c.n_layers * c.n_heads * c.head_dim * tokens * (keys - tokens + (tokens + 1) / 2)
    return 2 * layer_params(c) * tokens + attention


def weight_bytes(c, element=2):
    return element * (layer_params(c) + c.vocab_size * c.dim)


def kv_bytes_per_token(c, element=2):
    return 2 * c.n_layers * c.n_kv_heads * c.head_dim * element


# ---------------------------------------------------------------------------- our engine

def prefill_flops(c, stats):
    """FLOPs of a prefill from what it reports: its forwards and the rows it sent through the LM head."""
    return sum(forward_flops(c, tokens, keys) for tokens, keys in stats["forwards"]) \
        + 2 * stats["scored_tokens"] * c.vocab_size * c.dim


def ready_config(model, method, overrides):
    """The method's config with `overrides`, ready for a model without a tokenizer: random Locret
    heads where none ship, a token a word for text options (speed depends on their length only)."""
    c = model.config
    config = METHODS[method].config(**overrides)
    if method == "locret" and config.retaining_heads is None and not ships_heads(c):
        config = replace(config, retaining_heads=random_heads(c, LOCRET_HIDDEN))
    return METHODS[method].ready(config, model, lambda text: [sum(map(ord, w)) % c.vocab_size for w in text.split()])


def bench_engine(model, context, label, method, overrides, bandwidth, matmul_rate):
    c = model.config
    prompt = random_prompt(c, context)
    config = ready_config(model, method, overrides)
    prefill = METHODS[method].prefill
    row = dict(engine="ours", method=label, context=context)
    try:
        with torch.inference_mode():
            warm_up = Prompt([], prompt.context[:WARM_UP_TOKENS - QUESTION_TOKENS], prompt.question)
            prefill(model, warm_up, config, DECODE_STEPS)
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            prefilled = prefill(model, prompt, config, DECODE_STEPS)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            prefill_memory = torch.cuda.max_memory_allocated()
            cached = prefilled.cache.lens.max().item()
            decoder = Decoder(prefilled.model or model, prefilled.cache, int(prefilled.logits.argmax()),
                              prefilled.next_position, DECODE_STEPS, SamplingParams().sampler("cuda"), True)
            decode = timed(lambda: decoder.run(TIMED_STEPS), REPEATS) / TIMED_STEPS
    except (MemoryShortage, OptionError) as e:  # a cache that does not fit; a prompt past yarn's window
        return dict(row, error=str(e))
    flops = prefill_flops(c, prefilled.stats)
    extra = {k: prefilled.stats[k] for k in ("chunks", "kv_bytes", "full_kv_bytes") if k in prefilled.stats}
    decode_bytes = weight_bytes(c) + kv_bytes_per_token(c) * cached
    prefill_floor, decode_floor = flops / matmul_rate, decode_bytes / bandwidth
    return dict(row, **extra, cache_tokens=cached,
                prefill_s=seconds, prefill_tok_s=context / seconds, prefill_floor_s=prefill_floor,
                prefill_ratio=prefill_floor / seconds, prefill_tflops=flops / seconds / 1e12,
                decode_ms=decode * 1e3, decode_tok_s=1 / decode, decode_floor_ms=decode_floor * 1e3,
                decode_ratio=decode_floor / decode, peak_gib=prefill_memory / 2 ** 30)


# ---------------------------------------------------------------------------- transformers

def transformers_model(c, checkpoint):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    if checkpoint:
        return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
    hf = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.ffn_dim,
                     num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
                     head_dim=c.head_dim, rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
                     max_position_embeddings=131072, tie_word_embeddings=c.tie_word_embeddings)
    hf._attn_implementation = "sdpa"
    with torch.device("cuda"):
        return LlamaForCausalLM(hf).to(torch.bfloat16).eval()


def peer_row(row, c, context, prefill, decode, bandwidth, matmul_rate):
    """A transformers row: prefill and decode seconds beside the floors of full attention."""
    prefill_floor = forward_flops(c, context, context) / matmul_rate
    decode_floor = (weight_bytes(c) + kv_bytes_per_token(c) * context) / bandwidth
    return dict(row, prefill_s=prefill, prefill_tok_s=context / prefill, prefill_floor_s=prefill_floor,
                prefill_ratio=prefill_floor / prefill, decode_ms=decode * 1e3, decode_tok_s=1 / decode,
                decode_floor_ms=decode_floor * 1e3, decode_ratio=decode_floor / decode,
                peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30)


def bench_transformers(model, c, context, bandwidth, matmul_rate):
    """transformers as it runs by default: eager, its dynamic cache."""
    ids = torch.randint(0, c.vocab_size, (1, context), device="cuda")
    row = dict(engine="transformers", method="full", context=context)
    try:
        with torch.inference_mode():
            model(ids[:, :1024], use_cache=True, logits_to_keep=1)
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            out = model(ids, use_cache=True, logits_to_keep=1)
            torch.cuda.synchronize()
            prefill = time.perf_counter() - start
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(TIMED_STEPS):
                out = model(token, past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            decode = (time.perf_counter() - start) / TIMED_STEPS
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return dict(row, error="out of memory")
    return peer_row(row, c, context, prefill, decode, bandwidth, matmul_rate)


def bench_transformers_compiled(model, c, context, bandwidth, matmul_rate):
    """transformers' fast path, as its documentation recommends it: a StaticCache, the prefill eager
    (as generate runs it), every decode step a forward compiled with mode="reduce-overhead" (CUDA
    graphs). compile_s: the first COMPILE_CALLS steps, which compile and record the graphs."""
    from transformers import StaticCache
    ids = torch.randint(0, c.vocab_size, (1, context), device="cuda")
    row = dict(engine="transformers+compile", method="full", context=context)
    torch._dynamo.reset()  # a static graph per context: after a failed guard dynamo would go dynamic
    step = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    try:
        with torch.inference_mode():
            cache = StaticCache(config=model.config, max_cache_len=context + COMPILE_CALLS + (REPEATS + 1) * TIMED_STEPS)
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1,
                        cache_position=torch.arange(context, device="cuda"))
            torch.cuda.synchronize()
            prefill = time.perf_counter() - start
            state = dict(token=out.logits[:, -1:].argmax(-1), position=context)

            def run(steps):
                for _ in range(steps):
                    at = torch.tensor([state["position"]], device="cuda")
                    logits = step(state["token"], past_key_values=cache, use_cache=True, cache_position=at,
                                  position_ids=at[None]).logits
                    state.update(token=logits[:, -1:].argmax(-1), position=state["position"] + 1)
            start = time.perf_counter()
            run(COMPILE_CALLS)
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - start
            decode = timed(lambda: run(TIMED_STEPS), REPEATS) / TIMED_STEPS
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return dict(row, error="out of memory")
    return dict(peer_row(row, c, context, prefill, decode, bandwidth, matmul_rate), compile_s=compile_s)


# ---------------------------------------------------------------------------- report

def table(rows):
    lines = ["| model | engine | method | context | prefill s (floor, ratio) | prefill tok/s | "
             "decode ms/tok (floor, ratio) | decode tok/s | peak GiB |", "|---" * 9 + "|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['engine']} | {r['method']} | {r['context']} | {r['error']} | | | | |")
            continue
        engine = r["engine"] + (f" (compiled in {r['compile_s']:.1f} s)" if "compile_s" in r else "")
        lines.append(f"| {r['model']} | {engine} | {r['method']} | {r['context']} | "
                     f"{r['prefill_s']:.3f} ({r['prefill_floor_s']:.3f}, {100 * r['prefill_ratio']:.0f} %) | "
                     f"{r['prefill_tok_s']:,.0f} | {r['decode_ms']:.3f} ({r['decode_floor_ms']:.3f}, "
                     f"{100 * r['decode_ratio']:.0f} %) | {r['decode_tok_s']:,.0f} | {r['peak_gib']:.1f} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", nargs="+", choices=(*MODELS, *RANDOM_SHAPES, "both"), default=["both"])
    p.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    p.add_argument("--methods", nargs="+", default=["full", "parallelcomp"], metavar="METHOD[:FLAG=VALUE,...]",
                   help="methods of the table, each in the settings after its colon")
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--out", default="bench.json")
    add_options(p)
    args = p.parse_args()
    try:
        runs = parse_specs(args.methods, args)
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    bandwidth, matmul_rate = measure_limits()
    print(f"{torch.cuda.get_device_name()}: copy {bandwidth / 1e12:.2f} TB/s, bf16 matmul {matmul_rate / 1e12:.0f} TFLOP/s")
    rows = []

    def add(row):
        """Print the row and rewrite the JSON: a run stopped midway keeps what it measured."""
        rows.append(row)
        print(table(rows[-1:]).splitlines()[-1], flush=True)
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), copy_bytes_per_s=bandwidth, bf16_flops=matmul_rate,
                           rows=rows), f, indent=1)

    names = [n for name in args.model for n in (("smollm2", "llama3-8b") if name == "both" else (name,))]
    for name in dict.fromkeys(names):
        if name in MODELS:
            checkpoint = resolve(name)
            model = load_model(checkpoint, "cuda", torch.bfloat16)
        else:
            checkpoint = None
            model = random_model(RANDOM_SHAPES[name], "cuda")
        for context in args.contexts:
            for label, (method, overrides) in runs.items():
                add(dict(model=name, **bench_engine(model, context, label, method, overrides, bandwidth, matmul_rate)))
        config = model.config
        del model
        torch.cuda.empty_cache()
        if not args.no_transformers:
            try:
                hf = transformers_model(config, checkpoint)
            except ImportError:
                print("transformers is not installed: no peer run")
                continue
            for peer in (bench_transformers, bench_transformers_compiled):
                for context in args.contexts:
                    add(dict(model=name, **peer(hf, config, context, bandwidth, matmul_rate)))
            del hf
            torch.cuda.empty_cache()
    print(table(rows))


if __name__ == "__main__":
    main()
