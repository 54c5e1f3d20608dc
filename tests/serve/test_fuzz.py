"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis) against a real server process.

Every operation the server's /openapi.json lists gets generated requests, valid (positive) and invalid (negative)
by the schema, with the path's model name generated and also fixed to the served one (so /infer and the model
routes get past the 404). Checks: no 5xx, no hang (each request has a timeout), status codes, content types and
bodies conform where the schema declares them. Afterwards the server still answers a normal completion.
"""
from __future__ import annotations

import time

import httpx
import pytest

from tests.helpers import ServerProcess

pytestmark = pytest.mark.slow

MODEL = "tiny"
MAX_MODEL_LEN = 24  # prompt + max_tokens: generated completions stay a few decode steps long
EXAMPLES = 40  # per operation, generation mode and path-name variant, but where the bodies are: ~1,300 in all
BODY_EXAMPLES = {"POST /v1/completions": 300, "POST /v2/models/{name}/infer": 60,
                 "POST /v2/models/{name}/versions/{version}/infer": 60}
REQUEST_TIMEOUT_S = 20  # a request that takes longer is a hang (the busiest case here takes well under a second)


@pytest.fixture(scope="module")
def fuzz_server(tiny_ckpt):
    srv = ServerProcess(tiny_ckpt, "--model-name", MODEL, "--max-model-len", str(MAX_MODEL_LEN),
                        "--max-batch-size", "8", "--max-queue", "64")
    yield srv
    rc = srv.terminate()
    assert rc == 0, srv.output()


def test_schema_describes_the_bodies_routes_parse_by_hand(fuzz_server):
    """Completions and infer read their bodies by hand: without a requestBody in the schema, fuzzing never sends
    one. Errors are declared in each API's own format."""
    spec = httpx.get(fuzz_server.url + "/openapi.json", timeout=30).json()
    completions = spec["paths"]["/v1/completions"]["post"]
    body = completions["requestBody"]["content"]["application/json"]["schema"]
    assert "prompt" in _resolve(spec, body)["required"]
    assert "text/event-stream" in completions["responses"]["200"]["content"]  # stream: true
    infer = spec["paths"]["/v2/models/{name}/infer"]["post"]
    body = _resolve(spec, infer["requestBody"]["content"]["application/json"]["schema"])
    assert body["required"] == ["inputs"]
    for path, op in (("/v1/models/{name}", "get"), ("/v2/models/{name}", "get"), ("/v2/models/{name}/infer", "post")):
        err = spec["paths"][path][op]["responses"]["default"]["content"]["application/json"]["schema"]
        assert "error" in _resolve(spec, err)["properties"], path
    assert "text/plain" in spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]


def _resolve(spec: dict, schema: dict) -> dict:
    ref = schema.get("$ref")
    return spec["components"]["schemas"][ref.rsplit("/", 1)[1]] if ref else schema


def test_fuzz_every_operation_from_the_openapi_schema(fuzz_server):
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                                   status_code_conformance)

    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    base = fuzz_server.url
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json", timeout=30)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 13  # /v1 (3), /v2 (9 with the /versions/ forms), /metrics
    failures: list[str] = []
    counts: dict[str, int] = {}
    seconds: dict[str, float] = {}
    t0 = time.monotonic()
    for op in operations:
        named = any(p.name == "name" for p in op.path_parameters)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            if mode is GenerationMode.NEGATIVE and not (op.body or op.query):
                continue  # nothing to make invalid: a free-form path string is always valid (hypothesis gives up)
            for fixed in ([None, {"name": MODEL}] if named else [None]):
                label = f"{op.label} {mode.value}{' name=' + MODEL if fixed else ''}"
                # the body routes get most cases; with a generated (unknown) model name they only answer 404
                n = BODY_EXAMPLES.get(op.label, EXAMPLES) if fixed or not named else EXAMPLES // 2
                if op.label == "POST /v1/completions" and mode is GenerationMode.NEGATIVE:
                    n = n * 2 // 3
                fuzz_settings = settings(max_examples=n, deadline=None, database=None, derandomize=True,
                                         suppress_health_check=list(HealthCheck),
                                         phases=[Phase.explicit, Phase.generate])

                counts[label] = 0

                @fuzz_settings
                @given(case=op.as_strategy(generation_mode=mode, path_parameters=fixed))
                def run(case):
                    counts[label] += 1  # run() is called at once, inside this iteration
                    response = case.call(base_url=base, timeout=REQUEST_TIMEOUT_S)
                    case.validate_response(response, checks=checks)

                t1 = time.monotonic()
                try:
                    run()
                except Unsatisfiable:
                    pass  # e.g. no invalid value exists for a free-form string path parameter
                except (Exception, BaseExceptionGroup) as e:  # noqa: BLE001 - collected, all reported below
                    failures.append(f"{label}: {type(e).__name__}: {str(e)[:4000]}")
                seconds[label] = time.monotonic() - t1
    elapsed = time.monotonic() - t0
    total = sum(counts.values())
    print(f"fuzzed {len(operations)} operations, {total} cases in {elapsed:.0f} s")
    for label in counts:
        print(f"  {label}: {counts[label]} cases, {seconds[label]:.1f} s")
    assert not failures, "\n\n".join(failures) + "\n\nserver log tail:\n" + fuzz_server.output()[-3000:]
    assert total >= 1000, counts
    completions = [n for label, n in counts.items() if label.startswith("POST /v1/completions")]
    assert sum(completions) >= EXAMPLES, counts  # the body-parsing routes really were fuzzed

    # the server survived: a normal completion still works
    r = httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "def ", "max_tokens": 4,
                                                   "temperature": 0}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("length", "stop")
    assert fuzz_server.proc.poll() is None
