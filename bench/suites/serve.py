"""Serving under load: a real server process on 127.0.0.1 per backend, driven by concurrent streaming clients."""
from __future__ import annotations

from ..harness import Results
from .common import Context

SUITE = "serve"


def run(ctx: Context, results: Results) -> None:
    results.skip(SUITE, "all", "the serving benchmark is wired in once serve/loadgen.py lands")
