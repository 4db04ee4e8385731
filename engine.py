"""Answer questions over long documents with a Llama checkpoint: command line and Python API.

    python engine.py --prompt long.txt --question "Who wrote the letter?"

    from engine import Engine
    engine = Engine()                       # the embedded SmolLM2-135M-Instruct
    print(engine.generate(document, question="...").text)

Prefill is plain causal attention when the prompt fits the model's trained window and
ParallelComp (parallelcomp.py) when it does not; decoding runs one captured CUDA graph per token
on a GPU and the same step eagerly elsewhere.
"""

import argparse
import math
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import parallelcomp
from model import CheckpointError, KVCache, apply_rope, load_model
from tokenizer import StreamDecoder, Tokenizer, TokenizerError
from weights.smollm2 import WeightsError, ensure_default_model

METHODS = ("auto", "parallelcomp", "full", "truncate", "streaming")
SINK_TOKENS = 4  # StreamingLLM's attention sinks
PREFILL_PIECE = {"cuda": 8192, "cpu": 2048}  # tokens per plain-prefill forward
GRAPH_BLOCK = 16  # decode steps replayed between host syncs (streaming granularity on a GPU)
QUESTION_CAP = 256  # tokens of the last paragraph that stand in for a missing --question
CONTEXT_MARK = "\x00CONTEXT\x00"  # where the document goes inside a rendered chat template


class EngineError(Exception):
    """A request the engine cannot serve; the message says what to change."""


@dataclass
class Prompt:
    """Token layout shared by every method: [head][context][question].

    head precedes the context in every ParallelComp chunk (BOS, chat-template head,
    instruction); question is the question block (BOS + question, chat-template tail), empty for
    a plain continuation.
    """
    head: list[int]
    context: list[int]
    question: list[int]

    def ids(self):
        return self.head + self.context + self.question


@dataclass
class Generation:
    text: str
    tokens: list[int]
    stats: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------- sampling

def sample(logits, temperature, top_k, top_p, generator):
    """logits (B, V) float32 -> (B,) token ids, with no host sync (it runs inside the graph)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # keep the smallest head reaching top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0))
    # argmax(p / E) with E ~ Exp(1) is a draw from p, without a normalised distribution or a sync
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / noise).argmax(-1)


# ---------------------------------------------------------------------------- decoding

class Decoder:
    """The decode loop over static buffers. One step runs every layer, the LM head and sampling
    and appends the token to `out`; on a GPU the step is captured once as a CUDA graph and
    replayed per token, the cache's length tensors telling the kernels how much is live."""

    def __init__(self, model, cache, first_token, position, max_new_tokens, sampler, cuda_graph):
        device = cache.k.device
        self.model, self.cache, self.sampler = model, cache, sampler
        self.tok = torch.tensor([[first_token]], device=device)  # (1, 1) next input token
        self.pos = torch.tensor([[position]], device=device)  # (1, 1) its RoPE position (not the cache length under ParallelComp)
        self.out = torch.full((max_new_tokens,), first_token, device=device)
        self.n = torch.ones(1, dtype=torch.long, device=device)  # tokens in `out`
        self.graph = self.capture() if cuda_graph else None

    def step(self):
        hidden = self.model(self.tok, self.pos, self.cache.decode_attend)
        token = self.sampler(self.model.logits(hidden[:, -1]))
        self.tok.copy_(token.view(1, 1))
        self.pos += 1
        self.out.index_copy_(0, self.n, token)
        self.n += 1

    def capture(self):
        """Record one step as a CUDA graph; the warm-up it needs first leaves no trace."""
        buffers = (self.tok, self.pos, self.out, self.n, self.cache.lens)
        saved = [t.clone() for t in buffers]
        generator = self.sampler.generator
        rng = generator.get_state() if generator is not None else None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # cuBLAS handles, allocator; the K/V it writes are overwritten later
            for _ in range(2):
                self.step()
        torch.cuda.current_stream().wait_stream(stream)
        for t, value in zip(buffers, saved):
            t.copy_(value)
        graph = torch.cuda.CUDAGraph()
        if generator is not None:
            generator.set_state(rng)
            graph.register_generator_state(generator)
        with torch.cuda.graph(graph):
            self.step()
        return graph

    def run(self, steps):
        for _ in range(steps):
            self.graph.replay() if self.graph else self.step()


@dataclass
class Sampler:
    temperature: float
    top_k: int
    top_p: float
    generator: torch.Generator | None

    def __call__(self, logits):
        return sample(logits, self.temperature, self.top_k, self.top_p, self.generator)


# ---------------------------------------------------------------------------- prefill

def prefill_plain(model, ids, max_new_tokens):
    """Causal prefill at positions 0..T-1, in pieces; returns (cache, last logits, next position)."""
    device, dtype = model.embed.weight.device, model.embed.weight.dtype
    cache = KVCache(model.config, 1, len(ids) + max_new_tokens, device, dtype)
    tokens = torch.tensor([ids], device=device)
    piece = PREFILL_PIECE.get(device.type, PREFILL_PIECE["cuda"])
    for start in range(0, len(ids), piece):
        end = min(start + piece, len(ids))
        positions = torch.arange(start, end, device=device)[None]
        hidden = model(tokens[:, start:end], positions, cache.prefill_attend(start))
    return cache, model.logits(hidden[0, -1]), len(ids)


def truncate(ids, room):
    """The first and last halves of `room` tokens, as LongBench truncates its prompts."""
    if len(ids) <= room:
        return ids
    return ids[:room // 2] + ids[len(ids) - (room - room // 2):]


def prefill_streaming(model, ids, max_new_tokens):
    """StreamingLLM's cache policy over the prompt: blocks of tokens attend to the first
    SINK_TOKENS tokens and the most recent ones; older tokens are evicted, and the keys that stay
    are rotated back so that cache positions remain 0..n-1. Returns like prefill_plain."""
    device, dtype = model.embed.weight.device, model.embed.weight.dtype
    room = model.config.max_position_embeddings - max_new_tokens  # the cache never holds more during prefill
    block = max(1, room // 8)
    cache = KVCache(model.config, 1, room + max_new_tokens, device, dtype)
    n = 0
    for start in range(0, len(ids), block):
        tokens = ids[start:start + block]
        drop = max(0, n + len(tokens) - room)
        if drop:
            angles = -drop * model.inv_freq  # (D/2,): RoPE by a negative shift
            recent = slice(SINK_TOKENS + drop, n)
            cache.k[:, 0, :, SINK_TOKENS:n - drop] = apply_rope(cache.k[:, 0, :, recent], angles.cos(), angles.sin())
            cache.v[:, 0, :, SINK_TOKENS:n - drop] = cache.v[:, 0, :, recent].clone()
            n -= drop
        positions = torch.arange(n, n + len(tokens), device=device)[None]
        hidden = model(torch.tensor([tokens], device=device), positions, cache.prefill_attend(n))
        n += len(tokens)
    return cache, model.logits(hidden[0, -1]), n


# ---------------------------------------------------------------------------- the engine

def default_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def peak_memory(device):
    """Peak bytes: allocated GPU memory on CUDA, the process's resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Engine:
    """Load a checkpoint once, then call `generate` as often as needed."""

    def __init__(self, model_dir=None, device=None, dtype=None, log=lambda msg: None):
        if model_dir is None:
            model_dir = ensure_default_model(log)
        self.device = torch.device(device) if device else default_device()
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.model = load_model(model_dir, self.device, self.dtype)
        self.tokenizer = Tokenizer.from_dir(model_dir)
        self.window = self.model.config.max_position_embeddings

    # ------------------------------------------------------------------ prompt layout

    def layout(self, document, question=None, instruction=None, chat=False):
        """Token layout of [instruction + document] followed by the question block. The question
        follows the document verbatim, as prompt templates (LongBench's) expect: put the
        separator your format needs at its start (the command line puts a blank line)."""
        tok = self.tokenizer
        instruction = instruction or ""
        if chat:
            content = instruction + CONTEXT_MARK + (question or "")
            before, after = tok.render_chat([{"role": "user", "content": content}]).split(CONTEXT_MARK)
            return Prompt(tok.encode(before), tok.encode(document), tok.encode(after))
        head = tok.bos_prefix + (tok.encode(instruction) if instruction else [])
        return Prompt(head, tok.encode(document), tok.bos_prefix + tok.encode(question) if question else [])

    def split_question(self, document):
        """The last paragraph (at most QUESTION_CAP tokens) of a document given without a question."""
        body, _, last = document.rstrip().rpartition("\n\n")
        ids = self.tokenizer.encode(last)
        if len(ids) > QUESTION_CAP:
            rest = self.tokenizer.decode(ids[:-QUESTION_CAP])
            body = body + "\n\n" + rest if body else rest
            last = self.tokenizer.decode(ids[-QUESTION_CAP:])
        return body, last

    def check_options(self, method, max_new_tokens, temperature, top_p, top_k, parallel):
        n_layers, cal = self.model.config.n_layers, parallel.calibration
        for bad, message in (
                (method not in METHODS, f"unknown method {method!r} (choose from {', '.join(METHODS)})"),
                (max_new_tokens < 1, "--max-new-tokens must be at least 1"),
                (method in ("truncate", "streaming") and max_new_tokens + SINK_TOKENS >= self.window,
                 f"--max-new-tokens must leave room for the prompt in the model's {self.window}-token window"),
                (temperature < 0, "--temperature must be 0 (greedy) or positive"),
                (not 0 < top_p <= 1, "--top-p must be in (0, 1]"),
                (top_k < 0, "--top-k must be 0 (off) or positive"),
                (parallel.top_k_chunks < 1, "--top-k-chunks must be at least 1"),
                (parallel.chunk_tokens is not None and not 1 <= parallel.chunk_tokens <= self.window,
                 f"--chunk-tokens must be between 1 and the model's {self.window}-token window"),
                (parallel.kv_budget is not None and parallel.kv_budget < 1, "--kv-budget must be at least 1"),
                (cal is not None and cal.last_layer >= n_layers,
                 f"--calibrate layers must be below the model's {n_layers} layers")):
            if bad:
                raise EngineError(message)

    def choose_method(self, method, prompt, max_new_tokens):
        if method != "auto":
            return method
        return "full" if len(prompt.ids()) + max_new_tokens <= self.window else "parallelcomp"

    # ------------------------------------------------------------------ generate

    def generate(self, document, question=None, *, instruction=None, method="auto", max_new_tokens=256,
                 temperature=0.0, top_p=1.0, top_k=0, seed=None, chat=False,
                 parallel=parallelcomp.ParallelCompConfig(), cuda_graph=True, on_text=None, on_progress=None):
        """Answer `question` about `document` (or continue `document`), streaming text to on_text(str)."""
        self.check_options(method, max_new_tokens, temperature, top_p, top_k, parallel)
        if not document.strip() and not (question or "").strip():
            raise EngineError("the prompt is empty")
        prompt = self.layout(document, question, instruction, chat)
        method = self.choose_method(method, prompt, max_new_tokens)
        if method == "parallelcomp" and not prompt.question:
            document, question = self.split_question(document)
            prompt = self.layout(document, question, instruction, chat)
        if method == "parallelcomp" and parallel.chunk_tokens is None and \
                len(prompt.head) + len(prompt.question) + max_new_tokens >= self.window:
            raise EngineError(f"the question ({len(prompt.question)} tokens) and --max-new-tokens "
                              f"({max_new_tokens}) leave no room for context in the model's "
                              f"{self.window}-token window: shorten the question or lower --max-new-tokens")
        stats = {"method": method, "prompt_tokens": len(prompt.ids())}
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        with torch.inference_mode():
            if method == "parallelcomp":
                result = parallelcomp.prefill(self.model, prompt.head, prompt.context, prompt.question, parallel,
                                              max_new_tokens, self.tokenizer.bos_id, on_progress)
                cache, logits, position = result.cache, result.logits, result.next_position
                stats.update(chunks=result.chunks, kept_chunks=[c.index for c in result.kept],
                             kept_spans=[[c.span.start, c.span.stop] for c in result.kept],
                             evicted_tokens=result.evicted_tokens)
            elif method == "streaming":
                cache, logits, position = prefill_streaming(self.model, prompt.ids(), max_new_tokens)
            else:
                ids = prompt.ids()
                if method == "truncate":
                    ids = truncate(ids, self.window - max_new_tokens)
                stats["truncated_tokens"] = len(prompt.ids()) - len(ids)
                cache, logits, position = prefill_plain(self.model, ids, max_new_tokens)
            tokens = self.decode(cache, logits, position, prompt.ids(), max_new_tokens, temperature, top_p,
                                 top_k, seed, cuda_graph, on_text, stats, start)
        stats["peak_memory_bytes"] = peak_memory(self.device)
        return Generation(self.tokenizer.decode(tokens), tokens, stats)

    def decode(self, cache, logits, position, prompt_ids, max_new_tokens, temperature, top_p, top_k, seed,
               cuda_graph, on_text, stats, start):
        """Sample the first token from the prefill logits (never EOS), then run the decode loop."""
        generator = None
        if temperature > 0:
            generator = torch.Generator(self.device)
            generator.manual_seed(seed) if seed is not None else generator.seed()
        sampler = Sampler(temperature, top_k, top_p, generator)
        eos = self.tokenizer.eos_ids
        logits = logits.clone()
        logits[[i for i in eos if i < len(logits)]] = float("-inf")
        tokens = [sampler(logits[None]).item()]
        stats["prefill_seconds"] = time.perf_counter() - start
        streamer = StreamDecoder(self.tokenizer, prompt_ids[-8:])
        emit = on_text or (lambda text: None)
        emit(streamer.push(tokens[0]))
        decode_start = time.perf_counter()
        graph = cuda_graph and self.device.type == "cuda"
        if max_new_tokens > 1:
            decoder = Decoder(self.model, cache, tokens[0], position, max_new_tokens, sampler, graph)
            block = GRAPH_BLOCK if graph else 1
            while len(tokens) < max_new_tokens:
                steps = min(block, max_new_tokens - len(tokens))
                decoder.run(steps)
                new = decoder.out[len(tokens):len(tokens) + steps].tolist()
                ended = next((i for i, t in enumerate(new) if t in eos), None)
                for t in new[:ended]:
                    tokens.append(t)
                    emit(streamer.push(t))
                if ended is not None:
                    break
        emit(streamer.flush())
        elapsed = time.perf_counter() - decode_start
        stats.update(generated_tokens=len(tokens), decode_seconds=elapsed,
                     decode_tokens_per_second=(len(tokens) - 1) / elapsed if len(tokens) > 1 else 0.0)
        return tokens


# ---------------------------------------------------------------------------- command line

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--prompt", required=True, help="text file with the document, or - for stdin")
    p.add_argument("--question", help="question about the document (default: its last paragraph when it is long)")
    p.add_argument("--model", help="Hugging Face checkpoint directory (default: SmolLM2-135M-Instruct, fetched on first use)")
    p.add_argument("--method", choices=METHODS, default="auto",
                   help="auto = full attention when the prompt fits the trained window, else parallelcomp")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = no top-k filter")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="default: bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--chunk-tokens", type=int, help="ParallelComp: context tokens per chunk (default: what the window leaves)")
    p.add_argument("--top-k-chunks", type=int, default=3, help="ParallelComp: chunks kept")
    p.add_argument("--kv-budget", type=int, help="ParallelComp: context tokens kept per KV head in each chunk")
    p.add_argument("--calibrate", help="ParallelComp: attention calibration REGION:FIRST-LAST, e.g. sink:3-6")
    p.add_argument("--no-cuda-graph", action="store_true", help="decode eagerly on a GPU, for comparison")
    return p.parse_args(argv)


def read_prompt(path):
    try:
        data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as e:
        raise EngineError(f"cannot read the prompt {path}: {e.strerror}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EngineError(f"the prompt {path} is not valid UTF-8 (byte {e.start}: {data[e.start:e.start + 1]!r})")


def parse_calibration(spec):
    try:
        return parallelcomp.Calibration.parse(spec) if spec else None
    except ValueError as e:
        raise EngineError(str(e))


def main(argv=None):
    args = parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr)
    try:
        document = read_prompt(args.prompt)
        parallel = parallelcomp.ParallelCompConfig(
            chunk_tokens=args.chunk_tokens, top_k_chunks=args.top_k_chunks, kv_budget=args.kv_budget,
            calibration=parse_calibration(args.calibrate))
        dtype = getattr(torch, args.dtype) if args.dtype else None
        engine = Engine(args.model, args.device, dtype, log)
        out = lambda text: (sys.stdout.write(text), sys.stdout.flush())
        question = "\n\n" + args.question if args.question else None
        result = engine.generate(document, question, method=args.method, max_new_tokens=args.max_new_tokens,
                                 temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                                 chat=args.chat, parallel=parallel, cuda_graph=not args.no_cuda_graph, on_text=out)
    except (EngineError, CheckpointError, TokenizerError, WeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print()
    s = result.stats
    log(f"[{s['method']}] prompt {s['prompt_tokens']} tokens, prefill {s['prefill_seconds']:.2f} s, "
        f"decode {s['generated_tokens']} tokens at {s['decode_tokens_per_second']:.1f} tok/s, "
        f"peak memory {s['peak_memory_bytes'] / 2**30:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
