"""decoding.py: sampling against distributions computed here in float64, SamplingParams' checks, and
the decode loop on stories260K against greedy tokens from plain causal forwards (no cache)."""

import math

import pytest
import torch

from baselines import BaselineConfig, prefill_full
from checkpoint import load_model
from conftest import STORIES
from decoding import SamplingParams, decode, sample
from prefill import OptionError, Prompt
from tokenizer import Tokenizer

LOGITS = torch.tensor([0.5, -1.0, 2.0, -0.3, 1.0])  # a 5-token vocabulary, not in order
DRAWS = 20_000


def expected_distribution(logits, temperature, top_k, top_p):
    """softmax(logits / T) in float64; top-k keeps the k most likely, top-p then the smallest set
    of the most likely whose mass reaches p (a token is kept when the mass before it is below p);
    each filter renormalises."""
    probs = torch.softmax(logits.double() / temperature, 0)
    order = probs.argsort(descending=True).tolist()
    if top_k:
        probs[order[top_k:]] = 0
        probs /= probs.sum()
    if top_p < 1:
        before = 0.0
        for i in order:
            if before >= top_p:
                probs[i] = 0
            before += probs[i].item()
        probs /= probs.sum()
    return probs


@pytest.mark.parametrize("temperature, top_k, top_p, kept", [
    (1.0, 0, 1.0, 5), (0.5, 0, 1.0, 5), (1.5, 3, 1.0, 3),
    (1.0, 0, 0.8, 3),  # mass before the 3rd token 0.786 < 0.8, before the 4th 0.914
    (2.0, 4, 0.7, 3),  # after top-4: mass before the 3rd 0.671 < 0.7, before the 4th 0.868
])
def test_draw_frequencies_match_the_distribution(temperature, top_k, top_p, kept):
    """20,000 draws in one call (one row each): every token's frequency within 4 standard errors
    sqrt(p (1 - p) / N) of its probability, and filtered tokens never drawn."""
    p = expected_distribution(LOGITS, temperature, top_k, top_p)
    assert int((p > 0).sum()) == kept
    sampler = SamplingParams(temperature, top_p, top_k, seed=1234).sampler(torch.device("cpu"))
    draws = sampler(LOGITS.expand(DRAWS, -1))
    assert draws.shape == (DRAWS,)
    frequency = torch.bincount(draws, minlength=5).double() / DRAWS
    for token in range(5):
        if p[token] == 0:
            assert frequency[token] == 0, token
        else:
            assert abs(frequency[token] - p[token]) <= 4 * math.sqrt(p[token] * (1 - p[token]) / DRAWS), token


def test_greedy_top_1_and_a_tiny_top_p_are_argmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 1000, generator=g) * 3
    argmax = [max(range(1000), key=lambda i: row[i].item()) for row in logits]
    for temperature, top_k, top_p in ((0.0, 0, 1.0), (1.0, 1, 1.0), (1.0, 0, 1e-6), (2.0, 1, 1e-6)):
        g = torch.Generator().manual_seed(1)
        assert sample(logits, temperature, top_k, top_p, g).tolist() == argmax, (temperature, top_k, top_p)


def test_the_same_seed_gives_the_same_draws():
    logits = torch.zeros(1000, 50)  # uniform: every draw is the noise's
    cpu = torch.device("cpu")
    a = SamplingParams(1.0, seed=7).sampler(cpu)(logits)
    assert torch.equal(a, SamplingParams(1.0, seed=7).sampler(cpu)(logits))
    assert not torch.equal(a, SamplingParams(1.0, seed=8).sampler(cpu)(logits))
    assert len(set(a.tolist())) == 50


@pytest.mark.parametrize("values, param", [
    (dict(temperature=-0.5), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_p=float("nan")), "top_p"), (dict(top_k=-1), "top_k"), (dict(seed=-1), "seed"),
    (dict(seed=2**64), "seed"),
])
def test_bad_sampling_params_name_the_parameter(values, param):
    with pytest.raises(OptionError) as e:
        SamplingParams(**values)
    assert e.value.param == param and str(e.value).startswith(param + " must ")


# ---------------------------------------------------------------------------- the decode loop

@pytest.fixture(scope="module")
def model():
    return load_model(STORIES, "cpu", torch.float32)


@pytest.fixture(scope="module")
def prompt():
    return Prompt([1], Tokenizer.from_dir(STORIES).encode("Once upon a time there was a little cat."), [], bos_id=1)


def greedy_without_cache(model, ids, n):
    """n greedy tokens after ids, each from a causal forward over everything so far."""
    out = []
    with torch.inference_mode():
        for _ in range(n):
            out.append(int(model.causal_logits(torch.tensor([ids + out]))[0, -1].argmax()))
    return out


def run_decode(model, prompt, max_new_tokens, eos_ids):
    seen = []
    with torch.inference_mode():
        prefilled = prefill_full(model, prompt, BaselineConfig(), max_new_tokens)
        tokens, interrupted = decode(model, prefilled, SamplingParams().sampler(model.device), max_new_tokens,
                                     eos_ids, False, seen.append)
    assert not interrupted and seen == tokens
    return tokens


def test_greedy_decode_equals_forwards_without_a_cache(model, prompt):
    expected = greedy_without_cache(model, prompt.ids(), 16)
    assert run_decode(model, prompt, 16, frozenset()) == expected


def test_decode_stops_before_an_eos_but_never_starts_with_one(model, prompt):
    expected = greedy_without_cache(model, prompt.ids(), 16)
    at = next(i for i in range(2, 16) if expected[i] not in expected[:i])  # a token's first appearance
    assert run_decode(model, prompt, 16, frozenset({expected[at]})) == expected[:at]
    with torch.inference_mode():
        second = int(model.causal_logits(torch.tensor([prompt.ids()]))[0, -1].topk(2).indices[1])
    assert run_decode(model, prompt, 1, frozenset({expected[0]})) == [second]  # the first token is never EOS
