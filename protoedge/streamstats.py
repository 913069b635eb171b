"""The numbers a clustered stream is judged by, as JSON sections for run.json.

Computed once, by whoever writes the run directory; the report only prints them (so every number
on the page is the one in the JSON). Scores come from protoedge.metrics.
"""
from __future__ import annotations

import numpy as np

from .metrics import clustering_scores


def cluster_table(cluster: np.ndarray, labels: np.ndarray | None = None,
                  class_names: list[str] | None = None) -> list[dict]:
    """One entry per cluster, biggest first: id, size and, with labels, purity and majority class."""
    cluster = np.asarray(cluster)
    ids, sizes = np.unique(cluster, return_counts=True)
    order = np.lexsort((ids, -sizes))
    table = []
    for i in order:
        entry = {"id": int(ids[i]), "size": int(sizes[i])}
        if labels is not None:
            members = np.asarray(labels)[cluster == ids[i]]
            classes, counts = np.unique(members, return_counts=True)
            top = int(np.argmax(counts))
            entry["purity"] = float(counts[top] / len(members))
            majority = int(classes[top])
            entry["majority"] = class_names[majority] if class_names and majority < len(class_names) else majority
        table.append(entry)
    return table


def latency_summary(latency_ms: np.ndarray) -> dict:
    x = np.asarray(latency_ms, dtype=np.float64)
    if x.size == 0:
        return {}
    p50, p90, p99 = np.percentile(x, [50, 90, 99])
    return {"mean": float(x.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99),
            "max": float(x.max()), "images_per_s": float(1000.0 / x.mean()) if x.mean() > 0 else None}


def stream_sections(cluster: np.ndarray, labels: np.ndarray | None = None,
                    class_names: list[str] | None = None, latency_ms: np.ndarray | None = None) -> dict:
    """{"summary": {...}, "clusters": [...], "latency_ms": {...}} for run.json."""
    summary = {"images": int(len(cluster)), "clusters_found": int(len(np.unique(cluster)))}
    if labels is not None:
        scores = clustering_scores(labels, cluster)
        summary.update(clusters_true=scores["clusters_true"], acc=scores["acc"], ari=scores["ari"],
                       nmi=scores["nmi"])
    sections = {"summary": summary, "clusters": cluster_table(cluster, labels, class_names)}
    if latency_ms is not None and len(latency_ms):
        sections["latency_ms"] = latency_summary(latency_ms)
    return sections
