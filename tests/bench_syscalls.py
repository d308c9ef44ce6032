"""System calls a worker makes per decode token (perf's syscall tracepoints; root): root and one
worker on loopback over the `sync` preset (bench_cluster.py's network-only model), counted over
8 and over 40 decode tokens, the difference per token (loading and the prompt cancel out).
Per token the worker runs 2 all-reduces per layer, waits for the step and sends its reply.
Counts, not times: a busy machine changes them little.

    sudo .venv/bin/python tests/bench_syscalls.py
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_cluster import model_path  # noqa: E402
from cluster_helpers import free_port  # noqa: E402

SYSCALLS = ("poll", "ppoll", "sendmsg", "recvmsg", "sendto", "recvfrom")
SHORT, LONG = 8, 40


def wait_listening(port: int, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError("the worker did not listen") from None
            time.sleep(0.1)


def count(model: Path, tokens: int, workdir: Path) -> dict[str, int]:
    from dllama import Engine
    from dllama.engine import TOPK, Entry

    port, out = free_port(), workdir / f"perf-{tokens}.txt"
    perf = subprocess.Popen(
        ["perf", "stat", "-x,", "-o", str(out), "-e", ",".join(f"syscalls:sys_enter_{s}" for s in SYSCALLS), "--",
         sys.executable, "-m", "dllama", "worker", "--host", "127.0.0.1", "--port", str(port), "--nthreads", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port)
        with Engine(model, nthreads=1, max_seq_len=128, workers=[f"127.0.0.1:{port}"], progress=False) as engine:
            engine.reset(0)
            out_ = engine.step([Entry(0, [1, 2, 3], TOPK, 0.0)])[0]
            for _ in range(tokens):
                out_ = engine.step([Entry(0, [int(out_.ids[0])], TOPK, 0.0)])[0]
    finally:
        # the worker is perf's child: ended, it lets perf write its counts
        children = subprocess.run(["pgrep", "-P", str(perf.pid)], capture_output=True, text=True).stdout.split()
        for pid in children:
            subprocess.run(["kill", "-TERM", pid])
        perf.wait(timeout=60)
    counts = {}
    for line in out.read_text().splitlines():
        fields = line.split(",")
        if len(fields) > 2 and fields[2].startswith("syscalls:sys_enter_"):
            counts[fields[2].removeprefix("syscalls:sys_enter_")] = int(fields[0])
    return counts


def main() -> None:
    if shutil.which("perf") is None:
        sys.exit("perf not found (Debian: linux-perf)")
    model = model_path("sync", 8)
    with tempfile.TemporaryDirectory() as tmp:
        short, long = count(model, SHORT, Path(tmp)), count(model, LONG, Path(tmp))
    per_token = {s: (long.get(s, 0) - short.get(s, 0)) / (LONG - SHORT) for s in SYSCALLS}
    print("worker system calls per decode token (8 layers: 16 all-reduces, the step, the reply): "
          + ", ".join(f"{s} {n:.1f}" for s, n in per_token.items() if abs(n) >= 0.5) + f"; total {sum(per_token.values()):.1f}")


if __name__ == "__main__":
    main()
