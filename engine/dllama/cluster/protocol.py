"""The control plane's wire format: length-prefixed frames, checked before anything is read.

    +---------+---------+--------+-----------+----------------+
    | magic 4 | ver u16 | type u16| length u32 | payload[length] |
    +---------+---------+--------+-----------+----------------+

Every frame's length is bounded by its type before a byte of payload is allocated; an unknown
type, a wrong magic or version, or a short read ends the connection with a ProtocolError.
"""
from __future__ import annotations

import enum
import json
import socket
import struct

MAGIC = b"DLMC"
VERSION = 1
HEADER = struct.Struct("<4sHHI")


class Frame(enum.IntEnum):
    HELLO = 1  # root -> worker: {"nonce"}
    CHALLENGE = 2  # worker -> root: {"nonce"}
    AUTH = 3  # root -> worker: {"proof"}
    AUTH_OK = 4  # worker -> root: {"proof"}
    CONFIG = 5  # root -> worker: model shape, slice, manifest, session settings
    CONFIG_OK = 6  # worker -> root: {"cached": bool, "mesh_port": int}
    WEIGHTS = 7  # root -> worker: u32 tensor index, u64 offset, bytes
    WEIGHTS_DONE = 8  # root -> worker: {"digest"}
    MESH = 9  # root -> worker: the peers to connect to
    MESH_HELLO = 10  # worker -> worker: {"session", "node", "proof"}
    READY = 11  # worker -> root
    ERROR = 12  # either way: {"message"}


KiB, MiB = 1024, 1024 * 1024
WEIGHT_CHUNK = 4 * MiB
WEIGHT_HEADER = struct.Struct("<IQ")
MAX_LENGTH = {f: 64 * KiB for f in Frame}
MAX_LENGTH[Frame.CONFIG] = 16 * MiB  # the manifest of a big MoE lists tens of thousands of tensors
MAX_LENGTH[Frame.MESH] = 1 * MiB
MAX_LENGTH[Frame.WEIGHTS] = WEIGHT_HEADER.size + WEIGHT_CHUNK


class ProtocolError(Exception):
    """The peer broke the protocol (or went away); the connection cannot go on."""


class RemoteError(ProtocolError):
    """The peer reported an error frame."""


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        try:
            k = sock.recv_into(view[got:], n - got)
        except TimeoutError:
            raise ProtocolError(f"timed out after {got} of {n} bytes") from None
        except OSError as e:
            raise ProtocolError(f"connection failed: {e.strerror or e}") from None
        if k == 0:
            raise ProtocolError("connection closed" if got == 0 else f"connection closed after {got} of {n} bytes")
        got += k
    return bytes(buf)


def send_frame(sock: socket.socket, kind: Frame, payload: bytes | memoryview = b"") -> None:
    try:
        sock.sendall(HEADER.pack(MAGIC, VERSION, kind, len(payload)))
        if len(payload):
            sock.sendall(payload)
    except TimeoutError:
        raise ProtocolError("timed out sending") from None
    except OSError as e:
        raise ProtocolError(f"connection failed: {e.strerror or e}") from None


def send_json(sock: socket.socket, kind: Frame, obj: dict) -> None:
    send_frame(sock, kind, json.dumps(obj, separators=(",", ":")).encode())


def recv_frame(sock: socket.socket, *expected: Frame) -> tuple[Frame, bytes]:
    """The next frame, which must be one of `expected` (an ERROR frame raises RemoteError)."""
    magic, version, kind, length = HEADER.unpack(recv_exact(sock, HEADER.size))
    if magic != MAGIC:
        raise ProtocolError(f"not a dllama peer (magic {magic!r})")
    if version != VERSION:
        raise ProtocolError(f"protocol version {version}, this side speaks {VERSION}: update both sides to one release")
    try:
        kind = Frame(kind)
    except ValueError:
        raise ProtocolError(f"unknown frame type {kind}") from None
    if length > MAX_LENGTH[kind]:
        raise ProtocolError(f"{kind.name} frame of {length} bytes is over the limit of {MAX_LENGTH[kind]}")
    payload = recv_exact(sock, length)
    if kind == Frame.ERROR:
        raise RemoteError(decode_json(payload, kind).get("message", "unspecified error"))
    if expected and kind not in expected:
        raise ProtocolError(f"expected {' or '.join(e.name for e in expected)}, got {kind.name}")
    return kind, payload


def recv_json(sock: socket.socket, *expected: Frame) -> dict:
    kind, payload = recv_frame(sock, *expected)
    return decode_json(payload, kind)


def decode_json(payload: bytes, kind: Frame) -> dict:
    try:
        obj = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ProtocolError(f"{kind.name} frame is not valid JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{kind.name} frame is not a JSON object")
    return obj
