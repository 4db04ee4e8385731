"""examples/: the quick-start document puts its fact where only a method that looks at the whole
document can find it, measured in the default model's tokens (SmolLM2, an 8,192-token window).

Whatever a window of 8,192 tokens keeps of the head of a prompt (truncation: the first half of the
window) lies in the document's first 4,096 tokens; whatever it keeps of the end (truncation's
second half, StreamingLLM's recent window) lies in the last 8,192, the question and answer coming
after the document. The fact must lie between the two.
"""

import json

from conftest import REPO
from tokenizer import Tokenizer

DOCUMENT = REPO / "examples" / "frankenstein_safe_16k.txt"
FACT = "The code to open the captain's safe is 4721."


def test_the_fact_is_outside_what_truncation_and_a_recent_window_keep(smollm2_dir):
    tokenizer = Tokenizer.from_dir(smollm2_dir)
    window = json.loads((smollm2_dir / "config.json").read_text())["max_position_embeddings"]
    assert window == 8192
    text = DOCUMENT.read_text(encoding="utf-8")
    assert text.count(FACT) == 1 and "4721" not in text.replace(FACT, "")
    before, after = text.split(FACT)
    start, fact, end = (len(tokenizer.encode(part)) for part in (before, FACT, after))
    total = start + fact + end
    assert 16_000 <= total <= 24_000
    assert 0.35 <= start / total <= 0.50
    assert start >= window // 2 and end >= window
