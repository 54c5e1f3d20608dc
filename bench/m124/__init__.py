"""The GPT-2 124M workload: one model shape people deploy, measured the same way through hotpath and through the
CPU engines users would otherwise pick (`bench.peers`).

- `model`: makes the model locally (random init through transformers, a trained BPE, `python -m model.from_hf`)
  and its hotpath artifacts (ONNX fp32, int8, int4, fp16), cached in the bench work folder;
- `workload`: the shapes and the token ids every engine gets;
- `worker`: one variant measured in a fresh process (`python -m bench.m124.worker`, a JSON job on stdin);
- `runners/`: one file per engine, each running greedy generation the way that engine's docs do;
- `rounds`: interleaved rounds of worker processes; `summary`: medians, spreads, tables and the issue's goals.
"""
