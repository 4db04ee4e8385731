"""ParallelComp over one document and many questions (Engine.open): the chunks encoded once, each
question scored through their kept K/V.

parallelcomp.prefill runs every chunk with the question appended, [head + chunk + question] at
positions 0..L-1. Attention is causal, so a chunk's K/V do not depend on the question after it:
`encode_store` runs [head + chunk] once and keeps every chunk's K/V (the ChunkStore), with the
hidden state of its last token, which predicts the question's first token, and, for KV eviction,
the queries of its last OBSERVATION_WINDOW tokens. A question then runs only its own tokens, at
positions ctx.. of every chunk, attending to the chunk's kept K/V and causally to itself, several
chunks per forward (`score_chunks`). That is the fresh prefill's computation restricted to the
question's rows: the same self-information (query_nll), the same KV eviction (the last question
tokens' attention; where the question is shorter than the observation window, the chunk's last
queries complete it) and so the same chunk eviction. The query pass, calibration and decoding are
parallelcomp's own.

The store holds about the document's K/V (the head once per chunk): on the model's device when it
fits the session's limit, else in pinned CPU memory, from where each question copies one batch
of chunks at a time to the device. Where chunk_tokens is not given, the split into chunks depends
on the question's length (default_chunk_tokens): the store is encoded for an empty question and
encoded again for a question whose split differs, which takes a question long enough to need one
more chunk.
"""

from dataclasses import dataclass

import torch

from attention import attention
from parallelcomp import (OBSERVATION_WINDOW, ChunkCache, chunk_batch_size, chunk_eviction, context_spans,
                          encode_question, has_bos_head, keep_chunk_kv, padded, query_nll, split_context,
                          stored_tokens)
from prefill import MemoryShortage, activation_bytes_per_token, encoding_home, free_memory, kv_bytes_per_token


@dataclass
class ChunkStore:
    """Every chunk of a context encoded as [head + chunk] at positions 0..ctx-1."""
    spans: list  # the chunks' token ranges in the context
    context_lens: list  # head + chunk tokens of each
    k: torch.Tensor  # (n, L, H_kv, T, D), T the longest context_len: chunk j's keys in its first context_lens[j] slots
    v: torch.Tensor
    last_hidden: torch.Tensor  # (n, dim) each chunk's final-norm hidden state at its last token, on the model's device
    queries: torch.Tensor | None  # (n, L, H, W, D) each chunk's last W queries, right-aligned; None without KV eviction

    @property
    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.last_hidden, self.queries)
                   if t is not None)


class StoreWriter:
    """The `attend` of a batch of [head + chunk] inputs: causal attention; each chunk's K/V, and
    its last queries, go to the store."""

    def __init__(self, store, indices):
        self.store, self.indices = store, indices

    def __call__(self, layer, q, k, v):
        s, T = self.store, k.shape[2]
        for b, j in enumerate(self.indices):
            n = s.context_lens[j]
            # the whole padded row, a contiguous block of the store (pinned memory: copied in stream order);
            # the padding's keys are finite, and masked where the chunk is read
            s.k[j, layer, :, :T].copy_(k[b], non_blocking=True)
            s.v[j, layer, :, :T].copy_(v[b], non_blocking=True)
            if s.queries is not None:
                w = min(n, OBSERVATION_WINDOW)
                s.queries[j, layer, :, OBSERVATION_WINDOW - w:] = q[b, :, n - w:n]
        return attention(q, k, v)


def store_bytes(model, context_lens):
    """What a ChunkStore of chunks of context_lens tokens takes: their K/V padded to the longest."""
    return kv_bytes_per_token(model) * len(context_lens) * max(context_lens)


def encode_store(model, prompt, spans, home, kv_eviction, on_progress=None):
    """The ChunkStore of prompt's context cut into `spans`, its K/V at `home` (pinned when that is
    the CPU and the model is on a GPU), chunks encoded in batches as parallelcomp.select_chunks
    encodes them. kv_eviction: keep each chunk's last queries."""
    c, device = model.config, model.device
    lens = [len(prompt.head) + len(s) for s in spans]
    n, T = len(spans), max(lens)
    pin = home.type == "cpu" and device.type == "cuda"
    shape = (n, c.n_layers, c.n_kv_heads, T, c.head_dim)
    try:  # zeros: a padding slot no batch writes is masked, and a masked NaN would still poison the attention
        k, v = (torch.zeros(shape, device=home, dtype=model.dtype, pin_memory=pin) for _ in range(2))
    except RuntimeError as e:  # the driver's refusal to pin, which is no OutOfMemoryError
        if not pin:
            raise
        reason = str(e).strip().splitlines()[0]
        raise MemoryShortage(f"the session's cache ({store_bytes(model, lens) / 2**30:.1f} GiB) cannot be pinned in "
                             f"host memory ({reason}): shorten the document")
    queries = None
    if kv_eviction:
        queries = torch.zeros(n, c.n_layers, c.n_heads, OBSERVATION_WINDOW, c.head_dim, device=device, dtype=model.dtype)
    store = ChunkStore(spans, lens, k, v, torch.zeros(n, c.dim, device=device, dtype=model.dtype), queries)
    batch, done = chunk_batch_size(model, max(T, 1), n), 0
    while done < n and T:  # T = 0: an empty context and head, nothing to encode
        indices = range(done, min(done + batch, n))
        inputs = [prompt.head + prompt.context[spans[j].start:spans[j].stop] for j in indices]
        try:
            tokens, positions = padded(inputs, device)
            hidden = model(tokens, positions, StoreWriter(store, indices))
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
            batch //= 2
            continue
        for b, j in enumerate(indices):
            store.last_hidden[j] = hidden[b, lens[j] - 1]
        done = indices.stop
        if on_progress:
            on_progress(done, n)
    return store


# ---------------------------------------------------------------------------- a question

class QuestionScorer:
    """The `attend` of the question over a batch of chunks, k, v (B, L, H_kv, T, D): chunk b's row
    i, at position ctx_b + i, sees the chunk's ctx_b kept keys and the question's first i + 1
    tokens. With KV eviction each chunk's K/V are thinned as the fresh prefill thins them.

    Each chunk attends on its own, causal after its keys, as a fresh prefill's chunk does: one
    masked call over the padded batch takes SDPA's math kernel on a GPU (its fused kernels take no
    mask with GQA): on an H100 a later question at 128K of the 8B shape took 0.51 s, now 0.24 s."""

    def __init__(self, chunks, k, v, queries, kv_budget):
        self.chunks, self.k, self.v, self.queries, self.kv_budget = chunks, k, v, queries, kv_budget

    def __call__(self, layer, q, k, v):
        out = torch.empty_like(q)
        for b, chunk in enumerate(self.chunks):
            n = chunk.context_len
            keys = torch.cat([self.k[b, layer, :, :n], k[b]], dim=1)  # (H_kv, n + Lq, D): the question after the chunk
            values = torch.cat([self.v[b, layer, :, :n], v[b]], dim=1)
            if self.kv_budget is not None:
                q_obs = torch.cat([self.queries[b, layer], q[b]], dim=1)[:, -OBSERVATION_WINDOW:]
                keep_chunk_kv(chunk, layer, q_obs, keys, values, self.kv_budget)
            out[b] = attention(q[b:b + 1], keys[None], values[None])[0]
        return out


def score_chunks(model, store, prompt, indices, kv_budget, k, v):
    """The ChunkCaches of chunks `indices` for prompt's question, their NLL filled in: k, v (B, L,
    H_kv, T, D) their store on the model's device. With kv_budget their K/V are what KV eviction
    keeps; without, views of k, v."""
    c, device, question = model.config, model.device, prompt.question
    has_bos, Lq = has_bos_head(prompt), len(question)
    chunks = []
    for b, j in enumerate(indices):
        n = store.context_lens[j]
        if kv_budget is None:
            ck, cv = k[b, :, :, :n], v[b, :, :, :n]
        else:
            shape = (c.n_layers, c.n_kv_heads, stored_tokens(n, has_bos, kv_budget), c.head_dim)
            ck, cv = (torch.empty(shape, device=device, dtype=model.dtype) for _ in range(2))
        chunks.append(ChunkCache(j, store.spans[j], n, has_bos, ck, cv))
    queries = None if store.queries is None else store.queries[indices.start:indices.stop]
    tokens = torch.tensor([question] * len(indices), device=device)
    positions = torch.tensor([ch.context_len for ch in chunks], device=device)[:, None] + torch.arange(Lq, device=device)
    hidden = model(tokens, positions, QuestionScorer(chunks, k, v, queries, kv_budget))
    targets = torch.tensor(question, device=device)
    for b, chunk in enumerate(chunks):
        rows = hidden[b, :Lq - 1]  # (Lq, dim) with the chunk's last token: the rows that predict the question
        if chunk.context_len:
            rows = torch.cat([store.last_hidden[chunk.index][None], rows])
        chunk.nll = query_nll(model.logits(rows), targets[Lq - len(rows):], prompt.eos_ids)
    return chunks


def score_batch_size(model, store, question_len):
    """Chunks per scoring forward: what half the free memory holds of a chunk's share, one
    layer's keys and values with the question's (and a copy per query head, where the CPU's
    attention repeats them), the attention scores and the logits of its rows, and its whole K/V
    where the store is elsewhere."""
    c = model.config
    n, T = store.k.shape[0], store.k.shape[3]
    layer_kv = kv_bytes_per_token(model) // c.n_layers
    per_chunk = (T + question_len) * (layer_kv * (1 + c.n_heads // c.n_kv_heads) + 4 * c.n_heads * question_len) \
        + question_len * (activation_bytes_per_token(model) + 4 * c.vocab_size)
    if store.k.device != model.device:
        per_chunk += kv_bytes_per_token(model) * T
    return max(1, min(n, int(0.5 * free_memory(model.device) // per_chunk)))


def select_stored_chunks(model, store, prompt, config, on_progress=None):
    """Score every stored chunk by prompt's question in batches, keeping the top-k after each (as
    select_chunks does): the kept ChunkCaches in document order."""
    n = len(store.spans)
    batch, kept, done = score_batch_size(model, store, len(prompt.question)), [], 0
    while done < n:
        indices = range(done, min(done + batch, n))
        try:
            kept = keep_best(model, store, prompt, indices, config, kept)
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
            batch //= 2
            continue
        done = indices.stop
        if on_progress:
            on_progress(done, n)
    return sorted(kept, key=lambda c: c.index)


def keep_best(model, store, prompt, indices, config, kept):
    """The top-k (chunk_eviction) of `kept` and the chunks `indices` scored. Where the store is
    elsewhere the batch's K/V are copied to the model's device, and the kept chunks of the batch
    own theirs: the copy is freed on return."""
    k, v = (t[indices.start:indices.stop].to(model.device, non_blocking=True) for t in (store.k, store.v))
    best = chunk_eviction(kept + score_chunks(model, store, prompt, indices, config.kv_budget, k, v),
                          config.top_k_chunks)
    if store.k.device != model.device and config.kv_budget is None:  # views of the copy
        for chunk in best:
            if chunk.index in indices:
                chunk.k, chunk.v = chunk.k.clone(), chunk.v.clone()
    return best


# ---------------------------------------------------------------------------- the session's encoding

class ParallelCompEncoding:
    """ParallelComp's encoding of a document for a session (prefill.py: open and ask)."""

    def __init__(self, model, prompt, config, answer_budget, limit, on_progress=None):
        self.model, self.config, self.limit = model, config, limit
        self.store = None
        self.encode(prompt, split_context(model, prompt, config, answer_budget), on_progress)

    @property
    def nbytes(self):
        return self.store.nbytes

    @property
    def home(self):
        return self.store.k.device

    def encode(self, prompt, spans, on_progress):
        """Encode the chunks `spans` of prompt's context into the store: the tokens encoded."""
        self.store = None  # the old store's memory goes first
        lens = [len(prompt.head) + len(s) for s in spans]
        home = encoding_home(self.model, store_bytes(self.model, lens), self.limit, offload=True)
        self.store = encode_store(self.model, prompt, spans, home, self.config.kv_budget is not None, on_progress)
        return sum(lens)

    def ask(self, prompt, answer_budget, on_progress=None):
        spans = context_spans(self.model, prompt, self.config, answer_budget)
        encoded = 0
        if self.store is None or spans != self.store.spans:
            encoded = self.encode(prompt, spans, on_progress)
        kept = select_stored_chunks(self.model, self.store, prompt, self.config, on_progress)
        prefilled = encode_question(self.model, prompt, spans, kept, self.config, answer_budget)
        Lq = len(prompt.question)
        query_pass = prefilled.stats["forwards"][-1]
        prefilled.stats.update(forwards=[[Lq, n + Lq] for n in self.store.context_lens] + [query_pass],
                               encoded_tokens=encoded + (len(spans) + 1) * Lq)
        return prefilled
