"""Prometheus metrics for the server (`GET /metrics`), in a registry of their own (one per app, so tests and
several apps in one process never collide).

| metric | type | meaning |
|---|---|---|
| `hotpath_requests_total{endpoint, outcome}` | counter | requests by outcome (below) |
| `hotpath_time_to_first_token_seconds` | histogram | arrival -> first generated token |
| `hotpath_inter_token_latency_seconds` | histogram | between consecutive tokens of one request |
| `hotpath_e2e_request_latency_seconds` | histogram | arrival -> last token |
| `hotpath_queue_time_seconds` | histogram | arrival -> joined the running batch |
| `hotpath_running_requests`, `hotpath_waiting_requests` | gauge | in the batch / in the queue |
| `hotpath_batch_size` | histogram | rows per decode step |
| `hotpath_prompt_tokens_total`, `hotpath_generation_tokens_total` | counter | tokens in / out |

Outcomes: success, stop, cancelled (client left), error, rejected (503), invalid (4xx, 413 included), unauthorized,
timeout (--request-timeout).
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self, model_name: str = "model"):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("hotpath_requests", "Requests by endpoint and outcome", ["endpoint", "outcome"],
                                registry=r)
        self.ttft = Histogram("hotpath_time_to_first_token_seconds", "Time to first token", buckets=_LATENCY,
                              registry=r)
        self.itl = Histogram("hotpath_inter_token_latency_seconds", "Time between tokens of one request",
                             buckets=_LATENCY, registry=r)
        self.e2e = Histogram("hotpath_e2e_request_latency_seconds", "Arrival to last token", buckets=_LATENCY,
                             registry=r)
        self.queue_time = Histogram("hotpath_queue_time_seconds", "Arrival to joining the running batch",
                                    buckets=_LATENCY, registry=r)
        self.running = Gauge("hotpath_running_requests", "Requests in the running batch", registry=r)
        self.waiting = Gauge("hotpath_waiting_requests", "Requests waiting in the queue", registry=r)
        self.batch_size = Histogram("hotpath_batch_size", "Rows per decode step", buckets=_BATCH, registry=r)
        self.prompt_tokens = Counter("hotpath_prompt_tokens", "Prompt tokens admitted", registry=r)
        self.generation_tokens = Counter("hotpath_generation_tokens", "Tokens generated", registry=r)
        info = Gauge("hotpath_model_info", "The served model", ["model", "backend"], registry=r)
        self._info = info

    def set_model(self, name: str, backend: str) -> None:
        self._info.labels(model=name, backend=backend).set(1)

    # -- called by the engine thread
    def set_load(self, running: int, waiting: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)

    def admitted(self, h, now: float) -> None:
        self.queue_time.observe(now - h.t_arrival)
        self.prompt_tokens.inc(len(h.prompt_ids))

    def token(self, h, now: float) -> None:
        self.generation_tokens.inc()
        if h.t_first is None:
            self.ttft.observe(now - h.t_arrival)
        elif h.t_last is not None:
            self.itl.observe(now - h.t_last)

    def batch(self, size: int) -> None:
        self.batch_size.observe(size)

    def request_done(self, h, reason: str) -> None:
        if h.t_last is not None and reason in ("length", "stop"):
            self.e2e.observe(h.t_last - h.t_arrival)

    # -- called by the HTTP layer
    def outcome(self, endpoint: str, outcome: str) -> None:
        self.requests.labels(endpoint=endpoint, outcome=outcome).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
