"""The cluster's TCP connections and weight digest, each set in one place: every connection of a
running cluster (the root's and every worker's) has keepalive with the values of
dllama.cluster.sockets, and the weight digest the worker checks is the one its cache keeps."""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from cluster_helpers import Workers
from dllama import Engine
from dllama.cluster.digest import digest_of, weight_digest
from dllama.cluster.sockets import KEEPALIVE_COUNT, KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, keepalive
from dllama.testing.checkpoint import make_model_file

ESTABLISHED = "01"
KEEPALIVE_TIMER = 2  # /proc/net/tcp's "tr": the socket's keepalive timer is armed


def test_keepalive_sets_the_cluster_values():
    with socket.create_server(("127.0.0.1", 0)) as listener, \
            socket.create_connection(listener.getsockname()) as sock:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
        keepalive(sock)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == KEEPALIVE_IDLE_S
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == KEEPALIVE_INTERVAL_S
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == KEEPALIVE_COUNT


def connections(pid: int) -> list[tuple[int, str, float]]:
    """(remote port, timer kind, seconds until the timer fires) of every established TCP
    connection process `pid` holds, from /proc (no help from the process itself)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    tick = os.sysconf("SC_CLK_TCK")
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == ESTABLISHED and f[9] in inodes:
                timer, when = f[5].split(":")
                out.append((int(f[2].rsplit(":", 1)[1], 16), timer, int(when, 16) / tick))
    return out


def cluster_connections(workers: Workers) -> list[tuple[int, str, float]]:
    """The root's connections to the workers, then every worker's."""
    ports = {w.port for w in workers.list}
    found = [c for c in connections(os.getpid()) if c[0] in ports]
    assert len(found) == len(ports), found  # one to each worker
    for w in workers.list:
        links = connections(w.proc.pid)
        assert len(links) == len(ports), links  # the root and every other worker
        found += links
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux's /proc/net/tcp")
def test_every_cluster_connection_has_keepalive(tmp_path):
    model = make_model_file(tmp_path / "m.m", preset="tiny", arch="qwen3", weights="f32", seed=2)
    with Workers(2) as workers, Engine(model, nthreads=1, max_seq_len=64, workers=workers.addresses,
                                      progress=False) as engine:
        engine.forward([1, 2, 3])
        # once the step's last bytes are acknowledged (delayed ACKs: well under a second), an
        # idle link has only its keepalive timer armed
        deadline = time.monotonic() + 10
        while any(int(timer, 16) != KEEPALIVE_TIMER for _, timer, _ in cluster_connections(workers)) \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        found = cluster_connections(workers)
    for port, timer, seconds in found:
        assert int(timer, 16) == KEEPALIVE_TIMER, (port, timer)
        assert seconds <= KEEPALIVE_IDLE_S, (port, seconds)  # the system default would be 2 hours


def test_the_digest_of_a_buffer_is_the_digest_of_its_pieces_in_order():
    data = np.random.default_rng(0).integers(0, 256, size=3 * 4096 + 17, dtype=np.uint8)
    pieces = weight_digest()
    for at in range(0, len(data), 4096):
        pieces.update(data[at:at + 4096])
    assert digest_of(data) == pieces.hexdigest()
    assert len(bytes.fromhex(digest_of(data))) == 32
    data[-1] ^= 1
    assert digest_of(data) != pieces.hexdigest()
