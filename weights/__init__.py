"""Model weights the engine can fetch and convert by itself (smollm2.py, imported only when needed:
it needs gguf and numpy, which a user's own checkpoint does not)."""


class WeightsError(Exception):
    """The default model cannot be downloaded, verified or converted."""
