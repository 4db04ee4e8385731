"""InfiniPot: a context of any length read with a fixed-size KV cache (Kim et al., EMNLP 2024,
arXiv 2410.01518), training-free.

The KV cache is a pot of M tokens. The context streams into it; each time the pot is full and
more context follows (the first time after C + 1..M tokens: see below), it is distilled to C
tokens (Continual Context Distillation) and filling goes on. Two scores decide what stays, per layer and KV head:
- NuC, Novelty under Compression (past importance): each token's NLL given what preceded it in
  the pot, computed once when the token enters; one score per token, shared by all heads;
- CaP, the Catalyst Prompt (future importance): a short prompt run after the full pot; the
  attention its queries pay to each pot token, per head. Its own K/V are dropped after scoring.
The first T = round(α·C) slots go to the most novel tokens, the other C − T, per KV head, to the
tokens the catalyst attends to most among the rest. The kept entries move to slots 0..C−1 and
their keys are rotated anew from the stored pre-RoPE keys at positions 0..C−1 (Context-Reset
RoPE), so positions stay below M + catalyst while the context streams. The question is then prefilled after the pot
without eviction and decoding continues from there.

No official code exists; the algorithm follows a digest of the paper. Choices where it is silent,
and deviations:
- C defaults to M // 2 (the ratio is unrecovered); M to min(4096, what the window leaves).
- CaP sums the attention over the catalyst's rows (the paper's u_t is a sum; EpiCache's
  re-implementation takes the max, not offered) and over the query heads of a KV head's group (a
  group mean would rank the same). The softmax is the catalyst's real causal attention: over the
  pot and the catalyst's own earlier tokens, which are then left out of the score.
- The generic catalyst (CaP-G) wording is unrecovered; GENERIC_CATALYST stands in. "question"
  (CaP-Q) uses the prompt's question block without its leading BOS.
- The catalyst is run at positions M.., the question at n.. (n ≤ M, the final pot), so a prompt
  fits when M + max(catalyst, question + answer budget) ≤ window: the catalyst's K/V are gone
  before the question comes, and the cache's capacity is that sum, whatever the prompt's length.
- A token's NuC is computed when it enters and kept through later distillations (the paper's
  NLL over the compressed cache has no per-head forward); a fill's first token is scored by the
  previous fill's last logits, computed before that distillation.
- The stream's first token (BOS, or the attention sink of a model without one) has no NLL: it
  scores +inf in both NuC and CaP, so it is always kept, in slot 0, and counts in C.
- The fills are aligned to the stream's end: the first takes C + 1..M tokens, every later one
  M − C, so the last fill is whole and the final pot ends with the M − C most recent tokens (filling
  M first would leave as few as one recent token after the last distillation, when the stream is
  one token longer than a whole number of fills). A pot is distilled only when more context follows.

Tokenising the catalyst: prefill sees token ids only, so a text catalyst ("generic" or literal
text) must be replaced by its ids before prefill: `config.prepared(model, tokenizer.encode)`
returns the config with `catalyst` a tuple of ids; "question" needs no tokeniser.
"""

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from attention import scores_f32
from compaction import RawKeyCache
from prefill import OptionError, Prefilled, cache_bytes, carry_over, encoding_home, kv_bytes_per_token, option

GENERIC_CATALYST = "\n\nSummarize the critical points of the text above."
DEFAULT_POT = 4096  # the paper's headline budget (L3-InfiniPot-4K)
LOGIT_ROWS = 1024  # hidden rows per LM-head block when scoring NuC: memory stays bounded


@dataclass(frozen=True)
class InfiniPotConfig:
    pot_tokens: int | None = option(None, "M, the KV cache (pot) size in tokens (default: min(4096, what the "
                                    "window leaves after the catalyst, question and answer))", parse=int, metavar="M")
    pot_keep: int | None = option(None, "C, tokens kept per KV head when the pot is distilled (default: M // 2)",
                                  parse=int, metavar="C")
    nuc_ratio: float = option(0.5, "α, the share of the C kept tokens chosen by novelty (NuC), the rest by "
                                   "the catalyst's attention (CaP)", metavar="ALPHA")
    catalyst: str | tuple[int, ...] = option("generic", "the catalyst prompt: generic (a summarise-the-text prompt), "
                                              "question (the user's question) or literal TEXT",
                                   metavar="TEXT")

    def validate(self, model_config):
        window = model_config.max_position_embeddings
        if self.pot_tokens is not None and not 2 <= self.pot_tokens < window:
            raise OptionError("pot_tokens", f"{{}} must be at least 2 and below the {window}-token window")
        if self.pot_keep is not None and self.pot_keep < 1:
            raise OptionError("pot_keep", "{} must be at least 1")
        if None not in (self.pot_tokens, self.pot_keep) and self.pot_keep >= self.pot_tokens:
            raise OptionError("pot_keep", f"{{}} must be below {{}} ({self.pot_tokens})", "pot_tokens")
        if not 0 <= self.nuc_ratio <= 1:
            raise OptionError("nuc_ratio", "{} must be between 0 and 1")
        if not self.catalyst:
            raise OptionError("catalyst", "{} must not be empty")

    def prepared(self, model, encode):
        """This config with a text catalyst replaced by its ids; encode: str -> ids without BOS."""
        if not isinstance(self.catalyst, str) or self.catalyst == "question":
            return self
        return replace(self, catalyst=tuple(encode(GENERIC_CATALYST if self.catalyst == "generic" else self.catalyst)))


def catalyst_ids(config, prompt):
    """The catalyst's token ids: the question's (without BOS) or the tokenised text's."""
    if config.catalyst == "question":
        q = prompt.question
        ids = q[1:] if q[:1] == [prompt.bos_id] else q
        if not ids:
            raise OptionError("catalyst", "{} 'question' needs a question in the prompt")
        return list(ids)
    if isinstance(config.catalyst, str):
        raise TypeError("InfiniPot's catalyst text must be tokenised first: config.prepared(model, tokenizer.encode)")
    return list(config.catalyst)


def pot_sizes(config, window, catalyst_len, question_len, answer_budget):
    """(M, C, T, room): pot, kept and NuC-kept tokens, and the slots needed after a full pot."""
    room = max(catalyst_len, question_len + answer_budget)
    M = config.pot_tokens or min(DEFAULT_POT, window - room)
    need = f"max(catalyst {catalyst_len}, question {question_len} + {{}} {answer_budget}) tokens"
    if config.pot_tokens is None and M < 2:
        raise OptionError("max_new_tokens", f"{need} leave no room for the pot in the {window}-token window")
    if M + room > window:
        raise OptionError("pot_tokens", f"{{}} ({M}) + {need} must fit the {window}-token window", "max_new_tokens")
    C = config.pot_keep or M // 2
    if C >= M:
        raise OptionError("pot_keep", f"{{}} ({C}) must be below {{}} ({M})", "pot_tokens")
    return M, C, round(config.nuc_ratio * C), room


# ---------------------------------------------------------------------------- the steps

def novelty(model, hidden, tokens, last_logits):
    """NuC: the NLL of each of the T tokens given the stream before it, float32 (T,), from the row
    before it (the first from last_logits, the previous fill's; +inf at the stream's start).
    Returns it with the logits of the last row, which score the next fill's first token."""
    T = len(tokens)
    nll = torch.empty(T, device=tokens.device)
    nll[0] = float("inf") if last_logits is None else F.cross_entropy(last_logits, tokens[0])
    for a in range(0, T, LOGIT_ROWS):
        logits = model.logits(hidden[a:a + LOGIT_ROWS])  # (rows, vocab): rows a.. predict tokens a+1..
        targets = tokens[a + 1:a + 1 + LOGIT_ROWS]
        nll[a + 1:a + 1 + len(targets)] = F.cross_entropy(logits[:len(targets)], targets, reduction="none")
    return nll, logits[-1]


def fill(model, cache, tokens, n, last_logits):
    """Stream tokens (T,) into the pot after its n entries, at slots and positions n..n+T-1,
    keeping their raw keys for CR-RoPE. Returns their NuC (T,) and the last row's logits."""
    positions = torch.arange(n, n + len(tokens), device=tokens.device)
    hidden = model(tokens[None], positions[None], cache.prefill_attend(n), cache.store_raw_keys(n))
    return novelty(model, hidden[0], tokens, last_logits)


def catalyst_attention(q, keys, n):
    """q (H, P, D): the catalyst's queries; keys (H_kv, n + P, D): the pot, then the catalyst.
    The causal attention of the catalyst's rows to the n pot keys, summed over the rows and
    the KV head's query group: (H_kv, n) float32."""
    H, P, D = q.shape
    Hkv, S = keys.shape[0], keys.shape[1]
    s = scores_f32(q.reshape(1, Hkv, H // Hkv * P, D), keys[None])[0]  # (H_kv, G*P, S), group-major rows
    row = torch.arange(P, device=q.device).repeat(H // Hkv)  # each row's catalyst token
    visible = torch.arange(S, device=q.device) <= n + row[:, None]
    return s.masked_fill(~visible, float("-inf")).softmax(-1)[:, :, :n].sum(1)


def cap_scores(model, cache, catalyst, n):
    """CaP: run the catalyst (P,) after the n pot entries, at positions n..n+P-1, and return the
    attention it pays each pot entry per layer and KV head, (L, H_kv, n). Its K/V are dropped."""
    scores = [None] * model.config.n_layers
    write = cache.prefill_attend(n)

    def attend(layer, q, k, v):
        out = write(layer, q, k, v)
        scores[layer] = catalyst_attention(q[0], cache.k[layer, 0, :, :n + k.shape[2]], n)
        return out

    positions = torch.arange(n, n + len(catalyst), device=catalyst.device)
    model(catalyst[None], positions[None], attend)
    cache.lens.fill_(n)
    return torch.stack(scores)


def select(nll, cap, C, T):
    """The C slots kept in each layer and KV head, sorted (L, H_kv, C): the T with the highest
    NuC nll (L, H_kv, n), then the C - T with the highest CaP cap (L, H_kv, n) among the others.
    Slot 0, the stream's first token, is always kept (NuC +inf there; CaP too, for T = 0)."""
    nuc = nll.topk(T, dim=-1).indices
    cap = cap.clone()
    cap[..., 0] = float("inf")
    rest = cap.scatter(-1, nuc, float("-inf")).topk(C - T, dim=-1).indices
    return torch.cat([nuc, rest], dim=-1).sort(-1).values


def distil(model, cache, nll, catalyst, C, T):
    """Distil the full pot (nll (L, H_kv, n): its entries' NuC) to C entries per layer and KV
    head at slots and positions 0..C-1 (CR-RoPE); nll[..., :C] follows. Returns the kept slots."""
    keep = select(nll, cap_scores(model, cache, catalyst, nll.shape[-1]), C, T)
    cache.compact(keep, model.rope)
    nll[..., :C] = nll.gather(-1, keep)
    return keep


# ---------------------------------------------------------------------------- the whole prefill

def fill_sizes(n, M, C):
    """The fills of the pot that n stream tokens take: M - C tokens each after the first, which
    is shorter (C + 1..M tokens) so that the last is whole: the final pot always ends with the
    M - C most recent tokens."""
    if n <= M:
        return [n] if n else []
    first = M - (M - n) % (M - C)
    return [first] + [M - C] * ((n - first) // (M - C))


def prefill(model, prompt, config, answer_budget, on_progress=None):
    """InfiniPot prefill: head + context stream through the pot, then the question follows.
    on_progress(fills_done, fills_total) after each fill of the pot.

    stats: distillations (count), pot_tokens M and pot_keep C (tokens per KV head),
    catalyst_tokens, evicted_tokens (context tokens dropped, per KV head), forwards, scored_tokens.
    """
    c = model.config
    config.validate(c)
    catalyst = catalyst_ids(config, prompt)
    M, C, T, room = pot_sizes(config, c.max_position_embeddings, len(catalyst), len(prompt.question), answer_budget)
    pot = Pot(model, stream_of(model, prompt), M, M + room)
    sizes = fill_sizes(len(pot.stream), M, C)
    pot.run(sizes, torch.tensor(catalyst, device=model.device), C, T, len(sizes), on_progress)
    return pot.prefilled(prompt.question, sizes, len(catalyst), M, C)


def stream_of(model, prompt):
    """The stream the pot reads: head + context, (T,) long on the model's device (long even when empty)."""
    return torch.tensor(prompt.head + prompt.context, device=model.device, dtype=torch.long)


class Pot:
    """The pot as the stream fills it: its cache, its entries' NuC, and how much of the stream
    went in (`fills` fills, `done` tokens)."""

    def __init__(self, model, stream, M, capacity):
        c, device = model.config, model.device
        self.model, self.stream = model, stream
        self.cache = RawKeyCache(c, 1, capacity, device, model.dtype)
        self.nll = torch.empty(c.n_layers, c.n_kv_heads, M, device=device)  # NuC of the pot's entries
        self.n = self.done = self.fills = 0
        self.last_logits, self.forwards = None, []

    def run(self, sizes, catalyst, C, T, until, on_progress=None):
        """Fill the pot with the stream's fills `sizes` from self.fills to `until`, distilling it
        (by the catalyst (P,) ids) before each fill but the first. on_progress(fills, total)."""
        model = self.model
        while self.fills < until:
            if self.fills:
                distil(model, self.cache, self.nll[..., :self.n], catalyst, C, T)
                self.forwards.append([len(catalyst), self.n + len(catalyst)])
                self.n = C
            n, take = self.n, sizes[self.fills]
            self.nll[:, :, n:n + take], self.last_logits = fill(model, self.cache, self.stream[self.done:self.done + take],
                                                                n, self.last_logits)
            self.forwards.append([take, n + take])
            self.n, self.done, self.fills = n + take, self.done + take, self.fills + 1
            if on_progress:
                on_progress(self.fills, len(sizes))

    def copy(self, capacity):
        """This pot in a cache of `capacity` slots (a session's, which one question goes on from)."""
        pot = Pot(self.model, self.stream, self.nll.shape[-1], capacity)
        pot.nll.copy_(self.nll)
        carry_over(self.cache, pot.cache, self.n)
        pot.n, pot.done, pot.fills, pot.last_logits, pot.forwards = self.n, self.done, self.fills, self.last_logits, []
        return pot

    def prefilled(self, question, sizes, catalyst_tokens, M, C):
        """The question (ids) prefilled after the pot, without eviction: the Prefilled."""
        model, n, logits = self.model, self.n, self.last_logits
        if question:
            positions = torch.arange(n, n + len(question), device=model.device)[None]
            hidden = model(torch.tensor([question], device=model.device), positions, self.cache.prefill_attend(n))
            logits = model.logits(hidden[0, -1])
            self.forwards.append([len(question), n + len(question)])
        self.cache.k_raw = None  # no distillation after the prompt: decoding needs only k and v
        stats = dict(distillations=len(sizes[1:]), pot_tokens=M, pot_keep=C, catalyst_tokens=catalyst_tokens,
                     evicted_tokens=len(self.stream) - n, forwards=self.forwards,
                     scored_tokens=len(self.stream) + bool(question))
        return Prefilled(self.cache, logits, n + len(question), stats)


class PotEncoding:
    """InfiniPot in a session (prefill.py: open and ask). With a generic or literal catalyst
    nothing before the question depends on it: the final pot is kept, and each question is
    prefilled after a copy of it. With the question as catalyst (CaP-Q) every distillation
    depends on the question: only the first fill, before any, is kept, and each question streams
    the rest of the context again. The pot's sizes depend on the question's length where the
    window leaves less than DEFAULT_POT (pot_sizes): a question whose sizes differ fills it anew."""

    def __init__(self, model, prompt, config, answer_budget, limit, on_progress=None):
        self.model, self.stream, self.config, self.limit = model, stream_of(model, prompt), config, limit
        self.by_question = config.catalyst == "question"
        catalyst = 0 if self.by_question else len(config.catalyst)
        self.pot = None
        self.fill(pot_sizes(config, model.config.max_position_embeddings, catalyst, 0, answer_budget), on_progress)

    @property
    def nbytes(self):
        return cache_bytes(self.pot.cache) + self.pot.nll.numel() * self.pot.nll.element_size()

    @property
    def home(self):
        return self.pot.cache.k.device

    def fill(self, sizes, on_progress=None):
        """Fill the pot of sizes (M, C, T, room) as far as no question changes it: the tokens encoded."""
        M, C, T, room = sizes
        self.pot = None
        encoding_home(self.model, 3 * kv_bytes_per_token(self.model) // 2 * (M + room), self.limit)  # with raw keys
        pot = Pot(self.model, self.stream, M, M + room)
        fills = fill_sizes(len(self.stream), M, C)
        catalyst = None if self.by_question else torch.tensor(self.config.catalyst, device=self.model.device)
        pot.run(fills, catalyst, C, T, min(1, len(fills)) if self.by_question else len(fills), on_progress)
        self.pot, self.sizes = pot, (M, C, T)
        return pot.done

    def ask(self, prompt, answer_budget, on_progress=None):
        window = self.model.config.max_position_embeddings
        catalyst = catalyst_ids(self.config, prompt)
        sizes = pot_sizes(self.config, window, len(catalyst), len(prompt.question), answer_budget)
        M, C, T, room = sizes
        encoded = self.fill(sizes, on_progress) if self.pot is None or (M, C, T) != self.sizes else 0
        pot = self.pot.copy(M + room)
        fills = fill_sizes(len(self.stream), M, C)
        pot.run(fills, torch.tensor(catalyst, device=self.model.device), C, T, len(fills), on_progress)
        prefilled = pot.prefilled(prompt.question, fills, len(catalyst), M, C)
        prefilled.stats.update(encoded_tokens=encoded + sum(tokens for tokens, _ in pot.forwards))
        return prefilled
