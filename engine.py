"""Answer questions over long documents with a Llama checkpoint: command line and Python API.

    python engine.py --prompt long.txt --question "Who wrote the letter?"

    from engine import Engine
    engine = Engine()                       # the embedded SmolLM2-135M-Instruct
    print(engine.generate(document, question="...").text)

Prefill is plain causal attention when the prompt fits the model's trained window and
ParallelComp (parallelcomp.py) when it does not, or any method of methods.py by name; decoding
(decoding.py) runs one captured CUDA graph per token on a GPU and the same step eagerly elsewhere.
"""

import argparse
import json
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import distributed
from checkpoint import CheckpointError, load_model, read_json
from decoding import SamplingParams, decode
from distributed import RankError
from hybrid import layout_from_config
from methods import METHODS, add_options, config_from, flag_of, given_options, prepared
from prefill import MemoryShortage, OptionError, Prompt
from tokenizer import StreamDecoder, Tokenizer, TokenizerError
from weights import WeightsError

AUTO = "auto"
AUTO_CHOICES = ("full", "parallelcomp")  # what auto chooses between
QUESTION_CAP = 256  # tokens of the last paragraph that stand in for a missing question
CONTEXT_MARK = "\x00CONTEXT\x00"  # where the document goes inside a rendered chat template


class EngineError(Exception):
    """A request the engine cannot serve; the message says what to change."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C while decoding; `generation` holds what was generated until then."""

    def __init__(self, generation):
        super().__init__()
        self.generation = generation


@dataclass
class Generation:
    text: str
    tokens: list[int]
    stats: dict = field(default_factory=dict)


def resolve_device(name):
    """torch.device for `name` (None: cuda when available), checked against this machine."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cuda", "cpu"):
        raise OptionError("device", f"{{}} {name}: expected cuda, cuda:N or cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise OptionError("device", f"{{0}} {name}: not available ({torch.cuda.device_count()} CUDA GPUs here); "
                                    f"use {{0}} cpu")
    return device


def checkpoint_layout(path):
    """The HybridConfig a checkpoint trained for LongGen's pattern describes in its config.json, or None."""
    try:
        return layout_from_config(read_json(path))
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}")


def decode_options(max_new_tokens, temperature, top_p, top_k, seed):
    """The answer budget checked and the sampling parameters, which check themselves."""
    if max_new_tokens < 1:
        raise OptionError("max_new_tokens", "{} must be at least 1")
    return SamplingParams(temperature, top_p, top_k, seed)


def method_config(method, config, auto):
    """The config `method` runs with: `config`, or the method's defaults when there is none or
    when auto chose a method other than the one `config` is for."""
    kind = METHODS[method].config
    if config is None or (auto and not isinstance(config, kind)
                          and any(isinstance(config, METHODS[m].config) for m in AUTO_CHOICES)):
        return kind()
    if not isinstance(config, kind):
        raise OptionError("config", f"{{}} for method {method} must be a {kind.__name__}, not {type(config).__name__}")
    return config


def layout(tok, document, question=None, instruction=None, chat=False):
    """Token layout of [instruction + document] followed by the question block, in tokenizer
    `tok`'s ids. The question follows the document verbatim, as prompt templates (LongBench's)
    expect: put the separator your format needs at its start (the command line puts a blank line)."""
    instruction = instruction or ""
    special = dict(bos_id=tok.bos_id, eos_ids=tok.eos_ids)
    if chat:
        content = instruction + CONTEXT_MARK + (question or "")
        before, after = tok.render_chat([{"role": "user", "content": content}]).split(CONTEXT_MARK)
        return Prompt(tok.encode(before), tok.encode(document), tok.encode(after), **special)
    head = tok.bos_prefix + (tok.encode(instruction) if instruction else [])
    return Prompt(head, tok.encode(document), tok.bos_prefix + tok.encode(question) if question else [], **special)


def peak_memory(device):
    """Peak bytes: allocated GPU memory on CUDA, the process's resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Engine:
    """Load a checkpoint once, then call `generate` as often as needed."""

    def __init__(self, model_dir=None, device=None, dtype=None, log=lambda msg: None):
        self.device = resolve_device(distributed.init(device))  # under torchrun: this process's GPU
        if model_dir is None:
            from weights.smollm2 import ensure_default_model  # gguf and numpy only for the default model
            model_dir = distributed.rank0_first(ensure_default_model, log)
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.model = distributed.checked(load_model, model_dir, self.device, self.dtype)
        self.tokenizer = Tokenizer.from_dir(model_dir)
        self.window = self.model.config.max_position_embeddings
        self.hybrid_layout = checkpoint_layout(Path(model_dir) / "config.json")

    # ------------------------------------------------------------------ prompt layout

    def layout(self, document, question=None, instruction=None, chat=False):
        """layout() in this engine's tokenizer."""
        return layout(self.tokenizer, document, question, instruction, chat)

    def split_question(self, document):
        """The last paragraph (at most QUESTION_CAP tokens) of a document given without a question:
        (body, last paragraph)."""
        body, _, last = document.rstrip().rpartition("\n\n")
        ids = self.tokenizer.encode(last)
        if len(ids) > QUESTION_CAP:
            rest = self.tokenizer.decode(ids[:-QUESTION_CAP])
            body = body + "\n\n" + rest if body else rest
            last = self.tokenizer.decode(ids[-QUESTION_CAP:])
        return body, last

    def fits(self, prompt, max_new_tokens):
        return len(prompt.ids()) + max_new_tokens <= self.window

    def no_room_for_context(self, prompt, max_new_tokens):
        """Whether the head, the question and the answer alone fill the trained window."""
        return len(prompt.head) + len(prompt.question) + max_new_tokens >= self.window

    def plan(self, document, question, instruction, chat, method, max_new_tokens):
        """(method, prompt, asked). auto: full attention when prompt and answer fit the trained
        window, or when ParallelComp would have no room for context in it; ParallelComp otherwise.
        A method that scores by the question and was given none asks the last paragraph."""
        prompt, asked = self.layout(document, question, instruction, chat), bool(question)
        split = (lambda: prompt) if asked else (lambda: self.layout(*self.split_question(document), instruction, chat))
        if method != AUTO:
            return method, split() if METHODS[method].needs_question else prompt, asked
        if self.fits(prompt, max_new_tokens):
            return "full", prompt, asked
        ranked = split()
        if self.no_room_for_context(ranked, max_new_tokens):
            return "full", prompt, asked
        return "parallelcomp", ranked, asked

    def check_prompt(self, prompt, asked):
        """The prompt's tokens exist in the model, and its question fits the trained window
        (whether the rest fits is each method's to say)."""
        vocab, q = self.model.config.vocab_size, len(prompt.question)
        if max(prompt.ids(), default=0) >= vocab:
            raise EngineError(f"the tokenizer produced token id {max(prompt.ids())}, outside the model's "
                              f"{vocab}-token vocabulary: the checkpoint's tokenizer does not match its weights")
        question = f"the question ({q} tokens)" if asked else \
            f"the prompt's last paragraph, which stands in for a question ({q} tokens),"
        if q > self.window:
            raise OptionError("question", f"{question} is longer than the model's {self.window}-token window: "
                                          f"shorten it")

    # ------------------------------------------------------------------ generate

    def generate(self, document, question=None, *, instruction=None, method=AUTO, max_new_tokens=256,
                 temperature=0.0, top_p=1.0, top_k=0, seed=None, chat=False, config=None, cuda_graph=True,
                 on_text=None, on_progress=None):
        """Answer `question` about `document` (or continue `document`), streaming text to on_text(str).

        method: a name in methods.METHODS or "auto"; config: that method's options (e.g.
        ParallelCompConfig(top_k_chunks=1)), its defaults when None; under auto it applies when
        the chosen method takes it. on_progress(chunks_done, chunks_total, context_tokens_done,
        seconds) follows ParallelComp's prefill after each batch of chunks. Bad options raise
        OptionError naming the parameter; Ctrl-C while decoding raises Interrupted, which carries
        the Generation so far.
        """
        sampling = decode_options(max_new_tokens, temperature, top_p, top_k, distributed.common_seed(seed))
        if method != AUTO and method not in METHODS:
            raise OptionError("method", f"unknown {{}} {method!r} (choose from auto, {', '.join(METHODS)})")
        if not document.strip() and not (question or "").strip():
            raise EngineError("the prompt is empty")
        if config is not None:
            config.validate(self.model.config)
        if method == AUTO and self.hybrid_layout is not None:  # a checkpoint trained for the hybrid pattern runs it
            method = "hybrid"
        auto = method == AUTO
        method, prompt, asked = self.plan(document, question, instruction, chat, method, max_new_tokens)
        if method == "hybrid" and config is None:
            config = self.hybrid_layout
        config = prepared(method_config(method, config, auto), self.model, self.tokenizer.encode)
        self.check_prompt(prompt, asked)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        progress = on_progress and (lambda done, total: on_progress(
            done, total, len(prompt.context) * done // total, time.perf_counter() - start))
        with torch.inference_mode():
            prefilled = METHODS[method].prefill(self.model, prompt, config, max_new_tokens, progress)
            generation = distributed.decoded(prefilled, lambda: self.decode(prefilled, prompt, sampling, max_new_tokens,
                                                                             cuda_graph, on_text, start))
        generation.stats.update(method=method, prompt_tokens=len(prompt.ids()), peak_memory_bytes=peak_memory(self.device))
        if generation.stats["interrupted"]:
            raise Interrupted(generation)
        return generation

    def decode(self, prefilled, prompt, sampling, max_new_tokens, cuda_graph, on_text, start):
        """The decode loop after `prefilled`, streaming text; the Generation with its statistics."""
        streamer = StreamDecoder(self.tokenizer, prompt.ids()[-8:])
        emit = on_text or (lambda text: None)
        times = []

        def on_token(token):
            times.append(time.perf_counter())
            emit(streamer.push(token))

        tokens, interrupted = decode(self.model, prefilled, sampling.sampler(self.device), max_new_tokens,
                                     self.tokenizer.eos_ids, cuda_graph, on_token)
        emit(streamer.flush())
        end = time.perf_counter()
        first = times[0] if times else end
        stats = {k: v for k, v in prefilled.stats.items() if k not in ("forwards", "scored_tokens")}
        stats.update(prefill_seconds=first - start, decode_seconds=end - first, generated_tokens=len(tokens),
                     decode_tokens_per_second=(len(tokens) - 1) / (end - first) if len(tokens) > 1 else 0.0,
                     interrupted=interrupted)
        return Generation(self.tokenizer.decode(tokens), tokens, stats)


# ---------------------------------------------------------------------------- command line

BAR_WIDTH = 30
# --json: the answer, its token ids, these statistics (null where a method has none) and the method's own
REPORT_STATS = ("method", "prompt_tokens", "chunks", "kept_chunks", "kept_spans", "kv_evicted_tokens",
                "calibration_evicted_tokens", "truncated_tokens", "prefill_seconds", "decode_seconds",
                "generated_tokens", "decode_tokens_per_second", "peak_memory_bytes", "interrupted")


class Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line, not the usage block: --help lists the options. Under torchrun, rank 0's alone."""
        self.exit(2, f"error: {message} (see --help)\n" if distributed.rank() == 0 else None)


def parse_args(argv):
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--prompt", required=True, help="text file with the document, or - for stdin")
    p.add_argument("--question", help="question about the document (default: its last paragraph when it is long)")
    p.add_argument("--model", help="Hugging Face checkpoint directory (default: SmolLM2-135M-Instruct, fetched on first use)")
    p.add_argument("--method", choices=(AUTO, *METHODS), default=AUTO,
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
    p.add_argument("--no-cuda-graph", action="store_true", help="decode eagerly on a GPU, for comparison")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object with the answer and the statistics instead of streaming text")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar, summary or download messages (errors still print)")
    add_options(p)
    args = p.parse_args(argv)
    for name, options in given_options(args).items():
        if name != chosen_method(args):
            p.error(f"{flag_of(name, next(iter(options)))} is an option of --method {name}, not {args.method}")
    return args


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


def memory_advice(gpu, method):
    """What to lower: the answer budget, the chosen method's size options, the prompt."""
    sizes = [flag_of(method, f) for f in ("chunk_tokens", "top_k_chunks", "kv_budget")]
    lower = ", ".join(["--max-new-tokens"] + [f for f in sizes if f])
    return (f"out of {'GPU ' if gpu else ''}memory: lower {lower}, or shorten the prompt; or use --dtype bfloat16"
            + (" or --device cpu" if gpu else ""))


def cli_message(error, method):
    """An OptionError in the command line's words: the flag for the parameter it names."""
    flag = flag_of(method, error.param) or "--" + error.param.replace("_", "-")
    return error.named(flag)


def answer(args, log, bar):
    """Check the options, read the prompt, load the model and generate (streaming to stdout unless --json)."""
    options = dict(method=args.method, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    decode_options(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed)  # before the model loads
    distributed.init(args.device)  # under torchrun, rank 0 reads the prompt for all
    document = distributed.from_rank0(read_prompt, args.prompt)
    engine = Engine(args.model, args.device, getattr(torch, args.dtype) if args.dtype else None, log)
    config = config_from(chosen_method(args), given_options(args))
    question = "\n\n" + args.question if args.question else None
    stream = None if args.json else lambda text: (sys.stdout.write(text), sys.stdout.flush())
    try:
        return engine.generate(document, question, **options, chat=args.chat, config=config,
                               cuda_graph=not args.no_cuda_graph, on_text=stream, on_progress=bar)
    finally:
        if bar:
            bar.close()


def chosen_method(args):
    """The method whose options the command line gives: auto's long-prompt choice under auto."""
    return "parallelcomp" if args.method == AUTO else args.method


def report(generation, args):
    """The answer's JSON, or the end of its streamed line, on stdout; a summary on stderr."""
    s = generation.stats
    if args.json:
        print(json.dumps({"answer": generation.text, "tokens": generation.tokens,
                          **{key: s.get(key) for key in REPORT_STATS}, **s}))
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
    command line, 130 Ctrl-C. Under torchrun only rank 0 prints."""
    args = parse_args(argv)
    leader = distributed.rank() == 0
    if not leader:
        args.quiet, sys.stdout = True, open(os.devnull, "w")
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
    except OptionError as e:
        message = cli_message(e, chosen_method(args))
    except (EngineError, CheckpointError, TokenizerError, WeightsError, RankError, MemoryShortage) as e:
        message = str(e)
    except RuntimeError as e:
        if not out_of_memory(e):
            raise
        message = memory_advice(isinstance(e, torch.OutOfMemoryError), chosen_method(args))
        if not leader:  # where the ranks compute in lockstep, no other rank can report it
            print(f"error: rank {distributed.rank()}: {message}", file=sys.stderr)
    if leader:
        print(f"error: {message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
