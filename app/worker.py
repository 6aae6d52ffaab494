"""One inference thread fed by a queue, with dynamic batching.

Every request's waveform is queued; the thread takes whatever is waiting (up to ``max_clips``)
and hands it to one ``run`` call, which batches only windows of equal length (see
``EmbeddingModel.infer_many``), so a clip's result never depends on what it was batched with.
One thread owns all torch intra-op threads: the cores are never oversubscribed by concurrent
requests, and the next batch forms while the current one runs.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")


@dataclass
class _Job(Generic[In, Out]):
    item: In
    future: Future[Out]
    queued_at: float


class _Wake:
    """A queue entry that asks for housekeeping, not inference."""


WAKE = _Wake()


class _Background:
    """A queue entry that says background work is waiting (in the worker's own deque)."""


BACKGROUND = _Background()


class BatchingWorker(Generic[In, Out]):
    """``on_batch`` is called with the queue wait (seconds) of each job as a batch starts.

    ``on_idle`` is housekeeping that must not delay a waiting clip (the service returns free
    memory to the OS): it runs once the queue has stayed empty for ``idle_after_s`` after some
    work, and, so that it also happens under steady load, at most ``idle_every_s`` apart. The
    defaults suit the service's ``malloc_trim`` (a few ms): after 50 ms idle, at most every 2 s.
    :meth:`housekeeping_soon` asks for it once more (the service does when its last request has
    released its memory, which can happen after the worker's last idle run).

    Background jobs (:meth:`submit_background`: a diarization's windows) run only when no other
    job is waiting, at most ``max_background`` at a time, so a request that arrives behind a
    long background task waits for one small batch at most.
    """

    def __init__(
        self,
        run: Callable[[list[In]], list[Out]],
        max_clips: int,
        on_batch: Callable[[list[float]], None] | None = None,
        on_idle: Callable[[], None] | None = None,
        idle_after_s: float = 0.05,
        idle_every_s: float = 2.0,
        max_background: int | None = None,
    ) -> None:
        self._run = run
        self._max = max_clips
        self._max_background = max_background or max_clips
        self._background: collections.deque[_Job[In, Out]] = collections.deque()
        self._on_batch = on_batch
        self._on_idle = on_idle
        self._idle_after_s = idle_after_s
        self._idle_every_s = idle_every_s
        self._worked = False  # work done since on_idle last ran
        self._last_idle = time.monotonic()
        self._queue: queue.SimpleQueue[_Job[In, Out] | _Wake | _Background | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="infer", daemon=True)
        self._thread.start()

    def submit(self, item: In) -> Future[Out]:
        future: Future[Out] = Future()
        self._queue.put(_Job(item, future, time.perf_counter()))
        return future

    def submit_background(self, item: In) -> Future[Out]:
        """Queue ``item`` behind every other job, now and to come (see the class docstring)."""
        future: Future[Out] = Future()
        self._background.append(_Job(item, future, time.perf_counter()))
        self._queue.put(BACKGROUND)
        return future

    def housekeeping_soon(self) -> None:
        """Run ``on_idle`` once the queue has been empty ``idle_after_s`` from now."""
        self._queue.put(WAKE)

    def close(self, timeout: float | None = None) -> None:
        """Finish what is queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _idle(self) -> None:
        self._worked = False
        self._last_idle = time.monotonic()
        if self._on_idle is None:
            return
        try:
            self._on_idle()
        except Exception:
            log.exception("idle housekeeping failed")

    def _next(self) -> _Job[In, Out] | _Wake | _Background | None:
        if self._worked and self._on_idle is not None:
            try:
                return self._queue.get(timeout=self._idle_after_s)
            except queue.Empty:
                self._idle()
        return self._queue.get()

    def _take(self) -> tuple[list[_Job[In, Out]], bool]:
        first = self._next()
        if isinstance(first, _Wake):
            self._worked = True  # housekeeping after the next idle wait
            return [], False
        jobs: list[_Job[In, Out]] = [] if first is None or isinstance(first, _Background) else [first]
        stop = first is None
        while not stop and len(jobs) < self._max:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                stop = True
            elif isinstance(job, _Wake):
                self._worked = True
            elif not isinstance(job, _Background):  # a background entry's job waits in the deque
                jobs.append(job)
        if not jobs:  # nothing else waits: a few background jobs
            while self._background and len(jobs) < self._max_background:
                jobs.append(self._background.popleft())
        if stop and self._background:
            self._queue.put(None)  # asked to stop: the background jobs left first, then stop
            stop = False
        if self._background:
            self._queue.put(BACKGROUND)  # so the rest is taken up once nothing else waits
        return jobs, stop

    def _loop(self) -> None:
        while self._serve_next():
            pass

    def _serve_next(self) -> bool:
        """Take and run one batch; False once asked to stop. The batch (its waveforms) is
        referenced only from this frame, so it is freed before the worker waits again: otherwise
        the last batch of a burst would stay alive through the idle housekeeping."""
        jobs, stop = self._take()
        jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]
        if not jobs:
            return not stop
        if self._on_batch is not None:
            now = time.perf_counter()
            self._on_batch([now - j.queued_at for j in jobs])
        self._worked = True
        try:
            results = self._run([j.item for j in jobs])
        except Exception as exc:  # one bad batch fails its own requests, never the worker
            log.exception("inference failed for a batch of %d", len(jobs))
            for j in jobs:
                j.future.set_exception(exc)
            return not stop
        for j, r in zip(jobs, results, strict=True):
            j.future.set_result(r)
        if time.monotonic() - self._last_idle >= self._idle_every_s:
            del jobs, results
            self._idle()
        return not stop
