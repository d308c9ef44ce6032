"""`dllama-api` as clients use it: a real server process on 127.0.0.1 serving a tiny random
Qwen3-MoE (real Qwen3 tokenizer), driven by the official `openai` client and raw `httpx`.

The server's temperature-0 text is compared with `dllama inference --temperature 0` given the
chat prompt rendered by the template: the same token ids through the same engine, so the same
text. Worker loss is in test_api_cluster.py (a real worker killed and restarted).
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dllama.testing.checkpoint import make_checkpoint
from dllama.tokenizer import Tokenizer

CONTEXT = 2048
PARALLEL = 4
QUEUE = 6  # 4 generating, 2 waiting
API_KEY = "test-key-0123456789"
STEPS = 24
NTHREADS = 1  # no spinning thread pool to starve when other jobs share the cores
MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hello, world! 안녕하세요."}]
ENDPOINT = "/v1/chat/completions"


# fixtures


def _dllama(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dllama", *map(str, args)], capture_output=True, text=True,
                          check=True, timeout=300)


def _api_command() -> list[str]:
    script = Path(sys.executable).with_name("dllama-api")
    return [str(script)] if script.exists() else [sys.executable, "-m", "dllama.server.main"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    hf = make_checkpoint(root / "hf", preset="tiny", arch="qwen3_moe", seed=2)
    model = root / "tiny.m"
    _dllama("convert", hf, "-o", model, "--weights", "q40")
    return hf, model


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return Tokenizer.load(tiny[0])


class Server:
    def __init__(self, url: str, process: subprocess.Popen, log: Path) -> None:
        self.url = url
        self.process = process
        self.log = log
        self.http = httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {API_KEY}"})
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=180)

    def metric(self, name: str, **labels: str) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return 0.0

    def health(self) -> httpx.Response:
        return httpx.get(f"{self.url}/health", timeout=10)

    def chat(self, messages=MESSAGES, **kwargs):
        kwargs.setdefault("max_tokens", STEPS)
        kwargs.setdefault("temperature", 0)
        return self.client.chat.completions.create(model="tiny", messages=messages, **kwargs)


def start_server(tiny, root: Path, *extra: str) -> Server:
    """dllama-api on 127.0.0.1 and a free port, with an API key; returns once /health says 200."""
    hf, model = tiny
    key_file = root / "api-key"
    key_file.write_text(API_KEY + "\n")
    key_file.chmod(0o600)
    port = _free_port()
    log = root / "server.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [*_api_command(), "--model", model, "--tokenizer", hf, "--buffer-float-type", "q80",
             "--nthreads", str(NTHREADS), "--max-seq-len", str(CONTEXT), "--host", "127.0.0.1", "--port", str(port),
             "--parallel", str(PARALLEL), "--queue-size", str(QUEUE), "--api-key-file", key_file,
             "--model-name", "tiny", "--log-level", "warning", *extra],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None:
            pytest.fail(f"dllama-api exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            pytest.fail(f"dllama-api did not come up:\n{log.read_text()}")
        time.sleep(0.1)
    return Server(url, process, log)


def stop_server(srv: Server, timeout: float = 20) -> None:
    """SIGTERM, then the exit a clean shutdown gives, without a traceback in the log."""
    srv.http.close()
    srv.client.close()
    srv.process.terminate()
    try:
        code = srv.process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        srv.process.kill()
        srv.process.wait()
        pytest.fail(f"dllama-api did not stop on SIGTERM within {timeout} s:\n{srv.log.read_text()}")
    assert code in (0, -15), srv.log.read_text()  # uvicorn re-raises SIGTERM once it has shut down
    assert "Traceback" not in srv.log.read_text(), srv.log.read_text()


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    srv = start_server(tiny, tmp_path_factory.mktemp("server"))
    try:
        yield srv
    finally:
        if srv.process.poll() is None:
            stop_server(srv)


def cli_greedy(tiny, prompt: str, steps: int) -> str:
    """The text `dllama inference --temperature 0` prints after the prompt."""
    hf, model = tiny
    run = _dllama("inference", "--model", model, "--tokenizer", hf, "--prompt", prompt, "--steps", steps,
                  "--buffer-float-type", "q80", "--nthreads", NTHREADS, "--max-seq-len", CONTEXT, "--temperature", 0)
    assert run.stdout.startswith(prompt)
    return run.stdout[len(prompt): run.stdout.rindex("\n\nEvaluation\n")]


def evict_cache(server: Server, slots: int = PARALLEL) -> None:
    """One-token prompts sharing no first token with the chat prompts nor with each other, one per
    slot: each takes the least recently used slot, so the next chat starts from scratch."""
    for token in range(1000, 1000 + slots):
        r = server.http.post("/v1/completions", json={"prompt": [token], "max_tokens": 1, "temperature": 0})
        assert r.status_code == 200, r.text


class Streams:
    """Chat streams read in threads: the text of each, whether its first chunk came, its finish
    reason (None when closed before its end). Stream i stops reading and closes once close[i] is set."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.texts: dict[int, str] = {}
        self.first: dict[int, threading.Event] = {}
        self.close: dict[int, threading.Event] = {}
        self.finish: dict[int, str | None] = {}
        self.errors: list[BaseException] = []
        self.threads: dict[int, threading.Thread] = {}

    def open(self, i: int, messages, max_tokens: int) -> None:
        self.first[i], self.close[i] = threading.Event(), threading.Event()
        self.threads[i] = threading.Thread(target=self._read, args=(i, messages, max_tokens))
        self.threads[i].start()

    def _read(self, i: int, messages, max_tokens: int) -> None:
        try:
            text, finish = "", None
            stream = self.server.chat(messages, max_tokens=max_tokens, stream=True)
            for chunk in stream:
                self.first[i].set()
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                    finish = chunk.choices[0].finish_reason or finish
                if self.close[i].is_set():
                    break
            stream.close()
            self.texts[i], self.finish[i] = text, finish
        except BaseException as e:  # noqa: BLE001 - reported by join()
            self.errors.append(e)
        finally:
            self.first[i].set()

    def close_all(self) -> None:
        for close in self.close.values():
            close.set()

    def join(self, timeout: float = 120) -> None:
        for i, t in self.threads.items():
            t.join(timeout=timeout)
            assert not t.is_alive(), f"stream {i} did not end"
        assert not self.errors, self.errors


def wait_for_queue(server: Server, running: int, waiting: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        queue = server.health().json()["queue"]
        if (queue["running"], queue["waiting"]) == (running, waiting):
            return
        assert time.monotonic() < deadline, queue
        time.sleep(0.005)


def steps_of_one_sequence(server: Server) -> tuple[float, float]:
    """(engine steps that advanced a single sequence, all engine steps) so far."""
    return server.metric("dllama_step_sequences_bucket", le="1.0"), server.metric("dllama_step_sequences_count")


# the model, the server


def test_health_is_ok(server):
    r = server.health()
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["workers"] == []
    assert body["queue"] == {"waiting": 0, "running": 0, "parallel": PARALLEL, "size": QUEUE}


def test_models_lists_the_model_with_its_context_length(server):
    models = server.client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    card = models.data[0].model_dump()
    assert card["context_length"] == CONTEXT and card["owned_by"] == "dllama"
    assert server.http.get("/v1/models/tiny").json()["id"] == "tiny"
    assert server.http.get("/v1/models/other").status_code == 404


def test_chat_at_temperature_0_equals_dllama_inference(server, tiny, tokenizer):
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    # the server encodes the rendered chat without special tokens, the CLI its prompt with them:
    # for Qwen3 (no BOS) these are the same ids, so the same engine must give the same text
    assert tokenizer.encode(prompt) == tokenizer.encode(prompt, add_special_tokens=False)
    expected = cli_greedy(tiny, prompt, STEPS)
    assert expected.strip() and "<think>" not in expected

    whole = server.chat()
    assert whole.choices[0].message.content == expected
    assert whole.choices[0].finish_reason == "length"

    chunks = list(server.chat(stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == STEPS

    plain = server.client.completions.create(model="tiny", prompt=prompt, max_tokens=STEPS, temperature=0)
    assert plain.choices[0].text == expected


def test_stop_strings_end_the_reply_before_them(server):
    full = server.chat().choices[0].message.content
    stop = full[len(full) // 2: len(full) // 2 + 3]
    cut = full[: full.index(stop)]
    reply = server.chat(stop=stop)
    assert reply.choices[0].message.content == cut and reply.choices[0].finish_reason == "stop"
    streamed = server.chat(stop=["never appears", stop], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == cut


def test_max_tokens_ends_with_length(server):
    reply = server.chat(max_tokens=3)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 3
    reply = server.chat(max_completion_tokens=2)
    assert reply.usage.completion_tokens == 2


def test_a_seed_reproduces_a_sampled_reply(server):
    a, b, c = (server.chat(temperature=0.8, top_p=0.9, seed=s).choices[0].message.content for s in (7, 7, 8))
    assert a == b
    assert a != c


def test_usage_counts_the_rendered_prompt(server, tokenizer):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello,"}, {"type": "text", "text": "world"}]}]
    for messages, thinking in ((MESSAGES, None), (parts, False)):
        flat = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str)
                 else "\n".join(p["text"] for p in m["content"])} for m in messages]
        rendered = tokenizer.apply_chat_template(flat, add_generation_prompt=True, enable_thinking=thinking)
        extra = {"chat_template_kwargs": {"enable_thinking": False}} if thinking is False else {}
        usage = server.chat(messages, max_tokens=4, extra_body=extra).usage
        assert usage.prompt_tokens == len(tokenizer.encode(rendered, add_special_tokens=False))
        assert usage.completion_tokens == 4
        assert usage.total_tokens == usage.prompt_tokens + 4
    assert "<think>\n\n</think>" in rendered  # thinking off: the template closes an empty block


PROMPTS = ["Hi", "Count to ten, slowly.", "Name three colours of the sea, one per line, and say why.",
           "Tell me a long story about a fox who lived by a river and a heron that never slept. " * 6]


def test_four_concurrent_streams_each_return_what_they_return_alone(server):
    conversations = [[{"role": "user", "content": p}] for p in PROMPTS]  # prompts of 10 to 120 tokens
    alone = []
    for messages in conversations:
        chunks = list(server.chat(messages, max_tokens=160, stream=True))
        alone.append("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))
    single_before, steps_before = steps_of_one_sequence(server)
    streams = Streams(server)
    for i, messages in enumerate(conversations):
        streams.open(i, messages, 160)
    streams.join()
    for i, text in enumerate(alone):
        assert streams.texts[i] == text, i
    single, steps = steps_of_one_sequence(server)
    assert steps - steps_before > single - single_before  # some steps advanced several at once


def test_requests_beyond_parallel_plus_queue_get_429(server):
    streams = Streams(server)
    for i in range(QUEUE):
        streams.open(i, [{"role": "user", "content": f"Count to {i}, slowly."}], CONTEXT - 100)
    try:
        wait_for_queue(server, running=PARALLEL, waiting=QUEUE - PARALLEL)
        rejected = server.http.post(ENDPOINT, json={"messages": MESSAGES, "max_tokens": 1})
    finally:
        streams.close_all()
        streams.join()
    assert rejected.status_code == 429
    assert int(rejected.headers["Retry-After"]) >= 1
    assert rejected.json()["error"]["type"] == "rate_limit_error"
    assert server.metric("dllama_requests_total", endpoint=ENDPOINT, status="429") >= 1


def test_a_cancelled_stream_frees_its_slot_for_a_waiting_request(server):
    streams = Streams(server)
    for i in range(PARALLEL):
        streams.open(i, [{"role": "user", "content": f"Say {i} forever."}], CONTEXT - 100)
    try:
        wait_for_queue(server, running=PARALLEL, waiting=0)
        streams.open(PARALLEL, MESSAGES, CONTEXT - 100)
        wait_for_queue(server, running=PARALLEL, waiting=1)
        assert not streams.first[PARALLEL].is_set()
        streams.close[0].set()
        assert streams.first[PARALLEL].wait(timeout=10), "the fifth request did not start"
        # the fifth and the other three, all generating
        assert server.health().json()["queue"] == {"waiting": 0, "running": PARALLEL, "parallel": PARALLEL,
                                                   "size": QUEUE}
    finally:
        streams.close_all()
        streams.join()
    assert all(streams.finish[i] is None for i in range(PARALLEL + 1))  # each closed before its end


def test_a_second_turn_reuses_its_slots_prefix(server):
    """Two conversations interleaved: each next turn finds its own first turn in a slot, and
    answers as it does with nothing cached."""
    evict_cache(server)
    other = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a river."}]
    chats = {"a": MESSAGES, "b": other}
    first = {name: server.chat(messages, max_tokens=8) for name, messages in chats.items()}
    assert all(f.usage.prompt_tokens_details.cached_tokens == 0 for f in first.values())
    turns = {name: [*messages, {"role": "assistant", "content": first[name].choices[0].message.content},
                    {"role": "user", "content": "And then?"}] for name, messages in chats.items()}
    reused_before = server.metric("dllama_prompt_tokens_cached_total")
    cached = {name: server.chat(turn, max_tokens=12) for name, turn in turns.items()}
    for name, reply in cached.items():
        assert reply.usage.prompt_tokens_details.cached_tokens >= first[name].usage.prompt_tokens, name
    assert server.metric("dllama_prompt_tokens_cached_total") - reused_before == sum(
        r.usage.prompt_tokens_details.cached_tokens for r in cached.values())
    for name, turn in turns.items():
        evict_cache(server)
        fresh = server.chat(turn, max_tokens=12)
        assert fresh.usage.prompt_tokens_details.cached_tokens == 0
        assert cached[name].choices[0].message.content == fresh.choices[0].message.content, name


def test_a_client_leaving_mid_stream_frees_the_engine(server):
    generated = server.metric("dllama_generated_tokens_total")
    left = server.metric("dllama_requests_total", endpoint=ENDPOINT, status="499")
    stream = server.chat(max_tokens=CONTEXT - 100, stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    deadline = time.monotonic() + 5
    while server.health().json()["queue"]["running"]:
        assert time.monotonic() < deadline, "the engine kept generating for a client that left"
        time.sleep(0.01)
    assert server.metric("dllama_generated_tokens_total") - generated < CONTEXT // 2
    started = time.monotonic()
    assert server.chat(max_tokens=2).usage.completion_tokens == 2
    assert time.monotonic() - started < 5
    deadline = time.monotonic() + 5
    while server.metric("dllama_requests_total", endpoint=ENDPOINT, status="499") != left + 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)


# bad requests: each gets its status and an OpenAI-shaped error, and the next good one works

GOOD = {"model": "tiny", "messages": MESSAGES, "max_tokens": 1}
BAD_REQUESTS = {
    "malformed json": (b'{"messages": [', None, 400, None),
    "lone surrogate": (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', None, 400, None),
    "not an object": (b"[1, 2]", None, 400, None),
    "messages is a string": ({**GOOD, "messages": "hi"}, None, 400, "messages"),
    "temperature is a string": ({**GOOD, "temperature": "hot"}, None, 400, "temperature"),
    "max_tokens is a string": ({**GOOD, "max_tokens": "ten"}, None, 400, "max_tokens"),
    "stream is a string": ({**GOOD, "stream": "yes"}, None, 400, "stream"),
    "content is a number": ({**GOOD, "messages": [{"role": "user", "content": 5}]}, None, 400,
                            "messages[0].content"),
    "unknown role": ({**GOOD, "messages": [{"role": "wizard", "content": "hi"}]}, None, 400, "messages[0].role"),
    "empty messages": ({**GOOD, "messages": []}, None, 400, "messages"),
    "image part": ({**GOOD, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
                   None, 400, "messages[0].content[0].type"),
    "n is 2": ({**GOOD, "n": 2}, None, 400, "n"),
    "over the context": ({**GOOD, "max_tokens": CONTEXT}, None, 400, "messages"),
    "body over 1 MiB": ({**GOOD, "messages": [{"role": "user", "content": "x" * (1 << 20)}]}, None, 413, None),
    "no api key": (GOOD, {"Authorization": ""}, 401, None),
    "wrong api key": (GOOD, {"Authorization": "Bearer wrong"}, 401, None),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_a_bad_request_gets_its_error_and_the_next_one_works(server, name):
    body, headers, status, param = BAD_REQUESTS[name]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = server.http.post(ENDPOINT, content=content, headers={"Content-Type": "application/json", **(headers or {})})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    if status == 400:
        assert error["type"] == "invalid_request_error"
    if name == "over the context":
        assert error["code"] == "context_length_exceeded"
    assert server.http.post(ENDPOINT, json=GOOD).status_code == 200


def test_the_openai_client_sees_its_own_errors(server):
    with pytest.raises(openai.BadRequestError):
        server.chat([{"role": "wizard", "content": "hi"}])
    anonymous = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=1)
    anonymous.close()
    assert server.http.get("/v1/nowhere").json()["error"]["message"]


def test_metrics_has_the_listed_series(server):
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("dllama_requests", "dllama_prompt_tokens", "dllama_prompt_tokens_cached", "dllama_generated_tokens",
                 "dllama_prefill_tokens_per_second", "dllama_decode_tokens_per_second", "dllama_sync_ms_per_token",
                 "dllama_sent_kb_per_token", "dllama_recv_kb_per_token", "dllama_queue_length",
                 "dllama_requests_running", "dllama_cluster_up", "dllama_worker_up", "dllama_parallel",
                 "dllama_generated_tokens_per_second", "dllama_step_tokens", "dllama_step_sequences"):
        assert name in families, name
    assert server.metric("dllama_cluster_up") == 1
    assert server.metric("dllama_parallel") == PARALLEL
    assert server.metric("dllama_decode_tokens_per_second") > 0
    steps = server.metric("dllama_step_tokens_count")
    server.chat(max_tokens=5)
    assert server.metric("dllama_step_tokens_count") - steps == 5  # the prompt's step, then 4 of one token
    assert server.metric("dllama_generated_tokens_per_second") >= 5 / 10  # those 5, in the last 10 s
    assert server.metric("dllama_requests_total", endpoint=ENDPOINT, status="200") > 0


def test_a_missing_model_file_is_one_line_and_exit_1(tmp_path):
    run = subprocess.run([*_api_command(), "--model", tmp_path / "missing.m", "--port", "1"], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 1
    assert "model file not found" in run.stderr and "Traceback" not in run.stderr


def test_more_parallel_sequences_than_the_engine_holds_is_one_line_and_exit_1(tmp_path):
    run = subprocess.run([*_api_command(), "--model", tmp_path / "missing.m", "--parallel", "257"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert "--parallel is at most 256, got 257" in run.stderr and "Traceback" not in run.stderr


def test_the_server_starts_as_dllama_does(tiny, tmp_path):
    """One launcher: the same notes on ignored and mismatched flags, the same line describing the
    model, each under its own command's name."""
    hf, model = tiny
    flags = ["--weights-float-type", "f32", "--nbatches", "2"]  # the model's weights are q40
    srv = start_server(tiny, tmp_path, *flags)
    stop_server(srv)
    served = srv.log.read_text()
    ran = _dllama("inference", "--model", model, "--tokenizer", hf, "--prompt", "Hi", "--steps", 1,
                  "--buffer-float-type", "q80", "--nthreads", NTHREADS, "--max-seq-len", CONTEXT, *flags).stderr

    def description(prog: str, text: str) -> str:
        return next(line[len(prog) + 2:] for line in text.splitlines() if line.startswith(f"{prog}: qwen3_moe, "))

    for prog, text in (("dllama-api", served), ("dllama", ran)):
        assert f"{prog}: note: --nbatches is ignored (the prompt is evaluated in one batch)" in text, text
        assert f"{prog}: note: the model's weights are q40, not f32" in text, text
    # the same engine but for the sequences it holds: PARALLEL KV caches where dllama has one
    kv = re.compile(r"(\d+ sequences, )?KV cache ([\d.]+) MiB")
    api, cli = description("dllama-api", served), description("dllama", ran)
    assert kv.sub("KV", api) == kv.sub("KV", cli)
    assert kv.search(api).group(1) == f"{PARALLEL} sequences, " and kv.search(cli).group(1) is None
    mib = [float(kv.search(text).group(2)) for text in (api, cli)]
    assert mib[0] == pytest.approx(PARALLEL * mib[1], abs=0.1 * PARALLEL)  # each rounded to 0.1 MiB
    assert f"context {CONTEXT}, KV cache " in cli and ", buffer q80, 1 thread, 1 node" in cli
    assert f"dllama-api: serving tiny (context {CONTEXT}, parallel {PARALLEL}, queue {QUEUE}) on http" in served


def test_parallel_1_serves_one_request_at_a_time_in_order(tiny, tmp_path):
    srv = start_server(tiny, tmp_path, "--parallel", "1", "--queue-size", "3")
    streams = Streams(srv)
    try:
        assert srv.health().json()["queue"] == {"waiting": 0, "running": 0, "parallel": 1, "size": 3}
        for i in range(3):
            streams.open(i, [{"role": "user", "content": f"Say {i} forever."}], CONTEXT - 100)
            wait_for_queue(srv, running=1, waiting=i)
        assert srv.http.post(ENDPOINT, json={"messages": MESSAGES, "max_tokens": 1}).status_code == 429
        for i in range(3):
            assert streams.first[i].wait(timeout=10), i
            assert not any(streams.first[k].is_set() for k in range(i + 1, 3)), i  # the later ones wait
            streams.close[i].set()
        streams.join()
        single, steps = steps_of_one_sequence(srv)
        assert single == steps > 0
    finally:
        streams.close_all()
        stop_server(srv)


def test_shutting_down_ends_every_stream_with_an_error_event_at_once(tiny, tmp_path):
    srv = start_server(tiny, tmp_path)
    try:
        streams = [srv.chat([{"role": "user", "content": f"Say {i} forever."}], max_tokens=CONTEXT - 100,
                            stream=True) for i in range(2)]
        for stream in streams:
            next(iter(stream))  # generating
        srv.process.terminate()
        started = time.monotonic()
        for stream in streams:
            with pytest.raises(openai.APIError, match="shutting down"):
                for _ in stream:
                    pass
        srv.process.wait(timeout=20)
        assert time.monotonic() - started < 5  # not the 5 s graceful timeout, nor the whole reply
    finally:
        srv.http.close()
        srv.client.close()
        if srv.process.poll() is None:
            srv.process.kill()
            srv.process.wait()
    assert "Traceback" not in srv.log.read_text(), srv.log.read_text()
