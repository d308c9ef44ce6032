"""`dllama-api` over a real two-node cluster on 127.0.0.1: a `dllama worker` process is killed
while every sequence slot is generating, and restarted; the server fails what was running, rides
the loss out without a restart, and serves every slot again.

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

# the same server, over a cluster
from test_api import CONTEXT, MESSAGES, PARALLEL, _free_port, start_server, stop_server, wait_for_queue

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


def ask_at_once(srv, n: int, **kwargs) -> list:
    """n chat requests sent together from threads: their responses (or errors), in order."""
    out: list = [None] * n

    def ask(i: int) -> None:
        try:
            out[i] = srv.chat(**kwargs)
        except Exception as e:  # noqa: BLE001 - the caller looks at it
            out[i] = e

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return out


def test_a_lost_worker_fails_every_running_request_and_every_slot_recovers(cluster):
    srv, worker = cluster
    address = f"127.0.0.1:{worker.port}"
    health = srv.health().json()
    assert health["workers"] == [{"address": address, "up": True}]
    before = srv.chat(max_tokens=REPLY_TOKENS).choices[0].message.content

    # every slot generating (streams and one whole reply), one request waiting behind them
    streams = [srv.chat([{"role": "user", "content": f"Say {i} forever."}], max_tokens=CONTEXT - 100, stream=True)
               for i in range(PARALLEL - 1)]
    for stream in streams:
        next(iter(stream))
    answers: dict[str, httpx.Response] = {}

    def post(name: str, max_tokens: int) -> None:
        answers[name] = srv.http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": max_tokens})

    posts = [threading.Thread(target=post, args=("whole", CONTEXT - 100))]
    posts[0].start()
    wait_for_queue(srv, running=PARALLEL, waiting=0)
    posts.append(threading.Thread(target=post, args=("waiting", 2)))
    posts[1].start()
    wait_for_queue(srv, running=PARALLEL, waiting=1)

    worker.kill()
    for stream in streams:
        with pytest.raises(openai.APIError) as error:
            for _ in stream:
                pass
        assert address in str(error.value)
    for t in posts:
        t.join(timeout=30)
    for name in ("whole", "waiting"):
        assert answers[name].status_code == 503 and answers[name].headers["Retry-After"], name
    assert address in answers["whole"].json()["error"]["message"]

    down = srv.health()
    assert down.status_code == 503
    assert address in down.json()["reason"]
    assert down.json()["workers"] == [{"address": address, "up": False}]
    assert down.json()["queue"]["running"] == 0
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
    again = srv.chat(max_tokens=REPLY_TOKENS)
    assert again.usage.prompt_tokens_details.cached_tokens == 0  # no slot trusts what the lost engine held
    assert again.choices[0].message.content == before
    # every slot at once: each gives the answer one gave before the loss
    replies = ask_at_once(srv, PARALLEL, max_tokens=REPLY_TOKENS)
    assert [r.choices[0].message.content for r in replies] == [before] * PARALLEL, replies
    assert srv.process.poll() is None
