"""Progress bars, one rule: drawn on stderr when it is a terminal, never into a pipe or a log."""
from __future__ import annotations

import fcntl
import os
import pty
import struct
import termios
import subprocess
import sys

import pytest

DRAW = ("from dllama.progress import byte_bar\n"
        "with byte_bar(3 << 20, 'weights to workers', enabled={enabled}) as bar:\n"
        "    for _ in range(3):\n"
        "        bar.update(1 << 20)\n")


def stderr_of(enabled: bool, terminal: bool) -> str:
    """What a process drawing a bar writes to its stderr, a pseudo-terminal or a pipe."""
    code = DRAW.format(enabled=enabled)
    if not terminal:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                              check=True).stderr
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns
    try:
        proc = subprocess.Popen([sys.executable, "-c", code], stderr=follower, stdout=subprocess.DEVNULL)
        os.close(follower)
        out = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the process closed its end
                break
            if not chunk:
                break
            out += chunk
        assert proc.wait(timeout=60) == 0
    finally:
        os.close(leader)
    return out.decode(errors="replace")


def test_a_bar_is_drawn_on_a_terminal():
    drawn = stderr_of(enabled=True, terminal=True)
    assert "weights to workers" in drawn and "100%" in drawn and "3.00M" in drawn


@pytest.mark.parametrize(("enabled", "terminal"), [(True, False), (False, True), (False, False)])
def test_no_bar_into_a_pipe_or_when_disabled(enabled, terminal):
    assert stderr_of(enabled, terminal) == ""
