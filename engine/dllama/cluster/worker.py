"""`dllama worker`: listens, introduces every caller under a deadline (several at once, so no
stranger can hold the door), serves one authenticated root at a time, and listens again whatever
the root did (went away, sent garbage, held the wrong key)."""
from __future__ import annotations

import ctypes
import socket
import sys
import threading
import time

import numpy as np

from .. import _core
from ..config import FloatType
from ..native import bind_tensor, native_config, native_plan
from . import auth
from .cache import SliceCache
from .digest import weight_digest
from .footprint import memory_refusal, session_memory_bytes
from .gate import Gate, RateLimitedLog
from .stats_service import StatsService
from .protocol import (WEIGHT_HEADER, Channel, Frame, PeerClosed, ProtocolError, RemoteError, decode_json,
                       printable)
from .root import ROOT, WORKER
from .session import Session
from .sockets import keepalive

HANDSHAKE_TIMEOUT = 10.0
# The whole handshake, however the bytes trickle in: a stranger holds a slot this long at most.
HANDSHAKE_DEADLINE = 5.0
# Introductions in progress at once; more callers are closed at once (a root retries).
MAX_PENDING = 16
# Waits that depend on the other workers (the root streams their weights first) may last as
# long as a multi-GB transfer; a root that vanished meanwhile is noticed by TCP keepalive.
BETWEEN_PHASES_TIMEOUT = 3600.0
# How long the other workers may take to call this one's mesh port (they build their models
# first: seconds per GB on a board). The root waits as long for READY.
MESH_TIMEOUT = 300.0


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} dllama worker: {printable(message, 2000)}", file=sys.stderr, flush=True)


class Refused(Exception):
    """The root asked for something this worker will not do; the message tells it why."""


class Worker:
    def __init__(self, *, host: str, port: int, nthreads: int, key: bytes, cache_dir: str | None = None,
                 timeout: float = HANDSHAKE_TIMEOUT, max_memory: int | None = None,
                 cache_max_bytes: int | None = None) -> None:
        self.host, self.port, self.nthreads, self.key, self.timeout = host, port, nthreads, key, timeout
        self.max_memory = max_memory
        self.handshake_deadline = min(HANDSHAKE_DEADLINE, timeout)
        self.cache = SliceCache(cache_dir, log, cache_max_bytes) if cache_dir else None
        self.warn = RateLimitedLog(log)
        self.serving = threading.Lock()  # one root's session at a time: it uses the whole machine
        self.stats = StatsService(lambda: self.serving.locked(), log)

    def serve_forever(self) -> None:
        with socket.create_server((self.host, self.port), backlog=64, reuse_port=False) as listener:
            print(f"Listening on port {self.port}", flush=True)
            Gate(listener, self.introduce, max_pending=MAX_PENDING, log=self.warn).accept_until(lambda: False)

    def introduce(self, conn: socket.socket, peer: str):
        """The handshake; returns the session to run once the caller proved the key."""
        ch = Channel(conn, sender=WORKER, peer=ROOT)
        try:
            keepalive(conn)
            ch.set_deadline(self.handshake_deadline)
            data_key = self.handshake(ch, peer)
        except PeerClosed:  # a port probe (a health check, a scan): nothing to say
            conn.close()
            return None
        except Refused as e:
            self.warn("handshake", f"refused root {peer}: {e}")
            conn.close()
            return None
        except ProtocolError as e:
            self.warn("handshake", f"caller {peer} dropped: {e}")
            conn.close()
            return None
        except Exception:
            conn.close()
            raise
        return lambda: self.converse(ch, peer, data_key)

    def converse(self, ch: Channel, peer: str, data_key: bytes) -> None:
        """An authenticated root's first frame says what it wants: a session (CONFIG) or this
        node's figures (STATS), which never touch the session or wait for it."""
        try:
            ch.set_timeout(self.timeout)
            kind, payload = ch.recv(Frame.CONFIG, Frame.STATS)
        except ProtocolError as e:
            log(f"root {peer}: {e}; connection closed")
            ch.send_error(str(e))
            ch.sock.close()
            return
        if kind == Frame.STATS:
            self.stats.serve(ch, peer)
        else:
            self.run_session(ch, peer, data_key, decode_json(payload, kind))

    def handshake(self, ch: Channel, peer: str) -> bytes:
        hello = ch.recv_json(Frame.HELLO)
        root_nonce, dialled = hello.get("nonce"), hello.get("address")
        if not auth.is_nonce(root_nonce) or not isinstance(dialled, str):
            raise ProtocolError("malformed HELLO")
        here = auth.endpoint(ch.sock.getsockname())
        if dialled != here:
            ch.send_error(f"this worker is {here}, the root reached {printable(dialled, 100)}: the connection was "
                          "relayed or translated (NAT); point the root at the worker's own address")
            raise Refused(f"it reached {printable(dialled, 100)}, not this worker's {here} (relayed or NAT)")
        worker_nonce = auth.nonce()
        ch.send_json(Frame.CHALLENGE, {"nonce": worker_nonce})
        claim = ch.recv_json(Frame.AUTH)
        fields = (root_nonce, worker_nonce, here)
        if not auth.check(self.key, claim.get("proof"), "root proof", *fields):
            ch.send_error("cluster key mismatch: the worker refused this root")
            raise Refused("it does not hold this worker's cluster key")
        ch.send_json(Frame.AUTH_OK, {"proof": auth.proof(self.key, "worker proof", *fields)})
        control_key, data_key = auth.session_keys(self.key, *fields)
        ch.authenticate(control_key)
        return data_key

    def run_session(self, ch: Channel, peer: str, data_key: bytes, config: dict) -> None:
        """An authenticated root's session; whatever goes wrong, the root is told why (if it
        still listens), the session's memory is given back and the next root is served."""
        try:
            if not self.serving.acquire(blocking=False):
                log(f"root {peer} waits for the current session to end")
                if not self.serving.acquire(timeout=MESH_TIMEOUT):
                    raise Refused("this worker is busy serving another root")
            try:
                self.session(ch, peer, config, data_key)
            finally:
                self.serving.release()
        except RemoteError as e:
            log(f"root {peer} gave up: {e}")
        except (Refused, ValueError) as e:
            log(f"refused root {peer}: {e}")
            ch.send_error(str(e))
        except ProtocolError as e:
            log(f"root {peer}: {e}; connection closed")
            ch.send_error(str(e))
        except Exception as e:  # noqa: BLE001 - whatever one root caused, the next is served
            log(f"root {peer}: unexpected {type(e).__name__}: {e}; connection closed")
            ch.send_error(f"the worker failed: {type(e).__name__}: {e}")
        finally:
            ch.sock.close()
        # here, past the handlers, no traceback holds the session's buffers any more
        release_memory()
        print(f"Listening on port {self.port}", flush=True)

    def session(self, ch: Channel, peer: str, config: dict, data_key: bytes) -> None:
        session = Session.from_json(config)
        needed = session_memory_bytes(session, self.nthreads)
        reason = memory_refusal(needed, self.max_memory)
        if reason:
            raise Refused(reason)
        sizes = session.sizes
        total = sum(sizes)
        weights = self.cache.load(session.cache_key, total) if self.cache else None
        cached = weights is not None
        with socket.create_server((self.host, 0)) as mesh_listener:
            ch.send_json(Frame.CONFIG_OK, {"cached": cached, "mesh_port": mesh_listener.getsockname()[1]})
            ch.set_timeout(BETWEEN_PHASES_TIMEOUT)
            if not cached:
                weights, digest = self.receive_weights(ch, sizes)
                if self.cache:
                    self.cache.store(session.cache_key, weights, digest)
            try:
                model = self.build(session, weights)
            except BaseException:
                # an entry no model can be built from would fail every root that asks for it;
                # one whose session fails later (a peer missing) is right and is kept for the retry
                if self.cache:
                    self.cache.discard(session.cache_key)
                raise
            del weights  # bind copied what the model reads: free the buffer
            links = self.wire_mesh(ch, session, mesh_listener)
        ch.send(Frame.READY)
        ch.set_timeout(None)
        fds, keys, names = links
        names[0] = f"root {peer}"
        fds[0] = ch.sock.detach()
        keys[0] = data_key
        mesh = _core.Mesh(session.node, fds, names, int(self.timeout * 1000),
                          **({"keys": keys} if session.data_mac else {}))
        log(f"serving root {peer} as node {session.node} of {session.nodes}"
            f" ({total / 1e6:.1f} MB of weights{', from the cache' if cached else ''})")
        reason = model.serve(mesh, session.q80)
        log(f"session with root {peer} ended: {reason}")

    def receive_weights(self, ch: Channel, sizes: list[int]) -> tuple[np.ndarray, str]:
        """Tensor by tensor in manifest order, chunk by chunk; anything out of order is an error."""
        buffer = np.empty(sum(sizes), dtype=np.uint8)
        digest = weight_digest()
        index, offset, at = 0, 0, 0
        while True:
            kind, payload = ch.recv(Frame.WEIGHTS, Frame.WEIGHTS_DONE)
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

    def build(self, session: Session, weights: np.ndarray) -> _core.Transformer:
        """Q40 matrices are copied (packed) by bind; F32 tensors are copied out of the buffer
        too, so the buffer (as large as the slices) is not kept for the session."""
        model = _core.Transformer(native_config(session.config, session.vocab_limit), native_plan(session.slice), nthreads=self.nthreads,
                                  max_seq_len=session.max_seq_len, max_batch=session.max_batch,
                                  max_sequences=session.max_sequences,
                                  kv_cache_type=_core.FloatType.F16 if session.kv_cache_type == "f16" else _core.FloatType.F32)
        at = 0
        for t, size in zip(session.tensors, session.sizes):
            if t.type == FloatType.Q40:
                bind_tensor(model, t, weights, at, size // t.rows)
            else:
                bind_tensor(model, t, weights[at:at + size].copy(), 0, size // t.rows)
            at += size
        model.check_bound()
        return model

    def wire_mesh(self, ch: Channel, session: Session, listener: socket.socket):
        """One authenticated socket to every other worker: this node calls the lower ones and
        takes calls from the higher ones. Returns per node: the socket, the link's data-plane
        key and the name (index 0, the root's, filled in by the caller)."""
        plan = ch.recv_json(Frame.MESH)
        try:
            sid = str(plan["session"])
            peers = {int(p["node"]): (str(p["host"]), int(p["port"])) for p in plan["peers"]}
            labels = {int(p["node"]): printable(str(p["name"]), 200) for p in plan["peers"]}
        except (KeyError, TypeError, ValueError):
            raise ProtocolError("malformed MESH frame") from None
        n, me = session.nodes, session.node
        if sorted(peers) != list(range(1, n)) or not auth.is_nonce(sid):
            raise ProtocolError("MESH frame does not list every worker")
        links: dict[int, tuple[socket.socket, bytes]] = {}
        try:
            for j in range(1, me):
                links[j] = self.call_peer(peers[j], sid, me, j)
            self.take_calls(listener, sid, me, n, links)
        except BaseException:
            for s, _ in links.values():
                s.close()
            raise
        fds, keys, names = [-1] * n, [b""] * n, ["root"] + [f"worker {labels[i]}" for i in range(1, n)]
        for j, (s, k) in links.items():
            fds[j], keys[j] = s.detach(), k
        return fds, keys, names

    def call_peer(self, address: tuple[str, int], sid: str, me: int, j: int) -> tuple[socket.socket, bytes]:
        try:
            s = socket.create_connection(address, timeout=self.timeout)
        except OSError as e:
            raise ProtocolError(f"cannot call worker node {j} at {address[0]}:{address[1]}: {e.strerror or e}") from None
        try:
            keepalive(s)
            link = Channel(s, sender=me, peer=j)
            link.set_deadline(self.handshake_deadline)
            dialled, mine = auth.endpoint(s.getpeername()), auth.nonce()
            link.send_json(Frame.MESH_HELLO, {"session": sid, "node": me, "nonce": mine, "address": dialled})
            reply = link.recv_json(Frame.MESH_CHALLENGE)
            theirs = reply.get("nonce")
            fields = (sid, j, me, mine, theirs if isinstance(theirs, str) else "", dialled)
            if not auth.is_nonce(theirs) or not auth.check(self.key, reply.get("proof"), "mesh callee proof", *fields):
                raise ProtocolError(f"worker node {j} failed its mesh introduction")
            link.send_json(Frame.MESH_AUTH, {"proof": auth.proof(self.key, "mesh caller proof", *fields)})
            return s, auth.derive(self.key, "mesh link", *fields)
        except BaseException:
            s.close()
            raise

    def take_calls(self, listener: socket.socket, sid: str, me: int, n: int,
                   links: dict[int, tuple[socket.socket, bytes]]) -> None:
        """Until every higher node has called and proved itself: callers that fail (strangers,
        replays, a second call for a node already here) are logged and dropped, the real
        peers still get in."""
        here = auth.endpoint(listener.getsockname())
        lock = threading.Lock()

        def introduce(s: socket.socket, peer: str):
            link = Channel(s, sender=me, peer=0)
            try:
                keepalive(s)
                link.set_deadline(self.handshake_deadline)
                hello = link.recv_json(Frame.MESH_HELLO)
                j, theirs, dialled = hello.get("node"), hello.get("nonce"), hello.get("address")
                if hello.get("session") != sid or not isinstance(j, int) or not me < j < n or not auth.is_nonce(theirs):
                    raise ProtocolError("not a caller of this session")
                if not isinstance(dialled, str) or auth.endpoint(s.getsockname()) != dialled:
                    raise ProtocolError("relayed or translated mesh call")
                with lock:
                    if j in links:
                        raise ProtocolError(f"node {j} has called already")
                mine = auth.nonce()
                fields = (sid, me, j, theirs, mine, dialled)
                link.send_json(Frame.MESH_CHALLENGE, {"nonce": mine, "proof": auth.proof(self.key, "mesh callee proof", *fields)})
                if not auth.check(self.key, link.recv_json(Frame.MESH_AUTH).get("proof"), "mesh caller proof", *fields):
                    raise ProtocolError("does not hold the cluster key")
                with lock:
                    if j in links:
                        raise ProtocolError(f"node {j} has called already")
                    links[j] = (s, auth.derive(self.key, "mesh link", *fields))
            except ProtocolError as e:
                self.warn("mesh", f"mesh port {here}: ignored caller {peer}: {e}")
                s.close()
            return None

        def done() -> bool:
            with lock:
                return len([j for j in links if j > me]) == n - 1 - me

        if not Gate(listener, introduce, max_pending=MAX_PENDING, log=self.warn).accept_until(
                done, time.monotonic() + MESH_TIMEOUT):
            missing = [j for j in range(me + 1, n) if j not in links]
            raise ProtocolError(f"worker nodes {missing} did not call this one's mesh port in {MESH_TIMEOUT:.0f} s")


def release_memory() -> None:
    """Gives the freed heap of an ended session back to the system: glibc keeps it otherwise,
    and an idle worker would sit on the peak of its last (perhaps refused) session."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim


def run(args) -> int:
    key = auth.load_key(args.cluster_key_file, "worker")
    if not 0.1 <= args.timeout <= 3600:
        raise ValueError("--timeout must be between 0.1 and 3600 seconds")
    worker = Worker(host=args.host, port=args.port, nthreads=args.nthreads, key=key, cache_dir=args.cache_dir,
                    timeout=args.timeout, max_memory=args.max_memory, cache_max_bytes=args.cache_max_bytes)
    try:
        worker.serve_forever()
    except KeyboardInterrupt:
        return 0
    return 0
