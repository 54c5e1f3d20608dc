"""hotpath's backends as a Ray Serve deployment: replicas, autoscaling, request batching (optional extra `ray`).

    pip install 'hotpath[ray]'           # ray[serve]; the default install stays light
    serve run serve.ray_app:app model=runs/small/ckpt.pt backend=auto max_replicas=4
    curl -s localhost:8000/v1/completions -d '{"prompt": "def ", "max_tokens": 16, "temperature": 0}'

or from Python: `ray_serve.run(build_app({"model": "model.onnx", "max_replicas": 4}))`.

Each replica loads one backend (`serve.backends.load_backend`: torch, onnxruntime or tensorrt) and runs the same
continuous-batching `Engine` as `python -m serve`. Ray's `@serve.batch` collects the requests that reach a replica
within `batch_wait_timeout_s` (up to `max_batch_size`) and submits them together, so they share one prefill;
the engine then joins them to the running batch. Ray's autoscaler adds replicas (between `min_replicas` and
`max_replicas`) when the ongoing requests per replica exceed `target_ongoing_requests`. The HTTP route answers
OpenAI-style non-streaming completions (text or token-id prompts, the sampling parameters of `python -m serve`).
"""
from __future__ import annotations

import asyncio
from typing import Any, Optional

from ray import serve as ray_serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from .backends import load_backend
from .engine import SamplingParams


class HotpathDeployment:
    """One replica: a backend, an engine, and `@serve.batch`-ed admission."""

    def __init__(self, model: str, backend: str = "auto", max_batch_size: int = 8, batch_wait_timeout_s: float = 0.01,
                 threads: Optional[int] = None, model_name: Optional[str] = None):
        from pathlib import Path

        from common.cli import flush_denormals

        from .engine import Engine

        flush_denormals()  # as every hotpath CLI does: subnormal softmax tails are slow on x86
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.backend = load_backend(model, backend, threads=threads)
        self.engine = Engine(self.backend, max_batch_size=max_batch_size, max_queue=1024).start()
        self.name = model_name or Path(model).stem
        self.generate.set_max_batch_size(max_batch_size)
        self.generate.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @ray_serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def generate(self, jobs: list[tuple[list[int], SamplingParams]]) -> list[dict]:
        loop = asyncio.get_running_loop()
        handles = [self.engine.submit(ids, params, loop) for ids, params in jobs]  # one prefill for the group

        async def collect(h):
            return [t async for t in h], h.finish_reason

        results = await asyncio.gather(*[collect(h) for h in handles])
        return [{"tokens": toks, "finish_reason": reason, "batch": len(jobs)} for toks, reason in results]

    async def __call__(self, request: Request) -> Any:
        if request.method == "GET":
            return {"object": "list", "data": [{"id": self.name, "object": "model", "owned_by": "hotpath"}]}
        try:
            body = await request.json()
            prompt = body["prompt"]
            ids = self.backend.tokenizer.encode(prompt).ids if isinstance(prompt, str) else [int(t) for t in prompt]
            params = SamplingParams(max_tokens=int(body.get("max_tokens") or 16),
                                    temperature=float(body.get("temperature", 1.0) or 0.0),
                                    top_k=body.get("top_k"), top_p=body.get("top_p"), seed=body.get("seed"))
            if not ids or len(ids) + params.max_tokens > self.engine.max_model_len:
                raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) must be within "
                                 f"the context of {self.engine.max_model_len}")
        except (ValueError, KeyError, TypeError) as e:
            return JSONResponse({"error": {"message": f"bad request: {e}", "type": "invalid_request_error",
                                           "param": None, "code": None}}, status_code=400)
        out = await self.generate((ids, params))
        eos = self.backend.eos_id
        text = self.backend.tokenizer.decode([t for t in out["tokens"] if t != eos])
        n = len(out["tokens"])
        return {"object": "text_completion", "model": self.name,
                "choices": [{"index": 0, "text": text, "finish_reason": out["finish_reason"], "logprobs": None}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n},
                "hotpath": {"ray_batch": out["batch"]}}


def build_app(args: dict[str, Any]):
    """The Ray Serve application (`serve run serve.ray_app:app model=...` passes `args` as strings)."""
    if "model" not in args:
        raise ValueError("pass model=PATH (a .pt, .onnx or .plan)")
    min_r, max_r = int(args.get("min_replicas", 1)), int(args.get("max_replicas", 2))
    deployment = ray_serve.deployment(
        HotpathDeployment,
        name="hotpath",
        ray_actor_options={"num_cpus": float(args.get("num_cpus", 1))},
        max_ongoing_requests=int(args.get("max_ongoing_requests", 64)),
        autoscaling_config={"min_replicas": min_r, "initial_replicas": int(args.get("initial_replicas", min_r)),
                            "max_replicas": max_r,
                            "target_ongoing_requests": float(args.get("target_ongoing_requests", 8)),
                            "upscale_delay_s": float(args.get("upscale_delay_s", 2)),
                            "downscale_delay_s": float(args.get("downscale_delay_s", 30))},
    )
    return deployment.bind(str(args["model"]), str(args.get("backend", "auto")),
                           int(args.get("max_batch_size", 8)), float(args.get("batch_wait_timeout_s", 0.01)),
                           int(args["threads"]) if args.get("threads") else None, args.get("model_name"))


app = build_app  # `serve run serve.ray_app:app model=...` calls it with the key=value arguments
