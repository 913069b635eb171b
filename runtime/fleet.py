"""Fleets: a device's cluster state as one portable file, and one state merged from several devices.

* ``export_state(state_dir, out)`` writes the newest verified state generation to a single ``.npz``
  file: the generation's arrays plus a JSON header (the state's settings, model identity, labels, and
  the dtype, shape and sha256 of every array). No pickle; written atomically with state.py's writer.
* ``read_state(path)`` reads a state folder, a daemon's state folder (its newest snapshot) or such a
  file, and checks that it rebuilds into a valid StreamClusterer before anything uses it.
* ``import_state(file, state_dir)`` adds the file's state as the newest generation of ``state_dir``;
  older generations stay as the fallback, so a bad import is undone by deleting one generation.
* ``merge_states(states)`` folds several devices' states into one that can be pushed back to all of
  them: clusters are matched across devices one-to-one by prototype distance, matched clusters become
  their count-weighted mean, unmatched ones are kept, and labels follow the clusterer's own rules
  (see ``merge_states``). States learned with different models or embedding spaces are refused.

numpy only, like the rest of the device runtime: a workstation merges with the same code a device
runs.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .clustering import STATE_FORMAT, StreamClusterer
from .errors import StateError
from .state import SCHEMA as STATE_SCHEMA
from .state import atomic_write, generations, load_latest, save_generation

FILE_SCHEMA = "protoedge.fleet-state/1"
HEADER = "__fleet__"  # npz member holding the JSON header as uint8 bytes
# A state of 1,000 clusters of D=64 is ~1 MB; refuse files far beyond any real state (zip bombs).
MAX_FILE_BYTES = 256 * 1024**2
MAX_MEMBERS = 64
# What a state must agree on to be merged: the model identity saved with it and the embedding space.
_SPACE = ("dim", "distance")


@dataclass
class PortableState:
    """One clusterer state as saved by StreamClusterer.save: arrays + meta, and where it came from."""
    arrays: dict[str, np.ndarray]
    meta: dict
    source: str
    generation: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def params(self) -> dict:
        return self.meta["params"]

    @property
    def model(self) -> dict:
        return self.meta.get("model") or {}

    @property
    def labels(self) -> list[str | None]:
        return [None if v is None else str(v) for v in self.meta["labels"]]  # as the clusterer reads them

    def clusterer(self) -> StreamClusterer:
        """The state as a live clusterer; StateError if it is not a valid one."""
        return _rebuild(self.arrays, self.meta, self.source)

    def summary(self) -> dict:
        counts = np.asarray(self.arrays["counts"], np.float64)
        return {"source": self.source, "generation": self.generation, "model": self.model,
                "dim": self.params.get("dim"), "distance": self.params.get("distance"),
                "threshold": self.params.get("threshold"), "clusters": int(len(counts)),
                "labelled": sorted(str(v) for v in self.labels if v is not None),
                "samples_seen": int(self.meta.get("step", 0)), "total_count": float(counts.sum()),
                **({"fleet_merge": self.meta["fleet"]} if "fleet" in self.meta else {})}


def _rebuild(arrays: dict, meta: dict, where: str) -> StreamClusterer:
    """Build a clusterer exactly as StreamClusterer.load does, so a state is checked by the same
    rules before it is written anywhere (the clusterer owns its format; this only reuses it)."""
    try:
        if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else None
            raise StateError(f"state format {found!r}, expected {STATE_FORMAT}")
        obj = StreamClusterer(model=meta.get("model"), **meta["params"])
        obj._restore(arrays, meta)
        names = [str(v) for v in meta["labels"] if v is not None]
        if len(set(names)) != len(names):
            raise StateError("two clusters carry the same label (a label names one cluster)")
    except StateError as e:
        raise StateError(f"{where}: {e}") from None
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise StateError(f"{where}: does not hold a valid clusterer state ({type(e).__name__}: {e})") from None
    return obj


# ----------------------------------------------------------------------------- reading states

def read_state(path) -> PortableState:
    """A verified state from a state folder (newest generation that verifies), a daemon's state
    folder (its newest snapshot) or an exported file."""
    path = Path(path)
    if path.is_file():
        return read_state_file(path)
    if not path.is_dir():
        raise StateError(f"{path}: no such state folder or state file")
    notes = []
    folder = path
    if not generations(path) and (path / "snapshots").is_dir():
        folder = _newest_snapshot(path)
        notes.append(f"daemon state: read snapshot {folder.name}; updates logged after it are not "
                     "included (ask the daemon for a snapshot first)")
    found = load_latest(folder)
    if found is None:
        raise StateError(f"{path}: holds no saved state")
    arrays, meta, gen = found
    if gen != generations(folder)[0]:
        notes.append(f"newest generation is corrupt; used generation {gen}")
    state = PortableState(arrays, meta, str(path), gen, notes)
    state.clusterer()
    return state


def _newest_snapshot(root: Path) -> Path:
    snaps = []
    for p in (root / "snapshots").glob("snap-*"):
        try:
            snaps.append((int(p.name[len("snap-"):]), p))
        except ValueError:
            continue
    if not snaps:
        raise StateError(f"{root}: a daemon state folder without snapshots holds no saved state")
    return max(snaps)[1]


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def write_state_file(state: PortableState, out) -> Path:
    """One .npz: every array of the state plus the JSON header; atomic (temp file + rename)."""
    out = Path(out)
    if HEADER in state.arrays:
        raise StateError(f"{state.source}: array name {HEADER!r} is reserved")
    header = {"schema": FILE_SCHEMA, "state_schema": STATE_SCHEMA, "exported_unix": time.time(),
              "source_generation": state.generation, "meta": state.meta,
              "arrays": {k: {"dtype": str(v.dtype), "shape": list(v.shape), "sha256": _digest(v)}
                         for k, v in state.arrays.items()}}
    raw = np.frombuffer(json.dumps(header, sort_keys=True).encode(), np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **state.arrays, **{HEADER: raw})
    if out.is_dir():
        raise StateError(f"{out}: is a folder; give a file name for the exported state")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, buf.getvalue())
    return out


def read_state_file(path) -> PortableState:
    """An exported state, verified member by member; StateError names what is wrong."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise StateError(f"{path}: not an exported protoedge state ({e})") from None
    if len(infos) > MAX_MEMBERS or sum(i.file_size for i in infos) > MAX_FILE_BYTES:
        raise StateError(f"{path}: more than {MAX_MEMBERS} members or {MAX_FILE_BYTES} bytes; not a state")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, KeyError) as e:
        raise StateError(f"{path}: corrupt or truncated state file ({e})") from None
    raw = arrays.pop(HEADER, None)
    if raw is None or raw.dtype != np.uint8 or raw.ndim != 1:
        raise StateError(f"{path}: no {HEADER} header; not an exported protoedge state")
    try:
        header = json.loads(raw.tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StateError(f"{path}: unreadable header ({e})") from None
    if not isinstance(header, dict) or header.get("schema") != FILE_SCHEMA:
        raise StateError(f"{path}: header schema {header.get('schema') if isinstance(header, dict) else None!r}, "
                         f"expected {FILE_SCHEMA}")
    listed = header.get("arrays")
    if not isinstance(listed, dict) or set(listed) != set(arrays):
        raise StateError(f"{path}: arrays {sorted(arrays)} do not match the header's list")
    for name, a in arrays.items():
        want = listed[name]
        if not isinstance(want, dict) or [str(a.dtype), list(a.shape), _digest(a)] != \
                [want.get("dtype"), want.get("shape"), want.get("sha256")]:
            raise StateError(f"{path}: array {name!r} does not match its recorded dtype/shape/sha256 "
                             "(altered or damaged file)")
    state = PortableState(arrays, header.get("meta"), str(path), header.get("source_generation"))
    state.clusterer()
    return state


# ----------------------------------------------------------------------------- export / import

def export_state(state_dir, out) -> PortableState:
    """Write the newest verified state of ``state_dir`` to the file ``out``; returns what was written."""
    if Path(state_dir).is_file():
        raise StateError(f"{state_dir}: is already a file; export reads a state folder")
    state = read_state(state_dir)
    write_state_file(state, out)
    return state


def check_same_model(a: PortableState, b: PortableState, what: str = "states") -> None:
    """Refuse to combine states whose embeddings are not comparable (other model or space)."""
    model_a, name_a = a.model, a.source
    space_a, space_b = [a.params.get(k) for k in _SPACE], [b.params.get(k) for k in _SPACE]
    if space_a != space_b:
        raise StateError(f"{what} live in different embedding spaces: {name_a} has dim/distance {space_a}, "
                         f"{b.source} has {space_b}")
    if model_a != b.model:
        diff = sorted(k for k in set(model_a) | set(b.model) if model_a.get(k) != b.model.get(k))
        raise StateError(f"{what} were learned with different models ({', '.join(diff)} differ: "
                         f"{name_a} {_short(model_a)}, {b.source} {_short(b.model)}); their embeddings "
                         "are not comparable")


def _short(model: dict) -> str:
    if not model:
        return "(no model recorded)"
    sha = str(model.get("weights_sha256") or "")[:12]
    return f"{model.get('name')} {model.get('version')} sha256 {sha}..."


def import_state(path, state_dir, keep: int = 3, force: bool = False) -> tuple[Path, PortableState]:
    """Add the state in ``path`` (file or folder) as the newest generation of ``state_dir``.

    Refuses, unless ``force``, when ``state_dir`` already holds a state of another model: the
    device's runtime would then refuse to start with its bundle. Nothing is written on refusal."""
    state = read_state(path)
    state_dir = Path(state_dir)
    if state_dir.exists() and not state_dir.is_dir():
        raise StateError(f"{state_dir}: is a file, not a state folder")
    if (state_dir / "snapshots").is_dir() or (state_dir / "log").is_dir():
        raise StateError(f"{state_dir}: is a daemon state folder (snapshots + update log); importing into "
                         "it is not supported: import into a fresh folder and start the daemon on that")
    if generations(state_dir) and not force:
        current = read_state(state_dir)
        check_same_model(current, state, what="the imported and the existing state")
    return save_generation(state_dir, state.arrays, state.meta, keep=keep), state


# ----------------------------------------------------------------------------- merging

@dataclass
class MergeReport:
    sources: list[str]
    clusters_in: list[int]
    clusters_out: int
    matched: int                     # cross-device pairs joined by distance
    joined_by_label: int             # pairs joined because they carry the same label
    label_conflicts: int             # near pairs kept apart because their labels differ
    dropped: int                     # lowest-count unlabelled clusters dropped to fit max_clusters
    match_threshold: float
    id_map: list[dict[int, int]]     # per source: old cluster id -> merged cluster id
    repaired: dict = field(default_factory=dict)  # the repair over the devices' memories: counts

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["id_map"] = [{str(k): v for k, v in m.items()} for m in self.id_map]
        return d


def _directions(means: np.ndarray, distance: str) -> np.ndarray:
    if distance != "cosine":
        return means
    norms = np.linalg.norm(means, axis=1, keepdims=True)
    return means / np.maximum(norms, 1e-30)


def _distances(a: np.ndarray, b: np.ndarray, distance: str) -> np.ndarray:
    """Device distance between prototypes (docs/contracts.md): 2 - 2cos, or squared Euclidean."""
    a, b = _directions(a, distance).astype(np.float64), _directions(b, distance).astype(np.float64)
    d = (a * a).sum(1)[:, None] - 2.0 * a @ b.T + (b * b).sum(1)[None]
    return np.maximum(d, 0.0)


def merge_states(states: list[PortableState], match_threshold: float | None = None,
                 max_clusters: int | None = None) -> tuple[PortableState, MergeReport]:
    """One state from several devices' states (folded in the order given).

    Matching, per incoming state, one-to-one against the clusters merged so far (a device's own
    clusters are already distinct by its own rules, so two of them never join each other here):

    * clusters carrying the same label are joined whatever their distance (a label names one
      cluster, as ``StreamClusterer.label`` does on a device);
    * clusters with different labels are never joined (as the clusterer's merge refuses);
    * the remaining pairs are joined greedily, closest first, while their prototype distance is at
      most ``match_threshold`` (default: the first state's ``merge_threshold``, the distance below
      which the clusterer itself merges two prototypes; looser matching, up to the new-cluster
      ``threshold``, merged worse on Omniglot streams: README, Fleets).

    A joined cluster's prototype is the count-weighted mean of its parts (the clusterer's merge
    rule), counts and samples seen add up, a label is kept when either part has one. Settings come
    from the first state. Clusters get new ids 0..K-1; ``report.id_map`` says where each old id went.
    """
    if not states:
        raise StateError("merge needs at least one state")
    first = states[0]
    for s in states[1:]:
        check_same_model(first, s, what="the states to merge")
    params = dict(first.params)
    if max_clusters is not None:
        params["max_clusters"] = int(max_clusters)
    tau = float(params["merge_threshold"] if match_threshold is None else match_threshold)
    if not (math.isfinite(tau) and tau >= 0):
        raise StateError(f"match threshold must be a number >= 0, not {match_threshold!r}")
    distance, dim = params["distance"], int(params["dim"])

    sums = np.zeros((0, dim), np.float64)
    counts, seen, created, last = [], [], [], []
    labels: list[str | None] = []
    id_map: list[dict[int, int]] = []
    matched = by_label = conflicts = 0
    for s in states:
        means = np.asarray(s.arrays["means"], np.float64)
        c_in = np.asarray(s.arrays["counts"], np.float64)
        ids_in = [int(v) for v in s.arrays["ids"]]
        current = sums / np.asarray(counts, np.float64)[:, None] if counts else sums  # counts are > 0
        pairs = _match(current, labels, means, s.labels, distance, tau)
        by_label += pairs.by_label
        conflicts += pairs.conflicts
        matched += len(pairs.pairs) - pairs.by_label
        target = dict((j, i) for i, j in pairs.pairs)
        mapping = {}
        for j in range(len(means)):
            i = target.get(j)
            if i is None:  # unmatched: a cluster of its own in the merged state
                i = len(counts)
                sums = np.vstack([sums, np.zeros((1, dim))])
                counts.append(0.0); seen.append(0); labels.append(None)
                created.append(int(s.arrays["created"][j])); last.append(int(s.arrays["last_seen"][j]))
            sums[i] += means[j] * c_in[j]
            counts[i] += float(c_in[j])
            seen[i] += int(s.arrays["seen"][j])
            created[i] = min(created[i], int(s.arrays["created"][j]))
            last[i] = max(last[i], int(s.arrays["last_seen"][j]))
            labels[i] = labels[i] if labels[i] is not None else s.labels[j]
            mapping[ids_in[j]] = i
        id_map.append(mapping)

    keep, dropped = _fit_cap(np.asarray(counts), labels, int(params["max_clusters"]))
    new_id = {int(old): new for new, old in enumerate(keep)}
    id_map = [{k: new_id[v] for k, v in m.items() if v in new_id} for m in id_map]
    counts_out = np.asarray(counts, np.float64)[keep]
    arrays = {"means": (sums[keep] / counts_out[:, None]).astype(np.float32), "counts": counts_out,
              "seen": np.asarray(seen, np.int64)[keep], "created": np.asarray(created, np.int64)[keep],
              "last_seen": np.asarray(last, np.int64)[keep], "ids": np.arange(len(keep), dtype=np.int64)}
    meta = {"format": STATE_FORMAT, "params": params, "model": first.model,
            "labels": [labels[i] for i in keep],
            # device steps are not comparable; the largest keeps every last_seen <= step
            "step": max(int(s.meta.get("step", 0)) for s in states), "next_id": len(keep),
            "aliases": {}, "stats": {}}
    # The one-to-one matching sees prototypes only: a class that one device split in two and the
    # other kept whole keeps a fragment of its own, and a near pair just beyond the threshold stays
    # two clusters. The devices' remembered samples (their repair memories) settle such cases as
    # the clusterer's own repair does on a device, with the same split, move and merge rules (10
    # random 30-class streams, every class on both devices: merged ACC 0.787 -> 0.844, 0.016 above
    # the better device on average instead of 0.042 below; disjoint classes 0.883 -> 0.877; README,
    # Fleets; benchmarks/results/fleet.md).
    clusterer = _rebuild(arrays, meta, "merged")
    windows = [_window(s, m) for s, m in zip(states, id_map)]
    x = np.concatenate([w[0] for w in windows]) if windows else np.zeros((0, dim), np.float32)
    repaired = {"split": 0, "merged": 0, "dissolved": 0}
    if len(x) >= 2:  # states saved without a memory (or before it was saved) have none to give
        repaired = clusterer.refine(x, np.concatenate([w[1] for w in windows]),
                                    np.concatenate([w[2] for w in windows]))
    arrays, meta = clusterer.state()
    renumber = {int(old): new for new, old in enumerate(arrays["ids"])}  # ids 0..K-1 again
    arrays["ids"] = np.arange(len(renumber), dtype=np.int64)
    id_map = [{k: renumber[clusterer.resolve(v)] for k, v in m.items() if clusterer.resolve(v) in renumber}
              for m in id_map]
    report = MergeReport([s.source for s in states], [len(s.arrays["ids"]) for s in states], len(renumber),
                         matched, by_label, conflicts, dropped, tau, id_map,
                         dict(repaired, samples=int(len(x))))
    meta.update({"next_id": len(renumber), "aliases": {}, "stats": {},
                 "fleet": {k: v for k, v in report.to_dict().items() if k != "id_map"}})
    merged = PortableState(arrays, meta, "merged")
    merged.clusterer()
    return merged, report


def _window(state: PortableState, id_map: dict[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A state's remembered samples whose cluster is in the merged state: (rows, merged cluster ids,
    weights, i.e. each sample's count decayed since the device learned it). The state's own
    clusterer reads its memory and resolves ids of clusters merged since, as on the device."""
    c = state.clusterer()
    x, ids, steps = c._memory()
    owner = np.array([id_map.get(c.resolve(i), -1) for i in ids.tolist()], np.int64)
    keep = owner >= 0
    weight = c.decay ** (c.n_seen - 1 - steps[keep].astype(np.float64))  # as _repair weighs them
    return x[keep], owner[keep], weight


@dataclass
class _Pairs:
    pairs: list[tuple[int, int]]  # (merged index, incoming index)
    by_label: int
    conflicts: int


def _match(merged_means: np.ndarray, merged_labels: list, means: np.ndarray, labels: list, distance: str,
           tau: float) -> _Pairs:
    """One-to-one matching between the merged clusters and one incoming state's clusters."""
    pairs: list[tuple[int, int]] = []
    used_i, used_j = set(), set()
    index = {lab: i for i, lab in enumerate(merged_labels) if lab is not None}
    for j, lab in enumerate(labels):
        if lab is not None and lab in index:
            pairs.append((index[lab], j))
            used_i.add(index[lab]); used_j.add(j)
    by_label = len(pairs)
    conflicts = 0
    if len(merged_means) and len(means):
        d = _distances(merged_means, means, distance)
        order = np.argsort(d, axis=None, kind="stable")
        for flat in order:
            i, j = divmod(int(flat), d.shape[1])
            if d[i, j] > tau:
                break
            if i in used_i or j in used_j:
                continue
            a, b = merged_labels[i], labels[j]
            if a is not None and b is not None and a != b:
                conflicts += 1
                continue
            pairs.append((i, j))
            used_i.add(i); used_j.add(j)
    return _Pairs(pairs, by_label, conflicts)


def _fit_cap(counts: np.ndarray, labels: list, cap: int) -> tuple[list[int], int]:
    """Indices to keep (in order) so at most ``cap`` clusters remain: the lowest-count unlabelled
    clusters go first, as the clusterer evicts."""
    n = len(counts)
    if n <= cap:
        return list(range(n)), 0
    unlabelled = [i for i in range(n) if labels[i] is None]
    excess = n - cap
    if excess > len(unlabelled):
        raise StateError(f"the merged state has {n - len(unlabelled)} labelled classes, more than "
                         f"max_clusters={cap}; raise max_clusters")
    drop = set(sorted(unlabelled, key=lambda i: (counts[i], i))[:excess])
    return [i for i in range(n) if i not in drop], excess


def merge_into(out_dir, sources, match_threshold: float | None = None, max_clusters: int | None = None,
               keep: int = 3, force: bool = False) -> tuple[Path, MergeReport, list[PortableState]]:
    """Read every source (folder or file), merge, and write the result as a new generation of
    ``out_dir``. Every source is read and checked before anything is written."""
    states = [read_state(p) for p in sources]
    merged, report = merge_states(states, match_threshold=match_threshold, max_clusters=max_clusters)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise StateError(f"{out_dir}: is a file, not a state folder")
    if generations(out_dir) and not force:
        check_same_model(read_state(out_dir), merged, what="the merged state and the state already in OUT_DIR")
    return save_generation(out_dir, merged.arrays, merged.meta, keep=keep), report, states
