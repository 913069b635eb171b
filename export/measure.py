"""Accuracy and ONNX Runtime CPU speed of one exported ONNX file."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from protoedge.fewshot import evaluate_episodes

from .onnx_export import INPUT_NAME, OUTPUT_NAME


def accuracy_5w1s(embeddings: np.ndarray, labels: np.ndarray, distance: str, episodes: int = 1000,
                  seed: int = 0) -> dict:
    """Protocol A's 5-way 1-shot prototype accuracy. The same seed gives every precision variant
    the same episodes, so the differences between variants are paired, not sampling noise."""
    return evaluate_episodes(embeddings, labels, n_way=5, k_shot=1, n_query=15, episodes=episodes,
                             distance=distance, seed=seed)


def cpu_session(path: str | Path, threads: int = 1):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def interleaved_latency(paths: dict, images: np.ndarray, batch: int, repeats: int, threads: int = 1,
                        rounds: int = 10) -> dict:
    """Per-variant session.run wall times at one batch size: median and p99 in ms, images/s at the
    median. Variants take turns in `rounds` blocks, so load from other processes on a shared machine
    hits all of them alike and their ratios stay meaningful."""
    sessions = {p: cpu_session(path, threads) for p, path in paths.items()}
    feed = {INPUT_NAME: np.ascontiguousarray(np.resize(images, (batch, *images.shape[1:])))}
    for s in sessions.values():
        for _ in range(3):  # warm-up: first calls allocate and pick kernels
            s.run([OUTPUT_NAME], feed)
    times = {p: [] for p in paths}
    rounds = max(1, min(rounds, repeats))
    for _ in range(rounds):
        for p, s in sessions.items():
            for _ in range(max(1, repeats // rounds)):
                t0 = time.perf_counter()
                s.run([OUTPUT_NAME], feed)
                times[p].append(time.perf_counter() - t0)
    out = {}
    for p, t in times.items():
        t = np.asarray(t)
        median = float(np.median(t))
        out[p] = {"batch": batch, "threads": threads, "runs": int(len(t)), "median_ms": median * 1e3,
                  "p99_ms": float(np.quantile(t, 0.99)) * 1e3, "images_per_s": batch / median}
    return out
