"""Micro-benchmarks of the hot paths, for pytest-benchmark (not part of `make test`):

    pytest bench/ --benchmark-only --benchmark-autosave        # save this commit's numbers
    pytest bench/ --benchmark-only --benchmark-compare         # compare with the last saved run

On CPU the kernels run their PyTorch reference paths (set TRITON_INTERPRET=1 and they run in Triton's interpreter,
which measures the interpreter, not the kernel); on a GPU they run compiled Triton.
"""
import pytest
import torch

import kernels
from model import GPT, GPTConfig
from model.gpt import sdpa_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def qkv():
    torch.manual_seed(0)
    shape = (4, 8, 512, 64) if DEVICE == "cuda" else (2, 4, 128, 32)
    return [torch.randn(shape, device=DEVICE, dtype=DTYPE) for _ in range(3)]


@pytest.mark.parametrize("impl", ["sdpa", "hotpath"])
def test_attention_forward(benchmark, qkv, impl):
    q, k, v = qkv
    scale = q.shape[-1] ** -0.5
    if impl == "sdpa":
        fn = lambda: sdpa_attention(q, k, v, causal=True, attn_mask=None, scale=scale)  # noqa: E731
    else:
        fn = lambda: kernels.attention(q, k, v, causal=True, scale=scale)  # noqa: E731
    benchmark(lambda: (fn(), sync()))


@pytest.mark.parametrize("impl", ["torch", "hotpath"])
def test_softmax(benchmark, impl):
    x = torch.randn(64, 4096, device=DEVICE, dtype=DTYPE)
    fn = (lambda: torch.softmax(x, -1)) if impl == "torch" else (lambda: kernels.softmax(x))
    benchmark(lambda: (fn(), sync()))


@pytest.mark.parametrize("impl", ["AdamW", "AdamW(fused=True)", "FusedAdamW"])
def test_optimizer_step(benchmark, impl):
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("small")).to(DEVICE)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt = {"AdamW": lambda: torch.optim.AdamW(model.parameters()),
           "AdamW(fused=True)": lambda: torch.optim.AdamW(model.parameters(), fused=True),
           "FusedAdamW": lambda: kernels.FusedAdamW(model.parameters())}[impl]()
    benchmark(lambda: (opt.step(), sync()))


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_model_prefill(benchmark, preset):
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset(preset)).to(DEVICE).eval()
    ids = torch.randint(0, model.config.vocab_size, (4, model.config.block_size), device=DEVICE)
    with torch.inference_mode():
        benchmark(lambda: (model(ids), sync()))
