"""The parts of `dllama-api` below HTTP: reply text (stop strings, <think> split), request
validation, the prefix cache and the engine host, on the real Qwen3 tokenizer and a real engine.

The host tests make a single-node step raise the ConnectionError a lost socket raises (the engine
is real and really recreated) to pin the state machine down in detail; test_api_cluster.py kills
a real worker.
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from dllama import Engine
from dllama.convert import convert
from dllama.generate import PrefixCache, generate
from dllama.sampler import Sampler
from dllama.server.errors import ApiError
from dllama.server.host import EngineDown, EngineHost, WorkerLost
from dllama.server.jobs import Job
from dllama.server.scheduler import QueueFull, Scheduler
from dllama.server.schemas import Sampling, chat_request, completion_request, parse_json
from dllama.server.text import (CONTENT, REASONING, ReasoningSplitter, ReplyText, StopStrings, join,
                                reasoning_mode)
from dllama.testing.checkpoint import make_checkpoint
from dllama.tokenizer import Tokenizer

DEFAULTS = Sampling(max_tokens=None, temperature=0.8, top_p=0.9, seed=None)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("api-units")
    hf = make_checkpoint(root / "hf", preset="tiny", arch="qwen3_moe", seed=3)
    model = root / "tiny.m"
    convert(hf, model, weights="q40", progress=False)
    return hf, model


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return Tokenizer.load(tiny[0])


# reply text


def reply(tokenizer, text: str, stops=(), mode: str | None = "detect", one_piece: bool = False):
    """Deltas of text generated token by token, and whether a stop string ended it."""
    r = ReplyText(tokenizer, stops, mode)
    deltas = []
    for token in tokenizer.encode(text, add_special_tokens=False):
        out, stopped = r.push(token)
        deltas += out
        if stopped:
            break
    return deltas + r.finish(), r.stopped


def test_stop_strings_hold_back_only_what_may_start_one():
    s = StopStrings(["END", "xyz"])
    assert s.push("hello E") == ("hello ", False)
    assert s.push("N") == ("", False)
    assert s.push("D and more") == ("", True)
    s = StopStrings(["END"])
    assert s.push("hello EN") == ("hello ", False)
    assert s.push("ough") == ("ENough", False)
    assert s.flush() == ""


def test_the_earliest_stop_string_wins():
    s = StopStrings(["world", "lo"])
    assert s.push("hello world") == ("hel", True)


def test_a_reply_without_think_tags_is_its_decoded_text(tokenizer):
    text = "Hello there <thinking> is not a tag, 안녕하세요."
    deltas, _ = reply(tokenizer, text)
    assert join(deltas) == {CONTENT: text, REASONING: ""}


def test_think_block_becomes_reasoning_content(tokenizer):
    deltas, _ = reply(tokenizer, "<think>\nI should greet.\n</think>\n\nHello!")
    assert join(deltas) == {CONTENT: "Hello!", REASONING: "I should greet."}
    kinds = [d.kind for d in deltas]
    assert REASONING not in kinds[kinds.index(CONTENT):]  # all the reasoning first


def test_streamed_pieces_join_to_the_whole_split(tokenizer):
    text = "<think>\nLine one.\n\nLine two.\n</think>\n\nThe answer\nis 42."
    r = ReplyText(tokenizer, (), "detect")
    pieces = []
    for token in tokenizer.encode(text, add_special_tokens=False):
        pieces += r.push(token)[0]
    pieces += r.finish()
    assert join(pieces) == {CONTENT: "The answer\nis 42.", REASONING: "Line one.\n\nLine two."}


def test_a_prompt_that_opened_think_starts_in_reasoning(tokenizer):
    deltas, _ = reply(tokenizer, "plan it</think>\n\nDone.", mode="reasoning")
    assert join(deltas) == {CONTENT: "Done.", REASONING: "plan it"}


def test_thinking_off_keeps_everything_as_content(tokenizer):
    deltas, _ = reply(tokenizer, "<think>x</think>y", mode="content")
    assert join(deltas) == {CONTENT: "<think>x</think>y", REASONING: ""}


def test_an_unfinished_think_block_is_reasoning(tokenizer):
    deltas, _ = reply(tokenizer, "<think>\nstill going")
    assert join(deltas) == {CONTENT: "", REASONING: "still going"}


def test_a_stop_string_inside_the_reply(tokenizer):
    deltas, stopped = reply(tokenizer, "<think>ok</think>\n\nOne. Two. Three.", stops=["Two"])
    assert stopped and join(deltas) == {CONTENT: "One. ", REASONING: "ok"}


def test_reasoning_mode_follows_the_template(tokenizer):
    messages = [{"role": "user", "content": "hi"}]
    assert reasoning_mode(tokenizer.apply_chat_template(messages)) == "detect"
    assert reasoning_mode(tokenizer.apply_chat_template(messages, enable_thinking=False)) == "content"
    assert reasoning_mode("<|im_start|>assistant\n<think>\n") == "reasoning"
    with pytest.raises(ValueError):
        ReasoningSplitter("sideways")


# request validation


def test_chat_request_flattens_parts_and_maps_developer_to_system():
    req = chat_request({"messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None, "reasoning_content": "hmm"},
    ], "seed": -1, "stop": "x", "chat_template_kwargs": {"enable_thinking": False}}, DEFAULTS)
    assert req.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a\nb"},
                            {"role": "assistant", "content": "", "reasoning_content": "hmm"}]
    assert req.enable_thinking is False and req.template_kwargs == {}
    assert req.sampling.seed == (1 << 64) - 1 and req.sampling.stop == ["x"]
    assert (req.sampling.temperature, req.sampling.top_p) == (0.8, 0.9)


@pytest.mark.parametrize("body,param", [
    ({"messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": True}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": ["a", ""]}, "stop"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"chat_template": "{{ 1 }}"}},
     "chat_template_kwargs.chat_template"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": ["hi"]}, "messages[0]"),
])
def test_chat_request_refusals_name_the_field(body, param):
    with pytest.raises(ApiError) as e:
        chat_request(body, DEFAULTS)
    assert e.value.status == 400 and e.value.param == param


def test_completion_request_defaults_to_16_tokens_and_takes_token_ids():
    assert completion_request({"prompt": "hi"}, DEFAULTS).sampling.max_tokens == 16
    assert completion_request({"prompt": [[1, 2, 3]], "max_tokens": 4}, DEFAULTS).prompt == [1, 2, 3]
    with pytest.raises(ApiError):
        completion_request({"prompt": [1, "a"]}, DEFAULTS)


@pytest.mark.parametrize("body", [b"[" * 100_000 + b"]" * 100_000, b'{"a": ["\\ud800"]}', b"\xff{}"])
def test_json_no_tokenizer_can_take_is_a_400(body):
    with pytest.raises(ApiError) as e:
        parse_json(body)
    assert e.value.status == 400


# the prefix cache, on a real engine


def greedy(engine: Engine, ids: list[int], steps: int, on_token=None):
    return generate(engine, ids, steps=steps, sampler=Sampler(temperature=0), eos_ids=set(), on_token=on_token)


def test_the_prefix_cache_keeps_the_common_prefix_and_gives_the_same_tokens(tiny, tokenizer):
    first = tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    second = first + tokenizer.encode(" Then it slept.")
    with Engine(tiny[1], nthreads=1, max_seq_len=256) as engine:
        cache = PrefixCache()
        cached = cache.reuse(engine, first)
        out = greedy(engine, first[cached:], 5)
        cache.record(engine, first[cached:] + out.tokens)
        assert cached == 0 and cache.tokens == (first + out.tokens)[: engine.position]

        cached = cache.reuse(engine, second)
        assert cached == len(first)  # the generated tokens differ from " Then it slept."
        with_cache = greedy(engine, second[cached:], 8).tokens
        engine.reset()
        without = greedy(engine, second, 8).tokens
    assert with_cache == without


def test_the_same_prompt_again_still_evaluates_its_last_token(tiny, tokenizer):
    ids = tokenizer.encode("Hello again")
    with Engine(tiny[1], nthreads=1, max_seq_len=64) as engine:
        cache = PrefixCache()
        cache.reuse(engine, ids)
        cache.record(engine, ids + greedy(engine, ids, 3).tokens)
        assert cache.reuse(engine, ids) == len(ids) - 1 and engine.position == len(ids) - 1


def test_on_token_returning_true_ends_generation(tiny, tokenizer):
    ids = tokenizer.encode("Stop me")
    seen = []
    with Engine(tiny[1], nthreads=1, max_seq_len=64) as engine:
        result = greedy(engine, ids, 20, on_token=lambda t: seen.append(t) or len(seen) == 3)
        assert result.finish_reason == "stop" and result.tokens == seen and len(seen) == 3
        assert engine.position == len(ids) + 2  # the third token was never fed


# the engine host, on a real engine


def lose_a_worker(engine: Engine) -> None:
    engine.forward([1])  # a real step, then the error a cluster step raises when a socket dies
    error = ConnectionResetError("connection reset by peer")
    error.address = "10.0.0.3:9999"
    raise error


def test_the_host_runs_steps_on_its_engine(tiny):
    host = EngineHost(lambda: Engine(tiny[1], nthreads=1, max_seq_len=64))
    host.start()
    try:
        assert host.state.up and host.state.workers == {}
        logits = host.run(lambda e: e.forward([1, 2, 3]))
        assert isinstance(logits, np.ndarray) and host.info().position == 3
    finally:
        host.close()
    assert not host.state.up
    with pytest.raises(EngineDown):
        host.run(lambda e: e.forward([1]))


def test_a_lost_worker_takes_the_host_down_and_it_reconnects(tiny):
    workers = ["10.0.0.2:9999", "10.0.0.3:9999"]
    created = []

    def factory() -> Engine:
        created.append(Engine(tiny[1], nthreads=1, max_seq_len=64))
        return created[-1]

    host = EngineHost(factory, workers=workers, min_backoff=0.05, max_backoff=0.2)
    host.start()
    try:
        assert host.state.workers == {w: True for w in workers}
        with pytest.raises(WorkerLost) as lost:
            host.run(lose_a_worker)
        assert lost.value.address == "10.0.0.3:9999"
        state = host.state
        if not state.up:  # the reconnect loop may already have brought it back
            assert "10.0.0.3:9999" in state.reason
            assert state.workers == {"10.0.0.2:9999": True, "10.0.0.3:9999": False}
        deadline = time.monotonic() + 10
        while not host.state.up:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert len(created) == 2 and host.info() is created[1]
        assert host.state.workers == {w: True for w in workers}
        assert host.run(lambda e: e.forward([1])).shape == (created[1].config.vocab_size,)

        with pytest.raises(WorkerLost):  # and again: each loss gets its own reconnect loop
            host.run(lose_a_worker)
        while not host.state.up:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert len(created) == 3
    finally:
        host.close()


def test_a_loss_reported_from_outside_the_steps_waits_for_the_step_and_names_its_engine(tiny):
    """The node watch's report: the engine it names is dropped (after the step running on it),
    a report about an engine already replaced changes nothing."""
    created = []

    def factory() -> Engine:
        created.append(Engine(tiny[1], nthreads=1, max_seq_len=64))
        return created[-1]

    host = EngineHost(factory, workers=["10.0.0.2:9999"], min_backoff=0.05, max_backoff=0.1)
    host.start()
    try:
        epoch = host.epoch
        in_step, release = threading.Event(), threading.Event()

        def slow_step(engine: Engine):
            in_step.set()
            release.wait(10)
            return engine.forward([1])

        stepping = threading.Thread(target=host.run, args=(slow_step,))
        stepping.start()
        assert in_step.wait(10)
        reporter = threading.Thread(target=host.report_lost, args=("10.0.0.2:9999", "port refused", epoch))
        reporter.start()
        time.sleep(0.1)
        assert host.state.up and reporter.is_alive()  # the step in flight ends first
        release.set()
        stepping.join(10)
        reporter.join(10)
        assert not host.state.up or len(created) == 2
        deadline = time.monotonic() + 10
        while not host.state.up:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert len(created) == 2 and host.epoch != epoch
        host.report_lost("10.0.0.2:9999", "the worker restarted", epoch)  # about the engine already gone
        assert host.state.up and host.info() is created[1]
    finally:
        host.close()


def test_requests_are_refused_while_the_host_is_down(tiny, tokenizer):
    attempts = []

    def factory() -> Engine:
        attempts.append(time.monotonic())
        if len(attempts) == 1:
            return Engine(tiny[1], nthreads=1, max_seq_len=64)
        raise ConnectionRefusedError("worker 10.0.0.2:9999 refused the connection")  # not back yet

    host = EngineHost(factory, workers=["10.0.0.2:9999"], min_backoff=0.05, max_backoff=0.1)
    host.start()
    scheduler = Scheduler(host, tokenizer, queue_size=2, parallel=1, prefill_chunk=64)
    try:
        with pytest.raises(WorkerLost):
            host.run(lose_a_worker)
        job = Job(prompt_ids=[1, 2], sampling=DEFAULTS, emit=lambda event: None)
        with pytest.raises(EngineDown):
            scheduler.submit(job)
        deadline = time.monotonic() + 10
        while host.state.attempts < 2:  # it keeps trying, backing off
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert not host.state.up and "refused" in host.state.reason
    finally:
        host.close()


def test_the_queue_admits_queue_size_requests(tiny, tokenizer):
    host = EngineHost(lambda: Engine(tiny[1], nthreads=1, max_seq_len=64))
    host.start()
    scheduler = Scheduler(host, tokenizer, queue_size=2, parallel=1, prefill_chunk=64)  # not started: jobs wait
    try:
        jobs = [Job(prompt_ids=[1], sampling=DEFAULTS, emit=lambda event: None) for _ in range(3)]
        scheduler.submit(jobs[0])
        scheduler.submit(jobs[1])
        with pytest.raises(QueueFull) as full:
            scheduler.submit(jobs[2])
        assert full.value.retry_after >= 1
        scheduler.cancel(jobs[0])  # a client that leaves frees its place at once
        scheduler.submit(jobs[2])
        assert scheduler.counts() == (2, 0)
    finally:
        host.close()


def test_the_queue_admits_at_least_parallel_requests(tiny, tokenizer):
    host = EngineHost(lambda: Engine(tiny[1], nthreads=1, max_seq_len=64, max_sequences=3))
    host.start()
    scheduler = Scheduler(host, tokenizer, queue_size=1, parallel=3, prefill_chunk=64)  # not started
    try:
        assert scheduler.queue_size == 3
        for _ in range(3):
            scheduler.submit(Job(prompt_ids=[1], sampling=DEFAULTS, emit=lambda event: None))
        with pytest.raises(QueueFull):
            scheduler.submit(Job(prompt_ids=[1], sampling=DEFAULTS, emit=lambda event: None))
    finally:
        host.close()
