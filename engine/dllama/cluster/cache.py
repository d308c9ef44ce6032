"""A worker's slice cache: the weights it received, on disk, keyed by the model's content hash
and the slice plan, so a restarted root sends no weights.

An entry is two files: KEY.slices (the bytes) and KEY.json ({"size", "digest"}), each written to a
unique temporary name and renamed into place, the .json last; workers sharing the directory never
see each other's half-written files. Whatever cannot be read back whole and with its digest is
removed and fetched again. Files are read into memory, never mapped: a cache file truncated under
a mapping would kill the worker with SIGBUS, where a short read is only a damaged entry.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .digest import digest_of, weight_digest  # noqa: F401 - digest_of: what store() expects

READ_CHUNK = 16 * 1024 * 1024
MAX_META_BYTES = 4096  # a .json is about 100 bytes
# A temporary file this old belongs to a writer that died; a live one writes a multi-GB entry
# to an SD card in well under an hour.
STALE_TEMP_SECONDS = 24 * 3600
_KEY = re.compile(r"[0-9a-f]{1,128}")


class DamagedEntry(Exception):
    """A cache entry that cannot be used as it is."""


class SliceCache:
    def __init__(self, directory: str | os.PathLike, log: Callable[[str], None], max_bytes: int | None = None) -> None:
        if max_bytes is not None and max_bytes < 0:
            raise ValueError("the slice cache's max_bytes must not be negative")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = log
        self.max_bytes = max_bytes

    def _paths(self, key: str) -> tuple[Path, Path]:
        if not _KEY.fullmatch(key):
            raise ValueError("malformed cache key")
        return self.dir / f"{key}.slices", self.dir / f"{key}.json"

    def load(self, key: str, size: int) -> np.ndarray | None:
        """The cached bytes (a uint8 array of its own), or None when absent or damaged (then the
        entry is removed, and the reason logged)."""
        data, meta = self._paths(key)
        have_data, have_meta = data.exists(), meta.exists()
        if not have_data and not have_meta:
            return None
        try:
            if not have_data or not have_meta:
                raise DamagedEntry(f"its {'.json' if have_data else '.slices'} file is missing")
            digest = self._read_meta(meta, size)
            buffer = _read_exactly(data, size, digest)
        except (OSError, DamagedEntry) as e:
            self.log(f"slice cache {data.name} is damaged ({e}); fetching the weights again")
            self.discard(key)
            return None
        now = time.time()
        for p in (data, meta):  # a hit is recent use: eviction takes the least recently used first
            try:
                os.utime(p, (now, now))
            except OSError:
                pass  # removed meanwhile by another worker: the buffer read is whole anyway
        return buffer

    @staticmethod
    def _read_meta(meta: Path, size: int) -> str:
        with open(meta, "rb") as f:
            text = f.read(MAX_META_BYTES + 1)
        if len(text) > MAX_META_BYTES:
            raise DamagedEntry("its .json file is too long")
        try:
            info = json.loads(text)
        except ValueError:
            raise DamagedEntry("its .json file is not JSON") from None
        if not isinstance(info, dict) or not isinstance(info.get("digest"), str) or type(info.get("size")) is not int:
            raise DamagedEntry("its .json file is not {size, digest}")
        if info["size"] != size:
            raise DamagedEntry(f"it holds {info['size']} bytes, this session needs {size}")
        return info["digest"]

    def store(self, key: str, buffer, digest: str) -> None:
        """Keeps the bytes for the next root, evicting the least recently used entries to stay
        within max_bytes; an entry larger than max_bytes is not kept. Failures are logged only:
        the session goes on without a cache."""
        data, meta = self._paths(key)
        view = memoryview(buffer).cast("B")
        size = len(view)
        if self.max_bytes is not None and size > self.max_bytes:
            self.log(f"slice cache: not keeping {size} bytes of weights, above its limit of {self.max_bytes} bytes")
            return
        try:
            self._evict(room_for=size, keep=key)
            _write_replacing(data, view)
            _write_replacing(meta, json.dumps({"size": size, "digest": digest}).encode())
        except OSError as e:
            self.discard(key)
            self.log(f"cannot write the slice cache in {self.dir}: {e.strerror or e}")

    def discard(self, key: str) -> None:
        """Removes an entry (both files; either may be missing already)."""
        for p in self._paths(key):
            try:
                p.unlink(missing_ok=True)
            except OSError as e:
                self.log(f"cannot remove {p}: {e.strerror or e}")

    def _entries(self) -> list[tuple[float, int, str]]:
        """(last use, bytes, key) of every entry in the directory, oldest first."""
        out = []
        for p in self.dir.glob("*.slices"):
            if not _KEY.fullmatch(p.stem):
                continue  # not an entry of ours
            try:
                st = p.stat()
            except OSError:
                continue  # removed meanwhile
            out.append((st.st_mtime, st.st_size, p.stem))
        return sorted(out)

    def _evict(self, room_for: int, keep: str) -> None:
        now = time.time()
        for p in self.dir.glob("*.tmp"):
            try:
                if now - p.stat().st_mtime > STALE_TEMP_SECONDS:
                    p.unlink()
            except OSError:
                pass
        if self.max_bytes is None:
            return
        entries = [e for e in self._entries() if e[2] != keep]
        total = sum(size for _, size, _ in entries)
        for _, size, key in entries:
            if total + room_for <= self.max_bytes:
                break
            self.log(f"slice cache: removing {key}.slices ({size} bytes), the least recently used, for room")
            self.discard(key)
            total -= size


def _read_exactly(path: Path, size: int, digest: str) -> np.ndarray:
    """The file's `size` bytes in anonymous memory, hashed as they are read; a file of another
    size (also one truncated or grown while it is read) or another digest is a DamagedEntry."""
    with open(path, "rb", buffering=0) as f:
        actual = os.fstat(f.fileno()).st_size
        if actual != size:
            raise DamagedEntry(f"it is {actual} bytes, its .json says {size}")
        buffer = np.empty(size, dtype=np.uint8)
        view = memoryview(buffer)
        h = weight_digest()
        at = 0
        while at < size:
            n = f.readinto(view[at:at + READ_CHUNK])
            if not n:
                raise DamagedEntry(f"it ended after {at} of {size} bytes while being read")
            h.update(view[at:at + n])
            at += n
        if f.read(1):
            raise DamagedEntry(f"it grew beyond {size} bytes while being read")
    if h.hexdigest() != digest:
        raise DamagedEntry("digest differs")
    return buffer


def _write_replacing(path: Path, data) -> None:
    """Writes to a temporary file of its own in the same directory, syncs it, renames it to
    `path`: a reader sees the old file or the new one, never part of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with open(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
