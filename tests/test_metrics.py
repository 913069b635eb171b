"""Clustering metrics against hand-computed cases (and scikit-learn as an independent reference)."""
import numpy as np
import pytest

from protoedge import metrics


def test_hungarian_accuracy_matches_a_hand_computed_permutation():
    true = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([2, 2, 1, 0, 0, 1])  # clusters 2->0, 0->1, 1->2: 5 of 6 right
    assert metrics.hungarian_accuracy(true, pred) == pytest.approx(5 / 6)


def test_hungarian_accuracy_counts_surplus_clusters_as_errors():
    true = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    # 4 clusters for 2 classes: only two can be matched, so at most 2 + 2 = 4 of 8 are right
    pred = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    assert metrics.hungarian_accuracy(true, pred) == pytest.approx(0.5)
    # one cluster for two classes: the other class is all wrong
    assert metrics.hungarian_accuracy(true, np.zeros(8, int)) == pytest.approx(0.5)


def test_label_values_do_not_matter_only_the_partition():
    true = np.array([5, 5, 9, 9, 7])
    assert metrics.hungarian_accuracy(true, np.array([40, 40, -3, -3, 11])) == 1.0
    assert metrics.adjusted_rand_index(true, np.array([1, 1, 2, 2, 3])) == pytest.approx(1.0)
    assert metrics.normalized_mutual_info(true, np.array([1, 1, 2, 2, 3])) == pytest.approx(1.0)


def test_ari_hand_computed():
    # table [[2, 1], [0, 2]]: sum C(n_ij,2) = 1 + 0 + 0 + 1 = 2; rows C(3,2)+C(2,2) = 4; cols C(2,2)+C(3,2) = 4
    # expected = 4 * 4 / C(5,2) = 1.6; max = 4 -> ARI = (2 - 1.6) / (4 - 1.6) = 1/6
    true = np.array([0, 0, 0, 1, 1])
    pred = np.array([0, 0, 1, 1, 1])
    assert metrics.adjusted_rand_index(true, pred) == pytest.approx(1 / 6)


def test_nmi_hand_computed_independent_partitions_is_zero():
    true = np.array([0, 0, 1, 1])
    pred = np.array([0, 1, 0, 1])  # every cell 1/4 = product of marginals: MI = 0
    assert metrics.normalized_mutual_info(true, pred) == pytest.approx(0.0, abs=1e-12)


def test_against_scikit_learn_on_random_partitions():
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    rng = np.random.default_rng(3)
    for _ in range(5):
        true, pred = rng.integers(0, 6, 200), rng.integers(0, 9, 200)
        assert metrics.adjusted_rand_index(true, pred) == pytest.approx(adjusted_rand_score(true, pred), abs=1e-10)
        assert metrics.normalized_mutual_info(true, pred) == pytest.approx(
            normalized_mutual_info_score(true, pred), abs=1e-10)


def test_clustering_scores_reports_counts():
    s = metrics.clustering_scores(np.array([0, 0, 1, 1]), np.array([3, 3, 3, 4]))
    assert s["clusters_found"] == 2 and s["clusters_true"] == 2 and s["acc"] == pytest.approx(0.75)


def test_mean_ci95_hand_computed():
    mean, ci = metrics.mean_ci95([1.0, 3.0])  # std (ddof 0) = 1
    assert mean == 2.0 and ci == pytest.approx(1.96 / np.sqrt(2))
