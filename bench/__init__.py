"""Benchmarks (`make bench`): measured tables written into BENCHMARKS.md."""
