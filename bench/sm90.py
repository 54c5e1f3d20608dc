"""Compile hotpath's Triton kernels for sm_90a on a machine without a GPU, exactly as a real launch would.

How: the real launcher (``attention_forward``, ``softmax_forward``, ...) is called with CPU tensors while
``JITFunction.run`` and ``Autotuner.run`` are replaced by recorders (`capture_launches`). Each recorded launch holds
the arguments the launcher passed, so Triton's own binder (``create_function_from_signature`` with the sm_90
backend) and ``JITFunction._pack_args`` derive the specialisation a GPU launch would get (16-byte pointer alignment,
16-divisible integers, ``== 1`` strides). `compile_launch` then compiles one launch x one autotune config, and
`ptxas_stats` / `sass` read registers, spills, shared memory and SASS from the result with the ``ptxas``,
``cuobjdump`` and ``nvdisasm`` that Triton ships.

Run this in a process without ``TRITON_INTERPRET=1``: the interpreter patches ``triton.language`` and compiles fail.
"""
from __future__ import annotations

import contextlib
import io
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.autotuner import Autotuner, Config
from triton.runtime.jit import JITFunction, create_function_from_signature

TARGET = GPUTarget("cuda", 90, 32)


@dataclass
class Launch:
    """One recorded kernel launch: the JIT function, its autotuner (if any) and the exact call arguments."""

    fn: JITFunction
    args: tuple
    kwargs: dict[str, Any]
    autotuner: Optional[Autotuner] = None
    grid: Any = None

    @property
    def name(self) -> str:
        return self.fn.fn.__name__

    def configs(self) -> list[Optional[Config]]:
        """Every autotune config (None for a kernel launched with fixed meta-parameters)."""
        return list(self.autotuner.configs) if self.autotuner is not None else [None]

    def named_args(self) -> dict[str, Any]:
        names = [p.name for p in self.fn.params]
        return {**dict(zip(names, self.args)), **self.kwargs}


@contextlib.contextmanager
def capture_launches() -> Iterator[list[Launch]]:
    """Within the block, kernel launches are recorded instead of run (no GPU is touched)."""
    launches: list[Launch] = []
    jit_run, tune_run = JITFunction.run, Autotuner.run

    def record_jit(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs, grid=grid))

    def record_tuned(self, *args, **kwargs):
        grid = kwargs.pop("grid", None)
        kwargs.pop("warmup", None)
        launches.append(Launch(self.fn, args, kwargs, autotuner=self, grid=grid))

    JITFunction.run, Autotuner.run = record_jit, record_tuned  # type: ignore[method-assign]
    try:
        yield launches
    finally:
        JITFunction.run, Autotuner.run = jit_run, tune_run  # type: ignore[method-assign]


def capture(launcher: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Launch]:
    """Call a launcher with CPU tensors and return the launches it made."""
    with capture_launches() as launches:
        launcher(*args, **kwargs)
    return launches


@dataclass
class Compiled:
    name: str
    config: dict[str, Any]
    kernel: Any  # triton CompiledKernel
    ptxas_log: str = ""
    stats: dict[str, int] = field(default_factory=dict)


def compile_launch(launch: Launch, config: Optional[Config] = None) -> Compiled:
    """Compile one recorded launch for sm_90a with the given autotune config, as `JITFunction.run` would."""
    fn = launch.fn
    kwargs = dict(launch.kwargs)
    cfg: dict[str, Any] = {}
    if config is not None:
        cfg = config.all_kwargs()
        kwargs.update(cfg)
    backend = make_backend(TARGET)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    src = ASTSource(fn, signature, constexprs, attrs)
    log = io.StringIO()
    old = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True  # ptxas -v output is printed to stdout: keep it
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=TARGET, options=options.__dict__)
    finally:
        knobs.nvidia.dump_ptxas_log = old
    text = log.getvalue()
    shown = {k: v for k, v in cfg.items() if isinstance(v, (int, float, str, bool))}
    return Compiled(launch.name, shown, kernel, text, ptxas_stats(text, kernel))


_PTXAS_PATTERNS = {
    "registers": r"Used (\d+) registers",
    "stack_frame_bytes": r"(\d+) bytes stack frame",
    "spill_store_bytes": r"(\d+) bytes spill stores",
    "spill_load_bytes": r"(\d+) bytes spill loads",
}


def ptxas_stats(log: str, kernel: Any) -> dict[str, int]:
    """Registers, stack and spill bytes from `ptxas -v`; dynamic shared memory from the compiled metadata."""
    out = {}
    for key, pattern in _PTXAS_PATTERNS.items():
        found = re.findall(pattern, log)
        out[key] = int(found[-1]) if found else 0
    out["shared_bytes"] = int(kernel.metadata.shared)
    out["num_warps"] = int(kernel.metadata.num_warps)
    return out


def _tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def sass(kernel: Any) -> str:
    """The SASS of a compiled kernel (`nvdisasm` on its cubin)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        return subprocess.run([_tool("nvdisasm"), "-c", "-hex", f.name], check=True, capture_output=True,
                              text=True).stdout
