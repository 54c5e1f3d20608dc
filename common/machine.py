"""Facts about the machine recorded beside every measurement: CPU model, cores, threads, GPU, library versions."""
from __future__ import annotations

import contextlib
import importlib
import os
import platform
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

LIBRARIES = ("torch", "triton", "onnxruntime", "onnx", "tokenizers")


def cpu_model() -> str:
    """The CPU's marketing name (Linux /proc/cpuinfo), else what `platform` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


# the vector extensions that decide which kernels ONNX Runtime, torch and the peers pick on x86
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8")


def cpu_isa() -> list[str]:
    """Which of :data:`ISA_FLAGS` this CPU reports (/proc/cpuinfo; empty where that does not exist). The machines
    differ between sessions: one reported AVX2 alone, another AVX-512 with VNNI, and a number means little without
    it."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.partition(":")[2].split())
                return [f for f in ISA_FLAGS if f in flags]
    return []


def library_versions(names: tuple[str, ...] = LIBRARIES) -> dict[str, Optional[str]]:
    """{"python": ..., name: version or None when not installed (or broken)}."""
    out: dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = importlib.import_module(name).__version__
        except Exception:  # noqa: BLE001 - a missing or broken optional library is recorded as None
            out[name] = None
    return out


def gpu_info() -> dict[str, Any]:
    """Name, CUDA version and compute capability of GPU 0, or {"gpu": None} without one."""
    import torch

    if not torch.cuda.is_available():
        return {"gpu": None}
    return {"gpu": torch.cuda.get_device_name(0), "cuda": torch.version.cuda,
            "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
            "cudnn": torch.backends.cudnn.version()}


def machine_info(threads: Optional[int] = None) -> dict[str, Any]:
    """Everything a result needs to be compared with another run's: host, CPU, cores, threads, GPU, versions."""
    import torch

    return {
        "host": socket.gethostname(),
        "cpu": cpu_model(),
        "cpu_isa": cpu_isa(),
        "cores": os.cpu_count(),
        "threads": threads if threads is not None else torch.get_num_threads(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **gpu_info(),
        **library_versions(),
    }


def peak_rss_mib() -> float:
    """This process's peak resident memory, in MiB (2**20 bytes): Linux's VmHWM (since the process started, or since
    `bench.harness.reset_peak_rss`), else `getrusage`'s ru_maxrss (KiB on Linux, bytes on macOS). Not ru_maxrss on
    Linux: it survives exec, so a worker a large parent started reports the parent's size (every 124M worker of
    `make bench` once read 1079 MiB). On CPU the allocators of torch and ONNX Runtime are invisible to tracemalloc,
    so the process's own high-water mark is the common honest measure."""
    import resource
    import sys

    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def release_free_heap() -> None:
    """Free what only reference cycles still hold (a `gc.collect()`: onnx_ir's graphs are cyclic and keep the protobuf
    they wrap alive), then hand the C heap's free pages back to the OS (glibc's `malloc_trim(0)`; nothing elsewhere):
    glibc keeps what large protobuf parses and ONNX Runtime's passes freed, and the next phase's allocations would
    come on top of it."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()

    name = ctypes.util.find_library("c")
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(name).malloc_trim(0)
