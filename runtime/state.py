"""Crash-consistent generations of clusterer state: ``gen-000123.npz`` (arrays) + ``gen-000123.json``
(settings, labels, and the sha256 of the npz).

A generation is written npz first, JSON last, each through a temporary file in the same folder,
fsync, os.replace and an fsync of the folder, so the JSON is the commit record: a reader never
sees a JSON whose arrays are missing or torn. Loading takes the newest generation that verifies
and falls back, with a warning, to older ones. No pickle: arrays load with allow_pickle=False.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
from pathlib import Path

import numpy as np

from .errors import StateError

log = logging.getLogger(__name__)

SCHEMA = "protoedge.state/1"
_GEN = re.compile(r"^gen-(\d{6,})\.json$")


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; not possible (nor needed) on every platform.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    _fsync_dir(path.parent)


@contextlib.contextmanager
def _writer_lock(state_dir: Path):
    """One writer per folder at a time (the CLI and the daemon may share one)."""
    try:
        import fcntl
    except ImportError:  # non-POSIX: rely on the atomic renames alone
        yield
        return
    with open(state_dir / ".lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def generations(state_dir: Path) -> list[int]:
    """Generation numbers that have a committed JSON, newest first."""
    if not state_dir.is_dir():
        return []
    found = (_GEN.match(p.name) for p in state_dir.iterdir())
    return sorted((int(m.group(1)) for m in found if m), reverse=True)


def _paths(state_dir: Path, gen: int) -> tuple[Path, Path]:
    stem = state_dir / f"gen-{gen:06d}"
    return stem.with_suffix(".npz"), stem.with_suffix(".json")


def save_generation(state_dir, arrays: dict[str, np.ndarray], meta: dict, keep: int = 3) -> Path:
    """Write a new generation and prune all but the ``keep`` newest. Returns the JSON path."""
    if keep < 1:
        raise ValueError("keep must be at least 1")
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    blob = buf.getvalue()
    with _writer_lock(state_dir):
        gens = generations(state_dir)
        gen = (gens[0] + 1) if gens else 1
        npz_path, json_path = _paths(state_dir, gen)
        atomic_write(npz_path, blob)
        record = {"schema": SCHEMA, "generation": gen, "npz": npz_path.name,
                  "npz_sha256": hashlib.sha256(blob).hexdigest(), "npz_bytes": len(blob), "meta": meta}
        atomic_write(json_path, json.dumps(record, indent=1, sort_keys=True).encode())
        for old in generations(state_dir)[keep:]:
            for p in _paths(state_dir, old)[::-1]:  # JSON first: an old generation is never half-valid
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        _fsync_dir(state_dir)
    return json_path


def _read_generation(state_dir: Path, gen: int) -> tuple[dict[str, np.ndarray], dict]:
    npz_path, json_path = _paths(state_dir, gen)
    try:
        record = json.loads(json_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StateError(f"{json_path}: unreadable ({e})") from None
    if not isinstance(record, dict) or record.get("schema") != SCHEMA or "meta" not in record:
        raise StateError(f"{json_path}: not a {SCHEMA} record")
    try:
        blob = npz_path.read_bytes()
    except OSError as e:
        raise StateError(f"{npz_path}: unreadable ({e})") from None
    if hashlib.sha256(blob).hexdigest() != record.get("npz_sha256"):
        raise StateError(f"{npz_path}: sha256 does not match {json_path.name} (torn or altered file)")
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError) as e:
        raise StateError(f"{npz_path}: not a readable npz ({e})") from None
    return arrays, record["meta"]


def load_latest(state_dir) -> tuple[dict[str, np.ndarray], dict, int] | None:
    """(arrays, meta, generation) of the newest generation that verifies, or None if the folder
    holds no generation. Raises StateError when generations exist but none verifies."""
    state_dir = Path(state_dir)
    gens = generations(state_dir)
    errors = []
    for gen in gens:
        try:
            arrays, meta = _read_generation(state_dir, gen)
        except StateError as e:
            log.warning("state generation %d skipped: %s", gen, e)
            errors.append(str(e))
            continue
        if errors:
            log.warning("loaded older state generation %d of %s because newer ones are corrupt",
                        gen, state_dir)
        return arrays, meta, gen
    if errors:
        raise StateError(f"{state_dir}: no readable state generation: " + "; ".join(errors))
    return None
