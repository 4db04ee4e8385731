"""What every prefill method shares: the prompt's token layout, the result a prefill returns and
the error a bad option raises.

A method is a module with a frozen config dataclass, whose fields are declared with `option`, and

    prefill(model, prompt, config, answer_budget, on_progress=None) -> Prefilled

which encodes the prompt into a KV cache with room for `answer_budget` generated tokens. The
table in methods.py names the methods; the decode loop (decoding.py) continues from any Prefilled.
"""

import os
from dataclasses import dataclass, field

import torch

from model import KVCache, Llama

PREFILL_PIECE = {"cuda": 8192, "cpu": 2048}  # tokens per causal-prefill forward


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


def option(default, help, parse=None, flag=None, metavar=None):
    """A config field with what the command line needs: its help, how to parse a value (int,
    float, str or a parser raising ValueError; default: the type of `default`), when it differs
    from --field-name its flag, and its value's name in --help where it is not a count (N)."""
    return field(default=default, metadata=dict(help=help, parse=parse or type(default), flag=flag, metavar=metavar))


@dataclass(frozen=True)
class Prompt:
    """The token layout every method reads: [head][context][question].

    head precedes the context (BOS, chat-template head, instruction; ParallelComp repeats it in
    every chunk); question is the question block (BOS + question, chat-template tail), empty for
    a plain continuation. eos_ids: the end-of-turn tokens, which a question's score ignores.
    """
    head: list[int]
    context: list[int]
    question: list[int]
    bos_id: int | None = None
    eos_ids: frozenset = frozenset()

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
    tokens, piece = len(ids) + answer_budget, min(len(ids), prefill_piece(model.device))
    need = kv_bytes_per_token(model) * tokens + activation_bytes_per_token(model) * piece
    free = free_memory(model.device)
    if need > free:
        raise MemoryShortage(f"a cache of {tokens:,} tokens and their prefill need {need / 2**30:.1f} GiB, "
                             f"{free / 2**30:.1f} GiB are free on {model.device}: shorten the prompt or the "
                             "answer, or choose a method with a bounded cache")
    cache = KVCache(model.config, 1, tokens, model.device, model.dtype)
    return cache, extend(model, cache, ids, 0)


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
