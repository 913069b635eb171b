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


# Silhouette at or above which a partition shows real structure (Kaufman & Rousseeuw 1990: below
# 0.25 "no substantial structure has been found"). Measured on unlabelled training images: MNIST
# (10 broad classes) reaches 0.28 at its best threshold; Omniglot pools (1,200 classes, a few
# drawings each in 5,000 images) stay at or below 0.13 with every encoder tried, where the
# calibration rule is the better choice.
STRUCTURE_SILHOUETTE = 0.25


MERGE_FRACTIONS = (0.25, 0.5)  # merge_threshold / threshold tried by the stream search


def cluster_threshold(embed: Callable[[np.ndarray], np.ndarray], images: np.ndarray, calibration: dict,
                      temperature: float, n_images: int = 5000, seed: int = 0, rule_factor: float | None = None) -> dict:
    """The runtime's default clustering settings for this bundle, chosen without labels.

    Two candidates: the calibration rule (runtime.clustering.rule_threshold, fitted on
    Omniglot-like data: many classes of a few drawings each) and the label-free stream search of
    runtime.threshold_search: the runtime clusterer run over up to ``n_images`` unlabelled images
    at multiples of the rule and with merge_threshold at MERGE_FRACTIONS of the threshold; the
    setting whose stream partition (as assigned on arrival) has the best silhouette. The search
    wins when that partition shows real structure (silhouette >= STRUCTURE_SILHOUETTE), as on
    data with a few broad classes (MNIST), where the rule cuts every class into many clusters; it
    then also sets the merge threshold. Otherwise the rule stands and the runtime's default merge
    threshold applies.
    rule_factor: the rule's multiple of the midpoint (default: the runtime's RULE_FACTOR).
    """
    from protoedge.runtime.clustering import RULE_FACTOR, StreamClusterer, rule_threshold
    from protoedge.runtime.threshold_search import select_threshold

    distance = calibration["distance"]
    rule_factor = RULE_FACTOR if rule_factor is None else rule_factor
    rule = rule_threshold(calibration, rule_factor)
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(images), min(n_images, len(images)), replace=False)
    emb = embed(images[pick])
    dim = int(emb.shape[1])
    searches = {}
    for mf in MERGE_FRACTIONS:
        make = lambda th, mf=mf: StreamClusterer(dim, th, distance=distance, temperature=temperature,
                                                 merge_threshold=mf * th)
        sel = select_threshold(make, [emb], rule, seed=seed)
        sel["silhouette"] = sel["table"][f"{sel['factor']:g}"]["silhouette"]
        searches[mf] = sel
    mf = max(searches, key=lambda m: searches[m]["silhouette"])
    best = searches[mf]
    structured = best["silhouette"] >= STRUCTURE_SILHOUETTE
    out = {
        "value": float(best["threshold"] if structured else rule),
        "chosen_by": "stream silhouette" if structured else "calibration rule",
        "rule_threshold": float(rule),
        "rule_factor": float(rule_factor),
        "search": {"images": int(len(pick)), "best_factor": best["factor"], "best_threshold": best["threshold"],
                   "best_merge_fraction": mf, "best_silhouette": best["silhouette"],
                   "silhouette_by_merge_fraction_and_factor": {
                       f"{m:g}": {f: v["silhouette"] for f, v in sel["table"].items()} for m, sel in searches.items()},
                   "clusters_by_factor": {f: v["clusters"] for f, v in best["table"].items()}},
        "rule": (f"the stream search's setting if its best silhouette >= {STRUCTURE_SILHOUETTE} "
                 "(structure found), else the calibration rule"),
    }
    if structured:
        out["merge_threshold"] = float(mf * best["threshold"])
    return out
