"""prefill.py: causal_prefill and extend against the float64 reference forward (tests/reference.py),
on stories260K, in pieces of a few tokens; extend after layers of unequal lengths, as attention
calibration leaves them. Tolerance: relative error <= 1e-5. OptionError's two namings. The
memory a CPU prefill may take."""

import os

import pytest
import torch

import prefill
from conftest import BOOKS, STORIES, Stories
from prefill import OptionError, Prompt, available_memory, causal_prefill, extend, free_memory
from reference import ref_forward, rel_err
from tokenizer import Tokenizer

TOL = 1e-5


class Setup(Stories):
    def __init__(self):
        super().__init__()
        text = (BOOKS / "frankenstein.txt").read_text()[20000:22000]
        self.ids = [1] + Tokenizer.from_dir(STORIES).encode(text)[:59]


@pytest.fixture(scope="module")
def s():
    return Setup()


def test_option_error_names_the_parameters_or_their_flags():
    e = OptionError("pot_keep", "{} must be below {} (256)", "pot_tokens")
    assert isinstance(e, ValueError) and e.param == "pot_keep"
    assert str(e) == "pot_keep must be below pot_tokens (256)"
    assert e.named(lambda name: "--" + name.replace("_", "-")) == "--pot-keep must be below --pot-tokens (256)"


def test_prompt_ids_are_head_context_question():
    prompt = Prompt([1, 9], [5, 6, 7], [1, 8], bos_id=1, eos_ids=frozenset({2}))
    assert prompt.ids() == [1, 9, 5, 6, 7, 1, 8]


def test_causal_prefill_in_pieces_matches_float64(s, monkeypatch):
    monkeypatch.setitem(prefill.PREFILL_PIECE, "cpu", 16)  # 40 tokens in pieces of 16, 16 and 8
    ids, record = s.ids[:40], []
    logits = ref_forward(s.w, s.cfg, ids, list(range(40)), record=record)
    with torch.inference_mode():
        cache, got = causal_prefill(s.model, ids, 10)
    assert rel_err(got, logits[-1]) <= TOL
    assert cache.lens.tolist() == [40] * 5 and cache.capacity >= 50
    for layer, r in enumerate(record):
        assert rel_err(cache.k[layer, 0, :, :40].transpose(0, 1), r["k"]) <= TOL
        assert rel_err(cache.v[layer, 0, :, :40].transpose(0, 1), r["v"]) <= TOL


def test_extend_after_unequal_layer_lengths_matches_float64(s, monkeypatch):
    """40 tokens prefilled, then each layer thinned to its own length, each KV head keeping its own
    slots (as calibration leaves the cache); extend appends 20 tokens at positions 40..59 in
    pieces of 7, each layer after its own live entries: the float64 forward of those 20 tokens
    attending, in each layer, to exactly that layer's kept keys and values."""
    monkeypatch.setitem(prefill.PREFILL_PIECE, "cpu", 7)
    first, then = s.ids[:40], s.ids[40:60]
    record = []
    ref_forward(s.w, s.cfg, first, list(range(40)), record=record)
    g = torch.Generator().manual_seed(0)
    dropped = [0, 5, 12, 0, 3]  # per layer
    past, kept = [], []
    with torch.inference_mode():
        cache, _ = causal_prefill(s.model, first, len(then))
        for layer, (r, m) in enumerate(zip(record, dropped)):
            keep = torch.stack([torch.randperm(40, generator=g)[:40 - m].sort().values for _ in range(4)])  # (H_kv, n)
            for h, slots in enumerate(keep):
                cache.k[layer, 0, h, :40 - m] = cache.k[layer, 0, h, slots].clone()
                cache.v[layer, 0, h, :40 - m] = cache.v[layer, 0, h, slots].clone()
            cache.lens[layer] = 40 - m
            past.append((torch.stack([r["k"][slots, h] for h, slots in enumerate(keep)], 1),
                         torch.stack([r["v"][slots, h] for h, slots in enumerate(keep)], 1)))
            kept.append(40 - m)
        got = extend(s.model, cache, then, 40)
    record = []
    logits = ref_forward(s.w, s.cfg, then, list(range(40, 60)), past=past, record=record)
    assert rel_err(got, logits[-1]) <= TOL
    assert cache.lens.tolist() == [n + 20 for n in kept]
    for layer, (r, n) in enumerate(zip(record, kept)):
        assert rel_err(cache.k[layer, 0, :, n:n + 20].transpose(0, 1), r["k"]) <= TOL


# ---------------------------------------------------------------------------- free memory on the CPU

MEMINFO = """MemTotal:       24683784 kB
MemFree:          734208 kB
MemAvailable:   14680064 kB
Buffers:           37020 kB
Cached:         10267348 kB
"""


def test_cpu_memory_is_what_the_kernel_calls_available(tmp_path):
    """MemAvailable (free pages plus the cache the kernel gives back), not MemFree."""
    (tmp_path / "meminfo").write_text(MEMINFO)
    assert available_memory(tmp_path / "meminfo") == 14680064 * 1024


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="no /proc/meminfo: not Linux")
def test_free_memory_on_this_cpu_is_its_mem_available():
    with open("/proc/meminfo") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    assert free_memory(torch.device("cpu")) == pytest.approx(kib * 1024, rel=0.05)


@pytest.mark.skipif("SC_AVPHYS_PAGES" not in os.sysconf_names, reason="the system does not count free pages")
def test_without_mem_available_the_free_pages(tmp_path):
    """A kernel before 3.14 (no MemAvailable line) or no /proc: the free pages the system counts."""
    (tmp_path / "meminfo").write_text("MemTotal:       24683784 kB\nMemFree:          734208 kB\n")
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for path in (tmp_path / "meminfo", tmp_path / "absent"):
        assert available_memory(path) == pytest.approx(free, rel=0.1)
