"""Every method on the quick-start document, each run as the README's command (engine.py with
--json, in a subprocess, as a user types it): the answer, whether it holds the code, the prefill time.

    python eval/quickstart.py --device cpu --out results/quickstart_methods

The document, examples/frankenstein_safe_16k.txt, is chapters 5-8 of Frankenstein (16,416 SmolLM2
tokens) with the paragraph "The code to open the captain's safe is 4721." at 40 % of its tokens:
past the first 4,096 tokens and before the last 8,192, so outside what truncation (the first and
last halves of the window) and StreamingLLM's recent window keep of SmolLM2's 8,192-token window.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from common import Rows

REPO = Path(__file__).resolve().parents[1]
DOCUMENT = "examples/frankenstein_safe_16k.txt"
QUESTION = "What is the code to open the captain's safe?"
CODE = "4721"
OTHERS = ("full", "truncate", "streaming", "infinipot", "locret", "hybrid")
RUNS = {  # label: the flags after the README's common ones
    "parallelcomp": ["--chunk-tokens", "2048", "--top-k-chunks", "1"],  # the quick start: auto runs ParallelComp
    "auto": [],  # ParallelComp with its default options
    **{method: ["--method", method] for method in OTHERS},
}


def command(flags, device):
    device = ["--device", device] if device else []
    return ["engine.py", "--prompt", DOCUMENT, "--question", QUESTION, "--chat", "--max-new-tokens", "32",
            *flags, *device, "--json"]


def first_sentence(text):
    return text.strip().split("\n")[0].split(". ")[0]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS), help="which runs, in this order")
    p.add_argument("--out", default="results/quickstart_methods", help="writes OUT.json")
    args = p.parse_args(argv)
    rows = Rows(args.out, args)
    print("| run | answer (first sentence) | found | prefill s |\n|---|---|---|---:|", flush=True)
    for label in args.runs:
        cmd, load = command(RUNS[label], args.device), os.getloadavg()[0]  # other jobs on the machine slow it
        run = subprocess.run([sys.executable, *cmd], cwd=REPO, capture_output=True, text=True)
        row = dict(run=label, command="python " + shlex.join(cmd), load_average=load, returncode=run.returncode)
        if run.returncode:
            rows.append(dict(row, error=run.stderr.strip()))
            print(f"| {label} | error: {run.stderr.strip()} | | |", flush=True)
            continue
        out = json.loads(run.stdout)
        rows.append(dict(row, found=CODE in out["answer"], **out))
        print(f"| {label} | {first_sentence(out['answer'])} | {'yes' if CODE in out['answer'] else 'no'} "
              f"| {out['prefill_seconds']:.1f} |", flush=True)
    rows.finish()


if __name__ == "__main__":
    main()
