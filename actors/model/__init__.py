"""Decoder-only transformer: config, layers, KV cache, forward pass and loader."""
