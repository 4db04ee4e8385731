"""Real models against tests/assets/reference.json (numbers computed with Hugging Face
transformers in float32 on the CPU; see ../shared/docs/models_and_data.md §4).

stories260K: the shipped checkpoint (tests/assets), through the model API and through Engine.
SmolLM2-135M-Instruct: as converted by weights/smollm2.py (the `smollm2_dir` fixture in conftest.py).
"""

import math

import pytest
import torch

from conftest import BOOKS, STORIES
from engine import Engine
from checkpoint import load_model
from model import KVCache

BOOK = BOOKS / "pride_and_prejudice.txt"
SPECIAL_TEXTS = ("<|im_end|>", "<|im_start|>", "<|endoftext|>")


def forward_logits(model, ids):
    """float32 logits (T, vocab) of one causal forward over ids at positions 0..T-1."""
    with torch.inference_mode():
        return model.causal_logits(torch.tensor([ids]))[0]


def next_token_nll(logits, ids):
    """NLL (T-1,) of ids[1:] given the prefixes, log-softmax in float64."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    return -logp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def streamed(engine, *args, **kwargs):
    pieces = []
    generation = engine.generate(*args, on_text=pieces.append, **kwargs)
    return generation, "".join(pieces)


# ---------------------------------------------------------------------------- stories260K

@pytest.fixture(scope="module")
def stories_ref(reference):
    return reference["stories260K"]


@pytest.fixture(scope="module")
def stories_model():
    return load_model(STORIES, "cpu", torch.float32)


def test_stories260K_greedy_200_from_bos_model_api(stories_model, stories_ref):
    """[BOS] prefilled, then 199 single-token decode steps through the KV cache, argmax each time."""
    model, expected = stories_model, stories_ref["greedy_200_from_bos"]
    cache = KVCache(model.config, 1, 1 + len(expected), "cpu", torch.float32)
    with torch.inference_mode():
        hidden = model(torch.tensor([[1]]), torch.tensor([[0]]), cache.prefill_attend(0))
        ids = [model.logits(hidden[0, -1]).argmax().item()]
        while len(ids) < len(expected):
            hidden = model(torch.tensor([[ids[-1]]]), torch.tensor([[len(ids)]]), cache.decode_attend)
            ids.append(model.logits(hidden[0, -1]).argmax().item())
    assert ids == expected


def test_stories260K_ppl_of_own_greedy_sample(stories_model, stories_ref):
    ids = [1] + stories_ref["greedy_200_from_bos"]
    logits = forward_logits(stories_model, ids)
    assert logits[:-1].argmax(-1).tolist() == ids[1:]  # teacher-forced argmax = the greedy sample
    ppl = math.exp(next_token_nll(logits, ids).mean().item())
    assert ppl == pytest.approx(stories_ref["ppl_of_own_greedy_sample"], rel=1e-3)


def test_stories260K_greedy_through_engine(stories_ref):
    """Engine.generate needs a non-empty document, so the prompt is "Once" (= [BOS, 403], the
    first greedy token); the 199 tokens after it must be the rest of the reference sample."""
    engine = Engine(STORIES, device="cpu", dtype=torch.float32)
    expected = stories_ref["greedy_200_from_bos"]
    assert engine.layout("Once").ids() == [1, expected[0]]
    generation, text = streamed(engine, "Once", max_new_tokens=len(expected) - 1, temperature=0.0)
    assert generation.stats["method"] == "full"
    assert generation.tokens == expected[1:]
    assert "Once" + text == stories_ref["greedy_200_text"]
    assert generation.text == engine.tokenizer.decode(expected[1:])


# ---------------------------------------------------------------------------- SmolLM2-135M-Instruct

@pytest.fixture(scope="module")
def smol_ref(reference):
    return reference["smollm2"]


@pytest.fixture(scope="module")
def smol_engine(smollm2_dir):
    return Engine(smollm2_dir, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def passage(smol_engine, smol_ref):
    """The reference passage (§4): 512 tokens without BOS, and their float32 logits."""
    book = BOOK.read_text(encoding="utf-8")
    start = book.index("It is a truth universally acknowledged")
    ids = smol_engine.tokenizer.encode(book[start:start + 6000])[:512]
    assert len(ids) == 512 and ids[:16] == smol_ref["first_ids"]
    return ids, forward_logits(smol_engine.model, ids)


def test_smollm2_perplexity(passage, smol_ref):
    ids, logits = passage
    nll = next_token_nll(logits, ids)
    assert nll.shape == (511,)
    assert math.exp(nll.mean().item()) == pytest.approx(smol_ref["ppl_512"], abs=0.02)
    assert math.exp(nll[:255].mean().item()) == pytest.approx(smol_ref["ppl_first_256"], abs=0.02)


def test_smollm2_last_logits_top5(passage, smol_ref):
    _, logits = passage
    values, ids = logits[511].topk(5)
    assert ids.tolist() == [i for i, _ in smol_ref["last_logits_top5"]]
    assert values.tolist() == pytest.approx([v for _, v in smol_ref["last_logits_top5"]], abs=1e-3)


@pytest.mark.parametrize("prompt", [
    "The capital of France is",
    "The history of the Roman Empire begins",
    "It is a truth universally acknowledged, that a single man in possession of a good fortune,",
])
def test_smollm2_greedy_32(smol_engine, smol_ref, prompt):
    case = smol_ref["greedy_32"][prompt]
    assert smol_engine.layout(prompt).ids() == case["prompt_ids"]  # no BOS for SmolLM2
    generation, text = streamed(smol_engine, prompt, max_new_tokens=32, temperature=0.0)
    expected = case["ids"][:case["ids"].index(2)] if 2 in case["ids"] else case["ids"]
    assert generation.tokens == expected  # the engine stops at EOS 2 and does not return it
    reference_text = case["text"]
    for special in SPECIAL_TEXTS:
        reference_text = reference_text.replace(special, "")
    assert generation.text == reference_text
    assert text == reference_text  # what was streamed to on_text


def test_smollm2_chat_template(smol_engine, smol_ref):
    messages = [{"role": "user", "content": "What is 2+2?"}]
    text = smol_engine.tokenizer.render_chat(messages)
    assert text == smol_ref["chat_template_text"]
    assert smol_engine.tokenizer.encode(text) == smol_ref["chat_template_ids"]
    # the engine's chat layout (head / document / tail encoded separately) gives the same ids
    assert smol_engine.layout("What is 2+2?", chat=True).ids() == smol_ref["chat_template_ids"]
