"""The command line's entry point: `python engine.py` and the `parallelcomp` script start here.

The engine (and torch, which takes seconds to load) is imported inside the handler of Ctrl-C, so
that an interrupt at any moment ends the same way: one line, "interrupted", and exit status 130.
engine.main handles the interrupts after it starts; this catches those before.
"""

import os
import sys


def main(argv=None):
    try:
        from engine import main as engine_main
        return engine_main(argv)
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":  # of several processes, rank 0 alone prints
            print("interrupted", file=sys.stderr)
        return 130
