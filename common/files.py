"""Files written whole or not at all, input-file checks and content hashes.

Every output goes through `atomic_path`: written under a temporary name beside the target, then renamed over it,
so a crash or Ctrl-C never leaves a half-written file under the real name. Outputs get one mode, the one a plain
`open(..., "w")` would give (0644 under the usual umask), not mkstemp's private 0600.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import UserError


def _output_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


OUTPUT_MODE = _output_mode()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, OUTPUT_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, payload: Any, indent: int = 1) -> None:
    """JSON written whole or not at all; values JSON cannot hold (paths, numpy scalars) are written as strings."""
    write_text_atomic(path, json.dumps(payload, indent=indent, default=str) + "\n")


def existing_file(path: str | os.PathLike, what: str) -> Path:
    """`path` as a Path if it is an existing file, else a UserError naming `what` it should have been."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{what} {p} does not exist (check the path)")
    if not p.is_file():
        raise UserError(f"{what} {p} is not a file (pass a file path)")
    return p


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks (bounded memory for multi-GB weights)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
