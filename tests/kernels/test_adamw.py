"""kernels.FusedAdamW against torch.optim.AdamW (the Triton kernel in Triton's interpreter on CPU).

Protocol (DESIGN.md): the same parameters cloned, stepped N >= 10 times by ``torch.optim.AdamW`` and by
``FusedAdamW`` on identical gradients, then parameters and every state tensor compared.

Tolerances: fp32 parameters and state within tests/tolerances.py's fp32 rule (1e-5 relative + 1e-5 absolute).
The kernel computes the same algorithm in fp32 but with its own rounding (fused expressions, bias corrections
computed on the device from the step tensor instead of in Python double), so it agrees with torch to a few fp32
ulps per step, far inside that bound after 12 steps. bf16 parameters: the fp32 master (or the fp32 value before
rounding) follows the fp32 reference under the same rule, and the bf16 parameter is the reference rounded to
bf16, allowed to differ by one bf16 ulp (2^-8 relative) where the fp32 values straddle a rounding boundary.
"""
import copy
import json
import math
import os
import weakref
import zlib

os.environ.setdefault("TRITON_INTERPRET", "1")  # normally set by tests/kernels/conftest.py

import pytest
import torch

import kernels
from kernels import FusedAdamW, _dispatch
from kernels import fused_adamw as A
from tests.tolerances import assert_close_fp32

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK = A._BLOCK  # elements per inner-loop piece
REAL_CHUNK = A._CHUNK
CHUNK = 4 * BLOCK  # elements per program in these tests (the `small_chunks` fixture; the real one is A._CHUNK)
STEPS = 12
# shapes around the piece and chunk sizes: 1, odd, block - 1, block, block + 1, a matrix, chunk +- 1, several chunks
# and a partial piece (the first four fit one piece; one of them is a matrix with odd sides)
SHAPES = [(1,), (7,), (BLOCK - 1,), (33, 5), (BLOCK,), (BLOCK + 1,), (CHUNK - 1,), (CHUNK + 1,),
          (2 * CHUNK + BLOCK + 3,)]
BF16_ULP = 2.0**-8


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Programs of 4 pieces instead of 64, so small tensors cross chunk boundaries in the interpreter."""
    monkeypatch.setattr(A, "_CHUNK", CHUNK)


def _gen(key):
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _params(shapes, key, dtype=torch.float32):
    g = _gen(key)
    return [torch.randn(*s, generator=g).to(DEVICE, dtype).requires_grad_() for s in shapes]


def _set_grads(params_lists, step, key):
    """Identical fresh gradients (never zeros) on every list of parameters."""
    g = _gen((key, step))
    for tensors in zip(*params_lists):
        grad = torch.randn(tensors[0].shape, generator=g).to(DEVICE)
        for p in tensors:
            p.grad = grad.to(p.dtype).clone()


def _groups(params, specs):
    """Split params round-robin into len(specs) groups with the given per-group options."""
    return [dict(params=params[i:: len(specs)], **spec) for i, spec in enumerate(specs)]


def _compare_state(fused, ref, fused_params, ref_params):
    for p, q in zip(fused_params, ref_params):
        s, r = fused.state[p], ref.state[q]
        assert float(s["step"]) == float(r["step"])
        assert s["step"].device == p.device and s["step"].dtype == torch.float32
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert (key in s) == (key in r), key
            if key in r:
                assert s[key].dtype == torch.float32
                assert_close_fp32(s[key], r[key])


OPTIONS = [
    dict(),
    dict(weight_decay=0.0, amsgrad=True),
    dict(weight_decay=0.1, maximize=True),
    dict(weight_decay=0.05, amsgrad=True, maximize=True, eps=1e-6),
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_matches_torch_adamw(options):
    key = ("adamw", sorted(options.items()))
    ref_params = _params(SHAPES, key)
    fused_params = [p.detach().clone().requires_grad_() for p in ref_params]
    specs = [dict(lr=3e-2), dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.2)]  # several groups
    ref = torch.optim.AdamW(_groups(ref_params, specs), **options)
    fused = FusedAdamW(_groups(fused_params, specs), **options)
    for step in range(STEPS):
        _set_grads([ref_params, fused_params], step, key)
        ref.step()
        fused.step()
    for p, q in zip(fused_params, ref_params):
        assert_close_fp32(p, q)
    _compare_state(fused, ref, fused_params, ref_params)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_params_with_master_weights(dtype):
    """Master weights: the fp32 master follows AdamW run on fp32 copies; the parameter is its rounding."""
    key = ("master", str(dtype))
    ref_params = _params(SHAPES[:4] + SHAPES[-2:], key)  # fp32 reference
    half_params = [p.detach().to(dtype).requires_grad_() for p in ref_params]
    ref_params = [p.detach().to(dtype).float().requires_grad_() for p in ref_params]  # same starting point
    ref = torch.optim.AdamW(ref_params, lr=1e-2, amsgrad=True)
    fused = FusedAdamW(half_params, lr=1e-2, amsgrad=True, master_weights=True)
    for step in range(STEPS):
        _set_grads([half_params, ref_params], step, key)  # the half grad, the same values in fp32
        for p, q in zip(half_params, ref_params):
            q.grad = p.grad.float()
        ref.step()
        fused.step()
    for p, q in zip(half_params, ref_params):
        master = fused.state[p]["master_param"]
        assert master.dtype == torch.float32 and p.dtype == dtype
        assert_close_fp32(master, q)
        assert torch.equal(p.detach(), master.to(dtype))  # the parameter is exactly the rounded master
    _compare_state(fused, ref, half_params, ref_params)


def test_bf16_params_without_master_weights():
    """No master: fp32 state, the update applied in fp32 to the bf16 value and rounded back every step."""
    key = "bf16-no-master"
    start = _params(SHAPES[:4], key, torch.bfloat16)
    fused_params = [p.detach().clone().requires_grad_() for p in start]
    ref_params = [p.detach().float().requires_grad_() for p in start]
    ref = torch.optim.AdamW(ref_params, lr=1e-2)
    fused = FusedAdamW(fused_params, lr=1e-2)
    for step in range(STEPS):
        _set_grads([fused_params], step, key)
        for p, q in zip(fused_params, ref_params):
            q.grad = p.grad.float()
        ref.step()
        fused.step()
        with torch.no_grad():
            for q in ref_params:  # the parameter lives in bf16: round the reference the same way
                q.copy_(q.to(torch.bfloat16).float())
    for p, q in zip(fused_params, ref_params):
        assert p.dtype == torch.bfloat16 and "master_param" not in fused.state[p]
        torch.testing.assert_close(p.detach().float(), q.detach(), rtol=BF16_ULP, atol=1e-6)
    for p in fused_params:
        assert fused.state[p]["exp_avg"].dtype == torch.float32


def _train(opt, params, steps, key, start=0):
    for step in range(start, start + steps):
        _set_grads([params], step, key)
        opt.step()


@pytest.mark.parametrize("amsgrad", [False, True])
def test_state_dict_round_trips_with_torch_adamw(amsgrad):
    key = ("sd", amsgrad)
    base = _params(SHAPES[:3] + SHAPES[-1:], key)
    kw = dict(lr=2e-2, weight_decay=0.1, amsgrad=amsgrad)
    # FusedAdamW -> torch.optim.AdamW
    a = [p.detach().clone().requires_grad_() for p in base]
    fused = FusedAdamW(a, **kw)
    _train(fused, a, 4, key)
    b = [p.detach().clone().requires_grad_() for p in a]
    torch_opt = torch.optim.AdamW(b, **kw)
    torch_opt.load_state_dict(copy.deepcopy(fused.state_dict()))
    _train(fused, a, 4, key, start=4)
    _train(torch_opt, b, 4, key, start=4)
    for p, q in zip(a, b):
        assert_close_fp32(p, q)
    _compare_state(fused, torch_opt, a, b)
    # torch.optim.AdamW -> FusedAdamW
    c = [p.detach().clone().requires_grad_() for p in b]
    fused2 = FusedAdamW(c, **kw)
    fused2.load_state_dict(copy.deepcopy(torch_opt.state_dict()))
    _train(torch_opt, b, 4, key, start=8)
    _train(fused2, c, 4, key, start=8)
    for p, q in zip(c, b):
        assert_close_fp32(p, q)
    _compare_state(fused2, torch_opt, c, b)
    for p in c:
        assert fused2.state[p]["step"].device == p.device and fused2.state[p]["exp_avg"].dtype == torch.float32
    # and FusedAdamW -> FusedAdamW keeps everything, including the groups' options
    fused3 = FusedAdamW([p.detach().clone().requires_grad_() for p in c])
    fused3.load_state_dict(fused2.state_dict())
    assert fused3.param_groups[0]["amsgrad"] == amsgrad and fused3.param_groups[0]["lr"] == 2e-2


def test_master_weights_state_dict_round_trip():
    key = "sd-master"
    a = _params(SHAPES[:2], key, torch.bfloat16)
    fused = FusedAdamW(a, lr=1e-2, master_weights=True)
    _train(fused, a, 3, key)
    b = [p.detach().clone().requires_grad_() for p in a]
    fused2 = FusedAdamW(b, lr=1e-2, master_weights=True)
    fused2.load_state_dict(fused.state_dict())
    _train(fused, a, 3, key, start=3)
    _train(fused2, b, 3, key, start=3)
    for p, q in zip(a, b):
        assert torch.equal(p, q)
        assert torch.equal(fused.state[p]["master_param"], fused2.state[q]["master_param"])
    # torch.optim.AdamW accepts it too (it ignores master_param)
    torch.optim.AdamW([p.detach().clone().requires_grad_() for p in a]).load_state_dict(fused.state_dict())


def test_lr_scheduler():
    key = "sched"
    ref_params = _params(SHAPES[:3], key)
    fused_params = [p.detach().clone().requires_grad_() for p in ref_params]
    ref = torch.optim.AdamW(ref_params, lr=5e-2)
    fused = FusedAdamW(fused_params, lr=5e-2)
    scheds = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=5e-2, total_steps=STEPS) for o in (ref, fused)]
    for step in range(STEPS):
        _set_grads([ref_params, fused_params], step, key)
        ref.step()
        fused.step()
        for s in scheds:
            s.step()
    assert fused.param_groups[0]["lr"] == ref.param_groups[0]["lr"]
    for p, q in zip(fused_params, ref_params):
        assert_close_fp32(p, q)


def test_grad_scaler_skips_a_step_with_inf():
    """GradScaler hands FusedAdamW grad_scale / found_inf: an inf skips the update (params, state and step count
    untouched, on the device); finite steps unscale the gradients in the kernel and match AdamW + GradScaler."""
    key = "scaler"
    ref_params = _params(SHAPES[:3], key)
    fused_params = [p.detach().clone().requires_grad_() for p in ref_params]
    ref, fused = torch.optim.AdamW(ref_params, lr=1e-2), FusedAdamW(fused_params, lr=1e-2)
    scalers = [torch.amp.GradScaler(DEVICE, init_scale=2.0**10) for _ in range(2)]
    x = torch.randn(3, generator=_gen(key)).to(DEVICE)
    for step in range(4):
        for params, opt, scaler in ((ref_params, ref, scalers[0]), (fused_params, fused, scalers[1])):
            opt.zero_grad()
            loss = sum((p.float() * (i + 1) * x.sum() * (step + 1)).sin().sum() for i, p in enumerate(params))
            scaler.scale(loss).backward()
            if step == 2:
                params[1].grad[0] = float("inf")
            before = [p.detach().clone() for p in params]
            state_before = copy.deepcopy(opt.state_dict()["state"])
            scaler.step(opt)
            scaler.update()
            if step == 2:  # skipped
                assert all(torch.equal(a, p) for a, p in zip(before, params))
                after = opt.state_dict()["state"]
                for i, s in state_before.items():
                    for k, v in s.items():
                        assert torch.equal(after[i][k], v), (i, k)
        assert scalers[0].get_scale() == scalers[1].get_scale()
    assert scalers[1].get_scale() == 2.0**9  # the inf halved the scale
    assert float(fused.state[fused_params[0]]["step"]) == 3.0
    for p, q in zip(fused_params, ref_params):
        assert_close_fp32(p, q)
    _compare_state(fused, ref, fused_params, ref_params)


def _needs_triton_path():
    if not _dispatch.use_triton(torch.empty(0, device=DEVICE)):
        pytest.skip("needs the Triton path")


def _count_launches(monkeypatch):
    """Record the grid of every kernel launch (the launches still run)."""
    grids = []
    real = A._kernels

    class Counting:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            grids.append(grid)
            return self.kernel[grid]

    monkeypatch.setattr(A, "_kernels", lambda interpret: Counting(real(interpret)))
    return grids


def test_one_launch_per_bucket_and_one_program_per_chunk(monkeypatch):
    """Multi-tensor: one launch per (group, dtype) bucket, one program per CHUNK elements of each tensor."""
    _needs_triton_path()
    grids = _count_launches(monkeypatch)
    params = _params(SHAPES, "launch") + _params(SHAPES[:2] + SHAPES[-1:], "launch16", torch.bfloat16)
    opt = FusedAdamW([dict(params=params[:3]), dict(params=params[3:])], master_weights=True)
    _set_grads([params], 0, "launch")
    opt.step()
    assert len(grids) == 3  # group 0: fp32; group 1: fp32 and bf16
    assert sum(g[0] for g in grids) == sum(-(-p.numel() // CHUNK) for p in params)
    steps = [opt.state[p]["step"] for p in params]
    assert all(s.dim() == 0 and s.dtype == torch.float32 and float(s) == 1.0 for s in steps)


def _adamw_args(shapes, key, dtype=torch.float32, amsgrad=False, master=False):
    g = _gen(key)
    params = [torch.randn(*s, generator=g).to(DEVICE, dtype) for s in shapes]
    grads = [torch.randn(*s, generator=g).to(DEVICE, dtype) for s in shapes]
    m = [torch.randn(*s, generator=g).to(DEVICE) * 0.1 for s in shapes]
    v = [torch.rand(*s, generator=g).to(DEVICE) * 0.01 for s in shapes]
    vmax = [x + torch.rand(*x.shape, generator=g).to(DEVICE) * 0.01 for x in v] if amsgrad else None
    masters = [p.float() + 1e-3 for p in params] if master else None
    steps = torch.tensor([float(i % 5 + 1) for i in range(len(shapes))], device=DEVICE)
    return [params, grads, m, v, vmax, masters, steps]


def _clone(args):
    return [None if a is None else a.clone() if torch.is_tensor(a) else [t.clone() for t in a] for a in args]


LAUNCHER_CASES = [  # (chunk in blocks, or None for the real chunk; shapes; dtype; amsgrad; master; GradScaler)
    (1, [(1,), (BLOCK - 1,), (BLOCK,), (BLOCK + 1,), (3 * BLOCK + 5,)], torch.float32, False, False, False),
    (3, [(7,), (3 * BLOCK - 1,), (3 * BLOCK,), (3 * BLOCK + 1,), (17, 301)], torch.float32, True, False, True),
    (2, [(5,), (2 * BLOCK + 1,), (4 * BLOCK + 9,)], torch.bfloat16, True, True, True),
    (2, [(2 * BLOCK - 3,), (33, 65)], torch.bfloat16, False, False, False),
    (None, [(3,), (REAL_CHUNK,), (REAL_CHUNK + 1,)], torch.float32, False, False, False),
]


@pytest.mark.parametrize("case", range(len(LAUNCHER_CASES)))
def test_launcher_chunk_boundaries(case):
    """`adamw_multi_tensor` against the reference on tensors smaller / larger than a chunk, at chunk and block
    boundaries +-1 and odd sizes: every element (all of them move by ~lr) must match."""
    _needs_triton_path()
    blocks, shapes, dtype, amsgrad, master, scaler = LAUNCHER_CASES[case]
    chunk = REAL_CHUNK if blocks is None else blocks * BLOCK
    args = _adamw_args(shapes, ("launcher", case), dtype, amsgrad, master)
    expected = _clone(args)
    start = _clone(args)
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, maximize=case == 1)
    extra = {}
    if scaler:
        extra = dict(found_inf=torch.zeros((), device=DEVICE), grad_scale=torch.full((), 8.0, device=DEVICE))
    A.adamw_multi_tensor(*args, **hyper, **extra, chunk=chunk)
    A._adamw_ref(*expected, **hyper, **extra)
    for i in (0, 2, 3, 4, 5):  # params, m, v, vmax, masters
        if args[i] is None:
            continue
        for got, want, before in zip(args[i], expected[i], start[i]):
            if got.dtype == torch.float32:
                assert_close_fp32(got, want)
            else:  # bf16 parameter: the rounded master (or reference), within one bf16 ulp
                torch.testing.assert_close(got.float(), want.float(), rtol=BF16_ULP, atol=1e-6)
            if i in (2, 3) or (i == 0 and got.dtype == torch.float32):
                assert (got != before).all()  # every element was written
    if master:
        for p, w in zip(args[0], args[5]):
            assert torch.equal(p, w.to(dtype))


def test_found_inf_leaves_everything_untouched():
    _needs_triton_path()
    args = _adamw_args([(BLOCK + 3,), (2 * BLOCK,)], "inf", amsgrad=True)
    start = _clone(args)
    A.adamw_multi_tensor(*args, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, maximize=False,
                         found_inf=torch.ones((), device=DEVICE), chunk=BLOCK)
    for got, before in zip(args, start):
        if got is not None:
            for a, b in zip(got, before):
                assert torch.equal(a, b)


def _pair(shapes, key, **options):
    """torch.optim.AdamW and FusedAdamW on clones of the same parameters, two groups."""
    ref_params = _params(shapes, key)
    fused_params = [p.detach().clone().requires_grad_() for p in ref_params]
    specs = [dict(lr=3e-2), dict(lr=1e-2, weight_decay=0.2)]
    ref = torch.optim.AdamW(_groups(ref_params, specs), **options)
    fused = FusedAdamW(_groups(fused_params, specs), **options)
    return ref, fused, ref_params, fused_params


def _step_both(ref, fused, ref_params, fused_params, step, key, in_place=False):
    if in_place:  # same .grad objects, new values (zero_grad(set_to_none=False), or a CUDA graph's static grads)
        g = _gen((key, step))
        for p, q in zip(ref_params, fused_params):
            grad = torch.randn(p.shape, generator=g).to(DEVICE)
            for x in (p, q):
                if x.grad is None:
                    x.grad = torch.zeros_like(x)
                x.grad.copy_(grad)
    else:
        _set_grads([ref_params, fused_params], step, key)
    ref.step()
    fused.step()
    for p, q in zip(fused_params, ref_params):
        assert_close_fp32(p, q)


class _CountDataPtr:
    """Counts Tensor.data_ptr() calls (the old optimizer made ~7 per tensor per step)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = torch.Tensor.data_ptr

        def counting(t):
            self.calls += 1
            return real(t)

        monkeypatch.setattr(torch.Tensor, "data_ptr", counting)


def test_plan_is_built_once_and_reused():
    """Later steps reuse the plan (no rebuild) whether the .grad objects are new each step (set_to_none) or the
    same; with the same gradients no launch table is made either; the plan keeps no gradient alive."""
    key = "reuse"
    ref, fused, ref_params, fused_params = _pair(SHAPES, key)
    _step_both(ref, fused, ref_params, fused_params, 0, key)
    assert fused._n_builds == 2  # one plan per group
    plans = list(fused._plans)
    for step in range(1, 3):  # new .grad objects each step
        _step_both(ref, fused, ref_params, fused_params, step, key)
    _step_both(ref, fused, ref_params, fused_params, 3, key, in_place=True)
    tables = [dict(b.tables) for plan in fused._plans for _, b, _ in plan.buckets]
    _step_both(ref, fused, ref_params, fused_params, 4, key, in_place=True)
    assert fused._n_builds == 2 and all(a is b for a, b in zip(fused._plans, plans))
    grad = weakref.ref(fused_params[0].grad)
    fused.zero_grad(set_to_none=True)
    assert grad() is None  # freed: the next backward may reuse its memory
    after = [b.tables for plan in fused._plans for _, b, _ in plan.buckets]
    assert all(a.keys() == b.keys() and all(a[k] is b[k] for k in a) for a, b in zip(tables, after))
    _compare_state(fused, ref, fused_params, ref_params)


def test_steady_state_check_is_cheap(monkeypatch):
    """Validating the cached plan and picking the launch table cost one data_ptr() per parameter and one per
    gradient (the optimizer used to make ~7 per tensor per step). Launches stubbed: only host work is counted."""
    launched = []

    class Stub:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append(grid)

    monkeypatch.setattr(A, "_kernels", lambda interpret: Stub())
    monkeypatch.setattr(A, "_FORCE_TRITON", True)
    params = _params(SHAPES, "cheap")
    opt = FusedAdamW(params)
    _set_grads([params], 0, "cheap")
    opt.step()
    counter = _CountDataPtr(monkeypatch)
    opt.step()  # same .grad objects
    assert counter.calls == 2 * len(params)
    counter.calls = 0
    _set_grads([params], 1, "cheap")  # new .grad objects
    opt.step()
    assert counter.calls == 2 * len(params)
    assert opt._n_builds == 1 and len(launched) == 3


def test_changes_rebuild_the_plan_and_stay_correct():
    """Everything that changes what a step must touch rebuilds the plan, and the results keep matching AdamW."""
    key = "invalidate"
    ref, fused, ref_params, fused_params = _pair(SHAPES[:6], key)
    step = 0

    def both(expect_builds, in_place=False):
        nonlocal step
        _step_both(ref, fused, ref_params, fused_params, step, key, in_place)
        step += 1
        assert fused._n_builds == expect_builds

    both(2)
    both(2)
    # a parameter added to a group
    new = _params([(BLOCK + 2,)], (key, "new"))[0]
    ref_params.append(new)
    fused_params.append(new.detach().clone().requires_grad_())
    ref.param_groups[1]["params"].append(ref_params[-1])
    fused.param_groups[1]["params"].append(fused_params[-1])
    both(3)  # only group 1 rebuilt
    # a parameter without a gradient for one step (untouched), then with one again
    _set_grads([ref_params, fused_params], step, key)
    ref_params[0].grad = fused_params[0].grad = None
    before = fused_params[0].detach().clone()
    ref.step()
    fused.step()
    step += 1
    assert fused._n_builds == 4 and torch.equal(fused_params[0], before)
    both(5)
    # p.data replaced (new storage, as module.to() does)
    for params in (ref_params, fused_params):
        params[1].data = params[1].data.clone()
    both(6)
    # load_state_dict (a round trip through a copy, as a checkpoint resume does)
    fused.load_state_dict(copy.deepcopy(fused.state_dict()))
    both(8)
    # an explicit invalidate()
    fused.invalidate()
    both(10, in_place=True)
    # add_param_group: the new group builds its plan, the others are kept
    extra = _params([(9,)], (key, "extra"))[0]
    ref_params.append(extra)
    fused_params.append(extra.detach().clone().requires_grad_())
    ref.add_param_group(dict(params=[ref_params[-1]], lr=5e-3))
    fused.add_param_group(dict(params=[fused_params[-1]], lr=5e-3))
    both(11)
    both(11)
    _compare_state(fused, ref, fused_params, ref_params)
    # amsgrad switched on: the plan gains max_exp_avg_sq (torch.optim.AdamW cannot switch, so no comparison)
    fused.param_groups[0]["amsgrad"] = True
    _set_grads([fused_params], step, key)
    fused.step()
    assert fused._n_builds == 12
    assert all("max_exp_avg_sq" in fused.state[p] for p in fused.param_groups[0]["params"])


def test_step_counts_are_views_that_save_and_load(tmp_path):
    """state["step"] is a 0-dim view of the bucket's packed counts; torch.save / load (weights_only) round trip."""
    key = "save"
    ref, fused, ref_params, fused_params = _pair(SHAPES[:5], key)
    for step in range(3):
        _step_both(ref, fused, ref_params, fused_params, step, key)
    s = fused.state[fused_params[0]]["step"]
    assert s.dim() == 0 and s._base is not None and float(s) == 3.0
    torch.save(fused.state_dict(), tmp_path / "opt.pt")
    other_params = [p.detach().clone().requires_grad_() for p in fused_params]
    other = FusedAdamW(_groups(other_params, [dict(lr=3e-2), dict(lr=1e-2, weight_decay=0.2)]))
    other.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    for step in range(3, 6):
        _step_both(ref, other, ref_params, other_params, step, key)
    _compare_state(other, ref, other_params, ref_params)
    assert float(fused.state[fused_params[0]]["step"]) == 3.0  # the saved optimizer is not advanced by the copy


@pytest.mark.skipif(not _dispatch.triton_available(), reason="needs triton")
def test_host_time_function_reports_sane_fields():
    """bench.adamw_host on small shapes: runs, records (never runs) the launches, reports consistent fields and
    leaves TRITON_INTERPRET as it was. No timing assertion."""
    from bench import adamw_host as H

    shapes = [(300, 7), (7,), (BLOCK + 1,), (2 * CHUNK + 1,)]
    before = os.environ.get("TRITON_INTERPRET")
    for dtype in H.DTYPES:
        r = H.host_time_per_step(dtype, steps=3, warmup=1, shapes=shapes)
        assert r["dtype"] == dtype and r["steps"] == 3 and r["n_param_tensors"] == len(shapes)
        assert r["n_params"] == sum(math.prod(s) for s in shapes)
        assert 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"] < 60_000
        assert r["launches_per_step"] == 2  # two groups (matrices with weight decay, vectors without)
        assert r["programs_per_step"] == sum(-(-math.prod(s) // CHUNK) for s in shapes)
        assert r["machine"]["cpu_count"] >= 1
    assert os.environ.get("TRITON_INTERPRET") == before
    launches = H.capture_step("bf16-master", shapes)
    assert [launch.name for launch in launches] == ["_adamw_multi_tensor_kernel"] * 2
    assert all(launch.kwargs["MASTER"] and launch.kwargs["CHUNK"] == CHUNK for launch in launches)
    assert launches[0].named_args()["param_like_ptr"].dtype == torch.bfloat16
    with pytest.raises(ValueError):
        H.host_time_per_step("fp16", steps=1, shapes=shapes)


@pytest.mark.skipif(not _dispatch.triton_available(), reason="needs triton")
def test_host_time_gpt2(monkeypatch, capsys):
    """The real thing, one timed step: GPT-2 124M's 148 tensors, two launches, 3,892 programs of 32k elements;
    and the CLI prints it."""
    from bench import adamw_host as H

    monkeypatch.setattr(A, "_CHUNK", REAL_CHUNK)
    shapes = H.gpt2_shapes()
    assert len(shapes) == 148 and sum(math.prod(s) for s in shapes) == 124_439_808
    assert shapes[0] == (50257, 768) and shapes[1] == (1024, 768)
    r = H.host_time_per_step("fp32", steps=1, warmup=0)
    assert (r["n_param_tensors"], r["n_params"], r["launches_per_step"]) == (148, 124_439_808, 2)
    assert r["programs_per_step"] == sum(-(-math.prod(s) // REAL_CHUNK) for s in shapes) == 3892
    assert H.main(["--dtype", "bf16-master", "--steps", "1", "--grads", "moved"]) == 0
    assert "GPT-2 124M bf16-master" in capsys.readouterr().out


def test_skips_params_without_grad_and_handles_non_contiguous():
    key = "misc"
    ref_params = _params([(6, 5), (9,), (4, 3)], key)
    ref_params[0] = ref_params[0].detach().t().requires_grad_()  # non-contiguous parameter
    fused_params = [p.detach().clone() for p in ref_params]
    fused_params[0] = ref_params[0].detach().t().contiguous().t().requires_grad_()
    fused_params[1:] = [p.requires_grad_() for p in fused_params[1:]]
    assert not fused_params[0].is_contiguous()
    ref, fused = torch.optim.AdamW(ref_params, lr=1e-2), FusedAdamW(fused_params, lr=1e-2)
    for step in range(3):
        _set_grads([ref_params, fused_params], step, key)
        ref_params[2].grad = fused_params[2].grad = None  # no gradient: untouched, no state
        ref.step()
        fused.step()
    for p, q in zip(fused_params, ref_params):
        assert_close_fp32(p, q)
    assert fused_params[2] not in fused.state


def test_reference_path_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    key = "refpath"
    ref_params = _params(SHAPES[:2], key)
    fused_params = [p.detach().clone().requires_grad_() for p in ref_params]
    ref, fused = torch.optim.AdamW(ref_params, amsgrad=True), FusedAdamW(fused_params, amsgrad=True)
    for step in range(STEPS):
        _set_grads([ref_params, fused_params], step, key)
        ref.step()
        fused.step()
    for p, q in zip(fused_params, ref_params):
        assert_close_fp32(p, q)


def test_bad_arguments():
    p = [torch.zeros(2, requires_grad=True)]
    for kw in (dict(lr=-1.0), dict(betas=(1.0, 0.9)), dict(eps=-1.0), dict(weight_decay=-0.1)):
        with pytest.raises(ValueError):
            FusedAdamW(p, **kw)
    assert kernels.FusedAdamW is FusedAdamW


_COMPILE_SCRIPT = """
import json, torch
from bench import adamw_host, sm90
from kernels import fused_adamw as A
shapes = [(4096, 70), (1000,)]
launches = [("fp32", l) for l in adamw_host.capture_step("fp32", shapes)]
launches += [("bf16-master", l) for l in adamw_host.capture_step("bf16-master", shapes)]
ps = [torch.empty(70000), torch.empty(999)]
args = [ps, [torch.empty_like(p) for p in ps]] + [[torch.empty_like(p) for p in ps] for _ in range(3)]
launches += [("fp32 amsgrad+scaler", l) for l in sm90.capture(
    A.adamw_multi_tensor, *args, None, torch.ones(2), lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
    weight_decay=0.1, maximize=True, found_inf=torch.zeros(()), grad_scale=torch.ones(()))]
for case, launch in launches:
    c = sm90.compile_launch(launch)
    text = sm90.sass(c.kernel)
    print(json.dumps(dict(case=case, **c.stats, ldg128=text.count("LDG.E.128"), stg128=text.count("STG.E.128"),
                          ldg64=text.count("LDG.E.64"), stg64=text.count("STG.E.64"))))
"""


@pytest.mark.slow
@pytest.mark.skipif(not _dispatch.triton_available(), reason="needs triton")
def test_kernel_compiles_for_hopper_within_budget():
    """The launches a GPT-2-like step records, compiled for sm_90a exactly as a launch specialises them (in a fresh
    process: the interpreter is on here): <= 64 registers, no spills, no shared memory, 16-byte vector loads and
    stores of the fp32 streams; 8-byte vectors for bf16 params and grads."""
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="0")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 5, proc.stdout
    for r in rows:
        assert r["registers"] <= 64 and r["spill_store_bytes"] == r["spill_load_bytes"] == 0, r
        assert r["shared_bytes"] == 0, r
        assert r["ldg128"] >= 3 and r["stg128"] >= 2, r  # m, v and master / fp32 param: 16-byte accesses
        if r["case"] == "bf16-master":
            assert r["ldg64"] >= 1 and r["stg64"] >= 1, r  # the bf16 grad and param
