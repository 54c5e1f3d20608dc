"""A bounded load test: 32 concurrent streaming `openai` clients below the queue cap all complete without errors,
sharing decode steps (continuous batching), and greedy outputs still match `model.generate`."""
from __future__ import annotations

import asyncio

import openai
import pytest

from model.generate import generate
from serve.loadgen import run_load

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]  # real server processes


def test_32_concurrent_streaming_clients(tiny_server, tiny_model):
    model, tok, _ = tiny_model
    prompts = [f"def f{i}(x):" if i % 2 else f"import m{i}" for i in range(32)]
    eos = tok.token_to_id("<|endoftext|>")
    refs = [tok.decode([t for t in generate(model, tok.encode(p).ids, 16) if t != eos]) for p in prompts]
    client = openai.AsyncOpenAI(base_url=tiny_server.url + "/v1", api_key="unused", max_retries=0, timeout=240)

    async def one(p):
        stream = await client.completions.create(model="tiny", prompt=p, max_tokens=16, temperature=0, stream=True)
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def main():
        try:
            return await asyncio.wait_for(asyncio.gather(*[one(p) for p in prompts]), 240)
        finally:
            await client.close()

    assert asyncio.run(main()) == refs


def test_loadgen_reports(tiny_server):
    r = run_load(tiny_server.url, ["def ", "import os", "class A:"], concurrency=4, requests=8, max_tokens=8,
                 timeout=240)
    assert r["errors"] == 0 and r["completed"] == 8
    assert r["output_tokens"] == 64 and r["tokens_per_s"] > 0
    assert 0 < r["ttft_p50_s"] <= r["ttft_p99_s"] and 0 < r["itl_p50_s"] <= r["itl_p99_s"]


def test_bench_serve_spawns_and_stops_a_server(tiny_ckpt):
    from serve.loadgen import bench_serve

    rows = bench_serve(str(tiny_ckpt), (1, 2), requests=4, max_tokens=4, warmup=False)
    assert [r["concurrency"] for r in rows] == [1, 2]
    assert all(r["completed"] == 4 and r["errors"] == 0 and r["output_tokens"] == 16 for r in rows)
