"""locret.py against a float64 Locret written here on tests/reference.py's forward, hand-computed
labels and losses, and head files written by the test.

stories260K (a real Llama, window 512) with randomly initialised retaining heads: the mechanics,
not the heads' quality. A 408-token prompt: its first 308 tokens in 48-token chunks through a
96-entry cache make five evictions, each checked: what every layer and KV head keeps, the
stabilizers among it, the keys' positions, and in the end, after the last LOCAL_TOKENS tokens
(the end of the context and the question), the logits and the cache the decode loop gets.
"""

import copy
import math
import subprocess
import sys
from collections import OrderedDict
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

import locret
from checkpoint import CheckpointError
from conftest import BOOKS, REPO, STORIES, Stories
from locret import LocretConfig, RetainedCache, RetainingHeads, load_heads, save_heads
from model import build_model
from prefill import OptionError, Prompt, causal_prefill
from reference import ref_forward, ref_rotations, rel_err

TOL = 1e-5
BUDGET, CHUNK, STABILIZERS = 96, 48, 24
STREAM = 308  # prompt tokens before the uncompressed tail


class Setup(Stories):
    def __init__(self):
        super().__init__()
        self.config = self.model.config
        tok = self.tok
        text = (BOOKS / "frankenstein.txt").read_text()[20000:26000]
        head, question = [1] + tok.encode("Read the story."), [1] + tok.encode("What did the monster see?")
        context = tok.encode(text)[:STREAM + locret.LOCAL_TOKENS - len(head) - len(question)]
        self.prompt = Prompt(head, context, question, 1, frozenset({2}))
        torch.manual_seed(0)
        self.heads = RetainingHeads(self.config, 16).requires_grad_(False)
        self.heads64 = copy.deepcopy(self.heads).double()


@pytest.fixture(scope="module")
def s():
    return Setup()


# ---------------------------------------------------------------------------- the float64 Locret

def rotate(rows, cfg, positions, inverse=False):
    """RoPE of rows (T, heads, d) at positions, or its inverse, by tests/reference.py's matrices."""
    return torch.einsum("tji,thj->thi" if inverse else "tij,thj->thi", ref_rotations(cfg, list(positions)), rows)


def ref_head_scores(head, record, cfg, positions):
    """A retaining head in float64 on one layer's recorded q, k (rotated back) and v -> (T, H_kv)."""
    q, k = rotate(record["q"], cfg, positions, True), rotate(record["k"], cfg, positions, True)
    x = torch.cat([q.flatten(1), k.flatten(1), record["v"].flatten(1)], dim=1)  # [q | k | v]
    h = x @ head.fc1.weight.T
    return (h / (1 + torch.exp(-h))) @ head.fc2.weight.T


def ref_locret(s, stream, tail):
    """Locret's prefill of stream + tail in float64: the prompt indices each layer and KV head keeps
    after every chunk ((L, H_kv, n) each), the final past (rotated K, V per layer) and the tail's
    logits and record."""
    L, Hkv, d = s.config.n_layers, s.config.n_kv_heads, s.config.head_dim
    raw_k = [torch.zeros(0, Hkv, d, dtype=torch.float64)] * L
    v, score = list(raw_k), [torch.zeros(0, Hkv, dtype=torch.float64)] * L
    origin = [torch.zeros(0, Hkv, dtype=torch.long)] * L
    kept = []
    for start in range(0, len(stream), CHUNK):
        piece, n = stream[start:start + CHUNK], raw_k[0].shape[0]
        positions, record = range(n, n + len(piece)), []
        past = [(rotate(raw_k[i], s.cfg, range(n)), v[i]) for i in range(L)] if n else None
        ref_forward(s.w, s.cfg, piece, list(positions), past=past, record=record)
        for i in range(L):
            raw_k[i] = torch.cat([raw_k[i], rotate(record[i]["k"], s.cfg, positions, True)])
            v[i] = torch.cat([v[i], record[i]["v"]])
            score[i] = torch.cat([score[i], ref_head_scores(s.heads64[i], record[i], s.cfg, positions)])
            origin[i] = torch.cat([origin[i], torch.arange(start, start + len(piece))[:, None].expand(-1, Hkv)])
            if raw_k[i].shape[0] > BUDGET:
                # ranked in float32 as the module ranks: in the first layer equal tokens score
                # equal, here only up to the rounding of RoPE undone in float64
                ranked = score[i].float()
                if start + CHUNK < len(stream):
                    ranked[len(ranked) - STABILIZERS:] = math.inf
                # the B best, on a tie the later token: (B, H_kv)
                keep = ranked.argsort(dim=0, stable=True)[len(ranked) - BUDGET:].sort(dim=0).values
                rows = keep[..., None].expand(-1, -1, d)
                raw_k[i], v[i] = raw_k[i].gather(0, rows), v[i].gather(0, rows)
                score[i], origin[i] = score[i].gather(0, keep), origin[i].gather(0, keep)
        kept.append(torch.stack([o.T for o in origin]))
    n, record = raw_k[0].shape[0], []
    past = [(rotate(raw_k[i], s.cfg, range(n)), v[i]) for i in range(L)]
    logits = ref_forward(s.w, s.cfg, tail, list(range(n, n + len(tail))), past=past, record=record)
    return kept, past, logits[-1], record


@pytest.fixture(scope="module")
def ref(s):
    ids = s.prompt.ids()
    return ref_locret(s, ids[:STREAM], ids[STREAM:])


def config(s, **overrides):
    return LocretConfig(**dict(budget=BUDGET, locret_chunk=CHUNK, stabilizers=STABILIZERS,
                               retaining_heads=s.heads) | overrides)


# ---------------------------------------------------------------------------- prefill

def test_budget_at_least_the_prompt_is_plain_prefill(s):
    ids = s.prompt.ids()
    cfg = config(s, budget=400)
    cfg.validate(s.config)
    got = locret.prefill(s.model, s.prompt, cfg, 8)
    cache, logits = causal_prefill(s.model, ids, 8)
    N = len(ids)
    assert rel_err(got.logits, logits) <= TOL
    assert rel_err(got.logits, ref_forward(s.w, s.cfg, ids, list(range(N)))[-1]) <= TOL
    for a, b in ((got.cache.k, cache.k), (got.cache.v, cache.v)):
        assert rel_err(a[:, :, :, :N], b[:, :, :, :N]) <= TOL
    assert got.next_position == N and got.cache.lens.tolist() == [N] * s.config.n_layers
    assert got.cache.capacity >= N + 8
    assert got.stats["compressions"] == 0 and got.stats["evicted_tokens"] == 0


def test_every_chunk_keeps_the_budget_the_stabilizers_and_contiguous_keys(s, ref):
    stream = s.prompt.ids()[:STREAM]
    cache = RetainedCache(s.model, s.heads, BUDGET + CHUNK, locret.LOCAL_TOKENS)
    starts = range(0, len(stream), CHUNK)
    assert len(starts) == 7
    for i, start in enumerate(starts):
        cache.append(stream[start:start + CHUNK])
        more = i + 1 < len(starts)
        assert cache.evict(BUDGET, STABILIZERS if more else 0) == (cache.seen > BUDGET)
        n = min(BUDGET, cache.seen)
        assert cache.n == n and cache.kv.lens.tolist() == [n] * s.config.n_layers
        kept = cache.origin[..., :n]
        assert torch.equal(kept, ref[0][i])
        assert (kept.diff(dim=-1) > 0).all()
        if more:  # the last n_s tokens seen are kept: sorted, they are the last n_s entries
            last = torch.arange(cache.seen - STABILIZERS, cache.seen)
            assert torch.equal(kept[..., n - STABILIZERS:], last.expand(*kept.shape[:2], -1))
        raw = cache.kv.k_raw[:, 0, :, :n].double()  # (L, H_kv, n, d)
        rotated = torch.stack([rotate(r.transpose(0, 1), s.cfg, range(n)).transpose(0, 1) for r in raw])
        assert rel_err(cache.kv.k[:, 0, :, :n], rotated) <= 1e-6


def test_prefill_with_eviction_matches_the_float64_locret(s, ref):
    _, past, logits, record = ref
    got = locret.prefill(s.model, s.prompt, config(s), 8)
    q = locret.LOCAL_TOKENS  # a short question: the tail is the last LOCAL_TOKENS tokens
    assert rel_err(got.logits, logits) <= TOL
    assert got.next_position == BUDGET + q and got.cache.lens.tolist() == [BUDGET + q] * s.config.n_layers
    for i, (k, v) in enumerate(past):
        assert rel_err(got.cache.k[i, 0, :, :BUDGET], k.transpose(0, 1)) <= TOL
        assert rel_err(got.cache.v[i, 0, :, :BUDGET], v.transpose(0, 1)) <= TOL
        # the tail is never evicted: all of it follows the kept context, at positions B..
        assert rel_err(got.cache.k[i, 0, :, BUDGET:BUDGET + q], record[i]["k"].transpose(0, 1)) <= TOL
    assert got.stats["forwards"] == [[48, 48], [48, 96], [48, 144], [48, 144], [48, 144], [48, 144],
                                     [20, 116], [q, BUDGET + q]]
    assert got.stats["compressions"] == 5 and got.stats["evicted_tokens"] == STREAM - BUDGET
    assert got.stats["kept_tokens"] == BUDGET + q and got.cache.k_raw is None


def test_a_question_longer_than_the_local_tokens_is_the_tail(s):
    question = s.prompt.context[-locret.LOCAL_TOKENS - 20:]
    prompt = replace(s.prompt, context=s.prompt.context[:-len(question)], question=question)
    got = locret.prefill(s.model, prompt, config(s), 4)
    stream = len(prompt.ids()) - len(question)
    assert got.stats["forwards"][-1] == [len(question), BUDGET + len(question)]
    assert got.stats["evicted_tokens"] == stream - BUDGET


def test_without_a_question_the_last_tokens_are_the_tail(s):
    prompt = replace(s.prompt, question=[])
    got = locret.prefill(s.model, prompt, config(s), 4)
    stream = len(prompt.ids()) - locret.LOCAL_TOKENS
    assert got.next_position == BUDGET + locret.LOCAL_TOKENS
    assert got.stats["forwards"][-1] == [locret.LOCAL_TOKENS, BUDGET + locret.LOCAL_TOKENS]
    assert got.stats["evicted_tokens"] == stream - BUDGET


# ---------------------------------------------------------------------------- labels and loss

def ref_labels(q, k):
    """q (H, A, d), k (H_kv, T, d) float64 -> (H_kv, T): max over group heads and answer rows of q·k/sqrt(d)."""
    H, A, d = q.shape
    Hkv, T = k.shape[:2]
    out = torch.full((Hkv, T), -math.inf, dtype=torch.float64)
    for h in range(H):
        j = h // (H // Hkv)
        for a in range(A):
            for t in range(T):
                out[j, t] = max(out[j, t], float(q[h, a] @ k[j, t]) / math.sqrt(d))
    return out


def test_retention_labels_against_loops():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 6, 3, 8, generator=g), torch.randn(2, 2, 7, 8, generator=g)
    got = locret.retention_labels(q, k)
    assert got.shape == (2, 2, 7) and got.dtype == torch.float32
    for b in range(2):
        assert (got[b].double() - ref_labels(q[b].double(), k[b].double())).abs().max() <= 1e-5


def test_scores_and_labels_of_a_forward_against_the_reference(s):
    ids = s.prompt.context[:50]
    prefix, answer = ids[:40], ids[40:]
    scores, labels = locret.scores_and_labels(s.model, s.heads, prefix, answer)
    record = []
    ref_forward(s.w, s.cfg, ids, list(range(50)), record=record)
    for i, r in enumerate(record):
        expected = ref_labels(r["q"][40:].transpose(0, 1), r["k"][:40].transpose(0, 1))
        assert rel_err(labels[i], expected) <= TOL
        assert rel_err(scores[i], ref_head_scores(s.heads64[i], r, s.cfg, range(50))[:40].T) <= TOL


def test_retention_loss_on_a_hand_computed_example():
    scores = [[0.0, 1.0, 3.0], [2.0, 2.0, 0.0]]  # (L = 2, H_kv = 1, T = 3)
    labels = [[0.5, 1.0, 0.0], [2.0, 4.0, 0.5]]
    # SmoothL1 of the differences -0.5, 0, 3, 0, -2, -0.5: 0.125, 0, 2.5, 0, 1.5, 0.125 -> mean 4.25 / 6;
    # neighbour differences: layer 0: 1, 2 -> mean square 2.5; layer 1: 0, -2 -> 2; sum 4.5
    fit_and_smooth = 4.25 / 6 + 0.0025 * 4.5

    def cross_entropy(label, score):  # -sum_t softmax(label)_t log softmax(score)_t
        p = [math.exp(x) / sum(map(math.exp, label)) for x in label]
        log_z = math.log(sum(map(math.exp, score)))
        return -sum(p_t * (s_t - log_z) for p_t, s_t in zip(p, score))

    ranking = (cross_entropy(labels[0], scores[0]) + cross_entropy(labels[1], scores[1])) / 2
    loss = locret.retention_loss(torch.tensor(scores)[:, None], torch.tensor(labels)[:, None])
    assert loss.item() == pytest.approx(fit_and_smooth + ranking, rel=1e-6)
    assert ranking == pytest.approx(1.457418, abs=1e-6)  # 2.104394 and 0.810441, worked by hand


# ---------------------------------------------------------------------------- head files

def published(config, hidden=8, layers=None, prefix="model.", seed=0):
    g = torch.Generator().manual_seed(seed)
    width = (config.n_heads + 2 * config.n_kv_heads) * config.head_dim
    state = OrderedDict()
    for i in range(config.n_layers if layers is None else layers):
        state[f"{prefix}layers.{i}.self_attn.fc1.weight"] = torch.randn(hidden, width, generator=g).bfloat16()
        state[f"{prefix}layers.{i}.self_attn.fc2.weight"] = torch.randn(
            config.n_kv_heads, hidden, generator=g).bfloat16()
    return state


def load_error(path, config):
    with pytest.raises(CheckpointError) as e:
        load_heads(path, config)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("prefix", ["model.", ""])
def test_a_locret_bin_loads(s, tmp_path, prefix):
    state = published(s.config, prefix=prefix)
    torch.save(state, tmp_path / "heads.bin")
    heads = load_heads(tmp_path / "heads.bin", s.config)
    assert heads[3].fc1.weight.shape == (8, 128) and not heads[3].fc1.weight.requires_grad
    assert torch.equal(heads[3].fc2.weight, state[f"{prefix}layers.3.self_attn.fc2.weight"].float())


def test_broken_head_files_name_the_tensor(s, tmp_path):
    path = tmp_path / "heads.bin"
    state = published(s.config)
    state["model.layers.2.self_attn.fc2.weight"] = torch.zeros(3, 8)
    torch.save(state, path)
    assert "model.layers.2.self_attn.fc2.weight has shape (3, 8), expected (4, 8)" in load_error(path, s.config)
    state = published(s.config)
    del state["model.layers.3.self_attn.fc1.weight"], state["model.layers.3.self_attn.fc2.weight"]
    torch.save(state, path)
    assert "missing tensor model.layers.3.self_attn.fc1.weight" in load_error(path, s.config)
    other = replace(s.config, n_heads=4, n_kv_heads=2)  # another model's heads: 64 inputs, not 128
    torch.save(published(other), path)
    assert "model.layers.0.self_attn.fc1.weight has shape (8, 64), expected (8, 128)" in load_error(path, s.config)
    torch.save(published(s.config, layers=6), path)
    assert "model.layers.5.self_attn.fc1.weight is for a layer" in load_error(path, s.config)
    torch.save(OrderedDict(published(s.config), extra=torch.zeros(1)), path)
    assert "unexpected tensor extra" in load_error(path, s.config)
    path.write_bytes(b"not a pickle")
    assert "not a readable heads file" in load_error(path, s.config)
    assert "not found" in load_error(tmp_path / "absent.safetensors", s.config)


def test_saved_heads_load_as_bf16_safetensors(s, tmp_path):
    save_heads(s.heads, tmp_path / "heads.safetensors")
    heads = load_heads(tmp_path / "heads.safetensors", s.config)
    for a, b in zip(heads.parameters(), s.heads.parameters()):
        assert torch.equal(a, b.bfloat16().float())
    save_file(published(s.config, hidden=5), str(tmp_path / "other.safetensors"))
    assert load_heads(tmp_path / "other.safetensors", s.config)[0].fc1.weight.shape == (5, 128)


# ---------------------------------------------------------------------------- options

def test_defaults_scale_with_the_window(s):
    for window, expected in ((512, (256, 64, 40)), (8192, (4096, 1024, 640)), (131072, (16384, 1024, 2560))):
        assert LocretConfig().settings(replace(s.config, max_position_embeddings=window)) == expected
    assert LocretConfig(budget=320).settings(s.config) == (320, 64, 50)
    assert LocretConfig().settings(s.config, 100 + 256) == (156, 64, 24)  # the tail and the answer after B


def test_positions_stay_in_the_window(s):
    """The 408-token prompt with a 256-token answer: the default budget leaves the last 100 tokens
    and the answer room in the 512-token window (before, it stayed 256 and positions reached 611);
    a budget given that does not is refused, naming the option to lower and the answer budget."""
    got = locret.prefill(s.model, s.prompt, LocretConfig(retaining_heads=s.heads), 256)
    assert got.stats["kept_tokens"] == got.next_position == 156 + locret.LOCAL_TOKENS
    assert got.next_position + 256 <= 512
    with pytest.raises(OptionError) as e:
        locret.prefill(s.model, s.prompt, LocretConfig(budget=256, retaining_heads=s.heads), 256)
    assert e.value.param == "budget" and str(e.value) == (
        "budget (256) + the prompt's last 100 tokens + max_new_tokens (256) must fit in the model's 512-token window")


def test_bad_options_are_refused(s):
    for cfg, param in ((config(s, budget=0), "budget"), (config(s, locret_chunk=0), "locret_chunk"),
                       (config(s, stabilizers=BUDGET), "stabilizers"), (config(s, stabilizers=-1), "stabilizers"),
                       (config(s, budget=480), "budget")):
        with pytest.raises(OptionError) as e:
            cfg.validate(s.config)
        assert e.value.param == param
    with pytest.raises(OptionError) as e:
        LocretConfig().validate(s.config)
    assert str(e.value) == "retaining_heads is required: no retaining heads are shipped for this model"
    with pytest.raises(OptionError, match="retaining_heads is required"):
        locret.prefill(s.model, s.prompt, LocretConfig(), 8)
    smollm2 = replace(s.config, **locret.SMOLLM2_135M, max_position_embeddings=8192)
    LocretConfig().validate(smollm2)


def test_with_heads_loads_a_path_once(s, tmp_path):
    save_heads(s.heads, tmp_path / "heads.safetensors")
    loaded = locret.with_heads(config(s, retaining_heads=str(tmp_path / "heads.safetensors")), s.model)
    assert isinstance(loaded.retaining_heads, RetainingHeads)
    assert locret.with_heads(loaded, s.model).retaining_heads is loaded.retaining_heads


# ---------------------------------------------------------------------------- training script

def test_training_script_smoke_run_writes_loadable_heads(s, tmp_path):
    out = tmp_path / "heads.safetensors"
    run = subprocess.run([sys.executable, str(REPO / "tools" / "train_locret.py"), "--device", "cpu",
                          "--steps", "2", "--eval-samples", "2", "--hidden", "12", "--model", str(STORIES),
                          "--books", str(BOOKS), "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "held-out, after 2 steps:  top-10% overlap" in run.stdout
    heads = load_heads(out, s.config)
    assert heads[0].fc1.weight.shape == (12, 128) and heads[0].fc1.weight.abs().sum() > 0


def test_with_heads_converts_a_copy_and_leaves_the_callers_heads():
    model = build_model(Stories().model.config, "cpu", torch.bfloat16)
    heads = RetainingHeads(model.config, 16)
    before = heads[0].fc1.weight.clone()
    converted = locret.with_heads(LocretConfig(retaining_heads=heads), model).retaining_heads
    assert converted[0].fc1.weight.dtype == torch.bfloat16
    assert heads[0].fc1.weight.dtype == torch.float32 and torch.equal(heads[0].fc1.weight, before)
    same = locret.with_heads(LocretConfig(retaining_heads=converted), model).retaining_heads
    assert same is converted  # already on the model's device and dtype: no copy
