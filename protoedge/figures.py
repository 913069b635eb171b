"""The report's matplotlib figures, each written as a PNG of a fixed pixel size (FIGURE_PX).

Workstation side only (matplotlib is in the [train] extra); the Agg backend, so no display is needed.
Numbers drawn into a figure (percentile lines) are passed in from run.json, never recomputed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

DPI = 100
FIGURE_PX = {"curves": (1000, 420), "projection": (1000, 480), "contingency": (760, 640), "latency": (760, 380)}
TOP_COLOURED = 20  # clusters beyond the 20 largest are drawn grey: more colours are not distinguishable
# Time first: the trainer restarts "step" at every stage, its "elapsed" seconds run on.
_X_KEYS = ("elapsed", "elapsed_s", "time_s", "step", "episode", "iteration", "iter", "epoch")
_X_LABELS = {"elapsed": "training time (s)", "elapsed_s": "training time (s)", "time_s": "time (s)"}


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _figure(name: str, ncols: int = 1):
    w, h = FIGURE_PX[name]
    return _plt().subplots(1, ncols, figsize=(w / DPI, h / DPI), dpi=DPI, squeeze=False)


def _save(fig, path: Path) -> Path:
    # No bbox_inches="tight": it would change the pixel size, which the tests pin down.
    fig.savefig(path, dpi=DPI, format="png")
    _plt().close(fig)
    return path


def _is_loss(key: str) -> bool:
    return "loss" in key.lower()


def _is_accuracy(key: str) -> bool:
    # The trainer logs held-out few-shot accuracy as val_<way>w<shot>s (in %).
    return "acc" in key.lower() or key.lower().startswith("val_")


def _numeric_keys(records: list[dict], wanted) -> list[str]:
    keys = []
    for rec in records:
        for k, v in rec.items():
            if wanted(k) and k not in keys and isinstance(v, (int, float)) and not isinstance(v, bool):
                keys.append(k)
    return keys


def _x_of(records: list[dict]) -> tuple[str, list]:
    key = next((k for k in _X_KEYS if any(k in r for r in records)), None)
    return (key or "record", [r.get(key, i) if key else i for i, r in enumerate(records)])


def training_curves(records: list[dict], path: Path) -> Path:
    """Losses (left) and accuracies (right, e.g. held-out few-shot) against the training step."""
    fig, axes = _figure("curves", 2)
    xname, xs = _x_of(records)
    for ax, wanted, ylabel in ((axes[0, 0], _is_loss, "loss"), (axes[0, 1], _is_accuracy, "accuracy")):
        keys = [k for k in _numeric_keys(records, wanted) if k not in _X_KEYS]
        for k in keys:
            pts = [(x, r[k]) for x, r in zip(xs, records) if isinstance(r.get(k), (int, float))]
            if pts:
                px, py = zip(*pts)
                if ylabel == "accuracy" and max(py) <= 1.0:  # fractions next to percentages
                    py = [100 * v for v in py]
                # Held-out evaluations are sparse: show their points, not just a line.
                ax.plot(px, py, marker="o" if len(pts) < 50 else None, ms=3, lw=1.2, label=k)
        ax.set_xlabel(_X_LABELS.get(xname, xname))
        ax.set_ylabel("accuracy (%)" if ylabel == "accuracy" else ylabel)
        ax.grid(alpha=0.3)
        if keys:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, f"no {ylabel} recorded", ha="center", va="center", transform=ax.transAxes)
    axes[0, 0].set_title("training losses")
    axes[0, 1].set_title("accuracy (val_*: held-out few-shot)")
    fig.tight_layout()
    return _save(fig, path)


def pca_2d(x: np.ndarray) -> np.ndarray:
    """First two principal components (numpy SVD; no extra dependency, deterministic)."""
    x = np.asarray(x, dtype=np.float64)
    x = x - x.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return x @ vt[:2].T


def _colour_by(ax, xy: np.ndarray, groups: np.ndarray, title: str) -> None:
    plt = _plt()
    ids, sizes = np.unique(groups, return_counts=True)
    top = ids[np.lexsort((ids, -sizes))][:TOP_COLOURED]
    rest = ~np.isin(groups, top)
    ax.scatter(xy[rest, 0], xy[rest, 1], s=4, c="#c8c8c8", linewidths=0)
    cmap = plt.get_cmap("tab20")
    for i, g in enumerate(top):
        m = groups == g
        ax.scatter(xy[m, 0], xy[m, 1], s=7, color=cmap(i % 20), linewidths=0)
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])


def projection(embedding: np.ndarray, cluster: np.ndarray, path: Path, labels: np.ndarray | None = None,
               distance: str = "sqeuclidean") -> Path:
    """PCA of the embeddings coloured by discovered cluster (and, with labels, by true class)."""
    x = np.asarray(embedding, dtype=np.float64)
    if distance == "cosine":  # the geometry the runtime clusters in
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    xy = pca_2d(x)
    fig, axes = _figure("projection", 2 if labels is not None else 1)
    _colour_by(axes[0, 0], xy, np.asarray(cluster), "coloured by discovered cluster (largest in colour)")
    if labels is not None:
        _colour_by(axes[0, 1], xy, np.asarray(labels), "coloured by true class (largest in colour)")
    fig.suptitle("embeddings, first two principal components", fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def matched_order(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row and column orders that put the Hungarian matching on the diagonal, unmatched columns last."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(-table)
    by_row = np.argsort(-table[rows, cols], kind="stable")
    rows, cols = rows[by_row], cols[by_row]
    rest_rows = np.setdiff1d(np.arange(table.shape[0]), rows)
    rest_cols = np.setdiff1d(np.arange(table.shape[1]), cols)
    rest_cols = rest_cols[np.argsort(-table[:, rest_cols].sum(0), kind="stable")]
    col_order = np.concatenate([cols, rest_cols])
    # Unmatched classes go below, grouped under the cluster that holds most of their images.
    position = np.argsort(col_order)
    rest_rows = rest_rows[np.argsort(position[table[rest_rows].argmax(1)], kind="stable")]
    return np.concatenate([rows, rest_rows]), col_order


def contingency(table: np.ndarray, path: Path) -> Path:
    """Clusters (columns) against true classes (rows), Hungarian-matched pairs on the diagonal."""
    table = np.asarray(table)
    r, c = matched_order(table)
    fig, axes = _figure("contingency")
    ax = axes[0, 0]
    shown = table[np.ix_(r, c)].astype(float)
    im = ax.imshow(np.where(shown > 0, shown, np.nan), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_facecolor("#f4f4f4")
    ax.set_xlabel("discovered clusters (matched first, then by size)")
    ax.set_ylabel("true classes")
    ax.set_title("contingency: images per (class, cluster); empty cells blank", fontsize=10)
    fig.colorbar(im, ax=ax, label="images")
    fig.tight_layout()
    return _save(fig, path)


def latency_histogram(latency_ms: np.ndarray, path: Path, marks: dict[str, float] | None = None) -> Path:
    """Per-image latency; `marks` {legend text: ms} (p50/p99 from run.json, written as the page
    writes them) are drawn as vertical lines."""
    x = np.asarray(latency_ms, dtype=np.float64)
    fig, axes = _figure("latency")
    ax = axes[0, 0]
    ax.hist(x, bins=60, color="#4878a8")
    for (label, value), style in zip((marks or {}).items(), ("--", ":", "-.", "-")):
        ax.axvline(value, color="#c03030", ls=style, lw=1.2, label=label)
    if marks:
        ax.legend(fontsize=8)
    ax.set_xlabel("latency per image (ms)")
    ax.set_ylabel("images")
    ax.set_yscale("log")
    ax.set_title("per-image latency over the stream", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
