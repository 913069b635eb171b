"""A second opinion on the repair memory's partition: Ward's hierarchy, cut where the silhouette
says, with the number of clusters free to move a few either way.

The stream rule decides with one global threshold: a sample farther than it from every prototype
opens a cluster. On streams of novel characters no single threshold fits every pair of classes:
offline on the 50 streams of benchmark (a), average linkage cut at the best global distance reaches
83.8% ACC (with 34 clusters for 20), while Ward with the number of clusters chosen by silhouette
reaches 87.9% with 18.5 (scratch, session 9; k-means chosen the same way 87.3%). This module gives
the clusterer that model selection over its memory of recent samples.

numpy + scipy (already a runtime dependency), no torch.
"""
from __future__ import annotations

import numpy as np

from protoedge.fewshot import pairwise_sqdist

from .threshold_search import silhouette_from_distances


def better_partition(x: np.ndarray, current: np.ndarray, span: int, margin: float) -> np.ndarray | None:
    """Cluster labels for the rows of ``x`` from Ward's hierarchy cut at K clusters, for the K
    within ``span`` of the current partition's count whose cut has the highest silhouette, if
    that beats the silhouette of ``current`` (labels 0..K0-1, every one used) by more than
    ``margin``; else None. Euclidean distances (for unit rows, the square root of the cosine
    device distance)."""
    from scipy.cluster.hierarchy import linkage

    n = len(x)
    k0 = int(current.max()) + 1
    if k0 < 2 or k0 >= n - 1:
        return None
    x = x.astype(np.float64)
    d = np.sqrt(pairwise_sqdist(x, x))
    best, best_score = None, silhouette_from_distances(d, current) + margin
    cuts = ward_cuts(linkage(x, "ward"), n, range(max(2, k0 - span), min(n - 1, k0 + span) + 1))
    for _, cut in sorted(cuts.items()):  # fewest clusters first: a tie keeps the coarser cut
        score = silhouette_from_distances(d, cut)
        if score > best_score:
            best, best_score = cut, score
    return best


def ward_cuts(tree: np.ndarray, n: int, ks) -> dict[int, np.ndarray]:
    """{K: labels (0..K-1) of the n leaves after the first n - K merges of a scipy linkage
    ``tree``} for each K in ``ks``: one pass over the merges (fcluster per K validates the whole tree each
    time, which cost more than the linkage itself)."""
    wanted = set(ks)
    members = {i: [i] for i in range(n)}
    cuts = {}
    for m, (a, b) in enumerate(tree[:, :2].astype(np.int64).tolist()):
        members[n + m] = members.pop(a) + members.pop(b)
        if n - m - 1 in wanted:
            label = np.empty(n, np.int64)
            for g, rows in enumerate(members.values()):
                label[rows] = g
            cuts[n - m - 1] = label
    return cuts
