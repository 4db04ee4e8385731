"""What the evaluation scripts share: the options every script takes, the engine, tables, output files."""

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import Engine  # noqa: E402

METHODS = ("parallelcomp", "full", "truncate", "streaming")


def parser(doc, out):
    """An argument parser with --model, --device and --out (the prefix of every file written)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", help="checkpoint directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--out", default=out, help="prefix of the files written: PREFIX.json, PREFIX_*.png")
    return p


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
    output_path(prefix, ".json").write_text(json.dumps(data, indent=1))


def length_label(n):
    """1024 -> '1K', 1000 -> '1000'."""
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])
