"""Peers that speak the cluster protocol from a script, built on the package's own framing and
key rules (dllama.cluster.protocol and auth): a root that can send what a real root never would,
and a worker that joins a real root and then answers a step with what it likes."""
from __future__ import annotations

import socket
import struct
import threading
from pathlib import Path

import numpy as np

from dllama.cluster import auth
from dllama.cluster.protocol import WEIGHT_HEADER, Channel, Frame, ProtocolError
from dllama.cluster.root import ROOT, WORKER
from dllama.model_file import ModelFile

# the data plane's step (native/cluster.h): a header, then its entries and tokens in one message
STEP_MAGIC = 0x5354504C
STEP_HEADER = struct.Struct("<Iiii")  # magic, stop, n_entries, n_tokens
STEP_ENTRY = struct.Struct("<iiiif")  # seq, pos, n_tokens, output, temperature
NONE, LOGITS, CANDIDATES = 0, 1, 2  # an entry's output
TOPK = 64


def step_message(tokens, output: int, temperature: float = 1.0, pos: int = 0, seq: int = 0) -> tuple[bytes, bytes]:
    """A one-entry step as a root sends it: (header, body)."""
    tokens = np.asarray(tokens, dtype=np.int32)
    return (STEP_HEADER.pack(STEP_MAGIC, 0, 1, tokens.size),
            STEP_ENTRY.pack(seq, pos, tokens.size, output, temperature) + tokens.tobytes())


STOP_MESSAGE = STEP_HEADER.pack(STEP_MAGIC, 1, 0, 0)


def read_step(recv) -> tuple[list[tuple[int, int, int, int, float]], np.ndarray] | None:
    """A step off the data plane through recv(n) (one message each call): its entries and tokens,
    or None for the root's stop."""
    _magic, stop, n_entries, n_tokens = STEP_HEADER.unpack(recv(STEP_HEADER.size))
    if stop:
        return None
    body = recv(n_entries * STEP_ENTRY.size + 4 * n_tokens)
    entries = [STEP_ENTRY.unpack_from(body, i * STEP_ENTRY.size) for i in range(n_entries)]
    return entries, np.frombuffer(body[n_entries * STEP_ENTRY.size:], dtype=np.int32)


def core_step(core, tokens, pos: int, output: int, temperature: float = 1.0, seq: int = 0):
    """A native core's step of one entry: None, the logits, or the nodes' top-k parts."""
    return core.step(np.array([seq]), np.array([pos]), np.array([len(tokens)]), np.asarray(tokens),
                     np.array([int(output)]), np.array([temperature], dtype=np.float32))[0]


def rss_kib(pid: int, field: str = "VmHWM") -> int:
    """A process's peak (VmHWM) or current (VmRSS) resident memory."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


def root_handshake(port: int, key: bytes, host: str = "127.0.0.1", address: str | None = None) -> Channel:
    """Connects to a worker and proves `key`: an authenticated channel (or ProtocolError)."""
    sock = socket.create_connection((host, port), timeout=5)
    ch = Channel(sock, sender=ROOT, peer=WORKER)
    dialled = address or auth.endpoint(sock.getpeername())
    root_nonce = auth.nonce()
    ch.send_json(Frame.HELLO, {"nonce": root_nonce, "address": dialled})
    worker_nonce = ch.recv_json(Frame.CHALLENGE)["nonce"]
    fields = (root_nonce, worker_nonce, dialled)
    ch.send_json(Frame.AUTH, {"proof": auth.proof(key, "root proof", *fields)})
    reply = ch.recv_json(Frame.AUTH_OK)
    assert auth.check(key, reply.get("proof"), "worker proof", *fields)
    ch.authenticate(auth.session_keys(key, *fields)[0])
    return ch


class DataPlane:
    """A worker's end of its link to the root, tags as native/net.cpp writes them."""

    def __init__(self, sock: socket.socket, key: bytes | None, node: int) -> None:
        self.sock, self.key, self.node = sock, key, node
        self.sent = self.received = 0

    def recv(self, n: int) -> bytes:
        data = self._exact(n)
        if self.key is not None:
            tag = self._exact(auth.TAG_BYTES)
            assert tag == auth.tag(self.key, ROOT, self.received, data), "the root's tag does not verify"
            self.received += 1
        return data

    def send(self, data: bytes) -> None:
        if self.key is not None:
            data += auth.tag(self.key, self.node, self.sent, data)
            self.sent += 1
        self.sock.sendall(data)

    def _exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("the root closed the data plane")
            buf += chunk
        return buf


class ScriptedWorker:
    """Joins a real root as its only worker (node 1 of 2) and answers the first step that asks
    for top-k candidates with `topk(vocab_begin, vocab_end)` (the record's raw 520 bytes)."""

    def __init__(self, model: str | Path, key: bytes, topk) -> None:
        with ModelFile.open(model) as m:
            self.dim, self.layers = m.config.dim, m.config.n_layers
        self.key, self.topk = key, topk
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
            with conn:
                self._session(conn)
        except (OSError, ProtocolError, ConnectionError) as e:
            self.error = e

    def _session(self, conn: socket.socket) -> None:
        ch, data_key = worker_handshake(conn, self.key)
        config = ch.recv_json(Frame.CONFIG)
        vocab_begin, vocab_end = config["slice"]["vocab"]
        with socket.create_server(("127.0.0.1", 0)) as mesh:  # no other worker calls it
            ch.send_json(Frame.CONFIG_OK, {"cached": False, "mesh_port": mesh.getsockname()[1]})
            while ch.recv(Frame.WEIGHTS, Frame.WEIGHTS_DONE)[0] == Frame.WEIGHTS:
                pass
            ch.recv_json(Frame.MESH)
            ch.send(Frame.READY)
        data = DataPlane(conn, data_key if config.get("data_mac", True) else None, 1)
        q80 = config["q80"]
        while True:
            step = read_step(data.recv)
            if step is None:
                return
            entries, tokens = step
            n, output = tokens.size, entries[0][3]
            row = self.dim // 32 * 34 if q80 else self.dim * 4
            zeros = bytes(row * n) if not q80 else b"".join(_q80_zero_row(self.dim) for _ in range(n))
            for _ in range(2 * self.layers):
                data.recv(len(zeros))
                data.send(zeros)
            if output == 2:
                data.send(self.topk(vocab_begin, vocab_end))
                return

    def join(self) -> None:
        self.thread.join(timeout=30)
        self.listener.close()


def worker_handshake(conn: socket.socket, key: bytes) -> tuple[Channel, bytes]:
    """A worker's side of the handshake with a real root: the authenticated channel and the
    data-plane key."""
    conn.settimeout(10)
    ch = Channel(conn, sender=WORKER, peer=ROOT)
    hello = ch.recv_json(Frame.HELLO)
    here, mine = auth.endpoint(conn.getsockname()), auth.nonce()
    ch.send_json(Frame.CHALLENGE, {"nonce": mine})
    fields = (hello["nonce"], mine, here)
    ch.recv_json(Frame.AUTH)
    ch.send_json(Frame.AUTH_OK, {"proof": auth.proof(key, "worker proof", *fields)})
    control_key, data_key = auth.session_keys(key, *fields)
    ch.authenticate(control_key)
    return ch, data_key


class StatsWorker:
    """Answers a real root's STATS connections (as many as it opens) with `answer(ch)`: it has
    just read the root's STATS frame and may send what it likes, or nothing."""

    def __init__(self, key: bytes, answer) -> None:
        self.key, self.answer = key, answer
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.listener.settimeout(0.1)
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.closed.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            with conn:
                try:
                    ch, _ = worker_handshake(conn, self.key)
                    ch.recv(Frame.STATS)
                    self.answer(ch)
                except (OSError, ProtocolError):
                    pass

    def close(self) -> None:
        self.closed.set()
        self.thread.join(timeout=10)
        self.listener.close()


def _q80_zero_row(dim: int) -> bytes:
    return bytes(dim // 32 * 34)  # scale 0 (fp16), all quants 0


def topk_record(ids, logits, log_norm: float, count: int) -> bytes:
    ids = np.resize(np.asarray(ids, dtype=np.int32), TOPK)
    logits = np.resize(np.asarray(logits, dtype=np.float32), TOPK)
    return ids.tobytes() + logits.tobytes() + struct.pack("<fi", log_norm, count)
