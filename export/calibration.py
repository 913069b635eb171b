"""Distance statistics the runtime needs to decide when a sample starts a new cluster.

Measured without labels: each unlabelled image is seen twice through mild random geometric
changes (the same item seen again: small shift, rotation, scale), then distances between the two
views of one item are compared with distances between views of different items. All numbers are
in the on-device distance of docs/contracts.md (cosine: squared Euclidean of L2-normalised
embeddings, 2 - 2cos; sqeuclidean: squared Euclidean of raw embeddings).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from protoedge.fewshot import l2_normalize

SAME_ITEM_QUANTILES = (0.5, 0.9, 0.95, 0.99)
DIFFERENT_ITEM_QUANTILES = (0.01, 0.05, 0.1, 0.5)
THRESHOLD_RULE = "midpoint of same_item q0.95 and different_item q0.05"


def mild_views(images: np.ndarray, seed: int, rotate_deg: float = 8.0, scale: float = 0.08,
               shift_px: float = 1.5) -> np.ndarray:
    """A second look at each image, as a camera or a re-scan gives it: a small random rotation,
    zoom and shift (one batched affine resample), rounded back to uint8 as a device sees it."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)
    n, _, h, w = images.shape
    u = lambda: 2 * torch.rand(n, generator=gen, dtype=torch.float64) - 1  # uniform in [-1, 1]
    angle = u() * np.deg2rad(rotate_deg)
    zoom = 1 + u() * scale
    tx, ty = u() * shift_px * 2 / w, u() * shift_px * 2 / h  # affine_grid works in [-1, 1] units
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1).float()
    x = torch.from_numpy(images).float()
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    views = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return views.round().clamp(0, 255).to(torch.uint8).numpy()


def device_space(embeddings: np.ndarray, distance: str) -> np.ndarray:
    x = embeddings.astype(np.float64)
    if distance == "cosine":
        return l2_normalize(x)
    if distance == "sqeuclidean":
        return x
    raise ValueError(f"unknown distance {distance!r}")


def _quantiles(values: np.ndarray, qs) -> dict:
    return {str(q): float(v) for q, v in zip(qs, np.quantile(values, qs))}


def distance_calibration(embed: Callable[[np.ndarray], np.ndarray], images: np.ndarray, distance: str,
                         n_items: int = 2000, seed: int = 0) -> dict:
    """Quantiles of same-item and different-item distances, and a suggested new-cluster threshold.

    embed: uint8 images -> embeddings (the exported FP32 model, so the numbers are the device's).
    """
    rng = np.random.default_rng(seed)
    if len(images) < 2:
        raise ValueError("distance calibration needs at least 2 images")
    pick = rng.choice(len(images), min(n_items, len(images)), replace=False)
    items = images[pick]
    a = device_space(embed(mild_views(items, seed)), distance)
    b = device_space(embed(mild_views(items, seed + 1)), distance)
    same = ((a - b) ** 2).sum(1)
    # Every cross pair (view 1 of item i, view 2 of item j != i): n^2 - n values, cheap for n = 2000.
    cross = (a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None]
    different = np.maximum(cross[~np.eye(len(a), dtype=bool)], 0)
    sq = _quantiles(same, SAME_ITEM_QUANTILES)
    dq = _quantiles(different, DIFFERENT_ITEM_QUANTILES)
    threshold = 0.5 * (sq["0.95"] + dq["0.05"])
    return {
        "distance": distance,
        "n_items": int(len(items)),
        "views": "two mild random affine views per item (rotation 8 deg, scale 0.92-1.08, shift 1.5 px)",
        "same_item_quantiles": sq,
        "different_item_quantiles": dq,
        "new_cluster_threshold": float(threshold),
        "threshold_rule": THRESHOLD_RULE,
        # How the threshold splits the measured pairs: share of same-item pairs it would call new,
        # share of different-item pairs it would merge.
        "same_item_above_threshold": float((same > threshold).mean()),
        "different_item_below_threshold": float((different < threshold).mean()),
    }
