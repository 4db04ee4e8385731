"""What the evaluation scripts share: the options every script takes (any method of the table, in
several settings), the engine, tables, output files."""

import argparse
import json
import math
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import Engine  # noqa: E402
from methods import METHODS, HelpFormatter, add_options, parse_specs  # noqa: E402
from weights import DEFAULT, MODELS  # noqa: E402


def parser(doc, out, methods):
    """An argument parser with --model, --device, --out (the prefix of every file written), --methods
    (default `methods`) and every method's options."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--model", help=f"checkpoint directory, or an embedded model: {', '.join(MODELS)} "
                                   f"(default: {DEFAULT})")
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--out", default=out, help="prefix of the files written: PREFIX.json, PREFIX_*.png")
    p.add_argument("--methods", nargs="+", default=methods, metavar="METHOD[:FLAG=VALUE,...]",
                   help=f"methods of {', '.join(METHODS)}, each in the settings after its colon (e.g. "
                        f"parallelcomp:kv-budget=512); the method options below apply to every run of their method")
    add_options(p)
    return p


def runs(p, args):
    """{label: (method, {field: value})} of --methods, or one line from the parser's error."""
    try:
        return parse_specs(args.methods, args)
    except argparse.ArgumentTypeError as e:
        p.error(str(e))


def log(message):
    print(message, file=sys.stderr, flush=True)


def load_engine(args):
    return Engine(args.model, args.device, log=log)


def output_path(prefix, suffix):
    """PREFIX + suffix, its folder created."""
    path = Path(f"{prefix}{suffix}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_json(prefix, data):
    output_path(prefix, ".json").write_text(json.dumps(data, indent=1, default=str))


class Rows(list):
    """A run's rows, PREFIX.json rewritten after each one with "complete": false, so that a run
    stopped midway (a time limit, Ctrl-C) keeps what it measured; finish() writes the whole."""

    def __init__(self, prefix, args):
        super().__init__()
        self.prefix, self.args = prefix, vars(args)

    def append(self, row):
        super().append(row)
        write_json(self.prefix, dict(args=self.args, complete=False, rows=self))

    def finish(self, **results):
        write_json(self.prefix, dict(args=self.args, complete=True, **results, rows=self))


def file_label(label):
    """A --methods item as part of a file name: parallelcomp:kv-budget=512 -> parallelcomp_kv-budget-512."""
    return re.sub(r"[^\w.-]+", "-", label.replace(":", "_", 1))


def length_label(n):
    """1024 -> '1K', 1000 -> '1000'."""
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def mean_score(rows, **where):
    """The mean score of the rows whose fields equal `where`'s values."""
    scores = [r["score"] for r in rows if all(r[k] == v for k, v in where.items())]
    return sum(scores) / len(scores)


def draw_heatmap(grid, columns, rows, xlabel, ylabel, title, path):
    """grid[i][j] in [0, 1] (NaN where there is none) as a red-to-green image, each cell annotated."""
    fig, ax = plt.subplots(figsize=(1.1 * len(columns) + 2.5, 0.5 * len(rows) + 1.8))
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            ax.text(j, i, "–" if math.isnan(value) else f"{value:.2f}", ha="center", va="center", fontsize=9)
    ax.set_xticks(range(len(columns)), columns)
    ax.set_yticks(range(len(rows)), rows)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    fig.colorbar(image, ax=ax, label="mean score")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
