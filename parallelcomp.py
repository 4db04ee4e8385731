"""ParallelComp: training-free length extrapolation (Xiong et al., ICML 2025, arXiv 2502.14317).

A context longer than the trained window is cut into chunks that fit it. Each chunk is encoded
with the question appended, at positions that restart from 0, several chunks per forward. The
self-information of the question given a chunk (its mean NLL) ranks the chunks; only the k most
relevant survive (chunk eviction), so at most k + one batch of chunk caches are ever alive.
Inside each chunk, tokens that the question barely attends to can be dropped as well (parallel
KV-cache eviction). The kept caches are concatenated in document order, and the question is
encoded once more after the longest kept chunk, attending to all of them with one softmax;
attention calibration can evict, in chosen layers, the cache tokens that draw abnormal attention
(attention sinks). Decoding then continues from the assembled cache.

Deviations from the original code (menik1126/ParallelComp), all deliberate:
- chunks are cut on token boundaries of the once-tokenised context, not on characters, and by
  default moved to sentence ends (cut_at; the original cuts anywhere, a fact in two halves);
- by default chunks hold at most 4,096 tokens and 2 are kept (the original: nearly the window, 3),
  on RULER the one fixed setting first on SmolLM2 and within a prompt of the best on Qwen2.5-1.5B;
- caches are GQA-native; KV eviction and calibration select per KV head (the group's mean
  score, the union of the group's above-threshold tokens);
- with KV eviction BOS is never a candidate but always kept, so BOS handling at assembly is the
  same with and without eviction (only the first kept chunk keeps it);
- calibration regions partition the cache axis (sink t < w, middle w <= t < N - w, recent
  t >= N - w), and the question rows keep an exact causal mask after eviction.
"""

import bisect
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attention import attention, scores_f32
from model import KVCache
from prefill import OptionError, Prefilled, free_memory, option, prefill_bytes_per_token

OBSERVATION_WINDOW = 8  # last question tokens whose attention scores a chunk's tokens (KV eviction)
POOL_KERNEL = 7  # KV eviction max-pools scores over neighbours so kept tokens come in runs
MAX_BATCH_TOKENS = 16384  # one forward of this many tokens fills a GPU; the cap keeps memory independent of the prompt length
REGIONS = ("sink", "recent", "middle", "all")
CUTS = ("sentence", "token")  # where chunk boundaries may fall
# the defaults (chunks of 4K tokens cut at sentences, top 2): RULER's average on tuning seed 0 put them
# first on SmolLM2 and 2.4 points (under a prompt) behind 8K chunks on Qwen2.5-1.5B, where 8K is SmolLM2's
# whole window (results/README.md); the original's are chunks of nearly the window, top 3
CHUNK_TOKENS = 4096
CUT_ROOM = 16  # cut_at=sentence leaves a 16th of chunk_tokens per chunk for its cuts to move in
KV_PLACEMENTS = ("gather", "sharded")  # where the kept chunks' K/V go with several processes (distributed.py)


@dataclass(frozen=True)
class Calibration:
    """Evict, in layers first..last of the query pass, the tokens of `region` whose attention
    from the last question token exceeds `threshold`."""
    region: str
    first_layer: int
    last_layer: int
    threshold: float = 0.1
    width: int = 100  # tokens in the sink and recent regions

    @classmethod
    def parse(cls, spec):
        """'sink:3-6' -> Calibration('sink', 3, 6)."""
        m = re.fullmatch(r"(\w+):(\d+)-(\d+)", spec)
        if not m or m[1] not in REGIONS or int(m[2]) > int(m[3]):
            raise ValueError(f"{spec!r}: expected REGION:FIRST-LAST with REGION one of "
                             f"{', '.join(REGIONS)} and FIRST <= LAST, e.g. sink:3-6")
        return cls(m[1], int(m[2]), int(m[3]))


@dataclass(frozen=True)
class ParallelCompConfig:
    chunk_tokens: int | None = option(None, f"context tokens per chunk (default: {CHUNK_TOKENS}, or what the "
                                      "trained window leaves after the head, the question and the answer where "
                                      "that is less)", parse=int)
    cut_at: str = option("sentence", "where chunks are cut: sentence = each cut moved to the nearest sentence or "
                         "line end that keeps every chunk within chunk-tokens; token = evenly, on any token (the "
                         "original cuts characters)", choices=CUTS)
    top_k_chunks: int = option(2, "chunks kept (chunk eviction; the original keeps 3, and 1 for retrieval tasks)",
                               metavar="K")
    kv_budget: int | None = option(None, "context tokens kept per KV head in each chunk, by parallel KV-cache "
                                   "eviction (default: off)", parse=int)
    calibration: Calibration | None = option(None, "attention calibration in layers FIRST..LAST of the query "
                                             "pass, e.g. sink:3-6 (default: off)", parse=Calibration.parse,
                                             flag="--calibrate", metavar="REGION:FIRST-LAST")
    kv_placement: str = option("gather", "with several processes: gather = the kept chunks' K/V go to "
                               "rank 0, which decodes alone; sharded = they stay where they were encoded and "
                               "attention is merged across processes", choices=KV_PLACEMENTS)

    def validate(self, model_config):
        window, n_layers = model_config.max_position_embeddings, model_config.n_layers
        for bad, param, message in (
                (self.top_k_chunks < 1, "top_k_chunks", "{} must be at least 1"),
                (self.chunk_tokens is not None and self.chunk_tokens < 1, "chunk_tokens", "{} must be at least 1"),
                (self.chunk_tokens is not None and self.chunk_tokens > window, "chunk_tokens",
                 f"{{}} must be between 1 and the model's {window}-token window"),
                (self.kv_budget is not None and self.kv_budget < 1, "kv_budget", "{} must be at least 1"),
                (self.calibration is not None and self.calibration.last_layer >= n_layers, "calibration",
                 f"{{}} layers must be below the model's {n_layers} layers"),
                (self.cut_at not in CUTS, "cut_at", f"{{}} must be {' or '.join(CUTS)}"),
                (self.kv_placement not in KV_PLACEMENTS, "kv_placement", f"{{}} must be {' or '.join(KV_PLACEMENTS)}")):
            if bad:
                raise OptionError(param, message)


@dataclass
class ChunkCache:
    """One encoded chunk: its context's K/V (L, H_kv, n, D) without the question part."""
    index: int  # position of the chunk in the document
    span: range  # its tokens in the context
    context_len: int  # BOS + head + chunk, before KV eviction
    has_bos: bool
    k: torch.Tensor
    v: torch.Tensor
    nll: float = math.nan


# ---------------------------------------------------------------------------- chunking

def chunk_spans(n_tokens, chunk_tokens, breaks=None):
    """n = ceil(T / chunk_tokens) contiguous spans covering range(T), cut at i·T/n (nearly equal).

    breaks: sorted positions where a cut may fall (after a sentence end). A context that needs cuts
    then gets n = ceil(T / (15/16 chunk_tokens)), so that every chunk has room to grow, and each
    cut moves to the break nearest its even place among those that keep this chunk and the rest
    within chunk_tokens; where there is none it stays.
    """
    n = max(1, math.ceil(n_tokens / chunk_tokens))
    if breaks is None or n == 1:
        bounds = [i * n_tokens // n for i in range(n + 1)]
    else:
        n = math.ceil(n_tokens / (chunk_tokens - chunk_tokens // CUT_ROOM))
        bounds = [0]
        for i in range(1, n):
            lo = max(bounds[-1] + 1, n_tokens - (n - i) * chunk_tokens)  # the n - i chunks after it still fit
            hi = min(bounds[-1] + chunk_tokens, n_tokens - (n - i))  # this one fits, the next ones are not empty
            bounds.append(nearest_break(breaks, min(max(i * n_tokens // n, lo), hi), lo, hi))
        bounds.append(n_tokens)
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def nearest_break(breaks, target, lo, hi):
    """The element of breaks in [lo, hi] nearest target (the earlier on a tie), else target."""
    j = bisect.bisect_left(breaks, target)
    near = [b for b in breaks[max(j - 1, 0):j + 1] if lo <= b <= hi]
    return min(near, key=lambda b: (abs(b - target), b), default=target)


def sentence_breaks(prompt):
    """Positions in prompt's context right after a token that ends a sentence or a line."""
    ends = prompt.sentence_end_ids
    return [j for j, t in enumerate(prompt.context[:-1], 1) if t in ends]


def default_chunk_tokens(window, head_len, question_len, answer_budget):
    """CHUNK_TOKENS, less where head + chunk + question + answer would not fit the trained window."""
    budget = window - head_len - question_len - answer_budget
    if budget < 1:
        raise OptionError("max_new_tokens", f"the question ({question_len} tokens) and {{}} ({answer_budget}) "
                                            f"leave no room for context in the model's {window}-token window")
    return min(CHUNK_TOKENS, budget)


def chunk_batch_size(model, chunk_len, n_chunks):
    """Chunks per forward: what half the free memory holds, at most MAX_BATCH_TOKENS tokens."""
    fits = int(0.5 * free_memory(model.device) // (prefill_bytes_per_token(model) * chunk_len))
    return max(1, min(n_chunks, fits, MAX_BATCH_TOKENS // chunk_len))


# ---------------------------------------------------------------------------- encoding chunks

def kv_eviction(q_obs, k, candidates, budget):
    """Indices of the `budget` candidate keys the observation queries attend to most, per KV head.

    q_obs (H, W, D): the last W question queries; k (H_kv, L, D): the chunk's keys, the
    observation queries being the last W of them; candidates: a range of key indices.
    Returns (H_kv, budget) sorted indices.
    """
    H, W, D = q_obs.shape
    Hkv, L = k.shape[0], k.shape[1]
    s = scores_f32(q_obs.reshape(1, Hkv, (H // Hkv) * W, D), k[None])[0]  # (H_kv, G*W, L)
    causal = torch.arange(L, device=k.device) <= (L - W + torch.arange(W, device=k.device))[:, None]
    s = s.view(Hkv, H // Hkv, W, L).masked_fill(~causal, float("-inf"))
    score = s.softmax(-1).sum(2).mean(1)[:, candidates.start:candidates.stop]  # (H_kv, n)
    pooled = F.max_pool1d(score[:, None], POOL_KERNEL, stride=1, padding=POOL_KERNEL // 2)[:, 0]
    return pooled.topk(budget, dim=-1).indices.sort(-1).values + candidates.start




class ChunkEncoder:
    """The `attend` of a batch of chunks: causal attention inside each chunk; each chunk's
    context K/V, thinned by KV eviction when a budget is set, go to its ChunkCache."""

    def __init__(self, chunks, input_lens, kv_budget):
        self.chunks, self.input_lens, self.kv_budget = chunks, input_lens, kv_budget

    def __call__(self, layer, q, k, v):
        for b, chunk in enumerate(self.chunks):
            end = self.input_lens[b]
            keep_chunk_kv(chunk, layer, q[b, :, end - OBSERVATION_WINDOW:end], k[b, :, :end], v[b, :, :end],
                          self.kv_budget)
        return attention(q, k, v)


def keep_chunk_kv(chunk, layer, q_obs, k, v, kv_budget):
    """One layer of a chunk's context K/V into its ChunkCache: k, v (H_kv, L, D) its input's,
    [head + chunk + question]; q_obs (H, W, D) the queries of its last W tokens. KV eviction
    thins them to what the cache has room for."""
    keys, values = k[:, :chunk.context_len], v[:, :chunk.context_len]
    if chunk.k.shape[2] < chunk.context_len:
        keep = kv_eviction(q_obs, k, range(int(chunk.has_bos), chunk.context_len), kv_budget)
        if chunk.has_bos:
            keep = torch.cat([keep.new_zeros(keep.shape[0], 1), keep], dim=1)
        index = keep[..., None].expand(-1, -1, k.shape[-1])
        keys, values = keys.gather(1, index), values.gather(1, index)
    chunk.k[layer], chunk.v[layer] = keys, values


def query_nll(logits, targets, eos_ids=frozenset()):
    """Self-information of the question given a chunk: the summed NLL of its tokens divided by
    (length - 1), as the original does (the first prediction is the question's BOS); EOS targets
    (a chat template's end of turn) are not scored, as the original ignores them."""
    nll = F.cross_entropy(logits, targets, reduction="none")
    scored = torch.tensor([t not in eos_ids for t in targets.tolist()], device=nll.device)
    return nll[scored].sum().item() / max(len(targets) - 1, 1)


def stored_tokens(context_len, has_bos, kv_budget):
    """Context tokens a chunk's cache keeps per KV head: all, or BOS and kv_budget after KV eviction."""
    return context_len if kv_budget is None else min(context_len, kv_budget + has_bos)


def encode_chunks(model, prompt, spans, indices, kv_budget):
    """One forward over a batch of chunks, each [head + chunk + question] at positions 0..L-1.

    spans: every chunk of the context; indices: those of the batch. Returns their ChunkCaches,
    K/V and question NLL filled in.
    """
    c, head, question = model.config, prompt.head, prompt.question
    has_bos = has_bos_head(prompt)
    inputs = [head + prompt.context[spans[j].start:spans[j].stop] + question for j in indices]
    lens = [len(x) for x in inputs]
    tokens, positions = padded(inputs, model.device)
    chunks = []
    for j in indices:
        context_len = len(head) + len(spans[j])
        shape = (c.n_layers, c.n_kv_heads, stored_tokens(context_len, has_bos, kv_budget), c.head_dim)
        k, v = (torch.empty(shape, device=model.device, dtype=model.dtype) for _ in range(2))
        chunks.append(ChunkCache(j, spans[j], context_len, has_bos, k, v))
    hidden = model(tokens, positions, ChunkEncoder(chunks, lens, kv_budget))
    targets = torch.tensor(question, device=model.device)
    for b, chunk in enumerate(chunks):
        # (Lq, dim): the rows that predict the question; from its second token when nothing precedes it
        predicting = hidden[b, max(chunk.context_len - 1, 0):lens[b] - 1]
        chunk.nll = query_nll(model.logits(predicting), targets[len(targets) - len(predicting):], prompt.eos_ids)
    return chunks


def padded(inputs, device):
    """Token lists right-padded into tokens (B, T) at positions 0..T-1: causal attention keeps
    each one's real tokens exact."""
    tokens = torch.zeros(len(inputs), max(map(len, inputs)), dtype=torch.long)
    for b, x in enumerate(inputs):
        tokens[b, :len(x)] = torch.tensor(x, dtype=torch.long)
    tokens = tokens.to(device)
    return tokens, torch.arange(tokens.shape[1], device=device).expand_as(tokens)


def has_bos_head(prompt):
    return prompt.bos_id is not None and prompt.head[:1] == [prompt.bos_id]


def chunk_eviction(chunks, k):
    """The k chunks with the lowest question NLL; on a tie the later chunk stays, as in the original."""
    return sorted(chunks, key=lambda c: (c.nll, -c.index))[:k]


# ---------------------------------------------------------------------------- the query pass

def assemble_cache(config, kept, room):
    """The kept chunks' context K/V, concatenated in document order into one decode cache with
    `room` free slots; only the first chunk keeps its BOS. Returns the cache and S, its length."""
    pieces = [(c.k, c.v) if i == 0 or not c.has_bos else (c.k[:, :, 1:], c.v[:, :, 1:])
              for i, c in enumerate(kept)]
    S = sum(k.shape[2] for k, _ in pieces)
    cache = KVCache(config, 1, S + room, kept[0].k.device, kept[0].k.dtype)
    offset = 0
    for k, v in pieces:
        cache.k[:, 0, :, offset:offset + k.shape[2]] = k
        cache.v[:, 0, :, offset:offset + k.shape[2]] = v
        offset += k.shape[2]
    cache.lens.fill_(S)
    return cache, S


def calibrate(q_last, keys, calibration):
    """Attention calibration for one layer: the keys each KV head keeps, and how many it evicts.

    q_last (H, D): the last question token's queries; keys (H_kv, N, D). Every head evicts the
    same number m: its above-threshold tokens in the region (the union over its query group),
    topped up with its least-attended tokens. Returns ((H_kv, N - m) sorted indices, m).
    """
    H, D = q_last.shape
    Hkv = keys.shape[0]
    return calibration_keep(scores_f32(q_last.reshape(1, Hkv, H // Hkv, D), keys[None])[0].softmax(-1), calibration)


def calibration_keep(probs, calibration):
    """calibrate's choice from the attention probabilities probs (H_kv, G, N) of the last
    question token's query group over the N cache tokens."""
    Hkv, _, N = probs.shape
    t, w = torch.arange(N, device=probs.device), calibration.width
    region = {"sink": t < w, "recent": t >= N - w, "middle": (t >= w) & (t < N - w),
              "all": torch.ones_like(t, dtype=torch.bool)}[calibration.region]
    above = (probs > calibration.threshold).any(dim=1) & region  # (H_kv, N)
    m = int(above.sum(-1).max())
    order = torch.where(above, float("inf"), -probs.mean(1)).argsort(-1, descending=True)
    return order[:, m:].sort(-1).values, m


class QueryPass:
    """The `attend` of the question after the assembled cache: one softmax over every kept chunk
    and the question so far; in the calibrated layers the cache is thinned first, for this pass
    and for decoding."""

    def __init__(self, cache, S, calibration):
        self.cache, self.S, self.calibration = cache, S, calibration
        self.evicted = 0

    def __call__(self, layer, q, k, v):
        cache, S, cal = self.cache, self.S, self.calibration
        end = S + k.shape[2]
        cache.k[layer, :, :, S:end], cache.v[layer, :, :, S:end] = k, v
        keys, values = cache.k[layer, :, :, :end], cache.v[layer, :, :, :end]
        if cal is None or not cal.first_layer <= layer <= cal.last_layer:
            cache.lens[layer] = end
            return attention(q, keys, values)  # question row i sees keys 0..S+i
        keep, m = calibrate(q[0, :, -1], keys[0], cal)
        index = keep[None, :, :, None].expand(1, -1, -1, keys.shape[-1])
        keys, values = keys.gather(2, index), values.gather(2, index)
        cache.k[layer, :, :, :end - m], cache.v[layer, :, :, :end - m] = keys, values
        cache.lens[layer] = end - m
        self.evicted += m
        rows = S + torch.arange(k.shape[2], device=q.device)
        visible = (keep[:, None, :] <= rows[:, None])  # (H_kv, Lq, N - m): the causal rule on original indices
        return attention(q, keys, values, visible.repeat_interleave(q.shape[1] // keep.shape[0], 0)[None])


# ---------------------------------------------------------------------------- the whole prefill

def prefill(model, prompt, config, answer_budget, on_progress=None):
    """ParallelComp prefill of [head + context + question] into a Prefilled ready for decoding.

    prompt.head precedes every chunk (BOS, template, instruction); prompt.question ranks the
    chunks and is encoded last. on_progress(chunks_done, chunks_total) is called after each batch.
    stats: chunks, kept_chunks and kept_spans (document order), kv_evicted_tokens (context
    tokens KV eviction dropped from the kept chunks, per KV head, the same in every layer) and
    calibration_evicted_tokens (cache tokens calibration dropped, per KV head, summed over the
    calibrated layers).
    """
    spans = context_spans(model, prompt, config, answer_budget)
    kept = select_chunks(model, prompt, spans, range(len(spans)), config, on_progress)
    return encode_question(model, prompt, spans, kept, config, answer_budget)


def context_spans(model, prompt, config, answer_budget):
    """The chunks' spans of the context, once the question and the options are checked."""
    if not prompt.question:
        raise OptionError("question", "ParallelComp needs a {} to rank the chunks by")
    return split_context(model, prompt, config, answer_budget)


def split_context(model, prompt, config, answer_budget):
    """The chunks' spans of the context, sized for prompt's question (default_chunk_tokens); cut by
    token where the prompt does not say which tokens end a sentence (no sentence_end_ids)."""
    config.validate(model.config)
    window, question = model.config.max_position_embeddings, prompt.question
    chunk_tokens = config.chunk_tokens or default_chunk_tokens(window, len(prompt.head), len(question), answer_budget)
    breaks = sentence_breaks(prompt) if config.cut_at == "sentence" and prompt.sentence_end_ids else None
    return chunk_spans(len(prompt.context), chunk_tokens, breaks)


def encode_question(model, prompt, spans, kept, config, answer_budget):
    """The query pass after the kept ChunkCaches (document order), which it empties: the Prefilled."""
    question = prompt.question
    cache, S = assemble_cache(model.config, kept, len(question) + answer_budget)
    for c in kept:
        c.k = c.v = None
    M = max(c.context_len for c in kept)
    query = QueryPass(cache, S, config.calibration)
    positions = torch.arange(M, M + len(question), device=model.device)[None]
    hidden = model(torch.tensor([question], device=model.device), positions, query)
    stats = prefill_stats(prompt, spans, kept, config.kv_budget, S, query.evicted)
    return Prefilled(cache, model.logits(hidden[0, -1]), M + len(question), stats)


def prefill_stats(prompt, spans, kept, kv_budget, S, calibration_evicted):
    """prefill's statistics (see there); S: the assembled cache's length before the question."""
    Lq = len(prompt.question)
    chunk_lens = [len(prompt.head) + len(s) + Lq for s in spans]
    return dict(chunks=len(spans), kept_chunks=[c.index for c in kept],
                kept_spans=[[c.span.start, c.span.stop] for c in kept],
                kv_evicted_tokens=sum(c.context_len - stored_tokens(c.context_len, c.has_bos, kv_budget) for c in kept),
                calibration_evicted_tokens=calibration_evicted,
                forwards=[[n, n] for n in chunk_lens] + [[Lq, S + Lq]], scored_tokens=len(spans) * Lq)


def select_chunks(model, prompt, spans, indices, config, on_progress):
    """Encode the chunks `indices` of spans in batches, keeping the top-k after each: the kept
    ChunkCaches in document order."""
    longest = max(len(spans[j]) for j in indices)
    batch = chunk_batch_size(model, len(prompt.head) + longest + len(prompt.question), len(indices))
    kept, done = [], 0
    while done < len(indices):
        try:  # no name holds the batch's caches: the evicted ones are freed before the next batch
            kept = chunk_eviction(kept + encode_chunks(model, prompt, spans, indices[done:done + batch],
                                                       config.kv_budget), config.top_k_chunks)
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
            batch //= 2
            continue
        done = min(done + batch, len(indices))
        if on_progress:
            on_progress(done, len(indices))
    return sorted(kept, key=lambda c: c.index)
