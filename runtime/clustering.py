"""Prototype memory for few-shot classes and unlabelled streams (numpy only).

One estimator, scikit-learn style: parameters in the constructor, state learned with
``partial_fit`` (assign + update, one sample after the other), ``predict`` (assign only) and
``learn_examples`` (labelled prototypes). The algorithm is online leader clustering, the
single-pass limit of DP-means (Kulis & Jordan 2012) as used by Online ProtoNet / OUPN:

* a sample joins the nearest prototype, or opens a new cluster when it is farther than
  ``threshold`` from all of them;
* the winner moves by a count-weighted running mean, and every count decays by ``decay`` per
  sample, so old clusters fade and the least used one is evicted when ``max_clusters`` is reached;
* when the winner drifts within ``merge_threshold`` of its runner-up the two are merged;
* every ``refine_every`` samples, one soft k-means step (Ren et al. 2018) re-weighs that window's
  contributions to the prototypes; clusters whose mass moves away entirely are dissolved.

Distances follow the bundle: ``cosine`` = squared Euclidean between L2-normalised vectors
(2 - 2 cos), ``sqeuclidean`` = squared Euclidean on raw embeddings. Prototypes live in a
preallocated matrix that doubles when full, with their squared norms cached, so the search is one
matrix-vector product (brute force beats ANN indexes below ~10k prototypes).
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .errors import InputError, StateError
from .validation import validate_embeddings

STATE_FORMAT = 1


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


def threshold_from_calibration(calibration: dict) -> float:
    """Default new-cluster threshold from a bundle's calibration statistics.

    A cluster is born from one sample, so the threshold must admit *sample-to-sample* distances
    within a class: we take the midpoint between the same-item 0.9 quantile and the
    different-item 0.05 quantile (both pairwise distances between single drawings, in the device
    distance). When the quantiles are missing we use the exporter's ``new_cluster_threshold``.
    """
    same = calibration.get("same_item_quantiles") or {}
    diff = calibration.get("different_item_quantiles") or {}
    try:
        tau = 0.5 * (float(same["0.9"]) + float(diff["0.05"]))
    except (KeyError, TypeError, ValueError):
        tau = calibration.get("new_cluster_threshold")
        if tau is None:
            raise StateError("the bundle's calibration has neither same/different-item quantiles nor "
                             "new_cluster_threshold; pass threshold= explicitly") from None
        tau = float(tau)
    if not math.isfinite(tau) or tau <= 0:
        raise StateError(f"calibration gives an unusable threshold {tau!r}; pass threshold= explicitly")
    return tau


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
    merge_threshold: winner and runner-up closer than this are merged (default 0.5 * threshold;
      0 disables).
    temperature: logit scale for confidences and refinement (the bundle's trained value).
    refine_every: run one soft k-means step over each window of this many samples (0 = off).
    """

    def __init__(self, dim: int, threshold: float, distance: str = "cosine", max_clusters: int = 1000,
                 decay: float = 0.999, merge_threshold: float | None = None, temperature: float = 10.0,
                 refine_every: int = 0, model: dict | None = None):
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
        self.dim = int(dim)
        self.threshold = float(threshold)
        self.distance = distance
        self.max_clusters = int(max_clusters)
        self.decay = float(decay)
        self.merge_threshold = 0.5 * self.threshold if merge_threshold is None else float(merge_threshold)
        self.temperature = float(temperature)
        self.refine_every = int(refine_every)
        self.model = dict(model or {})
        self._lock = threading.RLock()
        self._reset(capacity=min(64, self.max_clusters))

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_bundle(cls, bundle, threshold: float | None = None, **params) -> "StreamClusterer":
        """Dimension, distance and temperature from the bundle; the threshold from its calibration
        unless given."""
        out = bundle.output_spec
        if threshold is None:
            threshold = threshold_from_calibration(bundle.calibration)
        params.setdefault("temperature", float(out.get("temperature") or 10.0))
        return cls(dim=int(out["dim"]), threshold=float(threshold), distance=out.get("distance", "cosine"),
                   model=model_identity(bundle), **params)

    def get_params(self) -> dict:
        return {"dim": self.dim, "threshold": self.threshold, "distance": self.distance,
                "max_clusters": self.max_clusters, "decay": self.decay,
                "merge_threshold": self.merge_threshold, "temperature": self.temperature,
                "refine_every": self.refine_every}

    def _reset(self, capacity: int) -> None:
        d = self.dim
        self._means = np.zeros((capacity, d), np.float32)
        # For cosine the search matrix holds unit-length prototypes; for sqeuclidean it *is* the means.
        self._search = np.zeros((capacity, d), np.float32) if self.distance == "cosine" else self._means
        self._sqn = np.zeros(capacity, np.float32)
        # Counts are stored divided by _cscale = decay ** step, so decaying all of them is one
        # scalar multiply per sample instead of a pass over the array.
        self._counts = np.zeros(capacity, np.float64)
        self._cscale = 1.0
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
        self._dbuf = np.empty(capacity, np.float32)

    @property
    def n_clusters(self) -> int:
        return self._n

    @property
    def n_seen(self) -> int:
        return self._step

    @property
    def stats(self) -> dict:
        return dict(self._stats, clusters=self._n, seen=self._step)

    # ------------------------------------------------------------------ public API

    def partial_fit(self, X) -> list[Assignment]:
        """Assign each embedding in order and learn from it; returns one Assignment per row."""
        x = self._prepare(X)
        with self._lock:
            xx = (x * x).sum(1)
            out = []
            for i in range(len(x)):
                out.append(self._learn_one(x[i], float(xx[i])))
                if self.refine_every and len(self._window) >= self.refine_every:
                    self._refine()
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
                slot = self._slot_of_label(name)
                if slot is None:
                    slot = self._open(mean, count, label=name)
                else:
                    self._absorb(slot, mean, count)
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
            arrays = {"means": self._means[:n].copy(), "counts": self._counts[:n] * self._cscale,
                      "seen": self._seen[:n].copy(), "created": self._created[:n].copy(),
                      "last_seen": self._last[:n].copy(), "ids": self._ids[:n].copy(),
                      # the refinement window, so a resumed stream refines exactly as an unbroken one
                      "window_x": np.array([w[0] for w in self._window], np.float32).reshape(-1, self.dim),
                      "window_ids": np.array([w[1] for w in self._window], np.int64),
                      "window_steps": np.array([w[2] for w in self._window], np.int64)}
            meta = {"format": STATE_FORMAT, "params": self.get_params(), "model": self.model,
                    "labels": list(self._labels[:n]), "step": self._step, "next_id": self._next_id,
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
            if meta.get("format") != STATE_FORMAT:
                raise StateError(f"{state_dir}: state format {meta.get('format')!r}, expected {STATE_FORMAT}")
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
        self._means[:n] = means
        self._counts[:n] = arrays["counts"]
        self._seen[:n] = arrays["seen"]
        self._created[:n] = arrays["created"]
        self._last[:n] = arrays["last_seen"]
        self._ids[:n] = arrays["ids"]
        self._labels = [None if v is None else str(v) for v in labels]
        self._n = n
        for s in range(n):
            self._slot[int(self._ids[s])] = s
            self._refresh(s)
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
        x = validate_embeddings(X, self.dim)
        if self.distance == "cosine":
            norms = np.linalg.norm(x, axis=1, keepdims=True)
            if (norms < 1e-12).any():
                raise InputError("an all-zero embedding has no direction for cosine distance")
            x = x / norms
        return x

    def _learn_one(self, x: np.ndarray, xx: float) -> Assignment:
        n = self._n
        step = self._step
        self._step += 1
        self._cscale *= self.decay
        if self._cscale < 1e-100:
            self._counts[:n] *= self._cscale
            self._cscale = 1.0
        if n == 0:
            slot = self._open(x, 1.0)
            self._remember(x, slot, step)
            return Assignment(int(self._ids[slot]), math.inf, 1.0, True, None)
        # Hot path: one matrix-vector product, then argmax/argmin; written out for speed.
        s = self._dbuf[:n]
        np.dot(self._search[:n], x, out=s)
        if self.distance == "cosine":  # unit prototypes: d = 2 - 2 cos, nearest = largest dot
            j = int(s.argmax())
            dj = max(2.0 - 2.0 * float(s[j]), 0.0)
            if n > 1:
                s[j] = -np.inf
                k = int(s.argmax())
                dk = max(2.0 - 2.0 * float(s[k]), 0.0)
            else:
                k, dk = -1, math.inf
        else:
            s *= -2.0
            s += self._sqn[:n]
            j = int(s.argmin())
            dj = max(float(s[j]) + xx, 0.0)
            if n > 1:
                s[j] = np.inf
                k = int(s.argmin())
                dk = max(float(s[k]) + xx, 0.0)
            else:
                k, dk = -1, math.inf
        if dj > self.threshold:
            slot = self._open(x, 1.0)
            self._remember(x, slot, step)
            return Assignment(int(self._ids[slot]), dj, self._confidence(dj, dk, True), True, None)
        cid = int(self._ids[j])
        label = self._labels[j]
        conf = self._confidence(dj, dk, False)
        self._absorb(j, x, 1.0)
        self._remember(x, j, step)
        if k >= 0 and self.merge_threshold > 0:
            self._maybe_merge(j, k)
        return Assignment(cid, dj, conf, False, label)

    def _confidence(self, d1: float, d2: float, new: bool) -> float:
        # Softmax over {nearest, runner-up, "new cluster" at the threshold}, shifted for stability.
        t = self.temperature
        logits = [-t * d1 if math.isfinite(d1) else -math.inf, -t * d2 if math.isfinite(d2) else -math.inf,
                  -t * self.threshold]
        top = max(logits)
        e = [math.exp(v - top) if v != -math.inf else 0.0 for v in logits]
        return (e[2] if new else e[0]) / sum(e)

    def _dist_matrix(self, x: np.ndarray) -> np.ndarray:
        n = self._n
        d = (x * x).sum(1)[:, None] - 2.0 * (x @ self._search[:n].T) + self._sqn[:n][None]
        return np.maximum(d, 0.0)

    def _remember(self, x: np.ndarray, slot: int, step: int) -> None:
        if self.refine_every:
            self._window.append((x.copy(), int(self._ids[slot]), step))

    def _refresh(self, s: int) -> None:
        m = self._means[s]
        if self.distance == "cosine":
            norm = float(np.sqrt(m @ m))
            self._search[s] = m / max(norm, 1e-12)
            self._sqn[s] = 1.0
        else:
            self._sqn[s] = float(m @ m)

    def _absorb(self, s: int, x: np.ndarray, weight: float) -> None:
        c = self._counts[s] * self._cscale
        m = self._means[s]
        m += (weight / (c + weight)) * (x - m)
        self._counts[s] = (c + weight) / self._cscale
        self._seen[s] += int(round(weight))
        self._last[s] = max(self._step - 1, 0)
        self._refresh(s)

    def _grow(self) -> None:
        cap = min(2 * len(self._means), self.max_clusters)
        for name in ("_means", "_sqn", "_counts", "_seen", "_created", "_last", "_ids"):
            old = getattr(self, name)
            new = np.zeros((cap,) + old.shape[1:], old.dtype)
            new[:self._n] = old[:self._n]
            setattr(self, name, new)
        if self.distance == "cosine":
            new = np.zeros((cap, self.dim), np.float32)
            new[:self._n] = self._search[:self._n]
            self._search = new
        else:
            self._search = self._means
        self._dbuf = np.empty(cap, np.float32)

    def _open(self, x: np.ndarray, count: float, label: str | None = None) -> int:
        if self._n >= self.max_clusters:
            self._evict()
        if self._n >= len(self._means):
            self._grow()
        s = self._n
        self._n += 1
        cid = self._next_id
        self._next_id += 1
        self._means[s] = x
        self._counts[s] = count / self._cscale
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
        unlabelled = np.array([lab is None for lab in self._labels[:n]])
        # Known classes are kept as long as there is an unlabelled cluster to give up instead.
        pool = np.flatnonzero(unlabelled) if unlabelled.any() else np.arange(n)
        self._remove_slot(int(pool[counts[pool].argmin()]))
        self._stats["evicted"] += 1

    def _remove_slot(self, s: int) -> None:
        last = self._n - 1
        del self._slot[int(self._ids[s])]
        if s != last:  # keep active slots contiguous: move the last one into the hole
            for arr in (self._means, self._sqn, self._counts, self._seen, self._created, self._last, self._ids):
                arr[s] = arr[last]
            if self.distance == "cosine":
                self._search[s] = self._search[last]
            self._labels[s] = self._labels[last]
            self._slot[int(self._ids[s])] = s
        self._labels.pop()
        self._n = last

    def _maybe_merge(self, j: int, k: int) -> None:
        dist = float(self._sqn[j] + self._sqn[k] - 2.0 * (self._search[j] @ self._search[k]))
        if dist >= self.merge_threshold:
            return
        lj, lk = self._labels[j], self._labels[k]
        if lj is not None and lk is not None and lj != lk:
            return
        self._merge_slots(j, k)

    def _merge_slots(self, a: int, b: int) -> int:
        """Merge slots a and b; the labelled (else the heavier) one keeps its id. Returns it."""
        la, lb = self._labels[a], self._labels[b]
        keep_a = (la is not None) if (la is None) != (lb is None) else self._counts[a] >= self._counts[b]
        s, o = (a, b) if keep_a else (b, a)
        cs, co = self._counts[s], self._counts[o]
        total = cs + co
        if total > 0:
            self._means[s] = (cs * self._means[s] + co * self._means[o]) / total
        self._counts[s] = total
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
        """One soft k-means step over the last window: each sample's hard vote for the cluster it
        joined is replaced by soft votes for all live clusters (logit = -temperature * distance)."""
        window, self._window = self._window, []
        n = self._n
        if n < 2 or not window:
            return
        x = np.stack([w[0] for w in window])
        slots = np.array([self._slot.get(self.resolve(w[1]), -1) for w in window])
        weight = self.decay ** (self._step - 1 - np.array([w[2] for w in window], np.float64))
        logits = -self.temperature * self._dist_matrix(x)
        logits -= logits.max(1, keepdims=True)
        z = np.exp(logits)
        z /= z.sum(1, keepdims=True)
        z *= weight[:, None]
        hard = np.zeros_like(z)
        ok = slots >= 0
        hard[np.flatnonzero(ok), slots[ok]] = weight[ok]
        delta_w = (z - hard).sum(0)                      # [n]
        delta_s = (z - hard).T.astype(np.float32) @ x    # [n, D]
        before = self._counts[:n] * self._cscale
        counts = before + delta_w
        sums = before[:, None] * self._means[:n] + delta_s
        alive = counts > 0.5  # a cluster that lost (almost) all its mass is dissolved
        self._counts[:n] = np.where(alive, counts, before) / self._cscale
        for s in np.flatnonzero(alive):
            self._means[s] = sums[s] / counts[s]
            self._refresh(int(s))
        self._stats["refinements"] += 1
        for s in sorted(np.flatnonzero(~alive), reverse=True):
            if self._labels[s] is None and self._n > 1:
                gone = int(self._ids[s])
                # Where its window samples went, by soft vote: the alias a stored id resolves to.
                target = int(np.argmax(z[slots == s].sum(0))) if (slots == s).any() else -1
                if 0 <= target < self._n and target != s:
                    self._aliases[gone] = int(self._ids[target])
                self._remove_slot(int(s))
                self._stats["dissolved"] += 1

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
