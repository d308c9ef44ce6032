"""One engine, many clients: a bounded queue in front of one engine thread that generates up to
`parallel` requests at once, one step for all of them.

    HTTP handlers (event loop)                      engine thread (one, owns the engine)
    submit(job) -> 429 when queue_size are in  -->  each step: the oldest waiting jobs take the
    await job events <--------------------------   free slots (batch.py), then one engine step
    cancel(job) when the client leaves              advances every running job: Started,
                                                    Delta..., then Finished or Failed

queue_size counts every admitted request, the running ones included, and is at least `parallel`:
with --parallel 4 --queue-size 8, four clients are generating, four wait and a ninth gets 429 with
Retry-After. With --parallel 1 requests run one at a time, in the order they came.

A lost worker fails every running request (503) and clears every slot's cache; the host
reconnects meanwhile, and waiting requests get 503 while it is down.

The engine thread never blocks the event loop: events cross with loop.call_soon_threadsafe, and
the native forward pass releases the GIL while it runs.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from typing import Any

from .batch import Batch
from .errors import internal_error, unavailable
from .host import EngineDown, EngineHost, WorkerLost
from .jobs import CANCELLED, DONE, QUEUED, RUNNING, Failed, Job

log = logging.getLogger("dllama.api")


class QueueFull(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


class Scheduler:
    def __init__(self, host: EngineHost, tokenizer: Any, *, queue_size: int, parallel: int, prefill_chunk: int,
                 metrics: Any = None) -> None:
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, got {queue_size}")
        if parallel < 1:
            raise ValueError(f"parallel must be at least 1, got {parallel}")
        self.host = host
        self.tokenizer = tokenizer
        self.parallel = parallel
        self.queue_size = max(queue_size, parallel)  # a running request is an admitted one
        self.batch = Batch(parallel, tokenizer, prefill_chunk=prefill_chunk, metrics=metrics)
        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()
        self._running: list[Job] = []
        self._closed = False
        self._seconds_per_job = 5.0  # moving average, for Retry-After
        self._thread = threading.Thread(target=self._loop, name="dllama-engine", daemon=True)

    @property
    def metrics(self) -> Any:
        return self.batch.metrics

    @metrics.setter
    def metrics(self, metrics: Any) -> None:  # the registry reads the scheduler: it comes second
        self.batch.metrics = metrics

    # the handlers' side

    def start(self) -> None:
        self._thread.start()

    def drain(self) -> None:
        """Shutting down: refuse new jobs, fail the waiting ones, end the running ones at the
        next step with an error, so no client waits for a generation that will not finish."""
        error = unavailable("The server is shutting down.")
        with self._cond:
            self._closed = True
            queued, self._queue = list(self._queue), deque()
            for job in queued:
                job.state = CANCELLED
            for job in self._running:
                job.abort = error
                job.cancelled.set()
            self._cond.notify_all()
        for job in queued:
            job.emit(Failed(error))

    def stop(self) -> None:
        self.drain()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        """Admit a job, or raise QueueFull (429) or EngineDown (503)."""
        with self._cond:
            if self._closed:
                raise EngineDown("the server is shutting down")
            state = self.host.state
            if not state.up:
                raise EngineDown(state.reason)
            admitted = len(self._queue) + len(self._running)
            if admitted >= self.queue_size:
                raise QueueFull(self._retry_after(admitted))
            job.state = QUEUED
            self._queue.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """The client left: a waiting job leaves the queue, a running one its slot at the next step."""
        with self._cond:
            if job.state == QUEUED:
                job.state = CANCELLED
                try:
                    self._queue.remove(job)
                except ValueError:
                    pass
            job.cancelled.set()

    def counts(self) -> tuple[int, int]:
        """(waiting, running)."""
        with self._cond:
            return len(self._queue), len(self._running)

    def _retry_after(self, admitted: int) -> int:
        rounds = math.ceil(admitted / self.parallel)  # the ones ahead run `parallel` at a time
        return max(1, min(120, math.ceil(self._seconds_per_job * rounds)))

    # the engine thread

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._running and not self._closed:
                    self._cond.wait()
                if self._closed and not self._running:
                    return
                joining = []
                while self._queue and len(self._running) < self.parallel:
                    job = self._queue.popleft()
                    job.state = RUNNING
                    job.started = time.perf_counter()
                    self._running.append(job)
                    joining.append(job)
            for job in joining:
                self.batch.join(job)
            self._step()
            self._release()

    def _step(self) -> None:
        try:
            self.host.run(self.batch.step)
        except WorkerLost as e:
            self.batch.fail_all(unavailable(f"The cluster lost a worker ({e}); reconnecting, retry shortly."))
        except EngineDown as e:
            self.batch.fail_all(unavailable(f"The engine is down ({e}); retry shortly."))
        except Exception as e:  # noqa: BLE001 - a failed step must not end the engine thread
            log.exception("generation failed")
            self.batch.fail_all(internal_error(e))

    def _release(self) -> None:
        """The jobs that left the batch in the last step leave the running list: their places go
        to waiting jobs at the next step."""
        still = self.batch.jobs()
        now = time.perf_counter()
        with self._cond:
            ended = [job for job in self._running if job not in still]
            for job in ended:
                job.state = DONE
                self._running.remove(job)
                self._seconds_per_job = 0.8 * self._seconds_per_job + 0.2 * (now - job.started)
