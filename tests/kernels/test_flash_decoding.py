"""kernels.flash_decoding: split-KV decode attention (Triton's interpreter on CPU, compiled on CUDA) against float64.

Every kernel case: fresh random inputs, outputs and workspaces poisoned with NaN before the launch, o and lse
compared with a float64 reference. The split count is forced (`FORCE_NUM_SPLITS`) so that small interpreter shapes
still cut S into several chunks; S is placed on and around the chunk boundaries (the interpreter's KV tile is
INTERPRET_BLOCK_N = 16 keys and chunks are multiples of it).
"""
import json
import subprocess
import sys
import zlib

import pytest
import torch

import kernels
from kernels import _dispatch
from kernels import flash_attention as A
from kernels import flash_decoding as FD
from tests.helpers import ROOT
from tests.tolerances import assert_close_fp32, assert_half_within_torch_error

BN = FD.INTERPRET_BLOCK_N
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RUNS_TRITON = _dispatch.use_triton(torch.empty(0, device=DEVICE))
needs_triton = pytest.mark.skipif(not RUNS_TRITON, reason="Triton kernels need CUDA or TRITON_INTERPRET=1 + triton")
has_triton = pytest.mark.skipif(not _dispatch.triton_available(), reason="needs triton")


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every buffer the launchers allocate (outputs and split workspaces) starts as NaN."""
    nan_empty = lambda size, **kw: torch.full(tuple(size), float("nan"), **kw)  # noqa: E731
    monkeypatch.setattr(FD, "_new_empty", nan_empty)
    monkeypatch.setattr(A, "_new_empty", nan_empty)


def _inputs(B, H, H_kv, T, S, D, dtype, *, seed_key):
    g = torch.Generator().manual_seed(zlib.crc32(repr(seed_key).encode()))
    mk = lambda *shape: torch.randn(*shape, generator=g).to(DEVICE, dtype)  # noqa: E731
    return mk(B, H, T, D), mk(B, H_kv, S, D), mk(B, H_kv, S, D), mk(B, H, T, D)  # q, k, v, do


def _ref64(q, k, v, causal, scale):
    """float64 (o, lse) of the main kernel's semantics."""
    return A._attention_fwd_ref(q.double(), k.double(), v.double(), causal, scale)


def _torch_in_dtype(q, k, v, causal, scale):
    """Naive attention by PyTorch in the inputs' own dtype: the baseline error of the half-precision rule."""
    s, _ = A._scores(q, k, causal, scale, None)
    p, _ = A._safe_softmax(s)
    return torch.matmul(p, A._expand_kv(v, q.shape[1]))


def check_forward(B, H, H_kv, T, S, D, causal, splits, dtype=torch.float32, scale=None, monkeypatch=None):
    monkeypatch.setattr(FD, "FORCE_NUM_SPLITS", splits)
    monkeypatch.setattr(FD, "SPLIT_ALIGN", BN)  # compiled (CUDA) runs: chunks as small as the interpreter's
    key = (B, H, H_kv, T, S, D, causal, splits, str(dtype), scale)
    q, k, v, _ = _inputs(B, H, H_kv, T, S, D, dtype, seed_key=key)
    scale = D ** -0.5 if scale is None else scale
    o, lse = FD.flash_decoding_forward(q, k, v, causal, scale)
    ref_o, ref_lse = _ref64(q, k, v, causal, scale)
    assert o.dtype == dtype and o.shape == (B, H, T, D) and torch.isfinite(o).all(), key
    assert lse.dtype == torch.float32 and lse.shape == (B, H, T) and torch.isfinite(lse).all(), key
    if dtype == torch.float32:
        assert_close_fp32(o, ref_o)
    else:
        assert_half_within_torch_error(o, _torch_in_dtype(q, k, v, causal, scale), ref_o, dtype)
    # lse is fp32 math on exact products of the inputs in every dtype: the backward relies on it
    assert_close_fp32(lse, ref_lse, rtol=2e-5, atol=2e-5)
    return o, lse


# (B, H, H_kv, T, S, D, causal, forced splits). Chunks are ceil(S / splits) rounded up to BN keys.
SHAPES = [
    (1, 4, 1, 1, 4 * 3 * BN, 64, True, 4),        # T = 1, MQA-like group of 4, S exactly 4 chunks of 3 tiles
    (1, 4, 1, 1, 4 * 3 * BN - 1, 64, True, 4),    # chunk boundary - 1: last chunk ends off a tile
    (1, 4, 1, 1, 4 * 3 * BN + 1, 64, False, 4),   # boundary + 1: a 5th chunk holding one key
    (1, 4, 2, 3, 4 * 4 * BN + 1, 48, True, 4),    # T = 3 causal, GQA 2, D = 48 (padded to 64); the 1-key last
                                                  # chunk is invisible to rows 0, 1 (lse_s = -inf in the combine)
    (2, 2, 2, 16, 9 * BN + 6, 64, True, 3),       # MHA, T = 16 causal over two tiles, S not a multiple of BN
    (1, 4, 2, 16, 7 * BN + 3, 32, False, 2),      # GQA 2 x T 16 = 32 rows: one row block (two in fp32)
    (1, 4, 1, 16, 5 * BN - 1, 32, True, 3),       # 64 rows: several row blocks (third grid axis)
    (1, 2, 2, 5, 5, 16, True, 1),                 # S == T, one split, one masked tile
    (1, 4, 2, 2, 3 * BN, 64, True, 8),            # more splits asked than tiles: every chunk still non-empty
]


@needs_triton
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}Hkv{}T{}S{}D{}{}n{}".format(
    *s[:6], "c" if s[6] else "f", s[7]))
def test_fp32(shape, monkeypatch):
    check_forward(*shape, monkeypatch=monkeypatch)


@needs_triton
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3], SHAPES[4], SHAPES[5]], ids=["T1", "T3", "T16", "rows32"])
def test_fp16(shape, monkeypatch):
    check_forward(*shape, dtype=torch.float16, monkeypatch=monkeypatch)


@needs_triton
def test_bf16(monkeypatch):
    check_forward(*SHAPES[3], dtype=torch.bfloat16, monkeypatch=monkeypatch)


@needs_triton
@pytest.mark.parametrize("scale", [-0.3, 0.0])
def test_non_positive_scale(scale, monkeypatch):
    """The kernel keeps the running max in raw score units (scale folded into one FFMA): a negative scale is
    applied by negating q on the host, zero gives a uniform softmax."""
    check_forward(1, 4, 2, 3, 3 * BN + 5, 32, True, 3, scale=scale, monkeypatch=monkeypatch)


@needs_triton
def test_non_contiguous_inputs(monkeypatch):
    monkeypatch.setattr(FD, "FORCE_NUM_SPLITS", 3)
    monkeypatch.setattr(FD, "SPLIT_ALIGN", BN)
    q, k, v, _ = _inputs(1, 4, 2, 2, 70, 32, torch.float32, seed_key="strided")
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))  # (B, T, H, D) storage
    assert not k.is_contiguous()
    o, lse = FD.flash_decoding_forward(q, k, v, True, 0.2)
    ref_o, ref_lse = _ref64(q, k, v, True, 0.2)
    assert_close_fp32(o, ref_o)
    assert_close_fp32(lse, ref_lse)


def test_reference_split_merge_is_exact():
    """flash_decoding_ref (the algorithm in plain PyTorch) equals unsplit attention in float64, for any split count,
    including chunks that a causal row cannot see."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 3, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, 37, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, 37, 8, generator=g, dtype=torch.float64)
    s, _ = A._scores(q, k, True, 0.4, None)
    p, ref_lse = A._safe_softmax(s)  # float64 throughout
    ref_o = torch.matmul(p, A._expand_kv(v, 4))
    for n in (1, 2, 5, 19, 37):
        o, lse = FD.flash_decoding_ref(q, k, v, True, 0.4, n)
        torch.testing.assert_close(o, ref_o, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lse, ref_lse, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Split choice and dispatch (pure Python: no launch).
# ---------------------------------------------------------------------------------------------------------------
def _meta(B, H, H_kv, T, S, D, dtype=torch.bfloat16):
    return torch.empty(B, H, T, D, dtype=dtype), torch.empty(B, H_kv, S, D, dtype=dtype)


@has_triton
def test_dispatch_rule():
    assert FD.use_flash_decoding(*_meta(1, 32, 8, 1, 8192, 128))   # batch-1 decode, GQA
    assert FD.use_flash_decoding(*_meta(1, 32, 32, 16, 8192, 128))  # MHA, 16 new tokens
    assert FD.use_flash_decoding(*_meta(1, 2, 2, 1, 8192, 64))  # the kernel report's decode shape
    assert FD.use_flash_decoding(*_meta(1, 4, 1, 1, 8192, 48, torch.float32))
    assert not FD.use_flash_decoding(*_meta(1, 32, 8, 17, 8192, 128))  # too many new tokens
    assert not FD.use_flash_decoding(*_meta(1, 32, 8, 1, FD.MIN_KV_LEN - 1, 128))  # short KV
    assert not FD.use_flash_decoding(*_meta(64, 32, 8, 1, 8192, 128))  # B * H_kv fills the GPU already
    assert not FD.use_flash_decoding(*_meta(1, 32, 8, 1, 8192, 256))  # head dim unsupported
    assert not FD.use_flash_decoding(*_meta(1, 32, 8, 1, 8192, 64, torch.float64))
    assert not FD.use_flash_decoding(*_meta(1, 32, 8, 0, 8192, 64))  # empty query


@has_triton
def test_split_choice():
    """~2 waves of 132 SMs, chunks a multiple of SPLIT_ALIGN and >= MIN_SPLIT_LEN, workspace capped, no empty split."""
    n, length = FD._num_splits(1, 32, 8, 1, 8192, 128, 2, 132, FD.SPLIT_ALIGN)
    assert (n, length) == (32, 256) and 8 * n >= 132
    n, length = FD._num_splits(1, 32, 32, 1, 8192, 128, 2, 132, FD.SPLIT_ALIGN)
    assert 32 * n >= 132 and length % FD.SPLIT_ALIGN == 0
    n16, _ = FD._num_splits(1, 32, 8, 16, 8192, 128, 2, 132, FD.SPLIT_ALIGN)
    assert 2 <= n16 < 32  # T = 16 with GQA: the workspace cap binds
    assert 2 * n16 * 32 * 16 * 129 * 4 <= FD.WORKSPACE_FRACTION * 2 * 8 * 8192 * 128 * 2
    for S in (1000, 4097, 8191, 100_003):
        n, length = FD._num_splits(1, 8, 1, 1, S, 64, 2, 132, FD.SPLIT_ALIGN)
        assert (n - 1) * length < S <= n * length and length >= min(S, FD.MIN_SPLIT_LEN)


# ---------------------------------------------------------------------------------------------------------------
# Through attention_forward and kernels.attention (the dispatch hook), forward and gradients.
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def small_decode(monkeypatch):
    """Lower the dispatch threshold to interpreter-sized S and count flash-decoding launches."""
    monkeypatch.setattr(FD, "MIN_KV_LEN", 64)
    monkeypatch.setattr(FD, "FORCE_NUM_SPLITS", 4)
    monkeypatch.setattr(FD, "SPLIT_ALIGN", BN)
    calls = []
    real = A.flash_decoding_forward

    def spy(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(A, "flash_decoding_forward", spy)
    return calls


@needs_triton
@pytest.mark.parametrize("T", [1, 3])
def test_attention_forward_dispatch_matches_main_kernel(T, small_decode, monkeypatch):
    q, k, v, _ = _inputs(1, 4, 2, T, 5 * BN + 3, 64, torch.float32, seed_key=("dispatch", T))
    o, lse = A.attention_forward(q, k, v, True, 0.125)
    assert len(small_decode) == 1  # flash-decoding ran
    monkeypatch.setattr(FD, "MIN_KV_LEN", 10**9)
    o_main, lse_main = A.attention_forward(q, k, v, True, 0.125)
    assert len(small_decode) == 1  # the main kernel ran
    ref_o, ref_lse = _ref64(q, k, v, True, 0.125)
    assert_close_fp32(o, o_main)
    assert_close_fp32(lse, lse_main)
    assert_close_fp32(o, ref_o)
    assert_close_fp32(lse, ref_lse)


@needs_triton
@pytest.mark.parametrize("H_kv", [1, 4])
def test_gradients_through_decode_path(H_kv, small_decode):
    """kernels.attention with a decode-shaped input: the backward consumes flash-decoding's lse."""
    B, H, T, S, D = 1, 4, 2, 4 * BN + 7, 32
    q, k, v, do = _inputs(B, H, H_kv, T, S, D, torch.float32, seed_key=("grad", H_kv))

    def fwd_bwd(fn, *xs):
        xs = [x.detach().clone().requires_grad_() for x in xs]
        o = fn(*xs)
        o.backward(do.to(o.dtype))
        return [o.detach()] + [x.grad for x in xs]

    got = fwd_bwd(lambda q, k, v: kernels.attention(q, k, v, causal=True), q, k, v)
    assert small_decode == [q.shape]
    ref = fwd_bwd(lambda q, k, v: A.attention_ref(q, k, v, causal=True), *(x.double() for x in (q, k, v)))
    for name, a, r in zip(("o", "dq", "dk", "dv"), got, ref):
        assert torch.isfinite(a).all(), name
        try:
            assert_close_fp32(a, r)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None


# ---------------------------------------------------------------------------------------------------------------
# Static compile for sm_90a (fresh process: the interpreter, once used, breaks compiles in this one).
# ---------------------------------------------------------------------------------------------------------------
_COMPILE_SCRIPT = r"""
import json, re, sys, torch
from bench import sm90
from kernels import flash_attention as A, flash_decoding as FD
out = []
for T, H_kv in ((1, 8), (16, 8)):
    q = torch.randn(1, 32, T, 128, dtype=torch.bfloat16)
    k = torch.randn(1, H_kv, 8192, 128, dtype=torch.bfloat16)
    for launch in sm90.capture(A.attention_forward, q, k, k, True, 128 ** -0.5):
        for cfg in launch.configs():
            c = sm90.compile_launch(launch, cfg)
            est = FD.SMEM_ESTIMATES[launch.name](launch.named_args(), cfg) if cfg is not None else None
            out.append(dict(name=launch.name, T=T, grid=list(launch.grid), stats=c.stats, est=est,
                            hgmma=len(re.findall(r"HGMMA", sm90.sass(c.kernel)))))
print(json.dumps(out))
"""


@pytest.mark.slow
@has_triton
def test_decode_kernels_compile_for_hopper(tmp_path):
    """attention_forward at batch-1 decode (T = 1 and 16, S = 8192, D = 128, bf16, GQA 32/8) picks flash-decoding;
    every config compiles for sm_90a without spills, within 232 registers and the shared-memory estimate, and
    the split kernel's 16-bit dots are wgmma."""
    env = {"PATH": "/usr/bin:/bin", "TRITON_CACHE_DIR": str(tmp_path / "cache"), "TRITON_HOME": str(tmp_path),
           "TRITON_INTERPRET": "0", "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    names = {r["name"] for r in rows}
    assert names == {"_decode_split_kernel", "_decode_combine_kernel"}, names
    for r in rows:
        s = r["stats"]
        assert s["spill_store_bytes"] == 0 and s["spill_load_bytes"] == 0, r
        assert s["registers"] <= 232 and s["shared_bytes"] <= 227 * 1024, r
        if r["name"] == "_decode_split_kernel":
            assert r["est"] >= s["shared_bytes"] and r["hgmma"] > 0, r
            assert r["grid"][0] * r["grid"][1] * r["grid"][2] >= 100, r  # the KV length is split
