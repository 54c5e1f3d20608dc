"""Compile hotpath's Triton kernels for sm_90a on a machine without a GPU, exactly as a real launch would.

How: the real launcher (``attention_forward``, ``softmax_forward``, ...) is called with CPU tensors while
``JITFunction.run`` and ``Autotuner.run`` are replaced by recorders (`capture_launches`). Each recorded launch holds
the arguments the launcher passed, so Triton's own binder (``create_function_from_signature`` with the sm_90
backend) and ``JITFunction._pack_args`` derive the specialisation a GPU launch would get (16-byte pointer alignment,
16-divisible integers, ``== 1`` strides). `compile_launch` then compiles one launch x one autotune config, and
`ptxas_stats` / `sass` read registers, spills, shared memory and SASS from the result with the ``ptxas``,
``cuobjdump`` and ``nvdisasm`` that Triton ships.

Reading the result (`analyse`): `parse_sass` + `find_loops` find the loops of the SASS as the back edges of its
control-flow graph (a branch to a block that dominates it), so the out-of-line slow paths Triton emits for barrier
waits (a wait that retries, then a jump back into the loop) are not mistaken for loops; `sass_counts` counts the
instructions that say how a kernel moves data and multiplies (HGMMA, TMA, cp.async, 16-byte accesses, spills);
`occupancy` applies Hopper's per-SM limits to registers, shared memory and warps.

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

    def pruned_configs(self) -> list[Optional[Config]]:
        """The configs the autotuner would benchmark for this launch: its own `prune_configs` (the kernel's
        `early_config_prune`, then any perf model) with the launch's arguments, as `Autotuner.run` calls it."""
        if self.autotuner is None:
            return [None]
        if len(self.autotuner.configs) == 1:  # Autotuner.run skips pruning for a single config
            return list(self.autotuner.configs)
        tuner = self.autotuner
        tuner.nargs = dict(zip(tuner.arg_names, self.args))
        try:
            return list(tuner.prune_configs(dict(self.kwargs)))
        finally:
            tuner.nargs = None


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
        if config.pre_hook is not None:  # e.g. sets TMA descriptor block shapes from the config, as a launch does
            config.pre_hook({**launch.named_args(), **cfg})
    backend = make_backend(TARGET)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    src = ASTSource(fn, signature, constexprs, attrs)
    log = io.StringIO()
    old = knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
    knobs.nvidia.dump_ptxas_log = True  # ptxas -v output is printed to stdout: keep it
    knobs.compilation.always_compile = True  # a cached kernel skips ptxas, and its -v statistics with it
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=TARGET, options=options.__dict__)
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = old
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
        if not found and key == "registers":
            raise RuntimeError(f"ptxas -v printed no register count:\n{log[-2000:]}")
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


# ------------------------------------------------------------------------------------------------ SASS analysis
@dataclass(frozen=True)
class Instr:
    """One SASS instruction: byte offset, guard predicate ("" if none), opcode with modifiers, operand text and the
    label it branches to (None unless a direct branch)."""

    addr: int
    pred: str
    op: str
    operands: str
    target: Optional[str] = None


_INSTR = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(?:(@!?U?P(?:T|\d+))\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);")
_LABEL = re.compile(r"^\s*(\.L\w+):")
_BRANCH_TARGET = re.compile(r"`\((\.L\w+)\)")


def parse_sass(text: str) -> tuple[list[Instr], dict[str, int]]:
    """The instructions of `nvdisasm` output (one kernel) in address order, and each label's address."""
    instrs: list[Instr] = []
    labels: dict[str, int] = {}
    pending: list[str] = []
    for line in text.splitlines():
        m = _LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        addr = int(m.group(1), 16)
        for name in pending:
            labels[name] = addr
        pending = []
        op, operands = m.group(3), m.group(4).strip()
        target = None
        if op.split(".")[0] == "BRA":
            t = _BRANCH_TARGET.search(operands)
            target = t.group(1) if t else None
        instrs.append(Instr(addr, m.group(2) or "", op, operands, target))
    return instrs, labels


def _opcode(instr: Instr) -> str:
    return instr.op.split(".")[0]


# opcodes that end a path (no fall-through when unguarded) or jump somewhere this analysis cannot follow
_TERMINATORS = {"EXIT", "RET", "BRA", "BRX", "JMP", "JMX", "KILL"}
# a loop made only of these is a barrier wait that retries (mbarrier try_wait), not work
_WAIT_OPS = {"SYNCS", "BRA", "NANOSLEEP", "YIELD", "NOP"}


@dataclass
class Loop:
    """A natural loop: `header` and `end` are the byte offsets of its first instruction and of its last back-edge
    branch; `instructions` counts the loop's instructions between the two (the code run per iteration; cold
    out-of-line blocks Triton places after the kernel, such as a retried barrier wait, are not counted);
    `innermost`: no other work loop inside it."""

    header: int
    end: int
    instructions: int
    mma: int  # HGMMA (wgmma) + HMMA (mma.sync) instructions inside
    innermost: bool = True

    def as_dict(self) -> dict[str, Any]:
        return {"start": f"{self.header:#06x}", "end": f"{self.end:#06x}", "instructions": self.instructions,
                "mma": self.mma, "innermost": self.innermost}


def find_loops(instrs: list[Instr], labels: dict[str, int]) -> list[Loop]:
    """Work loops of a kernel in address order: natural loops of the control-flow graph (a back edge is a branch to
    a block that dominates the branch), loops with the same header merged, barrier-wait retry loops left out."""
    if not instrs:
        return []
    index = {ins.addr: i for i, ins in enumerate(instrs)}
    # basic blocks: leaders are the entry, branch targets and whatever follows a branch or an exit
    leaders = {0}
    for i, ins in enumerate(instrs):
        if ins.target is not None and ins.target in labels and labels[ins.target] in index:
            leaders.add(index[labels[ins.target]])
        if _opcode(ins) in _TERMINATORS and i + 1 < len(instrs):
            leaders.add(i + 1)
    starts = sorted(leaders)
    ends = starts[1:] + [len(instrs)]
    block_of = {}
    for b, (lo, hi) in enumerate(zip(starts, ends)):
        for i in range(lo, hi):
            block_of[i] = b
    succ: list[set[int]] = [set() for _ in starts]
    for b, (lo, hi) in enumerate(zip(starts, ends)):
        last = instrs[hi - 1]
        op = _opcode(last)
        if last.target is not None and last.target in labels and labels[last.target] in index:
            succ[b].add(block_of[index[labels[last.target]]])
        falls_through = op not in _TERMINATORS or (last.pred and op in ("BRA", "EXIT", "RET", "KILL"))
        if falls_through and hi < len(instrs):
            succ[b].add(b + 1)
    # dominators over the blocks reachable from the entry (iterative data-flow in reverse post-order)
    order: list[int] = []
    seen = {0}
    stack = [(0, iter(sorted(succ[0])))]
    while stack:
        node, it = stack[-1]
        nxt = next((s for s in it if s not in seen), None)
        if nxt is None:
            order.append(node)
            stack.pop()
        else:
            seen.add(nxt)
            stack.append((nxt, iter(sorted(succ[nxt]))))
    order.reverse()
    preds: dict[int, set[int]] = {b: set() for b in order}
    for b in order:
        for s in succ[b]:
            preds[s].add(b)
    dom: dict[int, set[int]] = {b: set(order) for b in order}
    dom[0] = {0}
    changed = True
    while changed:
        changed = False
        for b in order[1:]:
            new = set.intersection(*(dom[p] for p in preds[b])) | {b} if preds[b] else {b}
            if new != dom[b]:
                dom[b], changed = new, True
    # natural loops: header -> blocks that reach a latch without passing the header
    bodies: dict[int, set[int]] = {}
    latch_end: dict[int, int] = {}
    for b in order:
        for h in succ[b]:
            if h in dom[b]:
                body = bodies.setdefault(h, {h})
                work = [b]
                while work:
                    x = work.pop()
                    if x not in body:
                        body.add(x)
                        work.extend(preds[x])
                latch_end[h] = max(latch_end.get(h, 0), ends[b] - 1)
    loops = []
    for h, body in bodies.items():
        members = [i for blk in body for i in range(starts[blk], ends[blk])]
        if all(_opcode(instrs[i]) in _WAIT_OPS for i in members):
            continue  # a barrier wait that retries
        lo, hi = starts[h], latch_end[h]
        inside = [i for i in members if lo <= i <= hi]
        mma = sum(_opcode(instrs[i]) in ("HGMMA", "HMMA") for i in inside)
        loops.append((body, Loop(instrs[lo].addr, instrs[hi].addr, len(inside), mma)))
    for body, loop in loops:
        loop.innermost = not any(other is not loop and other_body < body for other_body, other in loops)
    return sorted((loop for _, loop in loops), key=lambda lp: lp.header)


def hot_loop(loops: list[Loop]) -> Optional[Loop]:
    """The innermost loop that runs the most: the one with the most matrix instructions, and among equals the
    leanest (the unmasked steady state: a masked copy of the same loop, for a causal diagonal or a ragged tail, runs
    a few iterations and carries the mask arithmetic)."""
    inner = [lp for lp in loops if lp.innermost]
    return min(inner, key=lambda lp: (-lp.mma, lp.instructions, lp.header)) if inner else None


_COUNTED = {
    "hgmma": lambda op: op.startswith("HGMMA"),
    "hmma": lambda op: op.startswith("HMMA"),
    "utmaldg": lambda op: op.startswith("UTMALDG"),
    "utmastg": lambda op: op.startswith("UTMASTG"),
    "ldgsts": lambda op: op.startswith("LDGSTS"),
    "ldgsts128": lambda op: op.startswith("LDGSTS") and ".128" in op,
    "ldg": lambda op: op.startswith("LDG."),
    "stg": lambda op: op.startswith("STG."),
    "ldg128": lambda op: op.startswith("LDG.") and ".128" in op,
    "stg128": lambda op: op.startswith("STG.") and ".128" in op,
    "ldl": lambda op: op.split(".")[0] == "LDL",
    "stl": lambda op: op.split(".")[0] == "STL",
}


def sass_counts(instrs: list[Instr]) -> dict[str, int]:
    """Instruction counts: total, HGMMA (wgmma), HMMA (mma.sync), UTMALDG / UTMASTG (TMA), LDGSTS (cp.async) and
    those of 16 bytes, global loads / stores and those of 16 bytes (LDG/STG ... .128), and local-memory spill
    traffic (LDL / STL)."""
    out = {"instructions": len(instrs)}
    for key, match in _COUNTED.items():
        out[key] = sum(1 for ins in instrs if match(ins.op))
    return out


_DOT = re.compile(r"\btt\.dot\b[^:]*:\s*tensor<(?:\d+x)+(\w+)[^>]*>\s*\*\s*tensor<(?:\d+x)+(\w+)")


def dots_16bit(kernel: Any) -> int:
    """How many `tt.dot`s of the kernel's Triton IR multiply fp16/bf16 operands (on sm_90 each should become
    wgmma)."""
    return sum(a in ("f16", "bf16") and b in ("f16", "bf16") for a, b in _DOT.findall(kernel.asm.get("ttir", "")))


# ------------------------------------------------------------------------------------------------ occupancy
# Hopper (sm_90) per-SM limits, from the CUDA occupancy rules for compute capability 9.0
REGS_PER_SM = 65536
REG_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256 (8 per thread)
SMEM_PER_SM = 228 * 1024
SMEM_PER_BLOCK_MAX = 227 * 1024
SMEM_RESERVED_PER_CTA = 1024  # the runtime keeps 1 KB of each CTA's shared memory
SMEM_ALLOC_UNIT = 128
WARPS_PER_SM = 64
CTAS_PER_SM = 32


def _round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def occupancy(registers: int, shared_bytes: int, num_warps: int) -> dict[str, Any]:
    """CTAs of one kernel resident per SM on Hopper, the limit from each resource and which one binds. A CTA
    whose shared memory exceeds the 227 KB a block may use cannot launch (0 CTAs, limiter "smem")."""
    regs_per_warp = _round_up(max(registers, 1) * 32, REG_ALLOC_UNIT)
    by = {
        "regs": (REGS_PER_SM // regs_per_warp) // num_warps,
        "smem": (SMEM_PER_SM // _round_up(shared_bytes + SMEM_RESERVED_PER_CTA, SMEM_ALLOC_UNIT)
                 if shared_bytes <= SMEM_PER_BLOCK_MAX else 0),
        "warps": WARPS_PER_SM // num_warps,
        "ctas": CTAS_PER_SM,
    }
    ctas = min(by.values())
    limiter = min(by, key=lambda k: (by[k], list(by).index(k)))
    return {"ctas_per_sm": ctas, "warps_per_sm": ctas * num_warps, "limiter": limiter,
            **{f"by_{k}": v for k, v in by.items() if k != "ctas"}}
