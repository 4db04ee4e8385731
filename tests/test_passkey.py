"""SmolLM2 finds a 5-digit passkey hidden in 8K tokens of filler with ParallelComp (CPU, about a minute).

The prompt is eval/passkey.py's: its instruction, filler with the key at a depth, the question.
2048-token chunks and one kept chunk (the original keeps one for passkey): four chunks, of which
chunk eviction must keep the one holding the key, whose K/V then serve the answer.
"""

import sys

import pytest
import torch

from conftest import REPO
from engine import Engine
from parallelcomp import ParallelCompConfig

sys.path.insert(0, str(REPO / "eval"))
from passkey import INSTRUCTION, QUESTION, passkey_document  # noqa: E402


@pytest.fixture(scope="module")
def engine(smollm2_dir):
    return Engine(smollm2_dir, "cpu", torch.float32)


@pytest.mark.parametrize("depth, key", [(0.1, "31415"), (0.5, "27182"), (0.9, "16180")])
def test_parallelcomp_finds_the_passkey_in_8k_tokens(engine, depth, key):
    document = passkey_document(engine.tokenizer, 8192, depth, key)
    out = engine.generate(document, QUESTION, instruction=INSTRUCTION, method="parallelcomp", max_new_tokens=8,
                          config=ParallelCompConfig(chunk_tokens=2048, top_k_chunks=1))
    # sentence cuts need room: chunks of at most 2048 - 2048 // 16 tokens, 5 for ~7,850 context tokens
    assert 7800 <= out.stats["prompt_tokens"] <= 8192 and out.stats["chunks"] == 5
    key_at = len(engine.tokenizer.encode(document[:document.index(key)]))
    [(start, stop)] = out.stats["kept_spans"]
    assert start <= key_at < stop, "the chunk holding the key is the one kept"
    assert key in out.text
