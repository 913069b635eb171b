"""runtime/recluster.py: Ward cuts and the silhouette choice, on points whose answer is known."""
import numpy as np
import pytest

from protoedge.runtime.recluster import better_partition, ward_cuts
from protoedge.runtime.threshold_search import silhouette_from_distances


def groups(sizes, spread=0.05, seed=0, dim=8):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(sizes), dim))
    y = np.repeat(np.arange(len(sizes)), sizes)
    return centres[y] + spread * rng.normal(size=(len(y), dim)), y


def test_ward_cuts_equal_scipy_fcluster():
    hierarchy = pytest.importorskip("scipy.cluster.hierarchy")
    x, _ = groups([12, 9, 15, 7, 11], spread=0.6, seed=1)
    tree = hierarchy.linkage(x, "ward")
    cuts = ward_cuts(tree, len(x), range(2, 12))
    assert sorted(cuts) == list(range(2, 12))
    for k, labels in cuts.items():
        ref = hierarchy.fcluster(tree, k, "maxclust")
        # the same partition: a one-to-one map between the two labellings
        pairs = set(zip(labels.tolist(), ref.tolist()))
        assert len(pairs) == k == labels.max() + 1 == len(set(ref.tolist()))


def test_silhouette_from_distances_matches_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    x, y = groups([10, 8, 1, 12], spread=0.4, seed=2)  # a singleton cluster included
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    assert silhouette_from_distances(d, y) == pytest.approx(metrics.silhouette_score(x, y), abs=1e-9)


def test_better_partition_recovers_merged_groups_and_keeps_a_right_one():
    x, y = groups([20] * 6, seed=3)
    joined = y // 2  # pairs of groups in one cluster: 3 clusters for 6
    found = better_partition(x, joined, span=5, margin=0.0)
    assert found is not None and found.max() + 1 == 6
    assert len(set(zip(found.tolist(), y.tolist()))) == 6  # the six groups exactly
    assert better_partition(x, y, span=5, margin=0.0) is None  # nothing beats the truth
    assert better_partition(x, np.zeros(len(x), np.int64), span=5, margin=0.0) is None  # one cluster: no silhouette
