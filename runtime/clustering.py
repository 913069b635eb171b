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
* every ``refine_every`` samples, one soft k-means step (Ren et al. 2018) re-weighs that window's
  contributions to the prototypes; clusters whose mass moves away entirely are dissolved. Its
  votes are never softer than REFINE_SHARPNESS logits per threshold of distance (see
  ``_refine_temperature``).

Distances follow the bundle: ``cosine`` = squared Euclidean between L2-normalised vectors
(2 - 2 cos), ``sqeuclidean`` = squared Euclidean on raw embeddings. Prototypes live in a
preallocated matrix that doubles when full, with their squared norms cached; a batch is scored
with one matrix product whose columns are patched as prototypes move (brute force beats ANN
indexes below ~10k prototypes).
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .errors import InputError, StateError
from .validation import validate_embeddings

STATE_FORMAT = 2  # 2 added the per-cluster spread; format-1 states still load (see _restore)
_CHUNK = 64  # samples per score matrix in partial_fit (measured best of 32-256; bounds its memory)
MAX_SPREAD = 0.5  # default max_spread = this x threshold (see StreamClusterer)
REFINE_SHARPNESS = 10.0  # see _refine_temperature


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
      0 disables; bundles whose export found broad classes store their own, see from_bundle).
    temperature: logit scale for confidences and refinement (the bundle's trained value).
    refine_every: run one soft k-means step over each window of this many samples (0 = off; 100
      was best of 0/20/50/100 on Protocol-A train streams).
    min_size: samples a cluster needs before it counts as found and may merge (2: a far sample
      waits for a second one near it; 1: every cluster counts at once).
    max_spread: a merge is refused if the merged cluster's mean member distance would exceed this
      (default MAX_SPREAD * threshold; on MNIST-train streams it kept 4/9-style merges out: 92.5%
      ACC against 85.6% without it).
    """

    def __init__(self, dim: int, threshold: float, distance: str = "cosine", max_clusters: int = 1000,
                 decay: float = 0.999, merge_threshold: float | None = None, temperature: float = 10.0,
                 refine_every: int = 100, min_size: int = 2, max_spread: float | None = None,
                 model: dict | None = None):
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
        self.min_size = int(min_size)
        self.max_spread = MAX_SPREAD * self.threshold if max_spread is None else float(max_spread)
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
                "refine_every": self.refine_every, "min_size": self.min_size, "max_spread": self.max_spread}

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
        self._stats = {"created": 0, "evicted": 0, "merged": 0, "dissolved": 0, "refinements": 0}
        self._window: list[tuple[np.ndarray, int, int]] = []  # (x, cluster id, step) for refinement

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
                out += self._fit_batch(x[start:start + rows])
            return out

    def predict(self, X) -> list[Assignment]:
        """Nearest cluster for each embedding; the state is not changed."""
        x = self._prepare(X)
        with self._lock:
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

    def save(self, state_dir, keep: int = 3):
        """Write a new state generation (npz + JSON, atomic); returns its JSON path."""
        from .state import save_generation

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
                      # the refinement window, so a resumed stream refines exactly as an unbroken one
                      "window_x": np.array([w[0] for w in self._window], np.float32).reshape(-1, self.dim),
                      "window_ids": np.array([w[1] for w in self._window], np.int64),
                      "window_steps": np.array([w[2] for w in self._window], np.int64)}
            meta = {"format": STATE_FORMAT, "params": self.get_params(), "model": self.model,
                    "labels": list(self._labels[:n]), "step": self._step, "next_id": self._next_id,
                    "scale": self._cscale,
                    "aliases": {str(k): v for k, v in self._aliases.items()}, "stats": self._stats}
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
        if "window_x" in arrays and self.refine_every:
            wx = np.asarray(arrays["window_x"], np.float32)
            if wx.ndim != 2 or wx.shape[1] != self.dim:
                raise StateError(f"saved refinement window has shape {list(wx.shape)}")
            self._window = [(v, int(i), int(t)) for v, i, t in zip(wx, arrays["window_ids"], arrays["window_steps"])]

    # ------------------------------------------------------------------ internals

    def _prepare(self, X) -> np.ndarray:
        """Validated float32 rows in the device space, always a new array (rows are kept)."""
        x = validate_embeddings(X, self.dim)
        if self.distance == "cosine":
            norms = np.linalg.norm(x, axis=1, keepdims=True)
            if (norms < 1e-12).any():
                raise InputError("an all-zero embedding has no direction for cosine distance")
            return x / norms
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

    def _fit_batch(self, x: np.ndarray) -> list[Assignment]:
        """Predict-then-learn for each row in order.

        Instead of one matrix-vector product per sample, the batch's scores against every
        prototype are computed once (a matrix product) and each change to a prototype rewrites
        its column for the rows still to come, so every sample still meets the prototypes exactly as
        they are when it arrives."""
        n_rows = len(x)
        decay = self.decay
        if self._cscale < 1e-10:  # with <= 1e-10 more per chunk, stored values stay < 1e20 x real ones
            self._renormalise()
        # the scale each sample is learned at, and the sample pre-scaled for adding to a sum
        scales = self._cscale * decay ** np.arange(1, n_rows + 1, dtype=np.float64)
        inv = 1.0 / scales
        xs = (x * inv[:, None]).astype(np.float32)
        xx = (x * x).sum(1).tolist()
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
        cosine = self.distance == "cosine"
        t, tau, merge, refine_every = self.temperature, self.threshold, self.merge_threshold, self.refine_every
        scales_list = scales.tolist()
        scores = self._scores
        inf = math.inf
        try:
            for i in range(n_rows):
                if refine_every and len(self._window) >= refine_every:
                    self._row = i
                    self._refine()
                self._row = i + 1
                step = self._step
                self._step = step + 1
                self._cscale = scales_list[i]
                n = self._n
                if n == 0:
                    slot = self._open(x[i], 1.0)
                    self._remember(x[i], slot, step)
                    out.append(Assignment(int(self._ids[slot]), inf, 1.0, True, None))
                    continue
                row = scores[i, :n]
                # d = |x|^2 - 2 (x.p - |p|^2/2); for cosine the constant -1/2 is dropped: d = 2 - 2 x.p
                j = int(row.argmax())
                dj = (2.0 - 2.0 * float(row[j])) if cosine else (xx[i] - 2.0 * float(row[j]))
                if dj < 0.0:
                    dj = 0.0
                if n > 1:
                    row[j] = -inf  # this row is never read again
                    k = int(row.argmax())
                    dk = (2.0 - 2.0 * float(row[k])) if cosine else (xx[i] - 2.0 * float(row[k]))
                    if dk < 0.0:
                        dk = 0.0
                else:
                    k, dk = -1, inf
                if dj > tau:
                    conf = self._confidence(dj, dk, True)
                    slot = self._open(x[i], 1.0)
                    self._remember(x[i], slot, step)
                    out.append(Assignment(int(self._ids[slot]), dj, conf, True, None))
                    continue
                conf = 1.0 / (1.0 + (math.exp(t * (dj - dk)) if k >= 0 else 0.0) + math.exp(t * (dj - tau)))
                result = Assignment(int(self._ids[j]), dj, conf, False, self._labels[j])
                # learn: add the pre-scaled sample to the winner's sum, then _refresh(j), inlined
                m = self._sums[j]
                m += xs[i]
                self._counts[j] += inv_list[i]
                self._spread[j] += inv_list[i] * dj
                self._seen[j] += 1
                self._last[j] = step
                p = self._search[j]
                if cosine:
                    np.multiply(m, 1.0 / math.sqrt(float(np.dot(m, m))), out=p)
                else:
                    np.multiply(m, 1.0 / self._counts[j], out=p)
                    self._sqn[j] = float(np.dot(p, p))
                r = i + 1
                if r < n_rows:
                    col = x[r:] @ p
                    if not cosine:
                        col -= 0.5 * self._sqn[j]
                    scores[r:, j] = col
                if refine_every:
                    self._window.append((x[i], result.cluster_id, step))
                if k >= 0 and merge > 0 and math.sqrt(dk) - math.sqrt(dj) < root_merge:
                    self._maybe_merge(j, k)
                out.append(result)
            if refine_every and len(self._window) >= refine_every:
                self._row = n_rows
                self._refine()
        finally:
            self._scores = self._xb = None
            self._row = 0
        return out

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

    def _remember(self, x: np.ndarray, slot: int, step: int) -> None:
        if self.refine_every:  # x is a row of an array _prepare made for us: no copy needed
            self._window.append((x, int(self._ids[slot]), step))

    def _refresh(self, s: int) -> None:
        """Recompute what is searched for slot s after its sum or count changed."""
        m = self._sums[s]
        if self.distance == "cosine":  # the mean's direction is the sum's direction
            np.multiply(m, 1.0 / max(math.sqrt(float(np.dot(m, m))), 1e-30), out=self._search[s])
            self._sqn[s] = 1.0
        else:
            np.multiply(m, 1.0 / self._counts[s], out=self._search[s])
            self._sqn[s] = float(np.dot(self._search[s], self._search[s]))
        if self._scores is not None:  # rows already processed never look again
            r = self._row
            col = self._xb[r:] @ self._search[s]
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

    def _refine(self) -> None:
        """One soft k-means step over the last window, among the clusters the window joined: each
        sample's hard vote for its cluster is replaced by soft votes (logit = -temperature *
        distance). Costs O(window^2 x dim), whatever the number of clusters."""
        window, self._window = self._window, []
        slots = np.array([self._slot.get(self.resolve(w[1]), -1) for w in window], np.int64)
        ok = slots >= 0
        touched, col = np.unique(slots[ok], return_inverse=True)
        if len(touched) < 2:
            return
        x = np.stack([w[0] for w in window])[ok]
        # each sample was learned with weight 1, decayed since; in stored units that is 1 / its scale
        steps = np.array([w[2] for w in window], np.float64)[ok]
        weight = self.decay ** (self._step - 1 - steps) / self._cscale
        search, sqn = self._search[touched], self._sqn[touched]
        d = np.maximum((x * x).sum(1)[:, None] - 2.0 * (x @ search.T) + sqn[None], 0.0)
        logits = -self._refine_temperature() * d
        logits -= logits.max(1, keepdims=True)
        votes = np.exp(logits)
        votes *= (weight / votes.sum(1))[:, None]
        votes[np.arange(len(x)), col] -= weight
        before = self._counts[touched]
        counts = before + votes.sum(0)
        # a cluster whose samples (nearly) all vote elsewhere is dissolved; known classes never are
        alive = (counts > 0.1 * before) | np.array([self._labels[t] is not None for t in touched])
        keep = touched[alive]
        self._spread[keep] *= counts[alive] / before[alive]  # the width is kept, the mass moves
        self._counts[keep] = counts[alive]
        self._sums[keep] += (votes.T @ x).astype(np.float32)[alive]
        self._refresh_rows(keep)
        if self._scores is not None:  # only these prototypes moved; removals below swap columns
            r = self._row
            cols = self._xb[r:] @ self._search[keep].T
            if self.distance != "cosine":
                cols -= 0.5 * self._sqn[keep]
            self._scores[r:, keep] = cols
        self._stats["refinements"] += 1
        dissolved = [int(t) for t in touched[~alive]]
        for s in dissolved:
            # Where its samples went, by soft vote: the alias a stored id resolves to.
            got = np.clip(votes[touched[col] == s], 0, None).sum(0)
            got[~alive] = 0
            if got.max() > 0:
                self._aliases[int(self._ids[s])] = int(self._ids[int(touched[got.argmax()])])
        for s in sorted(dissolved, reverse=True):  # descending: a swap never moves a slot still to go
            if self._n > 1:
                self._remove_slot(s)
                self._stats["dissolved"] += 1

    def _refine_temperature(self) -> float:
        """The logit scale of the refinement's soft votes: the bundle's temperature, but never so
        low that a distance difference of one threshold is worth less than REFINE_SHARPNESS in
        logits. A weakly trained encoder has a low temperature and all its distances are short: its
        soft votes were nearly uniform and every refinement pulled all prototypes to the window
        mean, where they merged into one cluster."""
        return max(self.temperature, REFINE_SHARPNESS / self.threshold)

    def _refresh_rows(self, idx: np.ndarray) -> None:
        """_refresh for many slots at once (without touching a batch's scores)."""
        sums = self._sums[idx]
        if self.distance == "cosine":
            self._search[idx] = sums / np.maximum(np.linalg.norm(sums, axis=1), 1e-30)[:, None]
            self._sqn[idx] = 1.0
        else:
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
