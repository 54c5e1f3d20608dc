"""The HTTP routes of `python -m serve`, one `APIRouter` per API, over the `ServerState` that `serve.app.create_app`
puts on `app.state`:

    openai.py     /v1/models, /v1/models/{name}, /v1/completions (plain and streamed)
    kserve.py     /v2, /v2/models/{name}[/versions/{v}][/ready|/infer]  (Open Inference Protocol)
    ops.py        /v2/health/live, /v2/health/ready, /metrics  (probes and scraping: open without an API key)

and what they share: state.py (the typed state), errors.py (error bodies, handlers), auth.py (API key),
schemas.py (the completion request and its checks), streaming.py (token ids -> text -> JSON or SSE bodies).

Route handlers carry no return annotation on purpose: FastAPI would take it as a response model and re-serialize
the bodies it returns.
"""
