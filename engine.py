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
import json
import math
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import parallelcomp
from checkpoint import CheckpointError, load_model
from model import KVCache, apply_rope
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


class Interrupted(KeyboardInterrupt):
    """Ctrl-C while decoding; `generation` holds what was generated until then."""

    def __init__(self, generation):
        super().__init__()
        self.generation = generation


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

def resolve_device(name):
    """torch.device for `name` (None: cuda when available), checked against this machine."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cuda", "cpu"):
        raise EngineError(f"--device {name}: expected cuda, cuda:N or cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise EngineError(f"--device {name}: not available ({torch.cuda.device_count()} CUDA GPUs here); "
                          f"use --device cpu")
    return device


def check_values(method, max_new_tokens, temperature, top_p, top_k, seed, parallel):
    """Option values that no model can serve."""
    for bad, message in (
            (method not in METHODS, f"unknown method {method!r} (choose from {', '.join(METHODS)})"),
            (max_new_tokens < 1, "--max-new-tokens must be at least 1"),
            (not 0 <= temperature < math.inf, "--temperature must be 0 (greedy) or a positive number"),
            (not 0 < top_p <= 1, "--top-p must be in (0, 1]"),
            (top_k < 0, "--top-k must be 0 (off) or positive"),
            (seed is not None and not 0 <= seed < 2**64, "--seed must be between 0 and 2**64 - 1"),
            (parallel.top_k_chunks < 1, "--top-k-chunks must be at least 1"),
            (parallel.chunk_tokens is not None and parallel.chunk_tokens < 1, "--chunk-tokens must be at least 1"),
            (parallel.kv_budget is not None and parallel.kv_budget < 1, "--kv-budget must be at least 1")):
        if bad:
            raise EngineError(message)


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
        self.device = resolve_device(device)
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

    def check_options(self, method, max_new_tokens, temperature, top_p, top_k, seed, parallel):
        check_values(method, max_new_tokens, temperature, top_p, top_k, seed, parallel)
        n_layers, cal = self.model.config.n_layers, parallel.calibration
        for bad, message in (
                (method in ("truncate", "streaming") and max_new_tokens + SINK_TOKENS >= self.window,
                 f"--max-new-tokens must leave room for the prompt in the model's {self.window}-token window"),
                (parallel.chunk_tokens is not None and parallel.chunk_tokens > self.window,
                 f"--chunk-tokens must be between 1 and the model's {self.window}-token window"),
                (cal is not None and cal.last_layer >= n_layers,
                 f"--calibrate layers must be below the model's {n_layers} layers")):
            if bad:
                raise EngineError(message)

    def check_prompt(self, method, prompt, max_new_tokens, parallel, asked):
        """The prompt's tokens exist in the model, and its question fits the trained window; so do
        the head, the question and the answer together, except under full attention (which
        extrapolates) and with chunks of a size the user chose. asked: the question is the user's."""
        vocab, q = self.model.config.vocab_size, len(prompt.question)
        if max(prompt.ids(), default=0) >= vocab:
            raise EngineError(f"the tokenizer produced token id {max(prompt.ids())}, outside the model's "
                              f"{vocab}-token vocabulary: the checkpoint's tokenizer does not match its weights")
        question = f"the question ({q} tokens)" if asked else \
            f"the prompt's last paragraph, which stands in for --question ({q} tokens),"
        if q > self.window:
            raise EngineError(f"{question} is longer than the model's {self.window}-token window: shorten it")
        chosen = method == "full" or (method == "parallelcomp" and parallel.chunk_tokens is not None)
        if not chosen and self.no_room_for_context(prompt, max_new_tokens):
            raise EngineError(f"{question} and --max-new-tokens ({max_new_tokens}) leave no room for context "
                              f"in the model's {self.window}-token window: shorten the question or lower "
                              f"--max-new-tokens")

    def no_room_for_context(self, prompt, max_new_tokens):
        """Whether the head, the question and the answer alone fill the trained window."""
        return len(prompt.head) + len(prompt.question) + max_new_tokens >= self.window

    def choose_method(self, method, prompt, max_new_tokens):
        """auto: full attention when prompt and answer fit the trained window, or when ParallelComp
        would have no room for context in it; ParallelComp otherwise."""
        if method != "auto":
            return method
        fits = len(prompt.ids()) + max_new_tokens <= self.window
        return "full" if fits or self.no_room_for_context(prompt, max_new_tokens) else "parallelcomp"

    # ------------------------------------------------------------------ generate

    def generate(self, document, question=None, *, instruction=None, method="auto", max_new_tokens=256,
                 temperature=0.0, top_p=1.0, top_k=0, seed=None, chat=False,
                 parallel=parallelcomp.ParallelCompConfig(), cuda_graph=True, on_text=None, on_progress=None):
        """Answer `question` about `document` (or continue `document`), streaming text to on_text(str).

        on_progress(chunks_done, chunks_total, context_tokens_done, seconds) follows ParallelComp's
        prefill after each batch of chunks. Ctrl-C while decoding raises Interrupted, which carries
        the Generation so far.
        """
        self.check_options(method, max_new_tokens, temperature, top_p, top_k, seed, parallel)
        if not document.strip() and not (question or "").strip():
            raise EngineError("the prompt is empty")
        prompt = self.layout(document, question, instruction, chat)
        method = self.choose_method(method, prompt, max_new_tokens)
        asked = bool(prompt.question)
        if method == "parallelcomp" and not asked:
            document, question = self.split_question(document)
            prompt = self.layout(document, question, instruction, chat)
        self.check_prompt(method, prompt, max_new_tokens, parallel, asked)
        stats = {"method": method, "prompt_tokens": len(prompt.ids())}
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        progress = on_progress and (lambda done, total: on_progress(
            done, total, len(prompt.context) * done // total, time.perf_counter() - start))
        with torch.inference_mode():
            if method == "parallelcomp":
                result = parallelcomp.prefill(self.model, prompt.head, prompt.context, prompt.question, parallel,
                                              max_new_tokens, self.tokenizer.bos_id, progress)
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
        generation = Generation(self.tokenizer.decode(tokens), tokens, stats)
        if stats["interrupted"]:
            raise Interrupted(generation)
        return generation

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
        decode_start = time.perf_counter()
        graph = cuda_graph and self.device.type == "cuda"
        interrupted = False
        try:
            emit(streamer.push(tokens[0]))
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
        except KeyboardInterrupt:  # keep what was generated: generate raises Interrupted with it
            interrupted = True
        emit(streamer.flush())
        elapsed = time.perf_counter() - decode_start
        stats.update(generated_tokens=len(tokens), decode_seconds=elapsed,
                     decode_tokens_per_second=(len(tokens) - 1) / elapsed if len(tokens) > 1 else 0.0,
                     interrupted=interrupted)
        return tokens


# ---------------------------------------------------------------------------- command line

BAR_WIDTH = 30
# --json: the answer, its token ids and these statistics (null where a method has none)
REPORT_STATS = ("method", "prompt_tokens", "chunks", "kept_chunks", "kept_spans", "evicted_tokens",
                "truncated_tokens", "prefill_seconds", "decode_seconds", "generated_tokens",
                "decode_tokens_per_second", "peak_memory_bytes", "interrupted")


class Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line, not the usage block: --help lists the options."""
        self.exit(2, f"error: {message} (see --help)\n")


def parse_args(argv):
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    p.add_argument("--json", action="store_true",
                   help="print one JSON object with the answer and the statistics instead of streaming text")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar, summary or download messages (errors still print)")
    return p.parse_args(argv)


def read_prompt(path):
    """The document in file `path` (- for stdin), which must be non-empty UTF-8 text."""
    name = "from standard input" if path == "-" else path
    try:
        data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except FileNotFoundError:
        raise EngineError(f"the prompt file {path} does not exist")
    except IsADirectoryError:
        raise EngineError(f"the prompt {path} is a directory, not a text file")
    except OSError as e:
        raise EngineError(f"cannot read the prompt {path}: {e.strerror}")
    nul = data.find(b"\0")
    if nul >= 0:
        raise EngineError(f"the prompt {name} looks like a binary file (NUL byte at byte {nul}), not text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise EngineError(f"the prompt {name} is not text: invalid UTF-8 at byte {e.start} (line {line}); "
                          f"save it as UTF-8")
    if not text.strip():
        raise EngineError(f"the prompt {name} is empty")
    return text


def parse_calibration(spec):
    try:
        return parallelcomp.Calibration.parse(spec) if spec else None
    except ValueError as e:
        raise EngineError(str(e))


class ProgressBar:
    """Engine.generate's on_progress for a terminal: one line, redrawn in place."""

    def __init__(self, stream):
        self.stream, self.open = stream, False

    def __call__(self, done, total, tokens, seconds):
        filled = BAR_WIDTH * done // total
        rate = tokens / seconds if seconds > 0 else 0.0
        self.open = done < total
        self.stream.write(f"\rprefill [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {done}/{total} chunks, "
                          f"{rate:,.0f} tok/s" + ("" if self.open else "\n"))
        self.stream.flush()

    def close(self):
        """End a bar cut short, so that the next message starts on a line of its own."""
        if self.open:
            self.stream.write("\n")
            self.stream.flush()
            self.open = False


def out_of_memory(error):
    """A failed allocation: torch.OutOfMemoryError on a GPU, a RuntimeError from the CPU allocator."""
    return isinstance(error, torch.OutOfMemoryError) or "DefaultCPUAllocator: can't allocate memory" in str(error)


def memory_advice(gpu):
    return (f"out of {'GPU ' if gpu else ''}memory: lower --max-new-tokens, --chunk-tokens, --top-k-chunks or "
            f"--kv-budget, or shorten the prompt; or use --dtype bfloat16" + (" or --device cpu" if gpu else ""))


def answer(args, log, bar):
    """Check the options, read the prompt, load the model and generate (streaming to stdout unless --json)."""
    parallel = parallelcomp.ParallelCompConfig(
        chunk_tokens=args.chunk_tokens, top_k_chunks=args.top_k_chunks, kv_budget=args.kv_budget,
        calibration=parse_calibration(args.calibrate))
    options = dict(method=args.method, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    check_values(**options, parallel=parallel)
    document = read_prompt(args.prompt)
    engine = Engine(args.model, args.device, getattr(torch, args.dtype) if args.dtype else None, log)
    question = "\n\n" + args.question if args.question else None
    stream = None if args.json else lambda text: (sys.stdout.write(text), sys.stdout.flush())
    try:
        return engine.generate(document, question, **options, chat=args.chat, parallel=parallel,
                               cuda_graph=not args.no_cuda_graph, on_text=stream, on_progress=bar)
    finally:
        if bar:
            bar.close()


def report(generation, args):
    """The answer's JSON, or the end of its streamed line, on stdout; a summary on stderr."""
    s = generation.stats
    if args.json:
        print(json.dumps({"answer": generation.text, "tokens": generation.tokens,
                          **{key: s.get(key) for key in REPORT_STATS}}))
    else:
        print()
    if s["interrupted"]:
        print(f"interrupted after {s['generated_tokens']} tokens", file=sys.stderr)
    elif not (args.quiet or args.json):
        print(f"[{s['method']}] prompt {s['prompt_tokens']} tokens, prefill {s['prefill_seconds']:.2f} s, "
              f"decode {s['generated_tokens']} tokens at {s['decode_tokens_per_second']:.1f} tok/s, "
              f"peak memory {s['peak_memory_bytes'] / 2**30:.2f} GiB", file=sys.stderr)


def main(argv=None):
    """Exit status: 0 done, 1 a request that cannot be served (one line on stderr), 2 a malformed
    command line, 130 Ctrl-C."""
    args = parse_args(argv)
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    bar = ProgressBar(sys.stderr) if sys.stderr.isatty() and not args.quiet else None
    try:
        report(answer(args, log, bar), args)
        return 0
    except Interrupted as e:
        report(e.generation, args)
        return 130
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed early (| head): stop, and let the exit's flush write nowhere
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (EngineError, CheckpointError, TokenizerError, WeightsError) as e:
        message = str(e)
    except RuntimeError as e:
        if not out_of_memory(e):
            raise
        message = memory_advice(isinstance(e, torch.OutOfMemoryError))
    print(f"error: {message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
