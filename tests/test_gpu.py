"""GPU paths: bf16 SmolLM2 against the float32 golden tokens, CUDA-graph decode against eager decode.

Skipped on machines without CUDA (CI); run on the GPU machine with `python -m pytest tests/test_gpu.py`.
"""

import sys
from pathlib import Path

import pytest
import torch

from engine import Engine
from parallelcomp import Calibration, ParallelCompConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))
from passkey import INSTRUCTION, QUESTION, passkey_document  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def engine(smollm2_dir):
    return Engine(smollm2_dir, "cuda", torch.bfloat16)


def test_bf16_greedy_equals_the_float32_reference(engine, reference):
    """The three SmolLM2 prompts of reference.json: greedy bf16 tokens on the GPU equal the float32 ones."""
    for prompt, expected in reference["smollm2"]["greedy_32"].items():
        out = engine.generate(prompt, max_new_tokens=32)
        ids = [t for t in expected["ids"] if t != 2]  # the reference keeps the final EOS
        assert out.tokens == ids, prompt


@pytest.mark.parametrize("method", ["full", "parallelcomp", "parallelcomp+calibration", "streaming"])
def test_graph_decode_equals_eager_decode(engine, method):
    """Greedy and seeded sampling give the same tokens with the captured graph as with the eager step,
    after plain and ParallelComp prefill (with calibration, the layers' cache lengths differ)."""
    document = passkey_document(engine.tokenizer, 12000, 0.4, "73019")
    parallel = ParallelCompConfig(chunk_tokens=3000, top_k_chunks=2,
                                  calibration=Calibration("sink", 3, 6) if "calibration" in method else None)
    kwargs = dict(instruction=INSTRUCTION, method=method.split("+")[0], max_new_tokens=100, parallel=parallel)
    for sampling in (dict(), dict(temperature=0.8, top_p=0.95, top_k=50, seed=7)):
        graph = engine.generate(document, QUESTION, cuda_graph=True, **kwargs, **sampling)
        eager = engine.generate(document, QUESTION, cuda_graph=False, **kwargs, **sampling)
        assert graph.tokens == eager.tokens, sampling
        assert len(graph.tokens) > 1
