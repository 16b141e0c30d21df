"""Benchmarks: `vidya bench throughput` (offline engine, optional transformers baseline)."""
