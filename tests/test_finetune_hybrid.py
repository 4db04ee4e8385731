"""tools/finetune_hybrid.py and training through model.forward: gradients against the float64
reference forward (tests/reference.py) with the pattern's masks written here from its definition,
a training step that lowers the loss, the packing, and a smoke run whose checkpoint the engine
loads and runs hybrid by default.

stories260K (5 layers: 1-2 full, 0, 3, 4 sparse) on 48 tokens with a 4 + 12 window or 4-token
blocks (2 local, every 3rd kept): the masks cut keys in every sparse layer. Tolerance: relative
error of each float32 gradient against float64 <= 1e-4 (measured 1e-6 to 7e-6).
"""

import json
import random
import shutil
import subprocess
import sys

import pytest
import torch

from checkpoint import checkpoint_tensors, load_model
from conftest import BOOKS, REPO, STORIES, shared
from engine import Engine
from hybrid import HybridConfig
from reference import load_float64, ref_forward, rel_err
from tokenizer import Tokenizer

sys.path.insert(0, str(REPO / "tools"))
import finetune_hybrid as ft  # noqa: E402

TOL = 1e-4
FULL = range(1, 3)
CONFIGS = (HybridConfig(sink_tokens=4, window_tokens=12),
           HybridConfig(pattern="block", block_tokens=4, local_blocks=2, vert_stride=3))
DEVICES = ("cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")))


def book_ids(n, start=30000):
    text = (BOOKS / "frankenstein.txt").read_text()[start:start + 20 * n]
    return ([1] + Tokenizer.from_dir(STORIES).encode(text))[:n]


def sparse_mask(config, T):
    p, k = torch.arange(T)[:, None], torch.arange(T)[None, :]
    if config.pattern == "window":
        return (k <= p) & ((k < config.sink_tokens) | (p - k < config.window_tokens))
    qb, kb = p // config.block_tokens, k // config.block_tokens
    return (k <= p) & ((qb - kb < config.local_blocks) | (kb % config.vert_stride == 0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", CONFIGS, ids=("window", "block"))
def test_gradients_through_forward_match_reference(config, device):
    ids = book_ids(48)
    T = len(ids)
    w, cfg = load_float64(STORIES)
    for tensor in w.values():
        tensor.requires_grad_(True)
    mask = sparse_mask(config, T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    assert (mask != causal)[T // 2:].any(-1).all()  # every later query loses keys
    logits = ref_forward(w, cfg, ids, list(range(T)), mask=lambda layer: None if layer in FULL else mask)
    torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])).backward()

    model = load_model(STORIES, device, torch.float32).requires_grad_(True)
    masks = ft.pattern_masks(model.config, config, T, model.device, torch.float32)
    ft.sequence_nll(model, torch.tensor(ids, device=device), masks).backward()
    params = dict(model.named_parameters())
    for name, (param, rows, _) in checkpoint_tensors(model.config).items():
        grad = params[param].grad if rows is None else params[param].grad[rows]
        assert rel_err(grad.cpu(), w[name].grad) <= TOL, name
    assert all(p.grad.abs().sum() > 0 for p in model.parameters())


def test_training_step_lowers_the_loss():
    ids = book_ids(128)
    model = load_model(STORIES, "cpu", torch.float32).requires_grad_(True)
    masks = ft.pattern_masks(model.config, CONFIGS[0], len(ids), model.device, torch.float32)
    tokens = torch.tensor(ids)
    with torch.no_grad():
        before = ft.sequence_nll(model, tokens, masks).item()
    args = ft.parse_args(["--out", "unused", "--steps", "1", "--lr", "1e-3", "--seq", str(len(ids))])
    assert ft.train(model, masks, iter([ids]), args, lambda line: None) == 1
    with torch.no_grad():
        after = ft.sequence_nll(model, tokens, masks).item()
    assert after < before - 0.01


def test_packing_puts_a_bos_before_each_book():
    books, seq = [[5, 6, 7], [8, 9]], 3
    sequences = ft.packed(books, [1], seq, random.Random(0))
    first = [next(sequences) for _ in range(2)]
    assert all(len(s) == seq for s in first)
    joined = sum(first, [])
    streams = ([1, 5, 6, 7, 1, 8, 9], [1, 8, 9, 1, 5, 6, 7])
    assert any(s[i:i + len(joined)] == joined for s in streams for i in range(len(s)))


def test_the_new_rope_theta_goes_where_the_source_config_keeps_it(tmp_path):
    """transformers 5 keeps rope_theta inside rope_parameters, where the loader reads it first: a
    top-level rope_theta beside it would be ignored and the fine-tuned base lost."""
    source = shutil.copytree(STORIES, tmp_path / "source")
    hf = json.loads((STORIES / "config.json").read_text())
    hf["rope_parameters"] = {"rope_theta": hf.pop("rope_theta", 10000.0), "rope_type": "default"}
    hf.pop("rope_scaling", None)
    (source / "config.json").write_text(json.dumps(hf))
    model = load_model(source, "cpu", torch.float32)
    ft.set_rope_theta(model, 20000.0)
    ft.save_checkpoint(model, source, tmp_path / "out", HybridConfig(), 256)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "rope_theta" not in written and written["rope_parameters"]["rope_theta"] == 20000.0
    assert load_model(tmp_path / "out", "cpu", torch.float32).config.rope_theta == 20000.0


def test_smoke_run_writes_a_checkpoint_the_engine_runs_hybrid(tmp_path):
    essays, out = shared("data/essays/paul_graham_essays.json"), tmp_path / "hybrid"
    run = subprocess.run([sys.executable, str(REPO / "tools" / "finetune_hybrid.py"), "--device", "cpu",
                          "--model", str(STORIES), "--books", str(BOOKS), "--essays", str(essays),
                          "--out", str(out), "--steps", "2", "--seq", "256",
                          "--minutes", "1", "--rope-theta", "20000", "--sink-tokens", "4", "--window-tokens", "60",
                          "--long-tokens", "400"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "held-out perplexity after 2 steps: short (512 tokens)" in run.stdout
    assert json.loads((out / "config.json").read_text())["rope_theta"] == 20000
    engine = Engine(out, "cpu")
    assert engine.checkpoint_configs == {"hybrid": HybridConfig(sink_tokens=4, window_tokens=60, full_layers=(1, 2))}
    assert engine.model.config.rope_theta == 20000
    generation = engine.generate("Once upon a time, there was a little girl named Lily.", max_new_tokens=4)
    assert generation.stats["method"] == "hybrid"
    trained = engine.model.layers[0].attn.wqkv.weight
    stock = load_model(STORIES, "cpu", torch.float32).layers[0].attn.wqkv.weight
    assert 0 < rel_err(trained, stock) < 0.05  # trained a little, saved in bf16


def test_the_scripts_user_errors_are_one_line(tmp_path, capsys):
    """Counts below one, rates at or below 0, missing text files, a pattern the model cannot take,
    a model that is not there: one line and a non-zero exit, nothing written."""
    essays = tmp_path / "essays.json"
    essays.write_text('{"text": "How to do great work."}')
    base = ["--out", str(tmp_path / "out"), "--device", "cpu", "--books", str(BOOKS), "--essays", str(essays)]
    for flag, value, message in (("--seq", "0", "--seq must be at least 1"), ("--lr", "0", "--lr must be above 0"),
                                 ("--epochs", "-1", "--epochs must be above 0")):
        with pytest.raises(SystemExit) as e:
            ft.parse_args(base + [flag, value])
        assert e.value.code == 2 and message in capsys.readouterr().err
    for flag, value, message in (("--books", str(tmp_path), f"--books {tmp_path} lacks war_and_peace.txt"),
                                 ("--essays", str(tmp_path / "none.json"), f"--essays {tmp_path / 'none.json'} is "
                                                                          "not a file")):
        with pytest.raises(SystemExit) as e:
            ft.main(base + [flag, value, "--model", str(tmp_path / "missing")])
        assert str(e.value) == f"error: {message}"
    with pytest.raises(SystemExit) as e:
        ft.main(base + ["--model", str(STORIES), "--full-layers", "3-99"])
    assert str(e.value) == "error: --full-layers must have 0 <= first <= last < 5"
    with pytest.raises(SystemExit) as e:
        ft.main(base + ["--model", str(tmp_path / "missing")])
    assert str(e.value) == (f"error: {tmp_path / 'missing'} is neither a checkpoint directory nor an embedded model "
                            "(smollm2, qwen2.5-1.5b)")
    assert not (tmp_path / "out").exists()
