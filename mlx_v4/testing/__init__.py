"""Tools for tests and benchmarks: official-format checkpoint writers (need the test extra)."""
