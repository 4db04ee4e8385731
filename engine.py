"""Answer questions over long documents with a Llama checkpoint: command line and Python API.

    python engine.py --prompt long.txt --question "Who wrote the letter?"

    from engine import Engine
    engine = Engine()                       # the embedded SmolLM2-135M-Instruct
    engine = Engine("qwen2.5-1.5b")         # the embedded Qwen2.5-Coder-1.5B-Instruct, or a checkpoint directory
    print(engine.generate(document, question="...").text)
    session = engine.open(document)         # the document encoded once, then many questions
    print(session.ask("...").text)

Prefill is plain causal attention when the prompt fits the model's trained window and
ParallelComp (parallelcomp.py) when it does not, or any method of methods.py by name; decoding
(decoding.py) runs one captured CUDA graph per token on a GPU and the same step eagerly elsewhere.
The engine reaches the methods only through methods.METHODS.
"""

import sys

if __name__ == "__main__":  # python engine.py: through the entry point, which also handles Ctrl-C while torch loads
    import cli
    sys.exit(cli.main())

import argparse
import codecs
import json
import os
import resource
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

import ranks
from checkpoint import CheckpointError, load_model, read_hf_config
from decoding import SamplingParams, decode
from methods import (AUTO, AUTO_CANDIDATES, AUTO_FITS, AUTO_LONG, METHODS, HelpFormatter, add_options,
                     checkpoint_configs, flag_of, given_options)
from prefill import MemoryShortage, OptionError, Prompt
from ranks import RankError
from tokenizer import StreamDecoder, Tokenizer, TokenizerError
from weights import DEFAULT, MODELS, WeightsError, resolve

QUESTION_CAP = 256  # tokens of the last paragraph that stand in for a missing question
QUESTION_SEPARATOR = "\n\n"  # before the question, given on the command line or taken from the document
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


@dataclass(frozen=True)
class Plan:
    """What a generation runs (Engine.plan): the method, its config, validated and prepared, and
    the prompt laid out for it."""
    method: str
    config: object
    prompt: Prompt
    max_new_tokens: int
    prefill: object = None  # (prompt, answer_budget, on_progress) -> Prefilled in place of the method's: a Session's


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


def decode_options(max_new_tokens, temperature, top_p, top_k, seed):
    """The answer budget checked and the sampling parameters, which check themselves."""
    if max_new_tokens < 1:
        raise OptionError("max_new_tokens", "{} must be at least 1")
    return SamplingParams(temperature, top_p, top_k, seed)


def layout(tok, document, question=None, instruction=None, chat=False):
    """Token layout of [instruction + document] followed by the question block, in tokenizer
    `tok`'s ids. The question follows the document verbatim, as prompt templates (LongBench's)
    expect: put the separator your format needs at its start (the command line puts QUESTION_SEPARATOR)."""
    instruction = instruction or ""
    special = dict(bos_id=tok.bos_id, eos_ids=tok.eos_ids, sentence_end_ids=tok.sentence_end_ids)
    if chat:
        content = instruction + CONTEXT_MARK + (question or "")
        before, after = tok.render_chat([{"role": "user", "content": content}]).split(CONTEXT_MARK)
        return Prompt(tok.encode(before), tok.encode(document), tok.encode(after), **special)
    head = tok.bos_prefix + (tok.encode(instruction) if instruction else [])
    return Prompt(head, tok.encode(document), tok.bos_prefix + tok.encode(question) if question else [], **special)


def check_method(method):
    if method != AUTO and method not in METHODS:
        raise OptionError("method", f"unknown {{}} {method!r} (choose from auto, {', '.join(METHODS)})")


def peak_memory(device):
    """Peak bytes: allocated GPU memory on CUDA, the process's resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Engine:
    """Load a checkpoint once, then call `generate` as often as needed."""

    def __init__(self, model_dir=None, device=None, dtype=None, log=lambda msg: None):
        self.device = resolve_device(ranks.init(device))  # with several processes: this process's GPU
        model_dir = ranks.rank0_first(resolve, model_dir, log)  # a model's name: fetched on first use
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        hf = ranks.checked(read_hf_config, model_dir)  # config.json, read once for the model, tokenizer and methods
        self.model = ranks.checked(load_model, model_dir, self.device, self.dtype, hf)
        self.tokenizer = Tokenizer.from_dir(model_dir, hf)
        self.window = self.model.config.max_position_embeddings
        try:
            self.checkpoint_configs = checkpoint_configs(hf, self.model.config)  # {method: config} config.json gives
        except ValueError as e:
            raise CheckpointError(f"{Path(model_dir) / 'config.json'}: {e}")
        # what auto may run: the method the checkpoint was trained for, else full attention or ParallelComp
        self.auto_methods = tuple(self.checkpoint_configs)[:1] or (AUTO_FITS, AUTO_LONG)

    # ------------------------------------------------------------------ prompt layout

    def layout(self, document, question=None, instruction=None, chat=False):
        """layout() in this engine's tokenizer."""
        return layout(self.tokenizer, document, question, instruction, chat)

    def split_question(self, document):
        """A document given without a question: (body, question), the question its last paragraph
        with the QUESTION_SEPARATOR before it, as the command line lays out a question it is given;
        of a last paragraph longer than QUESTION_CAP tokens, its last QUESTION_CAP tokens alone."""
        body, separator, last = document.rstrip().rpartition(QUESTION_SEPARATOR)
        ids = self.tokenizer.encode(last)
        if len(ids) > QUESTION_CAP:
            body += separator + self.tokenizer.decode(ids[:-QUESTION_CAP])
            return body, self.tokenizer.decode(ids[-QUESTION_CAP:])
        return body, separator + last

    def fits(self, prompt, max_new_tokens):
        return len(prompt.ids()) + max_new_tokens <= self.window

    def no_room_for_context(self, prompt, max_new_tokens):
        """Whether the head, the question and the answer alone fill the trained window."""
        return len(prompt.head) + len(prompt.question) + max_new_tokens >= self.window

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

    # ------------------------------------------------------------------ the method

    def method_config(self, method, config=None, overrides=None):
        """The config `method` runs with, validated and prepared: `config`, else what the
        checkpoint's config.json gives for it (hybrid's layout), else the method's defaults, with
        `overrides` ({field: value}: the command line's flags) merged over it."""
        base = config if config is not None else self.checkpoint_configs.get(method) or METHODS[method].config()
        return METHODS[method].ready(replace(base, **(overrides or {})), self.model, self.tokenizer.encode)

    def given_configs(self, method, config, options):
        """{method: config} of what was given, each checked by method_config whether it runs or
        not: `config` for the method whose config class it is, options' overrides for each method
        named. They must be for `method`, or under auto for a method auto may run here."""
        runs = self.auto_methods if method == AUTO else (method,)
        what = f"auto ({' or '.join(runs)} here)" if method == AUTO else method
        owner = next((name for name in runs if isinstance(config, METHODS[name].config)), None)
        if config is not None and owner is None:
            kinds = " or ".join(METHODS[name].config.__name__ for name in runs)
            raise OptionError("config", f"{{}} for method {what} must be a {kinds}, not {type(config).__name__}")
        for name, overrides in options.items():
            if name not in runs and overrides:
                raise OptionError(next(iter(overrides)), f"{{}} is an option of method {name}, not {what}")
        return {name: self.method_config(name, config if name == owner else None, options.get(name))
                for name in runs if name == owner or name in options}

    def plan(self, document, question=None, *, instruction=None, chat=False, method=AUTO, max_new_tokens=256,
             config=None, options=None):
        """What `generate` runs, decided here and nowhere else: a Plan.

        The method: `method`; under auto, the method the checkpoint was trained for (config.json's
        hybrid_attention: hybrid) whatever the prompt, else full attention when the prompt and the
        answer fit the trained window, or when ParallelComp would have no room for context in it,
        and ParallelComp otherwise. Its config: method_config, from `config` if it is the chosen
        method's and the overrides options ({method: {field: value}}) give for it; every config
        given is checked, used or not. The prompt: layout's; a method that scores by the question
        and was given none asks the document's last paragraph (split_question).
        """
        check_method(method)
        if not document.strip() and not (question or "").strip():
            raise EngineError("the prompt is empty")
        given = self.given_configs(method, config, options or {})
        prompt = self.layout(document, question, instruction, chat)
        asked = (lambda: prompt) if question else \
            (lambda: self.layout(*self.split_question(document), instruction, chat))
        method, prompt = self.choose(method, prompt, asked, max_new_tokens)
        config = given[method] if method in given else self.method_config(method)
        self.check_prompt(prompt, bool(question))
        return Plan(method, config, prompt, max_new_tokens)

    def choose(self, method, prompt, asked, max_new_tokens):
        """(method, prompt) by plan's rule: `method` resolved when it is auto, and the prompt
        asked() lays out with a question where the chosen method scores by one."""
        if method == AUTO and len(self.auto_methods) == 1:
            method = self.auto_methods[0]
        if method == AUTO and self.fits(prompt, max_new_tokens):
            method = AUTO_FITS
        elif method == AUTO:
            ranked = asked()
            no_room = self.no_room_for_context(ranked, max_new_tokens)
            method, prompt = (AUTO_FITS, prompt) if no_room else (AUTO_LONG, ranked)
        elif METHODS[method].needs_question:
            prompt = asked()
        return method, prompt

    # ------------------------------------------------------------------ generate

    def generate(self, document, question=None, *, instruction=None, method=AUTO, max_new_tokens=256,
                 temperature=0.0, top_p=1.0, top_k=0, seed=None, chat=False, config=None, options=None,
                 cuda_graph=True, on_text=None, on_progress=None):
        """Answer `question` about `document` (or continue `document`), streaming text to on_text(str).

        method: a name in methods.METHODS or "auto"; config: that method's options (e.g.
        ParallelCompConfig(top_k_chunks=1)), what the checkpoint gives for it or its defaults when
        None; under auto it applies when the chosen method takes it. options: {method: {field:
        value}} merged over the chosen method's config (the command line's flags). See plan.
        on_progress(chunks_done, chunks_total, context_tokens_done, seconds) follows the prefill
        after each batch of chunks. Bad options raise OptionError naming the parameter; Ctrl-C
        while decoding raises Interrupted, which carries the Generation so far.
        """
        sampling = decode_options(max_new_tokens, temperature, top_p, top_k, ranks.common_seed(seed))
        plan = self.plan(document, question, instruction=instruction, chat=chat, method=method,
                         max_new_tokens=max_new_tokens, config=config, options=options)
        return self.run(plan, sampling, cuda_graph, on_text, on_progress)

    def run(self, plan, sampling, cuda_graph=True, on_text=None, on_progress=None):
        """Prefill and decode a Plan, drawing tokens by `sampling` (SamplingParams): see generate."""
        prompt, budget = plan.prompt, plan.max_new_tokens
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        progress = on_progress and (lambda done, total: on_progress(
            done, total, len(prompt.context) * done // total, time.perf_counter() - start))
        with torch.inference_mode():
            prefilled = METHODS[plan.method].prefill(self.model, prompt, plan.config, budget, progress) \
                if plan.prefill is None else plan.prefill(prompt, budget, progress)
            generation = ranks.decoded(prefilled, lambda: self.decode(prefilled, prompt, sampling, budget,
                                                                      cuda_graph, on_text, start))
        generation.stats.update(method=plan.method, prompt_tokens=len(prompt.ids()),
                                peak_memory_bytes=peak_memory(self.device))
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

        model = prefilled.model or self.model  # a method may decode on its own view of the model (yarn)
        tokens, interrupted = decode(model, prefilled, sampling.sampler(self.device), max_new_tokens,
                                     self.tokenizer.eos_ids, cuda_graph, on_token)
        emit(streamer.flush())
        end = time.perf_counter()
        first = times[0] if times else end
        stats = {k: v for k, v in prefilled.stats.items() if k not in ("forwards", "scored_tokens")}
        stats.update(prefill_seconds=first - start, decode_seconds=end - first, generated_tokens=len(tokens),
                     decode_tokens_per_second=(len(tokens) - 1) / (end - first) if len(tokens) > 1 else 0.0,
                     interrupted=interrupted)
        return Generation(self.tokenizer.decode(tokens), tokens, stats)

    # ------------------------------------------------------------------ sessions

    def open(self, document, *, instruction=None, chat=False, method=AUTO, max_new_tokens=256, config=None,
             options=None, session_cache_gib=None, on_progress=None):
        """A Session over `document` for many questions: what of it no question changes is encoded
        once, here, and Session.ask answers each question as generate(document, question, ...)
        with these arguments would, with the same tokens.

        method, config, options: as for generate; under auto the method is chosen for each
        question as generate would, a change of method encoding the document anew. max_new_tokens:
        the answer budget of the questions that give none (some methods size what they keep by
        it). session_cache_gib: the most memory of the model's device the encoding may take;
        ParallelComp's chunk K/V beyond it go to pinned CPU memory (on a GPU), other methods' are
        refused (OptionError). None: half the free memory for ParallelComp, all of it otherwise.
        on_progress: as for generate, while the document is encoded. One process only (no --processes or torchrun).
        """
        if ranks.world() > 1:
            raise EngineError("a session (Engine.open, --questions, --interactive) runs in one process: start it "
                              "without --processes or torchrun")
        check_method(method)
        decode_options(max_new_tokens, 0.0, 1.0, 0, None)
        if session_cache_gib is not None and not session_cache_gib >= 0:
            raise OptionError("session_cache_gib", "{} must be 0 or more")
        limit = None if session_cache_gib is None else int(session_cache_gib * 2**30)
        given = self.given_configs(method, config, options or {})
        return Session(self, document, instruction, chat, method, given, max_new_tokens, limit, on_progress)


class Session:
    """A document encoded once for many questions (Engine.open). ask() answers each as
    generate(document, question) would; stats: Engine.open's encoding (method, document_tokens,
    encode_seconds, session_cache_bytes and session_cache_device, where the encoding lives, and
    peak_memory_bytes), updated when a question has the document encoded anew."""

    def __init__(self, engine, document, instruction, chat, method, given, max_new_tokens, limit, on_progress):
        self.engine, self.document, self.instruction, self.chat = engine, document, instruction, chat
        self.requested, self.given, self.max_new_tokens, self.limit = method, given, max_new_tokens, limit
        self.configs = {}  # {method: its config, prepared}
        self.method = self.encoding = None
        prompt = engine.layout(document, None, instruction, chat)
        self.context = prompt.context
        method, prompt = engine.choose(method, prompt, lambda: prompt, max_new_tokens)
        start = time.perf_counter()
        progress = on_progress and (lambda done, total: on_progress(
            done, total, len(prompt.context) * done // total, time.perf_counter() - start))
        self.encode(method, prompt, max_new_tokens, progress)

    def config(self, method):
        if method not in self.configs:
            self.configs[method] = self.given[method] if method in self.given else self.engine.method_config(method)
        return self.configs[method]

    def encode(self, method, prompt, max_new_tokens, on_progress):
        """Encode prompt's head and context by `method`: the tokens encoded."""
        engine, self.method, self.encoding = self.engine, None, None  # the old encoding's memory goes first
        if engine.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(engine.device)
        start = time.perf_counter()
        with torch.inference_mode():
            encoding = METHODS[method].open(engine.model, replace(prompt, question=[]), self.config(method),
                                            max_new_tokens, self.limit, on_progress)
        self.method, self.encoding, self.head = method, encoding, prompt.head
        tokens = len(prompt.head) + len(prompt.context)
        self.stats = dict(method=method, document_tokens=tokens, encode_seconds=time.perf_counter() - start,
                          session_cache_bytes=encoding.nbytes, session_cache_device=str(encoding.home),
                          peak_memory_bytes=peak_memory(engine.device))
        return tokens

    def ask(self, question, *, max_new_tokens=None, temperature=0.0, top_p=1.0, top_k=0, seed=None,
            cuda_graph=True, on_text=None, on_progress=None):
        """Answer `question` about the session's document as generate(document, question, ...)
        would with the session's instruction, chat, method and config: the same tokens, streamed
        to on_text. max_new_tokens: the session's when None. Raises Interrupted on Ctrl-C while
        decoding, after which the session answers on. stats: generate's, with encoded_tokens
        (the tokens this question ran through the model before decoding, the document's included
        where it was encoded anew) and session_cache_bytes."""
        engine = self.engine
        budget = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        sampling = decode_options(budget, temperature, top_p, top_k, seed)
        if not (question or "").strip():
            raise OptionError("question", "{} is empty")
        asked = engine.layout("", question, self.instruction, self.chat)
        if asked.head == self.head:  # the document's tokens, laid out once
            prompt = replace(asked, context=self.context)
        else:
            prompt = engine.layout(self.document, question, self.instruction, self.chat)
        method, prompt = engine.choose(self.requested, prompt, lambda: prompt, budget)
        engine.check_prompt(prompt, True)
        plan = Plan(method, self.config(method), prompt, budget,
                    lambda p, answer_budget, progress: self.prefill(method, p, answer_budget, progress))
        return engine.run(plan, sampling, cuda_graph, on_text, on_progress)

    def prefill(self, method, prompt, answer_budget, on_progress):
        """The encoding's answer to prompt, the document encoded anew first where the method or
        the head changed."""
        encoded = 0
        if method != self.method or prompt.head != self.head:
            encoded = self.encode(method, prompt, answer_budget, on_progress)
        prefilled = self.encoding.ask(prompt, answer_budget, on_progress)
        prefilled.stats.update(encoded_tokens=prefilled.stats["encoded_tokens"] + encoded,
                               session_cache_bytes=self.encoding.nbytes)
        return prefilled


# ---------------------------------------------------------------------------- command line

BAR_WIDTH = 30
# --json: the answer, its token ids, these statistics (null where a method has none) and the method's own
REPORT_STATS = ("method", "prompt_tokens", "chunks", "kept_chunks", "kept_spans", "kv_evicted_tokens",
                "calibration_evicted_tokens", "truncated_tokens", "prefill_seconds", "decode_seconds",
                "generated_tokens", "decode_tokens_per_second", "peak_memory_bytes", "interrupted")


class Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line, not the usage block: --help lists the options. With several processes, rank 0's
        alone; the others, which meet the same error, end quietly with status 0: a failed rank makes
        torchrun stop the rest, rank 0 among them, perhaps before it has printed the line."""
        if ranks.rank() == 0:
            self.exit(2, f"error: {message} (see --help)\n")
        self.exit(0)


def parse_args(argv):
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--prompt", required=True, metavar="FILE",
                   help="text file (UTF-8) with the document, or - for standard input")
    p.add_argument("--question", metavar="TEXT",
                   help="question about the document, asked after a blank line (default: its last paragraph when "
                        "it is long); with it the document may be empty")
    p.add_argument("--model", default=DEFAULT, metavar="MODEL",
                   help="a Hugging Face checkpoint directory, or an embedded model fetched on first use: "
                        f"{', '.join(MODELS)}")
    p.add_argument("--method", choices=(AUTO, *METHODS), default=AUTO,
                   help="auto = the method a checkpoint was trained for (hybrid), else full attention when the "
                        "prompt fits the trained window, else parallelcomp; a method's options apply when it runs")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N",
                   help="the answer's budget: at most N generated tokens")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="sampling temperature; 0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="nucleus sampling: draw from the most likely tokens that make up P of the probability "
                        "(1 = all)")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="draw from the K most likely tokens (0 = all)")
    p.add_argument("--seed", type=int, metavar="N", help="sampling seed, for a repeatable draw (default: random)")
    p.add_argument("--device", metavar="DEVICE", help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="the weights' and activations' type (default: bfloat16 on a GPU, float32 on the CPU)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--no-cuda-graph", action="store_true", help="decode eagerly on a GPU, for comparison")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object with the answer and the statistics instead of streaming text")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar, summary or download messages (errors still print)")
    p.add_argument("--processes", type=int, default=1, metavar="N",
                   help="run in N processes on this machine, one GPU each (gloo with --device cpu): ParallelComp "
                        "divides its chunks among them; as torchrun --nproc-per-node N, with one line for a failure")
    add_session_options(p)
    add_options(p)
    args = p.parse_args(argv)
    runs = AUTO_CANDIDATES if args.method == AUTO else (args.method,)
    for name, options in given_options(args).items():
        if name not in runs:
            p.error(f"{flag_of(next(iter(options)))} is an option of --method {name}, not {args.method}")
    check_session_options(p, args)
    check_processes(p, args)
    return args


def check_processes(p, args):
    launched = int(os.environ.get("WORLD_SIZE", 1))  # by torchrun, or by --processes itself (ranks.launch)
    if args.processes < 1:
        p.error(f"--processes {args.processes}: give 1 or more")
    if launched > 1 and args.processes not in (1, launched):
        p.error(f"--processes {args.processes} under a launch of {launched} processes (torchrun's): leave it out")
    if args.processes > 1 and (args.questions is not None or args.interactive):
        p.error("--questions and --interactive run in one process: leave out --processes")


def add_session_options(p):
    group = p.add_argument_group("many questions, one encoding of the document (Engine.open)")
    group.add_argument("--questions", metavar="FILE",
                       help="answer each line of FILE (- for standard input) in turn; with --json one object a line")
    group.add_argument("--interactive", action="store_true",
                       help="answer each line typed on standard input in turn; EOF (Ctrl-D) or Ctrl-C at the "
                            "prompt ends")
    group.add_argument("--session-cache-gib", type=float, metavar="GIB",
                       help="the most device memory the document's encoding takes: ParallelComp's chunk K/V beyond "
                            "it go to pinned CPU memory, other methods' are refused (default: half the free memory "
                            "for ParallelComp, all of it otherwise)")


def check_session_options(p, args):
    many = [flag for flag, given in (("--questions", args.questions is not None), ("--interactive", args.interactive))
            if given]
    if len(many) == 2:
        p.error("--questions and --interactive both give the questions: choose one")
    if many and args.question is not None:
        p.error(f"--question asks one question, {many[0]} many: choose one")
    if args.session_cache_gib is not None and not many:
        p.error("--session-cache-gib applies with --questions or --interactive")
    if many and args.prompt == "-" and (args.interactive or args.questions == "-"):
        p.error(f"{many[0]} reads the questions from standard input: give --prompt a file")


# The byte-order marks of the Unicode encodings a prompt may be saved in that are not UTF-8; UTF-32 LE's starts with
# UTF-16 LE's, so it comes first
UNICODE_BOMS = (("UTF-32", codecs.BOM_UTF32_LE), ("UTF-32", codecs.BOM_UTF32_BE), ("UTF-16", codecs.BOM_UTF16_LE),
                ("UTF-16", codecs.BOM_UTF16_BE))


def read_prompt(path, asked=False):
    """The document in file `path` (- for stdin), which must be UTF-8 text, and not empty unless
    a question is `asked` about it (the question alone is then the prompt, as in Engine.generate)."""
    if not path:
        raise EngineError("--prompt is empty: give a text file, or - for standard input")
    name = "from standard input" if path == "-" else path
    try:
        data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except FileNotFoundError:
        raise EngineError(f"the prompt file {path} does not exist")
    except IsADirectoryError:
        raise EngineError(f"the prompt {path} is a directory, not a text file")
    except OSError as e:
        raise EngineError(f"cannot read the prompt {path}: {e.strerror}")
    encoding = next((encoding for encoding, bom in UNICODE_BOMS if data.startswith(bom)), None)
    if encoding:
        raise EngineError(f"the prompt {name} is {encoding} text (it starts with a {encoding} byte-order mark): "
                          f"save it as UTF-8")
    nul = data.find(b"\0")
    if nul >= 0:
        raise EngineError(f"the prompt {name} looks like a binary file (NUL byte at byte {nul}), not text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise EngineError(f"the prompt {name} is not text: invalid UTF-8 at byte {e.start} (line {line}); "
                          f"save it as UTF-8")
    if not text.strip() and not asked:
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


def cli_flag(param):
    """The command-line flag of a parameter of Engine.generate or of a method's config."""
    return flag_of(param) or "--" + param.replace("_", "-")


def memory_advice(gpu, method, given=()):
    """What to lower: first the options bounding the method's memory (once it is known: `method`
    may be auto) that were `given` ({field: value}), the likeliest cause; then the answer budget,
    the method's other such options and the prompt."""
    sizes = METHODS[method].memory_options if method in METHODS else ()
    order = [f for f in sizes if f in given] + ["max_new_tokens"] + [f for f in sizes if f not in given]
    lower = ", ".join(map(cli_flag, order))
    return (f"out of {'GPU ' if gpu else ''}memory: lower {lower}, or shorten the prompt; or use --dtype bfloat16"
            + (" or --device cpu" if gpu else ""))


def cli_message(error):
    """An OptionError in the command line's words: the flag of each option it names."""
    return error.named(cli_flag)


def planned(args, log):
    """Check the options, read the prompt, load the model and plan the generation, the flags
    merged over the checkpoint's config of the method chosen: (engine, plan, sampling)."""
    engine, document, sampling = loaded(args, log, bool(args.question))
    question = QUESTION_SEPARATOR + args.question if args.question else None
    plan = engine.plan(document, question, chat=args.chat, method=args.method, max_new_tokens=args.max_new_tokens,
                       options=given_options(args))
    return engine, plan, sampling


def loaded(args, log, asked):
    """Check the options, read the prompt (empty only when a question is `asked`) and load the
    model: (engine, document, sampling)."""
    decode_options(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed)  # before the model loads
    ranks.init(args.device)  # with several processes, rank 0 reads the prompt for all
    document = ranks.from_rank0(read_prompt, args.prompt, asked)
    engine = Engine(args.model, args.device, getattr(torch, args.dtype) if args.dtype else None, log)
    sampling = decode_options(args.max_new_tokens, args.temperature, args.top_p, args.top_k,
                              ranks.common_seed(args.seed))
    return engine, document, sampling


def read_questions(path):
    """The questions of --questions: the lines of file `path` (- for standard input) that are not blank."""
    name = "from standard input" if path == "-" else f"file {path}"
    try:
        data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
        questions = [line for line in data.decode("utf-8").splitlines() if line.strip()]
    except FileNotFoundError:
        raise EngineError(f"the questions file {path} does not exist")
    except UnicodeDecodeError as e:
        raise EngineError(f"the questions {name} are not text: invalid UTF-8 at byte {e.start}; save them as UTF-8")
    except OSError as e:
        raise EngineError(f"cannot read the questions {name}: {e.strerror}")
    if not questions:
        raise EngineError(f"the questions {name} hold no question (one a line)")
    return questions


def typed_questions(prompt):
    """The questions of --interactive: the lines typed on standard input that are not blank, until
    EOF or Ctrl-C; `prompt` (a terminal's) shows "> " on stderr before each."""
    while True:
        if prompt:
            sys.stderr.write("> ")
            sys.stderr.flush()
        try:
            line = sys.stdin.buffer.readline()
        except KeyboardInterrupt:
            line = b""
        if not line:
            if prompt:
                sys.stderr.write("\n")
            return
        try:
            question = line.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise EngineError("a question typed on standard input is not UTF-8 text")
        if question:
            yield question


def answer_questions(args, log, bar):
    """--questions, --interactive: the document encoded once (Engine.open), each question then
    answered in turn as --question answers it, streamed or one JSON object a line."""
    questions = read_questions(args.questions) if args.questions is not None else \
        typed_questions(not args.quiet and sys.stdin.isatty())
    engine, document, sampling = loaded(args, log, True)
    try:
        session = engine.open(document, chat=args.chat, method=args.method, max_new_tokens=args.max_new_tokens,
                              options=given_options(args), session_cache_gib=args.session_cache_gib, on_progress=bar)
    finally:
        if bar:
            bar.close()
    s = session.stats
    if not (args.quiet or args.json):
        print(f"[session] {s['method']}: document {s['document_tokens']:,} tokens encoded in {s['encode_seconds']:.2f} "
              f"s, cache {s['session_cache_bytes'] / 2**30:.2f} GiB on {s['session_cache_device']}", file=sys.stderr)
    stream = None if args.json else lambda text: (sys.stdout.write(text), sys.stdout.flush())
    for question in questions:
        try:
            generation = session.ask(QUESTION_SEPARATOR + question, temperature=args.temperature, top_p=args.top_p,
                                     top_k=args.top_k, seed=sampling.seed, cuda_graph=not args.no_cuda_graph,
                                     on_text=stream, on_progress=bar)
        finally:
            if bar:
                bar.close()
        report(generation, args)


def answer(engine, plan, sampling, args, bar):
    """Run the plan, streaming the answer to stdout unless --json."""
    stream = None if args.json else lambda text: (sys.stdout.write(text), sys.stdout.flush())
    try:
        return engine.run(plan, sampling, not args.no_cuda_graph, stream, bar)
    finally:
        if bar:
            bar.close()


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
    command line, 130 Ctrl-C. --processes N: this process launches N of itself and returns their
    status; in several processes only rank 0 prints."""
    args = parse_args(argv)
    if args.processes > 1 and "WORLD_SIZE" not in os.environ:
        return ranks.launch(args.processes, [sys.executable, str(Path(__file__).resolve()),
                                             *(sys.argv[1:] if argv is None else argv)])
    leader = ranks.rank() == 0
    if not leader:
        args.quiet, sys.stdout = True, open(os.devnull, "w")
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    bar = ProgressBar(sys.stderr) if sys.stderr.isatty() and not args.quiet else None
    method = args.method  # what an out-of-memory message advises on: the planned method once there is one
    try:
        if args.questions is not None or args.interactive:
            answer_questions(args, log, bar)
            return 0
        engine, plan, sampling = planned(args, log)
        method = plan.method
        if ranks.world() > 1 and not METHODS[method].spans_processes:
            log(f"note: {method} runs whole in each of the {ranks.world()} processes (only parallelcomp divides "
                f"its work among them)")
        report(answer(engine, plan, sampling, args, bar), args)
        return 0
    except Interrupted as e:
        if leader:
            report(e.generation, args)
        return 130
    except KeyboardInterrupt:
        if leader:
            print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed early (| head): stop, and let the exit's flush write nowhere
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OptionError as e:
        message = cli_message(e)
    except (EngineError, CheckpointError, TokenizerError, WeightsError, RankError, MemoryShortage) as e:
        message = str(e)
    except RuntimeError as e:
        if not out_of_memory(e):
            raise
        message = memory_advice(isinstance(e, torch.OutOfMemoryError), method, given_options(args).get(method, {}))
        if not leader:  # where the ranks compute in lockstep, no other rank can report it
            print(f"error: rank {ranks.rank()}: {message}", file=sys.stderr)
    if leader:
        print(f"error: {message}", file=sys.stderr)
    return 1

