"""infinipot.py against hand-computed counts and the float64 reference forward (tests/reference.py).

stories260K (a real Llama with BOS, 8 heads over 4 KV heads, trained on 512 tokens) streams a
Frankenstein excerpt through a pot of M = 256 tokens distilled to C = 128. One distillation is
checked step by step against float64: the NuC of every token, the raw keys, the catalyst's
attention, which slots each layer and KV head keeps, the re-rotated keys, and the logits of the
prompt's end attending to the kept cache. Tolerance: relative error <= 1e-5 on scores and logits.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import infinipot
from compaction import RawKeyCache
from conftest import BOOKS, Stories
from infinipot import InfiniPotConfig
from prefill import OptionError, Prompt, causal_prefill
from reference import ref_forward, ref_rotations, rel_err

M, C = 256, 128
TOL = 1e-5


class Setup(Stories):
    def __init__(self):
        super().__init__()
        text = (BOOKS / "frankenstein.txt").read_text()[20000:60000]
        self.text_ids = self.tok.encode(text)
        self.head = [1] + self.tok.encode("Read the story.")
        self.question = self.tok.encode(" What did the monster see?")
        self.config = InfiniPotConfig(pot_tokens=M, pot_keep=C).prepared(self.model, self.tok.encode)

    def prompt(self, stream_len, question=None):
        context = self.text_ids[:stream_len - len(self.head)]
        return Prompt(self.head, context, self.question if question is None else question, bos_id=1)


@pytest.fixture(scope="module")
def setup():
    return Setup()


def run(setup, prompt, config=None, answer_budget=20, model=None):
    with torch.inference_mode():
        return infinipot.prefill(model or setup.model, prompt, config or setup.config, answer_budget)


def greedy(model, cache, logits, position, steps):
    tokens = []
    with torch.inference_mode():
        for i in range(steps):
            tokens.append(int(logits.argmax()))
            pos = torch.tensor([[position + i]])
            logits = model.logits(model(torch.tensor([[tokens[-1]]]), pos, cache.decode_attend)[0, -1])
    return tokens


def test_prepared_catalysts(setup):
    generic = InfiniPotConfig().prepared(setup.model, setup.tok.encode)
    assert generic.catalyst == tuple(setup.tok.encode("\n\nSummarize the critical points of the text above."))
    literal = InfiniPotConfig(catalyst="Key facts:").prepared(setup.model, setup.tok.encode)
    assert literal.catalyst == tuple(setup.tok.encode("Key facts:"))
    question = InfiniPotConfig(catalyst="question")
    assert question.prepared(setup.model, setup.tok.encode) is question
    prompt = setup.prompt(100, question=[1] + setup.question)
    assert infinipot.catalyst_ids(question, prompt) == setup.question  # the BOS is not part of it
    with pytest.raises(TypeError):
        infinipot.catalyst_ids(InfiniPotConfig(), prompt)  # text not tokenised


def test_prompt_in_the_pot_is_plain_prefill(setup):
    prompt = setup.prompt(200)
    ids = prompt.ids()
    result = run(setup, prompt)
    with torch.inference_mode():
        plain_cache, plain_logits = causal_prefill(setup.model, ids, 20)
    reference = ref_forward(setup.w, setup.cfg, ids, list(range(len(ids))))
    assert result.stats["distillations"] == 0 and result.next_position == len(ids)
    assert (result.cache.lens == len(ids)).all()
    assert (result.logits - plain_logits).abs().max() <= 1e-5 * plain_logits.abs().max()
    assert rel_err(result.logits, reference[-1]) <= TOL
    tokens = greedy(setup.model, result.cache, result.logits, len(ids), 20)
    assert tokens == greedy(setup.model, plain_cache, plain_logits, len(ids), 20)
    generated = ref_forward(setup.w, setup.cfg, ids + tokens, list(range(len(ids) + 20)))
    assert generated[len(ids) - 1:-1].argmax(-1).tolist() == tokens  # greedy under float64 too


def test_prompt_without_question(setup):
    prompt = setup.prompt(200, question=[])
    result = run(setup, prompt)
    reference = ref_forward(setup.w, setup.cfg, prompt.ids(), list(range(200)))
    assert result.next_position == 200 and rel_err(result.logits, reference[-1]) <= TOL


def reference_selection(nll, cap, T):
    """Keep, per (layer, KV head), the T highest nll (shared) and the C - T highest cap among the rest."""
    nuc = sorted(range(M), key=lambda t: -nll[t])[:T]
    keep = torch.empty(cap.shape[0], cap.shape[1], C, dtype=torch.long)
    for layer in range(cap.shape[0]):
        for head in range(cap.shape[1]):
            rest = sorted((t for t in range(M) if t not in nuc), key=lambda t: -cap[layer, head, t])
            keep[layer, head] = torch.tensor(sorted(nuc + rest[:C - T]))
    return keep


def reference_cap(setup, record, catalyst):
    """Float64 CaP (L, H_kv, M): the catalyst after the first M tokens, softmax of its queries over
    the pot's keys and its own earlier keys, summed over catalyst rows and each KV head's heads."""
    past = [(r["k"], r["v"]) for r in record]
    cat_record = []
    ref_forward(setup.w, setup.cfg, catalyst, list(range(M, M + len(catalyst))), past=past, record=cat_record)
    H, Hkv, d = setup.cfg["num_attention_heads"], setup.cfg["num_key_value_heads"], setup.cfg["head_dim"]
    cap = torch.zeros(len(record), Hkv, M, dtype=torch.float64)
    for layer, (r, c) in enumerate(zip(record, cat_record)):
        keys = torch.cat([r["k"], c["k"]])  # (M + P, H_kv, d)
        for head in range(H):
            for p in range(len(catalyst)):
                scores = keys[:M + p + 1, head // (H // Hkv)] @ c["q"][p, head] / math.sqrt(d)
                cap[layer, head // (H // Hkv)] += scores.softmax(-1)[:M]
    return cap


class Distilled:
    """One distillation, step by step: the first M tokens filled in two pieces (the second's first
    NuC from the first's last logits), the catalyst's scores, then distil; and float64 references.
    The prompt is one whole fill longer than the pot, so its first fill is M tokens."""

    def __init__(self, setup):
        model, self.prompt = setup.model, setup.prompt(M + (M - C))
        self.stream, self.catalyst = self.prompt.head + self.prompt.context, list(setup.config.catalyst)
        self.T = round(0.5 * C)
        self.record = []
        logits64 = ref_forward(setup.w, setup.cfg, self.stream[:M], list(range(M)), record=self.record)
        self.nll64 = torch.cat([torch.tensor([math.inf], dtype=torch.float64),
                                F.cross_entropy(logits64[:-1], torch.tensor(self.stream[1:M]), reduction="none")])
        self.rot = ref_rotations(setup.cfg, list(range(M)))  # rope(x at t) = rot[t] @ x
        self.raw64 = [torch.einsum("tji,thj->thi", self.rot, r["k"]) for r in self.record]  # rot[t]ᵀ undoes it
        self.cap64 = reference_cap(setup, self.record, self.catalyst)

        self.cache = cache = RawKeyCache(model.config, 1, M + 64, "cpu", torch.float32)
        nll = torch.empty(model.config.n_layers, model.config.n_kv_heads, M)
        catalyst = torch.tensor(self.catalyst)
        with torch.inference_mode(), pytest.MonkeyPatch.context() as mp:
            mp.setattr(infinipot, "LOGIT_ROWS", 64)  # NuC in several LM-head blocks
            nll[..., :100], last = infinipot.fill(model, cache, torch.tensor(self.stream[:100]), 0, None)
            nll[..., 100:], _ = infinipot.fill(model, cache, torch.tensor(self.stream[100:M]), 100, last)
            self.cap = infinipot.cap_scores(model, cache, catalyst, M)
            self.lens_after_catalyst = cache.lens.clone()
            self.raw, self.v, self.nll = cache.k_raw[:, 0, :, :M].clone(), cache.v[:, 0, :, :M].clone(), nll.clone()
            self.keep = infinipot.distil(model, cache, nll, catalyst, C, self.T)
        self.nll_after = nll


@pytest.fixture(scope="module")
def distilled(setup):
    return Distilled(setup)


def test_nuc_and_raw_keys_against_float64(distilled):
    d = distilled
    assert (d.nll[..., 0] == math.inf).all() and (d.nll == d.nll[0, 0]).all()  # one NuC per token, every head
    assert rel_err(d.nll[0, 0, 1:], d.nll64[1:]) <= TOL
    assert max(rel_err(d.raw[layer].transpose(0, 1), raw64) for layer, raw64 in enumerate(d.raw64)) <= TOL


def test_cap_scores_against_float64(distilled):
    assert rel_err(distilled.cap, distilled.cap64) <= TOL
    assert (distilled.lens_after_catalyst == M).all()  # the catalyst's K/V are dropped


def test_selection_against_float64(distilled):
    # measured: the scores at each cut differ by >= 1.4e-3 relative, float32 scores by <= 4e-5 from float64
    d = distilled
    assert torch.equal(d.keep, reference_selection(d.nll64.tolist(), d.cap64, d.T))


def test_compaction_re_rotates_raw_keys(distilled):
    d = distilled
    assert (d.cache.lens == C).all()
    index = d.keep[..., None].expand(-1, -1, -1, d.raw.shape[-1])
    rotated = torch.einsum("tij,lhtj->lhti", d.rot[:C], d.raw.gather(2, index).double())  # positions 0..C-1
    assert rel_err(d.cache.k[:, 0, :, :C], rotated) <= 1e-6
    assert torch.equal(d.cache.k_raw[:, 0, :, :C], d.raw.gather(2, index))
    assert torch.equal(d.cache.v[:, 0, :, :C], d.v.gather(2, index))
    assert torch.equal(d.nll_after[..., :C], d.nll.gather(-1, d.keep))


def test_prefill_after_one_distillation(setup, distilled):
    """The whole prefill: the same distillation, then M - C tokens and the question after the C kept
    entries, against float64 attending to the kept tokens' keys rotated at 0..C-1."""
    d = distilled
    result = run(setup, d.prompt)
    tail = d.stream[M:] + d.prompt.question
    assert result.stats["distillations"] == 1 and result.stats["evicted_tokens"] == M - C
    assert (result.cache.lens == C + len(tail)).all() and result.next_position == C + len(tail)
    assert torch.allclose(result.cache.k[..., :C, :], d.cache.k[..., :C, :], rtol=1e-5, atol=1e-5)  # same slots
    past = []
    for layer, r in enumerate(d.record):
        index = d.keep[layer].T[..., None].expand(-1, -1, r["v"].shape[-1])  # (C, H_kv, D)
        k = torch.einsum("tij,thj->thi", d.rot[:C], d.raw64[layer].gather(0, index))
        past.append((k, r["v"].gather(0, index)))
    reference = ref_forward(setup.w, setup.cfg, tail, list(range(C, C + len(tail))), past=past)
    assert rel_err(result.logits, reference[-1]) <= TOL


class PositionSpy:
    """The model, recording the positions of every forward."""

    def __init__(self, model):
        self.model, self.positions = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, tokens, positions, attend, observe=None):
        self.positions.append(positions[0].tolist())
        return self.model(tokens, positions, attend, observe)


@pytest.mark.parametrize("stream_len", [640, 1100, 2300])
def test_long_prompt_keeps_the_pot_bounded(setup, stream_len):
    """The fills are aligned to the end: a first fill of C + 1..M tokens, then M - C per distillation,
    so the final pot is the C kept entries and the M - C most recent tokens."""
    prompt = setup.prompt(stream_len)
    P, Q = len(setup.config.catalyst), len(prompt.question)
    spy = PositionSpy(setup.model)
    result = run(setup, prompt, model=spy)
    distillations = math.ceil((stream_len - M) / (M - C))
    first = stream_len - distillations * (M - C)
    assert C < first <= M and (first == M) == (stream_len == 640)
    assert result.stats["distillations"] == distillations
    assert result.stats["evicted_tokens"] == stream_len - M
    assert (result.cache.lens == M + Q).all() and result.next_position == M + Q
    assert result.cache.capacity == 512  # M + max(P, Q + 20) rounded up to 256, whatever the prompt's length
    forwards = [[first, first], [P, first + P], [M - C, M]]  # the first fill, then (catalyst, fill) per distillation
    forwards += [[P, M + P], [M - C, M]] * (distillations - 1)
    assert result.stats["forwards"] == forwards + [[Q, M + Q]]
    assert [[len(p), p[-1] + 1] for p in spy.positions] == result.stats["forwards"]  # slot == position
    assert all(p == list(range(p[0], p[-1] + 1)) for p in spy.positions)
    assert result.stats["scored_tokens"] == stream_len + 1
    tokens = greedy(setup.model, result.cache, result.logits, result.next_position, 5)
    assert (result.cache.lens == M + Q + 5).all() and len(tokens) == 5


def test_select_by_hand():
    nll = torch.tensor([math.inf, 5, 1, 3, 0, 2]).expand(1, 2, -1)
    cap = torch.tensor([[[0.0, 9, 8, 1, 7, 2], [0.0, 1, 2, 3, 9, 4]]])
    assert infinipot.select(nll, cap, 3, 1).tolist() == [[[0, 1, 2], [0, 4, 5]]]
    assert infinipot.select(nll, cap, 4, 2).tolist() == [[[0, 1, 2, 4], [0, 1, 4, 5]]]
    assert infinipot.select(nll, cap, 3, 0).tolist() == [[[0, 1, 2], [0, 4, 5]]]  # slot 0 kept by CaP too
    assert infinipot.select(nll, cap, 3, 3).tolist() == [[[0, 1, 3], [0, 1, 3]]]


def test_default_sizes(setup):
    prompt = setup.prompt(150)
    result = run(setup, prompt, InfiniPotConfig().prepared(setup.model, setup.tok.encode), answer_budget=100)
    P, Q = len(InfiniPotConfig().prepared(setup.model, setup.tok.encode).catalyst), len(prompt.question)
    assert P < Q + 100
    assert result.stats["pot_tokens"] == 512 - Q - 100 and result.stats["pot_keep"] == (512 - Q - 100) // 2


@pytest.mark.parametrize("fields, param", [
    (dict(pot_tokens=256, pot_keep=256), "pot_keep"),
    (dict(pot_tokens=256, pot_keep=0), "pot_keep"),
    (dict(pot_tokens=512), "pot_tokens"),
    (dict(pot_tokens=1), "pot_tokens"),
    (dict(nuc_ratio=1.5), "nuc_ratio"),
    (dict(nuc_ratio=-0.1), "nuc_ratio"),
    (dict(catalyst=""), "catalyst"),
    (dict(catalyst=()), "catalyst"),
])
def test_bad_options_validate(setup, fields, param):
    with pytest.raises(OptionError) as e:
        InfiniPotConfig(**fields).validate(setup.model.config)
    assert e.value.param == param and param in str(e.value)


@pytest.mark.parametrize("fields, answer_budget, question, param", [
    (dict(pot_tokens=480), 20, None, "pot_tokens"),  # + the 35-token catalyst > 512
    (dict(pot_tokens=400), 120, None, "pot_tokens"),  # + question + answer > 512
    (dict(), 505, None, "max_new_tokens"),  # the question and the answer leave no pot
    (dict(pot_keep=490), 20, None, "pot_keep"),  # the default pot is smaller
    (dict(catalyst="question"), 20, [1], "catalyst"),  # no question to catalyse
])
def test_bad_options_prefill(setup, fields, answer_budget, question, param):
    config = InfiniPotConfig(**fields).prepared(setup.model, setup.tok.encode)
    with pytest.raises(OptionError) as e:
        run(setup, setup.prompt(100, question), config, answer_budget)
    assert e.value.param == param and param in str(e.value)


def test_progress_counts_the_fills_of_the_pot(setup):
    """1100 stream tokens through M = 256, C = 128: 256, then 128 per fill -> 1 + ceil(844 / 128) = 8 fills."""
    calls = []
    prompt = setup.prompt(1100)
    n = len(prompt.head) + len(prompt.context)
    with torch.inference_mode():
        infinipot.prefill(setup.model, prompt, setup.config, 8, lambda done, total: calls.append((done, total)))
    expected = 1 + -(-(n - M) // (M - C))
    assert calls == [(i, expected) for i in range(1, expected + 1)]
