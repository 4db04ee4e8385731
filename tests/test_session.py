"""Sessions (Engine.open, --questions, --interactive) on stories260K in float32: each answer is
the one a fresh generate(document, question) gives, for every method, in any order of the
questions, whether a question reuses the encoding or needs it made anew; what a question runs is
less than the document; ParallelComp's chunk scores through the kept K/V equal the float64
reference's; an interrupted answer leaves the session whole; the command line's questions.

The GPU's side (bf16, the offloaded ParallelComp store) is in test_gpu.py.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import parallelcomp
import parallelcomp_session
from baselines import YarnConfig
from conftest import BOOKS, REPO, STORIES, ctrl_c_enabled
from engine import Engine, Interrupted, main
from hybrid import HybridConfig
from infinipot import InfiniPotConfig
from locret import LocretConfig, random_heads
from parallelcomp import Calibration, ParallelCompConfig, chunk_spans
from prefill import OptionError, Prompt
from reference import load_float64, ref_forward, ref_greedy
from test_engine import CHAT_TEMPLATE, without_bos

BUDGET = 12
SHORT, MEDIUM = "\n\nWho?", "\n\nWhat did the monster see in the forest?"  # 3 and 12 tokens with BOS
# 121 tokens: a longer tail for Locret, a smaller pot for InfiniPot and one more chunk for ParallelComp
LONG = "\n\n" + "Where did the little girl go with her dog after the long walk in the dark forest? " * 3
QUESTIONS = (SHORT, MEDIUM, LONG)
TIMING = ("prefill_seconds", "decode_seconds", "decode_tokens_per_second", "peak_memory_bytes")
SESSION_STATS = ("encoded_tokens", "session_cache_bytes", "head_flops")  # head_flops: the heads run for the question


@pytest.fixture(scope="module")
def engine():
    return Engine(STORIES, "cpu")


@pytest.fixture(scope="module")
def document():
    """About 2,500 stories260K tokens of Frankenstein: five windows."""
    return (BOOKS / "frankenstein.txt").read_text()[20000:24000]


def configs(engine):
    torch.manual_seed(0)
    heads = random_heads(engine.model.config, 16)
    return {
        "parallelcomp": ParallelCompConfig(),  # chunks sized by the question: LONG needs one more
        "parallelcomp+kv": ParallelCompConfig(chunk_tokens=200, top_k_chunks=2, kv_budget=64),  # SHORT < the window of 8
        "parallelcomp+calibration": ParallelCompConfig(chunk_tokens=300, calibration=Calibration("all", 1, 3)),
        "full": None, "truncate": None, "streaming": None, "yarn": YarnConfig(factor=8),
        "infinipot": InfiniPotConfig(),  # the pot sized by the question: LONG's is smaller
        "infinipot+question": InfiniPotConfig(pot_tokens=128, catalyst="question"),
        "locret": LocretConfig(retaining_heads=heads),
        "hybrid": HybridConfig(sink_tokens=8, window_tokens=64),  # the rings wrap
        "hybrid+block": HybridConfig(pattern="block", block_tokens=8, local_blocks=4, vert_stride=4),
    }


CASES = ["parallelcomp", "parallelcomp+kv", "parallelcomp+calibration", "full", "truncate", "streaming", "yarn",
         "infinipot", "infinipot+question", "locret", "hybrid", "hybrid+block"]


def same_answer(got, fresh):
    """The session's Generation against the fresh one: the same tokens and the method's statistics."""
    assert got.tokens == fresh.tokens and got.text == fresh.text
    ignore = TIMING + SESSION_STATS
    assert {k: v for k, v in got.stats.items() if k not in ignore} == \
        {k: v for k, v in fresh.stats.items() if k not in ignore}


@pytest.mark.parametrize("case", CASES)
def test_every_method_answers_as_a_fresh_generate(engine, document, case):
    """Three questions, in both orders, each against generate(document, question) with the same
    method and config. The short question, asked first, reuses what the session encoded: it runs
    fewer tokens than half the document (all but InfiniPot with the question as catalyst, whose
    every distillation depends on it). In the other order the long question has some methods
    encode the document anew (a smaller pot, one more chunk), and the next question again."""
    method, config = case.split("+")[0], configs(engine)[case]
    document_tokens = 1 + len(engine.tokenizer.encode(document))
    fresh = {q: engine.generate(document, q, method=method, config=config, max_new_tokens=BUDGET) for q in QUESTIONS}
    assert len({tuple(g.tokens) for g in fresh.values()}) > 1, "the questions give different answers"
    for order in (QUESTIONS, QUESTIONS[::-1]):
        session = engine.open(document, method=method, config=config, max_new_tokens=BUDGET)
        assert session.stats["method"] == method and session.stats["document_tokens"] == document_tokens
        for question in order:
            got = session.ask(question)
            same_answer(got, fresh[question])
            assert got.stats["session_cache_bytes"] > 0
            if question == order[0] == SHORT and case != "infinipot+question":
                assert got.stats["encoded_tokens"] < document_tokens // 2, got.stats["encoded_tokens"]


def test_what_a_question_runs(engine, document):
    """ParallelComp runs the question once per chunk and once in the query pass, until a question
    needs another split; full attention only the question; InfiniPot with the question as
    catalyst the whole stream again."""
    tok = engine.tokenizer
    context = len(tok.encode(document))
    session = engine.open(document, method="parallelcomp", config=ParallelCompConfig(cut_at="token"),
                          max_new_tokens=BUDGET)
    n = len(chunk_spans(context, 512 - 1 - 0 - BUDGET))  # encoded for an empty question
    short, long = (1 + len(tok.encode(q)) for q in (SHORT, LONG))
    assert session.ask(SHORT).stats["encoded_tokens"] == (n + 1) * short
    grown = len(chunk_spans(context, 512 - 1 - long - BUDGET))
    assert grown == n + 1
    assert session.ask(LONG).stats["encoded_tokens"] == context + grown * 1 + (grown + 1) * long  # heads once a chunk
    assert session.ask(LONG).stats["encoded_tokens"] == (grown + 1) * long
    full = engine.open(document, method="full", max_new_tokens=BUDGET)
    assert full.ask(SHORT).stats["encoded_tokens"] == short
    assert full.ask(SHORT, max_new_tokens=600).stats["encoded_tokens"] == 1  # its cache grown, the prefix kept
    pot = engine.open(document, method="infinipot", config=InfiniPotConfig(pot_tokens=128, catalyst="question"),
                      max_new_tokens=BUDGET)
    assert pot.ask(SHORT).stats["encoded_tokens"] > context - 128


def test_sampling_and_chat_as_generate(engine, document, tmp_path):
    """Seeded sampling draws the same tokens; under a chat template the question block is laid
    out as generate lays it out."""
    config = ParallelCompConfig(chunk_tokens=300, top_k_chunks=1)
    session = engine.open(document, method="parallelcomp", config=config, max_new_tokens=BUDGET)
    sampling = dict(temperature=0.9, top_p=0.95, top_k=40, seed=7)
    fresh = engine.generate(document, MEDIUM, method="parallelcomp", config=config, max_new_tokens=BUDGET, **sampling)
    same_answer(session.ask(MEDIUM, **sampling), fresh)
    path = tmp_path / "stories260K"
    path.mkdir()
    for f in STORIES.iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    settings = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**settings, "chat_template": CHAT_TEMPLATE}))
    chat = Engine(path, "cpu")
    for method in ("parallelcomp", "full"):
        kwargs = dict(instruction="Read the story.", chat=True, method=method, max_new_tokens=BUDGET)
        session = chat.open(document, **({"config": config} if method == "parallelcomp" else {}), **kwargs)
        for question in (MEDIUM, SHORT):
            fresh = chat.generate(document, question, **({"config": config} if method == "parallelcomp" else {}),
                                  **kwargs)
            same_answer(session.ask(question), fresh)


def test_auto_chooses_per_question_as_generate(engine):
    """A document that fits the window with the short question but not with the long one: auto
    runs full attention, then ParallelComp, then full attention again, as generate does, the
    document encoded anew at each change of method."""
    tok = engine.tokenizer
    document = tok.decode(tok.encode((BOOKS / "frankenstein.txt").read_text()[30000:33000])[:420])
    session = engine.open(document, max_new_tokens=BUDGET)
    assert session.stats["method"] == "full"
    methods = []
    for question in (SHORT, LONG, SHORT):
        got, fresh = session.ask(question), engine.generate(document, question, max_new_tokens=BUDGET)
        same_answer(got, fresh)
        methods.append(got.stats["method"])
        assert session.stats["method"] == got.stats["method"]
    assert methods == ["full", "parallelcomp", "full"]


@pytest.mark.parametrize("method", ["full", "parallelcomp", "hybrid", "streaming"])
def test_an_interrupted_answer_leaves_the_session_whole(engine, document, method):
    """Ctrl-C while decoding (a KeyboardInterrupt from on_text, as the decode loop sees one):
    Interrupted with the tokens so far; the next questions answer as generate does."""
    config = HybridConfig(sink_tokens=8, window_tokens=64) if method == "hybrid" else None
    session = engine.open(document, method=method, config=config, max_new_tokens=BUDGET)

    pressed = []

    def ctrl_c(text):
        if not pressed:  # once, as a key is pressed: the text flushed after the loop is printed
            pressed.append(text)
            raise KeyboardInterrupt
    with pytest.raises(Interrupted) as e:
        session.ask(LONG, max_new_tokens=200, on_text=ctrl_c)
    assert e.value.generation.stats["interrupted"] and len(e.value.generation.tokens) == 1
    for question in (SHORT, LONG):
        same_answer(session.ask(question),
                    engine.generate(document, question, method=method, config=config, max_new_tokens=BUDGET))


def test_chunk_scores_through_the_store_equal_the_float64_reference(engine, document):
    """score_chunks: the question's NLL given each chunk, from the chunk's kept K/V and its last
    token's stored hidden state, against the question's NLL in a float64 forward of [head + chunk
    + question] alone. With KV eviction the chunk's kept K/V equal what the fresh prefill keeps
    (whose choice test_parallelcomp.py checks against an independent one)."""
    tok = engine.tokenizer
    w, cfg = load_float64(STORIES)
    head, context = [1] + tok.encode("Read the story."), tok.encode(document)[:450]
    question = [1] + tok.encode("What did the monster see?")
    prompt = Prompt(head, context, question, bos_id=1, eos_ids=frozenset({2}))
    spans = chunk_spans(len(context), 150)
    model = engine.model
    with torch.inference_mode():
        store = parallelcomp_session.encode_store(model, prompt, spans, model.device, kv_eviction=True)
        chunks = parallelcomp_session.score_chunks(model, store, prompt, range(len(spans)), None, store.k, store.v)
        evicted = parallelcomp_session.score_chunks(model, store, prompt, range(len(spans)), 40, store.k, store.v)
        fresh = parallelcomp.encode_chunks(model, prompt, spans, range(len(spans)), 40)
    for chunk, span in zip(chunks, spans):
        ids = head + context[span.start:span.stop] + question
        logits = ref_forward(w, cfg, ids, list(range(len(ids))))
        start = len(head) + len(span) - 1
        nll = F.cross_entropy(logits[start:start + len(question)], torch.tensor(question), reduction="sum").item()
        assert chunk.nll == pytest.approx(nll / (len(question) - 1), rel=1e-5)
    assert len({round(c.nll, 3) for c in chunks}) == len(chunks)
    for got, expected in zip(evicted, fresh):
        assert got.nll == pytest.approx(expected.nll, rel=1e-5)
        assert got.k.shape == expected.k.shape == (5, 4, 41, 8)
        torch.testing.assert_close(got.k, expected.k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.v, expected.v, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["full", "parallelcomp", "infinipot", "streaming"])
def test_an_empty_document(method, tmp_path):
    """A session over an empty document (a tokenizer without BOS: nothing to encode) answers with
    the float64 greedy tokens after the question alone, as generate does."""
    engine = Engine(without_bos(tmp_path), "cpu")
    session = engine.open("", method=method, max_new_tokens=6)
    ids = engine.tokenizer.encode("What is it?")
    assert session.ask("What is it?").tokens == ref_greedy(*load_float64(STORIES), ids, 6, eos=2)


def test_session_errors_name_parameters(engine, document):
    with pytest.raises(OptionError, match=r"^session_cache_gib must be 0 or more$"):
        engine.open(document, session_cache_gib=-1)
    with pytest.raises(OptionError) as e:
        engine.open(document, method="full", session_cache_gib=0)
    assert e.value.param == "session_cache_gib"
    assert re.fullmatch(r"the session's cache needs [\d.]+ GiB, more than session_cache_gib \(0 GiB\) allows on cpu: "
                        r"raise session_cache_gib or shorten the document", str(e.value)), str(e.value)
    session = engine.open(document, method="full", max_new_tokens=BUDGET)
    with pytest.raises(OptionError, match="^question is empty$"):
        session.ask(" \n")
    with pytest.raises(OptionError, match="^max_new_tokens must be at least 1$"):
        session.ask(SHORT, max_new_tokens=0)
    with pytest.raises(OptionError, match="^unknown method 'nosuch'"):
        engine.open(document, method="nosuch")


# ---------------------------------------------------------------------------- the command line

MODEL = ["--model", str(STORIES), "--device", "cpu", "--max-new-tokens", str(BUDGET)]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def files(tmp_path, document):
    prompt = tmp_path / "doc.txt"
    prompt.write_text(document)
    questions = tmp_path / "questions.txt"
    questions.write_text("\n".join(q.strip() for q in QUESTIONS) + "\n\n")  # a blank line is no question
    return prompt, questions


def test_questions_file_answers_each_as_question_does(files, capsys):
    """--questions with --json: one object a line, in order, each the object --question gives
    but for the timings and the session's statistics."""
    prompt, questions = files
    code, out, err = run(capsys, "--prompt", prompt, "--questions", questions, *MODEL, "--json")
    assert code == 0 and err == ""
    answers = [json.loads(line) for line in out.splitlines()]
    assert len(answers) == 3
    assert answers[0]["encoded_tokens"] < 100 and all(got["session_cache_bytes"] > 0 for got in answers)
    for question, got in zip(QUESTIONS, answers):
        code, out, _ = run(capsys, "--prompt", prompt, "--question", question.strip(), *MODEL, "--json")
        fresh = json.loads(out)
        ignore = TIMING + SESSION_STATS
        assert {k: v for k, v in got.items() if k not in ignore} == {k: v for k, v in fresh.items() if k not in ignore}


def test_questions_as_text_with_a_summary(files, capsys):
    prompt, questions = files
    code, out, err = run(capsys, "--prompt", prompt, "--questions", questions, *MODEL, "--method", "full")
    lines = err.splitlines()
    assert code == 0 and len(lines) == 4, err
    assert re.fullmatch(r"\[session\] full: document [\d,]+ tokens encoded in [\d.]+ s, cache [\d.]+ GiB on cpu",
                        lines[0])
    assert all(line.startswith("[full] prompt ") for line in lines[1:])
    assert out.count("\n") >= 3


def test_interactive_reads_standard_input_until_eof(files):
    prompt, _ = files
    p = subprocess.run([sys.executable, "engine.py", "--prompt", prompt, "--interactive", *MODEL, "--json"],
                       input=f"{SHORT.strip()}\n\n   \n{MEDIUM.strip()}\n".encode(), cwd=REPO, capture_output=True,
                       env=ENV, timeout=300)
    assert (p.returncode, p.stderr) == (0, b"")
    assert len([json.loads(line) for line in p.stdout.decode().splitlines()]) == 2


def test_ctrl_c_at_the_interactive_prompt_ends_cleanly(files):
    """Ctrl-C while the session waits for a question ends it as EOF does: status 0, no traceback."""
    prompt, _ = files
    p = subprocess.Popen([sys.executable, "engine.py", "--prompt", prompt, "--interactive", *MODEL],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, env=ENV,
                         preexec_fn=ctrl_c_enabled)
    p.stdin.write(f"{SHORT.strip()}\n".encode())
    p.stdin.flush()
    assert p.stderr.readline().startswith(b"[session] parallelcomp: document ")
    assert p.stderr.readline().startswith(b"[parallelcomp] prompt ")  # the answer is out: it waits for the next
    time.sleep(1)  # into the read
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert (p.returncode, err) == (0, b"") and out.strip()


@pytest.mark.parametrize("flags, message", [
    (["--question", "Who?", "--questions", "q.txt"], r"--question asks one question, --questions many: choose one"),
    (["--questions", "q.txt", "--interactive"], r"--questions and --interactive both give the questions: choose one"),
    (["--session-cache-gib", "1"], r"--session-cache-gib applies with --questions or --interactive"),
])
def test_malformed_session_flags(flags, message, files, capsys):
    prompt, _ = files
    with pytest.raises(SystemExit) as exit:
        main(["--prompt", str(prompt), *MODEL, *flags])
    out, err = capsys.readouterr()
    assert (exit.value.code, out) == (2, "") and re.fullmatch(f"error: {message} \\(see --help\\)\n", err), err


def test_the_questions_cannot_share_standard_input_with_the_prompt():
    p = subprocess.run([sys.executable, "engine.py", "--prompt", "-", "--interactive", *MODEL], input=b"text",
                       cwd=REPO, capture_output=True, env=ENV, timeout=120)
    assert (p.returncode, p.stdout) == (2, b"")
    assert p.stderr == b"error: --interactive reads the questions from standard input: give --prompt a file " \
                       b"(see --help)\n"


@pytest.mark.parametrize("make, message", [
    (lambda tmp: tmp / "nowhere.txt", r"the questions file \S+nowhere.txt does not exist"),
    (lambda tmp: tmp, r"cannot read the questions file \S+: Is a directory"),
    (lambda tmp: (tmp / "q.txt").write_text("\n  \n") and tmp / "q.txt", r"the questions file \S+ hold no question \(one a line\)"),
    (lambda tmp: (tmp / "q.txt").write_bytes(b"Who?\n\xff\n") and tmp / "q.txt",
     r"the questions file \S+ are not text: invalid UTF-8 at byte 5; save them as UTF-8"),
])
def test_questions_file_errors(make, message, files, tmp_path, capsys):
    prompt, _ = files
    code, out, err = run(capsys, "--prompt", prompt, "--questions", make(tmp_path), *MODEL)
    assert (code, out) == (1, "") and err.count("\n") == 1 and re.fullmatch(f"error: {message}\n", err), err


def test_a_session_cache_beyond_the_limit_is_one_line(files, capsys):
    prompt, questions = files
    code, out, err = run(capsys, "--prompt", prompt, "--questions", questions, *MODEL, "--session-cache-gib", "0")
    assert (code, out) == (1, "")
    assert re.fullmatch(r"error: the session's cache needs [\d.]+ GiB, more than --session-cache-gib \(0 GiB\) allows "
                        r"on cpu: raise --session-cache-gib or shorten the document\n", err), err


# ---------------------------------------------------------------------------- the benchmark

def test_session_bench_runs_on_a_cpu(tmp_path, capsys):
    """eval/session_bench.py on stories260K: a row per method with every figure, question 1's
    first token and chunks those of the fresh prefill (its speed is the benchmark's, not a test's)."""
    sys.path.insert(0, str(REPO / "eval"))
    import session_bench
    session_bench.main(["--model", str(STORIES), "--contexts", "1500", "--questions", "3", "--device", "cpu",
                        "--methods", "parallelcomp", "full", "--out", str(tmp_path / "s")])
    result = json.loads((tmp_path / "s.json").read_text())
    assert result["device"] == "cpu" and [r["method"] for r in result["rows"]] == ["parallelcomp", "full"]
    for row in result["rows"]:
        assert row["same_as_fresh"] is True and len(row["question_s"]) == 3 and row["cache_home"] == "cpu"
        assert row["cache_bytes"] > 0 and row["fresh_s"] > 0 and row["later_s"] > 0
    assert result["rows"][0]["chunks"] == 8  # 1,436 context tokens in chunks of at most 512 - 64 - 256
    assert capsys.readouterr().out.count("| parallelcomp | 1500 |") == 2  # as measured, then in the table
