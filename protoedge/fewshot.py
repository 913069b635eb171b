"""N-way K-shot episodes and prototype classification on precomputed embeddings (numpy only).

The same code scores a torch encoder (trainer eval), an ONNX file (export's precision checks)
and the runtime, so the numbers are comparable across the pipeline.
"""
from __future__ import annotations

import numpy as np

from .metrics import mean_ci95


def sample_episode(labels: np.ndarray, n_way: int, k_shot: int, n_query: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Indices [n_way, k_shot] of the support set and [n_way, n_query] of the queries.
    Classes are drawn without replacement and support/query images never overlap."""
    classes = np.unique(labels)
    if len(classes) < n_way:
        raise ValueError(f"{n_way}-way episodes need {n_way} classes, the data has {len(classes)}")
    chosen = rng.choice(classes, n_way, replace=False)
    support = np.empty((n_way, k_shot), np.int64)
    query = np.empty((n_way, n_query), np.int64)
    for i, c in enumerate(chosen):
        members = np.flatnonzero(labels == c)
        if len(members) < k_shot + n_query:
            raise ValueError(f"class {c} has {len(members)} images, an episode needs {k_shot + n_query}")
        pick = rng.choice(members, k_shot + n_query, replace=False)
        support[i], query[i] = pick[:k_shot], pick[k_shot:]
    return support, query


def pairwise_sqdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None]
    return np.maximum(d, 0)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def soft_kmeans_refine(prototypes: np.ndarray, support: np.ndarray, queries: np.ndarray,
                       steps: int = 1, temperature: float = 1.0) -> np.ndarray:
    """Ren et al. (2018): treat queries as unlabelled data; each step recomputes every prototype as
    the mean of its support points (weight 1) and all queries weighted by soft assignment."""
    k_shot = support.shape[1]
    for _ in range(steps):
        logits = -pairwise_sqdist(queries, prototypes) / temperature
        logits -= logits.max(1, keepdims=True)
        w = np.exp(logits)
        w /= w.sum(1, keepdims=True)  # [Q, n_way]
        prototypes = (support.sum(1) + w.T @ queries) / (k_shot + w.sum(0)[:, None])
    return prototypes


def evaluate_episodes(embeddings: np.ndarray, labels: np.ndarray, n_way: int = 5, k_shot: int = 1,
                      n_query: int = 15, episodes: int = 1000, distance: str = "sqeuclidean",
                      seed: int = 0, refine_steps: int = 0) -> dict:
    """Prototype classification accuracy over random episodes, with its 95% CI (in %).

    distance: 'sqeuclidean' on raw embeddings, or 'cosine' (squared Euclidean on L2-normalised
    embeddings, which ranks exactly as cosine similarity does).
    refine_steps > 0 adds test-time soft k-means with the unlabelled queries (reported separately).
    """
    x = np.asarray(embeddings, dtype=np.float64)
    if distance == "cosine":
        x = l2_normalize(x)
    elif distance != "sqeuclidean":
        raise ValueError(f"unknown distance {distance!r}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    # A temperature on the scale of typical distances keeps the soft assignment from being one-hot.
    scale = float(np.median(pairwise_sqdist(x[:256], x[256:512]))) if refine_steps else 1.0
    accs = []
    for _ in range(episodes):
        s_idx, q_idx = sample_episode(labels, n_way, k_shot, n_query, rng)
        support, queries = x[s_idx], x[q_idx].reshape(n_way * n_query, -1)
        prototypes = support.mean(1)
        if refine_steps:
            prototypes = soft_kmeans_refine(prototypes, support, queries, refine_steps, 0.1 * scale)
        pred = pairwise_sqdist(queries, prototypes).argmin(1)
        truth = np.repeat(np.arange(n_way), n_query)
        accs.append((pred == truth).mean() * 100)
    mean, ci = mean_ci95(accs)
    return {"n_way": n_way, "k_shot": k_shot, "n_query": n_query, "episodes": episodes,
            "distance": distance, "refine_steps": refine_steps, "acc": mean, "ci95": ci}
