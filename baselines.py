"""The baselines ParallelComp is compared with, behind the same prefill interface (prefill.py).

full: plain causal attention over the whole prompt; past the trained window that is the model's
own extrapolation. truncate: the first and last halves of what the window leaves, as LongBench
truncates its prompts. streaming: StreamingLLM (Xiao et al., arXiv 2309.17453), a few attention
sinks and a recent window, evicted tokens dropped as the prompt streams in. yarn: full attention
with YaRN (Peng et al., arXiv 2309.00071) applied to a checkpoint trained without it, its window
stretched `factor` times (Qwen2.5's model card: factor 4 over 32,768 positions for 128K); the
decode loop continues on the same YaRN view of the model (Prefilled.model).
"""

from dataclasses import dataclass

import torch

from model import KVCache
from rope import apply_rope
from prefill import OptionError, Prefilled, causal_prefill, option

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
    block = max(1, keep // STREAM_BLOCKS)
    cache = KVCache(model.config, 1, keep + answer_budget, model.device, model.dtype)
    n, forwards = 0, []
    for start in range(0, len(ids), block):
        tokens = ids[start:start + block]
        drop = max(0, n + len(tokens) - keep)
        if drop:
            shift_back(cache, drop, n, model.rope)
            n -= drop
        positions = torch.arange(n, n + len(tokens), device=model.device)[None]
        hidden = model(torch.tensor([tokens], device=model.device), positions, cache.prefill_attend(n))
        n += len(tokens)
        forwards.append([len(tokens), n])
    stats = dict(truncated_tokens=len(ids) - n, forwards=forwards, scored_tokens=0)
    return Prefilled(cache, model.logits(hidden[0, -1]), n, stats)


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
    config.validate(model.config)
    window = model.config.max_position_embeddings
    scaling = {"rope_type": "yarn", "factor": config.factor, "original_max_position_embeddings": window}
    yarn = model.with_rope_scaling(scaling, int(config.factor * window))
    ids, extended = prompt.ids(), yarn.config.max_position_embeddings
    if len(ids) + answer_budget > extended:
        raise OptionError("factor", f"the prompt ({len(ids):,} tokens) and the answer ({answer_budget:,}) exceed "
                                    f"YaRN's {extended:,}-token window ({{0}} {config.factor:g} times {window:,}): "
                                    f"raise {{0}}, lower the answer budget or shorten the prompt")
    cache, logits = causal_prefill(yarn, ids, answer_budget)
    return Prefilled(cache, logits, len(ids), full_stats(len(ids)), model=yarn)
