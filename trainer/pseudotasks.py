"""Automatic pseudo-tasks from unlabelled images: which images form an episode's classes.

Two sources, usable together:
  augmentation tasks  every sampled image is its own class; support and query are different
                      augmented views of it (UMTRA / AAL / SimCLR family). With thousands of
                      characters, n random images almost never share a class.
  clustering tasks    k-means partitions of the current embedding (CACTUs), several partitions
                      with different k and randomly rescaled dimensions, recomputed as the
                      embedding improves; a class is a cluster, its shots are different images.

The samplers return indices into the unlabelled pool; augmentation happens on the batch later.
"""
from __future__ import annotations

import numpy as np


def augmentation_episode(n_images: int, n_way: int, rng: np.random.Generator) -> np.ndarray:
    """Indices [n_way] of distinct images; each becomes one pseudo-class."""
    if n_way > n_images:
        raise ValueError(f"{n_way}-way augmentation episodes need {n_way} images, the pool has {n_images}")
    return rng.choice(n_images, n_way, replace=False)


def kmeans_partitions(embeddings: np.ndarray, ks: list[int], seed: int,
                      rescale_from: int = 1) -> list[np.ndarray]:
    """One cluster-id array [N] per k. Partitions from index rescale_from on cluster a randomly
    rescaled embedding (CACTUs) so they disagree where the embedding is unsure."""
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(seed)
    x = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    partitions = []
    for i, k in enumerate(ks):
        if k > len(x):
            raise ValueError(f"k-means with k={k} needs at least {k} images, the pool has {len(x)}")
        xi = x * rng.uniform(0.0, 1.0, x.shape[1]) if i >= rescale_from else x
        # Random init: k-means++ seeding costs ~30x more than the Lloyd iterations at k ~ 1000.
        km = KMeans(n_clusters=k, init="random", n_init=1, max_iter=20, random_state=int(rng.integers(2**31)))
        partitions.append(km.fit_predict(xi.astype(np.float32)).astype(np.int64))
    return partitions


class ClusterTaskSampler:
    """Episodes of n_way clusters x (k_shot + n_query) distinct members from one partition."""

    def __init__(self, partitions: list[np.ndarray], min_size: int):
        self.members = []  # per partition: list of member-index arrays of clusters big enough
        for part in partitions:
            order = np.argsort(part, kind="stable")
            bounds = np.flatnonzero(np.diff(part[order])) + 1
            # id -1 marks images left out of the clustering (a subsample of a big pool)
            groups = [g for g in np.split(order, bounds) if len(g) >= min_size and part[g[0]] >= 0]
            self.members.append(groups)
        self.min_size = min_size

    def usable_clusters(self) -> list[int]:
        return [len(g) for g in self.members]

    def episode(self, n_way: int, k_shot: int, n_query: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Indices [n_way, k_shot] (support) and [n_way, n_query] (query), never overlapping."""
        if k_shot + n_query > self.min_size:
            raise ValueError(f"episodes need {k_shot + n_query} members per cluster, "
                             f"clusters were filtered at {self.min_size}")
        candidates = [i for i, g in enumerate(self.members) if len(g) >= n_way]
        if not candidates:
            raise ValueError(f"no partition has {n_way} clusters with {self.min_size}+ members")
        groups = self.members[candidates[rng.integers(len(candidates))]]
        chosen = rng.choice(len(groups), n_way, replace=False)
        picks = np.stack([rng.choice(groups[c], k_shot + n_query, replace=False) for c in chosen])
        return picks[:, :k_shot], picks[:, k_shot:]
