"""`dllama-api` against hostile or broken clients: a real server process on 127.0.0.1, raw sockets.

Half-sent requests (slowloris), idle connections, a connection flood over the cap, malformed
HTTP the h11 layer answers itself, JSON nested to blow the stack, temperatures that overflow a
division. Each ends with the same server answering a correct request. The deadlines are
short (flags) so the suite stays fast; the checks on them are bounds, not speed tests.
"""
from __future__ import annotations

import contextlib
import json
import logging
import resource
import selectors
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from dllama.server.connections import DEFAULT_MAX_CONNECTIONS, MAX_LINGERING_REFUSALS, REFUSAL_LINGER_SECONDS
from dllama.server.errors import ApiError
from dllama.server.logs import RateLimit
from dllama.server.schemas import MAX_JSON_DEPTH, parse_json

from test_api import API_KEY, MESSAGES, Server, _api_command, start_server, stop_server, tiny  # noqa: F401

REQUEST_TIMEOUT = 3.0
KEEP_ALIVE = 1.0
MARGIN = 10.0  # seconds of slack on every deadline: the machine may be busy with other tests
ATTACKERS = 300
CAP = 4
MAX_LOG_LINES = 50  # what an attack may add to the server's log
AUTHORIZATION = f"Authorization: Bearer {API_KEY}\r\n".encode()
HALF_SENT = [
    b"POST /v1/chat/compl",  # a request line, unfinished
    b"GET /health HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n",  # headers that never end
    (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + AUTHORIZATION +
     b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"prompt\": "),  # 11 of 1000 bytes
]


@contextlib.contextmanager
def running(model_files: tuple[Path, Path], root: Path, *flags: str) -> Iterator[Server]:
    srv = start_server(model_files, root, *flags)
    try:
        yield srv
    finally:
        if srv.process.poll() is None:
            stop_server(srv)


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):  # noqa: F811
    with running(tiny, tmp_path_factory.mktemp("hostile"), "--request-timeout", str(REQUEST_TIMEOUT),
                 "--keep-alive-timeout", str(KEEP_ALIVE), "--max-connections", str(ATTACKERS + 100)) as srv:
        yield srv


@pytest.fixture(scope="module")
def capped(tiny, tmp_path_factory):  # noqa: F811
    with running(tiny, tmp_path_factory.mktemp("capped"), "--max-connections", str(CAP),
                 "--request-timeout", str(REQUEST_TIMEOUT), "--keep-alive-timeout", "60") as srv:
        yield srv


# raw HTTP


def connect(srv: Server) -> socket.socket:
    host, port = srv.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=REQUEST_TIMEOUT + MARGIN)


def parse_response(data: bytes) -> tuple[int, dict[str, str], bytes] | None:
    """One whole response at the start of data: status, headers (lowercase names), body (by
    Content-Length); None while it is incomplete."""
    head, blank, body = data.partition(b"\r\n\r\n")
    if not blank:
        return None
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    length = int(headers["content-length"])
    return (int(status_line.split()[1]), headers, body[:length]) if len(body) >= length else None


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while (response := parse_response(data)) is None:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed mid-response: {data[:200]!r}"
        data += chunk
    return response


def whole_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    response = parse_response(data)
    assert response is not None, f"not a whole response: {data[:200]!r}"
    return response


def assert_json_error(status: int, headers: dict[str, str], body: bytes, expected: int) -> dict:
    assert status == expected, body
    assert headers["content-type"].startswith("application/json"), headers
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str), error
    return error


def closes(sock: socket.socket, within: float) -> bytes:
    """Everything the server sends until it closes the connection (EOF or reset), within seconds."""
    sock.settimeout(within)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received


def wait_closed(socks: list[socket.socket], deadline: float) -> dict[socket.socket, tuple[float, bytes]]:
    """For each socket, when the server closed it and what it had sent; fails past deadline."""
    done: dict[socket.socket, tuple[float, bytes]] = {}
    received = {s: b"" for s in socks}
    with selectors.DefaultSelector() as sel:
        for s in socks:
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
        while len(done) < len(socks):
            left = deadline - time.monotonic()
            assert left > 0, f"{len(socks) - len(done)} of {len(socks)} connections still open past the deadline"
            for key, _ in sel.select(timeout=min(left, 0.5)):
                s = key.fileobj
                try:
                    chunk = s.recv(65536)
                except ConnectionResetError:
                    chunk = b""
                except BlockingIOError:
                    continue
                if chunk:
                    received[s] += chunk
                    continue
                done[s] = (time.monotonic(), received[s])
                sel.unregister(s)
    return done


def log_lines(srv: Server) -> int:
    return len(srv.log.read_text().splitlines())


def chat_works(srv: Server) -> None:
    reply = srv.chat(max_tokens=4)
    assert reply.choices[0].message.content is not None and reply.usage.completion_tokens >= 1


# slowloris, idle connections, the cap


def test_half_sent_requests_are_closed_at_the_deadline_while_health_answers(server):
    lines = log_lines(server)
    opened = time.monotonic()
    attackers = []
    for i in range(ATTACKERS):
        s = connect(server)
        s.sendall(HALF_SENT[i % len(HALF_SENT)])
        attackers.append(s)

    # slowloris: a byte of header every 0.2 s does not extend the deadline
    tricklers = [connect(server) for _ in range(5)]
    stop = threading.Event()

    def trickle() -> None:
        for s in tricklers:
            s.sendall(b"GET /health HTTP/1.1\r\n")
        while not stop.wait(0.2):
            for s in tricklers:
                try:
                    s.send(b"X")
                except OSError:
                    pass  # closed by the server: what we wait for

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        health = httpx.get(f"{server.url}/health", timeout=REQUEST_TIMEOUT)
        during = time.monotonic() - opened
        assert health.status_code == 200 and health.json()["status"] == "ok"
        assert during < REQUEST_TIMEOUT, "the attack was over before /health was asked: the machine is too slow"

        closed = wait_closed(attackers + tricklers, deadline=opened + REQUEST_TIMEOUT + MARGIN)
    finally:
        stop.set()
        thread.join(timeout=5)
        for s in attackers + tricklers:
            s.close()

    for s in attackers:
        at, sent = closed[s]
        assert at - opened >= REQUEST_TIMEOUT - 0.5  # the deadline, not an early drop
        error = assert_json_error(*whole_response(sent), expected=408)
        assert error["code"] == "request_timeout"
    for s in tricklers:
        assert closed[s][0] - opened >= REQUEST_TIMEOUT - 0.5
    assert log_lines(server) - lines < MAX_LOG_LINES, server.log.read_text()
    chat_works(server)


def test_an_idle_keep_alive_connection_is_closed(server):
    with connect(server) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = read_response(s)
        assert status == 200 and headers.get("connection") != "close"
        answered = time.monotonic()
        assert closes(s, KEEP_ALIVE + MARGIN) == b""
        assert time.monotonic() - answered >= KEEP_ALIVE - 0.5

    with connect(server) as s:  # a connection that never says anything is closed at the request deadline
        opened = time.monotonic()
        assert closes(s, REQUEST_TIMEOUT + MARGIN) == b""  # no 408: a request may have been on its way
        assert time.monotonic() - opened >= REQUEST_TIMEOUT - 0.5
    chat_works(server)


def admitted(srv: Server) -> socket.socket:
    """A connection the server has taken in: it answered a request on it (and keeps it open).
    Retries while connections of earlier requests are still being let go."""
    deadline = time.monotonic() + MARGIN
    while True:
        s = connect(srv)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, _ = read_response(s)
        if status == 200:
            return s
        s.close()
        assert time.monotonic() < deadline, "the server never admitted a connection"
        time.sleep(0.1)


def test_connections_beyond_the_cap_get_503_json(capped):
    lines = log_lines(capped)
    holders = [admitted(capped) for _ in range(CAP)]
    try:
        with connect(capped) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            status, headers, body = read_response(s)
            error = assert_json_error(status, headers, body, expected=503)
            assert error["type"] == "service_unavailable" and headers["retry-after"] == "1"
            assert headers["connection"] == "close"
            assert closes(s, REFUSAL_LINGER_SECONDS + MARGIN) == b""

        # a flood over the cap: every one answered 503 or reset, all closed soon
        flood = [connect(capped) for _ in range(3 * MAX_LINGERING_REFUSALS)]
        closed = wait_closed(flood, deadline=time.monotonic() + REFUSAL_LINGER_SECONDS + MARGIN)
        answered = [sent for _, sent in closed.values() if sent]
        assert len(answered) >= MAX_LINGERING_REFUSALS
        for sent in answered:
            assert_json_error(*whole_response(sent), expected=503)
        for s in flood:
            s.close()
    finally:
        for s in holders:
            s.close()
    assert log_lines(capped) - lines < MAX_LOG_LINES, capped.log.read_text()
    admitted(capped).close()  # the slots are free again
    chat_works(capped)


# HTTP the h11 layer answers itself


@pytest.mark.parametrize("request_bytes, expected", [
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}", 400),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n{}", 400),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1e3\r\n\r\n{}", 400),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}", 400),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n{}", 413),
    (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /health HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n", 400),
    (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000, 431),  # a head past 16 KiB, still going
], ids=["letters", "negative", "float", "two-values", "huge", "bad-chunk", "request-line", "header", "huge-head"])
def test_malformed_http_gets_a_json_error(server, request_bytes, expected):
    authorized = request_bytes.replace(b"Host: x\r\n", b"Host: x\r\n" + AUTHORIZATION)
    with connect(server) as s:
        s.sendall(authorized)
        error = assert_json_error(*read_response(s), expected=expected)
        assert error["message"]
    chat_works(server)


# requests that used to get 500


def test_json_nested_900_deep_gets_400(server):
    nested: dict = {"x": 1}
    for _ in range(900):
        nested = {"a": nested}
    body = json.dumps({"model": "tiny", "messages": MESSAGES, "chat_template_kwargs": nested})
    r = server.http.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "chat_template_kwargs"
    r = server.http.post("/v1/completions", content="[" * 100_000, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", r.text
    chat_works(server)


def test_the_json_depth_limit_counts_the_body_as_level_1():
    def body(depth: int) -> bytes:  # the body nests depth levels, its innermost object included
        return b'{"k": ' * (depth - 1) + b"{}" + b"}" * (depth - 1)

    assert parse_json(body(MAX_JSON_DEPTH)) is not None
    with pytest.raises(ApiError) as refused:
        parse_json(body(MAX_JSON_DEPTH + 1))
    assert refused.value.status == 400 and refused.value.param == "k"


def test_a_tiny_temperature_is_greedy(server):
    greedy = server.chat(temperature=0).choices[0].message.content
    for temperature in (1e-39, 1e-45, 5e-324):
        reply = server.chat(temperature=temperature, seed=1)
        assert reply.choices[0].message.content == greedy, temperature


# file descriptors: the cap must fit the limit


def with_fd_limit(soft: int, hard: int, *argv: object) -> list[str]:
    """A command running python -m argv[0] argv[1:] under that RLIMIT_NOFILE."""
    code = ("import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), "
            "int(sys.argv[2]))); sys.argv = sys.argv[3:]; runpy.run_module(sys.argv[0], run_name='__main__')")
    return [sys.executable, "-c", code, str(soft), str(hard), *map(str, argv)]


def test_a_cap_the_fd_limit_cannot_hold_is_refused_at_start(tiny):  # noqa: F811
    hf, model = tiny
    run = subprocess.run(with_fd_limit(400, 400, "dllama.api", "--model", model, "--tokenizer", hf,
                                       "--max-connections", 1000, "--host", "127.0.0.1", "--port", 1),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1, run.stderr
    assert "--max-connections 1000 needs about" in run.stderr and "ulimit -n" in run.stderr, run.stderr


def test_the_soft_fd_limit_is_raised_to_fit_the_cap(tmp_path):
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2000:
        pytest.skip(f"the hard descriptor limit ({hard}) is too low to raise anything")
    (tmp_path / "fit.py").write_text(
        "import resource\nfrom dllama.server.connections import fit_connection_cap\n"
        "print(fit_connection_cap(1000), fit_connection_cap(None), resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n")
    run = subprocess.run(with_fd_limit(300, hard, "fit"), capture_output=True, text=True, timeout=60, check=True,
                         cwd=tmp_path)  # python -c finds modules in its working directory
    cap, default, raised = map(int, run.stdout.split())
    assert (cap, default) == (1000, DEFAULT_MAX_CONNECTIONS) and raised > 1000


# the log rate limit


def test_a_warning_kind_is_logged_once_per_window_with_a_count():
    now = [0.0]
    limit = RateLimit(window=10, clock=lambda: now[0])
    logger = logging.getLogger("test_api_hostile.rate")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    logger.addFilter(limit)
    try:
        for i in range(100):
            logger.warning("refused %d", i)
            logger.warning("another kind")
            logger.info("info lines pass: %d", i)
        assert [r.getMessage() for r in records if r.levelno == logging.WARNING] == ["refused 0", "another kind"]
        assert sum(r.levelno == logging.INFO for r in records) == 100
        now[0] = 10.0
        logger.warning("refused %d", 100)
        assert records[-1].getMessage() == "refused 100 (and 99 more like this not logged)"
    finally:
        logger.removeHandler(handler)
        logger.removeFilter(limit)
