"""Choose the new-cluster threshold from *unlabelled* data of the deployment domain.

The calibration rule (clustering.threshold_from_calibration) was fitted on Omniglot, where a class
is a handful of drawings among 1,200; on data with a few broad classes (MNIST) the right threshold
is much larger. Without labels, the clusterer is run over sample streams at several multiples of
the rule's threshold, and the multiple whose stream partition has the best silhouette (Rousseeuw
1987: cohesion against separation, no labels involved) wins. numpy only, like the rest of the
runtime.
"""
from __future__ import annotations

import numpy as np

from protoedge.fewshot import pairwise_sqdist

from .errors import InputError

FACTORS = (0.7, 1.0, 1.3, 1.6, 2.0, 2.5, 3.0)


def silhouette(x: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette with Euclidean distances (samples alone in their cluster score 0, as in
    scikit-learn). O(n^2) memory: pass a subsample of at most a few thousand rows."""
    x = np.asarray(x, np.float64)
    _, lab = np.unique(np.asarray(labels), return_inverse=True)
    k = lab.max() + 1
    if k < 2 or k >= len(x):
        return -1.0
    return silhouette_from_distances(np.sqrt(pairwise_sqdist(x, x)), lab.ravel())


def silhouette_from_distances(d: np.ndarray, labels: np.ndarray) -> float:
    """silhouette() from the distance matrix ``d``, for labels 0..K-1 that are all used (many
    partitions of the same points share one matrix: runtime/recluster.py)."""
    onehot = np.zeros((len(labels), int(labels.max()) + 1))
    onehot[np.arange(len(labels)), labels] = 1
    return silhouette_from_sums(d @ onehot, onehot.sum(0), labels)


def silhouette_from_sums(sums: np.ndarray, sizes: np.ndarray, labels: np.ndarray) -> float:
    """The silhouette from each point's summed distance to each cluster (``sums``, [n, K]) and
    the cluster sizes, for labels 0..K-1 that are all used."""
    rows = np.arange(len(labels))
    own = sizes[labels]
    a = sums[rows, labels] / np.maximum(own - 1, 1)
    other = sums / sizes[None]
    other[rows, labels] = np.inf
    b = other.min(1)
    s = np.where(own > 1, (b - a) / np.maximum(np.maximum(a, b), 1e-12), 0.0)
    return float(s.mean())


def select_threshold(make_clusterer, streams, base: float, factors=FACTORS, max_points: int = 2000,
                     seed: int = 0) -> dict:
    """Run ``make_clusterer(threshold)`` over each unlabelled stream (embeddings in arrival order)
    for threshold = factor x base; score the partition the stream was given (each sample's cluster
    as assigned on arrival, merged ids resolved to their survivor) by silhouette in the device
    space; return the best threshold and the table.

    The partition as assigned, not the final one (every sample at its nearest prototype at the
    end): the repair splits mixed clusters after the fact, so a threshold too large for the stream
    can end in a clean final partition while the samples were misassigned on the way. On Protocol-A
    train streams with split distance 0.5 the final partition's silhouette picked 1.3 x the rule,
    which clustered (a)'s test streams at 66.9% ACC; the assigned partition's picks 1.0 (83.2%)."""
    streams = [np.asarray(s) for s in streams]
    if not streams or any(len(s) < 3 for s in streams):
        raise InputError("threshold selection needs streams of at least 3 embeddings")
    rng = np.random.default_rng(seed)
    table = {}
    for f in factors:
        scores, clusters = [], []
        for x in streams:
            c = make_clusterer(float(f * base))
            assigned = np.array([c.resolve(a.cluster_id) for a in c.partial_fit(x)])
            pick = rng.choice(len(x), min(len(x), max_points), replace=False)
            space = c._prepare(x[pick])  # the clusterer's own space (unit vectors for cosine)
            scores.append(silhouette(space, assigned[pick]))
            clusters.append(c.n_clusters)
        table[f] = {"threshold": float(f * base), "silhouette": float(np.mean(scores)),
                    "clusters": float(np.mean(clusters))}
    best = max(table, key=lambda f: table[f]["silhouette"])
    return {"threshold": table[best]["threshold"], "factor": float(best), "base": float(base),
            "table": {f"{f:g}": v for f, v in table.items()}}
