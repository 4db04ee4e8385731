"""parallelcomp.chunk_spans for any context length and chunk size."""

import math

from hypothesis import given
from hypothesis import strategies as st

from parallelcomp import chunk_spans


@given(n_tokens=st.integers(1, 100_000), chunk_tokens=st.integers(1, 10_000))
def test_chunks_cover_the_context_once_in_order_within_budget(n_tokens, chunk_tokens):
    spans = chunk_spans(n_tokens, chunk_tokens)
    assert spans[0].start == 0 and spans[-1].stop == n_tokens
    assert all(a.stop == b.start for a, b in zip(spans, spans[1:]))  # contiguous: each token once, in order
    assert all(span.step == 1 for span in spans)
    assert len(spans) == math.ceil(n_tokens / chunk_tokens)
    lengths = [len(span) for span in spans]
    assert 1 <= min(lengths) and max(lengths) <= chunk_tokens
    assert max(lengths) - min(lengths) <= 1


def test_empty_context_is_one_empty_chunk():
    assert chunk_spans(0, 5) == [range(0, 0)]  # ParallelComp still has a chunk (the head) to rank
