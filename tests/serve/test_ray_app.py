"""serve/ray_app.py on a local one-node Ray cluster on CPU: autoscaled replicas of the torch backend, requests
grouped by @serve.batch, greedy text matching model.generate. Skipped when the optional `ray[serve]` is absent."""
from __future__ import annotations

import concurrent.futures
import socket

import httpx
import pytest

from model.generate import generate

from tests.helpers import ROOT

ray = pytest.importorskip("ray")
ray_serve = pytest.importorskip("ray.serve")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}})
    port = free_port()
    ray_serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    ray_serve.shutdown()
    ray.shutdown()


def test_ray_serve_deployment(ray_cluster, tiny_ckpt, tiny_model):
    from serve.ray_app import build_app

    model, tok, _ = tiny_model
    app = build_app({"model": str(tiny_ckpt), "min_replicas": 1, "max_replicas": 2, "num_cpus": 0.5,
                     "max_batch_size": 4, "batch_wait_timeout_s": 0.05, "threads": 1})
    ray_serve.run(app, name="hotpath", route_prefix="/v1/completions")
    prompts = ["def ", "import os\n", "class A:", "x = ", "for i in", "return"]
    eos = tok.token_to_id("<|endoftext|>")
    want = [tok.decode([t for t in generate(model, tok.encode(p).ids, 10) if t != eos]) for p in prompts]

    def one(p):
        r = httpx.post(ray_cluster + "/v1/completions", json={"prompt": p, "max_tokens": 10, "temperature": 0},
                       timeout=240)
        r.raise_for_status()
        return r.json()

    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        out = list(pool.map(one, prompts, timeout=300))
    assert [o["choices"][0]["text"] for o in out] == want
    assert max(o["hotpath"]["ray_batch"] for o in out) > 1  # @serve.batch grouped concurrent requests
    bad = httpx.post(ray_cluster + "/v1/completions", json={"max_tokens": 3}, timeout=60)
    assert bad.status_code == 400 and "error" in bad.json()
    status = ray_serve.status().applications["hotpath"]
    dep = status.deployments["hotpath"]
    assert status.status == "RUNNING" and dep.replica_states.get("RUNNING", 0) >= 1
    ray_serve.delete("hotpath")
