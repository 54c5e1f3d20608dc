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
import os
import zlib

os.environ.setdefault("TRITON_INTERPRET", "1")  # normally set by tests/kernels/conftest.py

import pytest
import torch

import kernels
from kernels import FusedAdamW, _dispatch
from kernels import fused_adamw as A
from tests.tolerances import assert_close_fp32

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK = A._BLOCK
STEPS = 12
# shapes around the chunk size: 1, odd, block - 1, block, block + 1 (two chunks), a matrix
SHAPES = [(1,), (7,), (BLOCK - 1,), (BLOCK,), (BLOCK + 1,), (33, 5)]
BF16_ULP = 2.0**-8


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
    ref_params = _params(SHAPES[:4], key)  # fp32 reference
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


def test_few_launches_per_group_and_cached_tables(monkeypatch):
    """Multi-tensor: a group's parameters are updated by at most two launches per dtype bucket."""
    if not _dispatch.use_triton(torch.empty(0, device=DEVICE)):
        pytest.skip("needs the Triton path")
    launches = []
    real = A._kernels

    class Counting:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launches.append(grid)
            return self.kernel[grid]

    monkeypatch.setattr(A, "_kernels", lambda interpret: Counting(real(interpret)))
    params = _params(SHAPES, "launch") + _params(SHAPES[:2], "launch16", torch.bfloat16)
    opt = FusedAdamW([dict(params=params[:3]), dict(params=params[3:])], master_weights=True)
    _set_grads([params], 0, "launch")
    opt.step()
    # per (group, dtype) bucket: one launch for all full chunks, one for all partial tails.
    # group 0 (fp32 1, 7, 4095 elements): tails only; group 1 fp32 (4096, 4097, 165): full + tails; bf16: tails
    assert len(launches) == 4
    n_chunks = sum(-(-p.numel() // BLOCK) for p in params)
    assert sum(g[0] for g in launches) == n_chunks
    tables = dict(opt._tables.tables)
    opt.step()  # same gradients, same addresses: no new table
    assert set(opt._tables.tables) == set(tables)


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


@pytest.mark.slow
@pytest.mark.skipif(not _dispatch.triton_available(), reason="needs triton")
def test_kernel_compiles_for_hopper_with_vector_accesses():
    """The compiled path builds for sm_90 (fp32, and bf16 with master weights); full chunks of 16-byte aligned
    tensors (addresses read from the table, hinted aligned) get 16-byte vector loads and stores: only the table
    entries and the step / scaler scalars are scalar loads."""
    from tests.helpers import aot_compile_sm90

    floats = ["lr", "decay", "beta1", "beta2", "one_minus_beta1", "one_minus_beta2", "log_beta1", "log_beta2", "eps"]
    jobs = []
    for param_type, master in [("*fp32", False), ("*bf16", True)]:
        consts = dict(AMSGRAD=True, MAXIMIZE=False, MASTER=master, HAS_FOUND_INF=True, HAS_GRAD_SCALE=True,
                      ALIGNED=True, BLOCK=BLOCK, EVEN=True)
        ptrs = {"table_ptr": "*i64", "param_like_ptr": param_type, "grad_like_ptr": param_type,
                "found_inf_ptr": "*fp32", "grad_scale_ptr": "*fp32"}
        jobs.append(["kernels.fused_adamw", "_adamw_multi_tensor_kernel", consts, A._NUM_WARPS, ptrs, floats, []])
    for out in aot_compile_sm90(jobs):
        assert out["cubin"]
        assert out["stores"] and all(".v4." in s for s in out["stores"]), sorted(set(out["stores"]))
        scalar_loads = [x for x in out["loads"] if ".v4." not in x]
        assert len(scalar_loads) <= 12, scalar_loads  # table entries (int64), step, found_inf, grad_scale
