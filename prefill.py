"""What every prefill method shares: the prompt's token layout, the result a prefill returns and
the error a bad option raises.

A method is a module with a frozen config dataclass, whose fields are declared with `option`, and

    prefill(model, prompt, config, answer_budget, on_progress=None) -> Prefilled

which encodes the prompt into a KV cache with room for `answer_budget` generated tokens. The
table in methods.py names the methods; the decode loop (decoding.py) continues from any Prefilled.

A document asked many questions (engine.Engine.open) goes through a method's `open`:

    open(model, prompt, config, answer_budget, limit, on_progress=None) -> encoding

encodes prompt's head and context (its question empty) as far as no question changes them, and
encoding.ask(prompt, answer_budget, on_progress=None) returns, for the same head and context with
a question, the Prefilled that prefill gives, reusing the encoding; what depends on the question
(its length, its text) is run again, and where it changes what the encoding holds (a method's
sizes), the encoding is made anew. Stats: the method's, with `encoded_tokens`, the tokens the
question ran through the model (an encoding made anew included). encoding.nbytes: the memory it
holds; encoding.home: its device (the CPU, in pinned memory, where it was offloaded). limit: the
bytes it may take on the model's device (None: what free_memory allows), see encoding_home.
"""

import os
from dataclasses import dataclass, field

import torch

from compaction import RawKeyCache
from model import KVCache, Llama

PREFILL_PIECE = {"cuda": 8192, "cpu": 2048}  # tokens per causal-prefill forward
QUESTION_ROOM = 256  # question tokens a session's cache leaves room for before it must grow
PINNED_SHARE = 0.8  # of the host's available memory, what a session's offloaded encoding may pin


class OptionError(ValueError):
    """A bad option value. str() names the options as the Python API does (`pot_keep must be
    below pot_tokens (100)`); named(name_of) as another caller does, name_of giving each option's
    name there (`--pot-keep must be below --pot-tokens (100)`). param: the option to change."""

    def __init__(self, param, template, *others):
        self.param, self.template = param, template  # template: the message with {} for each name
        self.params = (param, *others)  # the options the message names, in the template's order
        super().__init__(self.named(str))

    def named(self, name_of):
        return self.template.format(*map(name_of, self.params))


class MemoryShortage(RuntimeError):
    """A prefill that cannot fit in the free memory, found before it starts."""


def free_memory(device):
    """Bytes a new allocation can take: free device memory plus what PyTorch holds unused on a
    GPU; the available physical memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return available_memory()


def available_memory(meminfo="/proc/meminfo"):
    """Physical memory new allocations can take: Linux's MemAvailable (free pages plus the page
    cache the kernel gives back), not MemFree, which can be a few GiB of 14 available. Without it
    (no /proc, a kernel before 3.14): the free pages where the system counts them, else all."""
    try:
        with open(meminfo) as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024  # "   13682844 kB"
    except (OSError, KeyError, ValueError):
        pages = "SC_AVPHYS_PAGES" if "SC_AVPHYS_PAGES" in os.sysconf_names else "SC_PHYS_PAGES"  # macOS: no count
        return os.sysconf(pages) * os.sysconf("SC_PAGE_SIZE")


def option(default, help, parse=None, flag=None, metavar=None, choices=None):
    """A config field with what the command line needs: its help, how to parse a value (int,
    float, str or a parser raising ValueError; default: the type of `default`), when it differs
    from --field-name its flag, and its value's name in --help where it is not a count (N).
    choices: the texts it may take, which give the parser and the value's name ({a,b})."""
    if choices:
        parse, metavar = one_of(choices), "{" + ",".join(choices) + "}"
    return field(default=default, metadata=dict(help=help, parse=parse or type(default), flag=flag, metavar=metavar))


def one_of(choices):
    """A parser that takes a text in `choices` as it is."""
    def parse(text):
        if text not in choices:
            raise ValueError(f"{text!r}: expected one of {', '.join(choices)}")
        return text
    return parse


@dataclass(frozen=True)
class Prompt:
    """The token layout every method reads: [head][context][question].

    head precedes the context (BOS, chat-template head, instruction; ParallelComp repeats it in
    every chunk); question is the question block (BOS + question, chat-template tail), empty for
    a plain continuation. eos_ids: the end-of-turn tokens, which a question's score ignores;
    sentence_end_ids: the tokens that end a sentence or a line (Tokenizer.sentence_end_ids).
    """
    head: list[int]
    context: list[int]
    question: list[int]
    bos_id: int | None = None
    eos_ids: frozenset = frozenset()
    sentence_end_ids: frozenset = frozenset()

    def ids(self):
        return self.head + self.context + self.question


@dataclass
class Prefilled:
    """A prompt encoded by some method, ready for the decode loop.

    stats: what the method reports (see its module), and `forwards`, a list of [tokens, keys]
    for every sequence the method ran through the model (tokens new queries after keys - tokens
    cached ones), with `scored_tokens`, the rows sent through the LM head: the benchmark counts
    FLOPs from them.
    """
    cache: KVCache  # the prompt as the method kept it, with room for the answer
    logits: torch.Tensor  # (vocab,) float32 at the prompt's last token
    next_position: int  # RoPE position of the first generated token
    stats: dict
    model: Llama | None = None  # the model the decode loop continues with; None: the one that prefilled


def prefill_piece(device):
    return PREFILL_PIECE.get(device.type, PREFILL_PIECE["cuda"])


def kv_bytes_per_token(model):
    """Memory a cached token takes: its K and V in every layer."""
    c = model.config
    return 2 * c.n_layers * c.n_kv_heads * c.head_dim * model.dtype.itemsize


def activation_bytes_per_token(model):
    """Memory a token's activations take in one layer while it is encoded (RoPE in float32)."""
    c, b = model.config, model.dtype.itemsize
    qkv = (c.n_heads + 2 * c.n_kv_heads) * c.head_dim
    return b * (6 * c.dim + 3 * qkv + 4 * c.ffn_dim) + 8 * qkv


def prefill_bytes_per_token(model):
    """Memory a prefilled token takes: its K/V in every layer, plus its activations while encoded."""
    return kv_bytes_per_token(model) + activation_bytes_per_token(model)


def causal_prefill(model, ids, answer_budget):
    """Plain causal prefill of `ids` at positions 0..T-1 into a new cache with room for the
    answer: (cache, logits (vocab,) at the last token). Raises MemoryShortage at once when the
    cache and one piece's activations would not fit, rather than minutes into the prefill."""
    cache = prefill_cache(model, len(ids) + answer_budget, min(len(ids), prefill_piece(model.device)))
    return cache, extend(model, cache, ids, 0)


def prefill_cache(model, tokens, piece):
    """A KVCache of `tokens` entries, once it and the activations of a `piece`-token forward are
    known to fit (MemoryShortage otherwise)."""
    need = kv_bytes_per_token(model) * tokens + activation_bytes_per_token(model) * piece
    free = free_memory(model.device)
    if need > free:
        raise MemoryShortage(f"a cache of {tokens:,} tokens and their prefill need {need / 2**30:.1f} GiB, "
                             f"{free / 2**30:.1f} GiB are free on {model.device}: shorten the prompt or the "
                             "answer, or choose a method with a bounded cache")
    return KVCache(model.config, 1, tokens, model.device, model.dtype)


def extend(model, cache, ids, position):
    """Append `ids` after the cache's live entries, causally, at positions position.., in pieces
    of PREFILL_PIECE tokens; returns the logits (vocab,) at the last one."""
    tokens = torch.tensor([ids], device=model.device)
    piece = prefill_piece(model.device)
    for a in range(0, len(ids), piece):
        b = min(a + piece, len(ids))
        positions = torch.arange(position + a, position + b, device=model.device)[None]
        hidden = model(tokens[:, a:b], positions, cache.append_attend)
    return model.logits(hidden[0, -1])


# ---------------------------------------------------------------------------- sessions (Engine.open)

def encoding_home(model, nbytes, limit, offload=False):
    """Where a session's encoding of `nbytes` lives: the model's device when it stays within
    `limit` bytes (None: half the free memory where it may be offloaded, else all of it); else,
    where it may be `offload`ed and the model is on a GPU, the CPU (pinned memory), within
    PINNED_SHARE of the available host memory. One that fits nowhere is refused: OptionError
    naming session_cache_gib when a limit was given, MemoryShortage otherwise."""
    device, gib = model.device, nbytes / 2**30
    free = free_memory(device)
    if nbytes <= (limit if limit is not None else free // 2 if offload else free):
        return device
    host = available_memory()
    offloads = offload and device.type == "cuda"
    if offloads and nbytes <= PINNED_SHARE * host:
        return torch.device("cpu")
    host_part = f" and than {PINNED_SHARE:.0%} of the host's {host / 2**30:.1f} GiB available" if offloads else ""
    if limit is not None:
        raise OptionError("session_cache_gib", f"the session's cache needs {gib:.2f} GiB, more than {{0}} "
                                               f"({limit / 2**30:g} GiB) allows on {device}{host_part}: raise {{0}} "
                                               "or shorten the document")
    raise MemoryShortage(f"the session's cache needs {gib:.1f} GiB, more than {'half ' if offload else ''}the "
                         f"{free / 2**30:.1f} GiB free on {device}{host_part}: shorten the document, or choose a "
                         "method with a bounded cache")


def carry_over(source, target, n):
    """Copy the first n entries of each layer of cache `source` into `target`, a cache of its kind
    (a RawKeyCache's raw keys too, while it keeps them), whose lens become n: a session's encoding
    into the cache that one question continues."""
    pairs = [(source.k, target.k), (source.v, target.v)]
    if isinstance(source, RawKeyCache) and source.k_raw is not None:
        pairs.append((source.k_raw, target.k_raw))
    for a, b in pairs:
        b[:, :, :, :n] = a[:, :, :, :n]
    target.lens.fill_(n)


def cache_bytes(cache):
    """Bytes a cache's tensors hold."""
    raw = cache.k_raw if isinstance(cache, RawKeyCache) else None
    return sum(t.numel() * t.element_size() for t in (cache.k, cache.v, raw) if t is not None)
