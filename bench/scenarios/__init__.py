"""Benchmark scenarios: each module's ``run(servers, options) -> list[Figure]``."""
