"""The requests the engine is generating, each in a sequence slot of its KV cache, and the one
step that advances them all.

    slot 0  request A, decoding     -> Entry(0, [the token it sampled last], TOPK)
    slot 1  request B, prefilling   -> Entry(1, its next prompt tokens, at most --prefill-chunk)
    slot 2  free: its cache still holds the last conversation, for that conversation's next turn
            one engine.step(entries) for all of them; each Generation then samples from its result

A prompt is read in pieces of at most `prefill_chunk` tokens per step (shared by the requests
still reading theirs, oldest first) between the others' tokens, so a long prompt never stalls the
running streams for longer than one such piece.

Each slot keeps a PrefixCache of what its KV cache holds. A request joins the free slot sharing
the longest prefix with its prompt (ties: the least recently used), so the next turn of a chat
finds its earlier turns still evaluated. A prefix shorter than half of what a slot holds counts
as none: a new chat that shares only the template's first tokens (the same system prompt) with
another conversation takes the least recently used slot rather than overwrite that
conversation before its next turn (llama-server's --slot-prompt-similarity, 0.5 by default).
Only the engine thread touches a Batch.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..engine import Entry
from ..generate import Generation, PrefixCache
from ..sampler import Sampler
from .errors import ApiError, internal_error
from .jobs import Failed, Finished, Job, Started, Usage
from .text import ReplyText

log = logging.getLogger("dllama.api")

MIN_SHARED_FRACTION = 0.5  # of a slot's tokens a prompt must share for the slot to count as its


class Slot:
    """One engine sequence: the tokens its cache holds and when a request last used it."""

    def __init__(self, seq: int) -> None:
        self.seq = seq
        self.cache = PrefixCache(seq)
        self.last_used = 0  # the Batch's clock when a request last joined it (0: never)
        self.busy = False

    def shared(self, ids: Sequence[int]) -> int:
        """The prefix of ids this slot would keep, when that is most of what it holds (else 0)."""
        keep = self.cache.common(ids)
        return keep if keep >= MIN_SHARED_FRACTION * len(self.cache.tokens) else 0


@dataclass(eq=False)
class Running:
    """A job in its slot. Its Generation is made at its first step: placing the prompt after the
    reused prefix needs the engine."""

    job: Job
    slot: Slot
    generation: Generation | None = None
    reply: ReplyText | None = None
    cached: int = 0  # prompt tokens the slot's cache already held

    def on_token(self, token: int) -> bool | None:
        assert self.reply is not None
        deltas, stopped = self.reply.push(token)
        for delta in deltas:
            self.job.emit(delta)
        return stopped or None  # a stop string ends the generation


def plan_step(generations: Sequence[Generation], prefill_chunk: int) -> list[tuple[int, Entry]]:
    """(index, entry) of each generation that feeds the next step: every decoding one its last
    token; the prefilling ones, in order (oldest first), `prefill_chunk` prompt tokens between
    them. Those the chunk does not reach wait for a later step."""
    budget = prefill_chunk
    planned = []
    for i, g in enumerate(generations):
        if not g.prefilling:
            planned.append((i, g.entry()))
        elif budget > 0:
            entry = g.entry(budget)
            budget -= len(entry.tokens)
            planned.append((i, entry))
    return planned


class Batch:
    def __init__(self, slots: int, tokenizer: Any, *, prefill_chunk: int, metrics: Any = None) -> None:
        if slots < 1:
            raise ValueError(f"a batch needs at least one slot, got {slots}")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1, got {prefill_chunk}")
        self.slots = [Slot(seq) for seq in range(slots)]
        self.tokenizer = tokenizer
        self.prefill_chunk = prefill_chunk
        self.metrics = metrics
        self.running: list[Running] = []  # in the order they joined
        self._clock = 0

    def jobs(self) -> set[Job]:
        return {r.job for r in self.running}

    def join(self, job: Job) -> Slot:
        """Gives job the free slot whose cache shares the longest prefix with its prompt; it runs
        from the next step on."""
        free = [s for s in self.slots if not s.busy]
        if not free:
            raise RuntimeError("every slot is taken")
        slot = max(free, key=lambda s: (s.shared(job.prompt_ids), -s.last_used))
        self._clock += 1
        slot.last_used = self._clock
        slot.busy = True
        self.running.append(Running(job, slot))
        return slot

    def step(self, engine: Any) -> None:
        """One engine step over every running job: the cancelled ones leave first, the new ones
        start, each planned one feeds its entry and takes its result; the finished ones leave."""
        self._leave_cancelled(engine)
        for r in [r for r in self.running if r.generation is None]:
            try:
                self._start(engine, r)
            except Exception as e:  # noqa: BLE001 - a request the engine refuses ends alone
                log.exception("starting a generation failed")
                self._drop(r, internal_error(e))
        planned = plan_step([r.generation for r in self.running], self.prefill_chunk)
        if not planned:
            return
        members = [self.running[i] for i, _ in planned]
        entries = [entry for _, entry in planned]
        # before the step, which moves a prompt's last piece on to decoding
        prefill_tokens = sum(len(e.tokens) for r, e in zip(members, entries) if r.generation.prefilling)
        decoding = sum(not r.generation.prefilling for r in members)
        started = time.perf_counter()
        results = engine.step(entries)
        seconds = time.perf_counter() - started
        stats = engine.stats()
        generated = 0
        for r, result in zip(members, results):
            try:
                generated += r.generation.advance(result, seconds, stats) is not None
            except Exception as e:  # noqa: BLE001 - one request's sampling error ends that request only
                log.exception("sampling failed")
                self._drop(r, internal_error(e))
                continue
            if r.generation.done:
                self._end(engine, r)
        self._leave_cancelled(engine)  # a client that left during the step frees its slot now
        if self.metrics is not None:
            self.metrics.step(tokens=sum(len(e.tokens) for e in entries), sequences=len(entries),
                              generated=generated, prefill_tokens=prefill_tokens, decode_tokens=decoding,
                              seconds=seconds, net=stats)

    def fail_all(self, error: ApiError) -> None:
        """The step failed (a worker lost, the engine down): every running job ends with error,
        and no slot's cache is trusted any more."""
        running, self.running = self.running, []
        for r in running:
            r.slot.busy = False
            r.job.emit(Failed(error))
        for slot in self.slots:
            slot.cache.clear()

    def _start(self, engine: Any, r: Running) -> None:
        job, sampling = r.job, r.job.sampling
        r.cached = r.slot.cache.reuse(engine, job.prompt_ids)
        r.reply = ReplyText(self.tokenizer, sampling.stop, job.reasoning)
        r.generation = Generation(
            job.prompt_ids[r.cached:], seq=r.slot.seq, start=engine.position_of(r.slot.seq),
            max_seq_len=engine.max_seq_len, steps=sampling.max_tokens,
            sampler=Sampler(temperature=sampling.temperature, topp=sampling.top_p, seed=sampling.seed),
            eos_ids=self.tokenizer.eos_ids, on_token=r.on_token)
        job.emit(Started(r.cached))

    def _leave_cancelled(self, engine: Any) -> None:
        for r in [r for r in self.running if r.job.cancelled.is_set()]:
            if r.generation is not None:
                r.generation.stop()
            self._end(engine, r)

    def _end(self, engine: Any, r: Running) -> None:
        """Frees r's slot, its cache keeping what was fed; the job gets its last events (or, cut
        short, the reason when someone still listens)."""
        self.running.remove(r)
        r.slot.busy = False
        job, g = r.job, r.generation
        if g is not None:
            r.slot.cache.record(engine, g.fed)
            if self.metrics is not None:
                self.metrics.generation(prompt_tokens=len(job.prompt_ids), cached_tokens=r.cached, result=g.result())
        if job.cancelled.is_set():
            if job.abort is not None:
                job.emit(Failed(job.abort))
            return
        assert g is not None and r.reply is not None
        for delta in r.reply.finish():
            job.emit(delta)
        finish_reason = "stop" if r.reply.stopped else g.finish_reason
        job.emit(Finished(finish_reason, Usage(len(job.prompt_ids), len(g.tokens), r.cached)))

    def _drop(self, r: Running, error: ApiError) -> None:
        self.running.remove(r)
        r.slot.busy = False
        r.slot.cache.clear()
        r.job.emit(Failed(error))
