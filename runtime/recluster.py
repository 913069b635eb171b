"""A second opinion on the repair memory's partition: Ward's hierarchy, cut where the silhouette
says, with the number of clusters free to move a few either way.

The stream rule decides with one global threshold: a sample farther than it from every prototype
opens a cluster. On streams of novel characters no single threshold fits every pair of classes:
offline on the 50 streams of benchmark (a), average linkage cut at the best global distance reaches
83.8% ACC (with 34 clusters for 20), while Ward with the number of clusters chosen by silhouette
reaches 87.9% with 18.5 (scratch, session 9; k-means chosen the same way 87.3%). This module gives
the clusterer that model selection over its memory of recent samples.

better_partition computes the distance matrix in numpy, as the reference below does, and hands
it to the compiled ward_cut (runtime/_rowloop.c, plain C): scipy's linkage algorithm step for step
(the same merges at the same heights), the same cuts, labels and choice; tests/test_recluster.py
compares the two label for label on real repair memories. Median CPU time per call at n = 256
remembered samples (11 cuts), one BLAS thread, shared 2-core x86-64 (scratch, session 11):
1.26-1.29 ms (0.56 numpy distances + 0.65 ward_cut) against 4.5-4.6 ms for the numpy + scipy
code; 1.87 ms in a noisier minute, of it the distances 0.78. A version that also computed the
distances in C, with AVX2 / AVX-512 kernels chosen at run time, took 0.82-0.85 ms and was not
kept (~850 lines of C). better_partition_numpy is the reference and the fallback (numpy + scipy,
already a runtime dependency; no torch).
"""
from __future__ import annotations

import os

import numpy as np

from protoedge.fewshot import pairwise_sqdist

from .threshold_search import silhouette_from_distances, silhouette_from_sums

try:
    from . import _rowloop
except ImportError:  # installed without a C compiler: better_partition_numpy
    _rowloop = None

# The compiled ward_cut when it was built; PROTOEDGE_CLUSTER_LOOP=numpy runs the numpy + scipy
# reference instead, as it does for the clusterer's loop (runtime/clustering.py).
compiled = _rowloop is not None and os.environ.get("PROTOEDGE_CLUSTER_LOOP", "").lower() != "numpy"


def better_partition(x: np.ndarray, current: np.ndarray, span: int, margin: float) -> np.ndarray | None:
    """Cluster labels for the rows of ``x`` from Ward's hierarchy cut at K clusters, for the K
    within ``span`` of the current partition's count whose cut has the highest silhouette, if
    that beats the silhouette of ``current`` (labels 0..K0-1, every one used) by more than
    ``margin``; else None. Euclidean distances (for unit rows, the square root of the cosine
    device distance). The distances in numpy (``distances``), the rest in one compiled call where
    the extension was built (module ``compiled``); else better_partition_numpy."""
    if not compiled:
        return better_partition_numpy(x, current, span, margin)
    out = np.empty(len(x), np.int64)
    try:
        k = _rowloop.ward_cut(distances(x), np.ascontiguousarray(current, dtype=np.int64), out, int(span),
                              float(margin))
    except RuntimeError:  # NaN in the linkage (coinciding centroids): scipy's answer, whatever it is
        return better_partition_numpy(x, current, span, margin)
    return out if k else None


def distances(x: np.ndarray) -> np.ndarray:
    """The rows' Euclidean distance matrix in float64, zero diagonal (for the silhouettes and, as
    its upper triangle, the linkage)."""
    x = x.astype(np.float64)
    d = pairwise_sqdist(x, x)
    np.sqrt(d, out=d)
    np.fill_diagonal(d, 0.0)
    return d


def better_partition_numpy(x: np.ndarray, current: np.ndarray, span: int, margin: float) -> np.ndarray | None:
    """better_partition in numpy and scipy: the reference for the compiled ward_cut."""
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import squareform

    n = len(x)
    k0 = int(current.max()) + 1
    if k0 < 2 or k0 >= n - 1:
        return None
    # One distance matrix (a matrix product: scipy's pdist took 3x as long) for the silhouettes
    # and, as its upper triangle, for the linkage, which would otherwise compute its own.
    d = distances(x)
    best, best_score = None, silhouette_from_distances(d, current) + margin
    tree = linkage(squareform(d, checks=False), "ward")
    cuts = ward_cut_scores(tree, d, range(max(2, k0 - span), min(n - 1, k0 + span) + 1))
    for _, (score, cut) in sorted(cuts.items()):  # fewest clusters first: a tie keeps the coarser cut
        if score > best_score:
            best, best_score = cut, score
    return best


def ward_cut_scores(tree: np.ndarray, d: np.ndarray, ks) -> dict[int, tuple[float, np.ndarray]]:
    """{K: (silhouette, labels 0..K-1)} of the n points after the first n - K merges of a scipy
    linkage ``tree``, for each K in ``ks``; ``d`` is their distance matrix.

    One walk down the merges: the points' summed distances to each cluster are computed once at
    the finest cut and then follow the merges (a merge adds two columns), so each further cut
    costs O(n K) rather than a product with the n x n matrix. With the one distance matrix in
    better_partition, a call on the repair memories of benchmark (a) (n <= 256, 11 cuts) took
    3.8 ms of CPU against 7.1 for a silhouette from scratch per cut (measured, one BLAS thread)."""
    n = len(d)
    ks = sorted(set(ks))
    kmax, kmin = ks[-1], ks[0]
    pairs = tree[:, :2].astype(np.int64)
    merges = pairs.tolist()
    # the finest cut: each point's top node after the first n - kmax merges, by pointer jumping
    parent = np.arange(2 * n - 1)
    parent[pairs[:n - kmax].ravel()] = np.repeat(np.arange(n, 2 * n - kmax), 2)
    top = parent[:n]
    while True:
        up = parent[top]
        if np.array_equal(up, top):
            break
        top = up
    nodes, label = np.unique(top, return_inverse=True)
    label = label.ravel()
    node_of = nodes.tolist()  # column -> tree node
    col = {node: g for g, node in enumerate(node_of)}
    onehot = np.zeros((n, kmax))
    onehot[np.arange(n), label] = 1.0
    sums, sizes = d @ onehot, onehot.sum(0)
    out = {}
    k, m = kmax, n - kmax
    while True:
        if k in ks:
            out[k] = (silhouette_from_sums(sums[:, :k], sizes[:k], label), label.copy())
        if k == kmin:
            return out
        a, b = merges[m]
        ca, cb = sorted((col.pop(a), col.pop(b)))
        sums[:, ca] += sums[:, cb]
        sizes[ca] += sizes[cb]
        label[label == cb] = ca
        last = k - 1  # the last column fills the gap, so the labels stay 0..K-1
        if cb != last:
            sums[:, cb], sizes[cb] = sums[:, last], sizes[last]
            label[label == last] = cb
            node_of[cb] = node_of[last]
            col[node_of[cb]] = cb
        node_of[ca] = n + m
        col[n + m] = ca
        k, m = k - 1, m + 1
