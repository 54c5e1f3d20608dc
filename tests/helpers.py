"""Helpers shared by test modules (imported as `tests.helpers`; conftest files hold only fixtures and hooks)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Compiles Triton kernels for sm_90 in a fresh interpreter: TRITON_INTERPRET, once used in a process, leaves
# triton.language patched, so a compile in the test process fails (or is hidden by a warm cache).
_AOT_SCRIPT = r"""
import importlib, inspect, json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction
results = []
for job in json.loads(sys.argv[1]):
    module, name, consts, num_warps, ptr_types, float_args, aligned_ints = job[:7]
    options = dict(num_warps=num_warps, **(job[7] if len(job) > 7 else {}))
    raw = getattr(importlib.import_module(module), name)
    names = list(inspect.signature(raw).parameters)
    sig = {n: "constexpr" if n in consts else ptr_types.get(n) or ("fp32" if n in float_args else "i32")
           for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in ptr_types or n in aligned_ints}
    src = ASTSource(JITFunction(raw), sig, constexprs=consts, attrs=attrs)
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    except RuntimeError as e:
        if "ptxas" in str(e).lower() and "not found" in str(e).lower():
            print(json.dumps({"skip": str(e)}))
            sys.exit(0)
        raise
    ptx = compiled.asm["ptx"]
    results.append({"name": name, "consts": consts, "cubin": "cubin" in compiled.asm,
                    "shared": compiled.metadata.shared, "loads": re.findall(r"ld\.global[.\w]*", ptx),
                    "stores": re.findall(r"st\.global[.\w]*", ptx)})
print(json.dumps(results))
"""


def aot_compile_sm90(jobs: list[list[Any]]) -> list[dict[str, Any]]:
    """Compile kernels ahead of time for sm_90 (Triton -> PTX -> cubin with the ptxas Triton ships), in one fresh
    process with TRITON_INTERPRET unset. ``jobs``: [module, kernel name, constexprs, num_warps, {pointer arg: type},
    float args, 16-divisible int args, optional extra compile options such as {"num_stages": 3}]. Returns, per
    job, {name, consts, cubin, shared, loads, stores} with the PTX global access kinds. Skips the test when Triton
    ships no ptxas."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, json.dumps(jobs)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if isinstance(out, dict) and "skip" in out:
        pytest.skip(f"no ptxas: {out['skip']}")
    return out
