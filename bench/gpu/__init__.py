"""The GPU suite's sections, one file each, run by `python -m bench.gpu_suite`.

    context     the run's Context (rows, time budget, GPU timer), unit formulas, hotpath-vs-others ratio rows
    checks      the correctness rule shared by every kernel check (float64 reference, FlashAttention error rule)
    bandwidth   copy bandwidth, the roofline of the memory-bound kernels (softmax, AdamW)
    attention   kernels.attention: checks, training shapes and decode against SDPA, eager and torch.compile
    softmax     kernels.softmax: checks, rows of 1k..32k against torch.softmax and torch.compile
    adamw       kernels.FusedAdamW: checks (incl. CUDA graph capture), a 124M-parameter step against torch's AdamW
    train_step  one gpt2 training step: eager reference against kernels.patch() + FusedAdamW
"""
