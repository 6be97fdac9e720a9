"""The engine around the model: per-round loop, stopping and detokenization."""
