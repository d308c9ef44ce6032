"""Errors that name the node they are about; no dependency beyond the standard library, so the
engine, the CLI and the API server share them."""
from __future__ import annotations


class ClusterError(ConnectionError):
    """A worker could not be reached, refused this root, or broke the protocol while joining."""

    def __init__(self, worker: str, message: str) -> None:
        super().__init__(f"worker {worker}: {message}")
        self.worker = worker
        self.address = worker


class WorkerLost(ConnectionError):
    """A worker stopped answering mid-step. address is its HOST:PORT ("" when unknown). The
    engine that raised it cannot go on: make a new one when the worker is back."""

    def __init__(self, address: str, reason: str = "") -> None:
        self.address = address
        self.reason = reason
        if reason and (not address or address in reason):
            message = reason  # it names the worker already
        else:
            message = f"worker {address or '?'} is down" + (f": {reason}" if reason else "")
        super().__init__(message)
