"""The weight digest: blake2b (32 bytes) over a node's weight bytes in manifest order.

The root sends it in WEIGHTS_DONE, the worker checks what arrived against it and keeps it beside
a slice-cache entry, and the entry is checked against it again when read back."""
from __future__ import annotations

import hashlib

DIGEST_BYTES = 32


def weight_digest():
    """A fresh digest to update() with the weight bytes in order; hexdigest() is what crosses."""
    return hashlib.blake2b(digest_size=DIGEST_BYTES)


def digest_of(buffer) -> str:
    """The hex digest of a whole buffer (any object with the buffer protocol)."""
    h = weight_digest()
    h.update(memoryview(buffer).cast("B"))  # hashed in place, not copied
    return h.hexdigest()
