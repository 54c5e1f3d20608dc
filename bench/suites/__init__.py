"""Benchmark suites: each is `run(ctx, results)`, measuring side by side and adding rows."""
from . import gpt2, inference, serve, train

SUITES = {"train": train.run, "inference": inference.run, "gpt2-124m": gpt2.run,
          "serve": serve.run}
