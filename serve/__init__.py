"""hotpath serving: one `Backend` protocol over torch / ONNX Runtime / TensorRT, a continuous-batching engine, and
an HTTP server (OpenAI completions, KServe v2, Prometheus). See docs/serve.md.

    python -m serve MODEL [--backend auto|torch|onnxruntime|tensorrt] [--port 8000] ...
    python -m serve.loadgen URL --concurrency 1,8,16,32
    python -m serve.triton_repo MODEL --out repo/      |  python -m serve.triton_repo --check repo/
    serve run serve.ray_app:app model=MODEL             (optional extra: ray[serve])

Python API: `serve.backends.load_backend(path, backend="auto")` -> Backend; `serve.engine.Engine(backend, ...)`
with `submit(prompt_ids, SamplingParams(...))`; `serve.app.create_app(backend, ...)` -> FastAPI app;
`serve.loadgen.run_load(url, prompts, concurrency, max_tokens)` / `bench_serve(model, levels)`.
Imports stay lazy here so `python -m serve.loadgen` does not load torch models or FastAPI.
"""
