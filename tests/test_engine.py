"""engine.py's Python API on stories260K (window 512): which method auto chooses, how configs apply,
errors that name parameters, the question a method that ranks by one gets when none is given
(Engine.plan and generate), and what importing the engine loads.

The command line's side of the errors (flags, not parameters) is in test_cli.py.
"""

import json
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import BOOKS, REPO, STORIES
from checkpoint import CheckpointError
from engine import Engine, EngineError
from infinipot import InfiniPotConfig
from locret import LocretConfig, random_heads
from methods import METHODS
from parallelcomp import ParallelCompConfig, chunk_spans
from prefill import OptionError, Prompt
from reference import load_float64, ref_greedy

WINDOW = 512
STORY = "Once upon a time there was a little cat."
# a ChatML-like template in stories260K's own tokens: <s> and </s> are its BOS and EOS
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}{{ eos_token }}\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TURN_END = "</s>\n<|im_start|>assistant\n"  # the template after the user's message


@pytest.fixture(scope="module")
def engine():
    return Engine(STORIES, "cpu")


@pytest.fixture(scope="module")
def chat_engine(tmp_path_factory):
    """stories260K, which has no chat template, with CHAT_TEMPLATE in its tokenizer_config.json."""
    path = tmp_path_factory.mktemp("chat") / "stories260K"
    shutil.copytree(STORIES, path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    return Engine(path, "cpu")


@pytest.fixture(scope="module")
def paragraphs():
    """Frankenstein's paragraphs of more than 200 characters, each on one line."""
    text = (BOOKS / "frankenstein.txt").read_text()[20000:40000]
    return [p.strip().replace("\n", " ") for p in text.split("\n\n") if len(p.strip()) > 200]


# ---------------------------------------------------------------------------- errors name parameters

@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=0), "max_new_tokens must be at least 1"),
    (dict(method="parallelcomp", config=ParallelCompConfig(top_k_chunks=0)), "top_k_chunks must be at least 1"),
    (dict(method="parallelcomp", config=ParallelCompConfig(chunk_tokens=513)),
     "chunk_tokens must be between 1 and the model's 512-token window"),
    (dict(method="infinipot", config=InfiniPotConfig(pot_keep=0)), "pot_keep must be at least 1"),
    (dict(temperature=-1.0), "temperature must be 0 (greedy) or a positive number"),
    (dict(top_p=0.0), "top_p must be in (0, 1]"),
    (dict(method="nosuch"), "unknown method 'nosuch' (choose from auto, parallelcomp, full, "),
    (dict(method="full", config=ParallelCompConfig()),
     "config for method full must be a BaselineConfig, not ParallelCompConfig"),
    (dict(config=InfiniPotConfig()),
     "config for method auto (full or parallelcomp here) must be a BaselineConfig or ParallelCompConfig, not "
     "InfiniPotConfig"),
    (dict(method="full", options={"parallelcomp": {"top_k_chunks": 1}}),
     "top_k_chunks is an option of method parallelcomp, not full"),
    (dict(options={"parallelcomp": {"top_k_chunks": 0}}), "top_k_chunks must be at least 1"),  # checked, used or not
    (dict(method="infinipot", config=InfiniPotConfig(pot_tokens=100, pot_keep=100)),
     "pot_keep must be below pot_tokens (100)"),
    (dict(method="infinipot", options={"infinipot": {"pot_tokens": 100, "pot_keep": 100}}),
     "pot_keep must be below pot_tokens (100)"),
])
def test_api_errors_name_parameters(engine, kwargs, message):
    with pytest.raises(OptionError) as e:
        engine.generate(STORY, "Who?", **kwargs)
    assert str(e.value).startswith(message) and "--" not in str(e.value)
    assert e.value.param in str(e.value)


def test_an_empty_prompt_is_an_engine_error(engine):
    with pytest.raises(EngineError, match="the prompt is empty"):
        engine.generate(" \n\n ", max_new_tokens=2)


def without_bos(tmp_path):
    """A copy of stories260K whose tokenizer adds no BOS, as the default model's: a document of no
    tokens is then an empty stream."""
    path = tmp_path / "stories260K"
    shutil.copytree(STORIES, path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": False}))
    return path


@pytest.fixture(scope="module")
def bosless(tmp_path_factory):
    return Engine(without_bos(tmp_path_factory.mktemp("bosless")), "cpu")


@pytest.mark.parametrize("method", METHODS)
def test_an_empty_document_with_a_question_for_every_method(bosless, method):
    """The question alone is the prompt, which every method encodes as full attention would: the
    float64 greedy tokens after it. Before, InfiniPot failed in the embedding (an empty stream
    became a float tensor) and ParallelComp scored its empty chunk on rows that do not exist."""
    ids = bosless.tokenizer.encode("What is it?")
    config = LocretConfig(retaining_heads=random_heads(bosless.model.config, 16)) if method == "locret" else None
    out = bosless.generate("", "What is it?", method=method, config=config, max_new_tokens=6)
    assert out.stats["prompt_tokens"] == len(ids)
    assert out.tokens == ref_greedy(*load_float64(STORIES), ids, 6, eos=2)


# ---------------------------------------------------------------------------- auto and configs

def test_auto_chooses_by_the_window(engine, paragraphs):
    short, long = STORY, "\n\n".join(paragraphs[:3])  # 13 and 874 tokens with BOS
    assert engine.plan(short, "\n\nWho?", max_new_tokens=400).method == "full"
    assert engine.plan(long, "\n\nWho?", max_new_tokens=16).method == "parallelcomp"
    assert engine.plan(short, method="full", max_new_tokens=16).method == "full"


def test_the_question_is_laid_out_the_same_given_or_taken_from_the_document(engine, paragraphs):
    """A document without a question is asked its last paragraph after the blank line that
    precedes it, as the command line asks a --question (QUESTION_SEPARATOR): the same tokens, the
    same chunk kept. Before, the paragraph lost its blank line (3 tokens fewer here)."""
    body, question = "\n\n".join(paragraphs[:5]), paragraphs[5].split(". ")[0] + "."
    config = ParallelCompConfig(chunk_tokens=300, top_k_chunks=1)
    taken = engine.generate(body + "\n\n" + question, method="parallelcomp", config=config, max_new_tokens=4)
    given = engine.generate(body, "\n\n" + question, method="parallelcomp", config=config, max_new_tokens=4)
    assert taken.stats["prompt_tokens"] == given.stats["prompt_tokens"]
    assert taken.stats["kept_spans"] == given.stats["kept_spans"] and taken.tokens == given.tokens


def test_auto_applies_a_parallelcomp_config_only_when_it_chooses_parallelcomp(engine, paragraphs):
    config = ParallelCompConfig(chunk_tokens=300, top_k_chunks=1, cut_at="token")
    long = "\n\n".join(paragraphs[:3])
    out = engine.generate(long, "\n\nWho?", config=config, max_new_tokens=2)
    context = len(engine.tokenizer.encode(long))
    assert out.stats["method"] == "parallelcomp" and out.stats["chunks"] == len(chunk_spans(context, 300)) == 3
    assert len(out.stats["kept_chunks"]) == 1
    short = engine.generate(STORY, config=config, max_new_tokens=2)  # fits: full attention, the config unused
    assert short.stats["method"] == "full" and "chunks" not in short.stats


# ---------------------------------------------------------------------------- a missing question
#
# Three behaviours of the redesign that the code before it (4f7e147) got wrong. Engine.plan did not
# exist there; its generate (which took parallel= instead of config=) was run on the documents below:
# - with --chat and no --question, a method that ranks chunks by the question got the chat
#   template's closing tokens as the question: layout() returned a non-empty question block, so
#   `asked` was true and the last paragraph was never split off (it stayed in the context: 6
#   chunks, the kept one [515, 773], where the tests below expect 5 and the last);
# - auto without a question chose ParallelComp on the prompt without its last paragraph split off,
#   then raised "... (99 tokens), and --max-new-tokens (14) leave no room for context" once the
#   paragraph became the question;
# - the question's end-of-turn token was scored (test_parallelcomp.py).

def test_chat_without_a_question_ranks_by_the_last_paragraph(chat_engine, paragraphs):
    tok = chat_engine.tokenizer
    last = paragraphs[3].split(". ")[1] + "."
    document = "\n\n".join(paragraphs[:6]) + "\n\n" + last
    for method in ("auto", "parallelcomp"):
        plan = chat_engine.plan(document, chat=True, method=method, max_new_tokens=8)
        prompt = plan.prompt
        assert plan.method == "parallelcomp"
        assert prompt.head == [1] + tok.encode("<|im_start|>user\n")
        assert prompt.context == tok.encode("\n\n".join(paragraphs[:6]))
        # after a blank line, as the command line asks a question it is given
        assert prompt.question == tok.encode("\n\n" + last) + [2] + tok.encode("\n<|im_start|>assistant\n")
        assert prompt.eos_ids == frozenset({2})
    plan = chat_engine.plan(document, chat=True, method="full", max_new_tokens=8)  # full ranks nothing
    assert plan.method == "full" and plan.prompt.question == tok.encode(TURN_END)


def question_nll(model, prompt, span):
    """The question's NLL given [head + chunk] (EOS targets not scored), from one causal forward."""
    ids = prompt.head + prompt.context[span.start:span.stop] + prompt.question
    with torch.inference_mode():
        logits = model.causal_logits(torch.tensor([ids]))[0].double()
    start = len(prompt.head) + len(span) - 1
    nll = F.cross_entropy(logits[start:start + len(prompt.question)], torch.tensor(prompt.question), reduction="none")
    scored = torch.tensor([t not in prompt.eos_ids for t in prompt.question])
    return nll[scored].sum().item() / (len(prompt.question) - 1)


def test_chat_without_a_question_end_to_end(chat_engine, paragraphs):
    """generate keeps the chunk whose NLL of the last paragraph is lowest, which is not the one
    the template's closing tokens alone would keep."""
    tok = chat_engine.tokenizer
    last = paragraphs[3].split(". ")[1] + "."
    document = "\n\n".join(paragraphs[:6]) + "\n\n" + last
    head, context = [1] + tok.encode("<|im_start|>user\n"), tok.encode("\n\n".join(paragraphs[:6]))
    spans = chunk_spans(len(context), 300)
    by_paragraph = Prompt(head, context, tok.encode("\n\n" + last + TURN_END), 1, frozenset({2}))
    by_template = Prompt(head, context, tok.encode(TURN_END), 1, frozenset({2}))
    nll = [question_nll(chat_engine.model, by_paragraph, s) for s in spans]
    best = min(range(len(spans)), key=lambda j: nll[j])
    assert sorted(nll)[1] - nll[best] > 1e-3, "a clear winner"
    assert best != min(range(len(spans)), key=lambda j: question_nll(chat_engine.model, by_template, spans[j]))
    out = chat_engine.generate(document, chat=True, max_new_tokens=2,
                               config=ParallelCompConfig(chunk_tokens=300, top_k_chunks=1, cut_at="token"))
    assert out.stats["method"] == "parallelcomp" and out.stats["chunks"] == len(spans)
    assert out.stats["kept_spans"] == [[spans[best].start, spans[best].stop]]


def test_auto_without_a_question_uses_full_attention_when_the_last_paragraph_leaves_no_room(engine, paragraphs):
    """A document longer than the window whose last paragraph, standing in for the question, the
    head (BOS + instruction) and the answer leave no room for context: head + question + answer
    >= 512 tokens. Auto then encodes the whole prompt with full attention."""
    tok = engine.tokenizer
    instruction, last = paragraphs[1], paragraphs[3].split(". ")[1] + "."
    document = "\n\n".join([paragraphs[0], paragraphs[2], paragraphs[4], last])
    head, q = 1 + len(tok.encode(instruction)), 1 + len(tok.encode("\n\n" + last))  # BOS + text each
    assert (head, q) == (399, 102) and len(tok.encode(document)) > WINDOW
    no_room = WINDOW - head - q  # 11
    plan = engine.plan(document, instruction=instruction, max_new_tokens=no_room)
    assert plan.method == "full"
    assert plan.prompt.ids() == [1] + tok.encode(instruction) + tok.encode(document)  # the whole prompt, unsplit
    plan = engine.plan(document, instruction=instruction, max_new_tokens=no_room - 1)  # one token of room
    assert plan.method == "parallelcomp" and plan.prompt.question == [1] + tok.encode("\n\n" + last)
    out = engine.generate(document, instruction=instruction, max_new_tokens=no_room)
    assert out.stats["method"] == "full" and out.stats["prompt_tokens"] == head + len(tok.encode(document))


# ---------------------------------------------------------------------------- what importing loads

def test_the_engine_on_a_model_directory_imports_no_gguf():
    """gguf (and numpy) serve only the embedded default model's conversion (weights/smollm2.py).
    numpy itself cannot be checked: torch 2.13 imports it on `import torch`."""
    script = ("import sys, engine; e = engine.Engine(sys.argv[1], 'cpu'); e.generate('Once', max_new_tokens=2); "
              "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in ('gguf', 'weights'))))")
    p = subprocess.run([sys.executable, "-c", script, str(STORIES)], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["weights"]  # the package's WeightsError, not weights.smollm2 nor gguf


def hybrid_checkpoint(tmp_path, layout):
    """A copy of stories260K whose config.json describes a hybrid layout."""
    path = tmp_path / "stories260K"
    shutil.copytree(STORIES, path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "hybrid_attention": layout}))
    return path


def test_a_checkpoint_trained_for_the_hybrid_pattern_runs_it(tmp_path):
    """auto runs `hybrid` with the layout config.json gives: a sparse layer keeps sink + window
    entries of a 300-token prompt, so the cache is smaller than full attention's by the count
    worked out here."""
    layout = {"full_layers": [2, 2], "pattern": "window", "sink_tokens": 4, "window_tokens": 28}
    engine = Engine(hybrid_checkpoint(tmp_path, layout), "cpu")
    out = engine.generate("Once upon a time there was a little cat. " * 30, max_new_tokens=4)
    n = out.stats["prompt_tokens"]
    per_entry = 2 * engine.model.config.n_kv_heads * engine.model.config.head_dim * 4  # K and V, float32
    assert out.stats["method"] == "hybrid"
    assert out.stats["full_kv_bytes"] == n * 5 * per_entry
    assert out.stats["kv_bytes"] == (n + 4 * (4 + 28)) * per_entry  # one full layer, four sparse ones
    explicit = engine.generate("Once upon a time there was a little cat. " * 30, max_new_tokens=4, method="full")
    assert explicit.stats["method"] == "full"


def test_a_malformed_hybrid_layout_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="hybrid_attention: unknown key 'windows'"):
        Engine(hybrid_checkpoint(tmp_path, {"windows": 3}), "cpu")
