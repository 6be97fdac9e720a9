"""Sampling: logits processing, seeded generators and lossless rejection sampling."""
