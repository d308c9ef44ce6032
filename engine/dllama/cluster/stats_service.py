"""The worker's answer to a root's STATS frames: on a connection of its own (authenticated like
any root's), never the session's, so a figures request cannot race a step.

A root keeps the connection and asks again every few seconds; a connection left idle for
IDLE_TIMEOUT is closed, and at most MAX_CONVERSATIONS are served at once (a root needs one).
"""
from __future__ import annotations

import secrets
import threading
from collections.abc import Callable

from . import node_stats
from .protocol import Channel, Frame, PeerClosed, ProtocolError, RemoteError

IDLE_TIMEOUT = 60.0
MAX_CONVERSATIONS = 4


class StatsService:
    def __init__(self, serving: Callable[[], bool], log: Callable[[str], None]) -> None:
        self.serving = serving
        self.log = log
        # a new one per process: the root learns from it that this worker restarted
        self.instance = secrets.token_hex(16)
        self._slots = threading.BoundedSemaphore(MAX_CONVERSATIONS)

    def reply(self) -> dict:
        return {"instance": self.instance, "serving": self.serving(), "figures": node_stats.read_local()}

    def serve(self, ch: Channel, peer: str) -> None:
        """Answers the STATS frame just read, then each next one, until the root leaves."""
        if not self._slots.acquire(blocking=False):
            ch.send_error(f"at most {MAX_CONVERSATIONS} figures connections at once")
            ch.sock.close()
            return
        try:
            ch.set_timeout(IDLE_TIMEOUT)
            while True:
                ch.send_json(Frame.STATS, self.reply())
                ch.recv(Frame.STATS)
        except (PeerClosed, RemoteError):
            pass  # the root is done asking
        except ProtocolError as e:
            self.log(f"root {peer}: figures connection closed: {e}")
        finally:
            self._slots.release()
            ch.sock.close()
