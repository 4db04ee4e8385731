"""LongGen's hybrid attention pattern (Ge et al., ICLR 2025, arXiv 2410.01485).

A third of the layers, stacked in the middle, keep full attention; the others attend to a
bounded set of keys, so their KV cache stops growing with the length. Key k is visible from
query p (both ordinary positions 0..T-1, RoPE applied before caching) in a sparse layer iff
k <= p and
    window: k < sink or p - k < window  (AttnSink; the window includes the query)
    block:  p//b - k//b < local_blocks or (k//b) % vert_stride == 0
            (BlockSparse: dkernel's local-stride rule with homogeneous heads, blocks of b tokens)
Full layers use a plain KVCache. A sparse layer's cache is [fixed | ring]: tokens that stay
visible forever (the sinks; the strided blocks) sit at fixed slots, every token is also written
to ring slot n % R (R = window, or local_blocks * b), and a copy in the ring of a fixed token is
masked out. What each slot holds is a function of the tokens seen so far (`lens`), so the masks
and write slots are computed on the device and one captured decode graph serves every length.
Stats: kv_bytes, the K/V bytes the cache holds after the prompt; full_kv_bytes, what full
attention would hold for it. In a session (prefill.py) the cache after the head and the context
is kept: a question's prefill and its decoding change, of what is live there, only what
decode_state() names (the lengths, the rings), which is saved and put back before each question.

Deviations and choices where the paper is silent (it published no code):
- full layers default to [L//3, 2L//3) (one contiguous band); sink 64 + window 1984 (the ~2K
  tokens the reviews report), block 64 / local 16 / stride 8 (Phi-3-small's blocksparse layout);
- the strided blocks of the block pattern grow with the length (1/vert_stride of the tokens):
  only the window pattern keeps a fixed-size cache;
- no training: on a checkpoint not fine-tuned to the pattern this is LongGen's inference pattern
  only (the paper's Table 1: such inference-time sparsity loses most of the retrieval).
"""

import re
from dataclasses import dataclass, fields, replace

import torch

from attention import attention, decode_attention
from model import CACHE_ALIGN, KVCache
from prefill import QUESTION_ROOM, OptionError, Prefilled, encoding_home, extend, option

PATTERNS = ("window", "block")
QUERY_BLOCK = 1024  # sparse layers' prefill: queries per attention call
CONFIG_KEY = "hybrid_attention"  # config.json: {"full_layers": [first, last], "pattern": ..., any HybridConfig field}


def parse_layers(text):
    """'10-19' -> (10, 19); '12' -> (12, 12)."""
    m = re.fullmatch(r"(\d+)(?:-(\d+))?", text)
    if not m:
        raise ValueError(f"{text!r}: expected FIRST-LAST, e.g. 10-19")
    return int(m[1]), int(m[2] or m[1])


@dataclass(frozen=True)
class HybridConfig:
    pattern: str = option("window", "sparse layers' attention: window (sink + recent tokens) or block "
                          "(local + strided blocks)", flag="--hybrid-pattern", choices=PATTERNS)
    sink_tokens: int = option(64, "window pattern: first tokens every sparse layer keeps")
    window_tokens: int = option(1984, "window pattern: most recent tokens (the query included) a sparse layer keeps")
    block_tokens: int = option(64, "block pattern: tokens per block")
    local_blocks: int = option(16, "block pattern: most recent blocks (the query's included) a sparse layer keeps")
    vert_stride: int = option(8, "block pattern: every vert_stride-th block (0, s, 2s, ...) stays visible")
    full_layers: tuple | None = option(None, "layers FIRST-LAST with full attention (default: the middle third)",
                                       parse=parse_layers, metavar="FIRST-LAST")

    def validate(self, model_config):
        n = model_config.n_layers
        first, last = self.full_layers or (0, 0)
        for bad, param, message in (
                (self.pattern not in PATTERNS, "pattern", f"{{}} must be one of {', '.join(PATTERNS)}"),
                (self.sink_tokens < 0, "sink_tokens", "{} must be 0 or more"),
                (self.window_tokens < 1, "window_tokens", "{} must be at least 1"),
                (self.block_tokens < 1, "block_tokens", "{} must be at least 1"),
                (self.local_blocks < 1, "local_blocks", "{} must be at least 1"),
                (self.vert_stride < 1, "vert_stride", "{} must be at least 1"),
                (not 0 <= first <= last < n, "full_layers", f"{{}} must have 0 <= first <= last < {n}")):
            if bad:
                raise OptionError(param, message)

    def full_range(self, n_layers):
        if self.full_layers is None:
            return range(n_layers // 3, 2 * n_layers // 3)
        return range(self.full_layers[0], self.full_layers[1] + 1)


def layout_from_config(hf, model_config):
    """config.json (a dict) -> the HybridConfig its CONFIG_KEY describes, None without one; a
    malformed entry, or one that does not fit the model, raises ValueError naming the key. Keys
    are HybridConfig's fields, full_layers a [first, last] list."""
    spec = hf.get(CONFIG_KEY)
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise ValueError(f"{CONFIG_KEY} must be an object")
    defaults = {f.name: f.default for f in fields(HybridConfig)}
    for name, value in spec.items():
        if name not in defaults:
            raise ValueError(f"{CONFIG_KEY}: unknown key {name!r}")
        if name == "full_layers":
            ok = isinstance(value, list) and len(value) == 2 and all(type(x) is int for x in value)
        else:
            ok = type(value) is type(defaults[name])
        if not ok:
            raise ValueError(f"{CONFIG_KEY}.{name}: bad value {value!r}")
    config = HybridConfig(**{k: tuple(v) if k == "full_layers" else v for k, v in spec.items()})
    try:
        config.validate(model_config)
    except OptionError as e:
        raise ValueError(e.named(lambda name: f"{CONFIG_KEY}.{name}"))
    return config


class SparseSlots:
    """Where a sparse layer keeps token n, and which position each slot holds after `seen` tokens."""

    def __init__(self, config, capacity):
        self.config = config
        if config.pattern == "window":
            self.fixed, self.ring = config.sink_tokens, config.window_tokens
        else:
            b = config.block_tokens
            self.fixed = -(-capacity // (b * config.vert_stride)) * b  # the strided blocks of `capacity` tokens
            self.ring = config.local_blocks * b
        self.size = self.fixed + self.ring

    def is_fixed(self, n):
        c = self.config
        return n < c.sink_tokens if c.pattern == "window" else (n // c.block_tokens) % c.vert_stride == 0

    def fixed_slot(self, n):
        c = self.config
        if c.pattern == "window":
            return n
        return n // (c.block_tokens * c.vert_stride) * c.block_tokens + n % c.block_tokens

    def positions(self, seen, device):
        """(size,) position held by each slot after `seen` tokens (int or 0-dim tensor); -1: empty or a copy."""
        c, j = self.config, torch.arange(self.fixed, device=device)
        if c.pattern == "block":
            j = j // c.block_tokens * c.block_tokens * c.vert_stride + j % c.block_tokens
        fixed = torch.where(j < seen, j, -1)
        r = torch.arange(self.ring, device=device)
        ring = seen - 1 - (seen - 1 - r) % self.ring  # the last token n < seen with n % ring == r
        ring = torch.where((ring >= 0) & ~self.is_fixed(ring), ring, -1)
        return torch.cat([fixed, ring])

    def visible(self, p, k):
        """bool: key at position k visible from the query at p (broadcast); k = -1 never."""
        c = self.config
        causal = (k >= 0) & (k <= p)
        if c.pattern == "window":
            return causal & ((k < c.sink_tokens) | (p - k < c.window_tokens))
        qb, kb = p // c.block_tokens, k // c.block_tokens
        return causal & ((qb - kb < c.local_blocks) | (kb % c.vert_stride == 0))


class HybridCache:
    """Full layers in a KVCache; sparse layers in k_sparse, v_sparse (L_s, B, H_kv, slots, D).

    lens (L,): tokens seen by each layer (the next position), shared with the full layers'
    KVCache. A decode step changes lens and a ring slot, live when the ring is full: a CUDA-graph
    warm-up must save and restore decode_state(), not lens alone.
    """

    graph_safe = True  # decode_attend computes its write slot and masks on the device

    def __init__(self, model_config, config, batch, capacity, device, dtype):
        self.config, self.full_layers = config, config.full_range(model_config.n_layers)
        self.full = KVCache(replace(model_config, n_layers=len(self.full_layers)), batch, capacity, device, dtype)
        self.bytes_per_entry = 2 * batch * model_config.n_kv_heads * model_config.head_dim * self.full.k.element_size()
        self.lens = torch.zeros(model_config.n_layers, device=device, dtype=torch.long)
        self.full.lens = self.lens[self.full_layers.start:self.full_layers.stop]  # a view: one tensor of lengths
        self.sparse_layers = [i for i in range(model_config.n_layers) if i not in self.full_layers]
        self.slots = SparseSlots(config, self.full.capacity)
        shape = (len(self.sparse_layers), batch, model_config.n_kv_heads, self.slots.size, model_config.head_dim)
        self.k_sparse = torch.zeros(shape, device=device, dtype=dtype)
        self.v_sparse = torch.zeros(shape, device=device, dtype=dtype)

    @property
    def k(self):
        return self.k_sparse if self.sparse_layers else self.full.k

    def decode_state(self):
        """What a decode step changes that is live before it, so what a graph warm-up must save
        and restore: lens and the rings (a fixed slot is written only by its own token)."""
        ring = slice(self.slots.fixed, None)
        return self.lens, self.k_sparse[:, :, :, ring], self.v_sparse[:, :, :, ring]

    def write_piece(self, s, n, k, v):
        """Store the tokens at positions n (T,) with k, v (B, H_kv, T, D) in sparse layer s: the
        fixed ones at their slots, the last `ring` of them in the ring (earlier ones would be overwritten)."""
        fixed, last = self.slots.is_fixed(n), slice(max(0, len(n) - self.slots.ring), None)
        slot = torch.cat([self.slots.fixed_slot(n[fixed]), self.slots.fixed + n[last] % self.slots.ring])
        self.k_sparse[s].index_copy_(2, slot, torch.cat([k[:, :, fixed], k[:, :, last]], dim=2))
        self.v_sparse[s].index_copy_(2, slot, torch.cat([v[:, :, fixed], v[:, :, last]], dim=2))

    def prefill_attend(self, start):
        """An `attend` for tokens at positions start.. after `start` seen ones."""
        full = self.full.prefill_attend(start)

        def attend(layer, q, k, v):
            if layer in self.full_layers:
                return full(layer - self.full_layers.start, q, k, v)
            s, T = self.sparse_layers.index(layer), k.shape[2]
            new = torch.arange(start, start + T, device=q.device)
            keys = torch.cat([self.slots.positions(start, q.device), new])
            out = self.sparse_attention(q, torch.cat([self.k_sparse[s], k], dim=2),
                                        torch.cat([self.v_sparse[s], v], dim=2), new, keys)
            self.write_piece(s, new, k, v)
            self.lens[layer] = start + T
            return out
        return attend

    def sparse_attention(self, q, k, v, queries, keys):
        """A sparse layer's attention of the queries at positions `queries` (T,) over k, v
        (B, H_kv, S, D) at positions `keys` (S,), QUERY_BLOCK queries at a time, each block over
        the keys some query of it can see: the mask and the scores stay a block's, and the
        window pattern's cost grows with T, not T²."""
        out = []
        for a in range(0, len(queries), QUERY_BLOCK):
            visible = self.slots.visible(queries[a:a + QUERY_BLOCK, None], keys)  # (block, S)
            seen = visible.any(0).nonzero()[:, 0]
            out.append(attention(q[:, :, a:a + QUERY_BLOCK], k.index_select(2, seen), v.index_select(2, seen),
                                 visible[:, seen]))
        return torch.cat(out, dim=2)

    def append_attend(self, layer, q, k, v):
        """An `attend` for tokens after the lens[layer] this layer has seen."""
        return self.prefill_attend(int(self.lens[layer]))(layer, q, k, v)

    def decode_attend(self, layer, q, k, v):
        """An `attend` for one token per sequence at position lens[layer] (graph-safe)."""
        if layer in self.full_layers:
            return self.full.decode_attend(layer - self.full_layers.start, q, k, v)
        s, n = self.sparse_layers.index(layer), self.lens[layer]
        self.write_token(s, n, k, v)
        visible = self.slots.visible(n, self.slots.positions(n + 1, q.device))  # (slots,)
        self.lens[layer] += 1  # n is a view of it
        return decode_attention(q, self.k_sparse[s], self.v_sparse[s], visible)

    def write_token(self, s, n, k, v):
        """Token n (0-dim tensor) into sparse layer s, with no host sync: the fixed slot is
        rewritten with its own content unless n is a fixed token."""
        at = (self.slots.fixed + n % self.slots.ring)[None]
        self.k_sparse[s].index_copy_(2, at, k)
        self.v_sparse[s].index_copy_(2, at, v)
        if self.slots.fixed:
            at = self.slots.fixed_slot(n).clamp(max=self.slots.fixed - 1)[None]
            keep = self.slots.is_fixed(n)
            self.k_sparse[s].index_copy_(2, at, torch.where(keep, k, self.k_sparse[s].index_select(2, at)))
            self.v_sparse[s].index_copy_(2, at, torch.where(keep, v, self.v_sparse[s].index_select(2, at)))

    def live_tokens(self):
        """(L,) K/V entries each layer holds: every token seen in full layers, the filled slots in sparse ones."""
        live = self.lens.clone()
        for layer in self.sparse_layers:
            positions = self.slots.positions(self.lens[layer], self.lens.device)
            live[layer] = (positions >= 0).sum()
        return live

    def stats(self, n_tokens):
        """kv_bytes: live K/V of this cache; full_kv_bytes: what full attention keeps for n_tokens."""
        return dict(kv_bytes=int(self.live_tokens().sum()) * self.bytes_per_entry,
                    full_kv_bytes=n_tokens * len(self.lens) * self.bytes_per_entry)


def prefill(model, prompt, config, answer_budget, on_progress=None):
    """Causal prefill of the whole prompt at positions 0..T-1 under the hybrid pattern."""
    ids = prompt.ids()
    cache = HybridCache(model.config, config, 1, len(ids) + answer_budget, model.device, model.dtype)
    logits = extend(model, cache, ids, 0)
    # forwards as for full attention: the sparse layers' fewer keys are not counted
    stats = dict(cache.stats(len(ids)), forwards=[[len(ids), len(ids)]], scored_tokens=0)
    return Prefilled(cache, logits, len(ids), stats)


class HybridEncoding:
    """The hybrid pattern in a session (prefill.py: open and ask): the HybridCache after the head
    and the context, its decode_state() saved. A question that with its answer needs more room
    than the cache has prefills the context anew into a larger one."""

    def __init__(self, model, prompt, config, answer_budget, limit, on_progress=None):
        self.model, self.config, self.limit, self.context = model, config, limit, prompt.ids()
        self.cache = None
        self.encode(len(self.context) + answer_budget + QUESTION_ROOM)

    @property
    def nbytes(self):
        tensors = (self.cache.full.k, self.cache.full.v, self.cache.k_sparse, self.cache.v_sparse, *self.saved)
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def home(self):
        return self.cache.full.k.device

    def encode(self, capacity):
        """Prefill the context into a cache of `capacity` tokens: the tokens encoded."""
        model, c = self.model, self.model.config
        self.cache = None
        slots = SparseSlots(self.config, -(-capacity // CACHE_ALIGN) * CACHE_ALIGN).size
        full = len(self.config.full_range(c.n_layers))
        entries = full * capacity + (c.n_layers - full) * 2 * slots  # the rings' saved copy too
        encoding_home(model, entries * 2 * c.n_kv_heads * c.head_dim * model.dtype.itemsize, self.limit)
        cache = HybridCache(c, self.config, 1, capacity, model.device, model.dtype)
        if self.context:
            extend(model, cache, self.context, 0)
        self.saved = [t.clone() for t in cache.decode_state()]
        self.cache = cache
        return len(self.context)

    def ask(self, prompt, answer_budget, on_progress=None):
        ids, question = prompt.ids(), prompt.question
        grow = self.cache is None or len(ids) + answer_budget > self.cache.full.capacity
        encoded = self.encode(len(ids) + answer_budget + QUESTION_ROOM) if grow else 0
        for live, saved in zip(self.cache.decode_state(), self.saved):
            live.copy_(saved)
        logits = extend(self.model, self.cache, question, len(self.context))
        stats = dict(self.cache.stats(len(ids)), forwards=[[len(question), len(ids)]], scored_tokens=0,
                     encoded_tokens=encoded + len(question))
        return Prefilled(self.cache, logits, len(ids), stats)
