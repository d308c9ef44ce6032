"""Socket options of the cluster's TCP connections, set in one place.

Every root-worker and worker-worker connection gets keepalive from Python as soon as it exists:
the control connection needs it during the long phases before the mesh takes it over (weights,
model build), and the native mesh keeps whatever options its sockets arrive with."""
from __future__ import annotations

import socket

# A peer that vanishes without a FIN (power cut, cable) is noticed within about
# KEEPIDLE + KEEPINTVL * KEEPCNT = 20 s, even while a worker waits for the next step.
KEEPALIVE_IDLE_S = 10
KEEPALIVE_INTERVAL_S = 2
KEEPALIVE_COUNT = 5


def keepalive(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE_S), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
                          ("TCP_KEEPCNT", KEEPALIVE_COUNT)):
        if hasattr(socket, option):  # not every platform has the per-socket knobs
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
