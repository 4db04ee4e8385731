"""baselines.py against hand-computed layouts and the float64 reference forward (tests/reference.py).

stories260K (window 512) with an answer budget of 400 leaves room for 112 prompt tokens: a
300-token prompt is cut by truncate and streams through StreamingLLM's cache in blocks of 14
(an eighth of the room), which evicts 188 tokens over 13 blocks. Tolerance: relative error <= 1e-5.
"""

import pytest
import torch

import baselines
from baselines import BaselineConfig, YarnConfig
from conftest import BOOKS, STORIES, Stories
from engine import Engine, cli_message
from prefill import OptionError, Prompt
from reference import ref_forward, ref_rotations, rel_err

TOL = 1e-5
ANSWER = 400
ROOM = 112  # 512 - ANSWER
SINKS = 4  # StreamingLLM's attention sinks
BLOCK = 14  # ROOM // 8


class Setup(Stories):
    def __init__(self):
        super().__init__()
        tok = self.tok
        text = (BOOKS / "frankenstein.txt").read_text()[20000:26000]
        self.prompt = Prompt([1], tok.encode(text)[:299], [], bos_id=1, eos_ids=frozenset({2}))
        self.ids = self.prompt.ids()


@pytest.fixture(scope="module")
def s():
    return Setup()


def rotate(rows, cfg, positions, inverse=False):
    """RoPE of rows (T, heads, d) at positions, or its inverse, by tests/reference.py's matrices
    (rotations, scaled by YaRN's temperature where the config has YaRN)."""
    mats = ref_rotations(cfg, list(positions))
    return torch.einsum("tij,thj->thi", torch.linalg.inv(mats) if inverse else mats, rows)


def test_room_is_the_window_less_the_answer(s):
    assert baselines.SINK_TOKENS == SINKS
    assert baselines.room(s.model, ANSWER) == ROOM
    assert baselines.room(s.model, 507) == 5
    for prefill in (baselines.prefill_truncate, baselines.prefill_streaming):
        with pytest.raises(OptionError) as e:
            prefill(s.model, s.prompt, BaselineConfig(), 508)  # 508 + 4 sinks fill the window
        assert e.value.param == "max_new_tokens" and str(e.value).startswith("max_new_tokens must leave room")


# ---------------------------------------------------------------------------- full and truncate

def test_full_is_a_causal_forward_of_the_prompt(s):
    prompt = Prompt([1], s.prompt.context[:39], [1, 5, 6], bos_id=1)
    ids = prompt.ids()
    record = []
    logits = ref_forward(s.w, s.cfg, ids, list(range(len(ids))), record=record)
    with torch.inference_mode():
        got = baselines.prefill_full(s.model, prompt, BaselineConfig(), 10)
    assert rel_err(got.logits, logits[-1]) <= TOL
    assert got.next_position == len(ids) == 43 and got.cache.lens.tolist() == [43] * 5
    assert got.cache.capacity >= 43 + 10
    for layer, r in enumerate(record):
        assert rel_err(got.cache.k[layer, 0, :, :43].transpose(0, 1), r["k"]) <= TOL
    assert got.stats == dict(truncated_tokens=0, forwards=[[43, 43]], scored_tokens=0)


def test_truncate_by_hand():
    ids = list(range(100, 120))
    assert baselines.truncate(ids, 7) == [100, 101, 102, 116, 117, 118, 119]
    assert baselines.truncate(ids, 8) == [100, 101, 102, 103, 116, 117, 118, 119]
    assert baselines.truncate(ids, 20) == ids
    assert baselines.truncate(ids, 30) == ids


def test_prefill_truncate_keeps_both_ends_of_the_prompt(s):
    """room 112: the first 56 and the last 56 of the 300 prompt tokens, at positions 0..111."""
    kept = s.ids[:56] + s.ids[244:]
    assert len(kept) == ROOM and baselines.truncate(s.ids, ROOM) == kept
    record = []
    logits = ref_forward(s.w, s.cfg, kept, list(range(ROOM)), record=record)
    with torch.inference_mode():
        got = baselines.prefill_truncate(s.model, s.prompt, BaselineConfig(), ANSWER)
    assert rel_err(got.logits, logits[-1]) <= TOL
    for layer, r in enumerate(record):  # every kept token's key, so the kept ids and their order
        assert rel_err(got.cache.k[layer, 0, :, :ROOM].transpose(0, 1), r["k"]) <= TOL
    assert got.next_position == ROOM and got.cache.lens.tolist() == [ROOM] * 5
    assert got.stats == dict(truncated_tokens=188, forwards=[[ROOM, ROOM]], scored_tokens=0)


# ---------------------------------------------------------------------------- streaming

def reference_streaming(w, cfg, ids):
    """StreamingLLM over ids in float64, block by block: a block first evicts the oldest tokens
    after the sinks that would overflow the room, then attends, at the positions after the
    cache's, to what the cache holds and to itself. A token's K and V are those of the forward
    that encoded it (they depend on what it attended to then); keys are kept before RoPE and
    rotated at the cache positions 0..n-1 that the cache holds them at now.

    Returns (the prompt indices the cache holds, in slot order; per layer (K, V) (n, H_kv, d);
    the logits at the last token)."""
    L, Hkv, d = cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["head_dim"]
    empty = torch.zeros(0, Hkv, d, dtype=torch.float64)
    kept, raw_k, v = [], [empty] * L, [empty] * L  # raw_k: keys before RoPE
    for start in range(0, len(ids), BLOCK):
        tokens = ids[start:start + BLOCK]
        drop = max(0, len(kept) + len(tokens) - ROOM)
        stay = [j for j in range(len(kept)) if not SINKS <= j < SINKS + drop]
        kept, raw_k, v = [kept[j] for j in stay], [k[stay] for k in raw_k], [x[stay] for x in v]
        n, positions, record = len(kept), range(len(kept), len(kept) + len(tokens)), []
        past = [(rotate(raw_k[i], cfg, range(n)), v[i]) for i in range(L)] if n else None
        logits = ref_forward(w, cfg, tokens, list(positions), past=past, record=record)
        raw_k = [torch.cat([raw_k[i], rotate(r["k"], cfg, positions, inverse=True)]) for i, r in enumerate(record)]
        v = [torch.cat([v[i], r["v"]]) for i, r in enumerate(record)]
        kept += range(start, start + len(tokens))
    return kept, [(rotate(raw_k[i], cfg, range(len(kept))), v[i]) for i in range(L)], logits[-1]


def test_streaming_cache_against_a_float64_replay(s):
    kept, past, logits = reference_streaming(s.w, s.cfg, s.ids)
    assert kept == [0, 1, 2, 3] + list(range(192, 300))  # the sinks and the 108 most recent tokens
    with torch.inference_mode():
        got = baselines.prefill_streaming(s.model, s.prompt, BaselineConfig(), ANSWER)
    assert got.next_position == ROOM and got.cache.lens.tolist() == [ROOM] * 5
    assert rel_err(got.logits, logits) <= TOL
    for layer, (k, v) in enumerate(past):
        assert rel_err(got.cache.k[layer, 0, :, :ROOM].transpose(0, 1), k) <= TOL
        assert rel_err(got.cache.v[layer, 0, :, :ROOM].transpose(0, 1), v) <= TOL
    # 22 blocks: 8 fill the room, 13 more of 14 tokens and one of 6 each evict as many
    assert got.stats["forwards"] == [[14, 14 * (i + 1)] for i in range(8)] + [[14, ROOM]] * 13 + [[6, ROOM]]
    assert got.stats["truncated_tokens"] == 188 and got.stats["scored_tokens"] == 0

    token = int(got.logits.argmax())  # the decode loop continues at position 112 over the same cache
    with torch.inference_mode():
        hidden = s.model(torch.tensor([[token]]), torch.tensor([[ROOM]]), got.cache.decode_attend)
        step = s.model.logits(hidden)[0, 0]
    assert rel_err(step, ref_forward(s.w, s.cfg, [token], [ROOM], past=past)[0]) <= TOL


def test_streaming_a_prompt_within_the_room_is_plain_prefill(s):
    prompt = Prompt([1], s.prompt.context[:49], [], bos_id=1)
    logits = ref_forward(s.w, s.cfg, prompt.ids(), list(range(50)))
    with torch.inference_mode():
        got = baselines.prefill_streaming(s.model, prompt, BaselineConfig(), ANSWER)
    assert rel_err(got.logits, logits[-1]) <= TOL
    assert got.next_position == 50 and got.stats["truncated_tokens"] == 0
    assert got.stats["forwards"] == [[14, 14], [14, 28], [14, 42], [8, 50]]


# ---------------------------------------------------------------------------- YaRN

def yarn_config(cfg, factor):
    """stories260K's config.json as a checkpoint trained with YaRN over its 512 positions would have it."""
    return {**cfg, "rope_scaling": {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": 512}}


def test_streaming_turns_yarn_keys_back_without_a_second_temperature(s):
    """StreamingLLM on a model with YaRN: kept keys turn back by a pure rotation (they carry the
    temperature once), as the float64 replay with YaRN in the config does."""
    scaling = yarn_config(s.cfg, 2.0)["rope_scaling"]
    model = s.model.with_rope_scaling(scaling, 512)
    _, past, logits = reference_streaming(s.w, yarn_config(s.cfg, 2.0), s.ids)
    with torch.inference_mode():
        got = baselines.prefill_streaming(model, s.prompt, BaselineConfig(), ANSWER)
    assert rel_err(got.logits, logits) <= TOL
    for layer, (k, _) in enumerate(past):
        assert rel_err(got.cache.k[layer, 0, :, :ROOM].transpose(0, 1), k) <= TOL


def test_yarn_method_is_the_float64_forward_with_yarn(s):
    """--method yarn --yarn-factor 2 on stories260K: the prefill's logits and every greedy token the
    engine decodes (on the YaRN view) are those of the float64 forward with YaRN (factor 2 over
    its 512 positions) in config.json; the window grows to 1024."""
    engine = Engine(STORIES, "cpu")
    document = engine.tokenizer.decode(s.prompt.context[:150])
    prompt = engine.layout(document)
    ids = prompt.ids()
    with torch.inference_mode():
        got = baselines.prefill_yarn(engine.model, prompt, YarnConfig(factor=2.0), 8)
        plain = baselines.prefill_full(engine.model, prompt, BaselineConfig(), 8).logits
    out = engine.generate(document, method="yarn", config=YarnConfig(factor=2.0), max_new_tokens=8)
    assert out.stats["prompt_tokens"] == len(ids) and len(out.tokens) > 1
    assert got.model.config.max_position_embeddings == 1024 and engine.model.config.rope_scaling is None
    n = len(ids)
    ref = ref_forward(s.w, yarn_config(s.cfg, 2.0), ids + out.tokens[:-1], list(range(n - 1 + len(out.tokens))))
    assert rel_err(got.logits, ref[n - 1]) <= TOL
    assert rel_err(got.logits, plain) > 1e-2  # YaRN changes them
    assert out.tokens == ref[n - 1:].argmax(-1).tolist()
    assert got.stats == dict(truncated_tokens=0, forwards=[[n, n]], scored_tokens=0)


def test_yarn_method_reads_past_the_trained_window():
    """A prompt of about 900 tokens, past stories260K's 512 positions, within YaRN's 1024: served."""
    engine = Engine(STORIES, "cpu")
    tok = engine.tokenizer
    text = tok.decode(tok.encode((BOOKS / "frankenstein.txt").read_text()[30000:40000])[:899])
    out = engine.generate(text, method="yarn", config=YarnConfig(factor=2.0), max_new_tokens=20)
    assert 512 < out.stats["prompt_tokens"] <= 1004 and len(out.tokens) >= 1


def test_yarn_refusals(s):
    prompt = Prompt([1], list(range(3, 900)), [], bos_id=1)
    with pytest.raises(OptionError) as e:
        baselines.prefill_yarn(s.model, prompt, YarnConfig(factor=2.0), 200)  # 898 + 200 > 1024
    assert e.value.param == "factor" and "YaRN's 1,024-token window" in str(e.value)
    assert cli_message(e.value).count("--yarn-factor") == 2
    with pytest.raises(OptionError, match="factor must be at least 1"):
        baselines.prefill_yarn(s.model, prompt, YarnConfig(factor=0.5), 10)
    scaled = s.model.with_rope_scaling({"rope_type": "linear", "factor": 2.0}, 1024)
    with pytest.raises(OptionError) as e:
        baselines.prefill_yarn(scaled, prompt, YarnConfig(), 10)
    assert e.value.param == "method" and "--method yarn" in cli_message(e.value) and "linear scaling" in str(e.value)
