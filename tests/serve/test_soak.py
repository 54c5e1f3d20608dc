"""`python -m serve.soak`: a short real run against a server it starts, and the verdict logic on made-up series."""
from __future__ import annotations

import json

import pytest

from serve.soak import MIX, summarize
from tests.helpers import run_cli


def _raw(rss_mib: list[float], statuses: dict | None = None) -> dict:
    return {"statuses": statuses or {"stream": {200: 10}, "plain": {200: 5}},
            "latencies": {"stream": [0.1] * 10, "plain": [0.2] * 5},
            "rss": [(float(t), int(mb * 2**20)) for t, mb in enumerate(rss_mib)], "alive_after": True}


def test_rss_growth_after_warmup_fails_and_warmup_growth_does_not():
    flat = summarize(_raw([100, 180, 200, 204, 201, 206]), warmup=2, tolerance=0.10)  # the climb is warm-up
    assert flat["rss_pass"] and flat["pass"]
    assert flat["rss_growth"] == pytest.approx(0.03)
    leak = summarize(_raw([200, 200, 200, 210, 220, 230]), warmup=2, tolerance=0.10)
    assert not leak["rss_pass"] and not leak["pass"]
    assert leak["rss_growth"] == pytest.approx(0.15)


def test_a_5xx_fails_the_soak():
    s = summarize(_raw([100, 100, 100], {"plain": {200: 3, 500: 1}}), warmup=0, tolerance=0.10)
    assert s["rss_pass"] and s["server_errors"] == 1 and not s["pass"]


@pytest.mark.slow
def test_soak_runs_a_mixed_load_for_a_few_seconds(tiny_ckpt, tmp_path):
    out = tmp_path / "soak.json"
    r = run_cli("serve.soak", str(tiny_ckpt), "--duration", "5", "--clients", "4", "--max-tokens", "4",
                "--json", str(out), timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "soak: PASS" in r.stdout and "RSS after warm-up" in r.stdout
    s = json.loads(out.read_text())
    assert [row["kind"] for row in s["rows"]] == list(MIX)
    assert s["requests"] >= 20 and s["by_status"].get("200", 0) >= 10
    malformed = {k: v for row in s["rows"] if row["kind"] in ("bad-json", "bad-type")
                 for k, v in row["statuses"].items()}
    assert set(malformed) <= {"400", "422"}, malformed  # rejected as the client's fault, never a 5xx
    assert s["server_errors"] == 0 and s["alive_after"]
    assert len(s["rss_mib"]) >= 4 and all(mb > 50 for _, mb in s["rss_mib"])  # a real process's memory
    assert s["completion_p99_ms"] > 0


def test_a_missing_model_is_a_one_line_error(tmp_path):
    r = run_cli("serve.soak", str(tmp_path / "nope.pt"), "--duration", "5", timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
