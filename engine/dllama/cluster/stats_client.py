"""The root's side of STATS: one authenticated connection per worker, kept between requests
and opened again when it broke. Everything a worker sends is checked (node_stats) before use:
the frame's size by the protocol, then the fields, their types and their ranges."""
from __future__ import annotations

from dataclasses import dataclass

from . import node_stats
from .errors import ClusterError
from .protocol import Channel, Frame, ProtocolError
from .root import WorkerAddress, open_channel

# how long a worker has to answer (the handshake, or one STATS frame)
STATS_TIMEOUT = 5.0


class BadReport(ClusterError):
    """The worker answered, but not with figures this root accepts."""


@dataclass(frozen=True)
class Report:
    instance: str  # the worker process's random id: a new one means it restarted
    serving: bool  # it is in a session (with this root or another)
    figures: dict[str, float | int | None]


def refused(error: BaseException) -> bool:
    """Nothing listens at the address (the process is gone), as opposed to a slow or odd peer."""
    return isinstance(error, ConnectionRefusedError) or isinstance(error.__context__, ConnectionRefusedError)


def parse_report(obj: dict) -> Report:
    """A STATS reply's JSON object as a Report; ValueError naming what is wrong."""
    serving = obj.get("serving")
    if not isinstance(serving, bool):
        raise ValueError("serving is not true or false")
    return Report(node_stats.check_instance(obj.get("instance")), serving, node_stats.check_figures(obj.get("figures")))


class StatsLink:
    def __init__(self, address: WorkerAddress, key: bytes, timeout: float = STATS_TIMEOUT) -> None:
        self.address, self.key, self.timeout = address, key, timeout
        self._ch: Channel | None = None

    def ask(self) -> Report:
        """The worker's figures now. A kept connection that broke is opened again once; a worker
        that cannot be reached raises ClusterError (refused() tells a vanished process), one
        that answers badly BadReport."""
        for _ in range(2):
            fresh = self._ch is None
            try:
                if self._ch is None:
                    self._ch = open_channel(self.address, self.key, self.timeout)
                self._ch.set_deadline(self.timeout)
                self._ch.send_json(Frame.STATS, {})
                obj = self._ch.recv_json(Frame.STATS)
            except (ClusterError, ProtocolError) as e:
                self.close()
                if fresh:
                    if isinstance(e, ClusterError):
                        raise
                    raise ClusterError(str(self.address), str(e)) from e
                continue  # the kept connection broke (the worker restarted, or closed it idle)
            try:
                return parse_report(obj)
            except ValueError as e:
                self.close()
                raise BadReport(str(self.address), f"malformed STATS reply: {e}") from None
        raise AssertionError("unreachable: the second try opens a fresh connection")

    def close(self) -> None:
        if self._ch is not None:
            self._ch.sock.close()
            self._ch = None
