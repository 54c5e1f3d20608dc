"""Limits and faults on a real server process: API key (401), a bounded queue under load (503 + Retry-After, never
a hang), 32 concurrent streaming clients below the cap, and SIGTERM draining in-flight requests then exiting 0."""
from __future__ import annotations

import asyncio
import signal
import threading
import time

import httpx
import openai
import pytest

from tests.helpers import ServerProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]  # a real server process
KEY = "sekret-key"


@pytest.fixture(scope="module")
def small_server(tiny_ckpt):
    """Two rows in the batch, two more in the queue, an API key; SIGTERM'd by the last test of this module."""
    srv = ServerProcess(tiny_ckpt, "--max-batch-size", "2", "--max-queue", "2", "--api-key", KEY,
                        "--shutdown-timeout", "60", "--model-name", "tiny")
    yield srv
    srv.kill()


def auth(key=KEY):
    return {"Authorization": f"Bearer {key}"}


def test_api_key(small_server):
    url = small_server.url
    body = {"prompt": "def ", "max_tokens": 2}
    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.post(url + "/v1/completions", json=body, headers=auth("wrong"), timeout=60).status_code == 401
    assert httpx.get(url + "/v2/models/tiny", timeout=60).status_code == 401
    assert httpx.post(url + "/v1/completions", json=body, headers=auth(), timeout=60).status_code == 200
    # probes and metrics stay open
    assert httpx.get(url + "/v2/health/ready", timeout=60).status_code == 200
    assert httpx.get(url + "/metrics", timeout=60).status_code == 200
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    assert client.completions.create(model="tiny", prompt="x", max_tokens=3, temperature=0).usage.completion_tokens
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()


async def _stream(client: httpx.AsyncClient, url: str, max_tokens: int) -> tuple[int, str, dict]:
    async with client.stream("POST", url + "/v1/completions", headers=auth(),
                             json={"prompt": "def ", "max_tokens": max_tokens, "temperature": 0,
                                   "stream": True}) as r:
        body = (await r.aread()).decode()
        return r.status_code, body, dict(r.headers)


def test_over_the_queue_cap_gets_503_not_a_hang(small_server):
    async def main():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.wait_for(
                asyncio.gather(*[_stream(client, small_server.url, 12) for _ in range(16)]), 240)

    results = asyncio.run(main())
    codes = [c for c, _, _ in results]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(200) >= 4  # the batch (2) and the queue (2) were served
    assert codes.count(503) >= 1
    for code, body, headers in results:
        if code == 200:
            assert body.rstrip().endswith("data: [DONE]")
        else:
            assert headers["retry-after"] == "1" and "busy" in body


def test_sigterm_drains_in_flight_then_exits_0(small_server):
    url = small_server.url
    result: dict = {}
    first_token = threading.Event()

    def long_stream():
        pieces = []
        with httpx.stream("POST", url + "/v1/completions", headers=auth(), timeout=120,
                          json={"prompt": "def ", "max_tokens": 40, "temperature": 0, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    first_token.set()
                pieces.append(line)
        result["lines"] = pieces

    t = threading.Thread(target=long_stream)
    t.start()
    assert first_token.wait(120)
    small_server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    # no new requests: the listener is closed (connection refused) or the engine answers 503
    try:
        r = httpx.post(url + "/v1/completions", headers=auth(), json={"prompt": "x", "max_tokens": 2}, timeout=10)
        assert r.status_code == 503
    except httpx.TransportError:
        pass
    t.join(120)
    assert not t.is_alive()
    assert result["lines"][-1] == "data: [DONE]" or result["lines"][-2:] == ["data: [DONE]", ""]
    finishes = [ln for ln in result["lines"] if '"finish_reason": "length"' in ln]
    assert finishes, "the in-flight request was cut short"
    assert small_server.proc.wait(60) == 0, small_server.output()
