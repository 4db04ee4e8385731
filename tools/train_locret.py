"""Train Locret's retaining heads (locret.py) for SmolLM2-135M-Instruct in a few GPU minutes.

    python tools/train_locret.py --out weights/locret_smollm2.safetensors
    python tools/train_locret.py --device cpu --steps 2 --model tests/assets/stories260K \
        --out /tmp/heads.safetensors

As Locret's locret/train/{data_gen,train}.py. A sample is a prefix (the chat template's user turn:
a document and a request; everything before the answer) and an answer. One causal forward of both
gives the heads' scores of the prefix tokens, read from the pre-RoPE [q | k | v] with gradients on
the heads only, and their labels: the largest pre-softmax score each prefix token receives from the
answer's tokens over its KV head's query group (locret.scores_and_labels). Loss: Locret's SmoothL1
plus 0.0025 x smoothness, and our ranking term (locret.retention_loss). Optimiser: Locret's AdamW,
lr 5e-4, betas (0.9, 0.95), linear warm-up over 2/3 of the steps (2000 of 3000) then linear decay,
gradient values clipped at 0.5, batch 1; heads start N(0, 0.02) as Hugging Face initialises the
fresh fc1/fc2 there.

Data, made up on the fly from public-domain books (Pride and Prejudice, Frankenstein), documents
of a quarter to 7/8 of the trained window (SmolLM2: 2K to 7K tokens):
- 30 % continuation: a passage and "Continue the text."; answer: the book's next 128 tokens;
- 20 % quotation: a passage and a request to quote what follows a 24-token cue; answer: the 64
  tokens after the cue;
- 50 % retrieval: a document with 1-4 sentences "The secret code for NAME is DDDDD." at random
  places, one of them asked for at the end; answer: its sentence. The document is a book passage
  or, half the time, a haystack: 2-5 of our FILLERS sentences repeated.
War and Peace is never trained on: its passages make the held-out samples, on which the script
prints, before and after training, the top-10 % overlap (Locret's "acc": random heads about 0.1)
and a recall check through the real prefill (`recall`): in --recall-samples passages of twice the
trained window, each with one fact in its own wording (RECALL_FACTS: neither the training facts'
nor the pass key's) planted before the uncompressed tail and asked for at the end, locret.prefill
with the default LocretConfig and the heads; printed: the share of (layer, KV head) caches that
still hold every token of the fact's value after the prompt, and the share of greedy answers
(ANSWER_TOKENS at most) that contain it. The overlap says nothing of the value's survival.

Deviations from Locret (its LongAlpaca data is neither offline nor SmolLM2's length): the data
above instead of long instructions and their answers (retrieval weighted up and given haystacks
after the SmolLM2 heads of a 30 % mix, all book passages, kept a pass key in fewer than half the
caches), and no HotpotQA/SQuAD or self-generated summaries (methods.md §3.4) to fit the time
budget offline; scores and labels in float32, without TF32 (Locret's train.py allows it); the
ranking term of the loss (locret.py's docstring); the labels come from the same forward as the
scores (Locret prefills 4096-token chunks first, then the answer: the same numbers); --minutes
caps the training loop: after PLAN_AT steps the number of steps (and with it the schedule) shrinks
to what fits.
"""

import argparse
import functools
import random
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from budget import StepBudget, check_options  # noqa: E402  (tools/, the script's own folder)
from checkpoint import CheckpointError, load_model  # noqa: E402
from decoding import SamplingParams, decode  # noqa: E402
from locret import (LOCAL_TOKENS, LocretConfig, prefill, random_heads, retain, retention_loss,  # noqa: E402
                    save_heads, scores_and_labels, tail_length, with_heads)
from methods import HelpFormatter  # noqa: E402
from prefill import Prompt  # noqa: E402
from tokenizer import Tokenizer, TokenizerError  # noqa: E402
from weights import WeightsError, resolve  # noqa: E402

BOOKS = Path(__file__).resolve().parents[2] / "shared" / "data" / "books"
TRAIN_BOOKS = ("pride_and_prejudice.txt", "frankenstein.txt")
HELD_OUT_BOOK, HELD_OUT_CHARS = "war_and_peace.txt", 600_000
BETAS, CLIP = (0.9, 0.95), 0.5
WARMUP_SHARE = 2000 / 3000  # Locret: get_linear_schedule_with_warmup(2000, 3000)
TIMED_FROM, PLAN_AT = 5, 25  # steps timed to plan the rest (the first ones warm the GPU up)
CONTINUATION, CUE, QUOTE = 128, 24, 64  # answer and cue lengths in tokens
NAMES = ("Ariadne", "Bartholomew", "Cassius", "Delphine", "Evander", "Fenella", "Gideon", "Honora",
         "Ignatius", "Juniper", "Leopold", "Marisol", "Octavia", "Peregrine", "Rosalind", "Thaddeus")
MARK = "\x00DOCUMENT\x00"
TASK_WEIGHTS = (0.3, 0.2, 0.5)  # continuation, quotation, retrieval
HAYSTACK_SHARE = 0.5  # of the retrieval documents
FILLERS = ("The kettle hums on the stove.", "A dog barks somewhere down the road.", "Rain taps on the window.",
           "The clock in the hall strikes the hour.", "Leaves drift across the empty square.",
           "A boat creaks at its mooring.", "The lamp flickers and steadies.", "Bread cools on the table.")
RECALL_NAMES = ("Agatha", "Benedikt", "Clementine", "Desmond", "Eulalie", "Florian", "Griselda", "Horatio")
RECALL_FACTS = (  # (fact, request) about a 5-digit value
    ("The night porter handed {name} the key to room {value}.",
     "The night porter handed {name} the key to a room. Which room number?"),
    ("{name} scratched the number {value} on the back of the old map.",
     "Which number did {name} scratch on the back of the old map?"),
    ("The ferry ticket bought by {name} bore the serial {value}.",
     "Which serial did the ferry ticket bought by {name} bear?"))
ANSWER_TOKENS = 16  # greedy answer length of the recall check


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
        self.eos_ids = tokenizer.eos_ids

    def prompt(self, document, request):
        return Prompt(self.before, document, self.encode("\n\n" + request) + self.after, eos_ids=self.eos_ids)

    def prefix(self, document, request):
        return self.prompt(document, request).ids()


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


def haystack(rng, n, layout):
    """n tokens of 2-5 FILLERS sentences repeated."""
    block = layout.encode(" ".join(rng.sample(FILLERS, rng.randint(2, 5))) + " ")
    return (block * (n // len(block) + 1))[:n]


def retrieval(rng, book, n, layout):
    names = rng.sample(NAMES, rng.randint(1, 4))
    facts = [f"The secret code for {name} is {rng.randrange(10000, 100000)}." for name in names]
    pieces = [layout.encode(" " + fact + " ") for fact in facts]
    n_document = n - sum(map(len, pieces))
    if rng.random() < HAYSTACK_SHARE:
        document = haystack(rng, n_document, layout)
    else:
        start = rng.randrange(len(book) - n)
        document = book[start:start + n_document]
    for at, piece in sorted(zip((rng.randrange(len(document)) for _ in pieces), pieces), reverse=True):
        document = document[:at] + piece + document[at:]
    asked = rng.randrange(len(names))
    return layout.prefix(document, f"What is the secret code for {names[asked]}?"), layout.encode(facts[asked])


def sampler(books, layout, window, seed):
    """A function returning a new (prefix, answer) at each call."""
    rng = random.Random(seed)
    tasks = (continuation, quotation, retrieval)

    def sample():
        task = rng.choices(tasks, TASK_WEIGHTS)[0]
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


def value_span(decode, piece, value):
    """(i, j): the fewest tokens piece[i:j] whose text contains `value`."""
    j = next(j for j in range(len(piece) + 1) if value in decode(piece[:j]))
    return max(i for i in range(j) if value in decode(piece[i:j])), j


def recall_probe(rng, book, n, layout):
    """A passage of n tokens with a RECALL_FACTS sentence planted before the uncompressed tail and
    asked for at the end: (Prompt, value, range of the value's token indices in the prompt)."""
    name, (fact, request) = rng.choice(RECALL_NAMES), rng.choice(RECALL_FACTS)
    value = str(rng.randrange(10000, 100000))
    piece = layout.encode(" " + fact.format(name=name, value=value) + " ")
    start = rng.randrange(len(book) - n)
    document = book[start:start + n - len(piece)]
    at = rng.randrange(len(document) - LOCAL_TOKENS)
    prompt = layout.prompt(document[:at] + piece + document[at:], request.format(name=name))
    i, j = value_span(layout.decode, piece, value)
    offset = len(prompt.head) + at
    return prompt, value, range(offset + i, offset + j)


@torch.no_grad()
def held_tokens(model, prompt, config):
    """Which prompt tokens each layer and KV head holds after locret.prefill(prompt, config), config
    with its heads loaded: bool (L, H_kv, len(ids)); the uncompressed tail is held by all."""
    ids = prompt.ids()
    stream = ids[:len(ids) - tail_length(prompt)]
    cache = retain(model, config.retaining_heads, stream, config, 0)[0]
    c = model.config
    held = torch.zeros(c.n_layers, c.n_kv_heads, len(ids), dtype=torch.bool, device=model.device)
    held.scatter_(-1, cache.origin[..., :cache.n], True)
    held[..., len(stream):] = True
    return held


def greedy(model, prefilled, eos_ids):
    """The greedy answer after a prefill, ANSWER_TOKENS at most, through the engine's decode loop."""
    return decode(model, prefilled, SamplingParams().sampler(model.device), ANSWER_TOKENS, eos_ids, True,
                  lambda token: None)[0]


@torch.no_grad()
def recall(model, heads, probes, decode, config=LocretConfig()):
    """(held, answered) over recall probes: the share of (layer, KV head) caches that hold every
    token of the value after Locret's prefill with `heads`, and the share of greedy answers that
    contain the value."""
    config = with_heads(replace(config, retaining_heads=heads), model)
    held = answered = 0.0
    for prompt, value, span in probes:
        held += held_tokens(model, prompt, config)[..., span].all(dim=-1).float().mean().item()
        answer = greedy(model, prefill(model, prompt, config, ANSWER_TOKENS), prompt.eos_ids)
        answered += value in decode(answer)
    return held / len(probes), answered / len(probes)


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
                                formatter_class=HelpFormatter)
    p.add_argument("--out", required=True, help="heads file to write (bf16 safetensors, Locret's names)")
    p.add_argument("--model", help="checkpoint directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--books", type=Path, default=BOOKS, help="folder of the books")
    p.add_argument("--steps", type=int, default=3000, help="training steps (samples, batch 1) at most")
    p.add_argument("--minutes", type=float, default=6.0, help="time for the training loop at most")
    p.add_argument("--hidden", type=int, default=256, help="hidden width of each head")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--eval-samples", type=int, default=32, help="held-out samples (War and Peace)")
    p.add_argument("--recall-samples", type=int, default=8,
                   help="held-out recall probes (War and Peace passages of twice the trained window)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    check_options(p, args, counts=("steps", "hidden", "eval_samples", "recall_samples"), amounts=("minutes",))
    return args


def main(argv=None):
    args = parse_args(argv)
    log = functools.partial(print, flush=True)
    torch.manual_seed(args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    missing = [name for name in (*TRAIN_BOOKS, HELD_OUT_BOOK) if not (args.books / name).is_file()]
    if missing:
        sys.exit(f"error: --books {args.books} lacks {', '.join(missing)}")
    try:
        args.model = resolve(args.model, log)
        model = load_model(args.model, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
        tokenizer = Tokenizer.from_dir(args.model)
    except (CheckpointError, TokenizerError, WeightsError) as e:
        sys.exit(f"error: {e}")
    window = model.config.max_position_embeddings
    layout = Layout(tokenizer)
    books = [tokenizer.encode((args.books / name).read_text(encoding="utf-8")) for name in TRAIN_BOOKS]
    held_out = tokenizer.encode((args.books / HELD_OUT_BOOK).read_text(encoding="utf-8")[:HELD_OUT_CHARS])
    held_out_sample = sampler([held_out], layout, window, seed=args.seed + 1)
    held_out_samples = [held_out_sample() for _ in range(args.eval_samples)]
    rng = random.Random(args.seed + 2)
    probes = [recall_probe(rng, held_out, 2 * window, layout) for _ in range(args.recall_samples)]

    def check(when):
        overlap, loss = evaluate(model, heads, held_out_samples)
        held, answered = recall(model, heads, probes, tokenizer.decode)
        log(f"held-out, {when}:  top-10% overlap {overlap:.3f}  loss {loss:.4f}  recall of a planted "
            f"value: held by {held:.3f} of the caches, answered {answered:.3f} ({len(probes)} probes "
            f"of {2 * window} tokens)")
        return overlap, held, answered

    heads = random_heads(model.config, args.hidden).to(device)
    n_params = sum(w.numel() for w in heads.parameters())
    log(f"{n_params / 1e6:.2f} M head parameters ({2 * n_params / 2 ** 20:.1f} MiB in bf16); "
        f"training books {sum(map(len, books))} tokens")
    check("random heads")
    steps = train(model, heads, sampler(books, layout, window, seed=args.seed), args, log)
    overlap, held, answered = check(f"after {steps} steps")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_heads(heads, args.out, metadata={"model": Path(args.model).name, "steps": str(steps),
                                          "held_out_top10_overlap": f"{overlap:.4f}",
                                          "held_out_recall_held": f"{held:.4f}",
                                          "held_out_recall_answered": f"{answered:.4f}"})
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
