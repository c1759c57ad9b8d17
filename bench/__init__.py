"""Benchmarks: each prints one JSON line, ratios against a raw baseline measured in the same run."""
