"""A worker's slice cache: the weights it received, on disk, keyed by the model's content hash
and the slice plan, so a restarted root sends no weights. Damaged files are found by digest."""
from __future__ import annotations

import hashlib
import json
import mmap
import os
from pathlib import Path


def digest_of(buffer) -> str:
    h = hashlib.blake2b(digest_size=32)
    view = memoryview(buffer).cast("B")
    step = 16 * 1024 * 1024
    for i in range(0, len(view), step):
        h.update(view[i:i + step])
    return h.hexdigest()


class SliceCache:
    def __init__(self, directory: str | os.PathLike, log) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = log

    def _paths(self, key: str) -> tuple[Path, Path]:
        if not key.isalnum() or len(key) > 128:
            raise ValueError("malformed cache key")
        return self.dir / f"{key}.slices", self.dir / f"{key}.json"

    def load(self, key: str, size: int):
        """The cached buffer (a read-only memory map), or None when absent or damaged."""
        data, meta = self._paths(key)
        if not data.exists() or not meta.exists():
            return None
        try:
            info = json.loads(meta.read_text())
            if data.stat().st_size != size or info.get("size") != size:
                raise ValueError("size differs")
            with open(data, "rb") as f:
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
            if digest_of(mapped) != info.get("digest"):
                raise ValueError("digest differs")
            return mapped
        except (OSError, ValueError) as e:
            self.log(f"slice cache {data.name} is damaged ({e}); fetching the weights again")
            for p in (data, meta):
                p.unlink(missing_ok=True)
            return None

    def store(self, key: str, buffer, digest: str) -> None:
        data, meta = self._paths(key)
        tmp = data.with_suffix(".tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(memoryview(buffer).cast("B"))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, data)
            meta.write_text(json.dumps({"size": len(memoryview(buffer).cast("B")), "digest": digest}))
        except OSError as e:
            tmp.unlink(missing_ok=True)
            self.log(f"cannot write the slice cache in {self.dir}: {e.strerror}")
