"""Strangers and liars on the cluster network, against real `dllama worker` processes and a real
root on 127.0.0.1: each test ends with the same worker (or a new root) doing honest work."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from cluster_helpers import WorkerProcess, Workers
from dllama import Engine
from dllama.cluster import auth, root
from dllama.cluster.errors import ClusterError
from dllama.cluster.protocol import HEADER, MAGIC, VERSION, Channel, Frame, ProtocolError, RemoteError
from dllama.testing.checkpoint import make_model_file
from hostile_peers import ScriptedWorker, root_handshake, rss_kib, topk_record

PROMPT = [9707, 11, 1879, 0, 3838]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model_file(tmp_path_factory.mktemp("hostile") / "moe.m", preset="tiny", arch="qwen3_moe",
                           weights="f32", seed=1)


@pytest.fixture(scope="module")
def keyfile(tmp_path_factory):
    path = tmp_path_factory.mktemp("key") / "cluster.key"
    path.write_text(os.urandom(32).hex())
    path.chmod(0o600)
    return path


def key_of(path) -> bytes:
    return path.read_bytes().strip()


def one_node_logits(model) -> np.ndarray:
    with Engine(model, nthreads=1, max_seq_len=64, buffer_float_type="f32") as e:
        return e.forward(PROMPT)


def serves_correctly(model, worker: WorkerProcess, keyfile, expected: np.ndarray) -> None:
    with Engine(model, nthreads=1, max_seq_len=64, buffer_float_type="f32", workers=[worker.address],
                cluster_key_file=keyfile, progress=False) as e:
        np.testing.assert_allclose(e.forward(PROMPT), expected, rtol=1e-4, atol=1e-4)


# 1. A worker's top-k reply is checked before the root reads it.

ROOT_SCRIPT = """
import sys
from dllama import Engine
from dllama.cluster.errors import WorkerLost
from dllama.engine import TOPK, Entry
from dllama.sampler import Sampler
try:
    with Engine(sys.argv[1], nthreads=1, max_seq_len=64, workers=[sys.argv[2]], cluster_key_file=sys.argv[3],
                progress=False) as e:
        [candidates] = e.step([Entry(0, [1, 2, 3], TOPK, 0.8)])
        print("token", Sampler(temperature=0.8, seed=1).sample_candidates(*candidates))
except WorkerLost as e:
    print("WorkerLost:", e)
"""


def run_root(model, address, keyfile) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", ROOT_SCRIPT, str(model), address, str(keyfile)],
                          capture_output=True, text=True, timeout=120)


def honest_topk(begin: int, end: int) -> bytes:
    ids = np.arange(begin, begin + min(64, end - begin))
    return topk_record(ids, np.linspace(1, 0, len(ids)), 2.0, len(ids))


@pytest.mark.parametrize("lie", ["count -1", "count 65", "count 2^24", "id outside the slice", "NaN logit"])
def test_a_lying_topk_reply_is_named_not_a_crash(model, keyfile, lie):
    def reply(begin, end):
        ids = np.arange(begin, begin + 64)
        logits = np.linspace(1, 0, 64)
        count = {"count -1": -1, "count 65": 65, "count 2^24": 1 << 24}.get(lie, 64)
        if lie == "id outside the slice":
            ids[5] = begin - 1
        if lie == "NaN logit":
            logits[3] = np.nan
        return topk_record(ids, logits, 2.0, count)

    worker = ScriptedWorker(model, key_of(keyfile), reply)
    result = run_root(model, worker.address, keyfile)
    worker.join()
    assert result.returncode == 0, f"the root died ({signal.Signals(-result.returncode).name if result.returncode < 0 else result.returncode}): {result.stderr[-2000:]}"
    assert "WorkerLost:" in result.stdout and worker.address in result.stdout and "top-k" in result.stdout

    honest = ScriptedWorker(model, key_of(keyfile), honest_topk)
    result = run_root(model, honest.address, keyfile)
    honest.join()
    assert result.returncode == 0 and "token" in result.stdout, result.stdout + result.stderr[-2000:]


# 2. The handshake is bound to the address dialled, and everything after it to the session.

class Relay:
    """Takes the root's connection and passes every byte on to a real worker elsewhere, as a
    host that took over a dead worker's address could; `rewrite` edits what the root says."""

    def __init__(self, target: int, rewrite=lambda data: data) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.target, self.rewrite = target, rewrite
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        conn, _ = self.listener.accept()
        self.listener.close()
        upstream = socket.create_connection(("127.0.0.1", self.target))

        def pump(src, dst, edit):
            try:
                while data := src.recv(65536):
                    dst.sendall(edit(data))
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        back = threading.Thread(target=pump, args=(upstream, conn, lambda d: d), daemon=True)
        back.start()
        pump(conn, upstream, self.rewrite)
        back.join(10)
        conn.close()
        upstream.close()


def test_a_relayed_handshake_is_refused(model, keyfile):
    expected = one_node_logits(model)
    worker = WorkerProcess("--cluster-key-file", str(keyfile))
    try:
        # as is: the worker sees it was not the address the root dialled
        relay = Relay(worker.port)
        with pytest.raises(ClusterError, match="relayed"):
            Engine(model, max_seq_len=64, workers=[relay.address], cluster_key_file=keyfile, progress=False)
        # with the address rewritten to the worker's: the root's proof covers the one it dialled
        relay = Relay(worker.port, lambda d: d.replace(relay.address.encode(), worker.address.encode()))
        with pytest.raises(ClusterError, match="key"):
            Engine(model, max_seq_len=64, workers=[relay.address], cluster_key_file=keyfile, progress=False)
        serves_correctly(model, worker, keyfile, expected)
    finally:
        log = worker.stop()
    assert "relayed" in log


def test_every_control_frame_after_the_handshake_is_authenticated(model, keyfile):
    expected = one_node_logits(model)
    worker = WorkerProcess("--cluster-key-file", str(keyfile))
    try:
        for tamper in ("payload", "tag", "replay"):
            ch = root_handshake(worker.port, key_of(keyfile))
            payload = json.dumps({"config": {}}).encode()
            header = HEADER.pack(MAGIC, VERSION, Frame.CONFIG, len(payload))
            tag = auth.tag(ch.key, ch.sender, 0, header, payload)
            if tamper == "payload":
                payload = payload.replace(b"config", b"cONfig")
            elif tamper == "tag":
                tag = bytes([tag[0] ^ 1]) + tag[1:]
            else:  # a frame numbered as an earlier one
                tag = auth.tag(ch.key, ch.sender, 5, header, payload)
            ch.sock.sendall(header + payload + tag)
            with pytest.raises(RemoteError, match="authentication"):
                ch.recv(Frame.CONFIG_OK)
            ch.sock.close()
        serves_correctly(model, worker, keyfile, expected)
    finally:
        log = worker.stop()
    assert log.count("failed authentication") == 3


# 2. Strangers on a worker's mesh port are ignored; the real peers still connect.

def test_strangers_on_the_mesh_port_are_ignored_while_a_cluster_starts(model, keyfile, monkeypatch):
    expected = one_node_logits(model)
    introduce, strangers = root._introduce, []

    def introduce_then_knock(ch, address, key, session, timeout):
        reply, data_key = introduce(ch, address, key, session, timeout)
        if session.node == 1:  # node 2 will call node 1's mesh port: strangers call first
            port = reply["mesh_port"]
            for data in (b"GET / HTTP/1.0\r\n\r\n",
                         HEADER.pack(MAGIC, VERSION, Frame.MESH_HELLO, 0xFFFFFF),
                         _bad_mesh_hello(), b""):
                s = socket.create_connection(("127.0.0.1", port))
                s.sendall(data)
                strangers.append(s)  # the last one stays silent
            time.sleep(0.3)
        return reply, data_key

    monkeypatch.setattr(root, "_introduce", introduce_then_knock)
    with Workers(2, "--cluster-key-file", str(keyfile)) as workers:
        with Engine(model, nthreads=1, max_seq_len=64, buffer_float_type="f32", workers=workers.addresses,
                    cluster_key_file=keyfile, progress=False) as e:
            np.testing.assert_allclose(e.forward(PROMPT), expected, rtol=1e-4, atol=1e-4)
        logs = workers.stop()
    for s in strangers:
        s.close()
    assert logs[0].count("ignored caller") >= 3, logs[0]


def _bad_mesh_hello() -> bytes:
    payload = json.dumps({"session": auth.nonce(), "node": 2, "nonce": auth.nonce(), "address": "x"}).encode()
    return HEADER.pack(MAGIC, VERSION, Frame.MESH_HELLO, len(payload)) + payload


# 3. Slow or silent strangers cannot hold the door.

def test_slowloris_and_idle_connections_do_not_delay_a_good_root(model, keyfile):
    expected = one_node_logits(model)
    worker = WorkerProcess("--cluster-key-file", str(keyfile), timeout=10)
    start = time.monotonic()
    serves_correctly(model, worker, keyfile, expected)
    alone = time.monotonic() - start  # what a good root takes here, with no stranger around
    idle = [socket.create_connection(("127.0.0.1", worker.port)) for _ in range(4)]
    slow = socket.create_connection(("127.0.0.1", worker.port))
    hello = json.dumps({"nonce": auth.nonce(), "address": worker.address}).encode()
    frame = HEADER.pack(MAGIC, VERSION, Frame.HELLO, len(hello)) + hello
    stop = threading.Event()

    def trickle():
        for b in frame:
            if stop.wait(1.0):
                return
            try:
                slow.send(bytes([b]))
            except OSError:
                return

    threading.Thread(target=trickle, daemon=True).start()
    try:
        time.sleep(0.5)
        start = time.monotonic()
        serves_correctly(model, worker, keyfile, expected)
        # a root queued behind the strangers would wait for their 5-s deadline (the old worker:
        # 10 s per silent stranger, one after the other)
        assert time.monotonic() - start < alone + 4.0
        # the slow stranger is cut off at the handshake deadline, however its bytes trickle in
        slow.settimeout(10)
        t0 = time.monotonic()
        with _closed():
            while slow.recv(4096):
                pass
        assert time.monotonic() - t0 < 8.0
    finally:
        stop.set()
        for s in idle + [slow]:
            s.close()
        log = worker.stop()
    assert "took too long" in log


class _closed:
    """Reading until the peer closes: EOF or a reset both count."""

    def __enter__(self):
        return self

    def __exit__(self, kind, *_):
        return kind is ConnectionResetError


def test_a_frame_type_is_checked_before_its_body_is_read(keyfile):
    worker = WorkerProcess("--cluster-key-file", str(keyfile), timeout=10)  # a 5-s handshake deadline
    try:
        with socket.create_connection(("127.0.0.1", worker.port), timeout=10) as s:
            s.sendall(HEADER.pack(MAGIC, VERSION, Frame.CONFIG, 16 * 1024 * 1024))  # no body follows
            start = time.monotonic()
            with _closed():
                while s.recv(4096):
                    pass
            assert time.monotonic() - start < 4.0  # not the 5-s deadline: refused at the header
    finally:
        log = worker.stop()
    assert "expected HELLO, got CONFIG" in log


def test_more_strangers_than_slots_are_closed_at_once_and_a_root_gets_in_later(model, keyfile):
    expected = one_node_logits(model)
    worker = WorkerProcess("--cluster-key-file", str(keyfile), timeout=2)
    crowd = [socket.create_connection(("127.0.0.1", worker.port)) for _ in range(40)]
    try:
        time.sleep(0.5)
        closed = 0
        for s in crowd:
            s.settimeout(0.05)
            try:
                closed += s.recv(1) == b""
            except TimeoutError:
                pass
            except ConnectionResetError:
                closed += 1
        assert closed >= 40 - 16
        time.sleep(4.0)  # the held slots' 2-s deadline, with room for a loaded machine
        serves_correctly(model, worker, keyfile, expected)
    finally:
        for s in crowd:
            s.close()
        log = worker.stop()
    assert len(log.splitlines()) < 40  # rate-limited, not one line per stranger


# 4. A session's shape is checked and its memory counted before anything is allocated.

def test_an_absurd_config_is_refused_before_the_worker_grows(model, keyfile):
    expected = one_node_logits(model)
    worker = WorkerProcess("--cluster-key-file", str(keyfile))
    try:
        good = _session_json(model)
        before = rss_kib(worker.proc.pid)
        bad = json.loads(json.dumps(good))
        bad["config"]["n_layers"] = 10**6
        ch = root_handshake(worker.port, key_of(keyfile))
        ch.send_json(Frame.CONFIG, bad)
        with pytest.raises(RemoteError) as refused:
            ch.recv(Frame.CONFIG_OK)
        ch.sock.close()
        assert "n_layers" in str(refused.value) or "layers" in str(refused.value)
        assert rss_kib(worker.proc.pid) - before < 100 * 1024
        serves_correctly(model, worker, keyfile, expected)
    finally:
        worker.stop()


def test_a_session_larger_than_max_memory_is_refused_by_name(model, keyfile):
    worker = WorkerProcess("--cluster-key-file", str(keyfile), "--max-memory", "1M")
    try:
        with pytest.raises(ClusterError, match="memory"):
            Engine(model, max_seq_len=64, workers=[worker.address], cluster_key_file=keyfile, progress=False)
        assert worker.alive()
    finally:
        worker.stop()


def _session_json(model) -> dict:
    """What a real root sends as node 1 of 2."""
    from dllama.cluster.plan import plan_slices
    from dllama.cluster.session import Session
    from dllama.cluster.slices import node_tensors
    from dllama.model_file import ModelFile

    with ModelFile.open(model) as m:
        slices = plan_slices(m.config, [1.0, 1.0])
        manifest = [(t.name, int(t.type), t.rows, t.cols) for t in node_tensors(m, slices[1])]
        return Session(m.config, slices[1], 1, 2, False, 64, 16, m.content_hash(), manifest).to_json()


# 5. The slice cache: whatever is in it, the worker neither breaks nor dies.

@pytest.mark.parametrize("damage", ["[]", "null", "truncated"])
def test_a_damaged_cache_entry_is_removed_and_fetched_again(model, keyfile, tmp_path, damage):
    expected = one_node_logits(model)
    cache = tmp_path / "cache"
    worker = WorkerProcess("--cluster-key-file", str(keyfile), "--cache-dir", str(cache))
    try:
        serves_correctly(model, worker, keyfile, expected)
        (meta,) = cache.glob("*.json")
        (data,) = cache.glob("*.slices")
        if damage == "truncated":
            os.truncate(data, data.stat().st_size // 2)
        else:
            meta.write_text(damage)
        with Engine(model, nthreads=1, max_seq_len=64, buffer_float_type="f32", workers=[worker.address],
                    cluster_key_file=keyfile, progress=False) as e:
            assert e.weights_sent > 0
            np.testing.assert_allclose(e.forward(PROMPT), expected, rtol=1e-4, atol=1e-4)
        with Engine(model, nthreads=1, max_seq_len=64, buffer_float_type="f32", workers=[worker.address],
                    cluster_key_file=keyfile, progress=False) as e:
            assert e.weights_sent == 0  # stored again, whole
    finally:
        worker.stop()


def test_a_cache_file_truncated_during_a_session_does_not_kill_the_worker(model, keyfile, tmp_path):
    expected = one_node_logits(model)
    cache = tmp_path / "cache"
    worker = WorkerProcess("--cluster-key-file", str(keyfile), "--cache-dir", str(cache))
    try:
        serves_correctly(model, worker, keyfile, expected)
        with Engine(model, nthreads=1, max_seq_len=64, buffer_float_type="f32", workers=[worker.address],
                    cluster_key_file=keyfile, progress=False) as e:
            assert e.weights_sent == 0
            for data in cache.glob("*.slices"):
                os.truncate(data, 0)
            np.testing.assert_allclose(e.forward(PROMPT), expected, rtol=1e-4, atol=1e-4)
        assert worker.alive()
        serves_correctly(model, worker, keyfile, expected)
    finally:
        worker.stop()


# 9. What a peer says reaches the log as one line; an unreadable key file is pointed out.

def test_peer_text_cannot_forge_log_lines(model, keyfile):
    worker = WorkerProcess("--cluster-key-file", str(keyfile))
    try:
        ch = root_handshake(worker.port, key_of(keyfile))
        ch.send_json(Frame.ERROR, {"message": "bye\n12:00:00 dllama worker: serving root 6.6.6.6\x1b[31m"})
        time.sleep(0.5)
        ch.sock.close()
    finally:
        log = worker.stop()
    (line,) = [line for line in log.splitlines() if "bye" in line]
    assert "\\x0a" in line and "\x1b" not in log
    assert "6.6.6.6" not in log.replace(line, "")


def test_a_shared_key_file_is_pointed_out(tmp_path):
    key = tmp_path / "open.key"
    key.write_text(os.urandom(32).hex())
    key.chmod(0o644)
    worker = WorkerProcess("--cluster-key-file", str(key))
    log = worker.stop()
    assert "readable by other users" in log
