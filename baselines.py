"""The baselines ParallelComp is compared with, behind the same prefill interface (prefill.py).

full: plain causal attention over the whole prompt; past the trained window that is the model's
own extrapolation. truncate: the first and last halves of what the window leaves, as LongBench
truncates its prompts. streaming: StreamingLLM (Xiao et al., arXiv 2309.17453), a few attention
sinks and a recent window, evicted tokens dropped as the prompt streams in. yarn: full attention
with YaRN (Peng et al., arXiv 2309.00071) applied to a checkpoint trained without it, its window
stretched `factor` times (Qwen2.5's model card: factor 4 over 32,768 positions for 128K); the
decode loop continues on the same YaRN view of the model (Prefilled.model).

Sessions (prefill.py): full, truncate and yarn keep a PrefixCache, the K/V of the last prompt's
kept tokens: a question reuses the entries of the prefix its own kept tokens share with them
(full and yarn: the head and the context; truncate: the first half of what the window keeps, or
everything when the prompt fits) and prefills the rest. streaming keeps the cache after the
context's whole blocks, which are the same for every question with the same answer budget, and
streams each question's remaining blocks from a copy of it.
"""

from dataclasses import dataclass

import torch

from model import CACHE_ALIGN, KVCache
from prefill import (QUESTION_ROOM, OptionError, Prefilled, cache_bytes, carry_over, causal_prefill, encoding_home,
                     extend, kv_bytes_per_token, option, prefill_cache, prefill_piece)
from rope import apply_rope

SINK_TOKENS = 4  # StreamingLLM's attention sinks
STREAM_BLOCKS = 8  # streaming: tokens enter in blocks of an eighth of the cache


@dataclass(frozen=True)
class BaselineConfig:
    """The baselines take no options."""

    def validate(self, model_config):
        pass


def room(model, answer_budget):
    """Prompt tokens that truncate and streaming keep: the trained window less the answer."""
    window = model.config.max_position_embeddings
    if answer_budget + SINK_TOKENS >= window:
        raise OptionError("max_new_tokens", f"{{}} must leave room for the prompt in the model's {window}-token window")
    return window - answer_budget


def full_stats(n_tokens, dropped=0):
    return dict(truncated_tokens=dropped, forwards=[[n_tokens, n_tokens]], scored_tokens=0)


def prefill_full(model, prompt, config, answer_budget, on_progress=None):
    """Causal prefill of the whole prompt at positions 0..T-1."""
    ids = prompt.ids()
    cache, logits = causal_prefill(model, ids, answer_budget)
    return Prefilled(cache, logits, len(ids), full_stats(len(ids)))


def truncate(ids, keep):
    """The first and last halves of `keep` tokens."""
    if len(ids) <= keep:
        return ids
    return ids[:keep // 2] + ids[len(ids) - (keep - keep // 2):]


def prefill_truncate(model, prompt, config, answer_budget, on_progress=None):
    """Causal prefill of the prompt cut to what the window leaves for the answer."""
    ids = truncate(prompt.ids(), room(model, answer_budget))
    cache, logits = causal_prefill(model, ids, answer_budget)
    return Prefilled(cache, logits, len(ids), full_stats(len(ids), len(prompt.ids()) - len(ids)))


def shift_back(cache, drop, n, rope):
    """Evict the `drop` oldest tokens after the sinks from a cache of n: the rest move down by
    `drop` slots and their keys are rotated back by `drop` positions, so positions stay 0..n-drop-1.
    rope: the model's Llama.rope; a relative turn, so without YaRN's temperature, which the keys carry."""
    cos, sin = rope(torch.tensor([[-drop]], device=cache.k.device), temperature=False)  # (1, 1, 1, D/2)
    recent = slice(SINK_TOKENS + drop, n)
    cache.k[:, 0, :, SINK_TOKENS:n - drop] = apply_rope(cache.k[:, 0, :, recent], cos, sin)
    cache.v[:, 0, :, SINK_TOKENS:n - drop] = cache.v[:, 0, :, recent].clone()


def prefill_streaming(model, prompt, config, answer_budget, on_progress=None):
    """StreamingLLM's cache policy over the prompt: blocks of tokens attend to the first
    SINK_TOKENS tokens and the most recent ones; older tokens are evicted, and the keys that stay
    are rotated back so that cache positions remain 0..n-1."""
    ids, keep = prompt.ids(), room(model, answer_budget)
    cache = KVCache(model.config, 1, keep + answer_budget, model.device, model.dtype)
    forwards = []
    n, hidden = stream(model, cache, ids, 0, 0, keep, forwards)
    stats = dict(truncated_tokens=len(ids) - n, forwards=forwards, scored_tokens=0)
    return Prefilled(cache, model.logits(hidden[0, -1]), n, stats)


def stream(model, cache, ids, start, n, keep, forwards):
    """Stream ids[start:] (start a multiple of the block) into a cache of n tokens that keeps at
    most `keep`, a block of keep // STREAM_BLOCKS tokens at a time, appending each forward to
    `forwards`: (n, the hidden states of the last block, None when there was none)."""
    block, hidden = max(1, keep // STREAM_BLOCKS), None
    for a in range(start, len(ids), block):
        tokens = ids[a:a + block]
        drop = max(0, n + len(tokens) - keep)
        if drop:
            shift_back(cache, drop, n, model.rope)
            n -= drop
        positions = torch.arange(n, n + len(tokens), device=model.device)[None]
        hidden = model(torch.tensor([tokens], device=model.device), positions, cache.prefill_attend(n))
        n += len(tokens)
        forwards.append([len(tokens), n])
    return n, hidden


@dataclass(frozen=True)
class YarnConfig:
    factor: float = option(4.0, "YaRN's factor: the window becomes this many times the trained one",
                           flag="--yarn-factor", metavar="FACTOR")

    def validate(self, model_config):
        if not self.factor >= 1:
            raise OptionError("factor", "{} must be at least 1")
        if model_config.rope_scaling is not None:
            raise OptionError("method", f"{{0}} yarn applies YaRN to a checkpoint without RoPE scaling; this one "
                                        f"has {model_config.rope_type} scaling in its config.json: use {{0}} full")


def prefill_yarn(model, prompt, config, answer_budget, on_progress=None):
    """Causal prefill of the whole prompt on a YaRN view of the model whose window is `factor`
    times the trained one; the decode loop continues on that view."""
    yarn = yarn_view(model, config)
    ids = yarn_ids(yarn, config, prompt, answer_budget)
    cache, logits = causal_prefill(yarn, ids, answer_budget)
    return Prefilled(cache, logits, len(ids), full_stats(len(ids)), model=yarn)


def yarn_view(model, config):
    """The YaRN view of the model whose window is `factor` times the trained one."""
    config.validate(model.config)
    window = model.config.max_position_embeddings
    scaling = {"rope_type": "yarn", "factor": config.factor, "original_max_position_embeddings": window}
    return model.with_rope_scaling(scaling, int(config.factor * window))


def yarn_ids(yarn, config, prompt, answer_budget):
    """The prompt's ids, once they and the answer are known to fit YaRN's window."""
    ids, extended = prompt.ids(), yarn.config.max_position_embeddings
    if len(ids) + answer_budget > extended:
        window = yarn.config.rope_scaling["original_max_position_embeddings"]
        raise OptionError("factor", f"the prompt ({len(ids):,} tokens) and the answer ({answer_budget:,}) exceed "
                                    f"YaRN's {extended:,}-token window ({{0}} {config.factor:g} times {window:,}): "
                                    f"raise {{0}}, lower the answer budget or shorten the prompt")
    return ids


# ---------------------------------------------------------------------------- sessions

def common_prefix(a, b):
    """The length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    differ = (torch.tensor(a[:n]) != torch.tensor(b[:n])).nonzero()
    return int(differ[0]) if len(differ) else n


class PrefixCache:
    """The K/V of token ids at positions 0.. in a KVCache, for prompts that start with some of
    them. A token's K/V depend only on the tokens before it, so `resume` reuses the entries of the
    common prefix and prefills the rest after them; the decode loop writes after the prompt, so
    the prompt's entries stay valid for the next one."""

    def __init__(self, model, ids, answer_budget, limit):
        self.model, self.limit = model, limit
        self.cache = self.new_cache(len(ids) + answer_budget + QUESTION_ROOM, len(ids))
        if ids:
            extend(model, self.cache, ids, 0)
        self.ids = ids

    def new_cache(self, tokens, piece):
        capacity = -(-tokens // CACHE_ALIGN) * CACHE_ALIGN  # what KVCache allocates
        encoding_home(self.model, kv_bytes_per_token(self.model) * capacity, self.limit)  # refuses what may not fit
        return prefill_cache(self.model, tokens, min(piece, prefill_piece(self.model.device)))

    def resume(self, ids, answer_budget):
        """(cache, logits (vocab,) at the last of ids, tokens prefilled): the cache holds ids with
        room for the answer; at least the last token is prefilled, for its logits."""
        p = min(common_prefix(self.ids, ids), len(ids) - 1)
        self.ids = self.ids[:p]  # what stays valid should the prefill be interrupted
        if len(ids) + answer_budget > self.cache.capacity:
            grown = self.new_cache(len(ids) + answer_budget + QUESTION_ROOM, len(ids) - p)
            carry_over(self.cache, grown, p)
            self.cache = grown
        self.cache.lens.fill_(p)
        logits = extend(self.model, self.cache, ids[p:], p)
        self.ids = ids
        return self.cache, logits, len(ids) - p


class CausalEncoding:
    """full, truncate or yarn in a session: kept(prompt, answer_budget) gives the ids the method
    prefills, view the model it runs (yarn's; None: the engine's)."""

    def __init__(self, model, ids, kept, answer_budget, limit, view=None):
        self.kept, self.view = kept, view
        self.prefix = PrefixCache(view or model, ids, answer_budget, limit)

    @property
    def nbytes(self):
        return cache_bytes(self.prefix.cache)

    @property
    def home(self):
        return self.prefix.cache.k.device

    def ask(self, prompt, answer_budget, on_progress=None):
        ids = self.kept(prompt, answer_budget)
        cache, logits, encoded = self.prefix.resume(ids, answer_budget)
        stats = dict(full_stats(len(ids), len(prompt.ids()) - len(ids)), forwards=[[encoded, len(ids)]],
                     encoded_tokens=encoded)
        return Prefilled(cache, logits, len(ids), stats, model=self.view)


def open_full(model, prompt, config, answer_budget, limit, on_progress=None):
    return CausalEncoding(model, prompt.ids(), lambda p, budget: p.ids(), answer_budget, limit)


def open_truncate(model, prompt, config, answer_budget, limit, on_progress=None):
    """The first tokens the window keeps of the context: every question's kept tokens start with
    their first half, or with all of the head and the context when the prompt fits."""
    keep = room(model, answer_budget)
    return CausalEncoding(model, prompt.ids()[:keep], lambda p, budget: truncate(p.ids(), room(model, budget)),
                          answer_budget, limit)


def open_yarn(model, prompt, config, answer_budget, limit, on_progress=None):
    yarn = yarn_view(model, config)
    return CausalEncoding(model, yarn_ids(yarn, config, prompt, answer_budget),
                          lambda p, budget: yarn_ids(yarn, config, p, budget), answer_budget, limit, view=yarn)


class StreamingEncoding:
    """StreamingLLM in a session: the cache after the context's whole blocks (blocks start at
    multiples of the block, which the answer budget sizes), from a copy of which each question
    streams the rest; a question with another answer budget encodes them anew."""

    def __init__(self, model, prompt, config, answer_budget, limit, on_progress=None):
        self.model, self.limit, self.context = model, limit, prompt.ids()
        self.cache = None
        self.encode(answer_budget)

    @property
    def nbytes(self):
        return cache_bytes(self.cache)

    @property
    def home(self):
        return self.cache.k.device

    def encode(self, answer_budget):
        """The cache after the context's whole blocks for the budget's window: the tokens encoded."""
        model, keep = self.model, room(self.model, answer_budget)
        self.cache = None
        encoding_home(model, kv_bytes_per_token(model) * keep, self.limit)
        cache = KVCache(model.config, 1, keep, model.device, model.dtype)
        block = max(1, keep // STREAM_BLOCKS)
        start = len(self.context) // block * block
        self.n, _ = stream(model, cache, self.context[:start], 0, 0, keep, [])
        self.keep, self.start, self.cache = keep, start, cache
        return start

    def ask(self, prompt, answer_budget, on_progress=None):
        model, ids, keep = self.model, prompt.ids(), room(self.model, answer_budget)
        encoded = self.encode(answer_budget) if self.cache is None or keep != self.keep else 0
        cache = KVCache(model.config, 1, keep + answer_budget, model.device, model.dtype)
        carry_over(self.cache, cache, self.n)
        forwards = []
        n, hidden = stream(model, cache, ids, self.start, self.n, keep, forwards)
        stats = dict(truncated_tokens=len(ids) - n, forwards=forwards, scored_tokens=0,
                     encoded_tokens=encoded + len(ids) - self.start)
        return Prefilled(cache, model.logits(hidden[0, -1]), n, stats)
