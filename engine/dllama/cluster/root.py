"""The root's side of the control plane: connect to every worker, prove the key, send each its
slice of the weights (unless its cache has them), and wire the mesh."""
from __future__ import annotations

import socket
from dataclasses import dataclass

from ..model_file import ModelFile
from ..progress import byte_bar
from . import auth
from .digest import weight_digest
from .errors import ClusterError
from .plan import NodeSlice
from .protocol import WEIGHT_CHUNK, WEIGHT_HEADER, Channel, Frame, ProtocolError
from .session import Session
from .slices import TensorSlice, node_tensors, slice_bytes
from .sockets import keepalive

CONNECT_TIMEOUT = 10.0
# A worker answers CONFIG after checking its slice cache's digest and READY after building its
# model: seconds per GB on a board, so those two waits get longer than the others.
PREPARE_TIMEOUT = 300.0
# The ends of a root-worker connection in its frames' tags.
ROOT, WORKER = 0, 1


@dataclass(frozen=True)
class WorkerAddress:
    host: str
    port: int
    weight: float = 1.0

    @classmethod
    def parse(cls, text: str) -> WorkerAddress:
        """`host:port` or `host:port@weight` (a node's share follows its weight)."""
        spec, _, weight = text.partition("@")
        host, sep, port = spec.rpartition(":")
        try:
            w = float(weight) if weight else 1.0
            p = int(port)
        except ValueError:
            raise ValueError(f"worker address {text!r} is not host:port or host:port@weight") from None
        if not sep or not host or not 0 < p < 65536 or not w > 0:
            raise ValueError(f"worker address {text!r} is not host:port or host:port@weight")
        return cls(host.strip("[]"), p, w)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Connected:
    """The cluster as the root's data plane takes it over: one socket and one data-plane key per
    node (node 0, the root itself: -1 and b""), their names, and the weight bytes sent."""

    fds: list[int]
    keys: list[bytes]
    names: list[str]
    weights_sent: int


def connect_workers(model: ModelFile, slices: list[NodeSlice], workers: list[WorkerAddress], *, key: bytes,
                    q80: bool, max_seq_len: int, max_batch: int, max_sequences: int = 1,
                    kv_cache_type: str = "f32", data_mac: bool = True, vocab_limit: int = 0,
                    timeout: float = CONNECT_TIMEOUT, progress: bool = True) -> Connected:
    channels: list[Channel] = []
    sent = 0
    try:
        sessions, pending = [], []
        model_hash = model.content_hash()
        for i, address in enumerate(workers, start=1):
            tensors = list(node_tensors(model, slices[i]))
            session = Session(model.config, slices[i], i, len(slices), q80, max_seq_len, max_batch, model_hash,
                              [(t.name, int(t.type), t.rows, t.cols) for t in tensors], data_mac=data_mac,
                              max_sequences=max_sequences, kv_cache_type=kv_cache_type, vocab_limit=vocab_limit)
            ch = Channel(_dial(address, timeout), sender=ROOT, peer=WORKER)
            channels.append(ch)
            reply, data_key = _introduce(ch, address, key, session, timeout)
            sessions.append((address, ch, reply, data_key))
            if not reply["cached"]:
                pending.append((address, ch, tensors))
        total = sum(t.nbytes for _, _, tensors in pending for t in tensors)
        with byte_bar(total, "weights to workers", enabled=progress and total > 0) as bar:
            for address, ch, tensors in pending:
                sent += _send_weights(ch, address, model, tensors, bar)
        session_id = auth.nonce()
        peers = [{"node": i, "host": a.host, "port": r["mesh_port"], "name": str(a)}
                 for i, (a, _, r, _) in enumerate(sessions, start=1)]
        for address, ch, _, _ in sessions:
            _guard(address, ch.send_json, Frame.MESH, {"session": session_id, "peers": peers})
        for address, ch, _, _ in sessions:
            ch.set_timeout(PREPARE_TIMEOUT)
            _guard(address, ch.recv, Frame.READY)
    except BaseException:
        for ch in channels:
            ch.sock.close()
        raise
    return Connected(fds=[-1] + [ch.sock.detach() for _, ch, _, _ in sessions],
                     keys=[b""] + [k for _, _, _, k in sessions],
                     names=["root"] + [f"worker {a}" for a, _, _, _ in sessions], weights_sent=sent)


def _guard(address: WorkerAddress, fn, *args):
    try:
        return fn(*args)
    except ProtocolError as e:  # RemoteError included: the worker's own words, made printable
        raise ClusterError(str(address), str(e)) from None


def _dial(address: WorkerAddress, timeout: float) -> socket.socket:
    try:
        sock = socket.create_connection((address.host, address.port), timeout=timeout)
    except OSError as e:
        raise ClusterError(str(address), f"cannot connect ({e.strerror or e})") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    keepalive(sock)
    return sock


def _introduce(ch: Channel, address: WorkerAddress, key: bytes, session: Session, timeout: float
               ) -> tuple[dict, bytes]:
    """The handshake, then CONFIG. Returns CONFIG_OK and the key of this worker's data-plane link."""
    data_key = prove(ch, address, key, timeout)
    _guard(address, ch.send_json, Frame.CONFIG, session.to_json())
    ch.set_timeout(PREPARE_TIMEOUT)
    reply = _guard(address, ch.recv_json, Frame.CONFIG_OK)
    ch.set_timeout(timeout)
    if not isinstance(reply.get("cached"), bool) or not isinstance(reply.get("mesh_port"), int) \
            or not 0 < reply["mesh_port"] < 65536:
        raise ClusterError(str(address), "malformed CONFIG_OK")
    return reply, data_key


def open_channel(address: WorkerAddress, key: bytes, timeout: float) -> Channel:
    """A new authenticated control connection to a worker (for what is not a session: STATS)."""
    ch = Channel(_dial(address, timeout), sender=ROOT, peer=WORKER)
    try:
        prove(ch, address, key, timeout)
    except BaseException:
        ch.sock.close()
        raise
    return ch


def prove(ch: Channel, address: WorkerAddress, key: bytes, timeout: float) -> bytes:
    """The handshake, under one deadline; every later frame on `ch` is MACed. Both proofs cover
    both nonces, their direction and the address this root reached, so a host that took over a
    worker's address cannot pass the root's proof on to a real worker elsewhere. Returns the
    key of this worker's data-plane link."""
    ch.set_deadline(timeout)
    dialled = auth.endpoint(ch.sock.getpeername())
    root_nonce = auth.nonce()
    _guard(address, ch.send_json, Frame.HELLO, {"nonce": root_nonce, "address": dialled})
    worker_nonce = _guard(address, ch.recv_json, Frame.CHALLENGE).get("nonce")
    if not auth.is_nonce(worker_nonce):
        raise ClusterError(str(address), "malformed CHALLENGE")
    fields = (root_nonce, worker_nonce, dialled)
    _guard(address, ch.send_json, Frame.AUTH, {"proof": auth.proof(key, "root proof", *fields)})
    reply = _guard(address, ch.recv_json, Frame.AUTH_OK)
    if not auth.check(key, reply.get("proof"), "worker proof", *fields):
        raise ClusterError(str(address), "the worker does not hold this root's cluster key")
    control_key, data_key = auth.session_keys(key, *fields)
    ch.authenticate(control_key)
    return data_key


def _send_weights(ch: Channel, address, model: ModelFile, tensors: list[TensorSlice], bar) -> int:
    digest = weight_digest()
    sent = 0
    for index, t in enumerate(tensors):
        data = slice_bytes(model, t)
        for offset in range(0, len(data), WEIGHT_CHUNK):
            chunk = data[offset:offset + WEIGHT_CHUNK]
            digest.update(chunk)
            _guard(address, ch.send, Frame.WEIGHTS, WEIGHT_HEADER.pack(index, offset) + bytes(chunk))
            sent += len(chunk)
            bar.update(len(chunk))
    _guard(address, ch.send_json, Frame.WEIGHTS_DONE, {"digest": digest.hexdigest()})
    return sent
