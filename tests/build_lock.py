"""One build at a time in a shared compile tree: pytest-xdist runs the tests two at a time, and
two workers that reach the same module- or session-scoped build (the wheelhouse, the native test
binaries) would otherwise compile into the same objects at once and corrupt them. The second one
waits, then finds the tree built and compiles nothing."""
from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def exclusive(tree: Path) -> Iterator[None]:
    """Holds an exclusive lock on `tree` (a lock file beside it) for the block."""
    tree.parent.mkdir(parents=True, exist_ok=True)
    with open(tree.parent / f".{tree.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
