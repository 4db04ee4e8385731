"""eval/: every metric against values worked out by hand, every script end to end on stories260K.

The end-to-end runs check structure (files, table rows, finite numbers), not scores: a 260K
model trained on children's stories retrieves nothing.
"""

import argparse
import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import BOOKS, REPO, STORIES, shared

sys.path.insert(0, str(REPO / "eval"))
import longbench  # noqa: E402
from common import Rows  # noqa: E402
import passkey  # noqa: E402
import ppl  # noqa: E402
from metrics import (classification_score, code_sim, count_score, exact_match, example_score,  # noqa: E402
                     gold_options, normalize_answer, qa_f1, retrieval_score, rouge_l, task_score)

from baselines import BaselineConfig  # noqa: E402
from engine import Engine  # noqa: E402
from methods import METHODS  # noqa: E402



# ---------------------------------------------------------------------------- LongBench metrics

def test_qa_f1():
    assert normalize_answer("The Cat, sat!") == "cat sat"
    # articles go: [cat, sat] vs [cat, sat, down]; 2 common; P = 2/2, R = 2/3; F1 = 2·1·(2/3) / (5/3) = 0.8
    assert qa_f1("the cat sat", "a cat sat down") == pytest.approx(0.8)
    # tokens count with multiplicity: 1 common; P = 1/2, R = 1/1; F1 = 2·(1/2) / (3/2) = 2/3
    assert qa_f1("yes yes", "yes") == pytest.approx(2 / 3)
    assert qa_f1("dog", "cat") == 0


def test_rouge_l():
    # one sentence each; LCS(police arrested two protesters downtown, two protesters arrested downtown)
    # = "two protesters downtown" = 3; R = 3/5, P = 3/4; F = 2·0.6·0.75 / 1.35 = 2/3
    assert rouge_l("two protesters arrested downtown", "police arrested two protesters downtown") == \
        pytest.approx(2 / 3, abs=1e-6)
    # summary level: sentences split at '.'; LCS with the reference "Police arrested two protesters
    # downtown" is "Police arrested" in the first and "Police two downtown" in the second; their union
    # over reference words is {Police, arrested, two, downtown} = 4; unique words: 5 in the reference,
    # 8 in the prediction; R = 4/5, P = 4/8; F = 2·0.8·0.5 / 1.3 = 8/13
    assert rouge_l("Police arrested many people. Police held two men downtown.",
                   "Police arrested two protesters downtown.") == pytest.approx(8 / 13, abs=1e-6)
    assert rouge_l("", "Police arrested two protesters.") == 0.0


def test_code_sim():
    # the first line without a fence or a comment is "kitten"; LCS(kitten, sitting) = "ittn" = 4;
    # Indel distance 6 + 7 - 2·4 = 5; similarity 1 - 5/13 = 8/13
    assert code_sim("```python\n# the next line\nkitten\n```", "sitting") == pytest.approx(8 / 13)
    assert code_sim("// only comments", "x = 1") == 0.0


def test_classification_count_and_retrieval():
    classes = ["Other location", "location", "City", "Country"]
    assert classification_score("City or Country", "City", classes) == 0.5  # two classes named
    # "location" is part of the answer's name: it does not count against it
    assert classification_score("Other location", "Other location", classes) == 1.0
    assert classification_score("Other location", "City", classes) == 0.0
    assert count_score("There are 12 unique paragraphs, not 13.", 12) == 0.5  # 1 of 2 numbers
    assert count_score("I cannot tell.", 3) == 0.0
    assert retrieval_score("Paragraph 7", "Paragraph 7") == 1.0
    assert retrieval_score("Paragraph 17 or Paragraph 7", "Paragraph 7") == 0.5


def test_example_and_task_score():
    answers = ["Paris", "Paris, France"]
    prediction = "\n\nParis\nThe capital of France"
    assert example_score("triviaqa", prediction, answers) == 1.0  # first line "Paris"
    # hotpotqa keeps every line: [paris, capital, of, france]; vs "Paris, France": P = 2/4, R = 2/2, F1 = 2/3
    assert example_score("hotpotqa", prediction, answers) == pytest.approx(2 / 3)
    assert task_score([1.0, 0.5, 0.25]) == 58.33  # 100 · 1.75 / 3


def test_leval_exact_match():
    assert gold_options("ABC") == {"A", "B", "C"}
    assert gold_options("(B) Their subconscious knew it.") == {"B"}
    assert exact_match("A, B and C", "ABC") == 1.0
    assert exact_match("AB", "ABC") == 0.0  # every correct letter, no more, no less
    assert exact_match(" (B) because they were careless", "(B) Their subconscious knew it.") == 1.0
    assert exact_match("The answer is C.", "C") == 1.0
    assert exact_match("D. A guess", "D") == 1.0  # the letters end at the first '.'
    assert exact_match("I think B", "B") == 0.0  # the answer must start with its letters


def test_needle_score():
    assert passkey.needle_score("eat a sandwich in Dolores Park.") == pytest.approx(4 / 6)


def test_longbench_templates_split_at_the_context():
    assert set(longbench.PROMPTS) == set(longbench.MAX_NEW_TOKENS) == set(longbench.METRICS)
    assert len(longbench.PROMPTS) == 16
    record = dict(dataset="multi_news", input="", context="Passage 1:\nNews.", answers=["A summary."],
                  all_classes=None)
    item = longbench.longbench_item(0, record)
    assert item.instruction + "{context}" + item.question == longbench.PROMPTS["multi_news"] == (
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}"
        "\n\nNow, write a one-page summary of all the news.\n\nSummary:")
    assert item.document == "Passage 1:\nNews." and item.max_new_tokens == 512
    assert item.score("A summary.") == pytest.approx(1.0)


# ---------------------------------------------------------------------------- scripts end to end

def shortened(path, out, n, **cut):
    """The first n records of a jsonl file, each field in `cut` shortened to that many characters or items."""
    records = longbench.read_jsonl(path)[:n]
    for r in records:
        for field, size in cut.items():
            r[field] = r[field][:size]
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(out)


def test_passkey_end_to_end(tmp_path, capsys):
    """Every method of the table, and ParallelComp once more with KV eviction and calibration."""
    variant = "parallelcomp:kv-budget=64,calibrate=sink:1-2"
    passkey.main(["--model", str(STORIES), "--device", "cpu", "--lengths", "256", "1024", "--depths", "0.25",
                  "0.75", "--keys", "1", "--chunk-tokens", "400", "--methods", "parallelcomp", variant, "full",
                  "truncate", "streaming", "--haystack", str(BOOKS / "frankenstein.txt"),
                  "--out", str(tmp_path / "r")])
    result = json.loads((tmp_path / "r.json").read_text())
    rows = result["rows"]
    assert result["complete"] and len(rows) == 2 * 2 * 2 * 5  # tasks × lengths × depths × methods, one trial each
    assert all(0 <= r["score"] <= 1 for r in rows)
    for task in ("passkey", "needle"):
        for method in ("parallelcomp", "parallelcomp_kv-budget-64-calibrate-sink-1-2", "full", "truncate",
                       "streaming"):
            assert (tmp_path / f"r_{task}_{method}.png").stat().st_size > 0
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0] == f"| task | length | parallelcomp | {variant} | full | truncate | streaming |"
    assert len(table) == 2 + 4


def test_rows_on_disk_after_each_one(tmp_path):
    """A run stopped midway keeps its rows: PREFIX.json after every row, marked incomplete until finish()."""
    rows = Rows(tmp_path / "x", argparse.Namespace(lengths=[1, 2]))
    for n in (1, 2):
        rows.append(dict(n=n))
        assert json.loads((tmp_path / "x.json").read_text()) == dict(
            args=dict(lengths=[1, 2]), complete=False, rows=[dict(n=i) for i in range(1, n + 1)])
    rows.finish(scores=dict(a=1.0))
    assert json.loads((tmp_path / "x.json").read_text()) == dict(
        args=dict(lengths=[1, 2]), complete=True, scores=dict(a=1.0), rows=[dict(n=1), dict(n=2)])


def test_ppl_end_to_end(tmp_path, capsys):
    ppl.main(["--model", str(STORIES), "--device", "cpu", "--lengths", "128", "512", "1024", "--target-tokens",
              "64", "--query-tokens", "64", "--methods", "full", "truncate", "parallelcomp", "streaming",
              "--book", str(BOOKS / "war_and_peace.txt"), "--offset", "20000", "--out", str(tmp_path / "p")])
    rows = json.loads((tmp_path / "p.json").read_text())["rows"]
    assert len(rows) == 3 * 4 and all(math.isfinite(r["ppl"]) and r["ppl"] > 1 for r in rows)
    at_128 = [r["nll"] for r in rows if r["context_tokens"] == 128]
    assert max(at_128) - min(at_128) < 1e-4  # one chunk, all of it in the window: every method is plain inference
    assert (tmp_path / "p.png").stat().st_size > 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2 + 3


def test_ppl_continuation_equals_one_causal_pass():
    """The target scored through the prefilled cache = the target's NLL in one forward over context + target."""
    engine = Engine(STORIES, "cpu")
    tokens = ppl.book_tokens(engine.tokenizer, BOOKS / "war_and_peace.txt", 20_000, 300)
    context, target = tokens[:250], tokens[250:]
    with torch.inference_mode():
        prompt = ppl.context_prompt(engine, "full", context, 50)
        nll = ppl.continuation_nll(engine.model, METHODS["full"].prefill(engine.model, prompt, BaselineConfig(), 50),
                                   target)
        logits = engine.model.causal_logits(torch.tensor([[1] + tokens]))
        expected = F.cross_entropy(logits[0, -51:-1], torch.tensor(target)).item()
    assert nll == pytest.approx(expected, abs=1e-5)


def test_longbench_and_leval_end_to_end(tmp_path, capsys):
    news = shortened(shared("data/longbench/multi_news.jsonl"), tmp_path / "multi_news.jsonl", 2,
                     context=3000)
    tpo = shortened(shared("data/leval/tpo.jsonl"), tmp_path / "tpo.jsonl", 1, input=3000,
                    instructions=1, outputs=1)
    longbench.main([news, tpo, "--model", str(STORIES), "--device", "cpu", "--max-new-tokens", "4",
                    "--methods", "parallelcomp", "full", "truncate", "streaming", "--out", str(tmp_path / "l")])
    result = json.loads((tmp_path / "l.json").read_text())
    assert list(result["scores"]) == ["multi_news", "tpo"]
    assert len(result["rows"]) == (2 + 1) * 4
    assert all(0 <= s <= 100 for task in result["scores"].values() for s in task.values())
    table = capsys.readouterr().out.strip().splitlines()
    assert table[2].startswith("| multi_news | rouge_l | 2 |") and table[3].startswith("| tpo | exact_match | 1 |")
