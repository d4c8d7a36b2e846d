"""Benchmarks: offline throughput, serving load, kernel micro-benchmarks."""
