"""Benchmarks: load generation, model-only runs, resource monitoring and result files."""
