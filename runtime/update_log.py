"""Append-only log of acknowledged state updates, replayed on start after the last snapshot.

Why a log: the daemon answers an update only once its record is in the log, so a crash (kill -9)
after the answer cannot lose it; snapshots are too expensive to take per request.

File layout: ``<dir>/<first_seq:020d>.log`` segments, one per snapshot interval. Every record is

    u32 payload_len | u64 seq | u32 crc32(seq bytes + payload) | payload

and a payload is ``u32 header_len | JSON header | raw array bytes``. The JSON header names the
operation, its scalar arguments and the dtype/shape of each array (numeric dtypes only, read with
``np.frombuffer``: nothing in the log can execute code). Sequence numbers are global and
contiguous; a snapshot stores the last sequence it contains, so replay skips what it already has
and nothing is applied twice.

A torn or corrupt tail (short header, short payload, bad CRC, out-of-order sequence, undecodable
payload) ends replay: that record and everything after it are cut from disk, never applied.

Segments are preallocated: the writer fills the file with zeros ahead of the records, in chunks of
``PREALLOC_BYTES``, and writes each record in place (``pwrite``) over the zeros. An fdatasync then
has only data to flush, not a new file size or newly allocated blocks (a journal commit on ext4),
so the per-batch durability point costs a fraction of an appending fsync. A record header of
zeros (length 0 cannot be a record: every payload has a header) is the end of the records; the
rest of the file must then be zeros too, otherwise it is a torn tail like any other and is cut.
"""
from __future__ import annotations

import json
import logging
import os
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

_HEAD = struct.Struct("<IQI")
_U32 = struct.Struct("<I")
_SEQ = struct.Struct("<Q")
# Far above any record the daemon writes (bodies are size-limited), far below "read garbage
# as a length and allocate gigabytes".
MAX_RECORD_BYTES = 1 << 30
_ALLOWED_DTYPES = {"<f4", "<f8", "|u1", "<i8", "<i4"}
FSYNC_POLICIES = ("always", "interval")
PREALLOC_BYTES = 4 << 20  # zero-filled ahead of the records; one fdatasync with metadata per chunk
_ZEROS = bytes(1 << 20)
_fdatasync = getattr(os, "fdatasync", os.fsync)  # data (and the size, if it changed) only


class LogError(ValueError):
    pass


@dataclass
class Record:
    seq: int
    op: str
    args: dict = field(default_factory=dict)
    arrays: list = field(default_factory=list)


def encode_payload(op: str, args: dict, arrays: list[np.ndarray]) -> bytes:
    if not args and len(arrays) == 1:  # a stream update: its header depends on the shape only
        a = arrays[0]
        if type(a) is np.ndarray and a.flags.c_contiguous:
            key = (op, a.dtype.str, a.shape)
            header = _HEADERS.get(key)
            if header is None and key[1] in _ALLOWED_DTYPES:
                header = _HEADERS[key] = _header(op, args, [{"dtype": key[1], "shape": list(a.shape)}])
                if len(_HEADERS) > 256:
                    _HEADERS.clear()
            if header is not None:
                return b"".join((header, a.tobytes()))
    specs, blobs = [], []
    for a in arrays:
        a = np.ascontiguousarray(a)
        dtype = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
        a = a.astype(dtype, copy=False)
        if dtype.str not in _ALLOWED_DTYPES:
            raise LogError(f"cannot log an array of dtype {a.dtype}")
        specs.append({"dtype": dtype.str, "shape": list(a.shape)})
        blobs.append(a.tobytes())
    return b"".join([_header(op, args, specs), *blobs])


def _header(op: str, args: dict, specs: list) -> bytes:
    """A payload's length-prefixed JSON header."""
    header = json.dumps({"op": op, "args": args, "arrays": specs}, separators=(",", ":")).encode()
    return _U32.pack(len(header)) + header


# (op, dtype, shape) -> _header(op, {}, ...) for encode_payload: the daemon logs one record per
# micro-batch on the event loop, and json.dumps was most of the cost of encoding one (8.5 us
# per record before, 1.4 with the cached header).
_HEADERS: dict = {}


def decode_payload(seq: int, payload: bytes) -> Record:
    if len(payload) < _U32.size:
        raise LogError("payload shorter than its header length")
    (hlen,) = _U32.unpack_from(payload)
    end = _U32.size + hlen
    if end > len(payload):
        raise LogError("header length past the end of the payload")
    header = json.loads(payload[_U32.size:end])
    arrays, pos = [], end
    for spec in header["arrays"]:
        if spec["dtype"] not in _ALLOWED_DTYPES:
            raise LogError(f"unexpected dtype {spec['dtype']!r}")
        dtype = np.dtype(spec["dtype"])
        shape = tuple(int(s) for s in spec["shape"])
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if pos + nbytes > len(payload):
            raise LogError("array data past the end of the payload")
        arrays.append(np.frombuffer(payload, dtype=dtype, count=nbytes // dtype.itemsize,
                                    offset=pos).reshape(shape).copy())
        pos += nbytes
    if pos != len(payload):
        raise LogError("trailing bytes after the arrays")
    return Record(seq=seq, op=str(header["op"]), args=dict(header["args"]), arrays=arrays)


def encode_record(seq: int, payload: bytes) -> bytes:
    seq_bytes = _SEQ.pack(seq)
    return _HEAD.pack(len(payload), seq, zlib.crc32(payload, zlib.crc32(seq_bytes))) + payload


def _segments(directory: Path) -> list[tuple[int, Path]]:
    out = []
    for p in directory.glob("*.log"):
        try:
            out.append((int(p.stem), p))
        except ValueError:
            continue
    return sorted(out)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_segment(path: Path, expect_seq: int | None) -> tuple[list[Record], int, str | None]:
    """Records of one segment up to the first bad one: (records, good_bytes, why_it_stopped).
    why_it_stopped is None when the records end at the end of the file or at a zero-filled tail."""
    data = path.read_bytes()
    records, pos = [], 0
    while pos < len(data):
        if data[pos:pos + _HEAD.size].count(0) == min(_HEAD.size, len(data) - pos):
            # Zeros where a header would start: the preallocated region after the last record.
            # Anything but zeros after that was never acknowledged (a record is acknowledged only
            # once it and everything before it is written): a torn tail.
            if data.count(0, pos) != len(data) - pos:
                return records, pos, f"non-zero bytes after the end of the records at byte {pos}"
            return records, pos, None
        if len(data) - pos < _HEAD.size:
            return records, pos, f"torn record header at byte {pos}"
        length, seq, crc = _HEAD.unpack_from(data, pos)
        if length > MAX_RECORD_BYTES:
            return records, pos, f"implausible record length {length} at byte {pos}"
        start = pos + _HEAD.size
        if start + length > len(data):
            return records, pos, f"torn record payload at byte {pos}"
        payload = data[start:start + length]
        if zlib.crc32(payload, zlib.crc32(_SEQ.pack(seq))) != crc:
            return records, pos, f"CRC mismatch at byte {pos}"
        if expect_seq is not None and seq != expect_seq:
            return records, pos, f"sequence {seq} where {expect_seq} was expected at byte {pos}"
        try:
            records.append(decode_payload(seq, payload))
        except (LogError, ValueError, KeyError, TypeError) as e:
            return records, pos, f"undecodable record at byte {pos} ({e})"
        expect_seq = seq + 1
        pos = start + length
    return records, pos, None


class UpdateLog:
    """Single writer; callers serialise appends (the daemon does all mutations on one thread)."""

    def __init__(self, directory: str | os.PathLike, fsync: str = "always", interval_s: float = 1.0,
                 prealloc_bytes: int = PREALLOC_BYTES):
        if fsync not in FSYNC_POLICIES:
            raise LogError(f"fsync policy must be one of {FSYNC_POLICIES}, not {fsync!r}")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.policy = fsync
        self.interval_s = float(interval_s)
        self.prealloc_bytes = max(0, int(prealloc_bytes))
        self.last_seq = 0
        self._fd: int | None = None
        self._segment: Path | None = None
        self._pos = 0         # where the next record goes in the current segment
        self._allocated = 0   # bytes of the current segment that exist on disk (records + zeros)
        self._older_bytes = 0  # records in the segments before the current one
        self.synced_seq = 0  # everything up to here is on disk
        self._lock = threading.Lock()  # the write position and last_seq (append, sync, close)
        # One fdatasync at a time, and the file stays open while one runs. Separate from _lock so
        # that appends (on the daemon's event loop) go on while a sync thread waits for the disk.
        self._sync_lock = threading.Lock()
        self._last_sync = time.monotonic()
        self.fsyncs = 0
        self.fsync_seconds = 0.0  # time spent waiting for fdatasync (record syncs only)
        self.bytes_written = 0

    # -- reading ------------------------------------------------------------------------------

    def recover(self, after_seq: int) -> list[Record]:
        """Records with seq > after_seq, in order; cuts a torn/corrupt tail from disk.

        Raises LogError when the log does not continue the snapshot (a gap): replaying would
        silently build a state that no client was ever told about."""
        out: list[Record] = []
        expect: int | None = None
        segments = _segments(self.dir)
        cut_rest = False
        for first, path in segments:
            if cut_rest:
                log.error("update log: dropping segment %s after a corrupt record", path.name)
                path.unlink()
                continue
            if expect is not None and first != expect:
                log.error("update log: segment %s starts at %d, expected %d; dropping it", path.name, first, expect)
                path.unlink()
                cut_rest = True
                continue
            records, good, why = read_segment(path, first)
            size = path.stat().st_size
            if why is not None:
                log.error("update log: %s in %s; cutting %d bytes", why, path.name, size - good)
                cut_rest = True
            if good < size:
                # A torn tail, or the zeros preallocated after the last record: nothing is ever
                # appended to this segment again (writing resumes in a new one), so both go.
                with open(path, "r+b") as f:
                    f.truncate(good)
                    f.flush()
                    os.fsync(f.fileno())
            else:
                # Survived a process crash in the page cache; make it survive a power cut too.
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
            out.extend(records)
            if records:
                expect = records[-1].seq + 1
            elif expect is None:
                expect = first
        fresh = [r for r in out if r.seq > after_seq]
        if fresh and fresh[0].seq != after_seq + 1:
            raise LogError(f"the update log starts at sequence {fresh[0].seq} but the snapshot ends at "
                           f"{after_seq}: records are missing, refusing to build a state with a hole")
        self.last_seq = max(after_seq, out[-1].seq if out else 0)
        self.synced_seq = self.last_seq  # what survived a crash is on disk by definition
        return fresh

    # -- writing ------------------------------------------------------------------------------

    def open_segment(self) -> None:
        """Start writing a new segment that begins after the last known sequence."""
        self.close()
        self._older_bytes = sum(p.stat().st_size for _, p in _segments(self.dir))
        self._segment = self.dir / f"{self.last_seq + 1:020d}.log"
        if self._segment.exists():
            # A segment that starts at the next sequence holds nothing valid (recover checked it).
            self._older_bytes -= self._segment.stat().st_size
            self._segment.unlink()
        self._fd = os.open(self._segment, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self._pos = self._allocated = 0
        if self.prealloc_bytes:
            self._extend(self.prealloc_bytes)
        _fsync_dir(self.dir)

    def _extend(self, end: int) -> None:
        """Zero-fill the segment up to at least `end` (a multiple of the chunk) and make that
        durable, so that the records written over the zeros later need data-only fdatasyncs.
        Written zeros, not fallocate(): ext4 keeps fallocated blocks "unwritten", and the first
        write to each would again be a metadata change for the next fdatasync to commit."""
        chunk = self.prealloc_bytes
        end = -(-end // chunk) * chunk
        pos = self._allocated
        while pos < end:
            n = os.pwrite(self._fd, _ZEROS[:min(len(_ZEROS), end - pos)], pos)
            pos += n
        _fdatasync(self._fd)
        self._allocated = end

    def append(self, op: str, args: dict | None = None, arrays: list[np.ndarray] | None = None) -> int:
        """Write one record (to the OS, not yet to the disk: see commit/sync). Returns its sequence."""
        if self._fd is None:
            self.open_segment()
        seq = self.last_seq + 1
        buf = encode_record(seq, encode_payload(op, args or {}, arrays or []))
        with self._lock:
            end = self._pos + len(buf)
            if self.prealloc_bytes and end > self._allocated:
                self._extend(end)
            view, pos = memoryview(buf), self._pos
            while view:
                n = os.pwrite(self._fd, view, pos)
                view, pos = view[n:], pos + n
            self._pos = pos
            self.last_seq = seq
            self.bytes_written += len(buf)
        return seq

    def commit(self) -> None:
        """Make what was appended durable according to the policy, on this thread. Group commit:
        call once per batch of appends, before answering any of them."""
        if self.policy == "always" or time.monotonic() - self._last_sync >= self.interval_s:
            self.sync()

    def sync(self) -> int:
        """fdatasync what was written so far; returns the sequence now on disk. The daemon calls
        it once per micro-batch (group commit), on its sync thread while appends go on.

        Only the snapshot of (last_seq, fd) is taken under the append lock: fdatasync flushes every
        write that completed before it started, so the records up to that last_seq are on disk
        when it returns, and records appended meanwhile wait for the next sync (the caller answers
        only what it appended before calling)."""
        with self._sync_lock:
            with self._lock:
                target, fd = self.last_seq, self._fd
            if fd is None or target <= self.synced_seq:
                self._last_sync = time.monotonic()
                return self.synced_seq
            t0 = time.perf_counter()
            _fdatasync(fd)
            self.fsync_seconds += time.perf_counter() - t0
            self.synced_seq = target
            self.fsyncs += 1
            self._last_sync = time.monotonic()
            return target

    def drop_before(self, seq: int) -> None:
        """Delete the segments whose records all have sequence <= seq (a snapshot holds them)."""
        segments = _segments(self.dir)
        for i, (first, path) in enumerate(segments):
            nxt = segments[i + 1][0] if i + 1 < len(segments) else None
            if path == self._segment:
                continue
            if nxt is not None and nxt - 1 <= seq:
                path.unlink()
        _fsync_dir(self.dir)
        self._older_bytes = sum(p.stat().st_size for _, p in _segments(self.dir) if p != self._segment)

    def close(self) -> None:
        """Sync, drop the unused preallocated zeros and close the current segment."""
        if self._fd is not None:
            self.sync()
            with self._sync_lock, self._lock:  # (after any sync still running on another thread)
                fd, self._fd = self._fd, None
                if self._allocated > self._pos:
                    os.ftruncate(fd, self._pos)
                    os.fsync(fd)
                self._allocated = self._pos = 0
            os.close(fd)

    def size_bytes(self) -> int:
        """Bytes of records since the last snapshot (the preallocated zeros are not counted)."""
        return self._older_bytes + self._pos if self._fd is not None else \
            sum(p.stat().st_size for _, p in _segments(self.dir))
