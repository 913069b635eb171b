"""What `protoedge cluster` does: read image batches from files or stdin, cluster them, write JSONL.

Every input is read and checked before the first sample is learned, and the state is saved only
after the whole run succeeded, so a bad file never leaves a half-updated state behind. Arrays on
stdin are checked one by one as they arrive; an invalid one stops the run before it is learned
and nothing is saved.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

import numpy as np

from protoedge.datasets import DataError, load_images

from .errors import InputError


@dataclass
class Batch:
    images: np.ndarray
    labels: np.ndarray | None
    source: str


class _Prefixed:
    """A read-only view of a stream with some bytes put back in front. Not a real file object,
    which keeps numpy off its fromfile() path (that asks a pipe for its position)."""

    def __init__(self, head: bytes, stream):
        self.head, self.stream = head, stream

    def read(self, n: int = -1) -> bytes:
        head, self.head = self.head, b""
        if n is None or n < 0:
            return head + self.stream.read()
        return head + self.stream.read(n - len(head)) if n > len(head) else head[:n]


def read_stdin_arrays(stream: IO[bytes]) -> Iterator[np.ndarray]:
    """Consecutive .npy arrays (np.save output) until end of input."""
    while True:
        head = stream.read(1)
        if not head:
            return
        try:
            # read_array, not np.load: np.load seeks back after the magic, which a pipe cannot do
            arr = np.lib.format.read_array(_Prefixed(head, stream), allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise InputError(f"stdin: not a stream of .npy arrays ({e})") from None
        yield arr


def load_inputs(paths: list[str], size: tuple[int, int], channels: int, with_labels: bool) -> list[Batch]:
    batches = []
    for p in paths:
        try:
            s = load_images(p, size=size, channels=channels)
        except DataError as e:
            raise InputError(str(e)) from None
        if with_labels and s.labels is None:
            raise InputError(f"{p}: --labels needs labelled input (an .npz with 'labels'/'y', "
                             "or a folder with one sub-folder per class)")
        batches.append(Batch(s.images, s.labels, str(p)))
    return batches


def read_labels_file(path: Path) -> np.ndarray:
    try:
        if path.suffix == ".npy":
            y = np.load(path, allow_pickle=False)
        else:
            y = np.array([int(v) for v in path.read_text().split()])
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read labels ({e})") from None
    return np.asarray(y).reshape(-1).astype(np.int64)


def stdin_batches(stream, size, channels) -> Iterator[Batch]:
    from protoedge.datasets import _fit_array  # the same [N,H,W]/[N,C,H,W]/[N,H,W,C] handling as files

    for i, arr in enumerate(read_stdin_arrays(stream)):
        try:
            images = _fit_array(arr, f"stdin[{i}]", size, channels)
        except DataError as e:
            raise InputError(str(e)) from None
        yield Batch(images, None, f"stdin[{i}]")


def run_cluster(rt, batches, out: IO[str], batch_size: int, progress=None) -> dict:
    """Cluster every batch in order; write one JSON line per sample; return ids and timing."""
    ids, index, t0 = [], 0, time.perf_counter()
    for b in batches:
        images = rt.validate(b.images)
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            for k, a in enumerate(rt.cluster(chunk)):
                rec = a.to_dict()
                rec = {"index": index, "source": b.source, "item": start + k, **rec}
                out.write(json.dumps(rec) + "\n")
                ids.append(a.cluster_id)
                index += 1
            if progress is not None:
                progress.update(len(chunk))
    out.flush()
    return {"ids": np.array(ids, np.int64), "seconds": time.perf_counter() - t0}


def tune_threshold(rt, path, size, channels, max_images: int = 5000) -> dict:
    """Pick the threshold on unlabelled images (threshold_search) and give the Runtime a fresh
    clusterer with it. Refused on a resumed state, whose clusters were made with another one."""
    from .clustering import StreamClusterer
    from .threshold_search import select_threshold

    if rt.clusterer.n_seen or rt.clusterer.n_clusters:  # a state of labelled examples only counts too
        raise InputError("--tune-threshold starts a new clusterer; use a fresh --state folder")
    images = load_inputs([str(path)], size, channels, with_labels=False)[0].images
    images = rt.validate(images[np.random.default_rng(0).permutation(len(images))[:max_images]])
    params = {k: v for k, v in rt.clusterer.get_params().items()
              if k not in ("dim", "distance", "threshold", "merge_threshold", "max_spread")}
    make = lambda th: StreamClusterer.from_bundle(rt.bundle, threshold=th, **params)
    chosen = select_threshold(make, [rt.embed(images)], rt.clusterer.threshold)
    rt.clusterer = make(chosen["threshold"])
    return chosen


def report_scores(rt, ids: np.ndarray, labels: np.ndarray) -> dict:
    from protoedge.metrics import clustering_scores

    if len(labels) != len(ids):
        raise InputError(f"{len(labels)} labels for {len(ids)} images")
    at_arrival = clustering_scores(labels, ids)
    # Ids of clusters merged later point at their survivor: the partition the model ends with.
    resolved = clustering_scores(labels, np.array([rt.clusterer.resolve(int(i)) for i in ids]))
    return {"at_arrival": at_arrival, "resolved": resolved}


def format_scores(scores: dict) -> str:
    lines = []
    for name, s in scores.items():
        lines.append(f"{name:10s} ACC {100 * s['acc']:.1f}%  ARI {s['ari']:.3f}  NMI {s['nmi']:.3f}  "
                     f"clusters {s['clusters_found']} (true {s['clusters_true']})")
    return "\n".join(lines)


def stdin_binary():
    return sys.stdin.buffer
