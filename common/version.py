"""The hotpath version, from the installed distribution or, in a bare source tree, from pyproject.toml."""
from __future__ import annotations

import functools
from pathlib import Path


@functools.cache
def hotpath_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hotpath")
    except PackageNotFoundError:
        pass
    try:
        import tomllib

        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        return str(tomllib.loads(pyproject.read_text())["project"]["version"])
    except (OSError, KeyError, ValueError):
        return "unknown"
