"""The cluster key and what is derived from it.

The key authenticates, it does not encrypt: both ends of every connection prove they hold it
(an HMAC over both ends' fresh nonces, the direction and the address the root dialled), and
each connection then gets its own session key from which every later frame is MACed (control
frames here in Python, data-plane messages in native/net.cpp). A host without the key can
neither join, nor replay or relay a handshake, nor alter or inject a frame; but anyone on the
network can read the traffic (token ids, activations, weights).

HMAC-SHA256 is the key derivation function (one HMAC per labelled purpose, its inputs
JSON-encoded so no two field lists give the same message); keyed BLAKE2b, the same on both
planes, MACs frames.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
import sys
from pathlib import Path

NONCE_BYTES = 32
KEY_BYTES = 32  # session and link keys (BLAKE2b takes keys up to 64 bytes)
TAG_BYTES = 16


def load_key(path: str | os.PathLike | None, role: str) -> bytes:
    """The key from a file (surrounding whitespace ignored); without a file, an empty key and a
    warning, since then anyone who reaches the port can drive the node."""
    if path is None:
        print(f"dllama {role}: WARNING: no --cluster-key-file: the port is open to anyone who can reach it",
              file=sys.stderr, flush=True)
        return b""
    try:
        key = Path(path).read_bytes().strip()
        mode = os.stat(path).st_mode
    except OSError as e:
        raise ValueError(f"cannot read the cluster key file {path}: {e.strerror}") from None
    if len(key) < 16:
        raise ValueError(f"the cluster key in {path} is too short (at least 16 bytes)")
    warn_if_shared(path, mode, f"dllama {role}")
    return key


def warn_if_shared(path: str | os.PathLike, mode: int, who: str) -> None:
    """A secret that other users of the machine can read is no secret."""
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        print(f"{who}: note: {path} is readable by other users; chmod 600 it", file=sys.stderr, flush=True)


def nonce() -> str:
    return secrets.token_hex(NONCE_BYTES)


def is_nonce(value: object) -> bool:
    return isinstance(value, str) and len(value) == 2 * NONCE_BYTES and all(c in "0123456789abcdef" for c in value)


def endpoint(sockaddr) -> str:
    """HOST:PORT of one end of a TCP connection as both ends see it: the root from getpeername,
    the worker from getsockname (an IPv4 peer of a dual-stack socket shows as ::ffff:a.b.c.d)."""
    host, port = sockaddr[0], sockaddr[1]
    if host.startswith("::ffff:") and "." in host:
        host = host[len("::ffff:"):]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def derive(key: bytes, purpose: str, *fields: str | int) -> bytes:
    """32 bytes bound to the key, the purpose and every field (HMAC-SHA256 as a PRF)."""
    message = json.dumps([purpose, *fields], separators=(",", ":")).encode()
    return hmac.new(key, message, hashlib.sha256).digest()


def session_keys(key: bytes, root_nonce: str, worker_nonce: str, address: str) -> tuple[bytes, bytes]:
    """The keys of one root-worker connection, from the handshake's fields: (control frames,
    data-plane link). Root and worker call this same schedule."""
    session = derive(key, "session", root_nonce, worker_nonce, address)
    return derive(session, "control"), derive(session, "data")


def proof(key: bytes, purpose: str, *fields: str | int) -> str:
    return derive(key, purpose, *fields).hex()


def check(key: bytes, claimed: object, purpose: str, *fields: str | int) -> bool:
    return isinstance(claimed, str) and hmac.compare_digest(claimed, proof(key, purpose, *fields))


def tag(key: bytes, sender: int, counter: int, *parts: bytes | memoryview) -> bytes:
    """The MAC of one message: keyed BLAKE2b over the sender's index, the message's number in
    that direction and its bytes, so a message cannot be altered, reflected, replayed or
    reordered. native/net.cpp computes the same tag for data-plane messages."""
    h = hashlib.blake2b(key=key, digest_size=TAG_BYTES)
    h.update(sender.to_bytes(4, "little") + counter.to_bytes(8, "little"))
    for p in parts:
        h.update(p)
    return h.digest()


def tags_equal(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)
