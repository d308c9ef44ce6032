"""`dllama-api` over a real two-node cluster on 127.0.0.1: a `dllama worker` process is killed
mid-generation and restarted, and the server rides it out without a restart.

The tiny model is converted with f32 weights: its 32-wide expert slices cannot be cut into two
whole Q40 blocks.
"""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from dllama.convert import convert
from dllama.testing.checkpoint import make_checkpoint

from test_api import CONTEXT, MESSAGES, _free_port, start_server, stop_server  # the same server, over a cluster

REPLY_TOKENS = 8


def _worker_command() -> list[str]:
    script = Path(sys.executable).with_name("dllama")
    return [str(script)] if script.exists() else [sys.executable, "-m", "dllama"]


class Worker:
    def __init__(self, root: Path, port: int, key_file: Path) -> None:
        self.root, self.port, self.key_file = root, port, key_file
        self.process: subprocess.Popen | None = None
        self.runs = 0

    def start(self) -> None:
        self.runs += 1
        log = open(self.root / f"worker-{self.runs}.log", "w")  # noqa: SIM115 - the process owns it
        self.process = subprocess.Popen(
            [*_worker_command(), "worker", "--host", "127.0.0.1", "--port", str(self.port), "--nthreads", "1",
             "--cluster-key-file", self.key_file, "--cache-dir", self.root / "slices"],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 30
        while True:  # listening?
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                assert self.process.poll() is None, (self.root / f"worker-{self.runs}.log").read_text()
                assert time.monotonic() < deadline, "the worker did not start listening"
                time.sleep(0.05)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("api-cluster")
    hf = make_checkpoint(root / "hf", preset="tiny", arch="qwen3_moe", seed=2)
    model = root / "tiny-f32.m"
    convert(hf, model, weights="f32", progress=False)
    key_file = root / "cluster-key"
    key_file.write_text("a cluster key for the test, long enough\n")
    key_file.chmod(0o600)
    worker = Worker(root, _free_port(), key_file)
    worker.start()
    srv = None
    try:
        srv = start_server((hf, model), root, "--workers", f"127.0.0.1:{worker.port}", "--cluster-key-file",
                           str(key_file))
        yield srv, worker
    finally:
        if srv is not None and srv.process.poll() is None:
            stop_server(srv)
        worker.stop()


def test_a_lost_worker_fails_requests_names_itself_and_the_server_reconnects(cluster):
    srv, worker = cluster
    address = f"127.0.0.1:{worker.port}"
    health = srv.health().json()
    assert health["workers"] == [{"address": address, "up": True}]
    before = srv.chat(max_tokens=REPLY_TOKENS).choices[0].message.content

    # one request generating (a stream), one waiting behind it
    stream = srv.chat(max_tokens=CONTEXT - 100, stream=True)
    next(iter(stream))
    queued: dict[str, httpx.Response] = {}
    waiting = threading.Thread(target=lambda: queued.update(r=srv.http.post(
        "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2})))
    waiting.start()
    deadline = time.monotonic() + 10
    while srv.health().json()["queue"]["waiting"] != 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)

    worker.kill()
    with pytest.raises(openai.APIError) as error:
        for _ in stream:
            pass
    assert address in str(error.value)
    waiting.join(timeout=30)
    assert queued["r"].status_code == 503 and queued["r"].headers["Retry-After"]

    down = srv.health()
    assert down.status_code == 503
    assert address in down.json()["reason"]
    assert down.json()["workers"] == [{"address": address, "up": False}]
    assert srv.metric("dllama_worker_up", address=address) == 0 and srv.metric("dllama_cluster_up") == 0
    with pytest.raises(openai.APIStatusError) as refused:
        srv.chat(max_tokens=1)
    assert refused.value.status_code == 503

    worker.start()  # what systemd's Restart=always does
    deadline = time.monotonic() + 30
    while srv.health().status_code != 200:
        assert time.monotonic() < deadline, srv.health().json()
        time.sleep(0.1)
    assert srv.metric("dllama_worker_up", address=address) == 1
    assert srv.chat(max_tokens=REPLY_TOKENS).choices[0].message.content == before
    assert srv.process.poll() is None
