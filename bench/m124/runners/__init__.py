"""One module per engine, each with `load(options, threads) -> Engine` (see bench.m124.worker.Engine). A runner
imports its engine's package inside `load`, so a missing peer is an error of that variant alone."""
