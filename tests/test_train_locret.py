"""tools/train_locret.py's recall check against independent computations on stories260K (window
512): the real locret.prefill's cache read through tests/reference.py's float64 first layer, the
cache that zero heads must leave (every score ties, so each eviction keeps the latest entries),
greedy answers from the float64 forward, and a smoke run of the script.
"""

import random
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

import locret
from conftest import BOOKS, REPO, STORIES, Stories
from locret import LocretConfig, RetainingHeads
from reference import ref_forward

sys.path.insert(0, str(REPO / "tools"))

import train_locret  # noqa: E402
from train_locret import ANSWER_TOKENS, HELD_OUT_BOOK, Layout, greedy, held_tokens, recall, recall_probe  # noqa: E402

TOL = 1e-5
N = 300  # probe document tokens
BUDGET, CHUNK = 96, 48  # evicting: the stream is about 230 tokens
FULL = dict(budget=448, locret_chunk=64)  # the whole stream fits: nothing is evicted


class Setup(Stories):
    def __init__(self):
        super().__init__()
        self.layout = Layout(self.tok)
        self.book = self.tok.encode((BOOKS / HELD_OUT_BOOK).read_text(encoding="utf-8")[:40_000])
        rng = random.Random(0)
        self.probes = [recall_probe(rng, self.book, N, self.layout) for _ in range(12)]
        torch.manual_seed(0)
        self.heads = RetainingHeads(self.model.config, 16).requires_grad_(False)
        self.zero = RetainingHeads(self.model.config, 16).requires_grad_(False)
        for weight in self.zero.parameters():
            nn.init.zeros_(weight)


@pytest.fixture(scope="module")
def s():
    return Setup()


def n_stream(prompt):
    return len(prompt.ids()) - max(len(prompt.question), locret.LOCAL_TOKENS)


def test_probe_plants_its_value_before_the_tail(s):
    for prompt, value, span in s.probes:
        ids = prompt.ids()
        assert value in s.tok.decode(ids[span.start:span.stop])
        assert value not in s.tok.decode(ids[span.start + 1:span.stop])
        assert value not in s.tok.decode(ids[span.start:span.stop - 1])
        assert len(prompt.context) == N and span.stop <= n_stream(prompt)


def test_held_tokens_are_what_the_real_prefill_keeps(s):
    """The first layer's cached values are functions of the token alone: the real prefill's, slot
    by slot, are the float64 values of the prompt tokens held_tokens names."""
    prompt = s.probes[0][0]
    ids = prompt.ids()
    config = LocretConfig(budget=BUDGET, locret_chunk=CHUNK, retaining_heads=s.heads)
    held = held_tokens(s.model, prompt, config)
    prefilled = locret.prefill(s.model, prompt, config, 4)
    n = prefilled.next_position
    assert (held.sum(-1) == n).all() and n == BUDGET + len(ids) - n_stream(prompt)
    record = []
    ref_forward(s.w, s.cfg, ids, list(range(len(ids))), record=record)
    for h in range(s.model.config.n_kv_heads):
        kept = held[0, h].nonzero()[:, 0]
        cached = prefilled.cache.v[0, 0, h, :n].double()
        assert (cached - record[0]["v"][kept, h]).abs().max() < TOL
    assert not held[0, 0, :n_stream(prompt) - BUDGET].all()  # something was evicted


def test_zero_heads_keep_the_latest_tokens(s):
    config = LocretConfig(budget=BUDGET, locret_chunk=CHUNK, retaining_heads=s.zero)
    expected_shares = []
    for prompt, value, span in s.probes:
        held = held_tokens(s.model, prompt, config)
        expected = torch.zeros_like(held)
        expected[..., n_stream(prompt) - BUDGET:] = True
        assert torch.equal(held, expected)
        expected_shares.append(float(span.start >= n_stream(prompt) - BUDGET))
    assert 0 < sum(expected_shares) < len(s.probes)  # both cases occur
    share, _ = recall(s.model, s.zero, s.probes, s.tok.decode, LocretConfig(budget=BUDGET, locret_chunk=CHUNK))
    assert share == pytest.approx(sum(expected_shares) / len(s.probes))


def test_a_budget_over_the_prompt_holds_every_value(s):
    config = LocretConfig(**FULL)
    for heads in (s.heads, s.zero):
        share, _ = recall(s.model, heads, s.probes[:4], s.tok.decode, config)
        assert share == 1.0


def test_answers_are_the_greedy_tokens_of_the_float64_model(s):
    """Nothing evicted, the cache is the causal one: the greedy answer is the float64 model's, and
    `answered` is whether it contains the value."""
    prompt, _, span = s.probes[1]
    ids, reference, record = prompt.ids(), [], []
    logits = ref_forward(s.w, s.cfg, ids, list(range(len(ids))), record=record)[-1]
    past = [(r["k"], r["v"]) for r in record]
    while True:
        top2 = logits.topk(2).values
        assert top2[0] - top2[1] > 1e-3  # no near-tie for float32 to break otherwise
        token = int(logits.argmax())
        if token in prompt.eos_ids or len(reference) == ANSWER_TOKENS:
            break
        reference.append(token)
        record = []
        logits = ref_forward(s.w, s.cfg, [token], [len(ids) + len(reference) - 1], past, record)[-1]
        past = [(torch.cat([k, r["k"]]), torch.cat([v, r["v"]])) for (k, v), r in zip(past, record)]
    config = locret.with_heads(LocretConfig(retaining_heads=s.heads, **FULL), s.model)
    prefilled = locret.prefill(s.model, prompt, config, ANSWER_TOKENS)
    assert greedy(s.model, prefilled, prompt.eos_ids) == reference
    text = s.tok.decode(reference)
    inside, outside = text.strip()[:3], "zq#"
    assert inside and outside not in text
    for value, expected in ((inside, 1.0), (outside, 0.0)):
        _, answered = recall(s.model, s.heads, [(prompt, value, span)], s.tok.decode, LocretConfig(**FULL))
        assert answered == expected


def test_training_script_prints_and_stores_the_recall(s, tmp_path):
    out = tmp_path / "heads.safetensors"
    run = subprocess.run([sys.executable, str(REPO / "tools" / "train_locret.py"), "--device", "cpu",
                          "--steps", "2", "--eval-samples", "2", "--recall-samples", "2", "--hidden", "12",
                          "--model", str(STORIES), "--books", str(BOOKS), "--out", str(out)], capture_output=True,
                         text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stdout.splitlines() if "recall of a planted value: held by" in line]
    assert [line.split(":")[0] for line in lines] == ["held-out, random heads", "held-out, after 2 steps"]
    assert all("answered" in line and "(2 probes of 1024 tokens)" in line for line in lines)
    with safe_open(str(out), "pt") as f:
        metadata = f.metadata()
    held = float(metadata["held_out_recall_held"])
    assert 0 <= held <= 1 and f"held by {held:.3f}" in lines[1]
    assert 0 <= float(metadata["held_out_recall_answered"]) <= 1


def test_the_scripts_user_errors_are_one_line(tmp_path, capsys):
    """Counts below one, a books folder without the books, a model that is not there: one line
    and a non-zero exit instead of a traceback, the books checked before the model loads."""
    base = ["--out", str(tmp_path / "heads.safetensors"), "--device", "cpu", "--books", str(BOOKS)]
    for flag in ("--steps", "--hidden", "--eval-samples", "--recall-samples"):
        with pytest.raises(SystemExit) as e:
            train_locret.parse_args(base + [flag, "0"])
        assert e.value.code == 2 and f"{flag} must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        train_locret.parse_args(base + ["--minutes", "0"])
    assert e.value.code == 2 and "--minutes must be above 0" in capsys.readouterr().err
    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "frankenstein.txt").write_text("It was on a dreary night of November.")
    with pytest.raises(SystemExit) as e:
        train_locret.main(base + ["--books", str(tmp_path / "books"), "--model", str(tmp_path / "missing")])
    assert str(e.value) == f"error: --books {tmp_path / 'books'} lacks pride_and_prejudice.txt, war_and_peace.txt"
    with pytest.raises(SystemExit) as e:
        train_locret.main(base + ["--model", str(tmp_path / "missing")])
    assert str(e.value) == (f"error: {tmp_path / 'missing'} is neither a checkpoint directory nor an embedded model "
                            "(smollm2, qwen2.5-1.5b)")
    assert not (tmp_path / "heads.safetensors").exists()
