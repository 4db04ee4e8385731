"""The command line: every user error is one line on stderr and a non-zero exit, never a traceback;
--json, --quiet, the progress bar, Ctrl-C.

Broken inputs are made in each test from a copy of stories260K (512-token window). Most cases call
engine.main in-process (one torch import); the ones about the process itself (a signal, a terminal,
standard input) run `python engine.py` in a subprocess.
"""

import codecs
import io
import json
import os
import pty
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import fields
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from conftest import REPO, STORIES, ctrl_c_enabled, shared, stories_heads
from engine import ProgressBar, main, memory_advice
from hybrid import PATTERNS
from methods import METHODS, flag_of
from parallelcomp import CUTS, KV_PLACEMENTS, chunk_spans
from reference import load_float64, ref_greedy
from tokenizer import Tokenizer
MODEL = ["--model", str(STORIES), "--device", "cpu"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
STORY = "Once upon a time there was a little cat.\n"
SENTENCE = "The little dog ran to the park and played with a ball. "  # 19 stories260K tokens


def run(capsys, *args):
    """engine.main in-process -> (exit status, stdout, stderr)."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, out, err, pattern, status=1):
    assert (code, out) == (status, "")
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(pattern, err), err


def write(path, data):
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
    return path


def checkpoint(tmp_path, drop=(), config=None, tensors=None, safetensors=None):
    """A copy of stories260K without the files in `drop`, with `config` merged into config.json,
    its tensors edited by tensors(dict) or its safetensors bytes replaced by safetensors(bytes)."""
    out = tmp_path / "model"
    out.mkdir()
    for f in STORIES.iterdir():
        if f.name not in drop:
            shutil.copyfile(f, out / f.name)
    if config:
        write(out / "config.json", json.dumps({**json.loads((STORIES / "config.json").read_text()), **config}))
    if tensors:
        weights = load_file(STORIES / "model.safetensors")
        tensors(weights)
        save_file(weights, out / "model.safetensors")
    if safetensors:
        write(out / "model.safetensors", safetensors((STORIES / "model.safetensors").read_bytes()))
    return out


# ---------------------------------------------------------------------------- the prompt file

def symlink_loop(tmp_path):
    os.symlink("loop.txt", tmp_path / "loop.txt")
    return tmp_path / "loop.txt"


PROMPT_ERRORS = {
    "missing": (lambda tmp: tmp / "nowhere.txt", r"the prompt file \S+nowhere.txt does not exist"),
    "unreadable": (symlink_loop, r"cannot read the prompt \S+loop.txt: Too many levels of symbolic links"),
    "directory": (lambda tmp: tmp, r"the prompt \S+ is a directory, not a text file"),
    "empty": (lambda tmp: write(tmp / "p.txt", ""), r"the prompt \S+p.txt is empty"),
    "whitespace": (lambda tmp: write(tmp / "p.txt", " \n\t\n\n"), r"the prompt \S+p.txt is empty"),
    "binary": (lambda tmp: write(tmp / "p.gif", b"GIF89a\x00\x01\x00\x01"),
               r"the prompt \S+p.gif looks like a binary file \(NUL byte at byte 6\), not text"),
    "latin-1": (lambda tmp: write(tmp / "p.txt", "Once upon a time\nthere was a café.".encode("latin-1")),
                r"the prompt \S+p.txt is not text: invalid UTF-8 at byte 32 \(line 2\); save it as UTF-8"),
    # before, these were a binary file (UTF-16's NUL bytes) and a directory (the empty path is .)
    "UTF-16": (lambda tmp: write(tmp / "p.txt", codecs.BOM_UTF16_LE + "Once upon a time".encode("utf-16-le")),
               r"the prompt \S+p.txt is UTF-16 text \(it starts with a UTF-16 byte-order mark\): save it as UTF-8$"),
    "UTF-16 BE": (lambda tmp: write(tmp / "p.txt", codecs.BOM_UTF16_BE + "Once upon a time".encode("utf-16-be")),
                  r"the prompt \S+p.txt is UTF-16 text \(it starts with a UTF-16 byte-order mark\)"),
    "UTF-32": (lambda tmp: write(tmp / "p.txt", codecs.BOM_UTF32_LE + "Once upon a time".encode("utf-32-le")),
               r"the prompt \S+p.txt is UTF-32 text \(it starts with a UTF-32 byte-order mark\): save it as UTF-8$"),
    "no file name": (lambda tmp: "", r"^error: --prompt is empty: give a text file, or - for standard input$"),
}


@pytest.mark.parametrize("case", PROMPT_ERRORS)
def test_prompt_file_errors(case, tmp_path, capsys):
    make, message = PROMPT_ERRORS[case]
    assert_one_line_error(*run(capsys, "--prompt", make(tmp_path), *MODEL), message)


def test_invalid_utf8_on_standard_input():
    p = subprocess.run([sys.executable, "engine.py", "--prompt", "-", *MODEL], input=b"Once\n\xc3\x28 upon",
                       cwd=REPO, capture_output=True, env=ENV)
    assert (p.returncode, p.stdout) == (1, b"")
    assert p.stderr.decode() == ("error: the prompt from standard input is not text: invalid UTF-8 at byte 5 "
                                 "(line 2); save it as UTF-8\n")


# ---------------------------------------------------------------------------- the checkpoint

def drop_up_proj(tensors):
    del tensors["model.layers.2.mlp.up_proj.weight"]


def shorten_norm(tensors):
    tensors["model.norm.weight"] = tensors["model.norm.weight"][:10]


def integer_norm(tensors):
    tensors["model.norm.weight"] = tensors["model.norm.weight"].int()


def cut_in_half(data):
    return data[:len(data) // 2]


def garbled_header(data):
    return data[:8] + b"{not json" + data[17:]


CHECKPOINT_ERRORS = {
    "missing": (lambda tmp: tmp / "nowhere", r"nowhere is neither a checkpoint directory nor an embedded model \(smollm2, qwen2.5-1.5b\)$"),
    "no config.json": (lambda tmp: checkpoint(tmp, drop=["config.json"]),
                       r"model/config.json not found: a checkpoint directory needs config.json"),
    "no weights": (lambda tmp: checkpoint(tmp, drop=["model.safetensors"]), r"model: no model.safetensors"),
    "no tokenizer": (lambda tmp: checkpoint(tmp, drop=["tokenizer.model"]),
                     r"model: no tokenizer.json or tokenizer.model"),
    "architecture": (lambda tmp: checkpoint(tmp, config={"architectures": ["MambaForCausalLM"]}),
                     r"architecture MambaForCausalLM is not supported \(supported: LlamaForCausalLM"),
    "missing tensor": (lambda tmp: checkpoint(tmp, tensors=drop_up_proj),
                       r"missing tensors model.layers.2.mlp.up_proj.weight$"),
    "mis-shaped tensor": (lambda tmp: checkpoint(tmp, tensors=shorten_norm),
                          r"tensor model.norm.weight has shape \(10,\), expected \(64,\)"),
    "dtype": (lambda tmp: checkpoint(tmp, tensors=integer_norm),
              r"tensor model.norm.weight has dtype torch.int32, expected a floating-point type"),
    "truncated": (lambda tmp: checkpoint(tmp, safetensors=cut_in_half),
                  r"model.safetensors: not a readable safetensors file \(.*incomplete metadata"),
    "corrupted": (lambda tmp: checkpoint(tmp, safetensors=garbled_header),
                  r"model.safetensors: not a readable safetensors file \(.*invalid JSON in header"),
    # before 6d6fb5c these loaded and ran without a word
    "a size as text": (lambda tmp: checkpoint(tmp, config={"hidden_size": "64"}),
                       r"model/config.json: hidden_size must be a positive integer, not '64'$"),
    "a negative RoPE base": (lambda tmp: checkpoint(tmp, config={"rope_theta": -10000.0}),
                             r"model/config.json: rope_theta must be a positive number, not -10000.0$"),
    "head_dim 0": (lambda tmp: checkpoint(tmp, config={"head_dim": 0}),
                   r"model/config.json: head_dim must be a positive integer, not 0$"),
    # before, "inconsistent sizes (heads 9, KV heads 4, head_dim 8)" or a tensor's shape without the field
    "heads": (lambda tmp: checkpoint(tmp, config={"num_attention_heads": 9}),
              r"model/config.json: num_attention_heads \(9\) must be a multiple of num_key_value_heads \(4\)$"),
    "vocabulary": (lambda tmp: checkpoint(tmp, config={"vocab_size": 100}),
                   r"model.safetensors: tensor model.embed_tokens.weight has shape \(512, 64\), expected \(100, 64\) "
                   r"from config.json's vocab_size$"),
    "more layers": (lambda tmp: checkpoint(tmp, config={"num_hidden_layers": 7}),
                    r"model: no tensors for layers 5 and above: the checkpoint has 5 layers, config.json's "
                    r"num_hidden_layers says 7$"),
    "a bias flag as text": (lambda tmp: checkpoint(tmp, config={"tie_word_embeddings": "true"}),
                            r"model/config.json: tie_word_embeddings must be true or false, not 'true'$"),
    # a hybrid layout that does not fit: before, ZeroDivisionError tracebacks or, for [3, 1], no full layer
    "window 0": (lambda tmp: checkpoint(tmp, config={"hybrid_attention": {"window_tokens": 0}}),
                 r"model/config.json: hybrid_attention.window_tokens must be at least 1$"),
    "block 0": (lambda tmp: checkpoint(tmp, config={"hybrid_attention": {"pattern": "block", "block_tokens": 0}}),
                r"model/config.json: hybrid_attention.block_tokens must be at least 1$"),
    "full layers reversed": (lambda tmp: checkpoint(tmp, config={"hybrid_attention": {"full_layers": [3, 1]}}),
                             r"model/config.json: hybrid_attention.full_layers must have 0 <= first <= last < 5$"),
}


@pytest.mark.parametrize("case", CHECKPOINT_ERRORS)
def test_checkpoint_errors(case, tmp_path, capsys):
    make, message = CHECKPOINT_ERRORS[case]
    prompt = write(tmp_path / "p.txt", STORY)
    assert_one_line_error(*run(capsys, "--prompt", prompt, "--model", make(tmp_path), "--device", "cpu"), message)


def test_a_tokenizer_from_another_model(tmp_path, capsys):
    llama2 = shared("models/llama2-tokenizer/tokenizer.model")
    model = checkpoint(tmp_path, drop=["tokenizer.model"])
    shutil.copyfile(llama2, model / "tokenizer.model")
    prompt = write(tmp_path / "p.txt", STORY)
    assert_one_line_error(*run(capsys, "--prompt", prompt, "--model", model, "--device", "cpu"),
                          r"outside the model's 512-token vocabulary: the checkpoint's tokenizer does not match")


# ---------------------------------------------------------------------------- options

OPTION_ERRORS = {
    "--max-new-tokens=-1": "--max-new-tokens must be at least 1",
    "--temperature=-0.5": r"--temperature must be 0 \(greedy\) or a positive number",
    "--temperature=nan": r"--temperature must be 0 \(greedy\) or a positive number",
    "--top-p=0": r"--top-p must be in \(0, 1\]",
    "--top-p=1.5": r"--top-p must be in \(0, 1\]",
    "--top-k=-1": r"--top-k must be 0 \(off\) or positive",
    "--seed=-1": r"--seed must be between 0 and 2\*\*64 - 1",
    "--top-k-chunks=0": "--top-k-chunks must be at least 1",
    "--chunk-tokens=0": "--chunk-tokens must be at least 1",
    "--chunk-tokens=513": "--chunk-tokens must be between 1 and the model's 512-token window",
    "--kv-budget=-5": "--kv-budget must be at least 1",
    "--calibrate=sink:3-9": "--calibrate layers must be below the model's 5 layers",
    "--device=tpu": "--device tpu: expected cuda, cuda:N or cpu",
}


@pytest.mark.parametrize("option", OPTION_ERRORS)
def test_invalid_option_values(option, tmp_path, capsys):
    prompt = write(tmp_path / "p.txt", STORY)
    assert_one_line_error(*run(capsys, "--prompt", prompt, *MODEL, option), OPTION_ERRORS[option])


def test_yarn_errors(tmp_path, capsys):
    prompt = write(tmp_path / "p.txt", SENTENCE * 60)  # 1,141 tokens: past YaRN's 1,024 at factor 2
    yarn = ["--prompt", prompt, "--device", "cpu", "--method", "yarn"]
    assert_one_line_error(*run(capsys, *yarn, "--model", STORIES, "--yarn-factor", "0.5"),
                          "--yarn-factor must be at least 1")
    assert_one_line_error(*run(capsys, *yarn, "--model", STORIES, "--yarn-factor", "2"),
                          r"exceed YaRN's 1,024-token window \(--yarn-factor 2 times 512\): raise --yarn-factor")
    scaled = checkpoint(tmp_path, config={"rope_scaling": {"type": "linear", "factor": 2.0}})
    assert_one_line_error(*run(capsys, *yarn, "--model", scaled),
                          "--method yarn applies YaRN to a checkpoint without RoPE scaling; this one has linear "
                          "scaling in its config.json: use --method full")


MALFORMED = {
    "--max-new-tokens=many": r"^error: argument --max-new-tokens: invalid int value: 'many' \(see --help\)$",
    "--calibrate=sink": r"^error: argument --calibrate: 'sink': expected REGION:FIRST-LAST",
    "--calibrate=sink:4-2": r"^error: argument --calibrate: 'sink:4-2': expected REGION:FIRST-LAST .* FIRST <= LAST",
    "--method=full --top-k-chunks=1": r"^error: --top-k-chunks is an option of --method parallelcomp, not full",
}


@pytest.mark.parametrize("options", MALFORMED)
def test_malformed_command_line_is_one_line_with_status_2(options, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--prompt", "p.txt", *options.split()])
    out, err = capsys.readouterr()
    assert_one_line_error(exit.value.code, out, err, MALFORMED[options], status=2)


def help_options(text):
    """The options --help describes: {invocation ("--flag METAVAR"): help}, wrapped lines joined."""
    options, last = {}, None
    for line in text.splitlines():
        if line.startswith("  -"):
            last, _, words = line.strip().partition("  ")
            options[last] = words.strip()
        elif line.startswith("    ") and last:
            options[last] = f"{options[last]} {line.strip()}".strip()
        else:
            last = None
    return options


def test_help_gives_every_option_help_a_named_value_and_its_default_once(monkeypatch, capsys):
    """Before, --max-new-tokens, --top-p and --seed had no help, five options ended in "(default: None)"
    after their own default, and metavars mixed PARALLELCOMP.CHUNK_TOKENS with M."""
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as exit:
        main(["--help"])
    text = capsys.readouterr().out
    options = help_options(text)
    usage = text.split("\n\n")[0]
    flags = {word for invocation in options for word in invocation.replace(",", "").split() if word.startswith("-")}
    listed = set(re.findall(r"\[?(--?[a-z][a-z-]*)", usage))
    assert exit.value.code == 0 and listed <= flags and flags - listed == {"--help"}  # -h, --help: [-h]
    assert {flag_of(f.name, [name]) for name in METHODS for f in fields(METHODS[name].config)} <= flags
    assert all(options.values()), [flag for flag, words in options.items() if not words]
    helps = " ".join(options.values())
    assert "(default: None)" not in text and not re.findall(r"(?<!\()default", helps)  # one form: (default: X)
    assert all(words.count("(default:") <= 1 for words in options.values())
    metavars = [word for invocation in options for word in invocation.replace(",", "").split()[1:]
                if not word.startswith("-")]
    assert all(re.fullmatch(r"\{[a-z0-9,]+\}|[A-Z]+([:-][A-Z]+)*", metavar) for metavar in metavars), metavars
    assert f"--hybrid-pattern {{{','.join(PATTERNS)}}}" in options
    assert f"--kv-placement {{{','.join(KV_PLACEMENTS)}}}" in options
    assert f"--cut-at {{{','.join(CUTS)}}}" in options
    assert f"--method {{{','.join(['auto', *METHODS])}}}" in options


@pytest.mark.parametrize("method", ["auto", "full", "truncate", "streaming", "parallelcomp"])
def test_question_longer_than_the_window(method, tmp_path, capsys):
    prompt = write(tmp_path / "p.txt", SENTENCE * 100)
    question = "Why did the dog run to the park? " * 30  # 513 tokens with BOS and the blank line
    assert_one_line_error(*run(capsys, "--prompt", prompt, "--question", question, *MODEL, "--method", method),
                          r"the question \(513 tokens\) is longer than the model's 512-token window: shorten it")


def test_question_and_answer_leave_no_room_for_context(tmp_path, capsys):
    prompt = write(tmp_path / "p.txt", SENTENCE * 100)
    assert_one_line_error(*run(capsys, "--prompt", prompt, "--question", "Why did the dog run?", *MODEL,
                               "--method", "parallelcomp", "--max-new-tokens", "500"),
                          r"the question \(\d+ tokens\) and --max-new-tokens \(500\) leave no room for context")


def test_auto_uses_full_attention_when_parallelcomp_has_no_room(tmp_path, capsys):
    """A short prompt with an answer budget beyond the window: nothing to compress, so no error."""
    prompt = write(tmp_path / "p.txt", STORY)
    code, out, err = run(capsys, "--prompt", prompt, *MODEL, "--max-new-tokens", 600, "--json")
    assert (code, err) == (0, "")
    assert json.loads(out)["method"] == "full"


# ---------------------------------------------------------------------------- out of memory

def test_a_cache_beyond_memory_is_refused_before_the_prefill(tmp_path, capsys):
    """A 10-billion-token cache (6.4 TB) is refused from its size, before anything is allocated."""
    prompt = write(tmp_path / "p.txt", STORY)
    assert_one_line_error(*run(capsys, "--prompt", prompt, *MODEL, "--method", "full", "--max-new-tokens", 10**10),
                          r"^error: a cache of 10,000,000,\d{3} tokens and their prefill need [\d.]+ GiB, [\d.]+ GiB "
                          r"are free on cpu: shorten the prompt or the answer, or choose a method with a bounded cache$")


def test_out_of_memory_names_the_option_given_first(tmp_path, capsys):
    """A 10^11-token window: the sparse layers' ring buffers (77 TB) fail to allocate. Before, the
    message named only --max-new-tokens and the prompt."""
    prompt = write(tmp_path / "p.txt", STORY)
    assert_one_line_error(*run(capsys, "--prompt", prompt, *MODEL, "--method", "hybrid", "--window-tokens", 10**11),
                          r"^error: out of memory: lower --window-tokens, --max-new-tokens, --sink-tokens, "
                          r"--local-blocks, --block-tokens, or shorten the prompt; or use --dtype bfloat16$")


def test_out_of_gpu_memory_message():
    """No GPU here to exhaust: the message torch.OutOfMemoryError gets, checked directly."""
    assert memory_advice(gpu=True, method="parallelcomp") == (
        "out of GPU memory: lower --max-new-tokens, --chunk-tokens, --top-k-chunks, --kv-budget, or shorten the "
        "prompt; or use --dtype bfloat16 or --device cpu")


# ---------------------------------------------------------------------------- Ctrl-C

def test_ctrl_c_keeps_the_text_so_far_and_exits_130(tmp_path):
    prompt = write(tmp_path / "p.txt", STORY)
    p = subprocess.Popen([sys.executable, "engine.py", "--prompt", prompt, *MODEL, "--method", "full",
                          "--max-new-tokens", "20000"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=ENV, preexec_fn=ctrl_c_enabled)
    first = p.stdout.read1(64)  # the answer is streaming
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    text, err = (first + out).decode(), err.decode()
    assert p.returncode == 130
    n = int(re.fullmatch(r"interrupted after (\d+) tokens\n", err)[1])
    assert 1 <= n < 20000 and text.strip() and text.endswith("\n")


@pytest.mark.parametrize("entry", [["engine.py"], ["-c", "import sys; from cli import main; sys.exit(main())"]])
def test_ctrl_c_while_torch_loads_is_one_line(entry, tmp_path):
    """SIGINT once torch's libraries are being mapped, seconds before its import ends, through
    `python engine.py` and through what the console script runs. Before, a KeyboardInterrupt
    traceback from the import (engine.main's handler was not yet there) and death by the signal."""
    prompt = write(tmp_path / "p.txt", STORY)
    p = subprocess.Popen([sys.executable, *entry, "--prompt", prompt, *MODEL], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=ENV, preexec_fn=ctrl_c_enabled)
    maps, deadline = Path(f"/proc/{p.pid}/maps"), time.monotonic() + 60
    while "libtorch" not in maps.read_text() and time.monotonic() < deadline:
        time.sleep(0.001)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert (p.returncode, out, err.decode()) == (130, b"", "interrupted\n")


def test_ctrl_c_with_json_prints_the_partial_answer(tmp_path, capsys):
    prompt = write(tmp_path / "p.txt", STORY)
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, even when started ignored
    ctrl_c = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))  # the decode loop runs for a minute
    ctrl_c.start()
    try:
        code, out, err = run(capsys, "--prompt", prompt, *MODEL, "--method", "full", "--max-new-tokens", 20000,
                             "--json")
    finally:
        ctrl_c.cancel()
        signal.signal(signal.SIGINT, handler)
    result = json.loads(out)
    assert code == 130 and result["interrupted"] is True
    assert 1 <= result["generated_tokens"] == len(result["tokens"]) < 20000 and result["answer"]
    assert err == f"interrupted after {result['generated_tokens']} tokens\n"


# ---------------------------------------------------------------------------- output: --json, progress, --quiet

def test_json_and_progress_bar_on_a_terminal(tmp_path):
    """ParallelComp over ~20k tokens: stdout is exactly one JSON object, stderr (a terminal) the bar."""
    document = SENTENCE * 1050
    prompt = write(tmp_path / "p.txt", document)
    terminal, stderr = pty.openpty()
    p = subprocess.Popen([sys.executable, "engine.py", "--prompt", prompt, "--question", "Where did the dog run?",
                          *MODEL, "--max-new-tokens", "8", "--chunk-tokens", "400", "--cut-at", "token", "--kv-budget", "100", "--json"],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=stderr, env=ENV)
    os.close(stderr)
    shown = b""
    while chunk := read_terminal(terminal):
        shown += chunk
    result = json.loads(p.stdout.read())
    assert p.wait() == 0

    tokenizer = Tokenizer.from_dir(STORIES)
    context = len(tokenizer.encode(document))
    spans = chunk_spans(context, 400)
    kept = [spans[i] for i in result["kept_chunks"]]
    assert result == {
        "answer": tokenizer.decode(result["tokens"]), "tokens": result["tokens"], "method": "parallelcomp",
        "prompt_tokens": 1 + context + len(tokenizer.encode("\n\nWhere did the dog run?")) + 1,
        "chunks": len(spans), "kept_chunks": sorted(result["kept_chunks"]),
        "kept_spans": [[s.start, s.stop] for s in kept], "kv_evicted_tokens": sum(len(s) - 100 for s in kept),
        "calibration_evicted_tokens": 0,
        "truncated_tokens": None, "prefill_seconds": result["prefill_seconds"],
        "decode_seconds": result["decode_seconds"], "generated_tokens": len(result["tokens"]),
        "decode_tokens_per_second": result["decode_tokens_per_second"],
        "peak_memory_bytes": result["peak_memory_bytes"], "interrupted": False}
    assert len(kept) == 2 and 1 <= len(result["tokens"]) <= 8  # the default top-k
    assert result["prefill_seconds"] > 0 and result["decode_seconds"] > 0 and result["peak_memory_bytes"] > 0

    lines = shown.decode().split("\r")  # the terminal turns "\n" into "\r\n"
    draws = [line for line in lines if line.startswith("prefill [")]
    assert len(draws) >= 2  # ~20k prefill tokens take two batches (parallelcomp.MAX_BATCH_TOKENS)
    assert re.fullmatch(rf"prefill \[#{{30}}\] {len(spans)}/{len(spans)} chunks, [\d,]+ tok/s", draws[-1])
    assert [line for line in lines if line.strip() and line not in draws] == []  # no summary line in --json mode


def read_terminal(fd):
    try:
        return os.read(fd, 4096)
    except OSError:  # EIO: the process closed the terminal
        return b""


def test_progress_bar_redraws_one_line():
    stream = io.StringIO()
    bar = ProgressBar(stream)
    bar(1, 4, 1000, 0.5)
    assert stream.getvalue() == "\rprefill [#######.......................] 1/4 chunks, 2,000 tok/s"
    bar.close()  # cut short (an error, Ctrl-C): the next message gets a line of its own
    bar(4, 4, 4000, 1.0)
    bar.close()
    assert stream.getvalue().split("\n") == [
        "\rprefill [#######.......................] 1/4 chunks, 2,000 tok/s",
        "\rprefill [##############################] 4/4 chunks, 4,000 tok/s", ""]


def test_summary_on_stderr_and_quiet(tmp_path, capsys):
    prompt = write(tmp_path / "p.txt", STORY)
    code, out, err = run(capsys, "--prompt", prompt, *MODEL, "--max-new-tokens", 8)
    assert code == 0 and out.strip() and out.endswith("\n")
    assert re.fullmatch(r"\[full\] prompt 13 tokens, prefill .* s, decode 8 tokens at .* tok/s, peak memory .* GiB\n",
                        err)
    assert run(capsys, "--prompt", prompt, *MODEL, "--max-new-tokens", 8, "--quiet") == (0, out, "")


# ---------------------------------------------------------------------------- methods on the command line

def json_run(capsys, *args):
    code, out, err = run(capsys, *args, "--json")
    assert (code, err) == (0, ""), err
    return json.loads(out)


LAYOUT = {"full_layers": [2, 2], "pattern": "window", "sink_tokens": 4, "window_tokens": 28}
PER_ENTRY = 2 * 4 * 8 * 4  # stories260K: K and V of 4 KV heads of size 8, float32


@pytest.mark.parametrize("flags, live", [
    ((), 4 + 28),  # auto runs the method the checkpoint was trained for
    (("--method", "hybrid"), 4 + 28),  # with the checkpoint's layout
    (("--method", "hybrid", "--window-tokens", "20"), 4 + 20),  # the flag merged over the layout
    (("--window-tokens", "20"), 4 + 20),  # under auto too
])
def test_a_hybrid_checkpoint_runs_its_layout(flags, live, tmp_path, capsys):
    """A checkpoint whose config.json has a hybrid layout (one full layer, four sparse): its cache
    holds every token in the full layer and sink + window ones in each sparse layer, as worked out
    here. Before, auto exited 1 ("--config for method hybrid must be a HybridConfig") and --method
    hybrid took the default layout (two full layers, a 1984-token window)."""
    prompt = write(tmp_path / "p.txt", STORY * 30)
    model = checkpoint(tmp_path, config={"hybrid_attention": LAYOUT})
    result = json_run(capsys, "--prompt", prompt, "--model", model, "--device", "cpu", "--max-new-tokens", 4, *flags)
    n = result["prompt_tokens"]
    assert result["method"] == "hybrid" and n > 4 + 28
    assert result["kv_bytes"] == (n + 4 * live) * PER_ENTRY and result["full_kv_bytes"] == 5 * n * PER_ENTRY


def test_an_option_of_a_method_auto_does_not_run_here(tmp_path, capsys):
    prompt = write(tmp_path / "p.txt", STORY)
    assert_one_line_error(*run(capsys, "--prompt", prompt, *MODEL, "--window-tokens", 20),
                          r"^error: --window-tokens is an option of method hybrid, not auto \(full or parallelcomp "
                          r"here\)$")


def no_bos(tmp_path):
    """A copy of stories260K whose tokenizer adds no BOS, as the default model's."""
    model = checkpoint(tmp_path)
    config = json.loads((model / "tokenizer_config.json").read_text())
    write(model / "tokenizer_config.json", json.dumps({**config, "add_bos_token": False}))
    return model


@pytest.mark.parametrize("method", METHODS)
def test_an_empty_document_with_a_question(method, tmp_path, capsys):
    """The question alone is the prompt, as in the Python API: the float64 greedy tokens after it,
    whatever the method. Before, the command line refused the empty file and the API failed in
    InfiniPot's embedding and in ParallelComp's scoring of its empty chunk."""
    model, prompt = no_bos(tmp_path), write(tmp_path / "p.txt", "")
    flags = ["--retaining-heads", stories_heads(tmp_path)] if method == "locret" else []
    result = json_run(capsys, "--prompt", prompt, "--question", "What is it?", "--model", model, "--device", "cpu",
                      "--method", method, "--max-new-tokens", 6, *flags)
    ids = Tokenizer.from_dir(model).encode("\n\nWhat is it?")
    w, cfg = load_float64(STORIES)
    if method == "yarn":  # full attention under YaRN, factor 4 (its default) over the 512-token window
        cfg = {**cfg, "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}}
    assert result["prompt_tokens"] == len(ids)
    assert result["tokens"] == ref_greedy(w, cfg, ids, 6, eos=2)


HEADS_FILES = {  # before, these ended in tracebacks from torch.load's unpickler (IndexError, KeyError: 101)
    "text": ("heads.txt", b"retaining heads\nfor every layer\n"),
    "csv": ("heads.csv", b"layer,fc1,fc2\n0,1,2\n"),
    "empty bin": ("heads.bin", b""),
    "bin of other bytes": ("heads.bin", b"eeeeeeee"),
}


@pytest.mark.parametrize("case", HEADS_FILES)
def test_a_heads_file_that_is_not_heads(case, tmp_path, capsys):
    name, data = HEADS_FILES[case]
    heads = write(tmp_path / name, data)
    prompt = write(tmp_path / "p.txt", SENTENCE * 30)
    assert_one_line_error(*run(capsys, "--prompt", prompt, *MODEL, "--method", "locret", "--retaining-heads", heads),
                          rf"^error: \S+{re.escape(name)}: not a readable heads file \(\w+(: .*)?\)$")


@pytest.mark.parametrize("flags, message", [
    (("--method", "infinipot", "--pot-tokens", "100", "--pot-keep", "100"),
     r"^error: --pot-keep must be below --pot-tokens \(100\)$"),
    (("--method", "locret", "--budget", "100", "--stabilizers", "100"),
     r"^error: --stabilizers must be at least 0 and below --budget \(100\)$"),
    (("--method", "locret", "--budget", "256"),  # the tail and the answer would reach position 611 of 512
     r"^error: --budget \(256\) \+ the prompt's last 100 tokens \+ --max-new-tokens \(256\) must fit in the "
     r"model's 512-token window$"),
    (("--method", "locret", "--max-new-tokens", "420"),
     r"^error: the prompt's last 100 tokens and --max-new-tokens \(420\) leave no room for a cache in the model's "
     r"512-token window$"),
])
def test_messages_name_every_option_by_its_flag(flags, message, tmp_path, capsys):
    prompt = write(tmp_path / "p.txt", SENTENCE * 40)
    heads = ["--retaining-heads", stories_heads(tmp_path)] if "locret" in flags else []
    assert_one_line_error(*run(capsys, "--prompt", prompt, *MODEL, *flags, *heads), message)


def test_the_question_is_laid_out_the_same_given_or_taken_from_the_document(tmp_path, capsys):
    """--question Q after a document, and the same document ending with the paragraph Q: the
    same prompt, chunks and answer."""
    question = "Where did the dog run with the ball?"
    asked = (*MODEL, "--method", "parallelcomp", "--chunk-tokens", 150, "--top-k-chunks", 1, "--max-new-tokens", 4)
    given = json_run(capsys, "--prompt", write(tmp_path / "a.txt", SENTENCE * 30), "--question", question, *asked)
    taken = json_run(capsys, "--prompt", write(tmp_path / "b.txt", SENTENCE * 30 + "\n\n" + question), *asked)
    for key in ("prompt_tokens", "chunks", "kept_spans", "tokens"):
        assert given[key] == taken[key], key


@pytest.mark.parametrize("rank, status, stderr", [("0", 2, "error: --processes 0: give 1 or more (see --help)\n"),
                                                  ("1", 0, "")])
def test_a_command_line_error_is_rank_0s_alone(rank, status, stderr, monkeypatch, capsys):
    """Every rank meets the same command-line error: rank 0 says it and fails, the others end quietly
    with status 0. A failed rank makes torchrun stop the others, which could stop rank 0 before its line."""
    monkeypatch.setenv("RANK", rank)
    with pytest.raises(SystemExit) as e:
        main(["--prompt", "p.txt", "--processes", "0"])
    assert (e.value.code, capsys.readouterr().err) == (status, stderr)
