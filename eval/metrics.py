"""LongBench's per-example metrics (its metrics.py and eval.py, rewritten) and L-Eval's exact match.

Every LongBench metric scores one prediction against one reference answer in [0, 1];
`task_score` takes the max over an example's references and reports 100 × the mean.
"""

import re
import string
from collections import Counter

from rapidfuzz import fuzz
from rouge import Rouge

FIRST_LINE_TASKS = ("trec", "triviaqa", "samsum", "lsht")  # scored on the prediction's first line


def normalize_answer(text):
    """Lower case, no punctuation, no articles, single spaces (SQuAD's normalisation)."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def qa_f1(prediction, answer, **_):
    """Harmonic mean of token precision and recall, tokens counted with multiplicity."""
    pred, gold = normalize_answer(prediction).split(), normalize_answer(answer).split()
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction, answer, **_):
    """ROUGE-L F of the `rouge` package, as LongBench computes it (summary-level union LCS over
    sentences split at '.', unique words counted)."""
    try:
        return Rouge(metrics=["rouge-l"]).get_scores([prediction], [answer], avg=True)["rouge-l"]["f"]
    except (ValueError, RecursionError):  # an empty hypothesis; its recursive LCS on a ~1000-word sentence
        return 0.0


def classification_score(prediction, answer, all_classes, **_):
    """1 / (classes named in the prediction) if the answer is among them, else 0; a named class
    that is only a part of the answer's name does not count."""
    named = [c for c in all_classes if c in prediction and not (c in answer and c != answer)]
    return 1.0 / len(named) if answer in named else 0.0


def share_of_numbers(prediction, number):
    """The share of the numbers in the prediction that equal `number`; 0 without numbers."""
    numbers = re.findall(r"\d+", prediction)
    return numbers.count(number) / len(numbers) if numbers else 0.0


def count_score(prediction, answer, **_):
    return share_of_numbers(prediction, str(answer))


def retrieval_score(prediction, answer, **_):
    """Against 'Paragraph N': the share of the prediction's numbers equal to N."""
    return share_of_numbers(prediction, re.search(r"Paragraph (\d+)", answer)[1])


def code_sim(prediction, answer, **_):
    """Edit similarity of the first line that is not a comment or a code fence.

    rapidfuzz's fuzz.ratio is the normalised Indel similarity that fuzzywuzzy's ratio computes
    with python-Levenshtein, unrounded (fuzzywuzzy rounds to whole percents).
    """
    lines = prediction.lstrip("\n").split("\n")
    line = next((x for x in lines if not any(mark in x for mark in ("`", "#", "//"))), "")
    return fuzz.ratio(line, answer) / 100


METRICS = {
    "narrativeqa": qa_f1, "qasper": qa_f1, "multifieldqa_en": qa_f1, "hotpotqa": qa_f1,
    "2wikimqa": qa_f1, "musique": qa_f1, "triviaqa": qa_f1,
    "gov_report": rouge_l, "qmsum": rouge_l, "multi_news": rouge_l, "samsum": rouge_l,
    "trec": classification_score, "passage_count": count_score, "passage_retrieval_en": retrieval_score,
    "lcc": code_sim, "repobench-p": code_sim,
}


def example_score(task, prediction, answers, all_classes=None):
    """The best score of one prediction over its reference answers, in [0, 1]."""
    if task in FIRST_LINE_TASKS:
        prediction = prediction.lstrip("\n").split("\n")[0]
    return max(METRICS[task](prediction, a, all_classes=all_classes) for a in answers)


def task_score(scores):
    """LongBench's task score: 100 × the mean of the example scores, to 2 decimals."""
    return round(100 * sum(scores) / len(scores), 2)


# ---------------------------------------------------------------------------- L-Eval

OPTION_FILLERS = {"and", "or", "answer", "answers", "option", "options", "is", "are", "the"}


def gold_options(output):
    """L-Eval's reference: 'ABC' (coursera, several correct) or 'B' (tpo) or '(B) text' (quality)."""
    if re.fullmatch(r"[A-D]+", output.strip()):
        return set(output.strip())
    return set(re.match(r"\s*\(([A-D])\)", output)[1])


def chosen_options(prediction):
    """The option letters an answer starts with, read word by word up to its first '.' or line end:
    'A, C and D.', '(B) because…', 'The answer is C', 'D. A guess' give {A, C, D}, {B}, {C}, {D};
    the first other word ends it."""
    line = prediction.strip().split("\n")[0].split(".")[0]
    letters = set()
    for word in re.findall(r"[A-Za-z]+", line):
        if re.fullmatch(r"[A-D]+", word):
            letters |= set(word)
        elif word.lower() not in OPTION_FILLERS:
            break
    return letters


def exact_match(prediction, output):
    """1 when the chosen letters are exactly the correct ones (all of them for coursera)."""
    return float(chosen_options(prediction) == gold_options(output))
