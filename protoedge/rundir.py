"""The run directory: what a long job (demo, train, bench, cluster) leaves behind for `protoedge report`.

    RUN_DIR/run.json       every number the report prints: {"kind", "name", "created", sections...}
                           (sections are objects of scalars, or lists of such objects, e.g. "clusters")
    RUN_DIR/metrics.jsonl  optional training curves, one JSON object per line ("step" plus numbers)
    RUN_DIR/stream.npz     optional clustered stream, arrays in stream order:
                             images uint8 [N, C, H, W]   cluster int64 [N]
                             labels int64 [N] (optional) embedding float32 [N, D] (optional)
                             latency_ms float32 [N] (optional, per-image latency)
    RUN_DIR/report.html    written by the report (self-contained), figures also in RUN_DIR/figures/

numpy + json only, so the torch-free runtime can write a run directory too. No pickle.
"""
from __future__ import annotations

import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

RUN_JSON, METRICS, STREAM, REPORT, FIGURES = "run.json", "metrics.jsonl", "stream.npz", "report.html", "figures"
FORMAT = 1
STREAM_REQUIRED = ("images", "cluster")
STREAM_OPTIONAL = ("labels", "embedding", "latency_ms")


class RunDirError(ValueError):
    """A run directory is missing or malformed; the message names the file."""


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _plain(value):
    """numpy scalars/arrays -> JSON types; NaN/inf -> None (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def new_run(kind: str, name: str | None = None, **sections) -> dict:
    created = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"format": FORMAT, "kind": kind, "name": name or kind, "created": created, **sections}


def write_run_json(run_dir: str | os.PathLike, run: dict) -> Path:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / RUN_JSON
    _atomic_write(path, (json.dumps(_plain(run), indent=2, allow_nan=False) + "\n").encode())
    return path


def read_run_json(run_dir: str | os.PathLike) -> dict:
    path = Path(run_dir) / RUN_JSON
    if not Path(run_dir).is_dir():
        raise RunDirError(f"{run_dir}: no such run directory")
    if not path.is_file():
        raise RunDirError(f"{path}: missing; a run directory needs run.json (see `protoedge report --help`)")
    try:
        run = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunDirError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(run, dict):
        raise RunDirError(f"{path}: must hold a JSON object, not {type(run).__name__}")
    return run


def append_metrics(run_dir: str | os.PathLike, record: dict) -> None:
    with open(Path(run_dir) / METRICS, "a") as f:
        f.write(json.dumps(_plain(record)) + "\n")


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The training curves, or [] when the run has none."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise RunDirError(f"{path}:{n}: not valid JSON ({e})") from None
        if isinstance(rec, dict):
            records.append(rec)
    return records


def write_stream(run_dir: str | os.PathLike, images: np.ndarray, cluster: np.ndarray, **optional) -> Path:
    unknown = set(optional) - set(STREAM_OPTIONAL)
    if unknown:
        raise ValueError(f"unknown stream arrays {sorted(unknown)}; known: {STREAM_OPTIONAL}")
    arrays = {"images": np.asarray(images, np.uint8), "cluster": np.asarray(cluster, np.int64)}
    for key, value in optional.items():
        if value is not None:
            arrays[key] = np.asarray(value)
    for key, value in arrays.items():
        if len(value) != len(arrays["images"]):
            raise ValueError(f"stream array {key!r} has {len(value)} rows for {len(arrays['images'])} images")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / STREAM
    tmp = path.with_name("stream.tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)
    return path


def read_stream(run_dir: str | os.PathLike) -> dict[str, np.ndarray] | None:
    """The clustered stream's arrays, or None when the run clustered nothing."""
    path = Path(run_dir) / STREAM
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError) as e:
        raise RunDirError(f"{path}: not a readable .npz file ({e})") from None
    missing = [k for k in STREAM_REQUIRED if k not in arrays]
    if missing:
        raise RunDirError(f"{path}: missing arrays {missing}")
    images = arrays["images"]
    if images.dtype != np.uint8 or images.ndim != 4:
        raise RunDirError(f"{path}: images must be uint8 [N, C, H, W], got {images.dtype} {list(images.shape)}")
    for key, value in arrays.items():
        if len(value) != len(images):
            raise RunDirError(f"{path}: {key!r} has {len(value)} rows for {len(images)} images")
    return arrays
