"""A real `python -m serve` process on 127.0.0.1 for the serving benchmark and the profiler (port chosen by the OS)."""
from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
import time
from typing import Iterator

from model.cli import UserError

READY = re.compile(r"listening on (http://127\.0\.0\.1:\d+)")


@contextlib.contextmanager
def running_server(model, *args: str, start_timeout: float = 180) -> Iterator[tuple[str, subprocess.Popen]]:
    """Start the server, yield (base URL, process) once it listens, stop it with SIGTERM (bounded waits)."""
    proc = subprocess.Popen([sys.executable, "-m", "serve", str(model), "--host", "127.0.0.1", "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, seen, deadline = None, [], time.monotonic() + start_timeout
        while url is None:
            line = proc.stdout.readline()
            if not line:
                raise UserError(f"the server exited before listening: {' | '.join(seen[-3:])}")
            seen.append(line.strip())
            if m := READY.search(line):
                url = m.group(1)
            elif time.monotonic() > deadline:
                raise UserError(f"the server did not listen within {start_timeout:.0f} s")
        # keep draining its output so a chatty server never blocks on a full pipe
        import threading

        threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
