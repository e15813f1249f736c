"""Benchmarks that produce the figures in BENCHMARKS.md."""
