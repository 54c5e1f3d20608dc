"""`python bench/peers_install.py`: install hotpath and then each package of its `peers` extra one by one into the
running interpreter's environment (`make bench-peers` runs it in .venv-peers), so one peer that fails to build or
install costs its own rows only. Writes `<venv>/peers-install.json` ({package: null or the reason}), which
`python -m bench.peers` reports. Standard library only: it runs before hotpath is installed.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "install", "-q", *args], capture_output=True, text=True)


def main() -> int:
    peers = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["peers"]
    print(f"installing hotpath into {sys.prefix}", flush=True)
    base = pip("-e", str(ROOT))
    if base.returncode:
        print(base.stderr[-2000:], file=sys.stderr)
        return 1
    # all together first (pip resolves the pins jointly); package by package only if that fails
    failed: dict[str, str | None] = {}
    print(f"installing the peers: {' '.join(peers)} (llama-cpp-python compiles llama.cpp unless pip has the "
          "wheel cached)", flush=True)
    together = pip(*peers)
    for req in peers:
        if together.returncode == 0:
            failed[req] = None
            continue
        one = pip(req)
        lines = [ln for ln in one.stderr.splitlines() if ln.strip()] or ["?"]
        failed[req] = None if one.returncode == 0 else f"pip install {req} failed: {lines[-1][:300]}"
        print(f"{req}: {'ok' if failed[req] is None else failed[req]}", flush=True)
    out = Path(sys.prefix) / "peers-install.json"
    out.write_text(json.dumps(failed, indent=1) + "\n")
    print(f"peers installed: {sum(v is None for v in failed.values())}/{len(failed)} ({out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
