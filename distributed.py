"""ParallelComp over several processes: chunk-parallel prefill, after Star Attention (Acharya et
al., arXiv 2411.17116; NVIDIA/Star-Attention).

    python engine.py --processes 2 --prompt long.txt --question "Who wrote the letter?"  (or under torchrun)

ParallelComp's chunks are independent until the question attends to the kept ones. Rank r of W
encodes and scores the chunks j with j % W == r, in batches as one process does, keeping its own
top-k; the (chunk, NLL) pairs are gathered and every rank keeps the same top-k by chunk_eviction's
rule (lowest NLL, ties keep the later chunk): one process's choice. kv_placement then says where
the kept K/V go:
- gather: to rank 0, which runs the query pass and decodes (CUDA graph) exactly as one process
  does; the other ranks wait for its answer.
- sharded: nowhere; a kept cache larger than one GPU can be served. Every rank runs the whole
  model on the same tokens; in each layer it attends to its own share (rank 0 also holds the
  question and the generated tokens) and the partial outputs are merged by their log-sum-exp,
  one all_gather per layer (Star Attention's phase 2). Calibration gathers the last question
  token's scores over the whole cache (an all_gather of H x n floats per calibrated layer), so
  every rank evicts what one process would; methods.md §6.2's exchange of log-sum-exps and
  counts would still need a distributed choice of the least-attended tokens. Decoding
  runs eagerly: collectives are not captured in CUDA graphs. Every rank samples the same token
  (the same logits, the same seed).

Every rank returns rank 0's answer. After each phase the ranks exchange a status (ranks.py), so
that an exception on one rank is raised on all. In the sharded query pass and decode, where the
ranks compute in lockstep, a failure of the local attention contributes an empty share and is
raised at the next exchange; any other exception there ends its process, and the launcher
(--processes, or torchrun) then stops the others, as it does when a process dies.

Deviations from Star Attention, all deliberate:
- no anchor blocks and no global positions: ParallelComp's chunks restart their positions and
  repeat the head;
- chunks are dealt round-robin (balanced batches), not in contiguous blocks;
- rank 0, not the last rank, holds the question and the generated tokens, and every rank
  attends to the kept cache exactly: ranks without question keys use no mask (Star's other
  hosts mask bottom-right causally when the query has several tokens, which hides their last
  keys from the early question rows: methods.md §6.1).
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F

import parallelcomp
from attention import matmul_f32, merge_lse, scores_f32
from model import CACHE_ALIGN
from parallelcomp import ChunkCache, has_bos_head, stored_tokens
from prefill import OptionError, Prefilled
from ranks import agree, checked, rank, world

LSE_BLOCK = 2 ** 28  # attention_lse: attention scores computed at once (1 GiB in float32)


# ---------------------------------------------------------------------------- the prefill

def prefill(model, prompt, config, answer_budget, on_progress=None):
    """parallelcomp.prefill spread over the ranks of torch.distributed's process group (itself
    with one process). on_progress follows this rank's chunks. With kv_placement gather, ranks
    other than 0 return a Prefilled without cache or logits: rank 0 decodes. stats:
    parallelcomp's, and processes."""
    if world() == 1:
        return parallelcomp.prefill(model, prompt, config, answer_budget, on_progress)
    spans = parallelcomp.context_spans(model, prompt, config, answer_budget)
    if len(spans) < world():
        raise OptionError("chunk_tokens", f"the context makes {len(spans)} chunk{'s'[:len(spans) > 1]} for {world()} "
                                          f"processes: lower {{}} or start at most {len(spans)}")
    mine = range(rank(), len(spans), world())  # round-robin: balanced batches
    local = checked(parallelcomp.select_chunks, model, prompt, spans, mine, config, on_progress)
    kept = agree_on_chunks(local, prompt, spans, config.top_k_chunks)
    finish = gather if config.kv_placement == "gather" else shard
    prefilled = finish(model, prompt, spans, kept, config, answer_budget)
    prefilled.stats.update(processes=world())
    return prefilled


def agree_on_chunks(local, prompt, spans, k):
    """The kept chunks in document order, the same on every rank: the top-k of the ranks' own
    top-k `local`. This rank's ChunkCaches carry their K/V; the others only their place."""
    scores = [None] * world()
    dist.all_gather_object(scores, [(c.index, c.nll) for c in local])
    own, has_bos = {c.index: c for c in local}, has_bos_head(prompt)
    chunks = [own.get(j) or ChunkCache(j, spans[j], len(prompt.head) + len(spans[j]), has_bos, None, None, nll)
              for pairs in scores for j, nll in pairs]
    return sorted(parallelcomp.chunk_eviction(chunks, k), key=lambda c: c.index)


def gather(model, prompt, spans, kept, config, answer_budget):
    """kv_placement gather: the kept K/V sent to rank 0, which runs the query pass."""
    c, me = model.config, rank()

    def receive_buffers():
        for chunk in kept:
            if chunk.k is None:
                n = stored_tokens(chunk.context_len, chunk.has_bos, config.kv_budget)
                chunk.k, chunk.v = (torch.empty(c.n_layers, c.n_kv_heads, n, c.head_dim, device=model.device,
                                                dtype=model.dtype) for _ in range(2))
    checked(receive_buffers if me == 0 else lambda: None)
    ops = []
    for chunk in kept:
        owner = chunk.index % world()
        if owner != 0 and me in (0, owner):
            op, peer = (dist.irecv, owner) if me == 0 else (dist.isend, 0)
            ops += [dist.P2POp(op, chunk.k, peer), dist.P2POp(op, chunk.v, peer)]
    for work in dist.batch_isend_irecv(ops) if ops else []:
        work.wait()
    if me != 0:
        checked(lambda: None)  # while rank 0 runs the query pass
        return Prefilled(None, None, 0, {})
    return checked(parallelcomp.encode_question, model, prompt, spans, kept, config, answer_budget)


def shard(model, prompt, spans, kept, config, answer_budget):
    """kv_placement sharded: the query pass over every rank's share of the kept K/V."""
    Lq = len(prompt.question)
    cache = checked(ShardedCache, model, kept, config.kv_budget, Lq, answer_budget)
    M = max(c.context_len for c in kept)
    query = ShardedQueryPass(cache, config.calibration)
    positions = torch.arange(M, M + Lq, device=model.device)[None]
    hidden = model(torch.tensor([prompt.question], device=model.device), positions, query)
    agree(cache.failure)
    stats = parallelcomp.prefill_stats(prompt, spans, kept, config.kv_budget, cache.S, query.evicted)
    return Prefilled(cache, model.logits(hidden[0, -1]), M + Lq, stats)


# ---------------------------------------------------------------------------- the sharded cache

def attention_lse(q, k, v, visible=None):
    """Softmax attention with GQA by the plain matmul form, in float32, with the log-sum-exp of
    each row's scores: attention over disjoint sets of keys merges exactly from (out, lse).

    q (B, H, Tq, D); k, v (B, H_kv, Tk, D); visible: bool (B|1, H_kv|1, Tq|1, Tk), True = may
    attend (per KV head, as caches hold keys), None = every key. Returns out (B, H, Tq, D) and
    lse (B, H, Tq) in float32; a row that sees no key has out 0 and lse -inf. Query rows go in
    blocks of at most LSE_BLOCK scores.
    """
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    if Tk == 0:
        return q.new_zeros(q.shape, dtype=torch.float32), q.new_full(q.shape[:3], float("-inf"), dtype=torch.float32)
    G = H // Hkv
    rows = max(1, LSE_BLOCK // (H * Tk))
    outs, lses = [], []
    for a in range(0, Tq, rows):
        T = min(rows, Tq - a)
        s = scores_f32(q[:, :, a:a + T].reshape(B, Hkv, G * T, D), k).view(B, Hkv, G, T, Tk)
        if visible is not None:
            rows_visible = visible if visible.shape[2] == 1 else visible[:, :, a:a + T]
            s = s.masked_fill(~rows_visible[:, :, None], float("-inf"))
        lse = s.logsumexp(-1)  # (B, H_kv, G, T)
        p = (s - lse.masked_fill(lse == float("-inf"), 0)[..., None]).exp()  # rows seeing nothing: 0, not NaN
        o = matmul_f32(p.view(B * Hkv, G * T, Tk).to(v.dtype), v.reshape(B * Hkv, Tk, D))
        outs.append(o.view(B, H, T, D))
        lses.append(lse.view(B, H, T))
    return torch.cat(outs, 2), torch.cat(lses, 2)


class ShardedCache:
    """This rank's share of the cache one process would assemble (parallelcomp.assemble_cache),
    and the decode step's attention over every share.

    Rank r holds the kept chunks it encoded, in document order, BOS dropped but in the first kept
    chunk; rank 0 also the question and the generated tokens. k, v (L, H_kv, capacity, D); lens
    (L, H_kv) live entries (calibration keeps a different number per KV head on each rank); n the
    chunk entries here; S the whole cache's length before the question; places[r] (n_r,) where
    rank r's entries before decoding stand in the whole cache (rank 0's question last).
    """
    graph_safe = False  # decode_attend communicates
    lockstep = True  # every rank decodes, in lockstep (ranks.decoded)

    def __init__(self, model, kept, kv_budget, question_len, room):
        c, device, self.rank = model.config, model.device, rank()
        lengths = [stored_tokens(ch.context_len, ch.has_bos, kv_budget) - (i > 0 and ch.has_bos)
                   for i, ch in enumerate(kept)]
        starts = [sum(lengths[:i]) for i in range(len(kept))]
        self.S = sum(lengths)
        places = [[] for _ in range(world())]
        for ch, start, n in zip(kept, starts, lengths):
            places[ch.index % world()].append(torch.arange(start, start + n))
        places[0].append(torch.arange(self.S, self.S + question_len))
        self.places = [torch.cat(p).to(device) if p else torch.zeros(0, dtype=torch.long, device=device)
                       for p in places]
        after = question_len + room if self.rank == 0 else 0  # the question and the answer go on rank 0
        self.n = len(self.places[self.rank]) - (question_len if self.rank == 0 else 0)
        capacity = -(-(self.n + after) // CACHE_ALIGN) * CACHE_ALIGN
        shape = (c.n_layers, c.n_kv_heads, capacity, c.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=model.dtype)
        self.v = torch.zeros(shape, device=device, dtype=model.dtype)
        offset = 0
        for ch, n in zip(kept, lengths):
            if ch.k is not None:
                drop = ch.k.shape[2] - n  # the BOS of a chunk after the first
                self.k[:, :, offset:offset + n], self.v[:, :, offset:offset + n] = ch.k[:, :, drop:], ch.v[:, :, drop:]
                ch.k = ch.v = None
                offset += n
        self.lens = torch.full((c.n_layers, c.n_kv_heads), self.n, device=device)
        self.failure = None  # an exception of this rank's attention, raised at the next exchange

    def merged(self, q, local):
        """Attention of q (1, H, T, D) over every rank's share: local() computes this rank's
        (out, lse); the parts go to every rank in one all_gather and merge by log-sum-exp. A rank
        whose local() fails contributes nothing and keeps the failure."""
        if self.failure is None:
            try:
                out, lse = local()
            except Exception as e:
                self.failure = e
        if self.failure is not None:
            out = q.new_zeros(q.shape, dtype=torch.float32)
            lse = q.new_full(q.shape[:3], float("-inf"), dtype=torch.float32)
        part = torch.cat([out, lse[..., None]], -1)  # (1, H, T, D + 1)
        parts = part.new_empty(world(), *part.shape)
        dist.all_gather(list(parts.unbind(0)), part)
        return merge_lse(parts[..., :-1], parts[..., -1]).to(q.dtype)

    def decode_attend(self, layer, q, k, v):
        """An `attend` for one token, stored on rank 0 after each KV head's live entries."""
        if self.rank == 0:
            at = self.lens[layer][:, None, None].expand(-1, 1, k.shape[-1])  # (H_kv, 1, D)
            self.k[layer].scatter_(1, at, k[0])
            self.v[layer].scatter_(1, at, v[0])
            self.lens[layer] += 1
        visible = (torch.arange(self.k.shape[2], device=q.device) < self.lens[layer][:, None])[None, :, None]
        return self.merged(q, lambda: attention_lse(q, self.k[layer][None], self.v[layer][None], visible))


class ShardedQueryPass:
    """The `attend` of the question over every rank's share (rank 0 stores its K/V): one softmax
    over all kept chunks and the question so far, as parallelcomp.QueryPass computes it. In the
    calibrated layers each share is thinned by the choice made on the gathered scores."""

    def __init__(self, cache, calibration):
        self.cache, self.calibration = cache, calibration
        self.evicted = 0

    def __call__(self, layer, q, k, v):
        cache, cal, T = self.cache, self.calibration, k.shape[2]
        n = cache.n + (T if cache.rank == 0 else 0)
        if cache.rank == 0:
            cache.k[layer, :, cache.n:n], cache.v[layer, :, cache.n:n] = k[0], v[0]
        keys, values, places = cache.k[layer, :, :n], cache.v[layer, :, :n], cache.places[cache.rank][None]
        if cal is not None and cal.first_layer <= layer <= cal.last_layer:
            keys, values, places = self.calibrate(q[0, :, -1], keys, values)
            cache.k[layer, :, :keys.shape[1]], cache.v[layer, :, :keys.shape[1]] = keys, values
        cache.lens[layer] = (places < cache.S + T).sum(-1)
        rows = cache.S + torch.arange(T, device=q.device)
        visible = places[:, None, :] <= rows[:, None]  # (H_kv|1, T, n): causal; every chunk key is visible
        return cache.merged(q, lambda: attention_lse(q, keys[None], values[None], visible[None]))

    def calibrate(self, q_last, keys, values):
        """parallelcomp.calibrate over the whole cache: the last question token's scores gathered
        from every rank (one all_gather), the same choice made on every rank, each rank keeping
        its share. Returns this rank's kept (keys, values, places) (H_kv, n', ·); a KV head that
        keeps fewer than n' is padded with places past the cache."""
        cache = self.cache
        H, D = q_last.shape
        Hkv, n = keys.shape[:2]
        s = scores_f32(q_last.reshape(1, Hkv, H // Hkv, D), keys[None])[0]  # (H_kv, G, n)
        width = max(len(p) for p in cache.places)
        parts = s.new_empty(world(), *s.shape[:2], width)
        dist.all_gather(list(parts.unbind(0)), F.pad(s, (0, width - n)))
        N = sum(len(p) for p in cache.places)
        scores = s.new_empty(*s.shape[:2], N)
        for part, place in zip(parts, cache.places):
            scores[..., place] = part[..., :len(place)]
        keep, m = parallelcomp.calibration_keep(scores.softmax(-1), self.calibration)  # (H_kv, N - m) places
        self.evicted += m
        slot = torch.full((N,), N, device=keys.device)  # where a place is here; N: on another rank
        slot[cache.places[cache.rank]] = torch.arange(n, device=keys.device)
        slot = slot[keep].sort(-1).values
        slot = slot[:, :int((slot < N).sum(-1).max())]  # (H_kv, n'): this rank's kept slots first, in order
        here = slot < N
        slot = slot.clamp(max=max(n - 1, 0))
        index = slot[..., None].expand(-1, -1, D)
        places = cache.places[cache.rank][slot].masked_fill(~here, torch.iinfo(torch.long).max)
        return keys.gather(1, index), values.gather(1, index), places
