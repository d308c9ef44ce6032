"""Progress bars, one rule: on stderr, and only when stderr is a terminal. A log file, a pipe or
the journal gets no bar (tqdm would write hundreds of redraws into it); the figures that end a
run are printed either way."""
from __future__ import annotations

import sys

from tqdm import tqdm


def byte_bar(total: int, desc: str, *, enabled: bool = True) -> tqdm:
    """A bar counting bytes (update(n) with each n written or sent). enabled=False: never shown."""
    # disable=None: tqdm shows the bar only when its file is a terminal
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                disable=None if enabled else True, dynamic_ncols=True)
