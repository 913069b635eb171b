"""runtime/recluster.py: Ward cuts and the silhouette choice, on points whose answer is known."""
import numpy as np
import pytest

from protoedge.runtime.recluster import better_partition, ward_cut_scores
from protoedge.runtime.threshold_search import silhouette_from_distances


def groups(sizes, spread=0.05, seed=0, dim=8):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(sizes), dim))
    y = np.repeat(np.arange(len(sizes)), sizes)
    return centres[y] + spread * rng.normal(size=(len(y), dim)), y


def test_ward_cut_scores_follow_scipy_fcluster():
    """Each cut is the partition scipy's fcluster gives at that K, and its silhouette (carried
    along the merges) is the one computed afresh from the distance matrix."""
    hierarchy = pytest.importorskip("scipy.cluster.hierarchy")
    x, _ = groups([12, 9, 15, 7, 11], spread=0.6, seed=1)
    tree = hierarchy.linkage(x, "ward")
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    cuts = ward_cut_scores(tree, d, range(2, 12))
    assert sorted(cuts) == list(range(2, 12))
    for k, (score, labels) in cuts.items():
        ref = hierarchy.fcluster(tree, k, "maxclust")
        # the same partition: a one-to-one map between the two labellings
        pairs = set(zip(labels.tolist(), ref.tolist()))
        assert len(pairs) == k == labels.max() + 1 == len(set(ref.tolist()))
        assert sorted(set(labels.tolist())) == list(range(k))
        assert score == pytest.approx(silhouette_from_distances(d, labels), abs=1e-12)
    assert len({round(s, 9) for s, _ in cuts.values()}) > 5  # the cuts do differ


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
