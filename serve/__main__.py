"""`python -m serve MODEL [--backend auto|torch|onnxruntime|tensorrt] [--host 127.0.0.1] [--port 8000] ...`

Serves a hotpath checkpoint (.pt/.safetensors), an exported decoder (.onnx) or a TensorRT plan (.plan) over
OpenAI-compatible completions, KServe v2 and Prometheus metrics, with continuous batching.

On SIGTERM (or Ctrl-C) the server stops admitting (new requests get 503, readiness turns 503), lets in-flight
requests finish for up to --shutdown-timeout seconds, cancels what is left, and exits 0.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from common import cli
from common.cli import UserError

from .backends import BACKENDS, load_backend
from .backends.torch_backend import QUANT_MODES
from .engine import DEFAULT_PREFILL_CHUNK
from .routes.body_limit import DEFAULT_MAX_REQUEST_BYTES

if TYPE_CHECKING:
    from fastapi import FastAPI


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser("python -m serve", "Serve a model over OpenAI-compatible and KServe v2 HTTP APIs.")
    p.add_argument("model", help="a .pt/.safetensors checkpoint, an exported .onnx decoder, or a TensorRT .plan")
    p.add_argument("--backend", default="auto", choices=["auto", *BACKENDS], help="default: by the model's file type")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 = any free port (printed when ready)")
    p.add_argument("--model-name", default=None, help="the name clients use (default: the model file's stem)")
    p.add_argument("--max-batch-size", type=int, default=16, help="rows in the running batch")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests beyond the batch; more get 503")
    p.add_argument("--max-model-len", type=int, default=None, help="prompt + max_tokens limit (default: context)")
    p.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK, metavar="TOKENS",
                   help="prompt tokens prefilled between two decode steps, bounding how long newcomers stall the "
                        f"running requests' next token; 0 = all waiting prompts at once (default: "
                        f"{DEFAULT_PREFILL_CHUNK})")
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on /v1 and /v2 (not on "
                                                   "health probes and /metrics)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds to drain in-flight requests")
    p.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                   help="larger request bodies get 413 before they are read whole (default: 1 MiB)")
    p.add_argument("--request-timeout", type=float, default=None, metavar="SECONDS",
                   help="a request not finished in this time gets 408 (an SSE error event when streaming) and its "
                        "batch row is freed (default: no limit)")
    p.add_argument("--kernels", action="store_true", help="torch backend: run attention on hotpath's kernels")
    p.add_argument("--quantize", choices=QUANT_MODES, default=None, help="torch backend: int8 quantization")
    cli.add_threads_arg(p, help="CPU threads for the model (torch / ONNX Runtime); default: cores - 1, leaving one "
                                "core to the HTTP event loop (intra-op threads fighting it for a core make small "
                                "models ~10x slower)")
    p.add_argument("--tokenizer-from", default=None, help="tensorrt backend: the .onnx or .pt the plan came from")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag, value, low in (("--max-batch-size", args.max_batch_size, 1), ("--max-queue", args.max_queue, 0),
                             ("--port", args.port, 0), ("--max-request-bytes", args.max_request_bytes, 1),
                             ("--prefill-chunk", args.prefill_chunk, 0)):
        if value < low:
            raise UserError(f"{flag} must be at least {low}, got {value}")
    if args.shutdown_timeout < 0:
        raise UserError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    if args.request_timeout is not None and not 0 < args.request_timeout < float("inf"):
        raise UserError(f"--request-timeout must be a positive number of seconds, got {args.request_timeout}")
    threads = args.threads or max(1, (os.cpu_count() or 2) - 1)
    import torch

    torch.set_num_threads(threads)
    backend = load_backend(args.model, args.backend, kernels=args.kernels, quantize=args.quantize,
                           threads=threads, tokenizer_from=args.tokenizer_from)
    if args.max_model_len is not None and not 1 < args.max_model_len <= backend.max_context:
        raise UserError(f"--max-model-len {args.max_model_len} is outside [2, {backend.max_context}] "
                        f"(the model's context)")
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {args.host}:{args.port} ({e.strerror}); pass another --port") from e
    port = sock.getsockname()[1]
    name = args.model_name or Path(args.model).stem
    from .app import create_app

    ready = (f"hotpath serve: {name} on {backend.description}, listening on http://{args.host}:{port} "
             f"(max batch {args.max_batch_size}, queue {args.max_queue})")
    app = create_app(backend, model_name=name, max_batch_size=args.max_batch_size, max_queue=args.max_queue,
                     max_model_len=args.max_model_len, api_key=args.api_key, ready_message=ready,
                     max_request_bytes=args.max_request_bytes, request_timeout=args.request_timeout,
                     prefill_chunk=args.prefill_chunk or None)
    serve_forever(app, sock, args.shutdown_timeout, args.log_level)
    backend.close()
    print("hotpath serve: stopped", flush=True)
    return 0


def serve_forever(app: FastAPI, sock: socket.socket, shutdown_timeout: float, log_level: str = "warning") -> None:
    """Run uvicorn on `sock` until SIGTERM/SIGINT; then drain (engine stops admitting) and return normally."""
    import uvicorn

    engine = app.state.server.engine

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # Stop admitting at once; uvicorn closes the listener and waits for in-flight responses up to
            # timeout_graceful_shutdown. Unlike uvicorn's own handler, the signal is not re-raised afterwards,
            # so a graceful drain exits 0.
            engine.stop_admitting()
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True

    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=shutdown_timeout,
                            access_log=log_level in ("info", "debug"))
    sock.listen(2048)
    Server(config).run(sockets=[sock])


if __name__ == "__main__":
    cli.run(main)
