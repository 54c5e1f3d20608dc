"""Helpers shared by test modules (imported as `tests.helpers`; conftest files hold only fixtures and hooks)."""
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


# ------------------------------------------------------------------------------------------------ peers
def genai_greedy(folder, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy tokens from ONNX Runtime GenAI's Generator on the model in `folder` (its genai_config.json as written,
    no edits); the caller has checked that onnxruntime_genai imports."""
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([prompt], dtype=np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    return [int(t) for t in gen.get_sequence(0)[len(prompt):]]
