"""Load generator for a running server: `python -m serve.loadgen URL --concurrency 1,8,16,32`.

`run_load(base_url, prompts, concurrency, max_tokens, ...)` keeps `concurrency` streaming completions in flight
(closed loop: each client sends its next request when the previous one ends) until `requests` have finished, and
returns throughput and latency percentiles:

    tokens_per_s       generated tokens (from each stream's usage) / wall time
    ttft_p50_s/p99_s   request sent -> first text chunk
    itl_p50_s/p99_s    between consecutive chunks of one stream (one chunk per token, except where the server
                       holds text back for an incomplete character or a possible stop string)
    e2e_p50_s/p99_s    request sent -> [DONE]
    errors, rejected   failed requests; 503s (queue full) are counted in both

`bench_serve(model, levels, serve_args=...)` starts `python -m serve` for a model file, runs every level against it
and stops it: `bench/` uses it (or `run_load` against its own server) for `make bench-serve`. `--spawn` does the
same from the command line. This module measures only; it asserts nothing.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Iterator, Optional, Sequence

import httpx
import numpy as np

from common import cli

DEFAULT_PROMPTS = [
    "def ", "import os\n", "class Config:\n    def __init__(self", "for i in range(", "return self.",
    "if __name__ == \"__main__\":\n", "    with open(path) as f:\n", "from typing import", "def test_", "try:\n    ",
    "x = [", "raise ValueError(", "while True:\n", "@property\ndef ", "async def ", "except Exception as e:\n",
]


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


async def _one(client: httpx.AsyncClient, url: str, body: dict, headers: dict) -> dict:
    t0 = time.perf_counter()
    times: list[float] = []
    tokens = 0
    try:
        async with client.stream("POST", url, json=body, headers=headers) as r:
            if r.status_code != 200:
                await r.aread()
                return {"ok": False, "status": r.status_code, "error": r.text[:200]}
            done = False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return {"ok": False, "status": 200, "error": chunk["error"].get("message", "")}
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if any(c.get("text") for c in chunk.get("choices", [])):
                    times.append(time.perf_counter())
            if not done:
                return {"ok": False, "status": 200, "error": "stream ended without [DONE]"}
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        return {"ok": False, "status": 0, "error": f"{type(e).__name__}: {e}"}
    t1 = time.perf_counter()
    return {"ok": True, "status": 200, "tokens": tokens, "ttft": (times[0] - t0) if times else t1 - t0,
            "itl": list(np.diff(times)), "e2e": t1 - t0}


async def run_load_async(base_url: str, prompts: Sequence[str], concurrency: int, max_tokens: int = 32, *,
                         requests: Optional[int] = None, model: Optional[str] = None, api_key: Optional[str] = None,
                         temperature: float = 0.0, timeout: float = 600.0) -> dict:
    base_url = base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    total = requests if requests is not None else max(len(prompts), 2 * concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        if model is None:
            r = await client.get(base_url + "/v1/models", headers=headers)
            r.raise_for_status()
            model = r.json()["data"][0]["id"]
        counter = iter(range(total))
        results: list[dict] = []

        async def worker():
            for i in counter:
                body = {"model": model, "prompt": prompts[i % len(prompts)], "max_tokens": max_tokens,
                        "temperature": temperature, "stream": True, "stream_options": {"include_usage": True}}
                results.append(await _one(client, base_url + "/v1/completions", body, headers))

        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*[worker() for _ in range(concurrency)]), timeout)
        wall = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    ttft = [r["ttft"] for r in ok]
    itl = [x for r in ok for x in r["itl"]]
    e2e = [r["e2e"] for r in ok]
    out_tokens = sum(r["tokens"] for r in ok)
    return {
        "concurrency": concurrency, "requests": total, "completed": len(ok), "errors": len(results) - len(ok),
        "rejected": sum(1 for r in results if r["status"] == 503), "max_tokens": max_tokens,
        "wall_s": wall, "output_tokens": out_tokens, "tokens_per_s": out_tokens / wall if wall > 0 else 0.0,
        "requests_per_s": len(ok) / wall if wall > 0 else 0.0,
        "ttft_p50_s": _pct(ttft, 50), "ttft_p99_s": _pct(ttft, 99), "itl_p50_s": _pct(itl, 50),
        "itl_p99_s": _pct(itl, 99), "e2e_p50_s": _pct(e2e, 50), "e2e_p99_s": _pct(e2e, 99),
        "first_error": next((r["error"] for r in results if not r["ok"]), None),
    }


def run_load(base_url: str, prompts: Sequence[str], concurrency: int, max_tokens: int = 32, **kwargs) -> dict:
    """Blocking wrapper of `run_load_async` (runs its own event loop)."""
    return asyncio.run(run_load_async(base_url, prompts, concurrency, max_tokens, **kwargs))


@contextlib.contextmanager
def spawned_server(model: str, *serve_args: str, start_timeout: float = 300.0) -> Iterator[str]:
    """Run `python -m serve MODEL --port 0 ...` in a subprocess; yield its base URL; SIGTERM it on exit."""
    with spawned_server_process(model, *serve_args, start_timeout=start_timeout) as (url, _):
        yield url


@contextlib.contextmanager
def spawned_server_process(model: str, *serve_args: str,
                           start_timeout: float = 300.0) -> Iterator[tuple[str, subprocess.Popen]]:
    """`spawned_server`, also yielding the process (a profiler attaches to its pid)."""
    cmd = [sys.executable, "-m", "serve", str(model), "--host", "127.0.0.1", "--port", "0", *serve_args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    found: dict = {}

    def pump():
        for line in proc.stdout:
            lines.append(line)
            m = re.search(r"listening on (http://\S+)", line)
            if m and "url" not in found:
                found["url"] = m.group(1)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + start_timeout
    while "url" not in found and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        if "url" not in found:
            raise cli.UserError(f"python -m serve {model} did not start: {''.join(lines[-5:]).strip()[-300:]}")
        yield found["url"], proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def bench_serve(model: str, levels: Sequence[int] = (1, 8, 16, 32), *, serve_args: Sequence[str] = (),
                prompts: Sequence[str] = DEFAULT_PROMPTS, max_tokens: int = 32, requests: Optional[int] = None,
                warmup: bool = True) -> list[dict]:
    """Start a server for `model` (extra `serve_args`, e.g. ["--backend", "onnxruntime"]), drive it at each
    concurrency level in turn with the same requests, stop it; one `run_load` row per level (for `bench/`)."""
    max_batch = str(max(levels))
    args = list(serve_args)
    if "--max-batch-size" not in args:
        args += ["--max-batch-size", max_batch]
    with spawned_server(model, *args) as url:
        if warmup:
            run_load(url, prompts, min(4, max(levels)), 8, requests=8)
        return [run_load(url, prompts, c, max_tokens, requests=requests) for c in levels]


def format_table(rows: list[dict]) -> str:
    head = (f"{'clients':>7} {'reqs':>5} {'err':>4} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} "
            f"{'ITL p50':>8} {'ITL p99':>8} {'e2e p50':>8}")
    lines = [head]
    for r in rows:
        lines.append(f"{r['concurrency']:>7} {r['completed']:>5} {r['errors']:>4} {r['tokens_per_s']:>8.1f} "
                     f"{r['ttft_p50_s'] * 1e3:>7.0f}ms {r['ttft_p99_s'] * 1e3:>7.0f}ms {r['itl_p50_s'] * 1e3:>6.1f}ms "
                     f"{r['itl_p99_s'] * 1e3:>6.1f}ms {r['e2e_p50_s']:>7.2f}s")
    return "\n".join(lines)


def speedups(rows: list[dict]) -> list[str]:
    """Each level's tokens/s against the 1-client level's, one line per level (none without a 1-client level)."""
    base = next((r for r in rows if r["concurrency"] == 1), None)
    if not base or base["tokens_per_s"] <= 0:
        return []
    return [f"speedup at {r['concurrency']} clients vs 1: {r['tokens_per_s'] / base['tokens_per_s']:.2f}x tokens/s"
            for r in rows if r["concurrency"] > 1]


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser("python -m serve.loadgen", "Drive a running hotpath (or any OpenAI-compatible) server with "
                                              "concurrent streaming completions and report throughput and latency.")
    p.add_argument("url", help="the server's base URL, e.g. http://127.0.0.1:8000; with --spawn, a model file to "
                               "serve for the run")
    p.add_argument("--spawn", action="store_true", help="start python -m serve URL(=MODEL) for the run, stop it after")
    p.add_argument("--serve-args", default="", help="with --spawn: extra flags for python -m serve, e.g. "
                                                    "'--backend onnxruntime --threads 1'")
    p.add_argument("--concurrency", default="1,8,16,32", help="comma-separated client counts")
    p.add_argument("--requests", type=cli.positive_int, default=None,
                   help="requests per level (default: max(prompts, 2 x clients))")
    p.add_argument("--max-tokens", type=cli.positive_int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--model", default=None, help="model name (default: the server's first)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--prompts", default=None, help="a text file, one prompt per line (default: built-in code prompts)")
    cli.add_json_arg(p)  # the JSON is the list of rows, one per level
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    except ValueError as e:
        raise cli.UserError(f"--concurrency {args.concurrency!r} is not a list of integers (e.g. 1,8,16,32)") from e
    if not levels or min(levels) < 1:
        raise cli.UserError("--concurrency needs client counts of at least 1")
    prompts = DEFAULT_PROMPTS
    if args.prompts:
        text = cli.existing_file(args.prompts, "prompt file").read_text()
        prompts = [ln.replace("\\n", "\n") for ln in text.splitlines() if ln.strip()] or DEFAULT_PROMPTS
    rows = []
    with (spawned_server(args.url, "--max-batch-size", str(max(levels)), *args.serve_args.split())
          if args.spawn else contextlib.nullcontext(args.url)) as url:
        for c in levels:
            try:
                row = run_load(url, prompts, c, args.max_tokens, requests=args.requests, model=args.model,
                               api_key=args.api_key, temperature=args.temperature)
            except httpx.HTTPError as e:
                raise cli.UserError(f"cannot reach {url} ({type(e).__name__}: {e}); start python -m serve first") from e
            rows.append(row)
            print(f"loadgen: concurrency {c}: {row['completed']}/{row['requests']} requests, {row['errors']} errors, "
                  f"{row['tokens_per_s']:.1f} tokens/s", file=sys.stderr, flush=True)  # progress, stdout is the result
    cli.emit(args.json, rows, lambda: "\n".join([format_table(rows), *speedups(rows)]))
    return 0


if __name__ == "__main__":
    cli.run(main)
