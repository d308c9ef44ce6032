"""Real `dllama worker` processes on 127.0.0.1 for the cluster tests."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerProcess:
    def __init__(self, *extra: str, nthreads: int = 1, timeout: float = 3.0) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dllama", "worker", "--host", "127.0.0.1", "--port", str(self.port),
             "--nthreads", str(nthreads), "--timeout", str(timeout), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.wait_listening()

    def wait_listening(self, seconds: float = 30) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    pass
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"worker exited: {self.proc.stderr.read()}") from None
                time.sleep(0.1)
                continue
            return
        raise RuntimeError("worker did not listen in time")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> str:
        """Ends the process and returns its log (stderr)."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err


class Workers:
    def __init__(self, n: int, *extra: str, **kw) -> None:
        self.list = [WorkerProcess(*extra, **kw) for _ in range(n)]

    @property
    def addresses(self) -> list[str]:
        return [w.address for w in self.list]

    def stop(self) -> list[str]:
        return [w.stop() for w in self.list]

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
