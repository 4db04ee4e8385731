"""Generation after any prefill: sampling and the decode loop, one captured CUDA graph per token on
a GPU and the same step eagerly elsewhere."""

from dataclasses import dataclass

import torch

from model import kernels
from prefill import OptionError

GRAPH_BLOCK = 16  # decode steps replayed between host syncs (streaming granularity on a GPU)


def argmax(x):
    """Index of the largest value of each row of x (B, V) float32 -> (B,) int64, the first of equal ones."""
    return kernels.argmax(x.contiguous()) if kernels is not None and x.is_cuda else x.argmax(-1)


def sample(logits, temperature, top_k, top_p, generator):
    """logits (B, V) float32 -> (B,) token ids, with no host sync (it runs inside the graph)."""
    if temperature == 0:
        return argmax(logits)
    logits = logits / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # keep the smallest head reaching top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0))
    # argmax(p / E) with E ~ Exp(1) is a draw from p, without a normalised distribution or a sync
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return argmax(probs / noise)


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are drawn: temperature 0 is greedy; top_k and top_p filter first (0 and 1: off);
    seed fixes the draws (None: a fresh seed). Raises OptionError for values nothing can serve."""
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self):
        for bad, param, message in (
                (not 0 <= self.temperature < float("inf"), "temperature", "{} must be 0 (greedy) or a positive number"),
                (not 0 < self.top_p <= 1, "top_p", "{} must be in (0, 1]"),
                (self.top_k < 0, "top_k", "{} must be 0 (off) or positive"),
                (self.seed is not None and not 0 <= self.seed < 2**64, "seed", "{} must be between 0 and 2**64 - 1")):
            if bad:
                raise OptionError(param, message)

    def sampler(self, device):
        generator = None
        if self.temperature > 0:
            generator = torch.Generator(device)
            generator.manual_seed(self.seed) if self.seed is not None else generator.seed()
        return Sampler(self, generator)


@dataclass
class Sampler:
    params: SamplingParams
    generator: torch.Generator | None

    def __call__(self, logits):
        p = self.params
        return sample(logits, p.temperature, p.top_k, p.top_p, self.generator)


class Decoder:
    """The decode loop over static buffers. One step runs every layer, the LM head and sampling
    and appends the token to `out`; on a GPU the step is captured once as a CUDA graph and
    replayed per token, the cache's length tensors telling the kernels how much is live."""

    def __init__(self, model, cache, first_token, position, max_new_tokens, sampler, cuda_graph):
        device = cache.k.device
        self.model, self.cache, self.sampler = model, cache, sampler
        self.tok = torch.tensor([[first_token]], device=device)  # (1, 1) next input token
        self.pos = torch.tensor([[position]], device=device)  # (1, 1) its RoPE position (not the cache length under ParallelComp)
        self.out = torch.full((max_new_tokens,), first_token, device=device)
        self.n = torch.ones(1, dtype=torch.long, device=device)  # tokens in `out`
        self.graph = self.capture() if cuda_graph else None

    def step(self):
        hidden = self.model(self.tok, self.pos, self.cache.decode_attend)
        token = self.sampler(self.model.logits(hidden[:, -1]))
        self.tok.copy_(token.view(1, 1))
        self.pos += 1
        self.out.index_copy_(0, self.n, token)
        self.n += 1

    def capture(self):
        """Record one step as a CUDA graph; the warm-up it needs first leaves no trace."""
        buffers = (self.tok, self.pos, self.out, self.n, *self.cache.decode_state())
        saved = [t.clone() for t in buffers]
        generator = self.sampler.generator
        rng = generator.get_state() if generator is not None else None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # cuBLAS handles, allocator; the K/V it writes are overwritten later
            for _ in range(2):
                self.step()
        torch.cuda.current_stream().wait_stream(stream)
        for t, value in zip(buffers, saved):
            t.copy_(value)
        graph = torch.cuda.CUDAGraph()
        if generator is not None:
            generator.set_state(rng)
            graph.register_generator_state(generator)
        with torch.cuda.graph(graph):
            self.step()
        return graph

    def run(self, steps):
        for _ in range(steps):
            self.graph.replay() if self.graph else self.step()


def decode(model, prefilled, sampler, max_new_tokens, eos_ids, cuda_graph, on_token):
    """Sample the first token from the prefill's logits (never EOS), then run the decode loop until
    max_new_tokens or an EOS, calling on_token(id) for each token kept. Returns (tokens,
    interrupted): Ctrl-C stops the loop and keeps what was generated."""
    logits = prefilled.logits.clone()
    logits[[i for i in eos_ids if i < len(logits)]] = float("-inf")
    tokens = [sampler(logits[None]).item()]
    graph = cuda_graph and prefilled.cache.graph_safe and prefilled.cache.k.is_cuda  # every cache says, on any device
    try:
        on_token(tokens[0])
        if max_new_tokens > 1:
            decoder = Decoder(model, prefilled.cache, tokens[0], prefilled.next_position, max_new_tokens, sampler,
                              graph)
            block = GRAPH_BLOCK if graph else 1
            while len(tokens) < max_new_tokens:
                steps = min(block, max_new_tokens - len(tokens))
                decoder.run(steps)
                new = decoder.out[len(tokens):len(tokens) + steps].tolist()
                ended = next((i for i, t in enumerate(new) if t in eos_ids), None)
                for t in new[:ended]:
                    tokens.append(t)
                    on_token(t)
                if ended is not None:
                    break
    except KeyboardInterrupt:
        return tokens, True
    return tokens, False
