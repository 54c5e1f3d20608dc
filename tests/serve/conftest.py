"""A real `python -m serve` process on 127.0.0.1 (port 0: the OS picks a free one, the server prints it), driven by
real clients and stopped by SIGTERM. Every wait is bounded."""
from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 180  # cold imports on a loaded 2-core machine can take a while
READY = re.compile(r"listening on (http://127\.0\.0\.1:\d+)")


class ServerProcess:
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


@pytest.fixture(scope="session")
def tiny_server(tiny_ckpt):
    """The torch backend on the tiny checkpoint, shared by the read-only server tests."""
    srv = ServerProcess(tiny_ckpt, "--max-batch-size", "8", "--max-queue", "32", "--model-name", "tiny")
    yield srv
    rc = srv.terminate()
    assert rc == 0, srv.output()


@pytest.fixture(scope="session")
def tiny_onnx(tiny_ckpt, tmp_path_factory):
    """The tiny checkpoint exported by export/ (KV-cache decoder, fp32); its validation is export's tests' job."""
    from export.to_onnx import export_onnx

    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    export_onnx(tiny_ckpt, out, validate=False)
    return out


# Iterating on these tests without retraining: HOTPATH_TINY_CKPT=path/to/tiny.pt (trained with the same flags as
# tests/conftest.py's tiny_ckpt) replaces the session's freshly trained tiny checkpoint for tests/serve only.
_PRETRAINED_TINY = os.environ.get("HOTPATH_TINY_CKPT")
if _PRETRAINED_TINY:
    @pytest.fixture(scope="session")
    def tiny_ckpt():
        return Path(_PRETRAINED_TINY)
