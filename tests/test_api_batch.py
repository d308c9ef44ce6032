"""dllama-api's batch below HTTP: which tokens each running request feeds a step, which slot a new
request takes, and requests joining and leaving a real engine's steps (test_api_units' tiny
Qwen3-MoE and real Qwen3 tokenizer), each getting the text it gets alone.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from dllama import Engine
from dllama.generate import Generation, generate
from dllama.sampler import Candidates, Sampler
from dllama.server.batch import Batch, plan_step
from dllama.server.jobs import Failed, Finished, Job, Started
from dllama.server.metrics import Window
from dllama.server.schemas import Sampling
from dllama.server.text import CONTENT, Delta, ReplyText, join

from test_api_units import tiny, tokenizer  # noqa: F401 - the same tiny model and tokenizer

GREEDY = Sampling(max_tokens=None, temperature=0, top_p=1.0, seed=0)


def generation(prompt_len: int, seq: int = 0) -> Generation:
    return Generation(list(range(1, prompt_len + 1)), seq=seq, start=0, max_seq_len=1000, steps=8,
                      sampler=Sampler(temperature=0), eos_ids=())


def decoding(seq: int) -> Generation:
    """A generation past its prompt, holding the token it sampled."""
    g = generation(3, seq)
    g.entry()
    g.advance(Candidates(np.array([42]), np.array([1.0], dtype=np.float32), 0.0))
    return g


class Events:
    """What a job's handler receives."""

    def __init__(self) -> None:
        self.events: list = []

    def __call__(self, event) -> None:
        self.events.append(event)

    @property
    def text(self) -> str:
        return join(e for e in self.events if isinstance(e, Delta))[CONTENT]

    @property
    def last(self):
        return self.events[-1] if self.events else None


def job(ids: list[int], max_tokens: int = 8) -> Job:
    return Job(prompt_ids=list(ids), sampling=replace(GREEDY, max_tokens=max_tokens), emit=Events())


# the plan of a step


def test_decoding_sequences_always_feed_and_prompts_share_the_chunk_oldest_first():
    gens = [decoding(0), generation(100, 1), generation(10, 2), decoding(3)]
    planned = plan_step(gens, prefill_chunk=64)
    assert [(i, len(e.tokens)) for i, e in planned] == [(0, 1), (1, 64), (3, 1)]  # 2 waits for the next step
    assert planned[0][1].tokens == [42] and planned[1][1].tokens == list(range(1, 65))
    for i, entry in planned:
        gens[i].advance(Candidates(np.array([7]), np.array([1.0], dtype=np.float32), 0.0))
    planned = plan_step(gens, prefill_chunk=64)
    assert [(i, len(e.tokens)) for i, e in planned] == [(0, 1), (1, 36), (2, 10), (3, 1)]
    assert planned[1][1].tokens == list(range(65, 101))


def test_a_chunk_smaller_than_the_oldest_prompt_gives_it_all():
    planned = plan_step([generation(10), generation(10, 1)], prefill_chunk=4)
    assert [(i, len(e.tokens)) for i, e in planned] == [(0, 4)]


# which slot a new request takes


def test_a_request_takes_the_free_slot_sharing_its_longest_prefix():
    batch = Batch(3, tokenizer=None, prefill_chunk=8)
    batch.slots[0].cache.tokens = [1, 2, 3, 4, 5, 6]
    batch.slots[1].cache.tokens = [1, 2, 9]
    for s in batch.slots:
        s.last_used = 1
    assert batch.join(job([1, 2, 3, 4, 5, 6, 7])).seq == 0
    assert batch.join(job([1, 2, 3, 4, 5, 6, 7])).seq == 1  # 0 is taken: the next longest
    assert batch.join(job([1, 2, 3])).seq == 2
    with pytest.raises(RuntimeError):
        batch.join(job([1]))


def test_ties_go_to_the_least_recently_used_slot():
    batch = Batch(3, tokenizer=None, prefill_chunk=8)
    for s, used in zip(batch.slots, (3, 1, 2)):
        s.last_used = used
    assert [batch.join(job([5, 6])).seq for _ in range(3)] == [1, 2, 0]


def test_a_new_chat_sharing_only_a_system_prompt_leaves_another_conversation_alone():
    batch = Batch(2, tokenizer=None, prefill_chunk=8)
    system = [1, 2, 3]
    batch.slots[0].cache.tokens = system + list(range(10, 30))  # a conversation in progress
    batch.slots[0].last_used = 1
    assert batch.join(job(system + [50, 51])).seq == 1  # the empty slot, not the conversation's
    batch = Batch(2, tokenizer=None, prefill_chunk=8)
    batch.slots[0].cache.tokens = system + [10, 11]  # mostly the system prompt: worth keeping
    batch.slots[0].last_used = 1
    assert batch.join(job(system + [50, 51])).seq == 0


def test_the_rate_window_counts_the_last_seconds():
    now = [0.0]
    window = Window(10.0, clock=lambda: now[0])
    window.add(5)
    now[0] = 4.0
    window.add(3)
    now[0] = 5.0
    assert window.rate() == pytest.approx(0.8)
    now[0] = 10.5
    assert window.rate() == pytest.approx(0.3)
    now[0] = 15.0
    assert window.rate() == 0.0


# requests on a real engine


def alone(tokenizer, engine: Engine, ids: list[int], steps: int) -> tuple[str, int, str]:
    """The reply generate() gives on sequence 0 alone: its text, tokens and finish reason."""
    engine.reset(0)
    result = generate(engine, ids, steps=steps, sampler=Sampler(temperature=0), eos_ids=tokenizer.eos_ids)
    reply = ReplyText(tokenizer)
    deltas = [d for t in result.tokens for d in reply.push(t)[0]] + reply.finish()
    return join(deltas)[CONTENT], len(result.tokens), result.finish_reason


def run(batch: Batch, engine: Engine, steps: int, *, joining: dict[int, Job]) -> int:
    """steps engine steps; joining[k] joins before step k. Returns the steps run."""
    for k in range(steps):
        if k in joining:
            batch.join(joining[k])
        if not batch.running:
            return k
        batch.step(engine)
    return steps


def test_requests_joining_and_leaving_get_the_text_they_get_alone(tiny, tokenizer):
    prompts = [tokenizer.encode(t) for t in (
        "Hi",
        "The quick brown fox jumps over the lazy dog, " * 3,
        "Once upon a time, in a kingdom by the sea, there lived " * 5,
        "Zebras",
    )]
    steps = [16, 12, 10, 6]
    with Engine(tiny[1], nthreads=1, max_seq_len=512, max_sequences=3) as engine:
        expected = [alone(tokenizer, engine, p, n) for p, n in zip(prompts, steps)]
        engine.reset(0)
        batch = Batch(3, tokenizer, prefill_chunk=16)
        jobs = [job(p, n) for p, n in zip(prompts, steps)]
        # the long prompts join while the first decodes; the fourth waits for a slot to free
        run(batch, engine, 4, joining={0: jobs[0], 1: jobs[1], 3: jobs[2]})
        assert len(batch.running) == 3
        while len(batch.running) == 3:
            batch.step(engine)
        run(batch, engine, 200, joining={0: jobs[3]})
    for j, (text, n, reason) in zip(jobs, expected):
        events = j.emit
        assert isinstance(events.events[0], Started) and isinstance(events.last, Finished), events.events
        assert (events.text, events.last.usage.completion_tokens, events.last.finish_reason) == (text, n, reason)


def test_a_long_prompt_never_holds_back_a_decoding_request_for_more_than_a_chunk(tiny, tokenizer):
    steps_seen = []

    class Figures:  # the batch reports each step here, as to the server's Metrics
        def step(self, *, tokens, sequences, generated, prefill_tokens, decode_tokens, seconds, net):
            steps_seen.append((tokens, sequences, generated))
            assert prefill_tokens + decode_tokens == tokens and seconds > 0 and net == {}

        def generation(self, **kwargs):
            pass

    with Engine(tiny[1], nthreads=1, max_seq_len=512, max_sequences=2) as engine:
        batch = Batch(2, tokenizer, prefill_chunk=8, metrics=Figures())
        talker = job(tokenizer.encode("Hello"), 40)
        reader = job(tokenizer.encode("A long story about a fox, " * 8), 2)
        run(batch, engine, 3, joining={0: talker})
        batch.join(reader)
        while reader in batch.jobs():
            batch.step(engine)
    shared = steps_seen[3:]
    prompt_steps = len(reader.prompt_ids) // 8
    assert len(shared) > prompt_steps  # read in pieces...
    assert all(s == 2 and t <= 8 + 1 and g >= 1 for t, s, g in shared[:prompt_steps]), shared  # ...beside a token


def test_a_cancelled_request_leaves_at_the_next_step_and_its_slot_keeps_what_it_fed(tiny, tokenizer):
    with Engine(tiny[1], nthreads=1, max_seq_len=512, max_sequences=2) as engine:
        batch = Batch(2, tokenizer, prefill_chunk=64)
        gone, stays = job(tokenizer.encode("Leave soon"), 50), job(tokenizer.encode("Stay"), 50)
        run(batch, engine, 4, joining={0: gone, 1: stays})
        gone.cancelled.set()
        batch.step(engine)
        assert batch.jobs() == {stays}
        slot = batch.slots[0]
        assert not slot.busy and len(slot.cache.tokens) == engine.position_of(slot.seq) > len(gone.prompt_ids)
        assert not any(isinstance(e, (Finished, Failed)) for e in gone.emit.events)  # nobody listens
        held = list(slot.cache.tokens)
        follow_up = job(held + [11], 2)
        assert batch.join(follow_up) is slot
        batch.step(engine)
        assert follow_up.emit.events[0] == Started(cached_tokens=len(held))
