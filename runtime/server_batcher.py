"""The daemon's worker thread: continuous micro-batching behind a bounded queue.

One thread owns the encoder and the clusterer. It takes whatever requests are queued (up to
max_batch images) the moment it is free, runs encoder + clusterer + log write + fsync for all of
them, hands the answers back to the event loop in one call, and starts again with whatever queued
meanwhile. An idle worker starts on a request at once: a lone client never waits for a batch to
fill, and under load the batch grows by itself to what arrived during the previous one (as in
Triton's dynamic batcher with no queue delay). max_wait (0 by default) is only an upper bound on
waiting for requests whose bodies are being read.

inline_idle: a request that finds the worker parked, nothing queued and no other request on its
way runs on the event loop itself instead. A lone client then skips two thread hand-offs (the
worker's wake-up and the answer's trip back), which on an idle CPU cost more than the work. Under
load requests see each other (they yield once to the loop before deciding) and queue as usual, so
batching is unchanged; the loop is blocked for one single-request encoder call and fsync at most.

pipeline (`serve`'s default on GPU backends, off on the CPU): the thread only embeds, and the
event loop applies, logs and answers each batch while the thread embeds the next one. Batches are applied in
the order they were taken (the loop runs the hand-offs in order) and inline requests run on the
loop too, so the state still has one user at a time.

Other work on the state (reads, label/merge/remove, snapshots) is queued as a call that runs
alone on the thread, in order with the batches (with pipeline, once every batch before it is
applied), so every state change is totally ordered.

admit() is called on the event loop before a body is read and raises Overloaded (answered 503)
when max_queue requests or max_queue_bytes of bodies are already held: memory stays bounded
whatever the load. The ORT session and os.fdatasync release the GIL, so the event loop keeps
reading and parsing requests while a batch runs.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time

log = logging.getLogger(__name__)


class Overloaded(Exception):
    pass


class _Call:
    __slots__ = ("fn", "future")

    def __init__(self, fn, future):
        self.fn, self.future = fn, future


_END = object()  # the last item for the sync thread
# pipeline: batches embedded ahead of the event loop's apply, at most (one being applied, one ready:
# the encoder never waits for the loop, and a batch is never embedded long before it is applied)
AHEAD = 2


class Worker:
    def __init__(self, loop: asyncio.AbstractEventLoop, embed, apply, max_batch: int = 64, max_wait_ms: float = 0.0,
                 max_queue: int = 256, max_queue_bytes: int = 64 << 20, on_batch=None, pipeline: bool = False,
                 inline_idle: bool = False, commit=None):
        """embed(jobs) -> embeddings of all their images (reads no state); apply(jobs, embeddings)
        -> one result (a value or an exception) per job, returning only once the batch's updates
        are as durable as the policy says. on_batch(n_images, seconds) runs on the event loop.

        pipeline=False: one thread embeds and applies, batch after batch. pipeline=True: that thread
        only embeds (ONNX Runtime releases the GIL), and the event loop applies, logs and answers
        each batch (the clusterer's Python then takes turns with the loop's own instead of competing
        with it for the GIL from another thread); the encoder embeds the next batch meanwhile.

        commit: None, or a function that makes every update applied so far durable (fdatasync);
        apply() then does not commit, and a sync thread commits each applied batch and answers it
        afterwards, while the worker already embeds and applies the next one (group commit over
        whatever batches were applied meanwhile). No answer leaves before its commit; calls run
        only once every applied batch is committed, so they never see an update that could
        still be lost."""
        if max_batch < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("max_batch and max_queue must be >= 1, max_wait_ms >= 0")
        self.loop, self.embed, self.apply, self.on_batch = loop, embed, apply, on_batch
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait_ms / 1000.0, max_queue
        self.max_queue_bytes = max_queue_bytes
        self.held_bytes = 0   # bodies admitted and not answered yet (event loop only)
        self.arriving = 0     # requests whose body is being read; they will submit soon
        self._items: collections.deque = collections.deque()
        self._cv = threading.Condition(threading.Lock())
        self._idle = False
        self._parked = False  # waiting for work with nothing in hand (not the max_wait wait)
        self._candidates = 0  # requests deciding whether they are alone (inline_idle)
        self.inline_idle = inline_idle
        self.inline_runs = 0
        self._stopping = False
        self._closed = False
        self._done: asyncio.Future = loop.create_future()
        self.pipeline = pipeline
        self._hcv = threading.Condition(threading.Lock())
        self._ahead = 0  # pipeline: batches embedded and handed to the event loop, not applied yet
        self.commit = commit
        self._syncq: collections.deque = collections.deque()  # applied batches waiting for a commit
        self._scv = threading.Condition(threading.Lock())
        self._sync_busy = False
        self._syncer = None
        if commit is not None:
            self._syncer = threading.Thread(target=self._run_sync, name="protoedge-sync", daemon=True)
            self._syncer.start()
        run = self._run_encoder if pipeline else self._run
        threading.Thread(target=run, name="protoedge-worker", daemon=True).start()

    @property
    def depth(self) -> int:
        return len(self._items)

    # ------------------------------------------------------------------ event loop side

    def admit(self, nbytes: int) -> None:
        """Reserve a place for a body of nbytes before reading it: refuse early instead of
        buffering it. Pair with submit() (which frees the place when answered) or release()."""
        if self._stopping or (len(self._items) + self.arriving >= self.max_queue
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
            if self.inline_idle and self._parked:  # (a busy worker cannot be bypassed: queue at once)
                self._candidates += 1
                try:
                    await asyncio.sleep(0)  # requests that arrived with this one get to queue first
                    alone = self._candidates == 1 and self._claim_inline(nbytes)
                finally:
                    self._candidates -= 1
                if alone:
                    result = self._run_inline(job)
                    if isinstance(result, BaseException):
                        raise result
                    return result
            job.future = fut = self.loop.create_future()
            self._put(job)
            result = await fut
        finally:
            self.held_bytes -= nbytes
        if isinstance(result, BaseException):
            raise result
        return result

    def submit_nowait(self, job, nbytes: int, done) -> None:
        """submit() without a task or a future, for the daemon's fast HTTP path: done(result) runs
        on the event loop with the job's result (a value or an exception), once per job."""
        self.arriving -= 1
        if self.inline_idle and self._parked:
            self._candidates += 1
            self.loop.call_soon(self._decide, job, nbytes, done)  # as submit()'s sleep(0)
        else:
            self._queue(job, nbytes, done)

    def _decide(self, job, nbytes: int, done) -> None:
        alone = self._candidates == 1 and self._claim_inline(nbytes)
        self._candidates -= 1
        if not alone:
            return self._queue(job, nbytes, done)
        try:
            result = self._run_inline(job)
        finally:
            self.held_bytes -= nbytes
        done(result)

    def _queue(self, job, nbytes: int, done) -> None:
        job.future = _Callback(self, nbytes, done)
        try:
            self._put(job)
        except Overloaded as e:
            job.future.set_result(e)

    async def call(self, fn):
        """fn() on the worker thread, alone and in order with the batches; its result or exception."""
        fut = self.loop.create_future()
        self._put(_Call(fn, fut))
        return await fut

    def _claim_inline(self, nbytes: int) -> bool:
        # The worker is parked and only the event loop queues work, so while this (synchronous)
        # request runs nothing can wake the worker: the state has one user at a time.
        # held_bytes == nbytes: no other request is in flight (not even one whose batch waits for
        # its fdatasync). Under load a request can find the worker parked and nothing queued while
        # the other clients wait for their answers; running it inline would then hold those
        # answers up for a whole encoder call and fdatasync on the loop.
        with self._cv:
            return (self._parked and not self._items and self.arriving == 0 and not self._ahead
                    and self.held_bytes == nbytes and not self._stopping and not self._closed)

    def _run_inline(self, job):
        t0 = time.perf_counter()
        batch = [job]
        result = self._results(batch, self._embed(batch))[0]
        if self.commit is not None and not isinstance(result, BaseException):
            try:
                self.commit()
            except Exception as e:  # noqa: BLE001 (the request learns it)
                result = e
        self.inline_runs += 1
        if self.on_batch is not None:
            self.on_batch(job.n, time.perf_counter() - t0)
        return result

    def _put(self, item) -> None:
        with self._cv:
            if self._closed:
                raise Overloaded()
            self._items.append(item)
            if self._idle:
                self._cv.notify()

    async def stop(self) -> None:
        """Finish everything queued, then end the thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        await self._done

    # ------------------------------------------------------------------ worker thread

    def _take(self):
        """Block until there is work; a _Call alone, or the queued jobs up to max_batch images."""
        with self._cv:
            while not self._items:
                if self._stopping:
                    self._closed = True  # under the lock: nothing can be queued after this
                    return None
                self._idle = self._parked = True
                self._cv.wait()
                self._idle = self._parked = False
            if isinstance(self._items[0], _Call):
                return self._items.popleft()
            batch, n = self._fill([], 0)
            if self.max_wait and n < self.max_batch and self.arriving > 0:
                # Bodies are being read: wait for them, but never longer than max_wait.
                deadline = time.monotonic() + self.max_wait
                while n < self.max_batch and self.arriving > 0 and not self._stopping:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._idle = True
                    self._cv.wait(remaining)
                    self._idle = False
                    batch, n = self._fill(batch, n)
            return batch

    def _fill(self, batch: list, n: int):
        items = self._items
        while items and not isinstance(items[0], _Call):
            k = items[0].n
            if batch and n + k > self.max_batch:
                break
            batch.append(items.popleft())
            n += k
        return batch, n

    def _embed(self, batch):
        try:
            return self.embed(batch)
        except Exception as e:  # the engine failed: every job of the batch learns it
            log.exception("encoder call for %d requests failed", len(batch))
            return e

    def _results(self, batch, emb) -> list:
        """One result per job (a value or an exception), on whichever thread runs the batch."""
        if isinstance(emb, BaseException):
            return [emb] * len(batch)
        try:
            return self.apply(batch, emb)
        except Exception as e:  # the disk failed: every job of the batch learns it
            log.exception("micro-batch of %d requests failed", len(batch))
            return [e] * len(batch)

    def _apply(self, batch, emb, t0: float, on_loop: bool = False) -> None:
        results = self._results(batch, emb)
        if self.commit is None:
            if on_loop:
                self._answer(batch, results, time.perf_counter() - t0)
            else:
                self._deliver(self._answer, batch, results, time.perf_counter() - t0)
            return
        with self._scv:
            self._syncq.append((batch, results, t0))
            self._scv.notify_all()

    def _run_sync(self) -> None:
        """Sync thread: commit the applied batches (one commit for all waiting), then answer them."""
        while True:
            with self._scv:
                while not self._syncq:
                    self._scv.wait()
                items = list(self._syncq)
                self._syncq.clear()
                self._sync_busy = True
            stop = items[-1] is _END
            if stop:
                items.pop()
            error = None
            if items:
                try:
                    self.commit()
                except Exception as e:  # noqa: BLE001 (the disk failed: every waiting request learns it)
                    log.exception("commit of %d micro-batches failed", len(items))
                    error = e
            for batch, results, t0 in items:
                if error is not None:
                    results = [r if isinstance(r, BaseException) else error for r in results]
                self._deliver(self._answer, batch, results, time.perf_counter() - t0)
            with self._scv:
                self._sync_busy = False
                self._scv.notify_all()
            if stop:
                return

    def _synced(self) -> None:
        """Wait until every applied batch is committed and answered (before a call, and at the end)."""
        if self.commit is None:
            return
        with self._scv:
            while self._syncq or self._sync_busy:
                self._scv.wait()

    def _call(self, work: _Call) -> None:
        self._synced()
        try:
            value, error = work.fn(), None
        except BaseException as e:  # noqa: BLE001 (handed to the caller)
            value, error = None, e
        self._deliver(_settle_call, work.future, value, error)

    def _run(self) -> None:
        """One thread: embed, apply, answer; next batch."""
        try:
            while True:
                work = self._take()
                if work is None:
                    return
                if isinstance(work, _Call):
                    self._call(work)
                    continue
                t0 = time.perf_counter()
                self._apply(work, self._embed(work), t0)
        finally:
            self._finish()

    def _run_encoder(self) -> None:
        """Pipeline: this thread embeds; the event loop applies, logs and answers (_apply_on_loop)."""
        hcv = self._hcv
        try:
            while True:
                with hcv:
                    while self._ahead >= AHEAD:
                        hcv.wait()
                work = self._take()
                if work is None:
                    return
                if isinstance(work, _Call):  # alone: once every batch before it is applied
                    with hcv:
                        while self._ahead:
                            hcv.wait()
                    self._call(work)
                    continue
                t0 = time.perf_counter()
                emb = self._embed(work)
                with hcv:
                    self._ahead += 1
                if not self._deliver(self._apply_on_loop, work, emb, t0):
                    with hcv:
                        self._ahead -= 1
        finally:
            with hcv:  # (the loop runs until _finish delivers _done)
                while self._ahead:
                    hcv.wait()
            self._finish()

    def _apply_on_loop(self, batch, emb, t0: float) -> None:
        try:
            self._apply(batch, emb, t0, on_loop=True)
        finally:
            with self._hcv:
                self._ahead -= 1
                self._hcv.notify_all()

    def _finish(self) -> None:
        with self._cv:
            self._closed = True
        if self._syncer is not None:
            with self._scv:
                self._syncq.append(_END)
                self._scv.notify_all()
            self._syncer.join()
        self._deliver(_settle_call, self._done, None, None)

    def _deliver(self, fn, *args) -> bool:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            return False
        return True

    def _answer(self, batch, results, seconds: float) -> None:
        """Event loop: one call per batch resolves every request of it."""
        for job, res in zip(batch, results):
            if not job.future.done():
                job.future.set_result(res)
        if self.on_batch is not None:
            self.on_batch(sum(j.n for j in batch), seconds)


class _Callback:
    """Stands for a job's future in _answer: hands the result to a function instead of a task."""
    __slots__ = ("worker", "nbytes", "fn")

    def __init__(self, worker: Worker, nbytes: int, fn):
        self.worker, self.nbytes, self.fn = worker, nbytes, fn

    def done(self) -> bool:
        return False

    def set_result(self, result) -> None:
        self.worker.held_bytes -= self.nbytes
        try:
            self.fn(result)
        except Exception:  # one answer failing must not keep the rest of the batch waiting
            log.exception("answering a request failed")


def _settle_call(fut: asyncio.Future, value, error) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(value)
