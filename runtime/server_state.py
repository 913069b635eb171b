"""The daemon's clusterer with durability: update log + atomic snapshots, replayed on start.

Layout of a state directory:

    snapshots/snap-<seq:020d>/   StreamClusterer.save() output + daemon.json (+ thumbnails.npz)
    log/<first_seq:020d>.log      update records after the snapshots (see update_log.py)

A snapshot directory is written under a temporary name and renamed when complete, so it either
exists whole or not at all; its name carries the last log sequence it contains. On start the
newest snapshot is loaded and only records with a larger sequence are replayed, so a crash between
"snapshot written" and "old log deleted" applies nothing twice.

Every method that touches the clusterer is called from one worker thread (the daemon's
executor), which orders all mutations; replay calls the same clusterer methods with the same
embeddings, and StreamClusterer is deterministic, so the replayed state equals the live one.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .clustering import StreamClusterer
from .errors import InputError, StateError
from .montage import MemberSamples
from .update_log import UpdateLog

log = logging.getLogger(__name__)

SNAPSHOT_PREFIX = "snap-"
DAEMON_META = "daemon.json"
THUMBS_FILE = "thumbnails.npz"
KEEP_SNAPSHOTS = 2


class PersistError(RuntimeError):
    """The update log could not be written; the update was not acknowledged and the daemon
    stops rather than keep running without durability."""


class NotFound(InputError):
    """A cluster id the client named does not exist (404 rather than 400)."""


@dataclass
class Job:
    """One request's share of a micro-batch."""
    op: str                  # "embed" | "assign" | "cluster" | "examples"
    pixels: np.ndarray       # uint8 [n, C, H, W], validated
    labels: list | None = None
    future: object = None    # set by the batcher

    @property
    def n(self) -> int:
        return len(self.pixels)


class Thumbnails(MemberSamples):
    """MemberSamples plus the list of clusters it holds images for (to follow merges/evictions)."""

    def ids(self) -> list[int]:
        return list(self._thumbs)


def _snapshot_dirs(root: Path) -> list[tuple[int, Path]]:
    out = []
    for p in root.glob(SNAPSHOT_PREFIX + "*"):
        try:
            out.append((int(p.name[len(SNAPSHOT_PREFIX):]), p))
        except ValueError:
            continue
    return sorted(out, reverse=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DaemonState:
    def __init__(self, bundle, encoder, state_dir: str | os.PathLike | None, fsync: str = "always",
                 fsync_interval_s: float = 1.0, thumbnails_per_cluster: int = 8, **clusterer_params):
        self.bundle = bundle
        self.encoder = encoder
        self.dir = Path(state_dir) if state_dir else None
        self.clusterer_params = clusterer_params
        self.thumbs = Thumbnails(per_cluster=thumbnails_per_cluster)
        self.log: UpdateLog | None = None
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / "snapshots").mkdir(exist_ok=True)
            self.log = UpdateLog(self.dir / "log", fsync=fsync, interval_s=fsync_interval_s)
        self.clusterer: StreamClusterer | None = None
        self.snapshot_seq = 0
        self.replayed = 0
        self._thumb_key = None
        self._lock_fd = None

    # ------------------------------------------------------------------ start

    def open(self) -> None:
        """Load the newest snapshot and replay the log after it (or start empty)."""
        self.clusterer = StreamClusterer.from_bundle(self.bundle, **self.clusterer_params)
        if self.dir is None:
            return
        self._lock_folder()
        for tmp in (self.dir / "snapshots").glob(".tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)  # an interrupted snapshot: the log still has it
        snaps = _snapshot_dirs(self.dir / "snapshots")
        self._load_snapshot(snaps)
        records = self.log.recover(after_seq=self.snapshot_seq)
        for rec in records:
            self._apply(rec.op, rec.args, rec.arrays)
        self.replayed = len(records)
        self.log.open_segment()
        if records:
            log.info("replayed %d logged updates after snapshot %d", len(records), self.snapshot_seq)
        if not snaps and not records:
            # A new folder: pin the clusterer's settings in a first snapshot, so that a later start
            # with other settings cannot replay this history differently.
            self.snapshot()

    def _load_snapshot(self, snaps: list[tuple[int, Path]]) -> None:
        """The newest snapshot that loads; an older one if it is damaged (the log is kept back
        to the oldest snapshot, so replay covers the difference)."""
        errors = []
        for seq, path in snaps:
            self._check_model(path)
            try:
                clusterer = StreamClusterer.load(path)
            except StateError as e:
                log.error("snapshot %s is unusable (%s); trying an older one", path.name, e)
                errors.append(str(e))
                continue
            self.clusterer, self.snapshot_seq = clusterer, seq
            self._load_thumbs(path)
            wanted = {k: v for k, v in self.clusterer_params.items() if v is not None}
            saved = clusterer.get_params()
            differ = {k: (saved.get(k), v) for k, v in wanted.items() if saved.get(k) != v}
            if differ:
                log.warning("state %s keeps the settings it was created with; ignoring %s (saved, given): "
                            "start with a new --state folder to change them", self.dir, differ)
            return
        if errors:
            raise StateError(f"{self.dir}: no usable snapshot: " + "; ".join(errors))

    def _lock_folder(self) -> None:
        """One daemon per state folder: two writers would interleave their logs."""
        import fcntl

        self._lock_fd = os.open(self.dir / "daemon.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise StateError(f"{self.dir} is in use by another protoedge daemon; give each its own --state") from None

    def _check_model(self, snap: Path) -> None:
        meta_path = snap / DAEMON_META
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as e:
            raise StateError(f"{meta_path}: unreadable ({e})") from None
        want = self.bundle.file_sha256("fp32")
        if meta.get("bundle_fp32_sha256") not in (None, want):
            raise StateError(f"{self.dir} holds clusters made with another model (fp32 sha256 "
                             f"{str(meta.get('bundle_fp32_sha256'))[:12]}..., this bundle {want[:12]}...): "
                             "their embeddings are not comparable; use another --state directory")

    # ------------------------------------------------------------------ mutations (worker thread)

    def _apply(self, op: str, args: dict, arrays: list[np.ndarray]):
        c = self.clusterer
        if op == "fit":
            return c.partial_fit(arrays[0])
        if op == "examples":
            return c.learn_examples(arrays[0], args["labels"])
        if op == "label":
            return c.label(args["id"], args["label"])
        if op == "merge":
            return c.merge(args["ids"])
        if op == "remove":
            return c.remove(args["id"])
        raise StateError(f"unknown update {op!r} in the log")

    def _mutate(self, op: str, args: dict, arrays: list[np.ndarray]):
        """Apply, then log. The clusterer validates before it changes anything, so a refused
        update is neither applied nor logged; commit() happens once per batch, before answering."""
        result = self._apply(op, args, arrays)
        if self.log is not None:
            try:
                self.log.append(op, args, arrays)
            except OSError as e:
                raise PersistError(f"could not write the update log: {e}") from e
        return result

    def commit(self) -> None:
        """Durability point of a batch (group commit: one fdatasync for all of its records, with
        policy always), before any of its requests is answered."""
        if self.log is not None:
            try:
                self.log.commit()
            except OSError as e:
                raise PersistError(f"could not fsync the update log: {e}") from e

    def run_batch(self, jobs: list[Job], max_batch: int) -> list:
        """Embed every job's images in encoder calls of at most max_batch, then apply each job in
        arrival order. Returns one result per job: a value or an exception to raise for it."""
        return self.apply_batch(jobs, self.embed_jobs(jobs, max_batch))

    def embed_jobs(self, jobs: list[Job], max_batch: int) -> np.ndarray:
        """The embeddings of every job's images, in order. Reads nothing of the clusters, so it may
        run on another thread than apply_batch (the daemon's encoder stage)."""
        pixels = jobs[0].pixels if len(jobs) == 1 else np.concatenate([j.pixels for j in jobs])
        embed = getattr(self.encoder, "embed_valid", self.encoder.embed)  # pixels are validated already
        if len(pixels) <= max_batch:
            return embed(pixels)
        return np.concatenate([embed(pixels[i:i + max_batch]) for i in range(0, len(pixels), max_batch)])

    def apply_batch(self, jobs: list[Job], emb: np.ndarray, commit: bool = True) -> list:
        """Apply each job with its embeddings in arrival order, log and commit (once per batch;
        commit=False: the caller commits before answering any of them)."""
        parts, start = [], 0
        for job in jobs:
            parts.append(emb[start:start + job.n])
            start += job.n
        results: list = [None] * len(jobs)
        # Concurrent requests have no order among themselves, so the batch's stream updates go
        # first, as one clusterer call and one log record (cheaper than one per request).
        fits = [i for i, j in enumerate(jobs) if j.op == "cluster"]
        if len(fits) > 1:
            self._fit_together(jobs, parts, fits, results)
        for i, job in enumerate(jobs):
            if results[i] is None:
                try:
                    results[i] = self._run_job(job, parts[i])
                except InputError as e:
                    results[i] = e
        if commit:
            self.commit()
        return results

    def _fit_together(self, jobs, parts, fits, results) -> None:
        try:
            assignments = self._mutate("fit", {}, [np.concatenate([parts[i] for i in fits])])
        except InputError:
            return  # one request's embeddings are unusable: each is then tried on its own
        seq, pos = self.seq, 0
        for i in fits:
            mine = assignments[pos:pos + jobs[i].n]
            pos += jobs[i].n
            self.thumbs.add(jobs[i].pixels, [a.cluster_id for a in mine])
            results[i] = (mine, seq)
        self._sync_thumbs()

    def _run_job(self, job: Job, x: np.ndarray):
        if job.op == "embed":
            return x
        if job.op == "assign":
            return self.clusterer.predict(x)
        if job.op == "cluster":
            assignments = self._mutate("fit", {}, [x])
            self.thumbs.add(job.pixels, [a.cluster_id for a in assignments])
            self._sync_thumbs()
            return assignments, self.seq
        if job.op == "examples":
            classes = self._mutate("examples", {"labels": list(job.labels)}, [x])
            self.thumbs.add(job.pixels, [classes[name] for name in job.labels])
            self._sync_thumbs()
            return classes, self.seq
        raise InputError(f"unknown operation {job.op!r}")

    def label(self, cluster_id: int, label: str) -> int:
        self._require(cluster_id)
        survivor = self._mutate("label", {"id": int(cluster_id), "label": label}, [])
        self._sync_thumbs(force=True)
        self.commit()
        return survivor

    def merge(self, ids: list[int]) -> int:
        for i in ids:
            self._require(i)
        survivor = self._mutate("merge", {"ids": [int(i) for i in ids]}, [])
        self._sync_thumbs(force=True)
        self.commit()
        return survivor

    def remove(self, cluster_id: int) -> int:
        self._require(cluster_id)
        live = self.clusterer.resolve(int(cluster_id))
        self._mutate("remove", {"id": int(cluster_id)}, [])
        self._sync_thumbs(force=True)
        self.commit()
        return live

    def _sync_thumbs(self, force: bool = False) -> None:
        """Follow merges, evictions and removals with the thumbnails. Only when the clusterer
        reports such an event (its stats counters), since listing clusters per batch is not free."""
        stats = self.clusterer.stats
        key = (stats["merged"], stats["evicted"], stats["dissolved"])
        if not force and key == self._thumb_key:
            return
        self._thumb_key = key
        live = {c.id for c in self.clusterer.clusters()}
        for cid in list(self.thumbs.ids()):
            if cid in live:
                continue
            target = self.clusterer.resolve(cid)
            if target in live:
                self.thumbs.merge(target, [cid])
            else:
                self.thumbs.forget(cid)

    def _require(self, cluster_id: int) -> None:
        if self.cluster(cluster_id) is None:
            raise NotFound(f"no cluster with id {cluster_id} (it may have been evicted, merged away or removed)")

    # ------------------------------------------------------------------ reads (worker thread)

    def cluster(self, cluster_id: int):
        live = self.clusterer.resolve(int(cluster_id))
        for info in self.clusterer.clusters():
            if info.id == live:
                return info
        return None

    def thumbnails(self, cluster_id: int, k: int) -> np.ndarray:
        rows = self.thumbs.rows([{"id": self.clusterer.resolve(int(cluster_id))}])
        return rows[0].thumbnails[:k] if rows else np.zeros((0,), np.uint8)

    @property
    def seq(self) -> int:
        return self.log.last_seq if self.log is not None else 0

    # ------------------------------------------------------------------ snapshots (worker thread)

    def snapshot(self) -> dict:
        """Write snapshots/snap-<seq>/ atomically, then drop the log it makes redundant."""
        if self.dir is None:
            raise StateError("the daemon runs without --state: there is nothing to snapshot into")
        t0 = time.perf_counter()
        self.log.sync()
        seq = self.log.last_seq
        root = self.dir / "snapshots"
        final = root / f"{SNAPSHOT_PREFIX}{seq:020d}"
        if not final.exists():
            tmp = root / f".tmp-{seq:020d}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            self.clusterer.save(tmp, keep=1)
            self._save_thumbs(tmp)
            meta = {"seq": seq, "created_unix": time.time(), "bundle_fp32_sha256": self.bundle.file_sha256("fp32"),
                    "model": self.bundle.manifest.get("model", {})}
            with open(tmp / DAEMON_META, "w") as f:
                json.dump(meta, f)
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(tmp)
            os.rename(tmp, final)
            _fsync_dir(root)
        self.snapshot_seq = seq
        self.log.open_segment()
        kept = _snapshot_dirs(root)
        for _, old in kept[KEEP_SNAPSHOTS:]:
            shutil.rmtree(old, ignore_errors=True)
        # Keep the log back to the oldest snapshot kept, so that one can stand in for a damaged newer one.
        self.log.drop_before(kept[:KEEP_SNAPSHOTS][-1][0])
        return {"seq": seq, "path": str(final), "seconds": time.perf_counter() - t0,
                "clusters": self.clusterer.n_clusters}

    def _save_thumbs(self, path: Path) -> None:
        rows = self.thumbs.rows([{"id": cid} for cid in self.thumbs.ids()])
        if rows:
            ids = np.concatenate([np.full(len(r.thumbnails), r.cluster_id, np.int64) for r in rows])
            with open(path / THUMBS_FILE, "wb") as f:
                np.savez(f, ids=ids, images=np.concatenate([r.thumbnails for r in rows]))
                f.flush()
                os.fsync(f.fileno())

    def _load_thumbs(self, path: Path) -> None:
        f = path / THUMBS_FILE
        if not f.exists():
            return
        try:
            with np.load(f, allow_pickle=False) as z:
                ids, images = z["ids"], z["images"]
            self.thumbs.add(images, ids.tolist())
        except (OSError, ValueError, KeyError) as e:
            log.warning("%s: thumbnails not restored (%s)", f, e)  # cosmetic; the clusters are intact

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None
