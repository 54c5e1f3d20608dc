"""The GPU suite's sections, one file each, run by `python -m bench.gpu_suite`.

    context     the run's Context (rows, the section's budget and compile seconds, warm-up, GPU timer), unit
                formulas, hotpath-vs-others ratio rows
    checks      the correctness rule shared by every kernel check (float64 reference, FlashAttention error rule)
    bandwidth   copy bandwidth, the roofline of the memory-bound kernels (softmax, AdamW)
    attention   kernels.attention: checks, training shapes against SDPA, eager and torch.compile
    decode      kernels.attention with T = 1 / 16 against a long KV cache: checks, KV GB/s against SDPA, flash-attn
    softmax     kernels.softmax: checks, rows of 1k..32k against torch.softmax and torch.compile
    adamw       kernels.FusedAdamW: checks (incl. CUDA graph capture), a 124M-parameter step against torch's AdamW;
                headline: the step replayed from a CUDA graph
    train_step  one gpt2 training step: eager reference against kernels.patch() + FusedAdamW (check: per-step
                losses agree)

Each section module has `checks(ctx)` and `timings(ctx)`; bench/gpu_suite.py runs them.
"""
