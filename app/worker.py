"""One inference thread fed by a queue, with dynamic batching.

Every request's waveform is queued; the thread takes whatever is waiting (up to ``max_clips``)
and hands it to one ``run`` call, which batches only windows of equal length (see
``EmbeddingModel.infer_many``), so a clip's result never depends on what it was batched with.
One thread owns all torch intra-op threads: the cores are never oversubscribed by concurrent
requests, and the next batch forms while the current one runs.
"""

from __future__ import annotations

import logging
import queue
import threading
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


class BatchingWorker(Generic[In, Out]):
    def __init__(
        self,
        run: Callable[[list[In]], list[Out]],
        max_clips: int,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self._run = run
        self._max = max_clips
        self._on_batch = on_batch
        self._queue: queue.SimpleQueue[_Job[In, Out] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="infer", daemon=True)
        self._thread.start()

    def submit(self, item: In) -> Future[Out]:
        future: Future[Out] = Future()
        self._queue.put(_Job(item, future))
        return future

    def close(self, timeout: float | None = None) -> None:
        """Finish what is queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _take(self) -> tuple[list[_Job[In, Out]], bool]:
        first = self._queue.get()
        if first is None:
            return [], True
        jobs, stop = [first], False
        while len(jobs) < self._max:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                stop = True
                break
            jobs.append(job)
        return jobs, stop

    def _loop(self) -> None:
        stop = False
        while not stop:
            jobs, stop = self._take()
            jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]
            if not jobs:
                continue
            if self._on_batch is not None:
                self._on_batch(len(jobs))
            try:
                results = self._run([j.item for j in jobs])
            except Exception as exc:  # one bad batch fails its own requests, never the worker
                log.exception("inference failed for a batch of %d", len(jobs))
                for j in jobs:
                    j.future.set_exception(exc)
                continue
            for j, r in zip(jobs, results, strict=True):
                j.future.set_result(r)
