"""The server as a real process (torch backend, tiny checkpoint), driven by the `openai` package (completions,
plain and streaming), `tritonclient[http]` (KServe v2) and `httpx` (errors, disconnects, metrics)."""
from __future__ import annotations

import concurrent.futures
import time

import httpx
import numpy as np
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from model.generate import generate

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]  # a real server process


def reference(tiny_model, prompt: str, max_tokens: int):
    model, tok, _ = tiny_model
    ids = tok.encode(prompt).ids
    out = generate(model, ids, max_tokens)
    eos = tok.token_to_id("<|endoftext|>")
    text_ids = [t for t in out if t != eos]
    return ids, out, tok.decode(text_ids)


@pytest.fixture(scope="module")
def client(tiny_server):
    return openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def metric_values(url: str) -> dict[tuple, float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_models_endpoint(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_completion_matches_generate(client, tiny_model):
    ids, out, text = reference(tiny_model, "def ", 24)
    r = client.completions.create(model="tiny", prompt="def ", max_tokens=24, temperature=0)
    assert r.choices[0].text == text
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(out)
    assert r.choices[0].finish_reason == ("stop" if len(out) < 24 else "length")
    # the same prompt as token ids
    r2 = client.completions.create(model="tiny", prompt=ids, max_tokens=24, temperature=0)
    assert r2.choices[0].text == text


def test_streaming_matches_generate(client, tiny_model):
    _, out, text = reference(tiny_model, "import os\n", 20)
    chunks = list(client.completions.create(model="tiny", prompt="import os\n", max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(pieces) == text
    assert len([p for p in pieces if p]) > 1  # really streamed, not one blob
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop" if len(out) < 20 else "length"]
    assert chunks[-1].usage.completion_tokens == len(out)


def test_stop_string(client, tiny_model):
    # seeded sampling: reproducible text with more variety than the tiny model's greedy output
    model, tok, _ = tiny_model
    prompt, kw = "class Foo(object):\n    def", dict(temperature=1.0, seed=7)
    text = tok.decode([t for t in generate(model, tok.encode(prompt).ids, 40, **kw)
                       if t != tok.token_to_id("<|endoftext|>")])
    starts = [i for i in range(len(text) // 3, len(text) - 2)
              if text[i:i + 2].strip() and text.index(text[i:i + 2]) == i]
    assert starts, f"no usable stop string in {text!r}"
    stop = text[starts[0]:starts[0] + 2]
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=40, stop=[stop, "@@never@@"], **kw)
    assert r.choices[0].text == text[:starts[0]]
    assert r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=prompt, max_tokens=40, stop=stop, stream=True, **kw))
    assert streamed == text[:starts[0]]


def test_concurrent_requests_match_generate(client, tiny_model):
    prompts = [("def ", 12), ("import sys", 20), ("x = ", 5), ("for i in", 16), ("return", 9), ("    self.", 14)]
    refs = [reference(tiny_model, p, n)[2] for p, n in prompts]

    def one(pn):
        p, n = pn
        return client.completions.create(model="tiny", prompt=p, max_tokens=n, temperature=0).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(one, prompts, timeout=240))
    assert got == refs


def test_kserve_v2_with_tritonclient(tiny_server, tiny_model):
    import tritonclient.http as httpclient

    model, tok, _ = tiny_model
    c = httpclient.InferenceServerClient(url=tiny_server.url.removeprefix("http://"), network_timeout=120)
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("tiny")
    meta = c.get_model_metadata("tiny")
    assert meta["inputs"][0]["name"] == "input_ids" and meta["outputs"][0]["name"] == "logits"
    ids = np.array(tok.encode("def main(): return 1 + 2").ids, dtype=np.int64)
    batch = np.stack([ids, ids[::-1].copy()])
    with torch.no_grad():
        want = model(torch.from_numpy(batch)).numpy()
    for binary in (False, True):
        inp = httpclient.InferInput("input_ids", list(batch.shape), "INT64")
        inp.set_data_from_numpy(batch, binary_data=binary)
        out = httpclient.InferRequestedOutput("logits", binary_data=binary)
        res = c.infer("tiny", [inp], outputs=[out])
        got = res.as_numpy("logits")
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # left padding with an attention mask gives the unpadded row's logits at the real positions
    row = batch[:1, 2:]
    padded = np.concatenate([np.zeros((1, 2), np.int64), row], axis=1)
    mask = np.concatenate([np.zeros((1, 2), np.int64), np.ones_like(row)], axis=1)
    i1, i2 = httpclient.InferInput("input_ids", list(padded.shape), "INT64"), \
        httpclient.InferInput("attention_mask", list(mask.shape), "INT64")
    i1.set_data_from_numpy(padded)
    i2.set_data_from_numpy(mask)
    got = c.infer("tiny", [i1, i2]).as_numpy("logits")[:, 2:]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(torch.from_numpy(row)).numpy(), rtol=1e-4, atol=1e-4)
    with pytest.raises(Exception, match="not served here"):
        c.get_model_metadata("nope")
    c.close()


@pytest.mark.parametrize("body, status, needle", [
    (b"{not json", 400, "not valid JSON"),
    (b'{"prompt": 12}', 422, "prompt"),
    (b'{"prompt": "x", "max_tokens": "many"}', 422, "max_tokens"),
    (b'{"prompt": "x", "temperature": 5}', 400, "temperature"),
    (b'{"prompt": "x", "top_p": 0}', 400, "top_p"),
    (b'{"prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
    (b'{"prompt": ""}', 400, "empty"),
    (b'{"prompt": "x", "model": "gpt-9"}', 404, "gpt-9"),
    (b'{"prompt": [1, 2, 3], "max_tokens": 62}', 400, "maximum context length is 64 tokens. However, you requested "
                                                      "65 tokens (3 in the prompt, 62 for the completion)"),
    (b'{"prompt": [99999]}', 400, "vocabulary"),
])
def test_openai_errors(tiny_server, body, status, needle):
    r = httpx.post(tiny_server.url + "/v1/completions", content=body, headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and {"type", "param", "code"} <= set(err)


def test_kserve_errors(tiny_server):
    url = tiny_server.url + "/v2/models/tiny/infer"
    r = httpx.post(url, json={"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 3],
                                          "data": [1, 2]}]}, timeout=60)
    assert r.status_code == 400 and "shape" in r.json()["error"]
    r = httpx.post(url, json={"inputs": [{"name": "tokens", "datatype": "INT64", "shape": [1, 1], "data": [1]}]},
                   timeout=60)
    assert r.status_code == 400 and "input_ids" in r.json()["error"]
    r = httpx.post(tiny_server.url + "/v2/models/other/infer", json={"inputs": []}, timeout=60)
    assert r.status_code == 404 and isinstance(r.json()["error"], str)


def test_client_disconnect_stops_generation(tiny_server):
    before = metric_values(tiny_server.url)
    gen_before = before.get(("hotpath_generation_tokens_total", ()), 0)
    with httpx.stream("POST", tiny_server.url + "/v1/completions", timeout=60,
                      json={"prompt": "def ", "max_tokens": 60, "temperature": 0, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # one token arrived: hang up
    deadline = time.monotonic() + 60
    key = ("hotpath_requests_total", (("endpoint", "completions"), ("outcome", "cancelled")))
    while time.monotonic() < deadline:
        m = metric_values(tiny_server.url)
        if m.get(key, 0) > before.get(key, 0) and m[("hotpath_running_requests", ())] == 0:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the disconnected request was not cancelled")
    time.sleep(0.5)
    generated = metric_values(tiny_server.url)[("hotpath_generation_tokens_total", ())] - gen_before
    assert generated < 60  # it stopped early instead of running to max_tokens


def test_client_disconnect_stops_non_streaming_generation(tiny_server):
    key = ("hotpath_requests_total", (("endpoint", "completions"), ("outcome", "cancelled")))
    before = metric_values(tiny_server.url).get(key, 0)
    with pytest.raises(httpx.ReadTimeout):  # the client gives up long before 16 x 50 tokens are done
        httpx.post(tiny_server.url + "/v1/completions", timeout=httpx.Timeout(60, read=0.05),
                   json={"prompt": [f"def f{i}(" for i in range(16)], "max_tokens": 50, "temperature": 0})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        m = metric_values(tiny_server.url)
        if m.get(key, 0) > before and m[("hotpath_running_requests", ())] == 0:
            return
        time.sleep(0.2)
    seen = {k: v for k, v in m.items() if "requests" in k[0] or "running" in k[0]}
    pytest.fail(f"the abandoned non-streaming request kept generating: {seen}")


def test_metrics_exposed(tiny_server):
    m = metric_values(tiny_server.url)
    names = {k[0] for k in m}
    for name in ["hotpath_time_to_first_token_seconds_bucket", "hotpath_inter_token_latency_seconds_bucket",
                 "hotpath_e2e_request_latency_seconds_bucket", "hotpath_queue_time_seconds_bucket",
                 "hotpath_batch_size_bucket", "hotpath_running_requests", "hotpath_waiting_requests",
                 "hotpath_prompt_tokens_total", "hotpath_generation_tokens_total", "hotpath_requests_total"]:
        assert name in names, name
    ok = m[("hotpath_requests_total", (("endpoint", "completions"), ("outcome", "success")))]
    assert ok >= 5
    assert m[("hotpath_requests_total", (("endpoint", "completions"), ("outcome", "invalid")))] >= 5
    assert m[("hotpath_time_to_first_token_seconds_count", ())] >= ok
    assert m[("hotpath_batch_size_sum", ())] > m[("hotpath_batch_size_count", ())]  # some steps had > 1 row
