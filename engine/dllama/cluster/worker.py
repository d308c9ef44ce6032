"""`dllama worker`: listens, serves one root at a time, and listens again whatever the root
did (went away, sent garbage, held the wrong key)."""
from __future__ import annotations

import hashlib
import socket
import sys
import time

import numpy as np

from .. import _core
from ..config import FloatType
from ..engine import native_config
from . import auth
from .cache import SliceCache
from .protocol import WEIGHT_HEADER, Frame, ProtocolError, decode_json, recv_frame, recv_json, send_frame, send_json
from .session import Session

HANDSHAKE_TIMEOUT = 10.0
# Waits that depend on the other workers (the root streams their weights first) may last as
# long as a multi-GB transfer; a root that vanished meanwhile is noticed by TCP keepalive.
BETWEEN_PHASES_TIMEOUT = 3600.0


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} dllama worker: {message}", file=sys.stderr, flush=True)


class Worker:
    def __init__(self, *, host: str, port: int, nthreads: int, key: bytes, cache_dir: str | None = None,
                 timeout: float = HANDSHAKE_TIMEOUT) -> None:
        self.host, self.port, self.nthreads, self.key, self.timeout = host, port, nthreads, key, timeout
        self.cache = SliceCache(cache_dir, log) if cache_dir else None

    def serve_forever(self) -> None:
        with socket.create_server((self.host, self.port), backlog=4, reuse_port=False) as listener:
            while True:
                print(f"Listening on port {self.port}", flush=True)
                conn, addr = listener.accept()
                peer = f"{addr[0]}:{addr[1]}"
                try:
                    self.session(conn, peer)
                except (ProtocolError, ValueError, OSError) as e:
                    log(f"root {peer}: {e}; connection closed")
                except Exception as e:  # noqa: BLE001 - whatever one root caused, the next is served
                    log(f"root {peer}: unexpected {type(e).__name__}: {e}; connection closed")
                finally:
                    conn.close()

    def session(self, conn: socket.socket, peer: str) -> None:
        conn.settimeout(self.timeout)
        keepalive(conn)
        hello = recv_json(conn, Frame.HELLO)
        root_nonce = hello.get("nonce")
        if not isinstance(root_nonce, str) or len(root_nonce) != 2 * auth.NONCE_BYTES:
            raise ProtocolError("malformed HELLO")
        worker_nonce = auth.nonce()
        send_json(conn, Frame.CHALLENGE, {"nonce": worker_nonce})
        claim = recv_json(conn, Frame.AUTH)
        if not auth.check(self.key, claim.get("proof"), "root", root_nonce, worker_nonce):
            log(f"refused root {peer}: it does not hold this worker's cluster key")
            send_json(conn, Frame.ERROR, {"message": "cluster key mismatch: the worker refused this root"})
            return
        send_json(conn, Frame.AUTH_OK, {"proof": auth.proof(self.key, "worker", worker_nonce, root_nonce)})

        session = Session.from_json(recv_json(conn, Frame.CONFIG))
        sizes = session.sizes
        total = sum(sizes)
        weights = self.cache.load(session.cache_key, total) if self.cache else None
        cached = weights is not None
        with socket.create_server((self.host, 0)) as mesh_listener:
            send_json(conn, Frame.CONFIG_OK, {"cached": cached, "mesh_port": mesh_listener.getsockname()[1]})
            conn.settimeout(BETWEEN_PHASES_TIMEOUT)
            if not cached:
                weights, digest = self.receive_weights(conn, sizes)
                if self.cache:
                    self.cache.store(session.cache_key, weights, digest)
            model = self.build(session, weights)
            del weights  # bind copied what the model reads from a received buffer: free it
            mesh_fds, names = self.wire_mesh(conn, session, mesh_listener)
        send_frame(conn, Frame.READY)
        conn.settimeout(None)
        names[0] = f"root {peer}"
        mesh_fds[0] = conn.detach()
        mesh = _core.Mesh(session.node, mesh_fds, names, int(self.timeout * 1000))
        log(f"serving root {peer} as node {session.node} of {session.nodes}"
            f" ({total / 1e6:.1f} MB of weights{', from the cache' if cached else ''})")
        reason = model.serve(mesh, session.q80)
        log(f"session with root {peer} ended: {reason}")

    def receive_weights(self, conn: socket.socket, sizes: list[int]) -> tuple[np.ndarray, str]:
        """Tensor by tensor in manifest order, chunk by chunk; anything out of order is an error."""
        buffer = np.empty(sum(sizes), dtype=np.uint8)
        digest = hashlib.blake2b(digest_size=32)
        index, offset, at = 0, 0, 0
        while True:
            kind, payload = recv_frame(conn, Frame.WEIGHTS, Frame.WEIGHTS_DONE)
            if kind == Frame.WEIGHTS_DONE:
                break
            if len(payload) < WEIGHT_HEADER.size:
                raise ProtocolError("truncated WEIGHTS frame")
            t, o = WEIGHT_HEADER.unpack_from(payload)
            data = memoryview(payload)[WEIGHT_HEADER.size:]
            while index < len(sizes) and offset == sizes[index]:
                index, offset = index + 1, 0
            if t != index or o != offset or index >= len(sizes) or offset + len(data) > sizes[index]:
                raise ProtocolError(f"weights out of order (tensor {t} offset {o})")
            buffer[at:at + len(data)] = np.frombuffer(data, dtype=np.uint8)
            digest.update(data)
            offset += len(data)
            at += len(data)
        if at != len(buffer):
            raise ProtocolError(f"the root sent {at} of {len(buffer)} weight bytes")
        if decode_json(payload, Frame.WEIGHTS_DONE).get("digest") != digest.hexdigest():
            raise ProtocolError("the weights arrived damaged (digest mismatch)")
        return buffer, digest.hexdigest()

    def build(self, session: Session, weights) -> _core.Transformer:
        """Q40 matrices are copied (packed) by bind either way. F32 tensors are read in place from
        the cache's map (file pages the kernel may drop), but copied out of a received buffer, so
        that buffer, anonymous memory as large as the slices, is not kept for the session."""
        model = _core.Transformer(native_config(session.config), session.slice.native(), nthreads=self.nthreads,
                                  max_seq_len=session.max_seq_len, max_batch=session.max_batch)
        received = isinstance(weights, np.ndarray)
        at = 0
        for (name, t, rows, cols), size in zip(session.manifest, session.sizes):
            if received and FloatType(t) != FloatType.Q40:
                model.bind(name, weights[at:at + size].copy(), 0, rows, cols, size // rows, int(FloatType(t)))
            else:
                model.bind(name, weights, at, rows, cols, size // rows, int(FloatType(t)))
            at += size
        model.check_bound()
        return model

    def wire_mesh(self, conn: socket.socket, session: Session, listener: socket.socket):
        """One socket to every other worker: this node dials the lower ones and takes calls from
        the higher ones, each call proving the session and the key."""
        plan = recv_json(conn, Frame.MESH)
        try:
            sid = str(plan["session"])
            peers = {int(p["node"]): (str(p["host"]), int(p["port"])) for p in plan["peers"]}
            labels = {int(p["node"]): str(p["name"])[:200] for p in plan["peers"]}
        except (KeyError, TypeError, ValueError):
            raise ProtocolError("malformed MESH frame") from None
        n, me = session.nodes, session.node
        if sorted(peers) != list(range(1, n)):
            raise ProtocolError("MESH frame does not list every worker")
        fds, names = [-1] * n, ["root"] + [f"worker {labels[i]}" for i in range(1, n)]
        socks = []
        try:
            for j in range(1, me):
                s = socket.create_connection(peers[j], timeout=self.timeout)
                socks.append(s)
                send_json(s, Frame.MESH_HELLO, {"session": sid, "node": me,
                                                "proof": auth.proof(self.key, "mesh", sid, str(me))})
                fds[j] = s
            listener.settimeout(self.timeout)
            for _ in range(me + 1, n):
                s, _addr = listener.accept()
                socks.append(s)
                s.settimeout(self.timeout)
                hello = recv_json(s, Frame.MESH_HELLO)
                j = hello.get("node")
                if (hello.get("session") != sid or not isinstance(j, int) or not me < j < n or fds[j] != -1
                        or not auth.check(self.key, hello.get("proof"), "mesh", sid, str(j))):
                    raise ProtocolError("a mesh peer failed its introduction")
                fds[j] = s
        except OSError as e:
            for s in socks:
                s.close()
            raise ProtocolError(f"cannot wire the mesh: {e}") from None
        except ProtocolError:
            for s in socks:
                s.close()
            raise
        return [s.detach() if isinstance(s, socket.socket) else s for s in fds], names


def keepalive(sock: socket.socket) -> None:
    """A peer that vanishes without a FIN is noticed within about 20 s."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 5)):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


def run(args) -> int:
    key = auth.load_key(args.cluster_key_file, "worker")
    if not 0.1 <= args.timeout <= 3600:
        raise ValueError("--timeout must be between 0.1 and 3600 seconds")
    worker = Worker(host=args.host, port=args.port, nthreads=args.nthreads, key=key, cache_dir=args.cache_dir,
                    timeout=args.timeout)
    try:
        worker.serve_forever()
    except KeyboardInterrupt:
        return 0
    return 0
