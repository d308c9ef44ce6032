"""The cluster key: both ends prove they hold it (HMAC over the connection's two nonces) before
anything else is accepted."""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import sys
from pathlib import Path

NONCE_BYTES = 32


def load_key(path: str | os.PathLike | None, role: str) -> bytes:
    """The key from a file (surrounding whitespace ignored); without a file, an empty key and a
    warning, since then anyone who reaches the port can drive the node."""
    if path is None:
        print(f"dllama {role}: WARNING: no --cluster-key-file: the port is open to anyone who can reach it",
              file=sys.stderr, flush=True)
        return b""
    try:
        key = Path(path).read_bytes().strip()
    except OSError as e:
        raise ValueError(f"cannot read the cluster key file {path}: {e.strerror}") from None
    if len(key) < 16:
        raise ValueError(f"the cluster key in {path} is too short (at least 16 bytes)")
    return key


def nonce() -> str:
    return secrets.token_hex(NONCE_BYTES)


def proof(key: bytes, role: str, *nonces: str) -> str:
    return hmac.new(key, "|".join((role, *nonces)).encode(), hashlib.sha256).hexdigest()


def check(key: bytes, claimed: object, role: str, *nonces: str) -> bool:
    return isinstance(claimed, str) and hmac.compare_digest(claimed, proof(key, role, *nonces))
