"""Fine-tune a checkpoint to LongGen's hybrid attention pattern (hybrid.py) in a few GPU minutes.

    python tools/finetune_hybrid.py --out weights/SmolLM2-135M-hybrid --rope-theta 1e6
    python tools/finetune_hybrid.py --device cpu --steps 2 --seq 256 --model tests/assets/stories260K \
        --out /tmp/hybrid --window-tokens 60 --sink-tokens 4 --long-tokens 400

As methods.md §4.4 plans it: a full fine-tune (AdamW, every parameter) on public-domain books
packed into sequences of --seq tokens, each book after a BOS (LongGen's format), with the RoPE
base raised if asked (SmolLM2: 1e5 -> 1e6). One forward per sequence at positions 0..T-1: full
layers causal, sparse layers masked by the pattern (hybrid.SparseSlots.visible over the whole
sequence: one dense (T, T) additive bf16 mask shared by every sparse layer, 512 MiB at 16K, 2 GiB
at 32K; K/V repeated to the query heads there, so that SDPA's memory-efficient kernel takes it).
lr 2e-5, linear warm-up over 3 % of the steps then cosine to 0; on a GPU float32 master weights
under bf16 autocast (bf16 weights would round lr 2e-5 updates away). War and Peace is never
trained on. The script prints the held-out perplexity before and after: a short text (the first
--short-tokens of the essays, in the window) and War and Peace's first --long-tokens (16K), both
under the pattern. It writes a Hugging Face checkpoint: bf16 safetensors with HF names, config.json
with the new rope_theta, max_position_embeddings raised to --seq and the pattern under
hybrid.CONFIG_KEY (the engine then runs it hybrid by default), the tokenizer files copied.

Choices where the plan is silent: AdamW betas (0.9, 0.95), weight decay 0.1, gradient norm clipped
at 1.0 (ProLong's); batch 1 sequence; --seq 16384 by default (32K fits an H200 too: --seq 32768);
the pattern's masks are dense SDPA masks, not block-sparse kernels, so sparse layers cost as much
as full ones here (LongGen trains them with block-sparse kernels). The training text is the books
(Pride and Prejudice, Frankenstein) and the essays past the held-out ones: ~1 M SmolLM2 tokens, an
adaptation to the pattern, not LongGen's 5B-token extension. --epochs caps the passes over it: the
first run, with the books alone and no cap, went through them 64 times in 5 minutes and memorised
them (held-out short text +36 %). --minutes caps the training loop too: after PLAN_AT steps the
number of steps (and with it the schedule) shrinks to what fits.
"""

import argparse
import functools
import json
import math
import random
import shutil
import sys
from dataclasses import fields, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from attention import attention  # noqa: E402
from budget import StepBudget, check_options  # noqa: E402  (tools/, the script's own folder)
from checkpoint import CheckpointError, checkpoint_tensors, load_model, read_hf_config  # noqa: E402
from engine import cli_message  # noqa: E402
from hybrid import CONFIG_KEY, SparseSlots  # noqa: E402
from methods import HelpFormatter, add_options, config_from, given_options  # noqa: E402
from rope import rope_frequencies  # noqa: E402
from prefill import OptionError  # noqa: E402
from tokenizer import Tokenizer, TokenizerError  # noqa: E402
from weights import WeightsError, resolve  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
BOOKS, ESSAYS = SHARED / "books", SHARED / "essays" / "paul_graham_essays.json"
HELD_OUT_BOOK, HELD_OUT_FROM = "war_and_peace.txt", 20_000  # characters: past the front matter
HELD_OUT_ESSAYS = 200_000  # characters: the essays' first ones are the held-out short text
BETAS, WEIGHT_DECAY, CLIP, WARMUP_SHARE = (0.9, 0.95), 0.1, 1.0, 0.03
TIMED_FROM, PLAN_AT = 3, 13  # steps timed to plan the rest (the first ones warm the GPU up)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "config.json")


def pattern_masks(model_config, config, T, device, dtype):
    """Per layer what a T-token sequence at positions 0..T-1 attends to: None (causal) in full
    layers; in sparse layers one shared (T, T) additive mask of `dtype`, 0 where visible, -inf
    elsewhere (SDPA would turn a bool mask into one at every call, and keep each for backward)."""
    p = torch.arange(T, device=device)
    visible = SparseSlots(config, T).visible(p[:, None], p[None, :])
    sparse = torch.zeros(T, T, device=device, dtype=dtype).masked_fill_(~visible, float("-inf"))
    full = config.full_range(model_config.n_layers)
    return [None if layer in full else sparse for layer in range(model_config.n_layers)]


def masked_attend(masks):
    """An `attend` for one sequence: causal attention in full layers, the pattern's in sparse ones.
    K/V are repeated to the query heads there: SDPA with enable_gqa and a mask runs its math kernel,
    which keeps the (H, T, T) probabilities for backward."""
    def attend(layer, q, k, v):
        if masks[layer] is None:
            return attention(q, k, v)
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # (B, H, T, D)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=masks[layer])
    return attend


def sequence_nll(model, ids, masks):
    """Mean next-token NLL of ids (T,) in one forward at positions 0..T-1 under the per-layer masks."""
    positions = torch.arange(len(ids), device=ids.device)[None]
    hidden = model(ids[None], positions, masked_attend(masks))
    head = model.embed.weight if model.lm_head is None else model.lm_head.weight
    return F.cross_entropy(F.linear(hidden[0, :-1], head).float(), ids[1:])


def packed(books, bos, seq, rng):
    """Endless sequences of seq tokens: the books in a new order each pass, each after a BOS, cut
    from a random offset."""
    while True:
        order = rng.sample(books, len(books))
        stream = [t for book in order for t in bos + book]
        for start in range(rng.randrange(seq), len(stream) - seq + 1, seq):
            yield stream[start:start + seq]


def lr_factor(step, total):
    warmup = max(1, round(WARMUP_SHARE * total))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train(model, masks, sequences, args, log):
    """At most args.steps steps and args.minutes minutes; returns the steps run."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=BETAS, weight_decay=WEIGHT_DECAY)
    device = model.device
    budget = StepBudget(args.steps, args.minutes, device, TIMED_FROM, PLAN_AT, log)
    for step in budget:
        for group in optimizer.param_groups:
            group["lr"] = args.lr * lr_factor(step, budget.total)
        ids = torch.tensor(next(sequences), device=device)
        with autocast(device):
            loss = sequence_nll(model, ids, masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        if step % 20 == 0 or step == budget.total - 1:
            log(f"step {step + 1}/{budget.total}  loss {loss.item():.4f}  lr {optimizer.param_groups[0]['lr']:.2e}  "
                f"{budget.elapsed():.0f} s ({args.seq * (step + 1) / budget.elapsed() / 1e3:.1f}K tokens/s)")
    return budget.done


def autocast(device):
    """bf16 matmuls over float32 weights on a GPU; plain float32 on the CPU."""
    return torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")


def compute_dtype(device):
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@torch.no_grad()
def perplexity(model, ids, config):
    ids = torch.tensor(ids, device=model.device)
    masks = pattern_masks(model.config, config, len(ids), model.device, compute_dtype(model.device))
    with autocast(model.device):
        return sequence_nll(model, ids, masks).exp().item()


def set_rope_theta(model, theta):
    model.config = replace(model.config, rope_theta=theta)
    model.inv_freq = rope_frequencies(model.config).to(model.device)


def save_checkpoint(model, source, out, config, seq):
    """A Hugging Face directory: bf16 weights with HF names, source's config.json with the new
    rope_theta, window and pattern, and every other file of source (the tokenizer's) copied."""
    out.mkdir(parents=True, exist_ok=True)
    params = dict(model.named_parameters())
    tensors = {name: (params[param] if rows is None else params[param][rows]).detach().to(torch.bfloat16)
                     .contiguous().cpu() for name, (param, rows, _) in checkpoint_tensors(model.config).items()}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    hf = read_hf_config(source)
    full = config.full_range(model.config.n_layers)
    pattern = {f.name: getattr(config, f.name) for f in fields(config)} | {"full_layers": [full.start, full.stop - 1]}
    hf.update(torch_dtype="bfloat16", **{CONFIG_KEY: pattern},
              max_position_embeddings=max(model.config.max_position_embeddings, seq))
    rope = hf["rope_parameters"] if "rope_parameters" in hf else hf  # where transformers 5 / 4 keep it
    rope["rope_theta"] = model.config.rope_theta
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    for file in source.iterdir():
        if file.is_file() and file.name not in WEIGHT_FILES and not file.name.endswith(".safetensors"):
            shutil.copy(file, out / file.name)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    p.add_argument("--model", type=Path, help="checkpoint directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--books", type=Path, default=BOOKS,
                   help=f"folder of .txt books (all but {HELD_OUT_BOOK} trained on, with the essays)")
    p.add_argument("--essays", type=Path, default=ESSAYS,
                   help='RULER\'s essays as {"text": ...}: trained on, all but the held-out short text')
    p.add_argument("--rope-theta", type=float, help="new RoPE base (default: the checkpoint's)")
    p.add_argument("--seq", type=int, default=16384, help="tokens per training sequence")
    p.add_argument("--steps", type=int, default=100_000, help="training steps (sequences, batch 1) at most")
    p.add_argument("--epochs", type=float, default=2.0, help="passes over the training text at most")
    p.add_argument("--minutes", type=float, default=8.0, help="time for the training loop at most")
    p.add_argument("--lr", type=float, default=2e-5, help="peak learning rate")
    p.add_argument("--short-tokens", type=int, default=512, help="held-out short text: the essays' first tokens")
    p.add_argument("--long-tokens", type=int, default=16384,
                   help=f"held-out long text: {HELD_OUT_BOOK}'s first tokens")
    p.add_argument("--seed", type=int, default=0)
    add_options(p, ["hybrid"])
    args = p.parse_args(argv)
    check_options(p, args, counts=("seq", "steps", "short_tokens", "long_tokens"), amounts=("epochs", "minutes", "lr"))
    return args


def main(argv=None):
    args = parse_args(argv)
    log = functools.partial(print, flush=True)
    torch.manual_seed(args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not (args.books / HELD_OUT_BOOK).is_file():
        sys.exit(f"error: --books {args.books} lacks {HELD_OUT_BOOK}")
    if not args.essays.is_file():
        sys.exit(f"error: --essays {args.essays} is not a file")
    try:
        args.model = resolve(args.model, log)
        model = load_model(args.model, device, torch.float32).requires_grad_(True)
        config = config_from("hybrid", given_options(args))
        config.validate(model.config)
        tokenizer = Tokenizer.from_dir(args.model)
    except (CheckpointError, TokenizerError, WeightsError) as e:
        sys.exit(f"error: {e}")
    except OptionError as e:
        sys.exit(f"error: {cli_message(e)}")
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    essays = json.loads(args.essays.read_text())["text"]
    books = [tokenizer.encode(f.read_text(encoding="utf-8")) for f in sorted(args.books.glob("*.txt"))
             if f.name != HELD_OUT_BOOK] + [tokenizer.encode(essays[HELD_OUT_ESSAYS:])]
    args.steps = min(args.steps, max(1, int(args.epochs * sum(len(b) + len(bos) for b in books) / args.seq)))
    short = bos + tokenizer.encode(essays[:min(20 * args.short_tokens, HELD_OUT_ESSAYS)])
    short = short[:min(args.short_tokens, model.config.max_position_embeddings)]
    held_out = (args.books / HELD_OUT_BOOK).read_text(encoding="utf-8")[HELD_OUT_FROM:]
    long = (bos + tokenizer.encode(held_out[:8 * args.long_tokens]))[:args.long_tokens]
    full = config.full_range(model.config.n_layers)
    log(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters; layers {full.start}-{full.stop - 1} "
        f"full, the others {config.pattern}; training text {sum(map(len, books))} tokens, seq {args.seq}, "
        f"at most {args.steps} steps")

    def evaluate(when):
        log(f"held-out perplexity {when}: short ({len(short)} tokens) {perplexity(model, short, config):.2f}  "
            f"{HELD_OUT_BOOK} ({len(long)} tokens, pattern) {perplexity(model, long, config):.2f}")

    evaluate(f"before (rope_theta {model.config.rope_theta:g})")
    if args.rope_theta is not None:
        set_rope_theta(model, args.rope_theta)
        evaluate(f"with rope_theta {args.rope_theta:g}, untrained")
    masks = pattern_masks(model.config, config, args.seq, device, compute_dtype(device))
    steps = train(model, masks, packed(books, bos, args.seq, random.Random(args.seed)), args, log)
    evaluate(f"after {steps} steps")
    save_checkpoint(model, args.model, args.out, config, args.seq)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
