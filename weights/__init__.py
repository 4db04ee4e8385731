"""Model weights the engine can fetch and convert by itself."""
