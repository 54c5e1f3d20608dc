"""hotpath's own rows of the 124M table: the variant files made (or reused) by `model.M124`, each row a Variant for
`rounds.run_rounds`. A file that cannot be made becomes a row with the reason."""
from __future__ import annotations

import sys
from typing import Callable

from .model import M124, file_mib
from .rounds import Variant

# (name, runner, precision, ONNX mode: None = fp32 export, "" = the PyTorch checkpoint)
HOTPATH = (
    ("hotpath torch fp32", "hotpath_torch", "fp32", ""),
    ("hotpath ORT fp32", "hotpath_ort", "fp32", None),
    ("hotpath int8-dynamic", "hotpath_ort", "int8", "int8-dynamic"),
    ("hotpath int4-weight", "hotpath_ort", "int4", "int4-weight"),
    ("hotpath fp16", "hotpath_ort", "fp16", "fp16"),
)


def prepared(name: str, runner: str, precision: str, make: Callable[[], str], python: str,
             kind: str = "hotpath") -> Variant:
    """A Variant whose file `make` returns; a failure to make it is the row's error."""
    try:
        path = make()
    except Exception as e:  # noqa: BLE001 - a variant that cannot be made is reported, and the run goes on
        return Variant(name, runner, python=python, kind=kind, precision=precision,
                       error=f"not prepared: {type(e).__name__}: {str(e).strip()[:300]}")
    return Variant(name, runner, {"path": path}, python=python, kind=kind, precision=precision,
                   file_mib=file_mib_of(path))


def file_mib_of(path: str) -> float:
    from pathlib import Path

    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 2**20
    return file_mib(p)


def hotpath_variants(m: M124, *, only: tuple[str, ...] = (), python: str = sys.executable) -> list[Variant]:
    """Every row of HOTPATH, or those named in `only`."""
    out = []
    for name, runner, precision, mode in HOTPATH:
        if only and name not in only:
            continue
        def make(mode: str | None = mode) -> str:
            return str(m.ensure_checkpoint() if mode == "" else m.onnx(mode))

        out.append(prepared(name, runner, precision, make, python))
    return out
