"""A server that refuses what it cannot serve, early and cheaply, on a real server process: oversized bodies (413,
with Content-Length and chunked), prompts too long in characters (400 before tokenizing), --request-timeout (408 or
an SSE error event, the engine row freed), hand-written hostile requests (always 4xx, never 5xx or a hang), and a
storm of disconnecting streams (gauges back to 0, latency back to normal)."""
from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest

from tests.helpers import ServerProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]  # a real server process
MiB = 1 << 20
NORMAL = {"prompt": "def ", "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    srv = ServerProcess(tiny_ckpt, "--max-batch-size", "8", "--max-queue", "64", "--model-name", "tiny")
    yield srv
    assert srv.terminate() == 0, srv.output()


def gauges(url: str) -> tuple[float, float]:
    from prometheus_client.parser import text_string_to_metric_families

    values = {s.name: s.value for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text)
              for s in fam.samples}
    return values["hotpath_running_requests"], values["hotpath_waiting_requests"]


def wait_idle(url: str, deadline_s: float = 60) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if gauges(url) == (0, 0):
            return
        time.sleep(0.1)
    pytest.fail(f"running/waiting gauges stayed at {gauges(url)}")


def normal_request_works(url: str) -> float:
    t0 = time.perf_counter()
    r = httpx.post(url + "/v1/completions", json=NORMAL, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------ body size
@pytest.mark.parametrize("path", ["/v1/completions", "/v2/models/tiny/infer"])
def test_body_over_the_limit_with_content_length_gets_413(server, path):
    body = json.dumps({"prompt": "x" * (2 * MiB), "inputs": []}).encode()
    r = httpx.post(server.url + path, content=body, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413, r.text[:300]
    err = r.json()["error"]
    if path.startswith("/v1"):
        assert "1048576" in err["message"] and err["code"] == "request_too_large"
    else:
        assert isinstance(err, str) and "1048576" in err
    normal_request_works(server.url)


@pytest.mark.parametrize("path", ["/v1/completions", "/v2/models/tiny/infer"])
def test_chunked_body_over_the_limit_gets_413(server, path):
    def chunks():
        yield b'{"prompt": "'
        for _ in range(64):  # 4 MiB in 64 KiB pieces, no Content-Length (Transfer-Encoding: chunked)
            yield b"y" * (64 * 1024)
        yield b'"}'

    r = httpx.post(server.url + path, content=chunks(), headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413, r.text[:300]
    assert "1048576" in r.text
    normal_request_works(server.url)


def test_prompt_too_long_in_characters_is_refused_before_tokenizing(server):
    # under the body limit, but no tokenizer of this vocabulary can fit 500k characters into 64 tokens
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "a" * 500_000, "max_tokens": 4}, timeout=60)
    assert r.status_code == 400, r.text[:300]
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and "500000 characters" in err["message"]
    normal_request_works(server.url)


class ThreadRecordingTokenizer:
    """The real tokenizer, noting which thread each encode runs on."""

    def __init__(self, tokenizer):
        self.tokenizer, self.encode_threads = tokenizer, []

    def encode(self, text):
        self.encode_threads.append(threading.get_ident())
        return self.tokenizer.encode(text)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


@pytest.mark.timeout(120)
def test_prompts_are_tokenized_off_the_event_loop(tiny_ckpt):
    from serve.app import create_app
    from serve.backends import load_backend

    backend = load_backend(tiny_ckpt, threads=1)
    spy = backend.tokenizer = ThreadRecordingTokenizer(backend.tokenizer)
    app = create_app(backend, model_name="tiny")

    async def main() -> int:
        app.state.server.engine.start()
        try:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://hotpath") as client:
                r = await client.post("/v1/completions", json={"prompt": ["def ", "x = "], "max_tokens": 2})
                assert r.status_code == 200, r.text
            return threading.get_ident()
        finally:
            app.state.server.engine.stop()

    loop_thread = asyncio.run(main())
    assert len(spy.encode_threads) == 2 and loop_thread not in spy.encode_threads


# ------------------------------------------------------------------------------------------------ timeout
@pytest.fixture(scope="module")
def timeout_server(tiny_ckpt):
    # 16 rows, no queue: timed-out requests that kept their rows would make the next full request a 503
    srv = ServerProcess(tiny_ckpt, "--max-batch-size", "16", "--max-queue", "0", "--model-name", "tiny",
                        "--request-timeout", "0.02")
    yield srv
    assert srv.terminate() == 0, srv.output()


def test_request_timeout_non_streaming(timeout_server):
    url = timeout_server.url
    # 16 prompts x 56 tokens (56 decode steps of a 16-row batch) cannot finish in 20 ms
    r = httpx.post(url + "/v1/completions", timeout=60,
                   json={"prompt": ["def "] * 16, "max_tokens": 56, "temperature": 0})
    assert r.status_code == 408, r.text[:300]
    err = r.json()["error"]
    assert err["code"] == "request_timeout" and "0.02" in err["message"]
    wait_idle(url)
    r = httpx.post(url + "/v2/models/tiny/infer", timeout=60,
                   json={"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 3], "data": [1, 2, 3]}]})
    assert r.status_code in (200, 408), r.text[:300]  # a single forward may well beat 20 ms
    if r.status_code == 408:
        assert isinstance(r.json()["error"], str)


def test_request_timeout_streaming(timeout_server):
    url = timeout_server.url
    with httpx.stream("POST", url + "/v1/completions", timeout=60,
                      json={"prompt": ["def "] * 16, "max_tokens": 56, "temperature": 0,
                            "stream": True}) as r:
        assert r.status_code == 200
        events = [ln.removeprefix("data: ") for ln in r.iter_lines() if ln.startswith("data: ")]
    errors = [json.loads(e)["error"] for e in events if e.startswith('{"error"')]
    assert len(errors) == 1 and errors[0]["code"] == "request_timeout", events[-3:]
    assert not any('"finish_reason": "length"' in e for e in events)
    wait_idle(url)
    # the freed rows take a new full request (a leaked row would answer 503: no queue)
    r = httpx.post(url + "/v1/completions", json={"prompt": ["x"] * 16, "max_tokens": 1}, timeout=60)
    assert r.status_code in (200, 408), r.text


# ------------------------------------------------------------------------------------------------ hostile requests
def _nested(depth: int) -> bytes:
    return b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"


def _kserve(inputs, **extra) -> bytes:
    return json.dumps({"inputs": inputs, **extra}).encode()


def _ids(**over) -> dict:
    return {"name": "input_ids", "datatype": "INT64", "shape": [1, 3], "data": [1, 2, 3], **over}


V1, V2 = "/v1/completions", "/v2/models/tiny/infer"
HOSTILE = [  # (id, path, body)
    ("nan-temperature", V1, b'{"prompt": "x", "temperature": NaN}'),
    ("inf-top_p", V1, b'{"prompt": "x", "top_p": Infinity}'),
    ("-inf-temperature", V1, b'{"prompt": "x", "temperature": -Infinity}'),
    ("nan-max_tokens", V1, b'{"prompt": "x", "max_tokens": NaN}'),
    ("huge-float-max_tokens", V1, b'{"prompt": "x", "max_tokens": 1e400}'),
    ("huge-int-max_tokens", V1, b'{"prompt": "x", "max_tokens": 99999999999999999999999999999999}'),
    ("4400-digit-max_tokens", V1, b'{"prompt": "x", "max_tokens": ' + b"9" * 4400 + b"}"),
    ("negative-max_tokens", V1, b'{"prompt": "x", "max_tokens": -7}'),
    ("huge-temperature-int", V1, b'{"prompt": "x", "temperature": 1' + b"0" * 400 + b"}"),
    ("tiny-temperature", V1, b'{"prompt": "x", "temperature": 1e-300, "max_tokens": 4}'),
    ("denormal-temperature", V1, b'{"prompt": "x", "temperature": 5e-324, "max_tokens": 4}'),
    ("huge-seed", V1, b'{"prompt": "x", "seed": 1000000000000000000000000000000}'),
    ("huge-top_k", V1, b'{"prompt": "x", "top_k": 1000000000000000000000000000000, "temperature": 1}'),
    ("huge-n", V1, b'{"prompt": "x", "n": 1e300}'),
    *[(f"wrong-type-{field}", V1, json.dumps({"prompt": "x", field: value}).encode()) for field, value in [
        ("model", 5), ("max_tokens", "many"), ("temperature", "hot"), ("top_p", [1]), ("top_k", "k"),
        ("stop", 5), ("seed", "s"), ("stream", [1]), ("stream_options", 5), ("n", "x"), ("best_of", {}),
        ("echo", [1]), ("logprobs", "x"), ("suffix", 5), ("presence_penalty", "x"), ("frequency_penalty", []),
        ("user", 5)]],
    ("wrong-type-prompt", V1, b'{"prompt": {"a": 1}}'),
    ("null-prompt", V1, b'{"prompt": null}'),
    ("float-token-ids", V1, b'{"prompt": [1.5, 2]}'),
    ("negative-token-ids", V1, b'{"prompt": [[-1, 2]]}'),
    ("body-is-list", V1, b"[]"),
    ("body-is-string", V1, b'"x"'),
    ("body-is-null", V1, b"null"),
    ("deep-nesting", V1, _nested(100_000)),
    ("lone-surrogate-prompt", V1, b'{"prompt": "ab\\ud800cd"}'),
    ("lone-surrogate-prompt-list", V1, b'{"prompt": ["ok", "\\udfff"]}'),
    ("lone-surrogate-stop", V1, b'{"prompt": "x", "stop": ["\\ud800"], "max_tokens": 2}'),
    ("lone-surrogate-model", V1, b'{"prompt": "x", "model": "\\ud800"}'),
    ("invalid-utf8", V1, b'{"prompt": "\xff\xfe\xfd"}'),
    ("empty-prompt-list", V1, b'{"prompt": []}'),
    ("empty-string-in-list", V1, b'{"prompt": ["x", ""]}'),
    ("10k-prompt-list", V1, json.dumps({"prompt": ["x"] * 10_000, "max_tokens": 1}).encode()),
    ("10k-token-id-lists", V1, json.dumps({"prompt": [[1]] * 10_000, "max_tokens": 1}).encode()),
    ("5-stops", V1, b'{"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}'),
    # KServe v2
    ("kserve-data-shorter-than-shape", V2, _kserve([_ids(data=[1, 2])])),
    ("kserve-ragged-data", V2, _kserve([_ids(data=[[1, 2], [3]])])),
    ("kserve-string-data", V2, _kserve([_ids(data="abc")])),
    ("kserve-null-data", V2, _kserve([_ids(data=None)])),
    ("kserve-int-overflow-data", V2, _kserve([_ids(data=[1, 2, 10 ** 30])])),
    ("kserve-inf-data", V2, b'{"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 1], '
                            b'"data": [1e400]}]}'),
    ("kserve-unknown-datatype", V2, _kserve([_ids(datatype="BYTES")])),
    ("kserve-float-ids-nan", V2, b'{"inputs": [{"name": "input_ids", "datatype": "FP32", "shape": [1, 2], '
                                 b'"data": [NaN, 1]}]}'),
    ("kserve-float-ids", V2, _kserve([_ids(datatype="FP32", data=[1.5, 2.5, 3.5])])),
    ("kserve-negative-shape", V2, _kserve([_ids(shape=[-2, 3])])),
    ("kserve-shape-not-list", V2, _kserve([_ids(shape=5)])),
    ("kserve-shape-strings", V2, _kserve([_ids(shape=["a", "b"])])),
    ("kserve-huge-shape", V2, _kserve([_ids(shape=[10 ** 12, 10 ** 12])])),
    ("kserve-input-not-object", V2, _kserve(["input_ids"])),
    ("kserve-inputs-not-list", V2, _kserve("input_ids")),
    ("kserve-body-is-list", V2, b"[]"),
    ("kserve-parameters-not-object", V2, _kserve([_ids(parameters=5)])),
    ("kserve-request-parameters-not-object", V2, _kserve([_ids()], parameters=5)),
    ("kserve-outputs-not-list", V2, _kserve([_ids()], outputs=5)),
    ("kserve-output-not-object", V2, _kserve([_ids()], outputs=[5])),
    ("kserve-negative-binary-size", V2, _kserve([_ids(parameters={"binary_data_size": -8})])),
    ("kserve-binary-size-past-the-body", V2, _kserve([_ids(parameters={"binary_data_size": 10 ** 9})])),
    ("kserve-mask-shape-mismatch", V2, _kserve([_ids(), {"name": "attention_mask", "datatype": "INT64",
                                                          "shape": [1, 2], "data": [1, 1]}])),
    ("kserve-mask-values", V2, _kserve([_ids(), {"name": "attention_mask", "datatype": "INT64", "shape": [1, 3],
                                                 "data": [1000, 1000, 1000]}])),
    ("kserve-mask-all-zero", V2, _kserve([_ids(), {"name": "attention_mask", "datatype": "INT64", "shape": [1, 3],
                                                   "data": [0, 0, 0]}])),
    ("kserve-batch-over-the-engine", V2, _kserve([_ids(shape=[4096, 1], data=[1] * 4096)])),
    ("kserve-lone-surrogate-name", V2, b'{"inputs": [{"name": "\\ud800", "datatype": "X", "shape": [1]}]}'),
    ("kserve-deep-nesting", V2, b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
]
# valid if odd: these may be served (200) or refused (4xx), never 5xx
MAY_SUCCEED = {"lone-surrogate-stop", "tiny-temperature", "denormal-temperature", "huge-top_k"}


@pytest.mark.parametrize("path, body", [pytest.param(p, b, id=i) for i, p, b in HOSTILE])
def test_hostile_request_gets_4xx_then_normal_service(server, path, body, request):
    r = httpx.post(server.url + path, content=body, headers={"content-type": "application/json"},
                   timeout=httpx.Timeout(60))
    case = request.node.callspec.id
    ok = (200,) if case in MAY_SUCCEED else ()
    assert 400 <= r.status_code < 500 or r.status_code in ok, f"{r.status_code}: {r.text[:300]}"
    if r.status_code >= 400:
        err = r.json()["error"]
        assert isinstance(err, str) if path.startswith("/v2") else isinstance(err["message"], str)
    normal_request_works(server.url)


def test_valid_unicode_junk_is_served(server):
    for prompt in ["\x00\x01", "🙂" * 5, "\u202e\u200b", "e\u0301" * 3]:
        r = httpx.post(server.url + "/v1/completions", timeout=60,
                       json={"prompt": prompt, "max_tokens": 2, "stop": ["\x00", "🙂"]})
        assert r.status_code == 200, r.text


# ------------------------------------------------------------------------------------------------ disconnect storm
def test_disconnect_storm_leaves_nothing_behind(server):
    url = server.url
    wait_idle(url)
    before = min(normal_request_works(url) for _ in range(3))

    async def drop_after_first_chunk(client: httpx.AsyncClient) -> bool:
        async with client.stream("POST", url + "/v1/completions",
                                 json={"prompt": "def ", "max_tokens": 60, "temperature": 0, "stream": True}) as r:
            if r.status_code != 200:
                return False
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    return True  # leaving the block closes the connection mid-stream
        return False

    async def storm() -> list[bool]:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            return await asyncio.wait_for(asyncio.gather(*[drop_after_first_chunk(client) for _ in range(64)]), 240)

    got_a_chunk = asyncio.run(storm())
    assert sum(got_a_chunk) == 64
    wait_idle(url)
    after = min(normal_request_works(url) for _ in range(3))
    assert after < max(5 * before, 1.0), (before, after)


@pytest.mark.parametrize("flags, needle", [(["--request-timeout", "0"], "--request-timeout"),
                                           (["--request-timeout", "nan"], "--request-timeout"),
                                           (["--max-request-bytes", "0"], "--max-request-bytes")])
def test_limit_flags_are_checked(flags, needle):
    from common.errors import UserError
    from serve.__main__ import main

    with pytest.raises(UserError, match=needle):  # checked before the model is opened
        main(["no-such-model.pt", *flags])
