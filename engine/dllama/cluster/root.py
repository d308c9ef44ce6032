"""The root's side of the control plane: connect to every worker, prove the key, send each its
slice of the weights (unless its cache has them), and wire the mesh."""
from __future__ import annotations

import hashlib
import socket
import sys
from dataclasses import dataclass

from tqdm import tqdm

from ..model_file import ModelFile
from . import auth
from .errors import ClusterError
from .plan import NodeSlice
from .protocol import (WEIGHT_CHUNK, WEIGHT_HEADER, Frame, ProtocolError, RemoteError, recv_frame, recv_json,
                       send_frame, send_json)
from .session import Session
from .slices import TensorSlice, node_tensors, slice_bytes

CONNECT_TIMEOUT = 10.0
# A worker answers CONFIG after checking its slice cache's digest and READY after building its
# model: seconds per GB on a board, so those two waits get longer than the others.
PREPARE_TIMEOUT = 300.0


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


def connect_workers(model: ModelFile, slices: list[NodeSlice], workers: list[WorkerAddress], *, key: bytes,
                    q80: bool, max_seq_len: int, max_batch: int, timeout: float = CONNECT_TIMEOUT,
                    progress: bool = True) -> tuple[list[int], list[str], int]:
    """Returns the mesh sockets of the root (one fd per node, -1 for itself), the nodes' names and
    the weight bytes sent."""
    socks: list[socket.socket] = []
    sent = 0
    try:
        sessions, pending = [], []
        model_hash = model.content_hash()
        for i, address in enumerate(workers, start=1):
            tensors = list(node_tensors(model, slices[i]))
            session = Session(model.config, slices[i], i, len(slices), q80, max_seq_len, max_batch, model_hash,
                              [(t.name, int(t.type), t.rows, t.cols) for t in tensors])
            sock = _dial(address, timeout)
            socks.append(sock)
            reply = _introduce(sock, address, key, session, timeout)
            sessions.append((address, sock, reply))
            if not reply["cached"]:
                pending.append((address, sock, tensors))
        total = sum(t.nbytes for _, _, tensors in pending for t in tensors)
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="weights to workers",
                  disable=not progress or total == 0, file=sys.stderr) as bar:
            for address, sock, tensors in pending:
                sent += _send_weights(sock, address, model, tensors, bar)
        session_id = auth.nonce()
        peers = [{"node": i, "host": a.host, "port": r["mesh_port"], "name": str(a)}
                 for i, (a, _, r) in enumerate(sessions, start=1)]
        for address, sock, _ in sessions:
            _guard(address, send_json, sock, Frame.MESH, {"session": session_id, "peers": peers})
        for address, sock, _ in sessions:
            sock.settimeout(PREPARE_TIMEOUT)
            _guard(address, recv_frame, sock, Frame.READY)
    except BaseException:
        for s in socks:
            s.close()
        raise
    fds = [-1] + [s.detach() for _, s, _ in sessions]
    names = ["root"] + [f"worker {a}" for a, _, _ in sessions]
    return fds, names, sent


def _guard(address: WorkerAddress, fn, *args):
    try:
        return fn(*args)
    except RemoteError as e:
        raise ClusterError(str(address), str(e)) from None
    except ProtocolError as e:
        raise ClusterError(str(address), str(e)) from None


def _dial(address: WorkerAddress, timeout: float) -> socket.socket:
    try:
        sock = socket.create_connection((address.host, address.port), timeout=timeout)
    except OSError as e:
        raise ClusterError(str(address), f"cannot connect ({e.strerror or e})") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _introduce(sock: socket.socket, address: WorkerAddress, key: bytes, session: Session, timeout: float) -> dict:
    root_nonce = auth.nonce()
    _guard(address, send_json, sock, Frame.HELLO, {"nonce": root_nonce})
    worker_nonce = _guard(address, recv_json, sock, Frame.CHALLENGE).get("nonce")
    if not isinstance(worker_nonce, str):
        raise ClusterError(str(address), "malformed CHALLENGE")
    _guard(address, send_json, sock, Frame.AUTH, {"proof": auth.proof(key, "root", root_nonce, worker_nonce)})
    reply = _guard(address, recv_json, sock, Frame.AUTH_OK)
    if not auth.check(key, reply.get("proof"), "worker", worker_nonce, root_nonce):
        raise ClusterError(str(address), "the worker does not hold this root's cluster key")
    _guard(address, send_json, sock, Frame.CONFIG, session.to_json())
    sock.settimeout(PREPARE_TIMEOUT)
    reply = _guard(address, recv_json, sock, Frame.CONFIG_OK)
    sock.settimeout(timeout)
    if not isinstance(reply.get("cached"), bool) or not isinstance(reply.get("mesh_port"), int):
        raise ClusterError(str(address), "malformed CONFIG_OK")
    return reply


def _send_weights(sock, address, model: ModelFile, tensors: list[TensorSlice], bar) -> int:
    digest = hashlib.blake2b(digest_size=32)
    sent = 0
    for index, t in enumerate(tensors):
        data = slice_bytes(model, t)
        for offset in range(0, len(data), WEIGHT_CHUNK):
            chunk = data[offset:offset + WEIGHT_CHUNK]
            digest.update(chunk)
            _guard(address, send_frame, sock, Frame.WEIGHTS, WEIGHT_HEADER.pack(index, offset) + bytes(chunk))
            sent += len(chunk)
            bar.update(len(chunk))
    _guard(address, send_json, sock, Frame.WEIGHTS_DONE, {"digest": digest.hexdigest()})
    return sent
