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


def latency(path: str | Path, images: np.ndarray, batch_size: int, repeats: int = 50, warmup: int = 5,
            threads: int = 1) -> dict:
    """Per-call wall time of session.run at one batch size: median and p99 in ms, and images/s at
    the median."""
    session = cpu_session(path, threads)
    reps = int(np.ceil(batch_size / len(images)))
    batch = np.ascontiguousarray(np.concatenate([images] * reps)[:batch_size])
    feed = {INPUT_NAME: batch}
    for _ in range(warmup):
        session.run([OUTPUT_NAME], feed)
    times = np.empty(repeats)
    for i in range(repeats):
        t0 = time.perf_counter()
        session.run([OUTPUT_NAME], feed)
        times[i] = time.perf_counter() - t0
    median = float(np.median(times))
    return {"batch": batch_size, "threads": threads, "repeats": repeats,
            "median_ms": median * 1e3, "p99_ms": float(np.quantile(times, 0.99)) * 1e3,
            "images_per_s": batch_size / median}
