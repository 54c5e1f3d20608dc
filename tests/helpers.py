"""Helpers shared by test modules (imported as `tests.helpers`; conftest files hold only fixtures and hooks)."""
from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY_CORPUS_BYTES = 400_000  # the built-in corpus slice the session's tiny checkpoint (tests/conftest.py) trains on


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m <args>` in a fresh interpreter at the repository root; output captured as text."""
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def sqnr_db(reference, approx) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(|ref|^2 / |ref - approx|^2)."""
    import numpy as np

    ref = np.asarray(reference, dtype=np.float64)
    err = ref - np.asarray(approx, dtype=np.float64)
    return float(10 * np.log10((ref ** 2).sum() / max((err ** 2).sum(), 1e-30)))

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


# ------------------------------------------------------------------------------------------------ servers
START_TIMEOUT_S = 180  # cold imports on a loaded 2-core machine can take a while
READY = re.compile(r"listening on (http://127\.0\.0\.1:\d+)")


class ServerProcess:
    """A real `python -m serve` process on 127.0.0.1 (port 0: the OS picks a free one, the server prints it), driven
    by real clients and stopped by SIGTERM. Every wait is bounded."""

    def __init__(self, model, *args: str, env: dict | None = None):
        cmd = [sys.executable, "-m", "serve", str(model), "--host", "127.0.0.1", "--port", "0", *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        self._q: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.url = self._wait_ready()

    def _pump(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            self._q.put(line)
        self._q.put(None)

    def _wait_ready(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                line = self._q.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                break
            m = READY.search(line)
            if m:
                return m.group(1)
        self.kill()
        raise RuntimeError("server did not start:\n" + "\n".join(self.lines[-40:]))

    def output(self) -> str:
        return "\n".join(self.lines)

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM, then wait (bounded); returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
