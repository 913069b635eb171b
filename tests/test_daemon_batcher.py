"""The daemon's micro-batcher on its own: a lone request runs inline on the event loop, concurrent
requests still form micro-batches on the worker thread, and state changes never overlap."""
from __future__ import annotations

import asyncio
import threading

from protoedge.runtime.server_batcher import Worker


class Job:
    def __init__(self, i: int):
        self.n, self.i, self.future = 1, i, None


class Recorder:
    """embed/apply that record which thread ran them, batch sizes, and whether two ever overlapped."""

    def __init__(self):
        self.lock = threading.Lock()
        self.active = 0
        self.overlap = False
        self.batches: list[int] = []
        self.threads: set[str] = set()

    def embed(self, jobs):
        return [j.i * 10 for j in jobs]

    def apply(self, jobs, emb):
        with self.lock:
            self.active += 1
            self.overlap |= self.active > 1
        try:
            self.threads.add(threading.current_thread().name)
            self.batches.append(len(jobs))
            threading.Event().wait(0.002)  # a batch takes time, so that others can queue meanwhile
            return list(emb)
        finally:
            with self.lock:
                self.active -= 1


async def _submit(worker: Worker, i: int):
    worker.admit(1)
    return await worker.submit(Job(i), 1)


def _run(inline: bool, scenario, pipeline: bool = False):
    async def main():
        rec = Recorder()
        worker = Worker(asyncio.get_running_loop(), rec.embed, rec.apply, max_batch=64, inline_idle=inline,
                        pipeline=pipeline)
        await asyncio.sleep(0.05)  # the worker thread parks
        try:
            results = await scenario(worker)
        finally:
            await worker.stop()
        return rec, worker, results
    return asyncio.run(main())


def one_at_a_time(submit, n: int):
    """A scenario: n requests through `submit`, each after the previous one's answer."""
    async def scenario(worker):
        out = []
        for i in range(n):
            out.append(await submit(worker, i))
            await asyncio.sleep(0.001)
        return out
    return scenario


sequential = one_at_a_time(_submit, 20)


async def concurrent(worker):
    return await asyncio.gather(*(_submit(worker, i) for i in range(32)))


def test_lone_requests_run_inline_on_the_event_loop():
    rec, worker, results = _run(True, sequential)
    assert results == [i * 10 for i in range(20)]
    assert worker.inline_runs == 20
    assert rec.threads == {"MainThread"}


def test_without_inline_the_worker_thread_answers():
    rec, worker, results = _run(False, sequential)
    assert results == [i * 10 for i in range(20)]
    assert worker.inline_runs == 0
    assert rec.threads == {"protoedge-worker"}


def test_concurrent_requests_still_batch_and_never_overlap():
    rec, worker, results = _run(True, concurrent)
    assert results == [i * 10 for i in range(32)]  # each request gets its own answer
    assert worker.inline_runs == 0  # they arrived together: none of them was alone
    assert max(rec.batches) > 1 and sum(rec.batches) == 32
    assert not rec.overlap


async def mixed(worker):
    # a lone request, then a burst while nothing runs, then lone ones again
    out = [await _submit(worker, 0)]
    out += await asyncio.gather(*(_submit(worker, i) for i in range(1, 17)))
    for i in range(17, 20):
        out.append(await _submit(worker, i))
    return out


def test_inline_and_worker_batches_mix_without_overlap():
    rec, worker, results = _run(True, mixed)
    assert results == [i * 10 for i in range(20)]
    assert worker.inline_runs >= 2 and sum(rec.batches) == 20
    assert not rec.overlap


async def with_calls(worker):
    """Bursts with a call queued behind each: the call must run after the burst's batches are applied."""
    rec = worker.apply.__self__
    seen, results = [], []
    for burst in range(4):
        tasks = [asyncio.ensure_future(_submit(worker, i)) for i in range(burst * 8, burst * 8 + 8)]
        await asyncio.sleep(0)  # the burst is queued before the call
        seen.append(await worker.call(lambda: sum(rec.batches)))
        results += [await t for t in tasks]
    return seen, results


def test_pipeline_applies_on_the_event_loop_in_order_with_calls():
    rec, worker, (seen, results) = _run(False, with_calls, pipeline=True)
    assert results == [i * 10 for i in range(32)]
    assert rec.threads == {"MainThread"}  # the clusterer runs on the loop, the encoder on the thread
    assert not rec.overlap and sum(rec.batches) == 32
    assert seen == [8, 16, 24, 32]


def _submit_nowait(worker: Worker, i: int) -> asyncio.Future:
    """The fast HTTP path's way in: admit, then submit_nowait with a callback instead of a task."""
    fut = asyncio.get_running_loop().create_future()
    worker.admit(1)
    worker.submit_nowait(Job(i), 1, fut.set_result)
    return fut


nowait_sequential = one_at_a_time(_submit_nowait, 10)


async def nowait_bursts(worker):
    out = []
    for burst in range(3):  # each burst arrives while the worker is parked
        out += await asyncio.gather(*(_submit_nowait(worker, i) for i in range(burst * 12, burst * 12 + 12)))
        await asyncio.sleep(0.01)
    return out


def test_fast_path_submissions_run_inline_when_alone():
    rec, worker, results = _run(True, nowait_sequential)
    assert results == [i * 10 for i in range(10)]
    assert worker.inline_runs == 10 and worker.held_bytes == 0


def test_fast_path_bursts_are_queued_together_in_order():
    rec, worker, results = _run(True, nowait_bursts)
    assert results == [i * 10 for i in range(36)]
    assert worker.inline_runs == 0  # none of them was alone
    assert max(rec.batches) > 1 and sum(rec.batches) == 36
    assert not rec.overlap and worker.held_bytes == 0 and worker.arriving == 0
