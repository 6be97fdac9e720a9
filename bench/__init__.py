"""Benchmarks: reports, not timed tests."""
