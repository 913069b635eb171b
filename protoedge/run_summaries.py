"""run.json for the outputs of other commands, so `protoedge report` can picture them too:
a training folder (`protoedge train --out DIR`: checkpoint.safetensors + metrics.jsonl) and a
benchmark's result JSON (benchmarks/results/NAME.json). Numbers are copied, never recomputed."""
from __future__ import annotations

import json
import struct
from pathlib import Path

from . import rundir
from .rundir import RunDirError


def checkpoint_meta(path: Path) -> dict:
    """The 'protoedge' metadata of a safetensors checkpoint, read from its JSON header alone
    (8-byte little-endian length, then JSON), so no torch and no tensor is loaded."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100_000_000:
                raise ValueError("header length is implausible")
            header = json.loads(f.read(length))
        return json.loads(header.get("__metadata__", {}).get("protoedge", "{}"))
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as e:
        raise RunDirError(f"{path}: cannot read the checkpoint's metadata ({e})") from None


def training_run(out_dir, checkpoint: str = "checkpoint.safetensors") -> Path:
    """Write OUT_DIR/run.json for a `protoedge train` folder; returns its path."""
    out_dir = Path(out_dir)
    meta = checkpoint_meta(out_dir / checkpoint)
    config = meta.get("config", {})
    run = rundir.new_run(
        "train", out_dir.name,
        training={"final": meta.get("metrics", {}), "distance": meta.get("distance"),
                  "temperature": meta.get("temperature"), "code_version": meta.get("code_version"),
                  "data_fingerprint": meta.get("data_fingerprint")},
        settings=config,
    )
    return rundir.write_run_json(out_dir, run)


def bench_run(result_json, run_dir) -> Path:
    """Write RUN_DIR/run.json holding a benchmark's result JSON (its sections become tables)."""
    result_json = Path(result_json)
    try:
        results = json.loads(result_json.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunDirError(f"{result_json}: not a readable JSON result ({e})") from None
    if not isinstance(results, dict):
        results = {"results": results}
    sections = {k: v for k, v in results.items() if k not in ("kind", "name", "created", "format")}
    run = rundir.new_run("bench", result_json.stem, source=str(result_json), **sections)
    return rundir.write_run_json(run_dir, run)
