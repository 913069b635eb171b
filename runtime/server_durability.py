"""Group commit: the update log is fsynced on its own thread while the next micro-batch runs.

An answer that reports a state change waits until its log record is on disk (policy "always");
the worker thread does not wait, so while one fsync is in flight the following batches are
computed and their records written, and the next fsync covers all of them. Throughput is then
bounded by the encoder, not by the disk's fsync latency (slow on eMMC/SD cards).
"""
from __future__ import annotations

import asyncio
import logging
import threading

from .server_state import PersistError

log = logging.getLogger(__name__)


class GroupCommit:
    def __init__(self, update_log, loop: asyncio.AbstractEventLoop, on_failure=None):
        self.log, self.loop, self.on_failure = update_log, loop, on_failure
        self._cv = threading.Condition()
        self._waiting: list[tuple[int, asyncio.Future]] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="protoedge-fsync", daemon=True)
        self._thread.start()

    async def durable(self, seq: int) -> None:
        """Return once every record up to seq is on disk; PersistError if the disk failed."""
        if seq <= self.log.synced_seq:
            return
        fut = self.loop.create_future()
        with self._cv:
            self._waiting.append((seq, fut))
            self._cv.notify()
        await fut

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(30)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._waiting and not self._stopping:
                    self._cv.wait()
                if not self._waiting:
                    return
                batch, self._waiting = self._waiting, []
            try:
                synced, error = self.log.sync(), None
            except OSError as e:
                synced, error = self.log.synced_seq, e
                log.error("fsync of the update log failed: %s", e)
                if self.on_failure is not None:
                    self.on_failure()
            late = [(s, f) for s, f in batch if s > synced and error is None]
            if late:  # written after this fsync started (cannot happen for a caller's own seq); retry
                with self._cv:
                    self._waiting.extend(late)
            self.loop.call_soon_threadsafe(self._settle, [(s, f) for s, f in batch if (s, f) not in late], error)

    @staticmethod
    def _settle(done, error) -> None:
        for _, fut in done:
            if fut.done():
                continue
            if error is None:
                fut.set_result(None)
            else:
                fut.set_exception(PersistError(f"could not fsync the update log: {error}"))
