"""Benchmarks and reports under tools/."""
