"""Connections from strangers: read deadlines, a connection cap, JSON on every error the HTTP layer
sends itself, and a file descriptor limit that fits the cap.

uvicorn (h11) on its own keeps a connection open for as long as its client likes: a request
head or body that never ends holds a socket and a file descriptor for good (slowloris), and a
few hundred of them run the process out of descriptors, after which asyncio's accept loop logs
a traceback per retry, many thousands a second. uvicorn has a keep-alive timeout, but no read
deadline; its limit_concurrency answers in plain text, and only after reading a whole request
head; its 400 for a malformed request is plain text. So `dllama-api` runs uvicorn with
`GuardedH11Protocol`, uvicorn's own h11 protocol plus:

  - a request deadline: a request (head and body) must arrive within request_timeout seconds
    of its first byte, or of the connection's opening for the first one; bytes trickling in do
    not extend it. Then 408 (unless a response has begun, or the client has sent nothing at
    all: it may be sending its request just then) and close.
  - a connection cap: a connection beyond max_connections gets 503 at once and never reaches
    the HTTP parser; its socket stays half-open for a moment (a lingering close) so the client
    reads the 503 rather than a reset. Refusals lingering at once are capped too: beyond that,
    503 and close at once.
  - OpenAI's JSON error body on the 400 the h11 layer answers itself: a malformed request line
    or header, a bad Content-Length, a request head over the size limit (431).

A subclass rather than an asyncio-level wrapper because the deadline must know where a request
ends, and only the protocol's h11 state knows that. An idle keep-alive connection is closed by
uvicorn's own timeout_keep_alive, set by `uvicorn_options`.
"""
from __future__ import annotations

import asyncio
import http
import json
import logging
import os
import resource
import sys
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .errors import ApiError, unavailable

log = logging.getLogger("dllama.api")

DEFAULT_MAX_CONNECTIONS = 256
DEFAULT_REQUEST_TIMEOUT = 15.0  # seconds for a request's head and body: ample for 1 MiB on a slow link
DEFAULT_KEEP_ALIVE_TIMEOUT = 5.0  # seconds an idle connection stays open between requests
MAX_HEAD_BYTES = 16 * 1024  # a request line plus headers beyond this get 431 (h11's own default)
REFUSAL_LINGER_SECONDS = 1.0  # a refused connection's time to read its 503
MAX_LINGERING_REFUSALS = 64  # refused connections half-open at once; more are closed at once
# The listen queue, and so the most connections asyncio accepts in one go, before any of them
# reaches connection_made and the cap (uvicorn's default is 2048): descriptors must hold a burst.
ACCEPT_BACKLOG = 128
SPARE_FDS = 64  # descriptors beyond those open at start and the connections: worker sockets, files, logs
MAX_ERROR_DETAIL = 200  # characters of h11's reason quoted back in a 400
TOO_MANY_CONNECTIONS = unavailable("The server has too many open connections; retry shortly.", retry_after=1)


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    keep_alive_timeout: float = DEFAULT_KEEP_ALIVE_TIMEOUT


def uvicorn_options(limits: ConnectionLimits) -> dict[str, Any]:
    """The keyword arguments of uvicorn.Config that enforce limits."""
    return {
        "http": protocol_class(limits),
        "timeout_keep_alive": limits.keep_alive_timeout,
        "h11_max_incomplete_event_size": MAX_HEAD_BYTES,
        "backlog": ACCEPT_BACKLOG,
        "limit_concurrency": None,  # the cap is GuardedH11Protocol's: JSON, and before any parsing
    }


def protocol_class(limits: ConnectionLimits) -> type[GuardedH11Protocol]:
    """GuardedH11Protocol bound to limits (uvicorn creates the protocol itself, from a class)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits, "lingering": set()})


class GuardedH11Protocol(H11Protocol):
    limits = ConnectionLimits()
    lingering: set[_Refusal] = set()  # refused connections still half-open, shared by every connection

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._heard = False  # any byte yet: a silent connection is closed without a 408 it never asked for

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        open_now = len(self.connections)  # uvicorn's set of this server's connections
        if open_now >= self.limits.max_connections:
            log.warning("refused a connection: %d are open (--max-connections)", open_now)
            refusal = _Refusal(self.lingering, self.loop)
            transport.set_protocol(refusal)
            refusal.connection_made(transport)
            return
        super().connection_made(transport)
        self._arm_deadline()  # the first request is due from the opening, like a later one from its first byte

    def data_received(self, data: bytes) -> None:
        self._heard = True
        if self._deadline is None and self.conn.their_state in (h11.IDLE, h11.SEND_BODY):
            self._arm_deadline()  # the first byte of a request after an idle keep-alive spell
        super().data_received(data)
        self._disarm_once_read()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # a pipelined request parsed just now may still owe its body
        if self._deadline is None and self.conn.their_state is h11.SEND_BODY:
            self._arm_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        # uvicorn calls this while handling h11's RemoteProtocolError, which says what was wrong
        error = sys.exc_info()[1]
        status = getattr(error, "error_status_hint", 400)
        detail = str(error)[:MAX_ERROR_DETAIL] if error is not None and str(error) else msg
        self._close_with(ApiError(status, f"Invalid HTTP request: {detail}", code="invalid_http_request"))

    # the request deadline

    def _arm_deadline(self) -> None:
        self._deadline = self.loop.call_later(self.limits.request_timeout, self._request_timed_out)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _disarm_once_read(self) -> None:
        """Stop the clock once the request has fully arrived: the response may take its time."""
        if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
            self._disarm()

    def _request_timed_out(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        log.warning("closed a connection whose request did not arrive within %g s (--request-timeout)",
                    self.limits.request_timeout)
        if self._heard and self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):  # no response begun: say why
            self._close_with(ApiError(408, f"The request did not arrive within {self.limits.request_timeout:g} s.",
                                      code="request_timeout"))
        else:
            self.transport.close()  # connection_lost then ends the request in flight as a disconnect

    def _close_with(self, error: ApiError) -> None:
        self.transport.write(error_response(error))
        self.transport.close()


class _Refusal(asyncio.Protocol):
    """A connection over the cap: 503 at once, then a lingering close. Closing a socket with
    unread bytes sends a reset, which may reach the client before it has read the 503, so the
    write side is shut, whatever arrives is discarded, and the socket is closed when the client
    closes or after REFUSAL_LINGER_SECONDS."""

    def __init__(self, lingering: set[_Refusal], loop: asyncio.AbstractEventLoop) -> None:
        self._lingering = lingering
        self._loop = loop
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(error_response(TOO_MANY_CONNECTIONS))
        if len(self._lingering) >= MAX_LINGERING_REFUSALS:
            transport.close()  # a flood: the 503 is sent, but may be lost to the reset the close sends
            return
        self._lingering.add(self)
        if transport.can_write_eof():
            transport.write_eof()
        self._timer = self._loop.call_later(REFUSAL_LINGER_SECONDS, transport.abort)

    def data_received(self, data: bytes) -> None:
        pass  # the request is not read: it is refused whatever it says

    def eof_received(self) -> bool:
        return False  # the client is done: asyncio closes the socket

    def connection_lost(self, exc: Exception | None) -> None:
        self._lingering.discard(self)
        if self._timer is not None:
            self._timer.cancel()


def error_response(error: ApiError) -> bytes:
    """A whole HTTP/1.1 response carrying error's JSON body, ending the connection."""
    body = json.dumps(error.body()).encode("utf-8")
    headers = {"content-type": "application/json", "content-length": str(len(body)), "connection": "close",
               **{k.lower(): v for k, v in error.headers.items()}}
    head = f"HTTP/1.1 {error.status} {_reason(error.status)}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return (head + "\r\n").encode("latin-1") + body


def _reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""


# file descriptors


def fit_connection_cap(requested: int | None) -> int:
    """The connection cap to use, with the soft RLIMIT_NOFILE raised (up to the hard limit) to
    hold that many connections besides everything else. A cap the limit cannot hold raises
    ValueError when it was requested, and is lowered to fit (with a log line) when it was the
    default; either way accept() never runs out of descriptors because of connections."""
    cap = DEFAULT_MAX_CONNECTIONS if requested is None else requested
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    others = _open_descriptors() + MAX_LINGERING_REFUSALS + ACCEPT_BACKLOG + SPARE_FDS
    needed = others + cap
    if soft != resource.RLIM_INFINITY and soft < needed:
        raised = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
        if raised > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return cap
    fits = soft - others
    if requested is not None or fits < 1:
        raise ValueError(f"--max-connections {cap} needs about {needed} file descriptors, but the limit is "
                         f"{soft} (ulimit -n): raise it or lower --max-connections")
    log.warning("serving at most %d connections, not %d: the file descriptor limit is %d (ulimit -n)",
                fits, cap, soft)
    return fits


def _open_descriptors() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # no /proc: assume a small process
        return SPARE_FDS
