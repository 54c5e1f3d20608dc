"""One way to open an ONNX Runtime session over a file hotpath wrote, for every stage that runs one (export's
validation and OnnxDecoder, quantize's evaluator, serve's backend): provider choice, thread settings, memory settings
and a one-line error when the file cannot be loaded.

Memory settings (:class:`MemorySettings`) were chosen by measurement at GPT-2 124M (files as export and quantize
write them now: external data, one tied embedding copy), ORT 1.32, 2 threads, one process per row, a 512-token
prefill then 24 decode steps after a 128-token prompt. Peak RSS is firm (two rounds agree within 25 MiB); the
times were taken on a 2-core machine shared with three other jobs (load average ~7), so only differences far
outside their min-max mean anything, and none of the settings showed one::

    for s in "" "--arena off" "--mem-pattern off" "--arena off --mem-pattern off" \
             "--arena-extend same_as_requested" "--prepack off"; do
        python -m bench.ort_memory ckpt.onnx $s --decode-steps 24 --json; done

    peak RSS MiB (RSS once open)        fp32        int8-dynamic  int4-weight
    defaults (arena, pattern, prepack)  698 (413)   479 (208)     357 (197)
    enable_cpu_mem_arena off            1016        731           614
    enable_mem_pattern off              696         479           357
    arena off + mem pattern off         1051        781           668
    env arena, kSameAsRequested         746         533           404
    session.disable_prepacking          698 (89)    479 (90)      496 (88)

Without the arena every run's buffers come from malloc, and glibc keeps what is freed: +250-320 MiB. A shared
environment arena growing by kSameAsRequested costs 50 MiB more than the session's own. Without prepacking the
weights stay in the mapped file until first used (89 MiB once open) but the peak is the same (int4: higher, and
decode several times slower: MatMulNBits relies on its prepacked layout). So the defaults stay: the session's own
arena, memory pattern, prepacking.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from common.errors import UserError

# preferred execution providers, best first; the TensorRT EP is used only when asked for (it builds an engine per
# new shape on first use, minutes for a dynamic-shape decoder; export.to_trt builds one engine with profiles instead)
PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


def choose_providers(providers: Optional[Sequence[str]] = None) -> list[str]:
    """The execution providers to ask for: `providers` as given (checked), else CUDA when available, then CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if providers:
        missing = [p for p in providers if p not in available]
        if missing:
            raise UserError(f"ONNX Runtime here lacks {', '.join(missing)} (available: {', '.join(available)}; "
                            "install onnxruntime-gpu for CUDA/TensorRT)")
        return list(providers)
    return [p for p in PREFERRED_PROVIDERS if p in available] or ["CPUExecutionProvider"]


@dataclass(frozen=True)
class MemorySettings:
    """How a session allocates: the CPU arena, the memory pattern planner, weight prepacking and any further
    session config entries (``key``, ``value``). The defaults are the measured best (module docstring)."""
    cpu_mem_arena: bool = True
    mem_pattern: bool = True
    prepacking: bool = True
    # None: each session's own CPU arena (kNextPowerOfTwo); "same_as_requested" / "next_power_of_two": one arena
    # for the process, registered with ONNX Runtime's environment and shared by its sessions
    # (session.use_env_allocators), growing by that strategy
    arena_extend: Optional[str] = None
    config: tuple[tuple[str, str], ...] = ()

    def apply(self, options: Any) -> None:
        options.enable_cpu_mem_arena = self.cpu_mem_arena
        if self.arena_extend is not None:
            _register_env_arena(self.arena_extend)
            options.add_session_config_entry("session.use_env_allocators", "1")
        options.enable_mem_pattern = self.mem_pattern
        if not self.prepacking:
            options.add_session_config_entry("session.disable_prepacking", "1")
        for key, value in self.config:
            options.add_session_config_entry(key, value)

    def describe(self) -> dict[str, Any]:
        return {"arena": self.cpu_mem_arena, "mem_pattern": self.mem_pattern, "prepacking": self.prepacking,
                "arena_extend": self.arena_extend, "config": dict(self.config)}


ARENA_EXTEND = {"next_power_of_two": 0, "same_as_requested": 1}
_env_arena: Optional[str] = None  # the strategy of the arena registered in this process, if any


def _register_env_arena(strategy: str) -> None:
    """Register one CPU arena with ONNX Runtime's environment (once per process: the environment is global)."""
    import onnxruntime as ort

    global _env_arena
    if strategy not in ARENA_EXTEND:
        raise ValueError(f"arena_extend={strategy!r} (use {' or '.join(ARENA_EXTEND)})")
    if _env_arena is not None:
        if _env_arena != strategy:
            raise ValueError(f"this process already registered a {_env_arena} arena")
        return
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    cfg = ort.OrtArenaCfg({"arena_extend_strategy": ARENA_EXTEND[strategy]})
    ort.create_and_register_allocator(info, cfg)
    _env_arena = strategy


DEFAULT_MEMORY = MemorySettings()


def session_options(threads: Optional[int] = None, *, inter_op_threads: Optional[int] = None,
                    memory: MemorySettings = DEFAULT_MEMORY, profile_prefix: Optional[str] = None) -> Any:
    """ORT_ENABLE_ALL graph optimizations, errors-only logging, `threads` intra-op threads (default: ONNX
    Runtime's choice, one per core), allocation as `memory` says; with `profile_prefix`, ONNX Runtime's profiler
    on, its trace written to `<profile_prefix>_<date>.json` by `session.end_profiling()`."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    memory.apply(options)
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_prefix)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    if threads is not None:
        if threads < 1:
            raise UserError(f"threads={threads} must be at least 1")
        options.intra_op_num_threads = int(threads)
    if inter_op_threads is not None:
        options.inter_op_num_threads = int(inter_op_threads)
    return options


def open_session(path: str | os.PathLike, *, providers: Optional[Sequence[str]] = None,
                 threads: Optional[int] = None, inter_op_threads: Optional[int] = None,
                 memory: MemorySettings = DEFAULT_MEMORY, profile_prefix: Optional[str] = None) -> Any:
    """An `onnxruntime.InferenceSession` over `path`; a file ONNX Runtime cannot load, or whose external data lies
    outside its folder (:mod:`export.onnx_check`), is a one-line UserError."""
    import onnxruntime as ort

    from .onnx_check import check_onnx_file

    check_onnx_file(path)  # before ONNX Runtime reads any weight: a cut file, or external data outside its folder
    chosen = choose_providers(providers)
    options = session_options(threads, inter_op_threads=inter_op_threads, memory=memory,
                              profile_prefix=profile_prefix)
    try:
        return ort.InferenceSession(str(path), options, providers=chosen)
    except Exception as e:  # onnxruntime raises its own exception types (InvalidProtobuf, Fail, ...)
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not a hotpath export ONNX Runtime can load ({first}); "
                        "export a checkpoint with python -m export.to_onnx") from e
