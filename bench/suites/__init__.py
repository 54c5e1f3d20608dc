"""Benchmark suites: each is `run(ctx, results)`, measuring side by side and adding rows."""
from . import inference, serve, train

SUITES = {"train": train.run, "inference": inference.run, "serve": serve.run}
