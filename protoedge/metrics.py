"""Clustering and few-shot metrics on plain numpy arrays (used by eval, runtime and benchmarks)."""
from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment


def contingency(true: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Counts table [n_true_classes, n_pred_clusters] over the distinct values of each."""
    _, t = np.unique(np.asarray(true), return_inverse=True)
    _, p = np.unique(np.asarray(pred), return_inverse=True)
    table = np.zeros((t.max() + 1, p.max() + 1), dtype=np.int64)
    np.add.at(table, (t, p), 1)
    return table


def hungarian_accuracy(true: np.ndarray, pred: np.ndarray) -> float:
    """Best one-to-one matching of clusters to classes. The table is rectangular, so surplus
    clusters (or classes) stay unmatched and their samples count as errors."""
    table = contingency(true, pred)
    rows, cols = linear_sum_assignment(-table)
    return float(table[rows, cols].sum() / max(len(true), 1))


def _comb2(x):
    return x * (x - 1) / 2.0


def adjusted_rand_index(true: np.ndarray, pred: np.ndarray) -> float:
    table = contingency(true, pred)
    n = table.sum()
    sum_cells = _comb2(table).sum()
    sum_rows, sum_cols = _comb2(table.sum(1)).sum(), _comb2(table.sum(0)).sum()
    expected = sum_rows * sum_cols / _comb2(n) if n > 1 else 0.0
    max_index = (sum_rows + sum_cols) / 2
    if max_index == expected:  # both partitions trivial (one cluster, or all singletons)
        return 1.0
    return float((sum_cells - expected) / (max_index - expected))


def normalized_mutual_info(true: np.ndarray, pred: np.ndarray) -> float:
    """NMI with the arithmetic-mean normaliser (scikit-learn's default)."""
    table = contingency(true, pred).astype(np.float64)
    n = table.sum()
    pij = table / n
    pi, pj = pij.sum(1), pij.sum(0)
    nz = pij > 0
    mi = float((pij[nz] * np.log(pij[nz] / np.outer(pi, pj)[nz])).sum())
    h_true = float(-(pi[pi > 0] * np.log(pi[pi > 0])).sum())
    h_pred = float(-(pj[pj > 0] * np.log(pj[pj > 0])).sum())
    denom = (h_true + h_pred) / 2
    if denom == 0:
        return 1.0
    return max(0.0, mi / denom)


def clustering_scores(true: np.ndarray, pred: np.ndarray) -> dict:
    return {
        "acc": hungarian_accuracy(true, pred),
        "ari": adjusted_rand_index(true, pred),
        "nmi": normalized_mutual_info(true, pred),
        "clusters_found": int(len(np.unique(pred))),
        "clusters_true": int(len(np.unique(true))),
    }


def mean_ci95(values) -> tuple[float, float]:
    """Mean and half-width of the 95% confidence interval, 1.96 * std / sqrt(n), as in the literature."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(1.96 * v.std() / np.sqrt(max(len(v), 1)))
