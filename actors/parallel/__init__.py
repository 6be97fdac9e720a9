"""Tensor parallelism: the injected TP group, parallel layers and sliced weight reads."""
