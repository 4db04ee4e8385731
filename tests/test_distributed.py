"""distributed.py (and ranks.py): ParallelComp over two CPU processes (gloo) against one process and the float64
reference forward (tests/reference.py).

stories260K and the 4-chunk setup of test_parallelcomp.py (607 context tokens, chunk_tokens=152).
One pair of processes, spawned once, runs every setting and stores what each rank saw; the tests
compare it with the one-process run here (itself checked against float64 in test_parallelcomp.py)
and with the float64 forward. Failures are made by test-side model wrappers on one rank. The
command line runs under torchrun in subprocesses.
"""

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import distributed
from attention import merge_lse
from conftest import BOOKS, STORIES, ctrl_c_enabled, stories_heads
from decoding import SamplingParams, decode
from distributed import attention_lse
from parallelcomp import Calibration, ChunkEncoder, ParallelCompConfig, chunk_spans
from prefill import Prompt
from ranks import decoded
from reference import load_float64, ref_forward, rel_err

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"
TOL = 1e-5
STEPS = 8  # greedy tokens compared
QUESTION = "What did the monster see?"
CONFIGS = {  # stories260K's last question token attends mostly to recent tokens: thresholds that evict
    "gather": ParallelCompConfig(chunk_tokens=152, top_k_chunks=2),
    "gather+kv+calibration": ParallelCompConfig(chunk_tokens=152, top_k_chunks=3, kv_budget=40,
                                                calibration=Calibration("all", 1, 3)),
    "sharded": ParallelCompConfig(chunk_tokens=152, top_k_chunks=2, kv_placement="sharded"),
    "sharded top-1": ParallelCompConfig(chunk_tokens=152, top_k_chunks=1, kv_placement="sharded"),
    "sharded+kv+calibration": ParallelCompConfig(chunk_tokens=152, top_k_chunks=3, kv_budget=40,
                                                 calibration=Calibration("all", 1, 3), kv_placement="sharded"),
    "sharded+sink calibration": ParallelCompConfig(chunk_tokens=152, top_k_chunks=3, kv_placement="sharded",
                                                   calibration=Calibration("sink", 1, 3, threshold=0.01)),
}


def load():
    from checkpoint import load_model
    from tokenizer import Tokenizer
    model, tok = load_model(STORIES, "cpu", torch.float32), Tokenizer.from_dir(STORIES)
    text = (BOOKS / "frankenstein.txt").read_text()[20000:26000]
    context = tok.encode(text)[:607]  # 4 chunks of 151-152 tokens
    prompt = Prompt([1] + tok.encode("Read the story."), context, [1] + tok.encode(QUESTION), bos_id=1,
                    eos_ids=frozenset({2}))
    twins = Prompt(prompt.head, context[:150] * 4, prompt.question, bos_id=1)  # 4 equal chunks: equal NLLs
    return model, prompt, twins, text


def run(model, prompt, config):
    """Prefill and 8 greedy tokens: what this rank holds, its own tokens and decoded()'s answer."""
    with torch.inference_mode():
        p = distributed.prefill(model, prompt, config, STEPS)
        out = dict(stats=p.stats, next_position=p.next_position, cache=type(p.cache).__name__)

        def own_decode():
            out["logits"] = p.logits.clone()
            out["own_tokens"] = decode(model, p, SamplingParams().sampler("cpu"), STEPS, {2}, False, lambda t: None)[0]
            out.update(k=p.cache.k.clone(), v=p.cache.v.clone(), lens=p.cache.lens.clone())  # 7 decoded tokens in
            return out["own_tokens"]
        out["tokens"] = decoded(p, own_decode)
    return out


class FailingModel:
    """The model, made to fail on this rank: fail(attend, tokens) -> raises, or wraps the attend."""

    def __init__(self, model, fail):
        self.model, self.fail, self.config, self.logits = model, fail, model.config, model.logits
        self.device, self.dtype = model.device, model.dtype

    def __call__(self, tokens, positions, attend, observe=None):
        return self.model(tokens, positions, self.fail(attend, tokens), observe)


def out_of_memory_in_encoding(attend, tokens):
    if isinstance(attend, ChunkEncoder):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return attend


def bad_attention_input(when):
    """An attend whose layer-2 query arrives in float64, which this rank's attention cannot take."""
    def fail(attend, tokens):
        if not when(attend, tokens):
            return attend
        return lambda layer, q, k, v: attend(layer, q.double() if layer == 2 else q, k, v).float()
    return fail


FAILURES = {  # name: (failing rank, its model's fail, config, whether to decode)
    "encoding": (1, out_of_memory_in_encoding, CONFIGS["gather"], False),
    "sharded query pass": (1, bad_attention_input(lambda attend, _: isinstance(attend, distributed.ShardedQueryPass)),
                           CONFIGS["sharded"], False),
    "sharded decode": (1, bad_attention_input(lambda attend, tokens: tokens.shape[1] == 1), CONFIGS["sharded"], True),
    "rank 0's query pass": (0, bad_attention_input(lambda attend, tokens: tokens.shape[0] == 1 and tokens.shape[1] > 1),
                            CONFIGS["gather"], False),
}


def worker(rank, rendezvous, folder):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    model, prompt, twins, text = load()
    results = {name: run(model, prompt, config) for name, config in CONFIGS.items()}
    results["ties"] = run(model, twins, ParallelCompConfig(chunk_tokens=150, top_k_chunks=2))
    results["engine"] = engine_runs(text)
    results["failures"] = {}
    for name, (failing, fail, config, decodes) in FAILURES.items():
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                used = FailingModel(model, fail) if rank == failing else model
                p = distributed.prefill(used, prompt, config, STEPS)
                if decodes:
                    decoded(p, lambda: decode(used, p, SamplingParams().sampler("cpu"), STEPS, {2}, False,
                                                          lambda t: None))
            results["failures"][name] = None
        except Exception as e:
            results["failures"][name] = (type(e).__name__, str(e), time.perf_counter() - start)
    torch.save(results, Path(folder) / f"rank{rank}.pt")
    dist.barrier()
    # Leave without the interpreter's teardown: there gloo's threads race with the group's destruction
    # (torch 2.13: "terminate called without an active exception", in about 1 of 30 spawns)
    os._exit(0)


def engine_runs(text):
    """Engine.generate with the process group up: gather (rank 0 alone decodes and streams), and
    sharded with sampling and no seed (every rank samples, in lockstep, the same tokens)."""
    from engine import Engine
    engine, runs = Engine(STORIES, "cpu"), {}
    for name, config, temperature in (("gather", ParallelCompConfig(), 0.0),
                                      ("sharded sampled", ParallelCompConfig(kv_placement="sharded"), 1.0)):
        streamed = []
        out = engine.generate(text[:3000], QUESTION, method="parallelcomp", config=config, max_new_tokens=12,
                              temperature=temperature, on_text=streamed.append)
        runs[name] = dict(text=out.text, tokens=out.tokens, stats=out.stats, streamed="".join(streamed))
    return runs


@pytest.fixture(scope="module")
def ranks():
    """What rank 0 and rank 1 saw, from one spawn of two processes."""
    with tempfile.TemporaryDirectory() as folder:
        context = mp.start_processes(worker, args=(Path(folder) / "rendezvous", folder), nprocs=2, join=False,
                                     start_method="spawn")
        deadline = time.monotonic() + 120
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                for p in context.processes:
                    p.kill()
                pytest.fail("the two processes did not finish in 120 s")
        return [torch.load(Path(folder) / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def setup():
    return load()


@pytest.fixture(scope="module")
def single(setup):
    model, prompt, twins, _ = setup
    return {**{name: run(model, prompt, config) for name, config in CONFIGS.items()},
            "ties": run(model, twins, ParallelCompConfig(chunk_tokens=150, top_k_chunks=2))}


# ---------------------------------------------------------------------------- attention with log-sum-exp

def test_partial_attentions_merge_to_one_softmax(monkeypatch):
    """attention_lse over three disjoint key sets (one empty, one hidden from some rows per KV
    head) merged by merge_lse equals a float64 softmax over the visible keys, row by row, in
    blocks of query rows too."""
    monkeypatch.setattr("distributed.LSE_BLOCK", 2 * 8 * 18)  # blocks of 3 query rows over 12 keys, 2 over 18
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, t, 16, generator=g) for h, t in ((8, 5), (2, 30), (2, 30)))
    visible = torch.rand(1, 2, 5, 30, generator=g) > 0.3  # (1, H_kv, Tq, Tk)
    visible[..., 0] = True  # every row sees a key
    parts = [attention_lse(q, k[:, :, a:b], v[:, :, a:b], visible[..., a:b]) for a, b in ((0, 12), (12, 12), (12, 30))]
    assert torch.equal(parts[1][1], torch.full((1, 8, 5), float("-inf"))) and not parts[1][0].any()
    out = merge_lse(torch.stack([o for o, _ in parts]), torch.stack([lse for _, lse in parts]))
    for h in range(8):
        for i in range(5):
            seen = visible[0, h // 4, i]
            p = torch.softmax(k[0, h // 4, seen].double() @ q[0, h, i].double() / 4, 0)
            assert torch.allclose(out[0, h, i].double(), p @ v[0, h // 4, seen].double(), atol=1e-6)


# ---------------------------------------------------------------------------- choosing the chunks

@pytest.mark.parametrize("name", [*CONFIGS, "ties"])
def test_every_rank_keeps_the_chunks_one_process_keeps(ranks, single, name):
    """Chunks 0, 2 encoded on rank 0 and 1, 3 on rank 1; the gathered NLLs give every rank the
    one-process choice, and the same statistics."""
    expected = single[name]["stats"]
    assert len(expected["kept_chunks"]) == (CONFIGS[name].top_k_chunks if name in CONFIGS else 2)
    for r in range(2):
        stats = ranks[r][name]["stats"]
        assert stats["processes"] == 2
        if "kept_chunks" in stats:  # gather: rank 1 has no Prefilled of its own
            assert {k: stats[k] for k in expected} == expected
    assert ranks[0][name]["next_position"] == single[name]["next_position"]


def test_ties_keep_the_later_chunk_across_ranks(ranks, single):
    """Four equal chunks have equal NLLs (two on each rank): the later two stay, as one process keeps them."""
    assert single["ties"]["stats"]["kept_chunks"] == ranks[0]["ties"]["stats"]["kept_chunks"] == [2, 3]


# ---------------------------------------------------------------------------- gather

@pytest.mark.parametrize("name", ["gather", "gather+kv+calibration"])
def test_gather_gives_rank_0_the_one_process_cache_and_logits(ranks, single, name):
    """Rank 0 receives the kept K/V and runs the one-process query pass and decode: its first-token
    logits and its cache (the chunks' K/V in document order, the question's and the decoded
    tokens' after them, calibration's per-layer lengths) are bit-identical; rank 1 has no cache
    and decodes nothing, and every rank gets rank 0's tokens."""
    zero, one, expected = ranks[0][name], ranks[1][name], single[name]
    assert zero["cache"] == "KVCache" and one["cache"] == "NoneType"
    for key in ("k", "v", "lens", "logits"):
        assert torch.equal(zero[key], expected[key]), key
    assert "own_tokens" not in one
    assert zero["tokens"] == one["tokens"] == expected["tokens"]
    if "calibration" in name:
        assert expected["stats"]["calibration_evicted_tokens"] > 0 and expected["stats"]["kv_evicted_tokens"] > 0


# ---------------------------------------------------------------------------- sharded

def test_sharded_query_pass_matches_the_float64_reference(ranks, single, setup):
    """k = 2 without eviction: the merged attention over both ranks' shares equals a float64
    forward of the question over the two kept chunks' reference K/V (the first keeps its BOS)."""
    model, prompt, _, _ = setup
    w, cfg = load_float64(STORIES)
    spans = chunk_spans(len(prompt.context), 152)
    kept = ranks[0]["sharded"]["stats"]["kept_chunks"]
    past = [([], []) for _ in range(cfg["num_hidden_layers"])]
    for i, j in enumerate(kept):
        ids, record = prompt.head + prompt.context[spans[j].start:spans[j].stop] + prompt.question, []
        ref_forward(w, cfg, ids, list(range(len(ids))), record=record)
        context_len = len(prompt.head) + len(spans[j])
        for layer, r in enumerate(record):
            past[layer][0].append(r["k"][int(i > 0):context_len])
            past[layer][1].append(r["v"][int(i > 0):context_len])
    M = max(len(prompt.head) + len(spans[j]) for j in kept)
    Lq = len(prompt.question)
    logits = ref_forward(w, cfg, prompt.question, list(range(M, M + Lq)),
                         past=[(torch.cat(k), torch.cat(v)) for k, v in past])[-1]
    for r in range(2):
        assert rel_err(ranks[r]["sharded"]["logits"], logits) <= TOL
        assert rel_err(ranks[r]["sharded"]["logits"], single["sharded"]["logits"]) <= TOL


@pytest.mark.parametrize("name", [n for n in CONFIGS if n.startswith("sharded")])
def test_sharded_logits_and_tokens_match_one_process(ranks, single, name):
    """Each rank holds its own kept chunks (top-1: rank 1 holds none); the query pass's logits
    match one process within 1e-5 and are the same on both ranks; every rank decodes, in
    lockstep, the one-process greedy tokens; calibration evicts as many tokens as one process."""
    expected = single[name]
    for r in range(2):
        got = ranks[r][name]
        assert got["cache"] == "ShardedCache"
        assert rel_err(got["logits"], expected["logits"]) <= TOL
        assert got["own_tokens"] == got["tokens"] == expected["tokens"]
        assert len(got["tokens"]) == STEPS
    assert torch.equal(ranks[0][name]["logits"], ranks[1][name]["logits"])
    if "calibration" in name:
        assert expected["stats"]["calibration_evicted_tokens"] > 0


def test_sharded_shares_partition_the_one_process_cache(ranks, single, setup):
    """Each rank holds its kept chunks (BOS only in the first), rank 0 also the question and the 7
    decoded tokens after it: in every layer and KV head the shares add up to the one-process cache."""
    _, prompt, _, _ = setup
    spans, kept = chunk_spans(len(prompt.context), 152), single["sharded"]["stats"]["kept_chunks"]
    held = [len(prompt.question) + STEPS - 1, 0]
    for i, j in enumerate(kept):
        held[j % 2] += len(prompt.head) + len(spans[j]) - (i > 0)
    lens = [ranks[r]["sharded"]["lens"] for r in range(2)]  # (L, H_kv)
    assert held[1] > 0 and held[0] > len(prompt.question) + STEPS - 1, "both ranks hold a kept chunk"
    for r in range(2):
        assert (lens[r] == held[r]).all()
    assert torch.equal(lens[0] + lens[1], single["sharded"]["lens"][:, None].expand_as(lens[0]))


# ---------------------------------------------------------------------------- the Python API

def test_engine_returns_rank_0_generation_on_every_rank(ranks):
    """Engine.generate under a process group: the same Generation on both ranks. gather: only
    rank 0 decodes, so only it streams text. sharded with sampling and no seed: both ranks
    stream the same text, which needs the same draw on both."""
    gather = [ranks[r]["engine"]["gather"] for r in range(2)]
    assert gather[0]["tokens"] == gather[1]["tokens"] and gather[0]["text"] == gather[1]["text"]
    assert gather[0]["streamed"].strip() == gather[0]["text"].strip() != "" and gather[1]["streamed"] == ""
    assert gather[0]["stats"]["processes"] == 2 and gather[0]["stats"]["chunks"] >= 2
    sampled = [ranks[r]["engine"]["sharded sampled"] for r in range(2)]
    assert sampled[0]["tokens"] == sampled[1]["tokens"] and len(sampled[0]["tokens"]) > 1
    assert sampled[0]["streamed"] == sampled[1]["streamed"]
    assert sampled[0]["streamed"].strip() == sampled[0]["text"].strip()  # streaming keeps a leading space


# ---------------------------------------------------------------------------- failures

@pytest.mark.parametrize("name", FAILURES)
def test_a_failure_on_one_rank_is_raised_on_every_rank(ranks, name):
    """An exception on one rank, in a phase or in the lockstep attention, reaches every rank at
    the next exchange within seconds: rank 0 raises its own or a RankError naming the failing
    rank and why; the failing rank raises its own or the RankError naming itself."""
    failing = FAILURES[name][0]
    for r in range(2):
        kind, message, seconds = ranks[r]["failures"][name]
        assert seconds < 10
        if r == failing == 0:
            assert kind != "RankError" and "double" in message.lower()  # the float64 query it was given
        else:
            assert kind == "RankError" and message.startswith(f"rank {failing}: ")
    if failing == 1:
        expected = "OutOfMemoryError: CUDA out of memory" if name == "encoding" else "RuntimeError: "
        assert ranks[0]["failures"][name][1].startswith(f"rank 1: {expected}")


# ---------------------------------------------------------------------------- the command line

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


LAUNCHERS = ("--processes", "torchrun")


def command(launcher, processes):
    """The command line that starts engine.py in `processes` processes: by --processes or torchrun."""
    if processes == 1:
        return [sys.executable, "engine.py"]
    if launcher == "torchrun":
        return [str(TORCHRUN), "--standalone", f"--nproc-per-node={processes}", "engine.py"]
    return [sys.executable, "engine.py", "--processes", str(processes)]


def cli_args(tmp_path, *args, characters=3000):
    prompt = tmp_path / "story.txt"
    prompt.write_text((BOOKS / "frankenstein.txt").read_text()[20000:20000 + characters])
    return ["--prompt", str(prompt), "--question", QUESTION, "--model", str(STORIES), "--device", "cpu",
            "--max-new-tokens", "8", *args]


def cli(tmp_path, *args, processes=2, characters=3000, launcher="--processes"):
    return subprocess.run(command(launcher, processes) + cli_args(tmp_path, *args, characters=characters),
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=90)


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_two_processes_print_the_answer_once(tmp_path, launcher):
    """Two processes: the one-process answer, printed once, one summary line, exit 0."""
    one, two = cli(tmp_path, processes=1), cli(tmp_path, launcher=launcher)
    assert one.returncode == two.returncode == 0, two.stderr
    assert two.stdout == one.stdout and one.stdout.strip()
    assert two.stderr.count("\n") == 1 and two.stderr.startswith("[parallelcomp] prompt 1692 tokens")


def test_two_processes_sharded_json(tmp_path):
    one = cli(tmp_path, "--json", processes=1)
    two = cli(tmp_path, "--json", "--kv-placement", "sharded")
    assert two.returncode == 0 and two.stderr == "", two.stderr
    assert two.stdout.count("\n") == 1
    a, b = json.loads(one.stdout), json.loads(two.stdout)
    assert (b["answer"], b["kept_chunks"], b["processes"]) == (a["answer"], a["kept_chunks"], 2)


MISMATCHED = {  # a launch the run cannot use (a 230-token prompt is one chunk)
    "one chunk": (("--method", "parallelcomp"),
                  "error: the context makes 1 chunk for 2 processes: lower --chunk-tokens or start at most 1\n"),
    "a GPU named": (("--device", "cuda:1"),
                    "error: --device cuda:1: with several processes each takes its own GPU; give --device cuda or "
                    "cpu\n"),
}


@pytest.mark.parametrize("case", MISMATCHED)
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_mismatched_launch_is_one_line(tmp_path, case, launcher):
    """One line from rank 0; torchrun then adds its own report of the exit, --processes nothing."""
    args, message = MISMATCHED[case]
    result = cli(tmp_path, *args, characters=400, launcher=launcher)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith(message) and result.stderr.count("error: ") == 1
    assert launcher == "torchrun" or result.stderr == message


# torchrun reports any process's non-zero exit: a log line ("E1207 05:04:12.528000 23470 torch/...") and
# its own traceback, ChildFailedError; a status says a request failed, so the report follows a user's mistake
TORCHRUN_LOG = re.compile(r"[IWE]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ torch/distributed/")


def garbage_heads(tmp_path):
    (tmp_path / "heads.bin").write_bytes(b"eeeeeeee")
    return str(tmp_path / "heads.bin")


USER_ERRORS = {  # before, the heads file gave 131 lines of tracebacks from both ranks
    "heads file": (lambda tmp: ("--method", "locret", "--retaining-heads", garbage_heads(tmp)),
                   r"^error: \S+heads.bin: not a readable heads file \(", 1),
    "option value": (lambda tmp: ("--top-p", "5"), r"^error: --top-p must be in \(0, 1\]$", 1),
    "unknown option": (lambda tmp: ("--top-q", "5"), r"^error: unrecognized arguments: --top-q 5 \(see --help\)$", 2),
    "missing prompt": (lambda tmp: ("--prompt", str(tmp / "nowhere.txt")),
                       r"^error: the prompt file \S+nowhere.txt does not exist$", 1),
}


def engine_frames(stderr):
    """The traceback lines of stderr in this repository's files, not in the interpreter's own
    (a virtual environment, as CI's .ci/venv, may lie inside the repository)."""
    files = (Path(f).resolve() for f in re.findall(r'File "([^"]+)"', stderr))
    return [f for f in files if f.is_relative_to(ROOT) and not f.is_relative_to(Path(sys.prefix).resolve())]


@pytest.mark.parametrize("case", USER_ERRORS)
def test_user_error_under_processes_is_one_line(tmp_path, case):
    """A mistake of the user with --processes 2: rank 0's line alone, and its status."""
    args, message, status = USER_ERRORS[case]
    result = cli(tmp_path, *args(tmp_path), characters=400)
    assert result.returncode == status and result.stdout == "", result.stderr
    assert result.stderr.count("\n") == 1 and re.search(message, result.stderr.rstrip("\n")), result.stderr


@pytest.mark.parametrize("case", USER_ERRORS)
def test_torchrun_user_error_is_one_line_from_rank_0(tmp_path, case):
    """A mistake of the user under torchrun: rank 0's line, then only torchrun's report of the
    exit, every rank with the same status and no traceback from any rank."""
    args, message, status = USER_ERRORS[case]
    result = cli(tmp_path, *args(tmp_path), characters=400, launcher="torchrun")
    first, *report = result.stderr.splitlines()
    assert result.returncode == 1 and result.stdout == "" and re.search(message, first), result.stderr
    assert not report or TORCHRUN_LOG.match(report[0]), result.stderr
    assert result.stderr.count("error: ") == 1 and not engine_frames(result.stderr)
    assert set(re.findall(r"exitcode +: (-?\d+)", result.stderr)) <= {str(status), "-15"}  # -15: torchrun's SIGTERM


def launched(tmp_path, *args):
    """engine.py --processes 2 started as from a terminal (a session of its own, SIGINT enabled),
    and its two ranks' pids once both run."""
    parent = subprocess.Popen(command("--processes", 2) + cli_args(tmp_path, *args), cwd=ROOT, env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                              preexec_fn=ctrl_c_enabled)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        children = Path(f"/proc/{parent.pid}/task/{parent.pid}/children").read_text().split()
        ranks = [re.search(rb"\0RANK=(\d+)", b"\0" + Path(f"/proc/{pid}/environ").read_bytes()) for pid in children]
        if len(children) == 2 and all(ranks):  # forked and exec'd: the environment is the rank's
            return parent, {int(rank[1]): int(pid) for rank, pid in zip(ranks, children)}
        time.sleep(0.01)
    parent.kill()
    pytest.fail("engine.py --processes 2 did not start two processes")


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads a process's children from /proc (Linux)")
def test_a_killed_rank_is_one_line_and_stops_the_others(tmp_path):
    """Rank 1 killed (as the kernel kills a process out of memory) before it joins the process
    group, which rank 0 then waits for: one line naming it, rank 0 stopped at once, status 1."""
    parent, ranks = launched(tmp_path)
    os.kill(ranks[1], signal.SIGKILL)
    stdout, stderr = parent.communicate(timeout=20)
    assert parent.returncode == 1
    assert stderr.decode().splitlines() == ["error: rank 1 was killed by SIGKILL (out of memory?)"], stderr


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads a process's children from /proc (Linux)")
def test_ctrl_c_while_the_processes_start_is_one_line(tmp_path):
    """Ctrl-C (SIGINT to the terminal's foreground process group) as the ranks start: both
    stopped, "interrupted" once, status 130. Before, the ranks were in that group: a rank still
    in Python's startup died with a fatal error, one in a collective left the other's traceback."""
    parent, ranks = launched(tmp_path)
    os.killpg(parent.pid, signal.SIGINT)
    stdout, stderr = parent.communicate(timeout=40)
    assert (parent.returncode, stdout, stderr.decode()) == (130, b"", "interrupted\n")
    assert not any(Path(f"/proc/{pid}").exists() for pid in ranks.values())


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads a process's children from /proc (Linux)")
def test_ctrl_c_while_answering_is_one_line(tmp_path):
    """Ctrl-C once the answer streams (full attention runs whole in each process and decodes for a
    minute): what was streamed stays, then "interrupted", status 130."""
    parent, _ = launched(tmp_path, "--method", "full", "--max-new-tokens", "20000")
    first = parent.stdout.read1(64)
    os.killpg(parent.pid, signal.SIGINT)
    stdout, stderr = parent.communicate(timeout=40)
    assert parent.returncode == 130 and (first + stdout).strip()
    note, interrupted = stderr.decode().splitlines()
    assert note.startswith("note: full runs whole in each of the 2 processes") and interrupted == "interrupted"


def test_processes_under_torchrun_must_agree(tmp_path):
    """--processes 3 where torchrun started 2: rank 0's one line, then only torchrun's report."""
    result = cli(tmp_path, "--processes", "3", characters=400, launcher="torchrun")
    first, *report = result.stderr.splitlines()
    assert result.returncode == 1 and result.stdout == "", result.stderr
    assert first.startswith("error: --processes 3 under a launch of 2 processes (torchrun's): leave it out"), first
    assert not report or TORCHRUN_LOG.match(report[0]), result.stderr
    assert result.stderr.count("error: ") == 1 and not engine_frames(result.stderr)


def test_a_method_that_does_not_divide_its_work_says_so_once(tmp_path):
    """Locret runs whole in each process: one note, from rank 0, before the summary."""
    result = cli(tmp_path, "--method", "locret", "--retaining-heads", str(stories_heads(tmp_path)), characters=400)
    assert result.returncode == 0, result.stderr
    note, summary = result.stderr.splitlines()
    assert note == "note: locret runs whole in each of the 2 processes (only parallelcomp divides its work among them)"
    assert summary.startswith("[locret] prompt ")
