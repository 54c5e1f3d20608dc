"""Soak test: `python -m serve.soak MODEL --duration 300` (`make soak` trains the tiny model and runs this).

Starts `python -m serve MODEL` on 127.0.0.1 (a free port), then keeps `--clients` concurrent clients sending a mix
of requests for `--duration` seconds:

    stream       streaming completions read to [DONE]
    plain        non-streaming completions
    disconnect   streaming completions dropped after the first chunk (the server must cancel and free them)
    bad-json     a body that is not JSON                          (400)
    bad-type     wrong types: {"prompt": 5, "max_tokens": "x"}    (422)
    oversize     a 1 MiB prompt                                    (413 with --max-request-bytes, else 400)
    infer        a KServe v2 infer with a few tokens

and samples the server process's resident memory (psutil) every `--interval` seconds. It prints the RSS series,
a table of responses by kind and status with p50/p99 latency of the successful ones, and two verdicts:
RSS after the warm-up (`--warmup` seconds) stays within `--rss-tolerance` (10%) of its first post-warm-up sample,
and no request got a 5xx. Exit 1 if either fails (a leak or a crash is what a soak is for); 0 otherwise.
"""
from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections import Counter, defaultdict
from typing import Any, Optional

import httpx
import numpy as np
import psutil

from common import cli

from .loadgen import DEFAULT_PROMPTS, spawned_server_process

MIX = {"stream": 35, "plain": 25, "disconnect": 12, "bad-json": 8, "bad-type": 8, "oversize": 2, "infer": 10}
OVERSIZE_BYTES = 1 << 20


async def _request(client: httpx.AsyncClient, base: str, model: str, kind: str, rng: random.Random,
                   max_tokens: int) -> tuple[int, float]:
    """Send one request of `kind`; (HTTP status or 0 for a transport error, seconds to the end)."""
    t0 = time.perf_counter()
    url = f"{base}/v1/completions"
    prompt = rng.choice(DEFAULT_PROMPTS)
    body: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8,
                            "seed": rng.randrange(1 << 30)}
    try:
        if kind in ("stream", "disconnect"):
            body.update(stream=True, stream_options={"include_usage": True})
            async with client.stream("POST", url, json=body) as r:
                if r.status_code == 200:
                    async for line in r.aiter_lines():
                        if kind == "disconnect" and line.startswith("data: "):
                            break  # leaving the block closes the connection mid-stream
                        if line == "data: [DONE]":
                            break
                else:
                    await r.aread()
                return r.status_code, time.perf_counter() - t0
        if kind == "plain":
            r = await client.post(url, json=body)
        elif kind == "bad-json":
            r = await client.post(url, content=b'{"prompt": "def ", "max_tokens": ',
                                  headers={"Content-Type": "application/json"})
        elif kind == "bad-type":
            r = await client.post(url, json={"model": model, "prompt": 5, "max_tokens": "many"})
        elif kind == "oversize":
            r = await client.post(url, json={"model": model, "prompt": "x" * OVERSIZE_BYTES, "max_tokens": 1})
        else:  # infer
            ids = [rng.randrange(1, 200) for _ in range(rng.randrange(1, 9))]
            r = await client.post(f"{base}/v2/models/{model}/infer", json={"inputs": [
                {"name": "input_ids", "datatype": "INT64", "shape": [1, len(ids)], "data": ids}]})
        return r.status_code, time.perf_counter() - t0
    except httpx.HTTPError:
        return 0, time.perf_counter() - t0


async def _soak(base: str, pid: int, *, duration: float, clients: int, max_tokens: int, interval: float,
                seed: int, timeout: float) -> dict[str, Any]:
    proc = psutil.Process(pid)
    rng = random.Random(seed)
    kinds, weights = list(MIX), list(MIX.values())
    statuses: dict[str, Counter] = defaultdict(Counter)
    latencies: dict[str, list[float]] = defaultdict(list)
    rss: list[tuple[float, int]] = []
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        model = (await client.get(f"{base}/v1/models")).json()["data"][0]["id"]
        t0 = time.monotonic()
        end = t0 + duration

        async def worker(wrng: random.Random) -> None:
            while time.monotonic() < end:
                kind = wrng.choices(kinds, weights)[0]
                status, seconds = await _request(client, base, model, kind, wrng, max_tokens)
                statuses[kind][status] += 1
                if status == 200:
                    latencies[kind].append(seconds)

        async def sampler() -> None:
            while time.monotonic() < end:
                t = time.monotonic() - t0
                mb = proc.memory_info().rss
                rss.append((t, mb))
                done = sum(sum(c.values()) for c in statuses.values())
                print(f"soak: {t:6.0f} s  RSS {mb / 2**20:7.1f} MiB  {done} requests", file=sys.stderr, flush=True)
                await asyncio.sleep(interval)

        await asyncio.gather(sampler(), *[worker(random.Random(rng.random())) for _ in range(clients)])
        rss.append((time.monotonic() - t0, proc.memory_info().rss))
        # after the load, a normal completion still works
        r = await client.post(f"{base}/v1/completions", json={"model": model, "prompt": "def ", "max_tokens": 4})
        alive = r.status_code == 200
    return {"statuses": {k: dict(v) for k, v in statuses.items()}, "latencies": latencies, "rss": rss,
            "alive_after": alive}


def summarize(raw: dict[str, Any], warmup: float, tolerance: float) -> dict[str, Any]:
    rows = []
    for kind in MIX:
        st = raw["statuses"].get(kind, {})
        lat = raw["latencies"].get(kind, [])
        rows.append({"kind": kind, "requests": sum(st.values()), "statuses": {str(k): v for k, v in sorted(st.items())},
                     "ok_p50_ms": float(np.percentile(lat, 50)) * 1e3 if lat else None,
                     "ok_p99_ms": float(np.percentile(lat, 99)) * 1e3 if lat else None})
    after = [(t, b) for t, b in raw["rss"] if t >= warmup] or raw["rss"][-1:]
    base = after[0][1]
    peak = max(b for _, b in after)
    growth = (peak - base) / base
    all_ok = [x for k in ("stream", "plain") for x in raw["latencies"].get(k, [])]
    by_status: Counter = Counter()
    for st in raw["statuses"].values():
        by_status.update({str(k): v for k, v in st.items()})
    server_errors = sum(v for k, v in by_status.items() if k.startswith("5"))
    return {"rows": rows, "by_status": dict(sorted(by_status.items())), "requests": sum(by_status.values()),
            "completion_p99_ms": float(np.percentile(all_ok, 99)) * 1e3 if all_ok else None,
            "rss_mib": [[round(t, 1), round(b / 2**20, 1)] for t, b in raw["rss"]],
            "rss_after_warmup_first_mib": base / 2**20, "rss_after_warmup_max_mib": peak / 2**20,
            "rss_growth": growth, "rss_tolerance": tolerance, "rss_pass": growth <= tolerance,
            "server_errors": server_errors, "alive_after": raw["alive_after"],
            "pass": growth <= tolerance and server_errors == 0 and raw["alive_after"]}


def format_report(s: dict[str, Any]) -> str:
    lines = [f"{'kind':<11} {'reqs':>6}  {'p50 ok':>8} {'p99 ok':>8}  statuses"]
    for r in s["rows"]:
        p50 = f"{r['ok_p50_ms']:6.0f}ms" if r["ok_p50_ms"] is not None else "       -"
        p99 = f"{r['ok_p99_ms']:6.0f}ms" if r["ok_p99_ms"] is not None else "       -"
        st = " ".join(f"{k}:{v}" for k, v in r["statuses"].items())
        lines.append(f"{r['kind']:<11} {r['requests']:>6}  {p50:>8} {p99:>8}  {st}")
    healthy = s["server_errors"] == 0 and s["alive_after"]
    series = " ".join(f"{t:.0f}s:{mb:.0f}" for t, mb in s["rss_mib"])
    lines += [f"requests: {s['requests']}, by status: {s['by_status']} (0 = transport error / client disconnect)",
              f"completion p99 (stream + plain, to the end): {s['completion_p99_ms']:.0f} ms"
              if s["completion_p99_ms"] is not None else "completion p99: no successful completions",
              f"RSS MiB over time: {series}",
              f"RSS after warm-up: first {s['rss_after_warmup_first_mib']:.1f} MiB, max "
              f"{s['rss_after_warmup_max_mib']:.1f} MiB, growth {s['rss_growth'] * 100:+.1f}% "
              f"(limit {s['rss_tolerance'] * 100:.0f}%): {'PASS' if s['rss_pass'] else 'FAIL'}",
              f"5xx responses: {s['server_errors']}, normal completion after the soak: "
              f"{'ok' if s['alive_after'] else 'FAILED'}: {'PASS' if healthy else 'FAIL'}",
              f"soak: {'PASS' if s['pass'] else 'FAIL'}"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser("python -m serve.soak", "Run a bounded mixed load against a server it starts, watch its memory, "
                                           "report errors by status and p99 latency; exit 1 on a leak or a 5xx.")
    p.add_argument("model", help="a model file for python -m serve (e.g. runs/soak/tiny.pt)")
    p.add_argument("--duration", type=cli.positive_float, default=300.0, help="seconds of load (default 300)")
    p.add_argument("--warmup", type=float, default=None,
                   help="seconds before the RSS baseline (default: a fifth of --duration, at most 60)")
    p.add_argument("--clients", type=cli.positive_int, default=8, help="concurrent clients")
    p.add_argument("--max-tokens", type=cli.positive_int, default=16)
    p.add_argument("--interval", type=cli.positive_float, default=None,
                   help="seconds between RSS samples (default: duration / 30, at least 1)")
    p.add_argument("--rss-tolerance", type=cli.fraction, default=0.10,
                   help="allowed RSS growth after warm-up (0.10 = 10%%)")
    p.add_argument("--timeout", type=cli.positive_float, default=60.0, help="per-request timeout, seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--serve-args", default="", help="extra flags for python -m serve, e.g. '--max-queue 128'")
    cli.add_json_arg(p)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    cli.existing_file(args.model, "model")
    warmup = args.warmup if args.warmup is not None else min(60.0, args.duration / 5)
    if not 0 <= warmup < args.duration:
        raise cli.UserError(f"--warmup {warmup} must be in [0, --duration {args.duration})")
    interval = args.interval or max(1.0, args.duration / 30)
    interval = min(interval, args.duration / 5)  # a few samples after the warm-up even in a short run
    serve_args = ["--max-batch-size", str(args.clients), "--max-queue", str(4 * args.clients),
                  *args.serve_args.split()]
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    with spawned_server_process(args.model, *serve_args) as (url, proc):
        raw = asyncio.run(_soak(url, proc.pid, duration=args.duration, clients=args.clients,
                                max_tokens=args.max_tokens, interval=interval, seed=args.seed, timeout=args.timeout))
    summary = summarize(raw, warmup, args.rss_tolerance)
    summary.update(started=started, duration_s=args.duration, warmup_s=warmup, clients=args.clients,
                   max_tokens=args.max_tokens, model=str(args.model))
    cli.emit(args.json, summary, lambda: format_report(summary))
    return 0 if summary["pass"] else 1


if __name__ == "__main__":
    cli.run(main)
