"""Micro-batching: concurrent requests share one encoder call, behind a bounded queue.

Batches form by themselves while the engine is busy: everything that queued up during the
previous call goes into the next one (up to max_batch images). The batcher waits up to max_wait
for more only while bodies are still being read or connected clients have nothing in the batch
yet, so a lone client never pays the wait. admit() is called before a body is read and raises
Overloaded (the caller answers 503) when max_queue requests or max_queue_bytes of bodies are
already held: memory stays bounded whatever the load.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time

log = logging.getLogger(__name__)


class Overloaded(Exception):
    pass


class MicroBatcher:
    def __init__(self, process, executor, max_batch: int = 64, max_wait_ms: float = 2.0, max_queue: int = 256,
                 max_queue_bytes: int = 64 << 20, on_batch=None, settle=None, peers=None):
        """process(jobs) -> results runs on executor (one thread: it owns the model state).
        settle(results) -> results, a coroutine, runs before the answers go out (e.g. wait for the
        fsync) without holding up the next batch. peers() -> how many clients are connected: the
        batch waits (at most max_wait) for more requests only while fewer than that are in it.
        The queue is bounded twice: max_queue requests and max_queue_bytes of request bodies
        (read, being read or waiting), whichever is reached first."""
        if max_batch < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("max_batch and max_queue must be >= 1, max_wait_ms >= 0")
        self.process, self.executor = process, executor
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait_ms / 1000.0, max_queue
        self.max_queue_bytes = max_queue_bytes
        self.held_bytes = 0  # bodies admitted and not answered yet
        self.last_peers = 1  # connected clients when the last batch formed (read by the worker)
        self.on_batch = on_batch
        self.settle = settle
        self.peers = peers or (lambda: 1)
        self._delivering: set[asyncio.Task] = set()
        self.arriving = 0  # requests whose body is being read; they will submit soon
        self.busy = False
        self._items: collections.deque = collections.deque()
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task | None = None

    @property
    def depth(self) -> int:
        return len(self._items)

    def admit(self, nbytes: int) -> None:
        """Reserve a place for a body of nbytes before reading it: refuse early instead of
        buffering it. Pair with submit() (which frees the place when answered) or release()."""
        if (len(self._items) + self.arriving >= self.max_queue
                or (self.held_bytes and self.held_bytes + nbytes > self.max_queue_bytes)):
            raise Overloaded()
        self.arriving += 1
        self.held_bytes += nbytes

    def release(self, nbytes: int) -> None:
        self.arriving -= 1
        self.held_bytes -= nbytes

    async def submit(self, job, nbytes: int):
        """Queue a job admitted with nbytes and wait for its result; exceptions are re-raised."""
        self.arriving -= 1
        try:
            if self._stopping:
                raise Overloaded()
            job.future = asyncio.get_running_loop().create_future()
            self._items.append(job)
            self._wake.set()
            result = await job.future
        finally:
            self.held_bytes -= nbytes
        if isinstance(result, BaseException):
            raise result
        return result

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="micro-batcher")

    async def drain_and_stop(self) -> None:
        """Finish what was queued, then stop."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task
        while self._delivering:
            await asyncio.gather(*self._delivering, return_exceptions=True)

    async def _next_batch(self) -> list:
        loop = asyncio.get_running_loop()
        batch = [self._items.popleft()]
        n = batch[0].n
        peers = self.last_peers = self.peers()
        deadline = loop.time() + self.max_wait
        while n < self.max_batch:
            if self._items:
                if n + self._items[0].n > self.max_batch:
                    break
                job = self._items.popleft()
                batch.append(job)
                n += job.n
                continue
            remaining = deadline - loop.time()
            # Wait only if more requests can come: bodies being read, or connected clients that
            # have nothing in this batch yet. A lone client never waits.
            if remaining <= 0 or self._stopping or (self.arriving == 0 and len(batch) >= peers):
                break
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except asyncio.TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._items:
                if self._stopping:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = await self._next_batch()
            self.busy = True
            t0 = time.perf_counter()
            try:
                results = await loop.run_in_executor(self.executor, self.process, batch)
            except Exception as e:  # the engine or the disk failed: every job of the batch learns it
                log.exception("micro-batch of %d requests failed", len(batch))
                results = [e] * len(batch)
            finally:
                self.busy = False
            if self.on_batch is not None:
                self.on_batch(sum(j.n for j in batch), time.perf_counter() - t0)
            if self.settle is None:
                self._answer(batch, results)
            else:
                task = loop.create_task(self._settle_and_answer(batch, results))
                self._delivering.add(task)
                task.add_done_callback(self._delivering.discard)

    async def _settle_and_answer(self, batch, results) -> None:
        try:
            results = await self.settle(results)
        except Exception as e:
            results = [e] * len(batch)
        self._answer(batch, results)

    @staticmethod
    def _answer(batch, results) -> None:
        for job, res in zip(batch, results):
            if not job.future.done():
                job.future.set_result(res)
