"""kernels.attention: the Triton kernels (in Triton's interpreter on CPU, compiled on CUDA) against float64.

Every case: fresh random inputs, outputs poisoned with NaN before the launch, forward and dq, dk, dv compared with
a float64 reference under the rules of tests/tolerances.py. Shapes are placed around the interpreter's fixed
block (INTERPRET_BLOCK_M x INTERPRET_BLOCK_N = 32 x 32): 1, block - 1, block, block + 1, odd lengths, T < S
(decode, chunked prefill), T > S (causal rows that attend nothing), MHA / GQA / MQA.
"""
import zlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import _dispatch
from kernels import flash_attention as A
from tests.tolerances import assert_close_fp32, assert_half_within_torch_error

BM, BN = A.INTERPRET_BLOCK_M, A.INTERPRET_BLOCK_N
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RUNS_TRITON = _dispatch.use_triton(torch.empty(0, device=DEVICE))
needs_triton = pytest.mark.skipif(not RUNS_TRITON, reason="Triton kernels need CUDA or TRITON_INTERPRET=1 + triton")


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every buffer the launchers allocate starts as NaN, so an element the kernels never write fails the test."""
    monkeypatch.setattr(A, "_new_empty", lambda size, **kw: torch.full(tuple(size), float("nan"), **kw))


def _inputs(B, H, H_kv, T, S, D, dtype, *, seed_key):
    g = torch.Generator().manual_seed(zlib.crc32(repr(seed_key).encode()))
    mk = lambda *shape: torch.randn(*shape, generator=g).to(DEVICE, dtype)  # noqa: E731
    return mk(B, H, T, D), mk(B, H_kv, S, D), mk(B, H_kv, S, D), mk(B, H, T, D)  # q, k, v, do


def _fwd_bwd(fn, q, k, v, do):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    o = fn(q, k, v)
    o.backward(do)
    return o.detach(), q.grad, k.grad, v.grad


def _torch_in_dtype(q, k, v, causal, scale):
    """Naive attention computed by PyTorch in the inputs' own dtype: the baseline error of the half rule."""
    s, _ = A._scores(q, k, causal, scale, None)
    p, _ = A._safe_softmax(s)
    return torch.matmul(p, A._expand_kv(v, q.shape[1]))


def check(B, H, H_kv, T, S, D, causal, dtype=torch.float32, *, transpose_inputs=False):
    key = (B, H, H_kv, T, S, D, causal, str(dtype))
    q, k, v, do = _inputs(B, H, H_kv, T, S, D, dtype, seed_key=key)
    if transpose_inputs:  # the model's layout: (B, T, H, D) storage viewed as (B, H, T, D)
        q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
        assert not q.is_contiguous()
    scale = D ** -0.5
    got = _fwd_bwd(lambda q, k, v: kernels.attention(q, k, v, causal=causal), q, k, v, do)
    ref = _fwd_bwd(lambda q, k, v: A.attention_ref(q, k, v, causal=causal, scale=scale),
                   *(x.double() for x in (q, k, v, do)))
    names = ("o", "dq", "dk", "dv")
    for name, a in zip(names, got):
        assert a.dtype == dtype and torch.isfinite(a).all(), f"{name}: non-finite or wrong dtype in {key}"
    if dtype == torch.float32:
        for name, a, r in zip(names, got, ref):
            try:
                assert_close_fp32(a, r)
            except AssertionError as e:
                raise AssertionError(f"{name} {key}: {e}") from None
    else:
        base = _fwd_bwd(lambda q, k, v: _torch_in_dtype(q, k, v, causal, scale), q, k, v, do)
        for name, a, b, r in zip(names, got, base, ref):
            try:
                assert_half_within_torch_error(a, b, r, dtype)
            except AssertionError as e:
                raise AssertionError(f"{name} {key}: {e}") from None
    return got


# (B, H, H_kv, T, S, D): block boundaries -1/0/+1 on both axes, odd sizes, T < S, T > S, MHA/GQA/MQA
SHAPES = [
    (1, 1, 1, 1, 1, 16),                 # smallest
    (2, 4, 1, 1, BN + 1, 32),            # decode, MQA: T = 1, S = past + 1
    (1, 2, 2, BM - 1, BN - 1, 64),       # block - 1
    (1, 2, 2, BM, BN, 64),               # exactly one block
    (1, 2, 2, BM + 1, BN + 1, 64),       # block + 1
    (2, 4, 2, 37, 37, 32),               # GQA, odd
    (1, 4, 2, 17, 2 * BN + 1, 64),       # chunked prefill T < S
    (1, 2, 1, BM + 7, 19, 64),           # T > S: under causal the first 20 rows attend nothing
    (1, 1, 1, 2 * BM + 1, 3 * BN - 1, 32),  # several blocks, both boundaries off by one
]


@needs_triton
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}Hkv{}T{}S{}D{}".format(*s))
def test_fp32_forward_backward(shape, causal):
    check(*shape, causal)


@needs_triton
@pytest.mark.parametrize("D", [16, 32, 64, 80, 96, 128])
def test_head_dims(D):
    check(1, 2, 1, 20, 45, D, causal=True)


@needs_triton
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[4], SHAPES[6], SHAPES[7], (1, 2, 1, 9, 21, 96)],
                         ids=lambda s: "B{}H{}Hkv{}T{}S{}D{}".format(*s))
def test_fp16(shape, causal):
    check(*shape, causal, dtype=torch.float16)


@needs_triton
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[5], SHAPES[7]], ids=lambda s: "B{}H{}Hkv{}T{}S{}D{}".format(*s))
def test_bf16(shape):
    check(*shape, causal=True, dtype=torch.bfloat16)


@needs_triton
def test_non_contiguous_inputs():
    check(2, 4, 2, 19, 23, 32, causal=True, transpose_inputs=True)


@needs_triton
def test_rows_attending_nothing_give_zero_and_minus_inf_lse():
    T, S = 25, 9  # causal: rows 0..15 see no key
    q, k, v, _ = _inputs(1, 2, 1, T, S, 32, torch.float32, seed_key="empty-rows")
    o, lse = A.attention_forward(q, k, v, True, 32 ** -0.5)
    assert (o[:, :, : T - S] == 0).all() and torch.isfinite(o).all()
    assert (lse[:, :, : T - S] == float("-inf")).all() and torch.isfinite(lse[:, :, T - S:]).all()
    ref_o, ref_lse = A._attention_fwd_ref(q.double(), k.double(), v.double(), True, 32 ** -0.5)
    assert_close_fp32(o, ref_o)
    assert_close_fp32(lse[:, :, T - S:], ref_lse[:, :, T - S:])


@needs_triton
def test_custom_scale_and_default():
    q, k, v, _ = _inputs(1, 2, 2, 7, 11, 16, torch.float32, seed_key="scale")
    assert_close_fp32(kernels.attention(q, k, v, causal=False, scale=0.3),
                      A.attention_ref(q.double(), k.double(), v.double(), causal=False, scale=0.3))
    assert_close_fp32(kernels.attention(q, k, v), A.attention_ref(q.double(), k.double(), v.double(), causal=True,
                                                                  scale=16 ** -0.5))


def _check_forward(q, k, v, causal, scale=None):
    """o and lse of attention_forward against float64; o under the tolerance rule of its dtype."""
    D = q.shape[-1]
    scale = D ** -0.5 if scale is None else scale
    o, lse = A.attention_forward(q, k, v, causal, scale)
    ref_o, ref_lse = A._attention_fwd_ref(q.double(), k.double(), v.double(), causal, scale)
    assert o.dtype == q.dtype and torch.isfinite(o).all() and not torch.isnan(lse).any()
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))  # -inf exactly for rows that attend nothing
    seen = ~torch.isinf(ref_lse)
    assert_close_fp32(lse[seen], ref_lse[seen].float())
    if q.dtype == torch.float32:
        assert_close_fp32(o, ref_o)
    else:
        assert_half_within_torch_error(o, _torch_in_dtype(q, k, v, causal, scale), ref_o, q.dtype)


# (B, H, H_kv, T, S, D) for the forward's two loops: unmasked full tiles, then the causal diagonal and the ragged
# last key tile (masked); diag = S - T not a multiple of the block, T > S (empty rows), exact multiples
FWD_SHAPES = [
    (1, 2, 1, 2 * BM, 3 * BN, 32),           # exact tiles: only the diagonal is masked (causal); nothing (full)
    (1, 2, 2, BM + 1, 3 * BN + 5, 64),       # ragged last key tile, diag = 2 * BN + 4
    (2, 4, 2, 2 * BM + 3, BN - 1, 16),       # T > S: rows below T - S attend nothing under causal
    (1, 1, 1, 1, 2 * BN + 1, 64),            # decode: one row sees every key
]


@needs_triton
@pytest.mark.parametrize("path", ["tma", "pointer"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", FWD_SHAPES, ids=lambda s: "B{}H{}Hkv{}T{}S{}D{}".format(*s))
def test_forward_tma_and_pointer_paths(shape, causal, dtype, path, monkeypatch):
    """16-bit inputs with a power-of-two D take TMA descriptors; the pointer path must give the same answers."""
    B, H, H_kv, T, S, D = shape
    q, k, v, _ = _inputs(B, H, H_kv, T, S, D, dtype, seed_key=("fwd-path", shape, causal, str(dtype)))
    assert A._tma_ok(q, k, v)
    if path == "pointer":
        monkeypatch.setattr(A, "_tma_ok", lambda *tensors: False)
    from triton.tools import tensor_descriptor

    made = []  # the launcher builds one descriptor per q, k, v, o on the TMA path, none on the pointer path
    real = tensor_descriptor.TensorDescriptor
    monkeypatch.setattr(tensor_descriptor, "TensorDescriptor", lambda *a, **kw: made.append(real(*a, **kw)) or made[-1])
    _check_forward(q, k, v, causal)
    assert len(made) == (4 if path == "tma" else 0)


@needs_triton
def test_forward_odd_strides_take_the_pointer_path():
    """A row stride that is not 16-byte aligned (a slice of a wider buffer) cannot be a TMA descriptor."""
    q, k, v, _ = _inputs(1, 2, 1, BM + 3, 2 * BN + 3, 36, torch.float16, seed_key="odd-strides")
    q, k, v = (x[..., :32] for x in (q, k, v))  # row stride 36 halves = 72 bytes
    assert not A._tma_ok(q, k, v) and not q.is_contiguous()
    _check_forward(q, k, v, True)


def test_tma_rules():
    """Which inputs may use TMA descriptors: 16-bit, power-of-two D >= 16, contiguous last dim, aligned strides."""
    x = torch.empty(1, 2, 8, 64, dtype=torch.bfloat16)
    assert A._tma_ok(x)
    assert not A._tma_ok(x.float())  # fp32: IEEE dots, no wgmma to feed
    assert not A._tma_ok(torch.empty(1, 2, 8, 96, dtype=torch.float16))  # D not a power of two
    assert not A._tma_ok(torch.empty(1, 2, 8, 8, dtype=torch.float16))  # 16-byte rows: below the box minimum
    assert not A._tma_ok(x.transpose(2, 3))  # last dim not contiguous
    assert not A._tma_ok(torch.empty(1, 2, 0, 64, dtype=torch.float16))  # empty


@needs_triton
def test_negative_scale_falls_back_to_reference():
    """The kernel takes the row max before scaling (one FFMA per score), which needs scale > 0."""
    q, k, v, _ = _inputs(1, 2, 1, 9, 13, 16, torch.float32, seed_key="neg-scale")
    _check_forward(q, k, v, True, scale=-0.5)


# ---------------------------------------------------------------------------------------------------------------
# backward launcher directly: the masked-diagonal / steady-state split, atomic and deterministic dq
# ---------------------------------------------------------------------------------------------------------------
def check_backward(B, H, H_kv, T, S, D, causal, *, deterministic=False):
    """attention_backward on fp32 inputs (o, lse from the float64 reference forward) against the float64 backward."""
    key = ("bwd", B, H, H_kv, T, S, D, causal)
    q, k, v, do = _inputs(B, H, H_kv, T, S, D, torch.float32, seed_key=key)
    scale = D ** -0.5
    o, lse = A._attention_fwd_ref(q.double(), k.double(), v.double(), causal, scale)
    got = A.attention_backward(do, q, k, v, o.float(), lse, causal, scale, deterministic=deterministic)
    want = A._attention_bwd_ref(do.double(), q.double(), k.double(), v.double(), o, lse.double(), causal, scale)
    for name, a, r in zip(("dq", "dk", "dv"), got, want):
        assert a.dtype == torch.float32 and torch.isfinite(a).all(), f"{name}: non-finite or wrong dtype in {key}"
        try:
            assert_close_fp32(a, r)
        except AssertionError as e:
            raise AssertionError(f"{name} {key}: {e}") from None
    return got


# Causal: diag = S - T places the diagonal; each key tile's query tiles [lo, mid) run masked, [mid, T) unmasked;
# a key tile reaching past S runs every query tile masked. (T, S) chosen around the 32 x 32 interpreter blocks.
SPLIT_SHAPES = [
    (3 * BM, 3 * BN),          # diag = 0: one masked tile per key tile, then the steady state
    (2 * BM, 3 * BN + 1),      # diag = BN + 1, last key tile holds one key (all of it masked)
    (BM + 18, 2 * BN + 17),    # diag = BN - 1: the diagonal one row short of a tile boundary
    (BM + 1, 2 * BN),          # diag = BN - 1, T one past the block
    (2 * BM + 6, BN + 6),      # T > S, diag = -BM: the first BM rows attend nothing (zero dq rows)
    (BM + 13, BN - 12),        # T > S, diag = -25, S < one key tile
    (1, 2 * BN + 3),           # decode: one row sees everything
]


@needs_triton
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic_dq", "dq_kernel"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("T, S", SPLIT_SHAPES, ids=lambda x: str(x))
def test_backward_diagonal_split(T, S, causal, deterministic):
    dq, _, _ = check_backward(1, 2, 1, T, S, 32, causal, deterministic=deterministic)
    if causal and T > S:
        assert (dq[:, :, : T - S] == 0).all()  # rows that attend nothing: exactly zero gradient


@needs_triton
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic_dq", "dq_kernel"])
@pytest.mark.parametrize("shape", [(2, 6, 2, 37, 70, 48), (1, 4, 1, 65, 33, 24), (1, 3, 3, 40, 40, 96)],
                         ids=lambda s: "B{}H{}Hkv{}T{}S{}D{}".format(*s))
def test_backward_gqa_and_odd_head_dims(shape, deterministic):
    """GQA/MQA (dk, dv summed over the group; atomic dq from every kv program of the group), D not a power of 2."""
    check_backward(*shape, causal=True, deterministic=deterministic)


@needs_triton
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic_dq", "dq_kernel"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_backward_very_negative_scores_stay_finite(causal, deterministic):
    """Every score near -96: lse2 ~ -133, so exp2(0 - lse2) overflows for a zero-padded key past S. The padded
    keys of the last (partial) key tile must be masked, not just multiplied by their zero k/v rows (inf * 0)."""
    T, S, D, scale = 5, BN + 8, 16, 6.0
    g = torch.Generator().manual_seed(7)
    q = -torch.ones(1, 1, T, D) + 0.01 * torch.randn(1, 1, T, D, generator=g)
    k = torch.ones(1, 1, S, D) + 0.01 * torch.randn(1, 1, S, D, generator=g)
    v, do = torch.randn(1, 1, S, D, generator=g), torch.randn(1, 1, T, D, generator=g)
    o, lse = A._attention_fwd_ref(q.double(), k.double(), v.double(), causal, scale)
    assert lse.max() < -90  # exp2(-lse * log2(e)) > 2^128: inf in fp32
    got = A.attention_backward(do, q, k, v, o.float(), lse, causal, scale, deterministic=deterministic)
    want = A._attention_bwd_ref(do.double(), q.double(), k.double(), v.double(), o, lse.double(), causal, scale)
    for a, r in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-4)  # |s| ~ 100: fp32 rounding of s


@needs_triton
def test_backward_deterministic_is_reproducible_and_matches_atomic():
    q, k, v, do = _inputs(1, 4, 2, 45, 77, 32, torch.float32, seed_key="determinism")
    o, lse = A.attention_forward(q, k, v, True, 0.2)
    det = [A.attention_backward(do, q, k, v, o, lse, True, 0.2, deterministic=True) for _ in range(2)]
    atomic = A.attention_backward(do, q, k, v, o, lse, True, 0.2)
    for a, b, c in zip(*det, atomic):
        assert torch.equal(a, b)
        assert_close_fp32(c, a)


# ---------------------------------------------------------------------------------------------------------------
# reference path, dispatch, masks
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [True, False])
def test_reference_matches_sdpa(causal):
    q, k, v, _ = _inputs(2, 4, 4, 13, 13, 16, torch.float64, seed_key=("sdpa", causal))
    want = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(A.attention_ref(q, k, v, causal=causal), want)


def test_reference_path_without_interpreter(monkeypatch):
    """CPU tensors with TRITON_INTERPRET unset (or no triton) run attention_ref; its lse-based backward is exact."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not _dispatch.use_triton(torch.empty(0))
    monkeypatch.setattr(_dispatch, "triton_available", lambda: False)
    for T, S in [(5, 12), (12, 5), (1, 1)]:
        check(2, 4, 2, T, S, 24, causal=True)  # D=24: the reference takes any head dim
    check(1, 2, 1, 6, 6, 8, causal=False)


@pytest.mark.parametrize("dtype, D", [(torch.float64, 32), (torch.float32, 160)], ids=["float64", "D160"])
def test_unsupported_by_triton_falls_back_to_reference(dtype, D):
    """float64 and head dims above 128 take the reference path even where Triton would run."""
    assert not A._runs_triton(torch.empty(1, 1, 1, D, dtype=dtype, device=DEVICE))
    q, k, v, do = _inputs(1, 2, 1, 7, 10, D, dtype, seed_key=("fallback", D))
    got = _fwd_bwd(lambda q, k, v: kernels.attention(q, k, v, causal=True), q, k, v, do)
    want = _fwd_bwd(lambda q, k, v: A.attention_ref(q, k, v, causal=True), *(x.double() for x in (q, k, v, do)))
    for a, b in zip(got, want):
        assert a.dtype == dtype
        assert_close_fp32(a, b)


def test_use_triton_rules(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _dispatch.interpreting()
    assert _dispatch.use_triton(torch.empty(0)) == _dispatch.triton_available()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not _dispatch.interpreting() and not _dispatch.use_triton(torch.empty(0))
    monkeypatch.setattr(_dispatch, "triton_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not _dispatch.use_triton(torch.empty(0))


def test_attn_mask_runs_reference():
    q, k, v, _ = _inputs(2, 2, 1, 6, 9, 16, torch.float32, seed_key="mask")
    mask = torch.rand(2, 1, 6, 9, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[0, 0, 2] = False  # a row that attends nothing -> 0
    o = kernels.attention(q, k, v, causal=True, attn_mask=mask, scale=0.25)
    keep = mask & A._keep_mask(6, 9, True, None, "cpu")
    want = F.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(2, 1),
                                          v.double().repeat_interleave(2, 1), attn_mask=keep, scale=0.25)
    rows = keep.any(-1, keepdim=True).expand_as(o)
    assert_close_fp32(o[rows], want[rows])
    assert (o[~rows] == 0).all()


def test_bad_shapes_raise():
    q = torch.randn(1, 3, 4, 8)
    with pytest.raises(ValueError, match="multiple"):
        kernels.attention(q, torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8))
    with pytest.raises(ValueError):
        kernels.attention(q, torch.randn(1, 3, 4, 16), torch.randn(1, 3, 4, 16))


# ---------------------------------------------------------------------------------------------------------------
# torch.compile, torch.export, ONNX
# ---------------------------------------------------------------------------------------------------------------
class _Attn(torch.nn.Module):
    def __init__(self, causal=True):
        super().__init__()
        self.causal = causal

    def forward(self, q, k, v):
        return kernels.attention(q, k, v, causal=self.causal)


@pytest.mark.slow  # torch.compile (dynamo + AOT autograd): seconds, the first time in a process
def test_torch_compile_forward_backward():
    torch._dynamo.reset()
    q, k, v, do = _inputs(1, 4, 2, 9, 14, 16, torch.float32, seed_key="compile")
    compiled = torch.compile(_Attn(), backend="aot_eager", fullgraph=True)
    got = _fwd_bwd(compiled, q, k, v, do)
    want = _fwd_bwd(_Attn(), q, k, v, do)
    for a, b in zip(got, want):
        assert_close_fp32(a, b)


def test_torch_export_keeps_the_op():
    q, k, v, _ = _inputs(1, 4, 2, 5, 8, 16, torch.float32, seed_key="export")
    ep = torch.export.export(_Attn(), (q, k, v))
    targets = {n.target for n in ep.graph.nodes if n.op == "call_function"}
    assert torch.ops.hotpath.attention_fwd.default in targets
    assert_close_fp32(ep.module()(q, k, v), _Attn()(q, k, v))


def test_translation_table_covers_attention():
    table = kernels.onnx_translation_table()
    assert torch.ops.hotpath.attention_fwd.default in table
    assert all(callable(fn) for fn in table.values())


def _export_onnx(module, args, tmp_path, dynamic_shapes=None):
    import onnxruntime as ort

    prog = torch.onnx.export(module, args, dynamo=True, custom_translation_table=kernels.onnx_translation_table(),
                             dynamic_shapes=dynamic_shapes, verbose=False)
    path = tmp_path / "attn.onnx"
    prog.save(str(path))
    assert not any(n.domain.startswith("hotpath") for n in prog.model_proto.graph.node)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.slow
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_onnx_export_dynamic_shapes(tmp_path, causal):
    """GQA, dynamic B, T and S; ORT run on T == S, decode, chunked prefill and T > S."""
    q, k, v, _ = _inputs(2, 4, 2, 5, 9, 16, torch.float32, seed_key="onnx")
    B, T, S = (torch.export.Dim(n, min=1, max=256) for n in "BTS")
    sess = _export_onnx(_Attn(causal).eval(), (q, k, v), tmp_path,
                        dynamic_shapes={"q": {0: B, 2: T}, "k": {0: B, 2: S}, "v": {0: B, 2: S}})
    for b, t, s in [(2, 5, 9), (1, 16, 16), (3, 1, 33), (1, 11, 4)]:
        q, k, v, _ = _inputs(b, 4, 2, t, s, 16, torch.float32, seed_key=("onnx", t, s))
        (out,) = sess.run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()})
        assert_close_fp32(torch.from_numpy(out),
                          A.attention_ref(q.double(), k.double(), v.double(), causal=causal))


@pytest.mark.slow
def test_onnx_export_fp16(tmp_path):
    q, k, v, _ = _inputs(1, 2, 1, 6, 10, 32, torch.float16, seed_key="onnx16")
    sess = _export_onnx(_Attn(True).eval(), (q, k, v), tmp_path)
    (out,) = sess.run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()})
    assert out.dtype.name == "float16"
    ref = A.attention_ref(*(x.double() for x in (q, k, v)), causal=True)
    assert_half_within_torch_error(torch.from_numpy(out), _torch_in_dtype(q, k, v, True, 32 ** -0.5), ref,
                                   torch.float16)


# ---------------------------------------------------------------------------------------------------------------
# the GPU path, as far as a machine without a GPU can take it
# ---------------------------------------------------------------------------------------------------------------
_SM90_BACKWARD_SCRIPT = r"""
import json, os, sys, torch
from triton import knobs
from bench import sm90
import kernels.flash_attention as A
out = []
for dtype, causal, deterministic, D in json.loads(sys.argv[1]):
    dtype = getattr(torch, dtype)
    q, k, v, do, o = (torch.randn(1, 2, 1024, D, dtype=dtype) for _ in range(5))
    lse = torch.randn(1, 2, 1024)
    for launch in sm90.capture(A.attention_backward, do, q, k, v, o, lse, causal, D ** -0.5,
                               deterministic=deterministic):
        for cfg in launch.configs():
            # a cache hit prints no ptxas report: every compile gets an empty cache
            knobs.cache.dir = os.path.join(sys.argv[2], f"{len(out)}")
            c = sm90.compile_launch(launch, cfg)
            args = {**launch.named_args(), **(cfg.all_kwargs() if cfg else {})}
            est = None if cfg is None else A.SMEM_ESTIMATES[launch.name](args, cfg)
            text = sm90.sass(c.kernel)
            out.append(dict(name=launch.name, config=str(c.config), stats=c.stats, estimate=est,
                            hgmma="HGMMA" in text, case=[str(dtype), causal, deterministic, D]))
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.skipif(not _dispatch.triton_available(), reason="needs triton")
def test_backward_compiles_for_hopper(tmp_path):
    """bench.sm90 compiles every backward launch x autotune config for sm_90a as a real launch specialises it (fresh
    cache, so ptxas reports): <= 232 registers, no spills on the default (atomic dq) path, wgmma used, shared memory
    within the autotune estimate and the 227 KB limit."""
    import json
    import os
    import subprocess
    import sys

    cases = [["bfloat16", True, False, 128], ["float16", False, False, 128], ["bfloat16", True, True, 128]]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "cache"), TRITON_HOME=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", _SM90_BACKWARD_SCRIPT, json.dumps(cases), str(tmp_path)],
                          capture_output=True,
                          text=True, env=env, cwd=Path(__file__).resolve().parents[2], timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {r["name"] for r in rows} == {"_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel",
                                         "_attn_bwd_dq_kernel"}
    for r in rows:
        st, what = r["stats"], f"{r['name']} {r['config']} {r['case']}"
        assert 0 < st["registers"] <= 232, what
        assert st["shared_bytes"] <= 227 * 1024, what
        if r["estimate"] is not None:
            assert st["shared_bytes"] <= r["estimate"] <= 227 * 1024, what
        if r["name"] != "_attn_bwd_preprocess_kernel":
            assert r["hgmma"], what
        if not r["case"][2]:  # default path; the deterministic causal dk/dv spills 8-20 bytes outside its loops
            assert st["spill_store_bytes"] == 0 and st["spill_load_bytes"] == 0, what


@pytest.mark.skipif(not _dispatch.triton_available(), reason="needs triton")
def test_forward_autotune_pruning():
    """Forward config pruning (pure Python): by the compiled shared memory estimate, decode, tiny problems."""
    cfgs = A._fwd_configs()
    est = A.SMEM_ESTIMATES["_attn_fwd_kernel"]

    def prune(dtype, t, s, block_d, tma=True):
        args = {"q_src": torch.empty(0, dtype=dtype), "T_BUCKET": t, "S_BUCKET": s}
        precision = "ieee" if dtype == torch.float32 else "tf32"
        return A._prune_fwd_configs(cfgs, args, BLOCK_D=block_d, TMA=tma, PRECISION=precision)

    def smem(dtype, c, block_d):
        return est({"q_src": torch.empty(0, dtype=dtype), "BLOCK_D": block_d, **c.all_kwargs()}, c)

    big = prune(torch.bfloat16, 4096, 4096, 128)
    assert big == [c for c in cfgs if smem(torch.bfloat16, c, 128) <= A._SMEM_LIMIT]
    assert len(big) == len(cfgs)  # bf16 D=128: every Hopper config fits 227 KB, all are benchmarked
    fp32 = prune(torch.float32, 4096, 4096, 128)  # IEEE FMA dots: one small tile (register pressure)
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) for c in fp32] == [A._FWD_FP32_CONFIG[:3]]
    assert smem(torch.float32, fp32[0], 128) <= A._SMEM_LIMIT
    pointer = prune(torch.bfloat16, 4096, 4096, 128, tma=False)  # 128 x 128 tiles spill without TMA
    assert pointer and all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 64 for c in pointer)
    decode = prune(torch.bfloat16, 1, 8192, 128)
    assert decode and all(c.kwargs["BLOCK_M"] == 64 for c in decode)
    assert len(prune(torch.float16, 256, 256, 64)) == 1
    # the estimate grows with every tile dimension and with the pipeline depth
    c = cfgs[0]
    assert smem(torch.float32, c, 128) == 2 * smem(torch.float16, c, 128) - 1024
    assert smem(torch.float16, c, 128) > smem(torch.float16, c, 64)


@pytest.mark.skipif(not _dispatch.triton_available(), reason="needs triton")
def test_backward_autotune_pruning():
    """Backward pruning uses SMEM_ESTIMATES: bf16 D=128 keeps every config, fp32 D=128 falls back to small tiles,
    tiny problems keep one."""
    def prune(name, cfgs, dtype, t, s, d, **extra):
        args = {"q_ptr": torch.empty(0, dtype=dtype), "T_BUCKET": t, "S_BUCKET": s}
        return A._prune_bwd_configs(name, A._bwd_configs(cfgs), args, BLOCK_D=d, **extra)

    for name, cfgs in [("_attn_bwd_dkdv_kernel", A._BWD_DKDV_CONFIGS), ("_attn_bwd_dq_kernel", A._BWD_DQ_CONFIGS)]:
        assert len(prune(name, cfgs, torch.bfloat16, 8192, 8192, 128, ATOMIC_DQ=True)) == len(cfgs)
        assert len(prune(name, cfgs, torch.float16, 256, 256, 64, ATOMIC_DQ=True)) == 1
    small = prune("_attn_bwd_dkdv_kernel", A._BWD_DKDV_CONFIGS, torch.float32, 8192, 8192, 128, ATOMIC_DQ=True)
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in small] == [A._BWD_FALLBACK_CONFIG[:2]]
    dq_fp32 = prune("_attn_bwd_dq_kernel", A._BWD_DQ_CONFIGS, torch.float32, 8192, 8192, 128)
    assert [c.kwargs["BLOCK_N"] for c in dq_fp32] == [32]  # 128 x 64 tiles of fp32 overflow; 128 x 32 fit
    for c in A._bwd_configs(A._BWD_DKDV_CONFIGS):  # the estimate fits the limit for the shipped 16-bit configs
        args = {"q_ptr": torch.empty(0, dtype=torch.bfloat16), "BLOCK_D": 128, "ATOMIC_DQ": True, **c.all_kwargs()}
        assert A.SMEM_ESTIMATES["_attn_bwd_dkdv_kernel"](args, c) <= A._SMEM_LIMIT
