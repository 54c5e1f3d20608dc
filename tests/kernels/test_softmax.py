"""kernels.softmax: the Triton kernels (in Triton's interpreter on CPU, compiled on CUDA) against float64.

Every case: fresh random inputs, outputs poisoned with NaN before the launch, forward and input gradient compared
with a float64 reference under the rules of tests/tolerances.py. Both kernel paths run: the one-block path, and the
online (multi-block) path for rows longer than one block, forced on short rows by shrinking the block limits
(``_MAX_BLOCK`` = 64, ``_ONLINE_BLOCK`` = 32), so lengths 1, 31-33, 63-65 and 300 sit on the block boundaries.
Causal shapes cover T == S, T < S (bottom-right alignment) and T > S (top rows see nothing -> zeros).
"""
import os
import zlib

os.environ.setdefault("TRITON_INTERPRET", "1")  # normally set by tests/kernels/conftest.py

import pytest
import torch

import kernels
from kernels import _dispatch
from kernels import fused_softmax as S
from tests.helpers import aot_compile_sm90
from tests.tolerances import assert_close_fp32, assert_half_within_torch_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RUNS_TRITON = _dispatch.use_triton(torch.empty(0, device=DEVICE))


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every buffer the launchers allocate starts as NaN, so an element the kernels never write fails the test."""
    monkeypatch.setattr(S, "_new_empty", lambda size, **kw: torch.full(tuple(size), float("nan"), **kw))


@pytest.fixture(params=["one-block", "online"])
def path(request, monkeypatch):
    if request.param == "online":
        monkeypatch.setattr(S, "_MAX_BLOCK", 64)
        monkeypatch.setattr(S, "_ONLINE_BLOCK", 32)
    return request.param


def _inputs(shape, dtype, key):
    g = torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))
    x = (3 * torch.randn(*shape, generator=g)).to(DEVICE, dtype)
    dy = torch.randn(*shape, generator=g).to(DEVICE, dtype)
    return x, dy


def _fwd_bwd(fn, x, dy):
    x = x.detach().clone().requires_grad_()
    y = fn(x)
    y.backward(dy)
    return y.detach(), x.grad


def _torch_in_dtype(x, scale, causal):
    """torch.softmax in the input's own dtype (the baseline error of the half rule); masked rows -> 0."""
    z = x * scale
    if causal:
        z = z.masked_fill(~S._causal_visible(x.shape[-2], x.shape[-1], x.device), float("-inf"))
    return torch.softmax(z, dim=-1).nan_to_num(0.0)


def check(shape, causal, scale, dtype=torch.float32):
    key = (shape, causal, scale, str(dtype))
    x, dy = _inputs(shape, dtype, key)
    got = _fwd_bwd(lambda t: kernels.softmax(t, scale=scale, causal=causal), x, dy)
    ref = _fwd_bwd(lambda t: S.softmax_ref(t, scale=scale, causal=causal), x.double(), dy.double())
    for name, a in zip(("y", "dx"), got):
        assert a.dtype == dtype and a.shape == x.shape and torch.isfinite(a).all(), f"{name} {key}"
    if dtype == torch.float32:
        for name, a, r in zip(("y", "dx"), got, ref):
            try:
                assert_close_fp32(a, r)
            except AssertionError as e:
                raise AssertionError(f"{name} {key}: {e}") from None
    else:
        base = _fwd_bwd(lambda t: _torch_in_dtype(t, scale, causal), x, dy)
        for name, a, b, r in zip(("y", "dx"), got, base, ref):
            try:
                assert_half_within_torch_error(a, b.nan_to_num(0.0), r, dtype)
            except AssertionError as e:
                raise AssertionError(f"{name} {key}: {e}") from None
    return got


SHAPES = [(1, 1), (3, 7), (2, 31), (2, 33), (3, 63), (2, 64), (3, 65), (2, 300), (2, 3, 5, 17)]
CAUSAL_SHAPES = [(1, 1), (2, 7, 7), (2, 3, 5, 17), (2, 9, 4), (1, 2, 33, 33), (2, 4, 65), (1, 3, 300)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fp32_full(shape, path):
    check(shape, causal=False, scale=0.37)


@pytest.mark.parametrize("shape", CAUSAL_SHAPES, ids=str)
def test_fp32_causal(shape, path):
    check(shape, causal=True, scale=1.0 if shape[-1] % 2 else 0.125)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,causal", [((3, 65), False), ((2, 300), False), ((2, 9, 4), True), ((2, 5, 17), True)],
                         ids=str)
def test_half(shape, causal, dtype, path):
    check(shape, causal, scale=0.5, dtype=dtype)


def test_leading_shapes_and_non_contiguous_input():
    x, dy = _inputs((4, 6, 10), torch.float32, "nc")
    xt = x.transpose(0, 2)  # (10, 6, 4), last dim strided
    assert not xt.is_contiguous()
    got = _fwd_bwd(lambda t: kernels.softmax(t, scale=2.0, causal=True), xt, dy.transpose(0, 2))
    ref = _fwd_bwd(lambda t: S.softmax_ref(t, scale=2.0, causal=True), xt.double(), dy.transpose(0, 2).double())
    for a, r in zip(got, ref):
        assert_close_fp32(a, r)
    # a strided row view (stride(-1) == 1, stride(0) != N) runs without a copy of the row layout
    base = torch.randn(5, 40)
    view = base[:, 3:20]
    assert_close_fp32(kernels.softmax(view), torch.softmax(view.double(), -1))


def test_fully_masked_rows_give_zero_and_zero_gradient():
    x, dy = _inputs((2, 6, 3), torch.float32, "masked")  # T=6 > S=3: rows 0..2 see nothing
    y, dx = _fwd_bwd(lambda t: kernels.softmax(t, causal=True), x, dy)
    assert torch.equal(y[:, :3], torch.zeros_like(y[:, :3])) and torch.equal(dx[:, :3], torch.zeros_like(dx[:, :3]))
    assert_close_fp32(y[:, 3:].sum(-1), torch.ones(2, 3))
    # rows of -inf (no mask) also give zeros, unlike torch.softmax's NaN
    inf_rows = torch.full((2, 5), float("-inf"))
    assert torch.equal(kernels.softmax(inf_rows), torch.zeros(2, 5))


def test_matches_torch_softmax():
    x, _ = _inputs((3, 4, 50), torch.float32, "torch")
    assert_close_fp32(kernels.softmax(x), torch.softmax(x, -1))
    assert_close_fp32(kernels.softmax(x, scale=0.3), torch.softmax(0.3 * x, -1))


def test_reference_path_without_interpreter(monkeypatch):
    """TRITON_INTERPRET=0 on CPU: the same op runs softmax_ref, with the same results."""
    x, dy = _inputs((2, 5, 9), torch.float32, "ref")
    got = _fwd_bwd(lambda t: kernels.softmax(t, scale=0.7, causal=True), x, dy)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not _dispatch.use_triton(x)
    ref = _fwd_bwd(lambda t: kernels.softmax(t, scale=0.7, causal=True), x, dy)
    for a, r in zip(got, ref):
        assert_close_fp32(a, r)


def test_launchers_directly():
    x, dy = _inputs((3, 40), torch.bfloat16, "launch")
    y = S.softmax_forward(x, 1.5, False)
    assert_half_within_torch_error(y, torch.softmax(1.5 * x, -1), torch.softmax(1.5 * x.double(), -1),
                                   torch.bfloat16)
    dx = S.softmax_backward(y, dy, 1.5, False)
    assert dx.dtype == torch.bfloat16 and torch.isfinite(dx).all()


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        kernels.softmax(torch.randn(5), causal=True)
    with pytest.raises(TypeError):
        kernels.softmax(torch.randn(2, 3, dtype=torch.float64))


def test_empty():
    assert kernels.softmax(torch.randn(0, 5)).shape == (0, 5)


# ---------------------------------------------------------------------------------------------------------------
# torch.compile, torch.export, ONNX
# ---------------------------------------------------------------------------------------------------------------
class _Softmax(torch.nn.Module):
    def __init__(self, scale=1.0, causal=False):
        super().__init__()
        self.scale, self.causal = scale, causal

    def forward(self, x):
        return kernels.softmax(x, scale=self.scale, causal=self.causal)


@pytest.mark.slow  # torch.compile (dynamo + AOT autograd): seconds, the first time in a process
def test_torch_compile_forward_backward():
    torch._dynamo.reset()
    x, dy = _inputs((2, 7, 12), torch.float32, "compile")
    compiled = torch.compile(_Softmax(0.5, True), backend="aot_eager", fullgraph=True)
    for a, b in zip(_fwd_bwd(compiled, x, dy), _fwd_bwd(_Softmax(0.5, True), x, dy)):
        assert_close_fp32(a, b)


def test_torch_export_keeps_the_op():
    x, _ = _inputs((2, 5, 8), torch.float32, "export")
    ep = torch.export.export(_Softmax(0.5, True), (x,))
    targets = {n.target for n in ep.graph.nodes if n.op == "call_function"}
    assert torch.ops.hotpath.softmax.default in targets
    assert_close_fp32(ep.module()(x), _Softmax(0.5, True)(x))


def test_translation_table_covers_softmax():
    assert torch.ops.hotpath.softmax.default in kernels.onnx_translation_table()


@pytest.mark.slow
def test_onnx_export_dynamic_shapes(tmp_path):
    causal = True
    import onnxruntime as ort

    x, _ = _inputs((2, 5, 9), torch.float32, "onnx")
    B, T, N = (torch.export.Dim(n, min=1, max=256) for n in "BTN")
    prog = torch.onnx.export(_Softmax(0.7, causal).eval(), (x,), dynamo=True,
                             custom_translation_table=kernels.onnx_translation_table(),
                             dynamic_shapes={"x": {0: B, 1: T, 2: N}}, verbose=False)
    assert not any(n.domain.startswith("hotpath") for n in prog.model_proto.graph.node)
    path = tmp_path / "softmax.onnx"
    prog.save(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(2, 5, 9), (1, 16, 16), (3, 1, 33), (1, 11, 4)]:  # includes T > S: zero rows
        x, _ = _inputs(shape, torch.float32, ("onnx", shape))
        (out,) = sess.run(None, {"x": x.numpy()})
        assert_close_fp32(torch.from_numpy(out), S.softmax_ref(x.double(), scale=0.7, causal=causal))


@pytest.mark.slow
def test_onnx_export_fp16(tmp_path):
    import onnxruntime as ort

    x, _ = _inputs((2, 6, 10), torch.float16, "onnx16")
    prog = torch.onnx.export(_Softmax(1.0, False).eval(), (x,), dynamo=True,
                             custom_translation_table=kernels.onnx_translation_table(), verbose=False)
    path = tmp_path / "softmax16.onnx"
    prog.save(str(path))
    (out,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})
    assert out.dtype.name == "float16"
    assert_half_within_torch_error(torch.from_numpy(out), _torch_in_dtype(x, 1.0, False),
                                   S.softmax_ref(x.double()), torch.float16)


# ---------------------------------------------------------------------------------------------------------------
# the GPU path, as far as a machine without a GPU can take it
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(not _dispatch.triton_available(), reason="needs triton")
def test_kernels_compile_for_hopper_with_vector_accesses():
    """The compiled path builds for sm_90 (one-block rows of 1k and 32k, the online path), and with 16-divisible
    rows every global access is a 16-byte vector, causal masks included (the load bound is rounded up to 16
    columns): the bandwidth target needs that."""
    jobs = []
    for single, block, warps in [(True, 1024, 4), (True, 32768, 32), (False, 4096, 8)]:
        for name, ptrs, scale in (("_softmax_fwd_kernel", ("x_ptr", "y_ptr"), "scale_log2e"),
                                  ("_softmax_bwd_kernel", ("y_ptr", "dy_ptr", "dx_ptr"), "scale")):
            consts = dict(CAUSAL=True, BLOCK=block, SINGLE=single, EVEN_N=True)
            strides = ["stride_x", "stride_y", "stride_dy", "stride_dx", "N"]
            jobs.append(["kernels.fused_softmax", name, consts, warps, {p: "*bf16" for p in ptrs}, [scale], strides])
    for out in aot_compile_sm90(jobs):
        accesses = out["loads"] + out["stores"]
        assert out["cubin"] and accesses and all(".v4." in a for a in accesses), (out, sorted(set(accesses)))
