"""parallelcomp.py against hand-computed layouts and the float64 reference forward (tests/reference.py).

stories260K (a real Llama with BOS, trained on 512 tokens) is the model; contexts of a few hundred
tokens cut into 150-token chunks make every step visible: chunk scores, which chunks survive,
where each kept token lands in the assembled cache, the positions of the question, and what KV
eviction and calibration remove. chunk_spans is also checked on any lengths and breaks (hypothesis).
"""

import gc
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import parallelcomp
from conftest import BOOKS, STORIES, Stories
from engine import Engine
from parallelcomp import Calibration, ChunkCache, ParallelCompConfig, chunk_spans
from prefill import Prompt
from reference import ref_forward, rel_err

TOL = 1e-5


class Setup(Stories):
    def __init__(self):
        super().__init__()
        text = (BOOKS / "frankenstein.txt").read_text()[20000:26000]
        self.context = self.tok.encode(text)[:607]  # 4 chunks of 151-152 tokens at chunk_tokens=152
        self.head = [1] + self.tok.encode("Read the story.")
        self.question = [1] + self.tok.encode("What did the monster see?")
        self.spans = chunk_spans(len(self.context), 152)
        self.prompt = Prompt(self.head, self.context, self.question, bos_id=1, eos_ids=frozenset({2}))

    def chunk_input(self, span):
        return self.head + self.context[span.start:span.stop] + self.question

    def reference_chunk(self, span):
        """Float64 logits of one chunk alone at positions 0..L-1, and its per-layer q, k, v."""
        ids, record = self.chunk_input(span), []
        return ref_forward(self.w, self.cfg, ids, list(range(len(ids))), record=record), record

    def reference_nll(self, logits, span):
        start = len(self.head) + len(span) - 1
        predicted = logits[start:start + len(self.question)]
        return F.cross_entropy(predicted, torch.tensor(self.question), reduction="sum").item() / (len(self.question) - 1)


@pytest.fixture(scope="module")
def setup():
    return Setup()


@pytest.fixture(scope="module")
def references(setup):
    return [setup.reference_chunk(s) for s in setup.spans]


def run_prefill(setup, config, answer_budget=4):
    with torch.inference_mode():
        return parallelcomp.prefill(setup.model, setup.prompt, config, answer_budget)


def lowest_nll(setup, references, k):
    nll = [setup.reference_nll(logits, s) for (logits, _), s in zip(references, setup.spans)]
    return sorted(sorted(range(len(nll)), key=lambda j: (nll[j], -j))[:k])


# ---------------------------------------------------------------------------- chunking

def test_chunk_spans_by_hand():
    assert chunk_spans(607, 152) == [range(0, 151), range(151, 303), range(303, 455), range(455, 607)]
    assert chunk_spans(600, 150) == [range(0, 150), range(150, 300), range(300, 450), range(450, 600)]
    assert chunk_spans(10, 100) == [range(0, 10)]
    assert chunk_spans(7, 2) == [range(0, 1), range(1, 3), range(3, 5), range(5, 7)]


@given(n_tokens=st.integers(1, 100_000), chunk_tokens=st.integers(1, 10_000))
def test_chunks_cover_the_context_once_in_order_within_budget(n_tokens, chunk_tokens):
    spans = chunk_spans(n_tokens, chunk_tokens)
    assert spans[0].start == 0 and spans[-1].stop == n_tokens
    assert all(a.stop == b.start for a, b in zip(spans, spans[1:]))  # contiguous: each token once, in order
    assert all(span.step == 1 for span in spans)
    assert len(spans) == math.ceil(n_tokens / chunk_tokens)
    lengths = [len(span) for span in spans]
    assert 1 <= min(lengths) and max(lengths) <= chunk_tokens
    assert max(lengths) - min(lengths) <= 1


def test_chunk_spans_at_breaks_by_hand():
    # 4 chunks (of at most 30 - 30 // 16 = 29), even cuts 25, 50, 75; cut 2 may fall in [40, 54] (chunk 2 <= 30 tokens, chunks 3-4 <= 60), cut 3 only at 70
    breaks = [10, 20, 24, 26, 40, 55, 70, 90]
    assert chunk_spans(100, 30, breaks) == [range(0, 24), range(24, 40), range(40, 70), range(70, 100)]
    assert chunk_spans(100, 30, [33, 66]) == [range(0, 25), range(25, 50), range(50, 75), range(75, 100)]  # out of reach
    assert chunk_spans(100, 30, list(range(100))) == chunk_spans(100, 30)  # every token a break: the even cuts
    assert chunk_spans(30, 30, [10, 20]) == [range(0, 30)]  # no cut, no room needed
    assert len(chunk_spans(59, 30, [])) == 3 and len(chunk_spans(59, 30)) == 2  # sized for 29, room for the cuts


@given(n_tokens=st.integers(1, 5_000), chunk_tokens=st.integers(1, 1_000), data=st.data())
def test_cuts_fall_on_the_nearest_reachable_break(n_tokens, chunk_tokens, data):
    breaks = sorted(data.draw(st.sets(st.integers(1, n_tokens - 1), max_size=60)) if n_tokens > 1 else ())
    spans = chunk_spans(n_tokens, chunk_tokens, breaks)
    n = math.ceil(n_tokens / (chunk_tokens - chunk_tokens // 16))  # room for the cuts to move ...
    n = 1 if n_tokens <= chunk_tokens else n  # ... where there are cuts
    assert len(spans) == n and spans[0].start == 0 and spans[-1].stop == n_tokens
    assert all(a.stop == b.start for a, b in zip(spans, spans[1:]))
    assert all(1 <= len(span) <= chunk_tokens for span in spans)
    for i, span in enumerate(spans[1:], 1):
        prev, cut = span.start - len(spans[i - 1]), span.start
        reachable = [b for b in breaks  # this chunk fits, and the rest fit in n - i non-empty chunks
                     if 0 < b - prev <= chunk_tokens and n - i <= n_tokens - b <= (n - i) * chunk_tokens]
        even = min(max(i * n_tokens // n, n_tokens - (n - i) * chunk_tokens, prev + 1), prev + chunk_tokens)
        if reachable:
            assert cut in reachable and abs(cut - even) == min(abs(b - even) for b in reachable)
        else:
            assert cut == even


def test_sentence_cuts_keep_sentences_whole():
    """cut_at=sentence through the engine: every chunk of a story (2,214 stories260K tokens, a line
    or sentence end every ~30) ends where a sentence or a line does; the cuts by token do not."""
    engine = Engine(STORIES, "cpu")
    story = (BOOKS / "frankenstein.txt").read_text()[20000:24000]
    ends = set()
    for cut_at in ("token", "sentence"):
        config = ParallelCompConfig(chunk_tokens=400, top_k_chunks=100, cut_at=cut_at)
        out = engine.generate(story, "What did the monster see?", method="parallelcomp", config=config, max_new_tokens=1)
        prompt = engine.layout(story, "\n\nWhat did the monster see?")
        last = [engine.tokenizer.decode(prompt.context[stop - 1:stop]) for _, stop in out.stats["kept_spans"][:-1]]
        ends.add(all(t.rstrip(" ").endswith((".", "!", "?")) or "\n" in t for t in last))
        size = 400 - 400 // 16 * (cut_at == "sentence")
        assert out.stats["chunks"] == len(out.stats["kept_spans"]) == math.ceil(len(prompt.context) / size)
    assert ends == {False, True}


def test_empty_context_is_one_empty_chunk():
    assert chunk_spans(0, 5) == [range(0, 0)]  # ParallelComp still has a chunk (the head) to rank


def test_chunk_scores_equal_independent_nll(setup, references):
    """Batched, right-padded chunk prefill: each chunk's score equals the question's NLL from a
    float64 forward of that chunk alone, summed and divided by (Lq - 1)."""
    assert len({len(s) for s in setup.spans}) == 2, "chunks of unequal length exercise the padding"
    with torch.inference_mode():
        chunks = parallelcomp.encode_chunks(setup.model, setup.prompt, setup.spans, range(4), None)
    for chunk, (logits, _), span in zip(chunks, references, setup.spans):
        assert chunk.nll == pytest.approx(setup.reference_nll(logits, span), rel=TOL)
    assert len({round(c.nll, 3) for c in chunks}) == len(chunks), "distinct scores make the ranking meaningful"


# Under --chat the question block ends with the template's end of turn (an EOS): ParallelComp scores
# the question, not the end of turn. The code before the redesign (4f7e147) had query_nll(logits,
# targets) with no eos_ids and scored every target, so both tests below fail there.

def test_query_nll_skips_end_of_turn_targets():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 11, generator=g) * 3
    targets = [1, 7, 4, 2, 9, 2]  # EOS 2 twice
    nll = [-torch.log_softmax(logits[i].double(), 0)[t].item() for i, t in enumerate(targets)]
    # the sum over the non-EOS targets divided by Lq - 1 = 5 (the first target is the question's BOS)
    expected = (nll[0] + nll[1] + nll[2] + nll[4]) / 5
    assert parallelcomp.query_nll(logits, torch.tensor(targets), frozenset({2})) == pytest.approx(expected, rel=1e-6)
    assert parallelcomp.query_nll(logits, torch.tensor(targets)) == pytest.approx(sum(nll) / 5, rel=1e-6)


def test_chunk_scores_ignore_the_questions_end_of_turn(setup):
    """encode_chunks passes prompt.eos_ids: a question ending with EOS scores as the float64 NLL of
    its other tokens."""
    question = setup.question + [2]
    prompt = Prompt(setup.head, setup.context[:60], question, bos_id=1, eos_ids=frozenset({2}))
    ids = prompt.ids()
    logits = ref_forward(setup.w, setup.cfg, ids, list(range(len(ids))))
    start = len(setup.head) + 60 - 1
    nll = F.cross_entropy(logits[start:start + len(question)], torch.tensor(question), reduction="none")
    with torch.inference_mode():
        [chunk] = parallelcomp.encode_chunks(setup.model, prompt, [range(0, 60)], [0], None)
    assert chunk.nll == pytest.approx(nll[:-1].sum().item() / (len(question) - 1), rel=TOL)
    assert nll[-1] > 0.1 * nll[:-1].sum(), "scoring the EOS would change the NLL by more than the tolerance"


# ---------------------------------------------------------------------------- assembly and the query pass

def test_assembled_cache_and_query_pass_match_reference(setup, references):
    """k = 2 of 4 chunks: the kept chunks are the two lowest-NLL ones in document order; the cache
    is the first kept chunk's [BOS head text] and the second's [head text] (BOS dropped), as the
    float64 forward of each chunk alone computed them; S = sum Lc - (k - 1); the question goes at
    positions M..M+Lq-1 (M = the longest kept chunk) and attends to all of it with one softmax."""
    res = run_prefill(setup, ParallelCompConfig(chunk_tokens=152, top_k_chunks=2))
    kept = lowest_nll(setup, references, 2)
    assert res.stats["kept_chunks"] == kept
    assert res.stats["kept_spans"] == [[setup.spans[j].start, setup.spans[j].stop] for j in kept]
    Lc = [len(setup.head) + len(setup.spans[j]) for j in kept]
    Lq = len(setup.question)
    S = Lc[0] + Lc[1] - 1
    M = max(Lc)
    assert res.stats["chunks"] == 4
    assert res.stats["kv_evicted_tokens"] == res.stats["calibration_evicted_tokens"] == 0
    assert res.cache.lens.tolist() == [S + Lq] * setup.cfg["num_hidden_layers"]
    assert res.next_position == M + Lq

    past = []
    for layer in range(setup.cfg["num_hidden_layers"]):
        first, second = (references[j][1][layer] for j in kept)
        k = torch.cat([first["k"][:Lc[0]], second["k"][1:Lc[1]]])  # (S, H_kv, d)
        v = torch.cat([first["v"][:Lc[0]], second["v"][1:Lc[1]]])
        past.append((k, v))
        assert rel_err(res.cache.k[layer, 0, :, :S].transpose(0, 1), k) <= TOL
        assert rel_err(res.cache.v[layer, 0, :, :S].transpose(0, 1), v) <= TOL
    record = []
    logits = ref_forward(setup.w, setup.cfg, setup.question, list(range(M, M + Lq)), past=past, record=record)
    assert rel_err(res.logits, logits[-1]) <= TOL
    for layer, r in enumerate(record):
        assert rel_err(res.cache.k[layer, 0, :, S:S + Lq].transpose(0, 1), r["k"]) <= TOL


def test_top_k_at_least_n_keeps_every_chunk(setup):
    res = run_prefill(setup, ParallelCompConfig(chunk_tokens=152, top_k_chunks=5))
    assert res.stats["kept_chunks"] == [0, 1, 2, 3]
    S = sum(len(setup.head) + len(s) for s in setup.spans) - 3
    assert res.cache.lens[0].item() == S + len(setup.question)


def test_chunk_eviction_ties_keep_the_later_chunk():
    chunks = [ChunkCache(j, range(0), 0, False, None, None, nll) for j, nll in enumerate([2.0, 1.0, 2.0, 3.0])]
    assert [c.index for c in parallelcomp.chunk_eviction(chunks, 2)] == [1, 2]


def test_one_chunk_gives_the_tokens_of_plain_inference():
    """A prompt that fits one chunk: ParallelComp's prefill then decode equals plain inference on
    the same [BOS instruction context][BOS question] layout."""
    engine = Engine(STORIES, "cpu")
    story = "Once upon a time, there was a little girl named Lily. She loved to play in the park with her dog. " * 3
    kwargs = dict(instruction="Read the story.\n", max_new_tokens=40)
    plain = engine.generate(story, "Lily", method="full", **kwargs)
    ours = engine.generate(story, "Lily", method="parallelcomp", **kwargs)
    assert ours.stats["chunks"] == 1 and ours.stats["method"] == "parallelcomp"
    assert ours.tokens == plain.tokens and len(ours.tokens) > 10


# ---------------------------------------------------------------------------- parallel KV-cache eviction

def independent_eviction(q_obs, keys, candidates, budget, pool=7):
    """The SnapKV-style selection, written out: q_obs (W, H, d) at the last W positions, keys
    (L, H_kv, d); per KV head the top `budget` candidates by max-pooled summed attention."""
    W, H, d = q_obs.shape
    L, Hkv = keys.shape[:2]
    group = H // Hkv
    kept = []
    for kv in range(Hkv):
        score = torch.zeros(L, dtype=torch.float64)
        for head in range(kv * group, (kv + 1) * group):
            for w in range(W):
                visible = L - W + w + 1
                s = keys[:visible, kv].double() @ q_obs[w, head].double() / math.sqrt(d)
                score[:visible] += torch.softmax(s, 0) / group
        cand = score[candidates.start:candidates.stop]
        pooled = torch.stack([cand[max(0, i - pool // 2):i + pool // 2 + 1].max() for i in range(len(cand))])
        top = sorted(pooled.topk(budget).indices.tolist())
        kept.append([candidates.start + i for i in top])
    return kept


def test_kv_eviction_selects_the_top_n_of_an_independent_score():
    g = torch.Generator().manual_seed(0)
    H, Hkv, W, L, d = 6, 2, 8, 70, 16
    q = torch.randn(H, W, d, generator=g) * 2
    k = torch.randn(Hkv, L, d, generator=g) * 2
    got = parallelcomp.kv_eviction(q, k, range(1, 55), 12)
    assert got.shape == (Hkv, 12)
    assert got.tolist() == independent_eviction(q.transpose(0, 1), k.transpose(0, 1), range(1, 55), 12)


def test_kv_eviction_in_prefill_matches_reference(setup, references):
    """kv_budget = 40: each kept chunk stores BOS + exactly 40 context tokens per KV head, the top 40
    of the float64 score; the query pass over that thinned cache matches the float64 forward."""
    budget, k_chunks = 40, 2
    res = run_prefill(setup, ParallelCompConfig(chunk_tokens=152, top_k_chunks=k_chunks, kv_budget=budget))
    kept = lowest_nll(setup, references, k_chunks)
    assert res.stats["kept_chunks"] == kept, "KV eviction happens after scoring: the ranking is unchanged"
    Lq, S = len(setup.question), (budget + 1) + budget * (k_chunks - 1)
    assert res.cache.lens.tolist() == [S + Lq] * setup.cfg["num_hidden_layers"]
    assert res.stats["kv_evicted_tokens"] == sum(len(setup.head) + len(setup.spans[j]) - 1 - budget for j in kept)
    assert res.stats["calibration_evicted_tokens"] == 0
    past = []
    for layer in range(setup.cfg["num_hidden_layers"]):
        ks, vs = [], []
        for r, j in enumerate(kept):
            rec = references[j][1][layer]
            L = len(setup.chunk_input(setup.spans[j]))
            Lc = len(setup.head) + len(setup.spans[j])
            picks = independent_eviction(rec["q"][L - 8:L], rec["k"][:L], range(1, Lc), budget)
            index = torch.tensor([([0] if r == 0 else []) + p for p in picks])  # (H_kv, n)
            ks.append(torch.stack([rec["k"][index[h], h] for h in range(len(picks))], 1))
            vs.append(torch.stack([rec["v"][index[h], h] for h in range(len(picks))], 1))
        past.append((torch.cat(ks), torch.cat(vs)))
        assert rel_err(res.cache.k[layer, 0, :, :S].transpose(0, 1), past[-1][0]) <= TOL
    M = max(len(setup.head) + len(setup.spans[j]) for j in kept)  # uncompressed lengths
    assert res.next_position == M + Lq
    logits = ref_forward(setup.w, setup.cfg, setup.question, list(range(M, M + Lq)), past=past)
    assert rel_err(res.logits, logits[-1]) <= TOL


# ---------------------------------------------------------------------------- attention calibration

def independent_calibration(q_last, keys, cal, group):
    """Expected evictions of one layer: per KV head, the region's tokens whose attention from the
    last question token exceeds the threshold for any head of its group, topped up with the
    least-attended tokens (group mean) to the largest such count. q_last (H, d), keys (N, H_kv, d)."""
    N, Hkv, d = keys.shape
    probs = torch.stack([torch.softmax(keys[:, h // group].double() @ q_last[h].double() / math.sqrt(d), 0)
                         for h in range(q_last.shape[0])]).view(Hkv, group, N)
    in_region = {"sink": lambda t: t < cal.width, "recent": lambda t: t >= N - cal.width,
                 "middle": lambda t: cal.width <= t < N - cal.width, "all": lambda t: True}[cal.region]
    above = [{t for t in range(N) if in_region(t) and (probs[h, :, t] > cal.threshold).any()} for h in range(Hkv)]
    m = max(len(a) for a in above)
    evicted = []
    for h in range(Hkv):
        rest = sorted((t for t in range(N) if t not in above[h]), key=lambda t: probs[h, :, t].mean().item())
        evicted.append(above[h] | set(rest[:m - len(above[h])]))
    return evicted, m


def test_calibration_spec():
    assert Calibration.parse("sink:3-6") == Calibration("sink", 3, 6, threshold=0.1, width=100)
    for bad in ("sink", "sink:6-3", "edge:1-2", "sink:1-x", "sink:1-2-3"):
        with pytest.raises(ValueError, match="REGION:FIRST-LAST"):
            Calibration.parse(bad)


# stories260K's last question token attends mostly to recent tokens (no BOS sink): thresholds
# chosen so that every region has tokens above them
@pytest.mark.parametrize("cal", [Calibration("sink", 1, 3, threshold=0.01), Calibration("all", 0, 4),
                                 Calibration("middle", 1, 3, threshold=0.05), Calibration("recent", 2, 2)],
                         ids=lambda c: f"{c.region}:{c.first_layer}-{c.last_layer}@{c.threshold}")
def test_calibration_evicts_exactly_the_expected_tokens_in_chosen_layers(setup, cal):
    config = ParallelCompConfig(chunk_tokens=152, top_k_chunks=2)
    model, Lq = setup.model, len(setup.question)
    with torch.inference_mode():
        chunks = parallelcomp.encode_chunks(model, setup.prompt, setup.spans, range(4), None)
        kept = sorted(parallelcomp.chunk_eviction(chunks, config.top_k_chunks), key=lambda c: c.index)
        cache, S = parallelcomp.assemble_cache(model.config, kept, Lq + 4)
        M = max(c.context_len for c in kept)
        query = parallelcomp.QueryPass(cache, S, cal)
        seen = {}

        def attend(layer, q, k, v):  # what each layer held before the query pass touched it
            seen[layer] = (q[0, :, -1].clone(), torch.cat([cache.k[layer, 0, :, :S], k[0]], 1).transpose(0, 1).clone())
            return query(layer, q, k, v)

        model(torch.tensor([setup.question]), torch.arange(M, M + Lq)[None], attend)
    N = S + Lq
    group = model.config.n_heads // model.config.n_kv_heads
    total = 0
    for layer, (q_last, keys) in seen.items():
        if not cal.first_layer <= layer <= cal.last_layer:
            assert cache.lens[layer].item() == N
            assert torch.equal(cache.k[layer, 0, :, :N].transpose(0, 1), keys)
            continue
        evicted, m = independent_calibration(q_last, keys, cal, group)
        total += m
        assert cache.lens[layer].item() == N - m
        for h in range(model.config.n_kv_heads):
            keep = [t for t in range(N) if t not in evicted[h]]
            assert torch.equal(cache.k[layer, 0, h, :N - m], keys[keep, h])
    assert query.evicted == total
    assert total > 0, "tokens above the threshold exist: the test exercises eviction"


def test_decoding_after_calibration_sees_each_layers_own_cache(setup):
    """After calibration the layers hold different lengths; a decoded token attends, in each layer,
    to exactly that layer's kept tokens plus itself (float64 forward with those caches as past)."""
    res = run_prefill(setup, ParallelCompConfig(chunk_tokens=152, top_k_chunks=2, calibration=Calibration("all", 1, 3)))
    lens = res.cache.lens.tolist()
    assert len(set(lens)) > 1
    past = [(res.cache.k[l, 0, :, :n].transpose(0, 1).double(), res.cache.v[l, 0, :, :n].transpose(0, 1).double())
            for l, n in enumerate(lens)]
    token = int(res.logits.argmax())
    with torch.inference_mode():
        hidden = setup.model(torch.tensor([[token]]), torch.tensor([[res.next_position]]), res.cache.decode_attend)
        logits = setup.model.logits(hidden)[0, 0]
    assert res.cache.lens.tolist() == [n + 1 for n in lens]
    expected = ref_forward(setup.w, setup.cfg, [token], [res.next_position], past=past)[0]
    assert rel_err(logits, expected) <= TOL


def test_kv_and_calibration_evictions_are_reported_apart(setup):
    """With both KV eviction and calibration: kv_evicted_tokens counts, per KV head, the context
    tokens the budget dropped from the kept chunks (the same in every layer, so once), and
    calibration_evicted_tokens the cache entries calibration dropped, summed over its layers. The
    code before the redesign (4f7e147) reported their sum as one evicted_tokens."""
    budget, cal = 40, Calibration("all", 1, 3)
    res = run_prefill(setup, ParallelCompConfig(chunk_tokens=152, top_k_chunks=2, kv_budget=budget, calibration=cal))
    spans = res.stats["kept_spans"]
    assert len(spans) == 2
    # each kept chunk: BOS + head text + its span, of which BOS and `budget` tokens stay
    assert res.stats["kv_evicted_tokens"] == sum(len(setup.head) + (b - a) - 1 - budget for a, b in spans)
    N = (budget + 1) + budget + len(setup.question)  # the first chunk keeps its BOS, the second drops it
    lens = res.cache.lens.tolist()
    assert lens[0] == lens[4] == N  # layers outside 1..3 keep everything
    assert res.stats["calibration_evicted_tokens"] == sum(N - n for n in lens[1:4]) > 0


# ---------------------------------------------------------------------------- bounded memory

class CountingModel:
    """The model, counting the ChunkCaches alive (garbage collected first) at the end of each chunk
    batch's forward: the kept chunks plus the batch being encoded."""

    def __init__(self, model):
        self.model, self.config, self.logits = model, model.config, model.logits
        self.device, self.dtype = model.device, model.dtype
        self.live, self.batches = [], []

    def __call__(self, tokens, positions, attend):
        hidden = self.model(tokens, positions, attend)
        if isinstance(attend, parallelcomp.ChunkEncoder):
            gc.collect()
            self.live.append(sum(type(o) is ChunkCache for o in gc.get_objects()))
            self.batches.append(tokens.shape[0])
        return hidden


@pytest.mark.parametrize("n_chunks", [70, 140])
def test_live_chunk_caches_stay_bounded(setup, n_chunks, monkeypatch):
    """70 or 140 chunks of ~500 tokens: at most k + one batch of chunk caches is ever alive, the same
    bound whatever the number of chunks (MAX_BATCH_TOKENS caps the batch)."""
    monkeypatch.setattr(parallelcomp, "MAX_BATCH_TOKENS", 8192)  # smaller batches keep the test fast
    counting = CountingModel(setup.model)
    gen = torch.Generator().manual_seed(n_chunks)
    context = torch.randint(3, 512, (n_chunks * 480,), generator=gen).tolist()
    k = 3
    with torch.inference_mode():
        res = parallelcomp.prefill(counting, Prompt(setup.head, context, setup.question, bos_id=1),
                                   ParallelCompConfig(chunk_tokens=480, top_k_chunks=k), 4)
    assert res.stats["chunks"] == n_chunks and len(counting.batches) >= 4
    batch = max(counting.batches)
    assert batch < n_chunks / 4
    assert max(counting.live) <= k + batch
