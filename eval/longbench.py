"""LongBench (v1, English) and L-Eval multiple-choice scores, one column per method.

    python eval/longbench.py ../shared/data/longbench/multi_news.jsonl --limit 50 --out results/longbench
    python eval/longbench.py ../shared/data/leval/{coursera,quality,tpo}.jsonl --out results/leval

A LongBench file (fields input, context, answers, all_classes, dataset) runs with LongBench's
prompt template and generation length for its task and is scored with its metric (metrics.py).
Each template is split at {context}: the text before it is the instruction that heads every
ParallelComp chunk, the text after it, {input} filled in, is the question. An L-Eval exam file
(input, instructions, outputs) asks each question after its document and scores exact match of
the option letters. Prints the task scores, writes PREFIX.json with every answer.
"""

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common import Rows, load_engine, log, markdown_table, parser, runs
from metrics import METRICS, example_score, exact_match, gold_options, task_score

PROMPTS = {
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. Answer the question as concisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: {context}\n\nNow, answer the question based on the story as concisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    "qasper": "You are given a scientific article and a question. Answer the question as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the above article as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "hotpotqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "gov_report": "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
    "qmsum": "You are given a meeting transcript and a query containing a question or instruction. Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
    "multi_news": "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:",
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
    "triviaqa": "Answer the question based on the given passage. Only give me the answer and do not output any other words. The following are some examples.\n\n{context}\n\n{input}",
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
    "passage_count": "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing duplicates. The output format should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ",
    "passage_retrieval_en": "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the paragraph that the abstract is from. The answer format must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe answer is: ",
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}
PROMPTS["2wikimqa"] = PROMPTS["musique"] = PROMPTS["hotpotqa"]
MAX_NEW_TOKENS = {
    "hotpotqa": 32, "2wikimqa": 32, "musique": 32, "triviaqa": 32, "passage_count": 32, "passage_retrieval_en": 32,
    "multifieldqa_en": 64, "trec": 64, "lcc": 64, "repobench-p": 64,
    "narrativeqa": 128, "qasper": 128, "samsum": 128,
    "gov_report": 512, "qmsum": 512, "multi_news": 512,
}
FORCED_TOP_K = {"passage_retrieval_en": 1}  # as the original forces

LEVAL_INSTRUCTION = "Read the document below and answer the multiple-choice question after it.\n\nDocument:\n"
LEVAL_ONE = "Answer with the letter of the correct option only."
LEVAL_SEVERAL = "One or more options are correct: answer with the letters of all the correct options only, e.g. AC."
LEVAL_MAX_NEW_TOKENS = 16


@dataclass
class Item:
    """One prompt in the engine's layout: [instruction + document][question]."""
    task: str
    id: str  # LongBench: the record's line; L-Eval: line.question
    document: str
    instruction: str
    question: str
    max_new_tokens: int
    score: Callable[[str], float]  # prediction -> [0, 1]


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def longbench_item(line, record):
    task = record["dataset"]
    if task not in PROMPTS:
        raise ValueError(f"unknown LongBench task {task!r} (known: {', '.join(PROMPTS)})")
    before, after = PROMPTS[task].split("{context}")

    def score(prediction):
        return example_score(task, prediction, record["answers"], record["all_classes"])
    return Item(task, str(line), record["context"], before, after.replace("{input}", record["input"]),
                MAX_NEW_TOKENS[task], score)


def leval_items(records, task):
    """A file whose references ever name several options (coursera) asks for all correct letters."""
    several = any(len(gold_options(o)) > 1 for r in records for o in r["outputs"])
    tail = LEVAL_SEVERAL if several else LEVAL_ONE
    return [Item(task, f"{line}.{i}", r["input"], LEVAL_INSTRUCTION, f"\n\nQuestion: {q.strip()}\n\n{tail}\nAnswer:",
                 LEVAL_MAX_NEW_TOKENS, lambda prediction, output=output: exact_match(prediction, output))
            for line, r in enumerate(records) for i, (q, output) in enumerate(zip(r["instructions"], r["outputs"]))]


def read_items(path, limit):
    """The first `limit` records (LongBench) or questions (L-Eval) of a file."""
    records = read_jsonl(path)
    if "instructions" in records[0]:
        items = leval_items(records, Path(path).stem)
    else:
        items = [longbench_item(line, r) for line, r in enumerate(records)]
    return items[:limit]


def task_options(name, overrides, task):
    """The overrides of method `name` for a task: ParallelComp keeps one chunk where the original forces it."""
    if name == "parallelcomp" and task in FORCED_TOP_K:
        return {**overrides, "top_k_chunks": FORCED_TOP_K[task]}
    return overrides


def run(engine, items, methods, max_new_tokens, rows):
    """methods: {label: (method, {field: value})}; one row per item and label, appended to rows."""
    for item in items:
        for method, (name, overrides) in methods.items():
            start = time.perf_counter()
            out = engine.generate(item.document, item.question, instruction=item.instruction, method=name,
                                  max_new_tokens=max_new_tokens or item.max_new_tokens,
                                  options={name: task_options(name, overrides, item.task)})
            rows.append(dict(task=item.task, id=item.id, method=method, prompt_tokens=out.stats["prompt_tokens"],
                             answer=out.text, score=item.score(out.text), seconds=time.perf_counter() - start))
            log(f"{item.task} {item.id} {method}: {rows[-1]['score']:.2f} {out.text[:60]!r}")


def scores(rows, methods):
    """{task: {method: task score}} in the order tasks first appear."""
    tasks = dict.fromkeys(r["task"] for r in rows)
    return {t: {m: task_score([r["score"] for r in rows if r["task"] == t and r["method"] == m]) for m in methods}
            for t in tasks}


def main(argv=None):
    p = parser(__doc__, "longbench", ["parallelcomp", "full", "truncate"])
    p.add_argument("files", nargs="+", help="LongBench or L-Eval .jsonl files")
    p.add_argument("--limit", type=int, help="first N records (LongBench) or questions (L-Eval) of each file")
    p.add_argument("--max-new-tokens", type=int, help="default: LongBench's for the task, 16 for L-Eval")
    args = p.parse_args(argv)
    methods = runs(p, args)
    items = [item for path in args.files for item in read_items(path, args.limit)]
    engine = load_engine(args)
    rows = Rows(args.out, args)
    run(engine, items, methods, args.max_new_tokens, rows)
    table = scores(rows, args.methods)
    rows.finish(scores=table)
    n = Counter(r["task"] for r in rows)
    print(markdown_table(["task", "metric", "n"] + args.methods,
                         [[t, METRICS.get(t, exact_match).__name__, n[t] // len(args.methods)]
                          + [f"{table[t][m]:.2f}" for m in args.methods] for t in table]))


if __name__ == "__main__":
    main()
