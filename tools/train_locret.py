"""Train Locret's retaining heads (locret.py) for SmolLM2-135M-Instruct in a few GPU minutes.

    python tools/train_locret.py --out weights/locret_smollm2.safetensors
    python tools/train_locret.py --device cpu --steps 2 --model ../shared/models/stories260K \
        --out /tmp/heads.safetensors

As Locret's locret/train/{data_gen,train}.py. A sample is a prefix (the chat template's user turn:
a document and a request; everything before the answer) and an answer. One causal forward of both
gives the heads' scores of the prefix tokens, read from the pre-RoPE [q | k | v] with gradients on
the heads only, and their labels: the largest pre-softmax score each prefix token receives from the
answer's tokens over its KV head's query group (locret.scores_and_labels). Loss: SmoothL1 plus
0.0025 x smoothness (locret.retention_loss). Optimiser: Locret's AdamW, lr 5e-4, betas (0.9, 0.95),
linear warm-up over 2/3 of the steps (2000 of 3000) then linear decay, gradient values clipped at
0.5, batch 1; heads start N(0, 0.02) as Hugging Face initialises the fresh fc1/fc2 there.

Data, made up on the fly from public-domain books (Pride and Prejudice, Frankenstein), documents
of a quarter to 7/8 of the trained window (SmolLM2: 2K to 7K tokens):
- 40 % continuation: a passage and "Continue the text."; answer: the book's next 128 tokens;
- 30 % quotation: a passage and a request to quote what follows a 24-token cue; answer: the 64
  tokens after the cue;
- 30 % retrieval: a passage with 1-4 sentences "The secret code for NAME is DDDDD." at random
  places, one of them asked for; answer: its sentence.
War and Peace is never trained on: its passages make the held-out samples, on which the script
prints the top-10 % overlap (Locret's "acc": random heads about 0.1) before and after training.

Deviations from Locret (its LongAlpaca data is neither offline nor SmolLM2's length): the data
above instead of long instructions and their answers, and no HotpotQA/SQuAD or self-generated
summaries (methods.md §3.4) to fit the time budget offline; scores and labels in float32; the
labels come from the same forward as the scores (Locret prefills 4096-token chunks first, then
the answer: the same numbers); --minutes caps the training loop: after PLAN_AT steps the number
of steps (and with it the schedule) shrinks to what fits.
"""

import argparse
import functools
import random
import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from budget import StepBudget  # noqa: E402  (tools/, the script's own folder)
from checkpoint import load_model  # noqa: E402
from locret import RetainingHeads, retention_loss, save_heads, scores_and_labels  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

BOOKS = Path(__file__).resolve().parents[2] / "shared" / "data" / "books"
TRAIN_BOOKS = ("pride_and_prejudice.txt", "frankenstein.txt")
HELD_OUT_BOOK, HELD_OUT_CHARS = "war_and_peace.txt", 600_000
BETAS, CLIP, INIT_STD = (0.9, 0.95), 0.5, 0.02
WARMUP_SHARE = 2000 / 3000  # Locret: get_linear_schedule_with_warmup(2000, 3000)
TIMED_FROM, PLAN_AT = 5, 25  # steps timed to plan the rest (the first ones warm the GPU up)
CONTINUATION, CUE, QUOTE = 128, 24, 64  # answer and cue lengths in tokens
NAMES = ("Ariadne", "Bartholomew", "Cassius", "Delphine", "Evander", "Fenella", "Gideon", "Honora",
         "Ignatius", "Juniper", "Leopold", "Marisol", "Octavia", "Peregrine", "Rosalind", "Thaddeus")
MARK = "\x00DOCUMENT\x00"


class Layout:
    """Prefix tokens of a request about a document: the chat template's user turn, or BOS +
    document + request for a model without a template."""

    def __init__(self, tokenizer):
        self.encode, self.decode = tokenizer.encode, tokenizer.decode
        if tokenizer.chat_template is None:
            self.before, self.after = tokenizer.bos_prefix, []
        else:
            before, after = tokenizer.render_chat([{"role": "user", "content": MARK}]).split(MARK)
            self.before, self.after = tokenizer.encode(before), tokenizer.encode(after)

    def prefix(self, document, request):
        return self.before + document + self.encode("\n\n" + request) + self.after


def continuation(rng, book, n, layout):
    start = rng.randrange(len(book) - n - CONTINUATION)
    answer = book[start + n:start + n + CONTINUATION]
    return layout.prefix(book[start:start + n], "Continue the text."), answer


def quotation(rng, book, n, layout):
    start = rng.randrange(len(book) - n)
    document = book[start:start + n]
    at = rng.randrange(n - CUE - QUOTE)
    cue = layout.decode(document[at:at + CUE])
    request = f'Quote the text above word for word, starting right after "{cue}".'
    return layout.prefix(document, request), document[at + CUE:at + CUE + QUOTE]


def retrieval(rng, book, n, layout):
    names = rng.sample(NAMES, rng.randint(1, 4))
    facts = [f"The secret code for {name} is {rng.randrange(10000, 100000)}." for name in names]
    pieces = [layout.encode(" " + fact + " ") for fact in facts]
    start = rng.randrange(len(book) - n)
    document = book[start:start + n - sum(map(len, pieces))]
    for at, piece in sorted(zip((rng.randrange(len(document)) for _ in pieces), pieces), reverse=True):
        document = document[:at] + piece + document[at:]
    asked = rng.randrange(len(names))
    return layout.prefix(document, f"What is the secret code for {names[asked]}?"), layout.encode(facts[asked])


def sampler(books, layout, window, seed):
    """A function returning a new (prefix, answer) at each call."""
    rng = random.Random(seed)
    tasks, weights = (continuation, quotation, retrieval), (0.4, 0.3, 0.3)

    def sample():
        task = rng.choices(tasks, weights)[0]
        n = rng.randint(window // 4, window * 7 // 8 - CONTINUATION)
        return task(rng, rng.choice(books), n, layout)
    return sample


def top_overlap(scores, labels, share=0.1):
    """Locret's "acc": the share of each (layer, KV head)'s top 10 % prefix tokens by label that
    are also among its top 10 % by score. scores, labels (L, H_kv, T)."""
    k = max(1, int(share * scores.shape[-1]))
    mine = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(k).indices, True)
    return mine.gather(-1, labels.topk(k).indices).float().mean().item()


@torch.no_grad()
def evaluate(model, heads, samples):
    """Mean top-10 % overlap and loss over samples."""
    results = [(top_overlap(s, l), retention_loss(s, l).item())
               for s, l in (scores_and_labels(model, heads, p, a) for p, a in samples)]
    return tuple(sum(r) / len(results) for r in zip(*results))


def lr_factor(step, total):
    """get_linear_schedule_with_warmup with Locret's warm-up share: 0 -> 1 over the first 2/3 of
    the steps, then down to 0 at `total`."""
    warmup = round(WARMUP_SHARE * total)
    if step < warmup:
        return step / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def train(model, heads, sample, args, log):
    """Locret's optimisation for at most args.steps steps and args.minutes minutes; returns the steps run."""
    optimizer = torch.optim.AdamW(heads.parameters(), lr=args.lr, betas=BETAS)
    budget = StepBudget(args.steps, args.minutes, model.device, TIMED_FROM, PLAN_AT, log)
    for step in budget:
        for group in optimizer.param_groups:
            group["lr"] = args.lr * lr_factor(step, budget.total)
        prefix, answer = sample()
        scores, labels = scores_and_labels(model, heads, prefix, answer)
        loss = retention_loss(scores, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_value_(heads.parameters(), CLIP)
        optimizer.step()
        if step % 50 == 0 or step == budget.total - 1:
            log(f"step {step + 1}/{budget.total}  loss {loss.item():.4f}  top-10% overlap "
                f"{top_overlap(scores.detach(), labels):.3f}  prefix {len(prefix)}  "
                f"lr {optimizer.param_groups[0]['lr']:.2e}  {budget.elapsed():.0f} s")
    return budget.done


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="heads file to write (bf16 safetensors, Locret's names)")
    p.add_argument("--model", help="checkpoint directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--books", type=Path, default=BOOKS, help="folder of the books")
    p.add_argument("--steps", type=int, default=3000, help="training steps (samples, batch 1) at most")
    p.add_argument("--minutes", type=float, default=6.0, help="time for the training loop at most")
    p.add_argument("--hidden", type=int, default=256, help="hidden width of each head")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--eval-samples", type=int, default=32, help="held-out samples (War and Peace)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    log = functools.partial(print, flush=True)
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True  # as Locret's train.py
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.model is None:
        from weights.smollm2 import ensure_default_model
        args.model = ensure_default_model(log)
    model = load_model(args.model, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    tokenizer, window = Tokenizer.from_dir(args.model), model.config.max_position_embeddings
    layout = Layout(tokenizer)
    books = [tokenizer.encode((args.books / name).read_text(encoding="utf-8")) for name in TRAIN_BOOKS]
    held_out = tokenizer.encode((args.books / HELD_OUT_BOOK).read_text(encoding="utf-8")[:HELD_OUT_CHARS])
    held_out_sample = sampler([held_out], layout, window, seed=args.seed + 1)
    held_out_samples = [held_out_sample() for _ in range(args.eval_samples)]

    heads = RetainingHeads(model.config, args.hidden).to(device)
    for weight in heads.parameters():
        nn.init.normal_(weight, std=INIT_STD)
    n_params = sum(w.numel() for w in heads.parameters())
    log(f"{n_params / 1e6:.2f} M head parameters ({2 * n_params / 2 ** 20:.1f} MiB in bf16); "
        f"training books {sum(map(len, books))} tokens")
    overlap, loss = evaluate(model, heads, held_out_samples)
    log(f"held-out, random heads:  top-10% overlap {overlap:.3f}  loss {loss:.4f}")
    steps = train(model, heads, sampler(books, layout, window, seed=args.seed), args, log)
    overlap, loss = evaluate(model, heads, held_out_samples)
    log(f"held-out, after {steps} steps:  top-10% overlap {overlap:.3f}  loss {loss:.4f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_heads(heads, args.out, metadata={"model": Path(args.model).name, "steps": str(steps),
                                          "held_out_top10_overlap": f"{overlap:.4f}"})
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
