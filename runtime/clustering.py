"""Prototype memory for few-shot classes and unlabelled streams (numpy only).

One estimator, scikit-learn style: parameters in the constructor, state learned with
``partial_fit`` (assign + update, one sample after the other), ``predict`` (assign only) and
``learn_examples`` (labelled prototypes). The algorithm is online leader clustering, the
single-pass limit of DP-means (Kulis & Jordan 2012) as used by Online ProtoNet / OUPN:

* a sample joins the nearest prototype, or opens a new cluster when it is farther than
  ``threshold`` from all of them; it gets that cluster's id at once, but the cluster is only a
  *candidate* (not counted in ``n_found``) until ``min_size`` samples have joined it: a lone far
  sample is an outlier or the first of a new class, and only a second one near it tells which;
* the winner moves by a count-weighted running mean, and every count decays by ``decay`` per
  sample, so old clusters fade and the least used one is evicted when ``max_clusters`` is reached;
* when the winner's prototype is within ``merge_threshold`` of its runner-up's, both are
  established (``min_size`` samples or a label) and the merged cluster would be no wider than
  ``max_spread`` (mean member distance to the prototype, tracked per cluster), the two merge;
  the width condition stops chains: a cluster grown by merging cannot keep absorbing neighbours;
* every ``refine_every`` samples, a repair over the last ``memory`` samples (see ``_repair``):
  a cluster whose remembered members fall into two groups far apart (2-means) is split, every
  remembered sample moves to its nearest prototype (a hard k-means step, the zero-temperature
  limit of the soft one in Ren et al. 2018), and the fragments a class left behind early are
  merged back by Ward's criterion. A wrong early join would otherwise leave one cluster holding
  two classes for good; on Protocol-A streams this is worth 2-3 points of ACC;
* with ``recluster=True`` the repair then asks runtime/recluster.py for a second opinion: Ward's
  hierarchy over the unlabelled clusters' remembered samples, cut at the cluster count (+-5) with
  the best silhouette, replaces the partition when it scores better (one global threshold cannot
  fit every pair of classes; off by default: ~1.3 ms per repair while the memory holds few, large
  clusters, which on the speed benchmark's stream triples the clusterer's cost).

Distances follow the bundle: ``cosine`` = squared Euclidean between L2-normalised vectors
(2 - 2 cos), ``sqeuclidean`` = squared Euclidean on raw embeddings. Prototypes live in a
preallocated matrix that doubles when full, with their squared norms cached; each sample is
scored against every prototype (brute force beats ANN indexes below ~10k prototypes) by the
compiled loop of runtime/_rowloop.c, or, where the package was installed without a C compiler,
by numpy: one matrix product per batch whose columns are patched as prototypes move. The two
compute the same algorithm but round dot products differently, so their results agree to float
precision, not bit for bit. Both are deterministic; the C loop also gives a batch bit-identical
results to its samples one at a time (the numpy loop's matrix product may round a row's scores
differently by its position in the batch).
"""
from __future__ import annotations

import math
import os
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from operator import itemgetter
from typing import NamedTuple

import numpy as np

from .errors import InputError, StateError
from .validation import validate_embeddings

try:
    from . import _rowloop
except ImportError:  # installed without a C compiler: the numpy loop (StreamClusterer._fit_batch)
    _rowloop = None

STATE_FORMAT = 2  # 2 added the per-cluster spread; format-1 states still load (see _restore)
_CHUNK = 64  # samples per score matrix in partial_fit (measured best of 32-256; bounds its memory)
# Above this many clusters partial_fit uses the numpy loop even where the C one is built: the C
# loop reads every prototype for every sample, and from about 1,000 clusters on (256 KB of
# prototypes at d = 64) that memory traffic costs more than the numpy loop's per-call overhead
# (us per sample, C / numpy: 7.0 / 19.9 at 300 clusters, 20.1 / 24.7 at 1,000, 217 / 68 at 10,000).
ROWLOOP_MAX_CLUSTERS = 1024
# What _rowloop.fit_rows stopped for (EV_* in runtime/_rowloop.c).
_ROWS_DONE, _ROW_OPENS, _ROW_MAY_MERGE = 0, 1, 2
_OP_OPEN, _OP_REMOVE, _OP_DISSOLVE, _OP_MERGE = 1, 2, 3, 4  # _rowloop.repair's log
MAX_SPREAD = 0.5  # default max_spread = this x threshold (see StreamClusterer)
# _repair tests clusters with at least SPLIT_MIN remembered members for a split, and splits one
# when the means of its two 2-means halves are more than SPLIT_DISTANCE thresholds apart. In
# threshold units, halves of one character lie 0.2-0.7 apart (5th-95th percentile) and two
# characters 0.9-2.5 on Protocol-A train streams; two MNIST-train digits 0.7-1.1. 0.5 against 0.75
# (picked on 60 Protocol-A train streams, committed bundle): 91.2% ACC against 89.6%; on the test
# streams of benchmark (a) 83.2% against 81.3%, on (b) 92.6% against 92.9%. It cuts a few more
# characters in two, which a fleet merge once could not mend; it now repairs over the devices'
# memories (runtime/fleet.py).
SPLIT_MIN = 6
SPLIT_DISTANCE = 0.5
# ... and merges two established clusters when Ward's cost of joining them is below MERGE_COST
# thresholds and their prototypes are within MERGE_CAP thresholds (see _merge_close).
MERGE_COST = 2.25
MERGE_CAP = 0.5
# The repair's re-clustering (recluster=True, runtime/recluster.py): Ward cuts at the memory's
# cluster count +- RECLUSTER_SPAN, adopted when the best silhouette beats the current partition's
# by RECLUSTER_MARGIN; only when the memory holds RECLUSTER_MIN_MEMBERS samples per cluster on
# average, since a silhouette says little about clusters of one or two (a try costs ~1.3 ms at 256
# remembered samples: a Ward linkage and 11 cuts' silhouettes; the off-by-default reason, README).
RECLUSTER_SPAN = 5
RECLUSTER_MARGIN = 0.01
RECLUSTER_MIN_MEMBERS = 4
# While the full memory averages fewer than SPARSE_MEMBERS samples per cluster it touches (a
# stream of hundreds of classes, each seen now and then), the next repair comes after
# SPARSE_PERIOD x refine_every samples: with two or three members per cluster there is little to
# split, move or merge. On the whole Omniglot test set as one stream (423 characters, 8,460
# images; the memory then touches 80-100 clusters) repairing every 50, 100 or 200 samples or never
# gave the same ACC (24.5-26.1%, two orders), and the repair was most of the clusterer's cost
# (20-23 us per sample at 50, 11 at 200, 6 without). A memory not yet full (the start of a
# stream, where the repair matters most) is never sparse.
SPARSE_MEMBERS = 4
SPARSE_PERIOD = 4


class one_blas_thread:
    """Runs numpy's BLAS on one thread for the duration of a ``with`` block, as scikit-learn does
    (with threadpoolctl) around its own small matrix work. The clusterer's matrices are small (a
    batch against a few hundred prototypes), and splitting them across BLAS threads costs more in
    hand-offs than it gains: on the 2-core CI machine partial_fit took 60 us/sample at batch 64
    with OpenBLAS's 2 threads against 23 with one. Calls threadpoolctl's per-library controllers
    directly (about 1 us) rather than ``threadpool_limits`` (tens of us, which a one-image call
    would feel)."""

    _libs = None
    # Blocks open on any thread. Nested blocks (a caller's block around several clusterer calls)
    # skip the controllers: the limit is already set, and they cost ~10 us a call. The library
    # setting is process-wide, so the first block in sets it and the last one out restores it.
    _depth = 0
    _restore: list = []
    _guard = threading.Lock()

    def __enter__(self):
        cls = one_blas_thread
        with cls._guard:
            cls._depth += 1
            if cls._depth > 1:
                return self
            if cls._libs is None:
                from threadpoolctl import ThreadpoolController

                cls._libs = ThreadpoolController().select(user_api="blas").lib_controllers
            cls._restore = []
            for lib in cls._libs:
                n = lib.get_num_threads()
                if n != 1:
                    lib.set_num_threads(1)
                    cls._restore.append((lib, n))
        return self

    def __exit__(self, *exc):
        cls = one_blas_thread
        with cls._guard:
            cls._depth -= 1
            if cls._depth == 0:
                for lib, n in cls._restore:
                    lib.set_num_threads(n)
                cls._restore = []
        return False


class Assignment(NamedTuple):
    """Where one sample went (a NamedTuple: cheap to create once per sample).

    cluster_id: the cluster the sample joined (partial_fit) or the nearest cluster (predict; -1 if
      there is none). distance: to the nearest existing prototype when the sample arrived.
    confidence: softmax probability of the outcome among {nearest, runner-up, new cluster at the
      threshold distance}, with the bundle's logit scale (logit = -temperature * distance).
    new_cluster: partial_fit opened a cluster for it; for predict, it would have.
    """
    cluster_id: int
    distance: float
    confidence: float
    new_cluster: bool
    label: str | None = None

    def to_dict(self) -> dict:
        d = self._asdict()
        d["distance"] = d["distance"] if math.isfinite(d["distance"]) else None
        return d


@dataclass(frozen=True)
class ClusterInfo:
    id: int
    label: str | None
    count: float      # decayed count: the prototype's weight in its running mean
    seen: int         # samples ever absorbed
    created: int      # stream step at birth
    last_seen: int    # stream step of the last sample absorbed


RULE_FACTOR = 1.2  # x the calibration's same/different-item midpoint (see rule_threshold)


def rule_threshold(calibration: dict, factor: float = RULE_FACTOR) -> float:
    """The calibration rule: ``factor`` (RULE_FACTOR) x the exporter's ``new_cluster_threshold``
    (midpoint of the same-item 0.95 and different-item 0.05 quantiles).

    A cluster is born from one sample, so the threshold must admit *sample-to-sample* distances
    within a class, which are wider than the calibration's same-item distances (two views of one
    drawing). On streams of 20 Protocol-A *train* characters x 20 drawings the most accurate
    multiple of the midpoint was 1.1 (5w1s 93.5% encoder), 1.2 (90.1%), 1.4-1.6 (CACTUs, 72%) and
    1.4 (MAML, 78%); 1.2 is within 1.6 points of each one's best for the two strong encoders and
    finds 22-25 clusters for 20 (benchmarks/runtime.py reports the check).
    """
    tau = calibration.get("new_cluster_threshold")
    if tau is None:
        raise StateError("the bundle's calibration has no new_cluster_threshold; pass threshold= explicitly")
    tau = factor * float(tau)
    if not math.isfinite(tau) or tau <= 0:
        raise StateError(f"calibration gives an unusable threshold {tau!r}; pass threshold= explicitly")
    return tau


def threshold_from_calibration(calibration: dict) -> float:
    """Default new-cluster threshold from a bundle's calibration: the one export chose without
    labels and stored as ``cluster_threshold`` (export/calibration.py: the stream silhouette search
    on the calibration images when it finds structure, else the rule), or for bundles exported
    before that was stored, the rule (rule_threshold)."""
    stored = calibration.get("cluster_threshold")
    if isinstance(stored, dict) and "value" in stored:
        try:
            tau = float(stored["value"])
        except (TypeError, ValueError):
            tau = math.nan
        if not math.isfinite(tau) or tau <= 0:
            raise StateError(f"the bundle's stored cluster_threshold {stored['value']!r} is unusable; "
                             "pass threshold= explicitly")
        return tau
    return rule_threshold(calibration)


class StreamClusterer:
    """Online prototype memory: few-shot classes and streaming clusters in one model.

    Parameters
    ----------
    dim: embedding dimension.
    threshold: distance beyond which a sample opens a new cluster (device distance, see module doc).
    distance: "cosine" or "sqeuclidean".
    max_clusters: cap; when reached, the least used (lowest decayed count) unlabelled cluster is
      evicted to make room.
    decay: multiplies every count once per learned sample (0.999 = half-life ~700 samples).
    merge_threshold: winner and runner-up closer than this may merge (default 0.25 * threshold;
      0 disables all merging, the repair's too; bundles whose export found broad classes store
      their own, see from_bundle).
    temperature: logit scale for confidences (the bundle's trained value).
    refine_every: repair (split, reassign, merge; see _repair) every this many samples (0 = off).
      On Protocol-A train streams, 20 scored 0.7 points above 50 at 2.5x the cost.
    memory: how many recent samples the repair works on (kept in the saved state).
    min_size: samples a cluster needs before it counts as found and may merge (2: a far sample
      waits for a second one near it; 1: every cluster counts at once).
    max_spread: a merge is refused if the merged cluster's mean member distance would exceed this
      (default MAX_SPREAD * threshold; on MNIST-train streams it kept 4/9-style merges out: 92.5%
      ACC against 85.6% without it).
    """

    # The compiled per-sample loop when it was built; False runs the numpy loop (the tests compare
    # them; PROTOEDGE_CLUSTER_LOOP=numpy picks it in a process, for benchmarks and bug reports).
    compiled = _rowloop is not None and os.environ.get("PROTOEDGE_CLUSTER_LOOP", "").lower() != "numpy"

    def __init__(self, dim: int, threshold: float, distance: str = "cosine", max_clusters: int = 1000,
                 decay: float = 0.999, merge_threshold: float | None = None, temperature: float = 10.0,
                 refine_every: int = 50, memory: int = 256, min_size: int = 2, max_spread: float | None = None,
                 recluster: bool = False, model: dict | None = None):
        if distance not in ("cosine", "sqeuclidean"):
            raise InputError(f"distance must be 'cosine' or 'sqeuclidean', not {distance!r}")
        if not (isinstance(dim, (int, np.integer)) and dim > 0):
            raise InputError(f"dim must be a positive integer, not {dim!r}")
        if not (math.isfinite(threshold) and threshold > 0):
            raise InputError(f"threshold must be a positive number, not {threshold!r}")
        if not (isinstance(max_clusters, (int, np.integer)) and max_clusters >= 1):
            raise InputError(f"max_clusters must be >= 1, not {max_clusters!r}")
        if not 0 < decay <= 1:
            raise InputError(f"decay must be in (0, 1], not {decay!r}")
        if merge_threshold is not None and not (math.isfinite(merge_threshold) and merge_threshold >= 0):
            raise InputError(f"merge_threshold must be >= 0, not {merge_threshold!r}")
        if not (math.isfinite(temperature) and temperature > 0):
            raise InputError(f"temperature must be positive, not {temperature!r}")
        if refine_every < 0:
            raise InputError("refine_every must be >= 0")
        if not (isinstance(memory, (int, np.integer)) and memory >= 2):
            raise InputError(f"memory must be an integer >= 2, not {memory!r}")
        if not (isinstance(min_size, (int, np.integer)) and min_size >= 1):
            raise InputError(f"min_size must be an integer >= 1, not {min_size!r}")
        if max_spread is not None and not (math.isfinite(max_spread) and max_spread >= 0):
            raise InputError(f"max_spread must be >= 0, not {max_spread!r}")
        self.dim = int(dim)
        self.threshold = float(threshold)
        self.distance = distance
        self.max_clusters = int(max_clusters)
        self.decay = float(decay)
        self.merge_threshold = 0.25 * self.threshold if merge_threshold is None else float(merge_threshold)
        self.temperature = float(temperature)
        self.refine_every = int(refine_every)
        self.memory = int(memory)
        self.min_size = int(min_size)
        self.max_spread = MAX_SPREAD * self.threshold if max_spread is None else float(max_spread)
        self.recluster = bool(recluster)
        self.model = dict(model or {})
        self._lock = threading.RLock()
        self._reset(capacity=min(64, self.max_clusters))

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_bundle(cls, bundle, threshold: float | None = None, **params) -> "StreamClusterer":
        """Dimension, distance and temperature from the bundle; the threshold (and the merge
        threshold export chose with it, if any) from its calibration unless given."""
        out = bundle.output_spec
        if threshold is None:
            threshold = threshold_from_calibration(bundle.calibration)
            stored = bundle.calibration.get("cluster_threshold")
            if isinstance(stored, dict) and stored.get("merge_threshold") is not None:
                params.setdefault("merge_threshold", float(stored["merge_threshold"]))
        params.setdefault("temperature", float(out.get("temperature") or 10.0))
        return cls(dim=int(out["dim"]), threshold=float(threshold), distance=out.get("distance", "cosine"),
                   model=model_identity(bundle), **params)

    def get_params(self) -> dict:
        return {"dim": self.dim, "threshold": self.threshold, "distance": self.distance,
                "max_clusters": self.max_clusters, "decay": self.decay,
                "merge_threshold": self.merge_threshold, "temperature": self.temperature,
                "refine_every": self.refine_every, "memory": self.memory, "min_size": self.min_size, "max_spread": self.max_spread,
                "recluster": self.recluster}

    def _reset(self, capacity: int) -> None:
        d = self.dim
        # Weighted sums and counts are both stored divided by _cscale (= decay ** samples seen,
        # renormalised now and then), so decaying every cluster is one scalar multiply, and a
        # sample is learned by adding it, pre-scaled, to one row. prototype = sum / count.
        self._sums = np.zeros((capacity, d), np.float32)
        self._counts = np.zeros(capacity, np.float64)
        # decayed sum of each member's distance to the prototype when it joined, in the same stored
        # scale as the counts: spread / count = the cluster's mean member distance (its width)
        self._spread = np.zeros(capacity, np.float64)
        self._cscale = 1.0
        # What is searched: unit-length prototypes for cosine, the prototypes for sqeuclidean.
        self._search = np.zeros((capacity, d), np.float32)
        self._sqn = np.zeros(capacity, np.float32)
        self._scores = None  # per-batch [N, slots] x.p - |p|^2/2, kept current (see _fit_batch)
        self._xb = None
        self._row = 0
        self._seen = np.zeros(capacity, np.int64)
        self._created = np.zeros(capacity, np.int64)
        self._last = np.zeros(capacity, np.int64)
        self._ids = np.zeros(capacity, np.int64)
        self._labels: list[str | None] = []
        self._slot: dict[int, int] = {}
        self._aliases: dict[int, int] = {}
        self._n = 0
        self._step = 0
        self._next_id = 0
        # "refinements" counts repairs (the name predates them; saved states and metrics use it)
        self._stats = {"created": 0, "evicted": 0, "merged": 0, "split": 0, "dissolved": 0, "refinements": 0,
                       "reclustered": 0}
        # the last `memory` samples (row, cluster id, step), what _repair works on, and how many
        # arrived since the last repair. They are rows _mem_end - _mem_len .. _mem_end - 1 of
        # buffers twice that long: new rows go after them, and when the end is reached the newest
        # are moved to the front, so the memory is always one slice (a view; a ring would be
        # gathered into order for every repair) for about one extra copy of each row.
        self._mem_x = np.zeros((2 * self.memory, d), np.float32)
        self._mem_id = np.zeros(2 * self.memory, np.int64)
        self._mem_step = np.zeros(2 * self.memory, np.int64)
        self._mem_len = self._mem_end = 0
        self._pending = 0
        self._period = self.refine_every  # samples between repairs (see SPARSE_MEMBERS)
        self._kept = self._batch_step = 0  # see _fit_batch
        self._powers, self._powers_of = None, None  # see _decay_powers

    @property
    def n_clusters(self) -> int:
        return self._n

    @property
    def n_found(self) -> int:
        """Clusters that have absorbed at least ``min_size`` samples (or carry a label); the rest are
        candidates: one far sample waiting for a second one near it."""
        n = self._n
        if self.min_size <= 1:
            return n
        mature = self._seen[:n] >= self.min_size
        return int(mature.sum()) + sum(1 for s in np.flatnonzero(~mature) if self._labels[s] is not None)

    @property
    def n_candidates(self) -> int:
        return self._n - self.n_found

    @property
    def n_seen(self) -> int:
        return self._step

    @property
    def stats(self) -> dict:
        return dict(self._stats, clusters=self._n, seen=self._step)

    def spreads(self) -> tuple[np.ndarray, np.ndarray]:
        """(cluster ids, mean distance of the members to their prototype when they joined)."""
        with self._lock:
            n = self._n
            return self._ids[:n].copy(), self._spread[:n] / np.maximum(self._counts[:n], 1e-300)

    # ------------------------------------------------------------------ public API

    def partial_fit(self, X) -> list[Assignment]:
        """Assign each embedding in order and learn from it; returns one Assignment per row."""
        x = self._prepare(X)
        with self._lock:
            out = []
            # a chunk may not decay the scale by more than 1e-10 (see _fit_batch)
            rows = _CHUNK if self.decay == 1.0 else max(1, min(_CHUNK, int(-10 / math.log10(self.decay))))
            for start in range(0, len(x), rows):
                if self.compiled and self._n <= ROWLOOP_MAX_CLUSTERS:
                    # the compiled loop and repair use no BLAS (a re-clustering repair limits the
                    # threads itself): setting and restoring the limit cost a warm one-image call
                    # ~60 us (2-core AVX2 EPYC, OpenBLAS: 46 us a call against 115)
                    out += self._fit_rows(x[start:start + rows])
                else:
                    with one_blas_thread():
                        out += self._fit_batch(x[start:start + rows])
            return out

    @contextmanager
    def atomic(self):
        """Calls inside the block act as one: no other thread's call comes between them, and if
        the block raises, the state is put back as it was before the block (e.g. a batch
        clustered piece by piece whose last piece fails). Costs a copy of the state."""
        with self._lock:
            saved = {k: v.copy() if isinstance(v, (np.ndarray, list, dict)) else v
                     for k, v in vars(self).items() if k != "_lock"}
            try:
                yield self
            except BaseException:
                vars(self).update(saved)
                raise

    def predict(self, X) -> list[Assignment]:
        """Nearest cluster for each embedding; the state is not changed."""
        x = self._prepare(X)
        with self._lock, one_blas_thread():
            n = self._n
            if n == 0:
                return [Assignment(-1, math.inf, 1.0, True, None) for _ in range(len(x))]
            d = self._dist_matrix(x)
            j = d.argmin(1)
            rows = np.arange(len(x))
            dj = d[rows, j]
            if n > 1:
                d[rows, j] = np.inf
                dk = d.min(1)
            else:
                dk = np.full(len(x), np.inf)
            out = []
            for jj, a, b in zip(j.tolist(), dj.tolist(), dk.tolist()):
                new = a > self.threshold
                out.append(Assignment(int(self._ids[jj]), a, self._confidence(a, b, new), new, self._labels[jj]))
            return out

    def learn_examples(self, X, labels) -> dict[str, int]:
        """Few-shot: labelled embeddings become (or update) the prototypes of known classes.
        Returns {label: cluster id}."""
        x = self._prepare(X)
        names = _check_labels(labels, len(x))
        with self._lock:
            result = {}
            for name in dict.fromkeys(names):
                members = x[[i for i, n in enumerate(names) if n == name]]
                mean, count = members.mean(0), float(len(members))
                spread = float(((members - mean) ** 2).sum())  # the examples' own scatter
                slot = self._slot_of_label(name)
                if slot is None:
                    slot = self._open(mean, count, label=name, spread=spread)
                else:
                    self._absorb(slot, mean, count, spread)
                result[name] = int(self._ids[slot])
            return result

    def clusters(self) -> list[ClusterInfo]:
        with self._lock:
            info = [ClusterInfo(int(self._ids[s]), self._labels[s], float(self._counts[s] * self._cscale),
                                int(self._seen[s]),
                                int(self._created[s]), int(self._last[s])) for s in range(self._n)]
        return sorted(info, key=lambda c: c.id)

    def prototypes(self) -> tuple[np.ndarray, np.ndarray]:
        """(cluster ids, prototypes as searched: unit length for cosine)."""
        with self._lock:
            return self._ids[:self._n].copy(), self._search[:self._n].copy()

    def resolve(self, cluster_id: int) -> int:
        """The live cluster an id now belongs to (ids of merged clusters point at the survivor);
        the id itself if it was never merged (it may have been evicted or removed)."""
        if cluster_id not in self._aliases:  # the common case, without the loop guard
            return cluster_id
        seen = set()
        while cluster_id in self._aliases and cluster_id not in seen:
            seen.add(cluster_id)
            cluster_id = self._aliases[cluster_id]
        return cluster_id

    def label(self, cluster_id: int, label: str) -> int:
        """Name a cluster, turning it into a known class. If another cluster already carries the
        label, the two are merged. Returns the id of the labelled cluster."""
        (name,) = _check_labels([label], 1)
        with self._lock:
            slot = self._live_slot(cluster_id)
            other = self._slot_of_label(name)
            self._labels[slot] = name
            if other is not None and other != slot:
                return self._merge_slots(other, slot)
            return int(self._ids[slot])

    def merge(self, ids) -> int:
        """Merge clusters into one (count-weighted mean); returns the surviving id."""
        ids = [int(i) for i in ids]
        if len(ids) < 2:
            raise InputError("merge needs at least two cluster ids")
        with self._lock:
            slots = [self._live_slot(i) for i in ids]
            names = {self._labels[s] for s in slots} - {None}
            if len(names) > 1:
                raise InputError(f"refusing to merge clusters with different labels: {sorted(names)}")
            survivor = int(self._ids[slots[0]])
            for cid in ids[1:]:
                a, b = self._slot[self.resolve(survivor)], self._slot.get(self.resolve(cid))
                if b is not None and a != b:
                    survivor = self._merge_slots(a, b)
            return survivor

    def remove(self, cluster_id: int) -> None:
        with self._lock:
            self._remove_slot(self._live_slot(cluster_id))

    # ------------------------------------------------------------------ persistence

    def refine(self, X, cluster_ids, weights=None) -> dict:
        """The repair (split, reassign, merge; see _repair) over the given samples, each with the id
        of the cluster that learned it and the weight it still has there (default 1: the count it
        added, decayed since), rather than over the memory of recent samples: for a state assembled
        from elsewhere, whose clusters' members it never remembered (a fleet merge, runtime/fleet.py,
        hands it the devices' memories). Samples of clusters that no longer exist are skipped.
        Returns how many clusters the repair split, merged and dissolved."""
        x = self._prepare(X)
        ids = np.asarray(cluster_ids)
        if ids.shape != (len(x),) or not np.issubdtype(ids.dtype, np.integer):
            raise InputError(f"refine needs one integer cluster id per sample, got shape {list(ids.shape)}")
        w = np.ones(len(x)) if weights is None else np.asarray(weights, np.float64)
        if w.shape != (len(x),) or not (np.isfinite(w).all() and (w > 0).all()):
            raise InputError("refine needs one positive finite weight per sample")
        with self._lock, one_blas_thread():
            before = dict(self._stats)
            slots = self._slots_of(ids.astype(np.int64))
            live = slots >= 0
            x, slots, weight = x[live], slots[live], w[live] / self._cscale  # in stored units
            if len(x) >= 2 and self.compiled:
                self._repair_compiled(x, slots, weight, np.ones(len(x), bool))
            elif len(x) >= 2:
                self._split(x, slots, weight, fresh=np.ones(len(x), bool))
                self._reassign(x, slots, weight)
                self._merge_close(_distinct(slots, self._n))
            return {k: self._stats[k] - before[k] for k in ("split", "merged", "dissolved")}

    def state(self) -> tuple[dict, dict]:
        """(arrays, meta) as save() writes them (load() and runtime/fleet.py read them back)."""
        with self._lock:
            n = self._n
            # sums/counts in their stored scale (meta "scale") make a resumed run bit-identical;
            # means and real counts are there for anyone reading the file
            arrays = {"means": self._means(), "counts": self._counts[:n] * self._cscale,
                      "stored_sums": self._sums[:n].copy(), "stored_counts": self._counts[:n].copy(),
                      "stored_spread": self._spread[:n].copy(),
                      "search": self._search[:n].copy(), "sqn": self._sqn[:n].copy(),
                      "seen": self._seen[:n].copy(), "created": self._created[:n].copy(),
                      "last_seen": self._last[:n].copy(), "ids": self._ids[:n].copy(),
                      # the repair memory, so a resumed stream repairs exactly as an unbroken one
                      **dict(zip(("window_x", "window_ids", "window_steps"), self._memory()))}
            meta = {"format": STATE_FORMAT, "params": self.get_params(), "model": self.model,
                    "labels": list(self._labels[:n]), "step": self._step, "next_id": self._next_id,
                    "scale": self._cscale, "pending": self._pending, "period": self._period,
                    "aliases": {str(k): v for k, v in self._aliases.items()}, "stats": dict(self._stats)}
        return arrays, meta

    def save(self, state_dir, keep: int = 3):
        """Write a new state generation (npz + JSON, atomic); returns its JSON path."""
        from .state import save_generation

        arrays, meta = self.state()
        return save_generation(state_dir, arrays, meta, keep=keep)

    @classmethod
    def load(cls, state_dir, **overrides) -> "StreamClusterer":
        """Newest verified generation in ``state_dir`` (older ones if the newest is corrupt).
        ``overrides`` replace saved settings (e.g. a new threshold)."""
        from .state import load_latest

        found = load_latest(state_dir)
        if found is None:
            raise StateError(f"{state_dir}: holds no saved state")
        arrays, meta, gen = found
        try:
            if meta.get("format") not in (1, STATE_FORMAT):
                raise StateError(f"{state_dir}: state format {meta.get('format')!r}, expected {STATE_FORMAT} (or 1)")
            params = dict(meta["params"], **overrides)
            obj = cls(model=meta.get("model"), **params)
            obj._restore(arrays, meta)
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, StateError):
                raise
            raise StateError(f"{state_dir}: generation {gen} does not hold a valid clusterer ({e})") from None
        obj.generation = gen
        return obj

    def _restore(self, arrays: dict, meta: dict) -> None:
        means = np.asarray(arrays["means"], np.float32)
        n = len(means)
        labels = meta["labels"]
        if means.ndim != 2 or means.shape[1] != self.dim or len(labels) != n or n > self.max_clusters:
            raise StateError(f"saved prototypes {list(means.shape)} do not fit dim={self.dim}, "
                             f"max_clusters={self.max_clusters}")
        for k in ("counts", "seen", "created", "last_seen", "ids"):
            if np.shape(arrays[k]) != (n,):
                raise StateError(f"saved array {k!r} has shape {list(np.shape(arrays[k]))}, expected [{n}]")
        if not np.isfinite(means).all() or not np.isfinite(arrays["counts"]).all():
            raise StateError("saved prototypes contain NaN or infinite values")
        self._reset(capacity=max(n, min(64, self.max_clusters)))
        counts = np.asarray(arrays["counts"], np.float64)
        if (counts <= 0).any():
            raise StateError("saved cluster counts must be positive")
        if "stored_sums" in arrays and "scale" in meta:
            if np.shape(arrays["stored_sums"]) != means.shape or np.shape(arrays["stored_counts"]) != (n,):
                raise StateError("saved sums/counts do not match the saved prototypes")
            self._sums[:n] = arrays["stored_sums"]
            self._counts[:n] = arrays["stored_counts"]
            self._cscale = float(meta["scale"])
        else:
            self._counts[:n] = counts
            self._sums[:n] = means * counts[:, None]
        if "stored_spread" in arrays:
            if np.shape(arrays["stored_spread"]) != (n,) or not np.isfinite(arrays["stored_spread"]).all():
                raise StateError("saved spreads do not match the saved prototypes")
            self._spread[:n] = arrays["stored_spread"]
        else:
            # format 1 kept no spread: assume each cluster is as wide as max_spread allows, so an
            # old cluster only merges with a very close one until its new members say otherwise
            self._spread[:n] = self._counts[:n] * self.max_spread
        self._seen[:n] = arrays["seen"]
        self._created[:n] = arrays["created"]
        self._last[:n] = arrays["last_seen"]
        self._ids[:n] = arrays["ids"]
        self._labels = [None if v is None else str(v) for v in labels]
        self._n = n
        for s in range(n):
            self._slot[int(self._ids[s])] = s
        if np.shape(arrays.get("search")) == (n, self.dim) and np.shape(arrays.get("sqn")) == (n,):
            # as searched before saving, bit for bit (recomputing could differ in the last bit)
            self._search[:n] = arrays["search"]
            self._sqn[:n] = arrays["sqn"]
        else:
            self._refresh_rows(np.arange(n))
        if len(self._slot) != n:
            raise StateError("saved cluster ids are not unique")
        self._step = int(meta["step"])
        self._next_id = int(meta["next_id"])
        self._aliases = {int(k): int(v) for k, v in meta.get("aliases", {}).items()}
        self._stats.update({k: int(v) for k, v in meta.get("stats", {}).items() if k in self._stats})
        period = meta.get("period")  # absent before session 9, or meaningless under a new refine_every
        if period in (self.refine_every, SPARSE_PERIOD * self.refine_every):
            self._period = int(period)
        if "window_x" in arrays and self.refine_every:
            wx = np.asarray(arrays["window_x"], np.float32)
            if wx.ndim != 2 or wx.shape[1] != self.dim:
                raise StateError(f"saved repair memory has shape {list(wx.shape)}")
            wi, wt = np.asarray(arrays["window_ids"], np.int64), np.asarray(arrays["window_steps"], np.int64)
            if wi.shape != (len(wx),) or wt.shape != (len(wx),):
                raise StateError("saved memory ids/steps do not match its rows")
            m = min(len(wx), self.memory)
            self._mem_x[:m], self._mem_id[:m], self._mem_step[:m] = wx[-m:], wi[-m:], wt[-m:]
            self._mem_len = self._mem_end = m
            # states before the memory outlived a repair saved only the samples since the last one
            self._pending = min(int(meta.get("pending", m)), m)

    # ------------------------------------------------------------------ internals

    def _prepare(self, X) -> np.ndarray:
        """Validated float32 rows in the device space, always a new array (rows are kept)."""
        if self.distance == "cosine":
            x = validate_embeddings(X, self.dim, check_finite=False)
            if self.compiled:  # the lines below in one pass, the same float32 results
                out = np.empty_like(x)
                status = _rowloop.unit_rows(x, out)
                if status:
                    raise InputError("embeddings contain NaN or infinite values" if status == 1 else
                                     "an all-zero embedding has no direction for cosine distance")
                return out
            # the norms as np.linalg.norm(x, axis=1, keepdims=True) computes them, without its
            # ~10 us of checks; NaN or inf in x shows in their sum (an overflow of finite values
            # too, so the exact check decides)
            sq = np.add.reduce(x * x, axis=1, keepdims=True)
            if not math.isfinite(np.add.reduce(sq, axis=None)) and not np.isfinite(x).all():
                raise InputError("embeddings contain NaN or infinite values")
            norms = np.sqrt(sq)
            if np.minimum.reduce(norms, axis=None) < 1e-12:  # in float32, as (norms < 1e-12).any()
                raise InputError("an all-zero embedding has no direction for cosine distance")
            return x / norms
        x = validate_embeddings(X, self.dim)
        # x is X, or a view of X's memory (an ndarray's rows, a torch tensor, a memoryview): copy
        return x.copy() if x is X or x.base is not None else x

    def _device(self, x: np.ndarray) -> np.ndarray:
        """A mean of prepared rows in the searched space (unit length for cosine)."""
        if self.distance == "cosine":
            return x / max(float(np.linalg.norm(x)), 1e-30)
        return x

    def _means(self) -> np.ndarray:
        n = self._n
        return (self._sums[:n] / self._counts[:n, None]).astype(np.float32)

    def _fit_rows(self, x: np.ndarray) -> list[Assignment]:
        """Predict-then-learn for each row in order, in the compiled loop (runtime/_rowloop.c).

        The loop learns rows until one needs Python: a sample that opens a cluster (which may evict
        or grow the arrays), a winner and runner-up close enough for the merge rules, or the
        repair falling due; Python does that step and calls the loop again from the next row."""
        n_rows = len(x)
        if self._cscale < 1e-10:  # as in _fit_batch
            self._renormalise()
        scales = self._cscale * self._decay_powers(n_rows)
        inv = 1.0 / scales  # the loop adds x * inv to a sum, as _fit_batch's xs
        xx = None if self.distance == "cosine" else (x * x).sum(1, dtype=np.float64)
        out_j = np.empty(n_rows, np.int64)
        out_d = np.empty(n_rows, np.float64)
        out_c = np.empty(n_rows, np.float64)
        tau, merge, t = self.threshold, self.merge_threshold, self.temperature
        root_merge, refine_every = math.sqrt(merge), self._period if self.refine_every else 0
        new_tuple = tuple.__new__  # what Assignment(...) calls, without its Python-level __new__
        labels = self._labels  # a list changed in place, never replaced
        out = []
        self._xb, self._scores = x, None  # no score matrix: nothing for _refresh to patch
        step0 = self._batch_step = self._step
        self._kept = i = 0
        try:
            while True:
                if refine_every and self._pending + i - self._kept >= refine_every:
                    self._remember_rows(out)
                    # the compiled repair uses no BLAS; the re-clustering's distances do
                    with one_blas_thread() if self.recluster else nullcontext():
                        self._repair()
                    refine_every = self._period
                if i == n_rows:
                    break
                end = n_rows if not refine_every else min(n_rows, i + refine_every - (self._pending + i - self._kept))
                # appends to `out` the Assignment of each row it learned
                row, event, k, dk = _rowloop.fit_rows(
                    x, inv, xx, self._search, self._sums, self._counts, self._spread, self._seen, self._last,
                    self._sqn, self._ids, out_j, out_d, out_c, self._n, i, end, step0, tau, merge, root_merge, t,
                    labels, Assignment, out)
                if event == _ROWS_DONE:
                    self._step, self._cscale = step0 + row, scales.item(row - 1)
                    i = row
                    continue
                self._step, self._cscale = step0 + row + 1, scales.item(row)
                if event == _ROW_MAY_MERGE:
                    self._maybe_merge(out_j.item(row), k)
                elif self._n == 0:  # _ROW_OPENS, the first cluster
                    slot = self._open(x[row], 1.0)
                    out.append(new_tuple(Assignment, (self._ids.item(slot), math.inf, 1.0, True, None)))
                else:
                    dj = out_d.item(row)
                    conf = self._confidence(dj, dk, True)
                    slot = self._open(x[row], 1.0)
                    out.append(new_tuple(Assignment, (self._ids.item(slot), dj, conf, True, None)))
                i = row + 1
        finally:
            self._remember_rows(out)
            self._xb = None
            self._row = 0
        return out

    def _fit_batch(self, x: np.ndarray) -> list[Assignment]:
        """Predict-then-learn for each row in order, in numpy (when the compiled loop is missing).

        Instead of one matrix-vector product per sample, the batch's scores against every
        prototype are computed once (a matrix product) and each change to a prototype rewrites
        its column for the rows still to come, so every sample still meets the prototypes exactly as
        they are when it arrives. (The column is one product over all the rows still to come, never
        row by row: BLAS rounds a row's product differently depending on where it sits in the
        call, and the results are kept bit for bit.)"""
        n_rows = len(x)
        if self._cscale < 1e-10:  # with <= 1e-10 more per chunk, stored values stay < 1e20 x real ones
            self._renormalise()
        # the scale each sample is learned at, and the sample pre-scaled for adding to a sum
        scales = self._cscale * self._decay_powers(n_rows)
        inv = 1.0 / scales
        xs = (x * inv[:, None]).astype(np.float32)
        cosine = self.distance == "cosine"
        xx = None if cosine else (x * x).sum(1).tolist()
        inv_list = inv.tolist()
        # The winner moves towards x, so |p_j' - p_k| >= |x - p_k| - |x - p_j| (triangle inequality):
        # when that bound already exceeds the merge distance, the exact check is skipped.
        root_merge = math.sqrt(self.merge_threshold)
        n = self._n
        self._xb = x
        self._row = 0
        self._scores = np.empty((n_rows, n + n_rows), np.float32)
        if n:
            self._rescore(x, n)
        out = []
        append = out.append
        t, tau, merge = self.temperature, self.threshold, self.merge_threshold
        refine_every = self._period if self.refine_every else 0
        exp, sqrt, inf = math.exp, math.sqrt, math.inf
        new_tuple = tuple.__new__  # what Assignment(...) calls, without its Python-level __new__
        scales_list = scales.tolist()
        scores = self._scores
        labels = self._labels  # a list changed in place, never replaced
        # the state arrays, as locals; _open may grow (replace) them, so they are fetched again then
        sums, counts, spread, seen, last, search, sqn, ids = self._arrays()
        # Rows are remembered (for the repair) in bulk: rows _kept..i-1 of this batch are not in
        # the ring yet; their Assignments hold their cluster ids, and row r was learned at step
        # _batch_step + r.
        self._kept, self._batch_step = 0, self._step
        try:
            for i in range(n_rows):
                if refine_every and self._pending + i - self._kept >= refine_every:
                    self._row = i
                    scores = self._repair_in_batch(n_rows, out)
                    sums, counts, spread, seen, last, search, sqn, ids = self._arrays()
                    refine_every = self._period
                self._row = r = i + 1
                step = self._step
                self._step = step + 1
                self._cscale = scales_list[i]
                n = self._n
                if n == 0:
                    slot = self._open(x[i], 1.0)
                    sums, counts, spread, seen, last, search, sqn, ids = self._arrays()
                    append(new_tuple(Assignment, (ids.item(slot), inf, 1.0, True, None)))
                    continue
                row = scores[i, :n]
                # d = |x|^2 - 2 (x.p - |p|^2/2); for cosine the constant -1/2 is dropped: d = 2 - 2 x.p
                j = row.argmax().item()
                dj = (2.0 - 2.0 * row.item(j)) if cosine else (xx[i] - 2.0 * row.item(j))
                if dj < 0.0:
                    dj = 0.0
                if n > 1:
                    row[j] = -inf  # this row is never read again
                    k = row.argmax().item()
                    dk = (2.0 - 2.0 * row.item(k)) if cosine else (xx[i] - 2.0 * row.item(k))
                    if dk < 0.0:
                        dk = 0.0
                else:
                    k, dk = -1, inf
                if dj > tau:
                    conf = self._confidence(dj, dk, True)
                    slot = self._open(x[i], 1.0)
                    sums, counts, spread, seen, last, search, sqn, ids = self._arrays()
                    append(new_tuple(Assignment, (ids.item(slot), dj, conf, True, None)))
                    continue
                conf = 1.0 / (1.0 + (exp(t * (dj - dk)) if k >= 0 else 0.0) + exp(t * (dj - tau)))
                result = new_tuple(Assignment, (ids.item(j), dj, conf, False, labels[j]))
                # learn: add the pre-scaled sample to the winner's sum, then _refresh(j), inlined
                m = sums[j]
                m += xs[i]
                w = inv_list[i]
                counts[j] += w
                spread[j] += w * dj
                seen[j] += 1
                last[j] = step
                p = search[j]
                if cosine:
                    np.multiply(m, 1.0 / sqrt(float(m.dot(m))), out=p)
                else:
                    np.multiply(m, 1.0 / counts[j], out=p)
                    sqn[j] = float(p.dot(p))
                if r < n_rows:
                    col = x[r:].dot(p)  # .dot: the same BLAS call as @, with less overhead
                    if not cosine:
                        col -= 0.5 * sqn[j]
                    scores[r:, j] = col
                if k >= 0 and merge > 0 and sqrt(dk) - sqrt(dj) < root_merge:
                    # the exact prototype distance first (one dot product), the rules only if close
                    pq = float(p.dot(search[k]))
                    if sqn[j] + sqn[k] - 2.0 * pq < merge:
                        self._maybe_merge(j, k)
                append(result)
            if refine_every and self._pending + n_rows - self._kept >= refine_every:
                self._row = n_rows
                self._repair_in_batch(n_rows, out)
        finally:
            self._remember_rows(out)
            self._scores = self._xb = None
            self._row = 0
        return out

    def _arrays(self) -> tuple:
        """The per-slot arrays _fit_batch reads and writes (_grow replaces them)."""
        return (self._sums, self._counts, self._spread, self._seen, self._last, self._search,
                self._sqn, self._ids)

    def _decay_powers(self, n: int) -> np.ndarray:
        """decay ** (1..n) from a table: numpy's power is elementwise, so a slice of the table
        holds the very numbers computing them for each batch would give (checked for every
        length up to _CHUNK), without two array operations per call."""
        table = self._powers
        if table is None or len(table) < n or self._powers_of != self.decay:
            table = self._powers = self.decay ** np.arange(1, max(n, _CHUNK) + 1, dtype=np.float64)
            self._powers_of = self.decay
        return table[:n]

    def _remember_rows(self, out: list[Assignment]) -> None:
        """Write the batch's rows learned since the last call (one per Assignment in ``out``
        after row _kept) into the ring memory, in one go rather than one row at a time."""
        a, b = self._kept, len(out)
        self._kept = b
        if not self.refine_every or b <= a:
            return
        self._pending += b - a
        mem = self.memory
        a = max(a, b - mem)  # only the newest `memory` rows stay
        k, end = b - a, self._mem_end
        if end + k > 2 * mem:  # the buffers are full: the rows that stay move to the front
            keep = min(self._mem_len, mem - k)
            for buf in (self._mem_x, self._mem_id, self._mem_step):
                buf[:keep] = buf[end - keep:end]
            end = self._mem_len = keep
        self._mem_x[end:end + k] = self._xb[a:b]
        self._mem_id[end:end + k] = list(map(itemgetter(0), out[a:b]))  # .cluster_id
        self._mem_step[end:end + k] = np.arange(self._batch_step + a, self._batch_step + b)
        self._mem_end = end + k
        self._mem_len = min(self._mem_len + k, mem)

    def _repair_in_batch(self, n_rows: int, out: list[Assignment]) -> np.ndarray:
        """_repair between two rows of a batch: clusters were split, merged and moved, so the
        rows still to come are scored afresh (with room for the clusters they may open)."""
        self._remember_rows(out)
        scores, self._scores = self._scores, None  # rescored below: nothing to patch meanwhile
        try:
            self._repair()
        finally:
            self._scores = scores
        n, r = self._n, self._row
        if r < n_rows:
            if scores.shape[1] < n + n_rows - r:
                self._scores = np.empty((n_rows, n + n_rows - r), np.float32)
            self._rescore(self._xb, n)
        return self._scores

    def _rescore(self, x: np.ndarray, n: int) -> None:
        r = self._row
        scores = x[r:] @ self._search[:n].T
        if self.distance != "cosine":
            scores -= 0.5 * self._sqn[:n]
        self._scores[r:, :n] = scores

    def _renormalise(self) -> None:
        n = self._n
        self._sums[:n] *= self._cscale
        self._counts[:n] *= self._cscale
        self._spread[:n] *= self._cscale
        self._cscale = 1.0

    def _confidence(self, d1: float, d2: float, new: bool) -> float:
        """Softmax over {nearest, runner-up, "new cluster" at the threshold}, written so that every
        exponent is <= 0 (no overflow): d1 <= d2 always, and d1 <= threshold unless new."""
        t, tau = self.temperature, self.threshold
        if new:
            return 1.0 / (1.0 + math.exp(t * (tau - d1)) + (math.exp(t * (tau - d2)) if d2 < math.inf else 0.0))
        return 1.0 / (1.0 + (math.exp(t * (d1 - d2)) if d2 < math.inf else 0.0) + math.exp(t * (d1 - tau)))

    def _dist_matrix(self, x: np.ndarray) -> np.ndarray:
        n = self._n
        d = (x * x).sum(1)[:, None] - 2.0 * (x @ self._search[:n].T) + self._sqn[:n][None]
        return np.maximum(d, 0.0)

    def _ring(self) -> slice:
        """Where the remembered samples are in the memory buffers, oldest first."""
        return slice(self._mem_end - self._mem_len, self._mem_end)

    def _memory(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The remembered samples, oldest first: (rows, cluster ids, steps), copies."""
        ring = self._ring()
        return self._mem_x[ring].copy(), self._mem_id[ring].copy(), self._mem_step[ring].copy()

    def _refresh(self, s: int) -> None:
        """Recompute what is searched for slot s after its sum or count changed."""
        m = self._sums[s]
        if self.distance == "cosine":  # the mean's direction is the sum's direction
            np.multiply(m, 1.0 / max(math.sqrt(float(m.dot(m))), 1e-30), out=self._search[s])
            self._sqn[s] = 1.0
        else:
            np.multiply(m, 1.0 / self._counts[s], out=self._search[s])
            self._sqn[s] = float(self._search[s].dot(self._search[s]))
        if self._scores is not None:  # rows already processed never look again
            r = self._row
            col = self._xb[r:].dot(self._search[s])
            if self.distance != "cosine":
                col -= 0.5 * self._sqn[s]
            self._scores[r:, s] = col

    def _absorb(self, s: int, x: np.ndarray, weight: float, spread: float = 0.0) -> None:
        p, q = self._search[s], self._device(x)
        d = float(np.dot(p - q, p - q))  # the examples' mean against the prototype they join
        self._sums[s] += x * (weight / self._cscale)
        self._counts[s] += weight / self._cscale
        self._spread[s] += (spread + weight * d) / self._cscale
        self._seen[s] += int(round(weight))
        self._last[s] = max(self._step - 1, 0)
        self._refresh(s)

    def _grow(self) -> None:
        cap = min(2 * len(self._sums), self.max_clusters)
        for name in ("_sums", "_search", "_sqn", "_counts", "_spread", "_seen", "_created", "_last", "_ids"):
            old = getattr(self, name)
            new = np.zeros((cap,) + old.shape[1:], old.dtype)
            new[:self._n] = old[:self._n]
            setattr(self, name, new)

    def _open(self, x: np.ndarray, count: float, label: str | None = None, spread: float = 0.0) -> int:
        if self._n >= self.max_clusters:
            self._evict()
        if self._n >= len(self._sums):
            self._grow()
        s = self._n
        self._n += 1
        cid = self._next_id
        self._next_id += 1
        self._sums[s] = x * (count / self._cscale)
        self._counts[s] = count / self._cscale
        self._spread[s] = spread / self._cscale
        self._seen[s] = int(round(count))
        self._created[s] = self._last[s] = max(self._step - 1, 0)
        self._ids[s] = cid
        self._labels.append(label)
        self._slot[cid] = s
        self._refresh(s)
        self._stats["created"] += 1
        return s

    def _evict(self) -> None:
        n = self._n
        counts = self._counts[:n]
        s = int(counts.argmin())
        if self._labels[s] is not None:
            # Known classes are kept as long as there is an unlabelled cluster to give up instead.
            pool = [i for i, lab in enumerate(self._labels[:n]) if lab is None]
            if pool:
                s = pool[int(counts[pool].argmin())]
        self._remove_slot(s)
        self._stats["evicted"] += 1

    def _remove_slot(self, s: int) -> None:
        last = self._n - 1
        del self._slot[int(self._ids[s])]
        if s != last:  # keep active slots contiguous: move the last one into the hole
            for arr in (self._sums, self._search, self._sqn, self._counts, self._spread, self._seen,
                        self._created, self._last, self._ids):
                arr[s] = arr[last]
            if self._scores is not None:
                self._scores[:, s] = self._scores[:, last]
            self._labels[s] = self._labels[last]
            self._slot[int(self._ids[s])] = s
        self._labels.pop()
        self._n = last

    def _maybe_merge(self, j: int, k: int) -> None:
        """Merge winner j with runner-up k when their prototypes are within merge_threshold, both
        are established clusters (min_size samples, or labelled) and the merged cluster would be no
        wider than max_spread. The last condition is what stops chains: merging two clusters whose
        members lie apart widens the result, so a cluster that grew by merging its neighbours
        cannot go on to swallow theirs."""
        lj, lk = self._labels[j], self._labels[k]
        if lj is not None and lk is not None and lj != lk:
            return
        m = self.min_size
        if (lj is None and self._seen[j] < m) or (lk is None and self._seen[k] < m):
            return
        dist = float(self._sqn[j] + self._sqn[k] - 2.0 * np.dot(self._search[j], self._search[k]))
        if dist >= self.merge_threshold or self._merged_spread(j, k, dist) > self.max_spread:
            return
        self._merge_slots(j, k)

    def _merged_spread(self, a: int, b: int, dist: float) -> float:
        """Mean member distance of a and b merged: each side's own spread plus the shift of its
        prototype to the merged one (exact for squared Euclidean means; close for cosine)."""
        ca, cb = self._counts[a], self._counts[b]
        return float((self._spread[a] + self._spread[b] + ca * cb / (ca + cb) * dist) / (ca + cb))

    def _merge_slots(self, a: int, b: int) -> int:
        """Merge slots a and b; the labelled (else the heavier) one keeps its id. Returns it."""
        la, lb = self._labels[a], self._labels[b]
        keep_a = (la is not None) if (la is None) != (lb is None) else self._counts[a] >= self._counts[b]
        s, o = (a, b) if keep_a else (b, a)
        dist = float(self._sqn[s] + self._sqn[o] - 2.0 * np.dot(self._search[s], self._search[o]))
        self._spread[s] = self._merged_spread(s, o, max(dist, 0.0)) * (self._counts[s] + self._counts[o])
        self._sums[s] += self._sums[o]  # same scale: the merged prototype is the count-weighted mean
        self._counts[s] += self._counts[o]
        self._seen[s] += self._seen[o]
        self._created[s] = min(self._created[s], self._created[o])
        self._last[s] = max(self._last[s], self._last[o])
        if self._labels[s] is None:
            self._labels[s] = self._labels[o]
        self._refresh(s)
        keep_id, gone_id = int(self._ids[s]), int(self._ids[o])
        self._aliases[gone_id] = keep_id
        self._remove_slot(o)
        self._stats["merged"] += 1
        return keep_id

    def _repair(self) -> None:
        """Every ``refine_every`` samples, over the memory of recent samples: split clusters whose
        members form two separate groups, move each remembered sample to its nearest prototype
        (one hard k-means step), and merge clusters that a Ward criterion says belong together.

        Online decisions are made from one or two drawings per cluster, and a wrong early join
        leaves a cluster holding two classes for good: this is what undoes it. Costs
        O(memory x touched clusters x dim), whatever the number of clusters."""
        pending, self._pending = self._pending, 0
        ring = self._ring()
        slots = self._slots_of(self._mem_id[ring])
        if (slots < 0).any():  # samples of evicted or removed clusters are forgotten
            keep = slots >= 0
            slots = slots[keep]
            m = len(slots)
            self._mem_x[:m], self._mem_step[:m] = self._mem_x[ring][keep], self._mem_step[ring][keep]
            self._mem_len = self._mem_end = m
            ring = self._ring()
        if self._mem_len < 2:
            return
        x = self._mem_x[ring]  # views: the repair writes only the ids
        steps = self._mem_step[ring]
        # each sample was learned with weight 1, decayed since; in stored units that is 1 / its scale
        weight = self.decay ** (self._step - 1 - steps.astype(np.float64)) / self._cscale
        fresh = steps >= self._step - pending
        if self.compiled:  # the four steps below in one call (runtime/_rowloop.c)
            n_touched = self._repair_compiled(x, slots, weight, fresh, ring)
        else:
            self._split(x, slots, weight, fresh)
            self._reassign(x, slots, weight)
            self._mem_id[ring] = self._ids[slots]  # merges below leave aliases that resolve these
            touched = _distinct(slots, self._n)
            n_touched = len(touched)
        sparse = self._mem_len == self.memory and self._mem_len < SPARSE_MEMBERS * n_touched
        self._period = self.refine_every * (SPARSE_PERIOD if sparse else 1)
        if not self.compiled:
            self._merge_close(touched)
        if self.recluster:
            slots = self._slots_of(self._mem_id[ring])  # after the merges
            labels = self._labels
            free = np.flatnonzero([s >= 0 and labels[s] is None for s in slots.tolist()])
            part = slots[free]
            self._recluster(x[free], part, weight[free])
            self._mem_id[ring.start + free] = self._ids[part]  # the others' ids are unchanged
        self._stats["refinements"] += 1

    def _repair_compiled(self, x: np.ndarray, slots: np.ndarray, weight: np.ndarray, fresh: np.ndarray,
                         ring: slice | None = None) -> int:
        """_split, _reassign and _merge_close, as _rowloop.repair does them on the slot arrays (and
        the new ids of the memory's ``ring`` rows, if given); then _replay does their part in
        the names, ids and aliases. Returns the number of slots the rows touched before the merges
        (what the sparse-memory period counts)."""
        m = len(x)
        room = min(self._n + m // 2, self.max_clusters)  # a split opens one cluster per two rows at most
        while len(self._sums) < room:
            self._grow()
        labels = self._labels
        codes = np.full(len(self._sums), -1, np.int64)
        if labels.count(None) < len(labels):  # known classes: one code per name
            names: dict = {}
            codes[:self._n] = [-1 if v is None else names.setdefault(v, len(names)) for v in labels]
        ops = np.empty((5 * m + 8, 5), np.int64)
        mem_ids = np.empty(m, np.int64)
        n, self._next_id, n_ops, touched = _rowloop.repair(
            x, slots, weight, fresh, mem_ids, self._sums, self._search, self._sqn, self._counts, self._spread,
            self._seen, self._created, self._last, self._ids, codes, ops, self._n, self.max_clusters,
            max(self._step - 1, 0), self._next_id, self._cscale, self.threshold, SPLIT_DISTANCE, SPLIT_MIN,
            self.merge_threshold, MERGE_CAP, MERGE_COST, self.min_size, self.distance == "cosine")
        self._replay(ops[:n_ops].tolist())  # brings self._n to n
        if ring is not None:
            self._mem_id[ring] = mem_ids
        return touched

    def _replay(self, ops: list) -> None:
        """Apply _rowloop.repair's log (see there) to what lives in Python: names, the id -> slot
        dict, aliases and counters, as _open, _remove_slot, _merge_slots and _move_members do."""
        labels, slot_of, stats = self._labels, self._slot, self._stats
        for kind, a, b, c, e in ops:
            if kind == _OP_OPEN:  # slot a, id b
                labels.append(None)
                slot_of[b] = a
                self._n += 1
                stats["created"] += 1
                stats["split"] += 1
            elif kind == _OP_REMOVE:  # slot a, last slot b, their ids c and e
                del slot_of[c]
                if a != b:
                    labels[a] = labels[b]
                    slot_of[e] = a
                labels.pop()
                self._n -= 1
            elif kind == _OP_DISSOLVE:  # id a, heir b
                if b >= 0:
                    self._aliases[a] = b
                stats["dissolved"] += 1
            else:  # _OP_MERGE: kept slot a, gone slot b, their ids c and e
                if labels[a] is None:
                    labels[a] = labels[b]
                self._aliases[e] = c
                stats["merged"] += 1

    def _recluster(self, x: np.ndarray, slots: np.ndarray, weight: np.ndarray) -> None:
        """Replace the memory's partition by a Ward cut with a better silhouette, if one has it
        (runtime/recluster.py): each new group takes the id of the cluster it shares most samples
        with (one-to-one, Hungarian), the others open clusters; samples move as in _reassign.
        _repair leaves members of labelled clusters out: a known class is not the silhouette's to
        redraw (with them in, benchmark (c), one-shot classes then the stream, lost 3 points)."""
        from scipy.optimize import linear_sum_assignment

        from .recluster import better_partition

        current, cur = np.unique(slots, return_inverse=True)
        cur = cur.ravel()  # the memory's partition as labels 0..K-1
        if len(current) < 2 or len(x) < RECLUSTER_MIN_MEMBERS * len(current):
            return
        groups = better_partition(x, cur, RECLUSTER_SPAN, RECLUSTER_MARGIN)
        if groups is None:
            return
        shared = np.zeros((int(groups.max()) + 1, len(current)))
        np.add.at(shared, (groups, cur), 1.0)
        rows, cols = linear_sum_assignment(shared, maximize=True)
        target = np.full(len(shared), -1, np.int64)
        target[rows] = np.where(shared[rows, cols] > 0, current[cols], -1)
        new = np.flatnonzero(target < 0)
        if self._n + len(new) > self.max_clusters:
            return  # opening them would evict clusters the memory may still point at
        for g in new.tolist():
            members = np.flatnonzero(groups == g)
            s = self._open(x[members[0]], 1.0)
            self._sums[s] = 0.0  # emptied again: the move below brings its members
            self._counts[s] = self._spread[s] = 0.0
            self._seen[s] = 0
            target[g] = s
        best = target[groups]
        self._move_members(x, slots, best, weight, _distinct(np.concatenate([slots, best]), self._n))
        self._stats["reclustered"] += 1

    def _slots_of(self, ids: np.ndarray) -> np.ndarray:
        """The live slot of each cluster id in ``ids`` (-1 for evicted or removed clusters), merged
        ids resolved to their survivor. Compiled: live ids from a hash table in C, the few others
        through the aliases. Numpy: each distinct id looked up once in the dict; the distinct ids
        come from a sort, not np.unique (which took ~40 us on the 256 remembered ids, 5x a sort)."""
        if not len(ids):
            return np.zeros(0, np.int64)
        if self.compiled:  # live ids by a hash table in C; the others (merged, gone) below
            slots = np.empty(len(ids), np.int64)
            if _rowloop.find_ids(ids, self._ids, self._n, slots):
                get, resolve = self._slot.get, self.resolve
                for i in np.unique(ids[slots < 0]).tolist():
                    slots[ids == i] = get(resolve(i), -1)
            return slots
        ordered = np.sort(ids)
        first = np.empty(len(ordered), bool)
        first[0] = True
        np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
        distinct = ordered[first]
        get, aliases, resolve = self._slot.get, self._aliases, self.resolve
        # resolve(i) is i for an id that was never merged: the call is skipped for those
        found = [get(i, -1) if i not in aliases else get(resolve(i), -1) for i in distinct.tolist()]
        return np.array(found, np.int64)[np.searchsorted(distinct, ids)]

    def _split(self, x: np.ndarray, slots: np.ndarray, weight: np.ndarray, fresh: np.ndarray) -> None:
        """Carve the smaller half out of each cluster whose remembered members 2-means splits into
        halves whose means lie more than SPLIT_DISTANCE thresholds apart (each half with at least
        two members). Only clusters with SPLIT_MIN remembered members, at least two of them
        ``fresh`` (arrived since the last repair), are tested: the others were tested before with
        (nearly) the same members. Updates ``slots`` for the members that moved."""
        n = self._n
        counts = np.bincount(slots, minlength=n)
        big = (counts >= SPLIT_MIN) & (np.bincount(slots[fresh], minlength=n) >= 2)
        tested = np.flatnonzero(big)
        if not len(tested):
            return
        # the members of the tested clusters, cluster after cluster (ascending slots), each
        # cluster's in memory order: one selection from a stable sort, not a list of pieces
        order = np.argsort(slots, kind="stable")
        rows = order[big[slots[order]]]
        sizes = counts[tested]
        far, gap = _two_means(x[rows], sizes)
        ends = np.cumsum(sizes).tolist()
        for g in np.flatnonzero(gap > SPLIT_DISTANCE * self.threshold).tolist():
            members, f = rows[ends[g] - sizes[g]:ends[g]], far[ends[g] - sizes[g]:ends[g]]
            small = members[f] if 2 * f.sum() <= len(f) else members[~f]
            if len(small) < 2:
                continue
            if self._n >= self.max_clusters:
                return  # opening a cluster now would evict one the memory may still point at
            new = self._open(x[small[0]], 1.0)
            self._sums[new] = 0.0  # emptied again: the move below brings its members
            self._counts[new] = self._spread[new] = 0.0
            self._seen[new] = 0
            self._move(x[small], slots[small], np.full(len(small), new), weight[small])
            slots[small] = new
            self._stats["split"] += 1

    def _reassign(self, x: np.ndarray, slots: np.ndarray, weight: np.ndarray) -> None:
        """One hard k-means step among the clusters the memory touches: each remembered sample
        moves to its nearest prototype. Clusters left with no mass (unlabelled) are dissolved."""
        touched = _distinct(slots, self._n)
        if len(touched) < 2:
            return
        # |x|^2 is the same for every prototype, so the nearest one minimises |p|^2 - 2 x.p
        d = x @ self._search[touched].T
        d *= -2.0
        d += self._sqn[touched]
        best = touched[d.argmin(1)]
        self._move_members(x, slots, best, weight, touched)

    def _move_members(self, x: np.ndarray, slots: np.ndarray, best: np.ndarray, weight: np.ndarray,
                      touched: np.ndarray) -> None:
        """Move each remembered sample from ``slots`` to ``best`` (updating ``slots``). A cluster
        of ``touched`` all of whose mass moved away is dissolved (unlabelled; its id then resolves
        to the cluster that took most of its remembered samples) or keeps its prototype (known)."""
        slots_before = slots.copy()
        moved = np.flatnonzero(best != slots)
        kept = self._search[touched], self._sqn[touched]  # copies (fancy indexing)
        if len(moved):
            self._move(x[moved], slots[moved], best[moved], weight[moved])
            slots[moved] = best[moved]
        drained = self._counts[touched] * self._cscale <= 1e-6
        # a known class left without mass keeps its prototype (its sum is rounding residue now)
        known = [q for q in np.flatnonzero(drained).tolist() if self._labels[touched[q]] is not None]
        self._search[touched[known]], self._sqn[touched[known]] = kept[0][known], kept[1][known]
        drained = touched[drained].tolist()
        empty = [t for t in drained if self._labels[t] is None]
        heirs = {}
        for t in empty:
            went = best[slots_before == t]  # all moved: t kept none of them
            if len(went):
                heirs[int(self._ids[t])] = int(self._ids[int(np.bincount(went).argmax())])
        for t in sorted(empty, reverse=True):  # descending: a swap never moves a slot still to go
            last = self._n - 1
            gone = int(self._ids[t])
            self._remove_slot(t)
            slots[slots == last] = t
            if gone in heirs and heirs[gone] in self._slot:
                self._aliases[gone] = heirs[gone]
            self._stats["dissolved"] += 1

    def _merge_close(self, touched: np.ndarray) -> None:
        """Merge pairs of established clusters the memory touches, cheapest first, while Ward's
        merge cost c_a c_b / (c_a + c_b) x |p_a - p_b|^2 stays below MERGE_COST thresholds for
        prototypes closer than MERGE_CAP thresholds. The cost grows with the counts, so this joins
        the fragments a class left behind early, never two grown clusters; the cap (below
        SPLIT_DISTANCE) keeps it from undoing a split."""
        if self.merge_threshold <= 0:  # merging is off
            return
        labels = self._labels
        touched = touched[touched < self._n]
        established = self._seen[touched] >= self.min_size
        for i in np.flatnonzero(~established).tolist():  # a label establishes a cluster too
            established[i] = labels[touched[i]] is not None
        slots = touched[established]
        ids = self._ids[slots].tolist()
        while len(ids) >= 2:
            pair = self._closest_pair(slots)
            if pair is None:
                return
            i, j = pair
            keep = self._merge_slots(int(slots[i]), int(slots[j]))
            ids = [v for v in ids if v not in (ids[i], ids[j])] + [keep]
            slots = np.array([self._slot[i] for i in ids])

    def _closest_pair(self, slots: np.ndarray) -> tuple[int, int] | None:
        """The positions in ``slots`` of the pair with the lowest Ward merge cost among prototypes
        closer than MERGE_CAP thresholds, if that cost is below MERGE_COST thresholds; else None."""
        tau = self.threshold
        labels = self._labels
        p, sq, c = self._search[slots], self._sqn[slots], self._counts[slots] * self._cscale
        g = p @ p.T
        # The few pairs close enough, in row-major order. |p_a - p_b|^2 < cap means
        # p_a.p_b > (|p_a|^2 + |p_b|^2 - cap) / 2: a test on the Gram matrix finds the
        # candidates (with a margin for rounding), the distance formula then decides for those
        # few, so the pairs are exactly the ones the full distance matrix would give.
        cap = MERGE_CAP * tau
        if self.distance == "cosine":  # unit prototypes: |p|^2 = 1
            near = g > 1.0 - 0.5 * cap - 1e-4
        else:
            near = g > 0.5 * (sq[:, None] + sq[None] - cap) - 1e-4 * (1.0 + np.abs(g))
        near.flat[::len(near) + 1] = False  # np.fill_diagonal, without its checks
        a, b = np.nonzero(near)
        d = np.maximum(sq[a] + sq[b] - 2.0 * g[a, b], 0.0)
        close = d < cap
        if not close.all():
            a, b, d = a[close], b[close], d[close]
        if not len(a):
            return None
        cost = c[a] * c[b] / (c[a] + c[b]) * d
        if len(labels) - labels.count(None) > 1:  # known classes with different names never merge
            for k in np.flatnonzero(np.isfinite(cost)).tolist():
                u, v = labels[slots[a[k]]], labels[slots[b[k]]]
                if u is not None and v is not None and u != v:
                    cost[k] = np.inf
        k = int(cost.argmin())
        if not cost[k] < MERGE_COST * tau:
            return None
        return int(a[k]), int(b[k])

    def _move(self, x: np.ndarray, src: np.ndarray, dst: np.ndarray, weight: np.ndarray) -> None:
        """Move remembered samples' contributions (weight, in stored units) between clusters."""
        if self.compiled:
            _rowloop.move(x, src, dst, weight, self._sums, self._counts, self._spread, self._seen, self._search,
                          self._sqn, self._n, self.distance == "cosine")
            return
        wx = (x * weight[:, None]).astype(np.float32)
        both = np.concatenate([src, dst])  # every subtraction first, then every addition, as
        # separate subtract.at / add.at calls would do them (a - w == a + (-w) exactly)
        np.add.at(self._sums, both, np.concatenate([-wx, wx]))
        np.add.at(self._counts, both, np.concatenate([-weight, weight]))
        np.add.at(self._seen, both, np.repeat(np.array([-1, 1]), len(src)))
        old = self._search[src]  # a copy (fancy indexing), taken before the prototypes move
        changed = _distinct(both, self._n)
        self._refresh_rows(changed)
        # widths: a sample's distance to its old prototype leaves with it, to its new one arrives
        new = self._search[dst]
        np.add.at(self._spread, both, np.concatenate([-(weight * ((x - old) ** 2).sum(1)),
                                                     weight * ((x - new) ** 2).sum(1)]))
        # rounding may leave a drained cluster slightly below zero (no other row changed)
        self._spread[changed] = np.maximum(self._spread[changed], 0.0)
        self._seen[changed] = np.maximum(self._seen[changed], 0)

    def _refresh_rows(self, idx: np.ndarray) -> None:
        """_refresh for many slots at once (without touching a batch's scores)."""
        sums = self._sums[idx]
        if self.distance == "cosine":
            # np.linalg.norm(sums, axis=1) computes exactly this, with ~5 us of checks around it
            self._search[idx] = sums / np.maximum(np.sqrt(np.add.reduce(sums * sums, axis=1)), 1e-30)[:, None]
            self._sqn[idx] = 1.0
        else:
            with np.errstate(divide="ignore", invalid="ignore"):  # a drained slot: _move_members decides
                means = sums / self._counts[idx][:, None]
            self._search[idx] = means
            self._sqn[idx] = (means * means).sum(1)

    def _slot_of_label(self, name: str) -> int | None:
        for s, lab in enumerate(self._labels[:self._n]):
            if lab == name:
                return s
        return None

    def _live_slot(self, cluster_id) -> int:
        try:
            cid = int(cluster_id)
        except (TypeError, ValueError):
            raise InputError(f"cluster id must be an integer, not {cluster_id!r}") from None
        slot = self._slot.get(self.resolve(cid))
        if slot is None:
            raise InputError(f"no cluster with id {cid} (it may have been evicted or removed)")
        return slot


def _two_means(X: np.ndarray, sizes: np.ndarray, iters: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """2-means inside each group of consecutive rows of X (``sizes`` rows each), all groups at
    once (sums by np.add.reduceat). Each starts from the member farthest from the group mean and
    the member farthest from that one, so the result is deterministic. Returns a boolean mask over
    the rows (the second half of each group) and per group the squared distance between the
    halves' means (0 if a half is empty)."""
    starts = np.cumsum(sizes) - sizes
    group = np.repeat(np.arange(len(sizes)), sizes)
    n = sizes.astype(X.dtype)[:, None]
    total = np.add.reduceat(X, starts)

    def farthest(c):  # per group, the (first) member farthest from c[group]
        d = ((X - c[group]) ** 2).sum(1)
        hits = np.flatnonzero(d == np.maximum.reduceat(d, starts)[group])
        return X[hits[np.searchsorted(hits, starts)]]

    a = farthest(total / n)
    b = farthest(a)
    mask = None
    for _ in range(iters):
        w = b - a
        new = (X * w[group]).sum(1) > 0.5 * ((b * b).sum(1) - (a * a).sum(1))[group]
        if mask is not None and (new == mask).all():
            break
        mask = new
        nb = np.add.reduceat(mask.astype(X.dtype), starts)[:, None]
        sb = np.add.reduceat(X * mask[:, None], starts)
        a = (total - sb) / np.maximum(n - nb, 1)
        b = sb / np.maximum(nb, 1)
    nb = np.add.reduceat(mask.astype(np.int64), starts)
    gap = np.where((nb > 0) & (nb < sizes), ((a - b) ** 2).sum(1), 0.0)
    return mask, gap


def _distinct(slots: np.ndarray, n: int) -> np.ndarray:
    """np.unique for slot numbers below n, by counting instead of sorting."""
    return np.flatnonzero(np.bincount(slots, minlength=n))


def _check_labels(labels, n: int) -> list[str]:
    if isinstance(labels, (str, bytes)):
        labels = [labels]
    names = [str(v) if isinstance(v, (int, np.integer)) else v for v in list(labels)]
    if len(names) != n:
        raise InputError(f"{len(names)} labels for {n} examples")
    for v in names:
        if not isinstance(v, str) or not v.strip():
            raise InputError(f"labels must be non-empty strings (or integers), got {v!r}")
    return names


def model_identity(bundle) -> dict:
    """What a saved state must match to be reused with a bundle."""
    out, manifest = bundle.output_spec, bundle.manifest
    model = manifest.get("model", {})
    fp32 = manifest.get("variants", {}).get("fp32", {}).get("file")
    weights = manifest.get("files", {}).get(fp32, {}).get("sha256") if fp32 else None
    return {"name": model.get("name"), "version": model.get("version"), "weights_sha256": weights,
            "dim": int(out["dim"]), "distance": out.get("distance", "cosine")}
