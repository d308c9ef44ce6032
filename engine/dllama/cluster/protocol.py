"""The control plane's wire format: length-prefixed frames, checked before anything is read.

    +---------+---------+---------+------------+-----------------+--------------------------+
    | magic 4 | ver u16 | type u16| length u32 | payload[length] | tag[16] once authenticated |
    +---------+---------+---------+------------+-----------------+--------------------------+

A frame's type is checked against what the conversation expects and its length against the
type's bound before a byte of payload is read or allocated; an unknown or unexpected type, a
wrong magic or version, a short read, a missed deadline or a bad tag ends the connection with
a ProtocolError. Once both ends have proved the cluster key, every frame carries a tag (see
auth.tag) under the connection's session key.
"""
from __future__ import annotations

import enum
import json
import socket
import struct
import time

from . import auth

MAGIC = b"DLMC"
VERSION = 3  # 2: proofs bound to the dialled address, MACed frames; 3: steps over several sequences
HEADER = struct.Struct("<4sHHI")


class Frame(enum.IntEnum):
    HELLO = 1  # root -> worker: {"nonce", "address"}
    CHALLENGE = 2  # worker -> root: {"nonce"}
    AUTH = 3  # root -> worker: {"proof"}
    AUTH_OK = 4  # worker -> root: {"proof"}; every later frame is MACed
    CONFIG = 5  # root -> worker: model shape, slice, manifest, session settings
    CONFIG_OK = 6  # worker -> root: {"cached": bool, "mesh_port": int}
    WEIGHTS = 7  # root -> worker: u32 tensor index, u64 offset, bytes
    WEIGHTS_DONE = 8  # root -> worker: {"digest"}
    MESH = 9  # root -> worker: the session id and the peers to connect to
    MESH_HELLO = 10  # worker -> worker it dials: {"session", "node", "nonce"}
    READY = 11  # worker -> root
    ERROR = 12  # either way: {"message"}
    MESH_CHALLENGE = 13  # dialled worker -> dialler: {"nonce", "proof"}
    MESH_AUTH = 14  # dialler -> dialled worker: {"proof"}
    # root -> worker instead of CONFIG, then again every few seconds on that connection: {};
    # worker -> root: {"instance", "serving", "figures"} (see node_stats)
    STATS = 15


KiB, MiB = 1024, 1024 * 1024
WEIGHT_CHUNK = 4 * MiB
WEIGHT_HEADER = struct.Struct("<IQ")
MAX_LENGTH = {f: 64 * KiB for f in Frame}
MAX_LENGTH[Frame.CONFIG] = 16 * MiB  # the manifest of a big MoE lists tens of thousands of tensors
MAX_LENGTH[Frame.MESH] = 1 * MiB
MAX_LENGTH[Frame.WEIGHTS] = WEIGHT_HEADER.size + WEIGHT_CHUNK
MAX_LENGTH[Frame.STATS] = 4 * KiB  # a dozen numbers
# Longest message text taken from a peer's ERROR frame.
MAX_MESSAGE = 500


class ProtocolError(Exception):
    """The peer broke the protocol (or went away); the connection cannot go on."""


class PeerClosed(ProtocolError):
    """The peer closed the connection between frames (a port probe does just that)."""


class RemoteError(ProtocolError):
    """The peer reported an error frame."""


def printable(text: str, limit: int = MAX_MESSAGE) -> str:
    """Text from a peer as it may appear in a log line: no newlines or control characters."""
    text = text[:limit]
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}" for c in text)


class Channel:
    """One control-plane connection. `sender` is this end's index in the tags (root 0, worker 1,
    or a node index on a mesh link). Until `authenticate`, frames carry no tag; after it, every
    frame in both directions does, numbered per direction. A deadline, once set, bounds the
    whole conversation, not each read: a peer that trickles bytes cannot stretch it."""

    def __init__(self, sock: socket.socket, sender: int, peer: int) -> None:
        self.sock, self.sender, self.peer = sock, sender, peer
        self.key: bytes | None = None
        self.sent = self.received = 0
        self.deadline: float | None = None

    def authenticate(self, key: bytes) -> None:
        self.key, self.sent, self.received = key, 0, 0

    def set_deadline(self, seconds: float | None) -> None:
        self.deadline = None if seconds is None else time.monotonic() + seconds

    def set_timeout(self, seconds: float | None) -> None:
        """Per-read timeout once no deadline applies (waits between phases)."""
        self.deadline = None
        self.sock.settimeout(seconds)

    def _arm(self) -> None:
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise ProtocolError("timed out: the handshake took too long")
            self.sock.settimeout(left)

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            self._arm()
            try:
                k = self.sock.recv_into(view[got:], n - got)
            except TimeoutError:
                what = " (the handshake took too long)" if self.deadline is not None else ""
                raise ProtocolError(f"timed out{what} after {got} of {n} bytes") from None
            except OSError as e:
                raise ProtocolError(f"connection failed: {e.strerror or e}") from None
            if k == 0:
                if got == 0:
                    raise PeerClosed("connection closed")
                raise ProtocolError(f"connection closed after {got} of {n} bytes")
            got += k
        return bytes(buf)

    def send(self, kind: Frame, payload: bytes | memoryview = b"") -> None:
        header = HEADER.pack(MAGIC, VERSION, kind, len(payload))
        parts = [header, payload]
        if self.key is not None:
            parts.append(auth.tag(self.key, self.sender, self.sent, header, payload))
            self.sent += 1
        try:
            self._arm()
            for p in parts:
                if len(p):
                    self.sock.sendall(p)
        except TimeoutError:
            raise ProtocolError("timed out sending") from None
        except OSError as e:
            raise ProtocolError(f"connection failed: {e.strerror or e}") from None

    def send_json(self, kind: Frame, obj: dict) -> None:
        self.send(kind, json.dumps(obj, separators=(",", ":")).encode())

    def recv(self, *expected: Frame) -> tuple[Frame, bytes]:
        """The next frame, which must be one of `expected` (an ERROR frame raises RemoteError)."""
        header = self.recv_exact(HEADER.size)
        magic, version, kind, length = HEADER.unpack(header)
        if magic != MAGIC:
            raise ProtocolError(f"not a dllama peer (magic {magic!r})")
        if version != VERSION:
            raise ProtocolError(f"protocol version {version}, this side speaks {VERSION}: update both sides to one release")
        try:
            kind = Frame(kind)
        except ValueError:
            raise ProtocolError(f"unknown frame type {kind}") from None
        if kind != Frame.ERROR and kind not in expected:
            raise ProtocolError(f"expected {' or '.join(e.name for e in expected)}, got {kind.name}")
        if length > MAX_LENGTH[kind]:
            raise ProtocolError(f"{kind.name} frame of {length} bytes is over the limit of {MAX_LENGTH[kind]}")
        payload = self.recv_exact(length)
        if self.key is not None:
            expect = auth.tag(self.key, self.peer, self.received, header, payload)
            if not auth.tags_equal(self.recv_exact(auth.TAG_BYTES), expect):
                raise ProtocolError(f"{kind.name} frame failed authentication (tampered or injected traffic)")
            self.received += 1
        if kind == Frame.ERROR:
            message = decode_json(payload, kind).get("message", "unspecified error")
            raise RemoteError(printable(str(message)))
        return kind, payload

    def recv_json(self, *expected: Frame) -> dict:
        kind, payload = self.recv(*expected)
        return decode_json(payload, kind)

    def send_error(self, message: str) -> None:
        """Tells the peer why the conversation ends, if it still listens."""
        try:
            if self.deadline is None:
                self.sock.settimeout(2.0)
            self.send_json(Frame.ERROR, {"message": message[:MAX_MESSAGE]})
        except ProtocolError:
            pass


def decode_json(payload: bytes, kind: Frame) -> dict:
    try:
        obj = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ProtocolError(f"{kind.name} frame is not valid JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{kind.name} frame is not a JSON object")
    return obj
