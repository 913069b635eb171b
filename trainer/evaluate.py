"""Scoring an encoder: N-way K-shot episodes and k-means clustering of novel classes.

Embedding happens here (torch); the scoring itself is protoedge.fewshot / protoedge.metrics on
numpy arrays, so these numbers match what export and the runtime compute from ONNX outputs.
"""
from __future__ import annotations

import numpy as np
import torch

from protoedge.fewshot import evaluate_episodes, l2_normalize
from protoedge.metrics import clustering_scores


@torch.no_grad()
def embed(encoder: torch.nn.Module, images: np.ndarray | torch.Tensor, batch: int = 1000,
          device: str | torch.device = "cpu") -> np.ndarray:
    """uint8 [N, C, H, W] -> float32 [N, D] with the encoder in eval mode (running BN statistics)."""
    was_training = encoder.training
    encoder.eval()
    out = []
    for i in range(0, len(images), batch):
        chunk = torch.as_tensor(images[i:i + batch]).to(device)
        out.append(encoder(chunk).float().cpu().numpy())
    encoder.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def fewshot_table(embeddings: np.ndarray, labels: np.ndarray, distance: str,
                  settings=((5, 1), (5, 5), (20, 1), (20, 5)), episodes: int = 1000,
                  n_query: int = 15, refine_steps: int = 0, seed: int = 0) -> dict:
    """{'5w1s': {...acc, ci95...}, ...}; the same seed gives the same episodes for every model."""
    return {f"{n}w{k}s": evaluate_episodes(embeddings, labels, n, k, n_query, episodes, distance,
                                           seed=seed, refine_steps=refine_steps)
            for n, k in settings}


def kmeans_clustering(embeddings: np.ndarray, labels: np.ndarray, distance: str,
                      n_clusters: int | None = None, seed: int = 0, n_init: int = 10) -> dict:
    """k-means (k = number of true classes unless given) scored by Hungarian ACC, NMI and ARI."""
    from sklearn.cluster import KMeans

    x = l2_normalize(embeddings) if distance == "cosine" else embeddings
    k = n_clusters or len(np.unique(labels))
    pred = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(x.astype(np.float64))
    return {"k": k, **clustering_scores(labels, pred)}
