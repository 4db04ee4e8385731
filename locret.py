"""Locret: chunked prefill into a bounded cache, evicted by trained retaining heads
(Huang et al., arXiv 2410.01805; code huangyuxiang03/Locret).

Every layer has a retaining head, Linear -> SiLU -> Linear, that reads a token's fused projection
[q | k | v] before RoPE and predicts, for each KV head, how much the token will matter later. The
prompt is prefilled S tokens at a time against the cache; after each chunk every layer and KV head
keeps its B best-scored entries, the n_s most recent always among them while chunks remain (the
stabilizers). Keys are cached before RoPE as well, and the kept entries are re-rotated to the
contiguous positions 0..n-1, so each chunk follows a gap-free cache. The prompt's last LOCAL_TOKENS
tokens (the whole question when it is longer) are prefilled after the last eviction and never
evicted; decoding does not evict.

The heads are trained (tools/train_locret.py) on labels read from attention: for each prefix token,
the largest pre-softmax score q·k/sqrt(D) it receives from the answer's tokens over its KV head's
query group (`retention_labels`), fitted with SmoothL1 plus a smoothness term, to which we add a
ranking term (`retention_loss`).

Deviations from the original code, all deliberate:
- B, S and n_s default to values scaled to the model's trained window (`LocretConfig.settings`);
  the default B also leaves the prompt's tail and the answer room in the window, and a B given
  under which they would pass it is refused: positions stay inside the trained window (the
  original's B is fixed, far below its 128K window);
- the uncompressed tail grows to the whole question when that is longer than LOCAL_TOKENS (the
  original always takes its local_len = 100 last tokens, evicting the start of a long question);
- head scores are kept in float32 (the original keeps them in the model's dtype, bf16), and a tie
  keeps the later token (topk leaves it unspecified; in the first layer equal tokens score equal);
- kept raw keys are rotated once per eviction, not the whole cache at every forward (same positions);
- the raw keys are freed after the prompt (decoding never evicts);
- the SmolLM2-135M heads are ours, 256 wide (Locret's Llama-3.1-8B heads are 1024 wide).
- the training loss adds a ranking term to Locret's (`retention_loss`): the cross-entropy from the
  softmax of the labels to the softmax of the scores, since eviction keeps each head's top B (a
  ranking); with the term, SmolLM2's heads gave a perplexity 1-2 lower at 8K-32K and found the
  pass key as often or more (README, Locret's heads).
"""

import copy
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from attention import attention, scores_f32
from checkpoint import CheckpointError
from compaction import RawKeyCache
from prefill import (OptionError, Prefilled, cache_bytes, carry_over, encoding_home, extend, kv_bytes_per_token,
                     option)

LOCAL_TOKENS = 100  # the uncompressed tail at least (Locret's local_len)
SMOOTHNESS = 0.0025  # weight of the smoothness term in the training loss
INIT_STD = 0.02  # fresh heads' weights
DEFAULT_HEADS = Path(__file__).parent / "weights" / "locret_smollm2.safetensors"
SMOLLM2_135M = dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64)
NO_HEADS = "{} is required: no retaining heads are shipped for this model"


def ships_heads(model_config):
    """Whether DEFAULT_HEADS were trained for this model's shape (SmolLM2-135M)."""
    return all(getattr(model_config, name) == value for name, value in SMOLLM2_135M.items())


# ---------------------------------------------------------------------------- retaining heads

class RetainingHead(nn.Module):
    """One layer's scorer: [q | k | v] before RoPE (..., (H + 2 H_kv) D) -> scores (..., H_kv)."""

    def __init__(self, width, hidden, n_kv_heads):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, n_kv_heads, bias=False)

    def forward(self, qkv):
        return self.fc2(F.silu(self.fc1(qkv)))


class RetainingHeads(nn.ModuleList):
    """A RetainingHead per layer of a model; hidden: 1024 in Locret's files, 256 in ours."""

    def __init__(self, model_config, hidden):
        c = model_config
        width = (c.n_heads + 2 * c.n_kv_heads) * c.head_dim
        super().__init__(RetainingHead(width, hidden, c.n_kv_heads) for _ in range(c.n_layers))


def random_heads(model_config, hidden):
    """Fresh heads, N(0, INIT_STD) as Hugging Face initialises Locret's new fc1/fc2, float32 on the CPU."""
    heads = RetainingHeads(model_config, hidden)
    for weight in heads.parameters():
        nn.init.normal_(weight, std=INIT_STD)
    return heads


def head_key(layer, fc):
    """The published name of a head tensor (Locret's module path inside the model)."""
    return f"model.layers.{layer}.self_attn.{fc}.weight"


def save_heads(heads, path, metadata=None):
    """Write heads as bf16 safetensors under the published names."""
    tensors = {head_key(i, fc): getattr(head, fc).weight.detach().to("cpu", torch.bfloat16).contiguous()
               for i, head in enumerate(heads) for fc in ("fc1", "fc2")}
    save_file(tensors, str(path), metadata=metadata)


def read_tensors(path):
    """name -> tensor from a .safetensors file or a pickled dict (Locret's .bin, read with weights_only)."""
    try:
        if path.suffix == ".safetensors":
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found")
    except Exception as e:  # on other bytes torch.load's unpickler raises whatever they cause (KeyError, ...)
        reason = type(e).__name__ + "".join(f": {line}" for line in str(e).strip().splitlines()[:1])
        raise CheckpointError(f"{path}: not a readable heads file ({reason})")
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise CheckpointError(f"{path}: not a dictionary of tensors")
    return state


def load_heads(path, model_config):
    """Retaining heads from `path` for a model, float32 on the CPU, without gradients.

    Keys: model.layers.{i}.self_attn.fc{1,2}.weight, with or without the 'model.' prefix; fc1
    (hidden, (H + 2 H_kv) D), fc2 (H_kv, hidden). A missing, misshapen or foreign tensor raises a
    CheckpointError naming it.
    """
    path = Path(path)
    found = {}  # (layer, fc) -> (name in the file, tensor)
    for name, tensor in read_tensors(path).items():
        m = re.fullmatch(r"(?:model\.)?layers\.(\d+)\.self_attn\.(fc[12])\.weight", name)
        if m is None:
            raise CheckpointError(f"{path.name}: unexpected tensor {name}")
        found[int(m[1]), m[2]] = name, tensor
    hidden = found[0, "fc1"][1].shape[0] if (0, "fc1") in found else 0
    with torch.device("meta"):
        heads = RetainingHeads(model_config, hidden)
    heads = heads.to_empty(device="cpu")
    for i, head in enumerate(heads):
        for fc in ("fc1", "fc2"):
            if (i, fc) not in found:
                raise CheckpointError(f"{path.name}: missing tensor {head_key(i, fc)}")
            name, tensor = found.pop((i, fc))
            weight = getattr(head, fc).weight
            if tensor.shape != weight.shape:
                raise CheckpointError(f"{path.name}: tensor {name} has shape {tuple(tensor.shape)}, "
                                      f"expected {tuple(weight.shape)}")
            weight.data.copy_(tensor)
    if found:
        name = found[min(found)][0]
        raise CheckpointError(f"{path.name}: tensor {name} is for a layer the model does not have "
                              f"({model_config.n_layers} layers)")
    return heads.requires_grad_(False)


# ---------------------------------------------------------------------------- configuration

@dataclass(frozen=True)
class LocretConfig:
    budget: int | None = option(
        None, "B, the cache entries each layer and KV head keeps between chunks (default: half the "
        "trained window, at most 16384, and at most what the prompt's tail and the answer leave)", parse=int,
        metavar="B")
    locret_chunk: int | None = option(
        None, "S, the prompt tokens prefilled per chunk (default: an eighth of the trained window, "
        "at most 1024)", parse=int, metavar="S")
    stabilizers: int | None = option(
        None, "n_s, the most recent tokens always kept while chunks remain (default: 5/32 of B)",
        parse=int)
    # A path, or heads already loaded by `with_heads` (an engine loads them once, not per prompt).
    retaining_heads: "str | RetainingHeads | None" = option(
        None, "retaining heads, .safetensors or Locret's .bin (default: the shipped heads of "
        "SmolLM2-135M)", parse=str, metavar="FILE")

    def settings(self, model_config, after=0):
        """(B, S, n_s), defaults scaled to the trained window from Locret's Llama-3.1-8B runs
        (128K window: B = 16384, S = 1024, n_s = 2500): B half the window up to 16384, S an eighth
        up to 1024, n_s 5/32 of B. SmolLM2 (8K): 4096, 1024, 640; stories260K (512): 256, 64, 40.
        after: the tokens whose positions follow the kept entries (the prompt's tail and the
        answer); the default B leaves them room in the window: positions stay inside it."""
        window = model_config.max_position_embeddings
        budget = min(window // 2, 16384, window - after) if self.budget is None else self.budget
        chunk = min(window // 8, 1024) if self.locret_chunk is None else self.locret_chunk
        stabilizers = budget * 5 // 32 if self.stabilizers is None else self.stabilizers
        return budget, chunk, stabilizers

    def prepared(self, model, encode):
        return with_heads(self, model)

    def validate(self, model_config):
        budget, chunk, stabilizers = self.settings(model_config)
        window = model_config.max_position_embeddings
        if budget < 1:
            raise OptionError("budget", "{} must be at least 1")
        if chunk < 1:
            raise OptionError("locret_chunk", "{} must be at least 1")
        if not 0 <= stabilizers < budget:
            raise OptionError("stabilizers", f"{{}} must be at least 0 and below {{}} ({budget})", "budget")
        if budget + chunk > window:
            raise OptionError("budget", f"{{}} plus {{}} ({budget} + {chunk}) must fit in the model's {window}-token "
                                        "window", "locret_chunk")
        if self.retaining_heads is None and not ships_heads(model_config):
            raise OptionError("retaining_heads", NO_HEADS)


def with_heads(config, model):
    """config with its retaining heads loaded, on the model's device and dtype."""
    heads = config.retaining_heads
    if not isinstance(heads, RetainingHeads):
        if heads is None and not ships_heads(model.config):
            raise OptionError("retaining_heads", NO_HEADS)
        if heads is None and not DEFAULT_HEADS.exists():
            raise CheckpointError(f"{DEFAULT_HEADS} not found: train it with tools/train_locret.py")
        heads = load_heads(heads or DEFAULT_HEADS, model.config)
    weight = heads[0].fc1.weight
    if (weight.device, weight.dtype) != (model.device, model.dtype):
        heads = copy.deepcopy(heads).to(model.device, model.dtype)  # Module.to would convert the caller's heads
    return replace(config, retaining_heads=heads)


# ---------------------------------------------------------------------------- prefill

class RetainedCache:
    """The context as Locret keeps it: in every layer and KV head, the first n entries of a RawKeyCache
    are the kept tokens in prompt order at positions 0..n-1, with their scores and prompt indices."""

    def __init__(self, model, heads, capacity, room):
        c = model.config
        self.model, self.heads = model, heads
        self.kv = RawKeyCache(c, 1, capacity + room, model.device, model.dtype)
        self.score = torch.zeros(c.n_layers, c.n_kv_heads, capacity, device=model.device)  # float32
        self.origin = torch.zeros_like(self.score, dtype=torch.long)  # index in the prompt
        self.n = self.seen = 0  # entries kept; prompt tokens prefilled

    def append(self, tokens):
        """Prefill a chunk after the kept entries, at positions n.., and score its tokens."""
        n, T, device = self.n, len(tokens), self.model.device
        store_raw_keys = self.kv.store_raw_keys(n)

        def observe(layer, qkv):
            store_raw_keys(layer, qkv)
            self.score[layer, :, n:n + T] = self.heads[layer](qkv)[0].T.float()

        positions = torch.arange(n, n + T, device=device)[None]
        self.model(torch.tensor([tokens], device=device), positions, self.kv.prefill_attend(n), observe)
        self.origin[:, :, n:n + T] = torch.arange(self.seen, self.seen + T, device=device)
        self.n, self.seen = n + T, self.seen + T

    def resumed(self, capacity, room):
        """A RetainedCache of `capacity` + `room` slots with this one's entries (a session's, which
        one question goes on from)."""
        cache = RetainedCache(self.model, self.heads, capacity, room)
        carry_over(self.kv, cache.kv, self.n)
        cache.score[..., :self.n], cache.origin[..., :self.n] = self.score[..., :self.n], self.origin[..., :self.n]
        cache.n, cache.seen = self.n, self.seen
        return cache

    def evict(self, budget, stabilizers):
        """Keep, in each layer and KV head, the `budget` best-scored entries, the last `stabilizers`
        always among them, the later entry on a tie. Returns whether anything was evicted."""
        if self.n <= budget:
            return False
        score = self.score[..., :self.n].clone()
        score[..., self.n - stabilizers:self.n] = float("inf")
        keep = score.argsort(dim=-1, stable=True)[..., self.n - budget:].sort(dim=-1).values  # (L, H_kv, B)
        self.kv.compact(keep, self.model.rope)
        self.score[..., :budget] = self.score.gather(-1, keep)
        self.origin[..., :budget] = self.origin.gather(-1, keep)
        self.n = budget
        return True


def check_room(config, model_config, stream, tail, answer_budget):
    """That the `tail` tokens and the answer, after the entries kept of `stream` tokens, stay at
    positions inside the trained window."""
    window = model_config.max_position_embeddings
    room = window - tail - answer_budget  # positions left for the kept entries
    budget = config.settings(model_config, tail + answer_budget)[0]
    if room < (1 if stream else 0):
        raise OptionError("max_new_tokens", f"the prompt's last {tail} tokens and {{}} ({answer_budget}) leave no room "
                                            f"for a cache in the model's {window}-token window")
    if min(budget, stream) > room:
        raise OptionError("budget", f"{{}} ({budget}) + the prompt's last {tail} tokens + {{}} ({answer_budget}) must "
                                    f"fit in the model's {window}-token window", "max_new_tokens")


def tail_length(prompt):
    """Tokens prefilled after the last eviction and never evicted: the last LOCAL_TOKENS, or the
    whole question when it is longer. The text just before a short question stays whole: evicted
    to scattered tokens, it left SmolLM2 unable to read a pass key its cache still held."""
    return min(max(len(prompt.question), LOCAL_TOKENS), len(prompt.ids()))


def retain(model, heads, stream, config, room, on_progress=None, resume=None, until=None):
    """The stream prefilled in chunks with eviction: (RetainedCache with `room` slots to spare,
    forwards, compressions). resume: a RetainedCache of the stream's first chunks to go on from
    (a session's); until: the chunks to prefill, each one followed by more (default: all)."""
    budget, chunk, stabilizers = config.settings(model.config, room)
    capacity = min(len(stream), budget + chunk)
    cache = resume.resumed(capacity, room) if resume else RetainedCache(model, heads, capacity, room)
    starts = range(0, len(stream), chunk)
    forwards, compressions = [], 0
    for i in range(cache.seen // chunk, len(starts) if until is None else until):
        piece = stream[starts[i]:starts[i] + chunk]
        cache.append(piece)
        forwards.append([len(piece), cache.n])
        compressions += cache.evict(budget, stabilizers if i + 1 < len(starts) else 0)
        if on_progress:
            on_progress(i + 1, len(starts))
    return cache, forwards, compressions


def split_tail(prompt):
    """(stream, tail): the prompt's ids prefilled with eviction, and its tail (tail_length), without."""
    ids, n_tail = prompt.ids(), tail_length(prompt)
    return ids[:len(ids) - n_tail], ids[len(ids) - n_tail:]


def prefill(model, prompt, config, answer_budget, on_progress=None):
    """Locret's prefill of prompt: all but its tail in chunks with eviction, then the tail without.

    on_progress(chunks_done, chunks_total) after each chunk. Stats besides forwards and
    scored_tokens: compressions (evictions that removed entries), evicted_tokens and kept_tokens
    (per layer and KV head), head_flops (the retaining heads' multiply-adds x 2).
    """
    stream, tail = split_tail(prompt)
    check_room(config, model.config, len(stream), len(tail), answer_budget)
    heads = with_heads(config, model).retaining_heads
    cache, forwards, compressions = retain(model, heads, stream, config, len(tail) + answer_budget, on_progress)
    return with_tail(model, heads, cache, len(stream), tail, forwards, compressions, len(stream))


def with_tail(model, heads, cache, stream, tail, forwards, compressions, scored):
    """The tail prefilled after the retained cache of `stream` tokens: the Prefilled. forwards:
    those of the stream; scored: the stream tokens the heads scored."""
    n = cache.n
    logits = extend(model, cache.kv, tail, n)
    forwards.append([len(tail), n + len(tail)])
    cache.kv.k_raw = None  # decoding never evicts
    fc1, fc2 = heads[0].fc1.weight, heads[0].fc2.weight
    stats = dict(forwards=forwards, scored_tokens=1, compressions=compressions,
                 evicted_tokens=stream - n, kept_tokens=n + len(tail),
                 head_flops=2 * scored * len(heads) * (fc1.numel() + fc2.numel()))
    return Prefilled(cache.kv, logits, n + len(tail), stats)


class RetainedEncoding:
    """Locret in a session (prefill.py: open and ask): the retained cache after the chunks of the
    context that end before its last LOCAL_TOKENS tokens. Every question's stream (the prompt less
    its tail, tail_length) starts with them and goes on past them, so they are prefilled and
    evicted as its own prefill would; each question goes on from a copy. B, S and n_s may depend
    on the question's length (LocretConfig.settings): a question whose settings differ prefills
    them anew."""

    def __init__(self, model, prompt, config, answer_budget, limit, on_progress=None):
        self.model, self.config, self.limit, self.context = model, config, limit, prompt.ids()
        self.heads = with_heads(config, model).retaining_heads
        self.cache = None
        stream, tail = split_tail(prompt)
        check_room(config, model.config, len(stream), len(tail), answer_budget)
        self.retain(len(tail) + answer_budget, on_progress)

    @property
    def nbytes(self):
        return cache_bytes(self.cache.kv) + 2 * self.cache.score.numel() * self.cache.score.element_size()

    @property
    def home(self):
        return self.cache.kv.k.device

    def retain(self, room, on_progress=None):
        """Prefill the context's shared chunks for the settings `room` gives: the tokens encoded."""
        model = self.model
        settings = self.config.settings(model.config, room)
        budget, chunk, _ = settings
        self.cache = None
        encoding_home(model, 3 * kv_bytes_per_token(model) // 2 * (budget + chunk + room), self.limit)  # raw keys too
        shared = len(self.context) - min(LOCAL_TOKENS, len(self.context))  # the stream of an empty question
        self.cache, _, self.compressions = retain(model, self.heads, self.context, self.config, room, on_progress,
                                                  until=shared // chunk)
        self.settings = settings
        return self.cache.seen

    def ask(self, prompt, answer_budget, on_progress=None):
        model = self.model
        stream, tail = split_tail(prompt)
        check_room(self.config, model.config, len(stream), len(tail), answer_budget)
        room = len(tail) + answer_budget
        stale = self.cache is None or self.config.settings(model.config, room) != self.settings
        encoded = self.retain(room, on_progress) if stale else 0
        cache, forwards, compressions = retain(model, self.heads, stream, self.config, room, on_progress,
                                               resume=self.cache)
        prefilled = with_tail(model, self.heads, cache, len(stream), tail, forwards, self.compressions + compressions,
                              len(stream) - self.cache.seen)
        prefilled.stats.update(encoded_tokens=encoded + sum(tokens for tokens, _ in forwards))
        return prefilled


# ---------------------------------------------------------------------------- training targets

def retention_labels(q_answer, k_prefix):
    """Locret's labels: q_answer (B, H, A, D) rotated queries of the answer's tokens, k_prefix
    (B, H_kv, T, D) rotated keys of the prefix -> (B, H_kv, T) float32, the largest pre-softmax
    score q·k/sqrt(D) each prefix token receives from any answer token and any query head of its
    KV head's group. (Every answer token follows the whole prefix: no mask.)"""
    B, H, A, D = q_answer.shape
    Hkv = k_prefix.shape[1]
    return scores_f32(q_answer.reshape(B, Hkv, (H // Hkv) * A, D), k_prefix).amax(dim=2)


def retention_loss(scores, labels):
    """The training loss for scores and labels (L, H_kv, T): Locret's SmoothL1 (beta 1) averaged
    over tokens, heads and layers, plus SMOOTHNESS x the sum over layers of the mean squared
    difference between the scores of neighbouring tokens, plus our ranking term: the cross-entropy,
    averaged over layers and heads, from softmax(labels) over the T tokens (the attention the
    answer's strongest query pays them, as labels are pre-softmax scores) to softmax(scores)."""
    labels = labels.to(scores.dtype)
    fit = F.smooth_l1_loss(scores, labels)
    smooth = (scores[..., 1:] - scores[..., :-1]).pow(2).mean(dim=(1, 2)).sum()
    ranking = -(labels.softmax(-1) * scores.log_softmax(-1)).sum(-1).mean()
    return fit + SMOOTHNESS * smooth + ranking


def scores_and_labels(model, heads, prefix, answer):
    """One causal forward of prefix + answer at positions 0..: the heads' scores of the prefix
    tokens (L, H_kv, T) (with gradients when the heads have them) and their labels (L, H_kv, T)."""
    P, device = len(prefix), model.device
    scores, labels = [], []

    def observe(layer, qkv):
        scores.append(heads[layer](qkv[0, :P].to(heads[layer].fc1.weight.dtype)).T)

    def attend(layer, q, k, v):
        labels.append(retention_labels(q[:, :, P:], k[:, :, :P])[0])
        return attention(q, k, v)

    tokens = torch.tensor([prefix + answer], device=device)
    model(tokens, torch.arange(tokens.shape[1], device=device)[None], attend, observe)
    return torch.stack(scores), torch.stack(labels)
