# bench/ holds pytest-benchmark micro-benchmarks; they run only when asked for (`pytest bench/ --benchmark-only`).
