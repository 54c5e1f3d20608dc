"""kernels.softmax: the Triton kernels (in Triton's interpreter on CPU, compiled on CUDA) against float64.

Every case: fresh random inputs, outputs poisoned with NaN before the launch, forward and input gradient compared
with a float64 reference under the rules of tests/tolerances.py. Both kernel paths run: the one-block path, and the
online (multi-block) path for rows longer than one block, forced on short rows by shrinking the block limits
(``_MAX_BLOCK`` = 64, ``_ONLINE_BLOCK`` = 32), so lengths 1, 31-33, 63-65 and 300 sit on the block boundaries.
Causal shapes cover T == S, T < S (bottom-right alignment) and T > S (top rows see nothing -> zeros).
The persistent grid runs several tiles per program when the program count is capped (``_MAX_PROGRAMS`` = 3), and
short rows share a tile when tiles are made small (``_EPT`` = 4: up to 8 rows per tile), with row counts that are not
a multiple of the rows per tile.
"""
import json
import os
import subprocess
import sys
import zlib

os.environ.setdefault("TRITON_INTERPRET", "1")  # normally set by tests/kernels/conftest.py

import pytest
import torch

import kernels
from kernels import _dispatch
from kernels import fused_softmax as S
from tests.helpers import ROOT
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


@pytest.fixture
def persistent(monkeypatch):
    """At most 3 programs, each looping over several tiles; tiles of 4 values per thread, so rows of up to 64
    columns share a tile (several rows per tile, the last tile part-filled). The other tests launch a program per
    tile (fewer tiles than the 132 SMs' programs)."""
    monkeypatch.setattr(S, "_MAX_PROGRAMS", 3)
    monkeypatch.setattr(S, "_EPT", 4)


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


# rows counts above the program cap and not multiples of the rows per tile; causal with T == S, T < S, T > S
MANY_ROWS = [(13, 16), (29, 5), (21, 33), (7, 100), (3, 11, 64), (2, 300)]
MANY_CAUSAL = [(3, 9, 16), (2, 12, 5), (2, 10, 33), (1, 7, 100)]


@pytest.mark.parametrize("shape", MANY_ROWS, ids=str)
def test_many_rows(shape, persistent, path):
    check(shape, causal=False, scale=0.37)


@pytest.mark.parametrize("shape", MANY_CAUSAL, ids=str)
def test_many_rows_causal(shape, persistent, path):
    check(shape, causal=True, scale=0.5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape,causal", [((37, 48), False), ((2, 9, 24), True)], ids=str)
def test_many_rows_half_and_negative_scale(shape, causal, dtype, persistent, path):
    check(shape, causal, scale=-0.6, dtype=dtype)  # scale < 0: the kernels negate x (softmax(|scale| * -x))


def test_persistent_tiling_is_exercised(persistent):
    """Under the `persistent` knobs the tests above really run several rows per tile and several tiles per program."""
    cpu = torch.device("cpu")
    for N, elem, backward, causal, rows in [(16, 4, False, False, 8), (5, 4, False, False, 4), (33, 4, False, False, 1),
                                            (16, 2, True, False, 4), (16, 4, False, True, 4), (48, 2, False, False, 2)]:
        cfg = S._launch_config(N, elem, backward, causal)
        assert cfg.single and cfg.rows == rows, (N, elem, backward, causal, cfg)
    cfg = S._launch_config(16, 4, False)
    assert S._grid(-(-13 // cfg.rows), cfg, cpu) == (2,)  # 13 rows: tiles of 8 and 5 rows, one per program
    assert S._grid(-(-29 // 4), S._launch_config(5, 4, False), cpu) == (3,)  # 8 tiles of <= 4 rows: 3 programs


@pytest.mark.parametrize("causal", [False, True])
def test_zero_scale_is_uniform_over_visible_columns(causal, path):
    x, dy = _inputs((2, 6, 40), torch.float32, ("zero", causal))
    y, dx = _fwd_bwd(lambda t: kernels.softmax(t, scale=0.0, causal=causal), x, dy)
    ref = _fwd_bwd(lambda t: S.softmax_ref(t, scale=0.0, causal=causal), x.double(), dy.double())
    assert_close_fp32(y, ref[0])
    assert torch.equal(dx, torch.zeros_like(dx))  # d(softmax(0 * x))/dx = 0


def test_launch_configs_for_hopper():
    """The launch plan for an H100 / H200 (132 SMs, CPU tensors): one-block rows up to 32k columns (backward and
    causal forward: 16k), short rows share a tile, at most 1024 threads of tiles per SM, >= 2 programs per SM up to
    16k columns where one program holds a 16-bit forward row, and pipeline buffers that fit shared memory."""
    cpu = torch.device("cpu")
    for backward in (False, True):
        for causal in (False, True):
            for elem in (2, 4):
                for N in [1, 16, 64, 100, 512, 1000, 1024, 2048, 4096, 8192, 16384, 32768, 65536]:
                    cfg = S._launch_config(N, elem, backward, causal)
                    key = (N, elem, backward, causal, cfg)
                    threads = 32 * cfg.num_warps
                    assert cfg.ctas_per_sm * threads <= 1024 and 1 <= cfg.ctas_per_sm <= 32, key
                    tile = cfg.rows * cfg.block * elem * (2 if backward else 1)
                    smem = (cfg.stages - 1) * tile + S._CTA_SMEM_OVERHEAD
                    assert cfg.stages in (1, 3) and cfg.ctas_per_sm * smem <= S._SMEM_PER_SM, key
                    if cfg.single:
                        assert cfg.block >= N and cfg.rows * cfg.block * (2 if backward else 1) <= threads * S._EPT, key
                    else:
                        assert N > 8192 and cfg.rows == 1 and cfg.block * elem == threads * 16, key  # 16 B per thread
                    if N <= 8192 or (N <= 16384 and not causal and not backward):
                        assert cfg.ctas_per_sm >= 2, key  # (16k backward / causal: one 32-warp program per SM)
                    n_tiles = -(-4096 // cfg.rows)
                    assert S._grid(n_tiles, cfg, cpu) == (min(n_tiles, 132 * cfg.ctas_per_sm),), key
    assert S._launch_config(32768, 2, False).single and not S._launch_config(32768, 2, True).single
    assert S._launch_config(64, 2, False).rows == 16  # 1024 values per warp: 16 rows of 64


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
# Runs in a fresh process without TRITON_INTERPRET: the real launchers are called with CPU tensors under
# bench.sm90.capture, and each launch is compiled for sm_90a as a GPU launch would specialise it.
_COMPILE_SCRIPT = r"""
import json, re, sys
import torch
from bench import sm90
from kernels import fused_softmax as S
out = []
for shape, dtype, causal in json.loads(sys.argv[1]):
    x = torch.randn(*shape, dtype=getattr(torch, dtype))
    for fn, args in ((S.softmax_forward, (x, 0.5, causal)), (S.softmax_backward, (x, x, 0.5, causal))):
        (launch,) = sm90.capture(fn, *args)
        try:
            c = sm90.compile_launch(launch)
        except RuntimeError as e:
            if "ptxas" in str(e).lower() and "not found" in str(e).lower():
                print(json.dumps({"skip": str(e)}))
                sys.exit(0)
            raise
        ptx = c.kernel.asm["ptx"]
        cfg = S._launch_config(shape[-1], x.element_size(), fn is S.softmax_backward, causal)
        out.append(dict(case=[shape, dtype, causal, launch.name], stats=c.stats, grid=list(launch.grid),
                        ctas=cfg.ctas_per_sm, rows=cfg.rows, single=cfg.single,
                        accesses=re.findall(r"(?:ld|st)\.global[.\w]*", ptx),
                        cp_async=re.findall(r"cp\.async\.\w+\.shared\.global[^;]*?,\s*(0x[0-9a-f]+|\d+),", ptx)))
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.skipif(not _dispatch.triton_available(), reason="needs triton")
def test_kernels_compile_for_hopper_with_vector_accesses():
    """The launches the launchers make (4096 rows, so the grid is the persistent one) compiled for sm_90a: no
    spills, every global access a 16-byte vector (causal masks included: the load bound is rounded up to 16
    columns), and the programs per SM the grid assumes really fit (registers x threads, shared memory): a
    program more would run as a second wave."""
    cases = [((4096, 64), "bfloat16", False), ((4096, 1024), "bfloat16", False), ((8, 512, 2048), "float32", True),
             ((4096, 16384), "bfloat16", False), ((4096, 16384), "float32", False),
             ((4, 32768), "bfloat16", True), ((4, 32768), "float32", False)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_ALWAYS_COMPILE"] = "1"  # a cached kernel comes without the ptxas log the register counts are read from
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, json.dumps(cases)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    if isinstance(results, dict):
        pytest.skip(f"no ptxas: {results['skip']}")
    assert len(results) == 2 * len(cases)
    for r in results:
        st, shape = r["stats"], r["case"][0]
        threads = 32 * st["num_warps"]
        regs = -(-st["registers"] // 8) * 8  # allocated per thread in steps of 8
        assert st["registers"] > 0 and st["spill_store_bytes"] == 0 and st["spill_load_bytes"] == 0, r
        assert r["ctas"] * threads * regs <= 65536 and r["ctas"] * threads <= 2048, r
        assert r["ctas"] * (st["shared_bytes"] + 1024) <= 228 * 1024, r
        rows = 1
        for d in shape[:-1]:
            rows *= d
        assert r["grid"] == [min(-(-rows // r["rows"]), 132 * r["ctas"])], r
        assert r["accesses"] and all(".v4." in a for a in r["accesses"]), r
        assert all(int(size, 0) == 16 for size in r["cp_async"]), r
    assert any(r["cp_async"] for r in results)  # the pipelined loop stages its loads with cp.async
