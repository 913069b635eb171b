"""Fleet benchmark: merging two devices' cluster states (runtime/fleet.py), on real streams.

Each stream is 30 random Protocol-A test characters x 20 drawings (committed bundle), shuffled and
dealt to two devices in one of two ways: *disjoint* (device A sees 15 characters, B the other 15)
or *same* (every character on both devices, alternate drawings). Each device runs the default
clusterer over its half and saves its state; the states are merged with `merge_states`, and every
state is scored by Hungarian ACC of `predict` on a replay of the whole stream. Rows: each device,
the merged state (default matching, then the repair over the devices' memories), the merged state
from prototypes only (the same states without their repair memories, i.e. the merge before the
repair existed), the union without matching (threshold 0), and one device that saw the whole
stream, for scale.

    python benchmarks/fleet.py [--streams 10]
    protoedge bench fleet      (the same)
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from protoedge.datasets import load_split
from protoedge.metrics import hungarian_accuracy
from protoedge.runtime import StreamClusterer, load_bundle, open_encoder
from protoedge.runtime.fleet import PortableState, merge_states, read_state

ROOT = Path(__file__).resolve().parent.parent
CLASSES = 30
ROWS = ("device A", "device B", "merged", "merged, prototypes only", "union without matching",
        "one device, whole stream")


def _predicted(clusterer: StreamClusterer, x: np.ndarray) -> np.ndarray:
    return np.array([a.cluster_id for a in clusterer.predict(x)])


def _without_memory(state: PortableState) -> PortableState:
    return PortableState({k: v for k, v in state.arrays.items() if not k.startswith("window_")}, state.meta,
                         state.source)


def _one_stream(bundle, emb, labels, seed: int, case: str, tmp: Path) -> dict:
    rng = np.random.default_rng(seed)
    classes = rng.choice(int(labels.max()) + 1, CLASSES, replace=False)
    pick = rng.permutation(np.flatnonzero(np.isin(labels, classes)))
    x, y = emb[pick], labels[pick]
    first = np.isin(y, classes[:CLASSES // 2]) if case == "disjoint" else np.arange(len(x)) % 2 == 0
    devices, states = [], []
    for name, part in (("a", first), ("b", ~first)):
        c = StreamClusterer.from_bundle(bundle)
        c.partial_fit(x[part])
        c.save(tmp / f"{case}-{seed}-{name}")
        devices.append(c)
        states.append(read_state(tmp / f"{case}-{seed}-{name}"))
    merged, report = merge_states(states)
    bare, _ = merge_states([_without_memory(s) for s in states])
    union, _ = merge_states(states, match_threshold=0.0)
    whole = StreamClusterer.from_bundle(bundle)
    whole.partial_fit(x)
    scored = (devices[0], devices[1], merged.clusterer(), bare.clusterer(), union.clusterer(), whole)
    out = {row: hungarian_accuracy(y, _predicted(c, x)) for row, c in zip(ROWS, scored)}
    out["clusters_merged"] = report.clusters_out
    out["repaired"] = report.repaired
    return out


def run(bundle=ROOT / "models" / "omniglot" / "bundle", results=ROOT / "benchmarks" / "results",
        streams: int = 10) -> Path:
    bundle = load_bundle(bundle)
    test = load_split("omniglot-a", "test")
    t0 = time.time()
    emb = open_encoder(bundle, backend="cpu").embed(test.images)
    res = {"bundle": str(bundle.root if hasattr(bundle, "root") else bundle), "streams": streams,
           "classes": CLASSES, "generated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for case in ("disjoint", "same"):
            runs = [_one_stream(bundle, emb, test.labels, seed, case, Path(tmp)) for seed in range(streams)]
            table = {row: {"mean": float(np.mean([r[row] for r in runs])),
                           "vs_best_device_mean": float(np.mean([r[row] - max(r[ROWS[0]], r[ROWS[1]]) for r in runs])),
                           "vs_best_device_worst": float(np.min([r[row] - max(r[ROWS[0]], r[ROWS[1]]) for r in runs]))}
                     for row in ROWS}
            res["cases"][case] = {"rows": table, "clusters_merged": float(np.mean([r["clusters_merged"] for r in runs])),
                                  "repaired": {k: float(np.mean([r["repaired"][k] for r in runs]))
                                               for k in ("samples", "split", "merged", "dissolved")}}
    res["seconds"] = time.time() - t0
    results = Path(results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "fleet.json").write_text(json.dumps(res, indent=1))
    md = results / "fleet.md"
    md.write_text(_markdown(res))
    return md


def _markdown(res: dict) -> str:
    lines = ["# Fleet benchmark (`protoedge bench fleet`)", "",
             f"Generated {res['generated']}; bundle `{res['bundle']}`; {res['streams']} random streams of "
             f"{res['classes']} Protocol-A test characters x 20 drawings per case, dealt to two devices "
             "(default clusterer settings). Hungarian ACC of `predict` on a replay of the whole stream; "
             "`vs best device` = the row minus the better of the two devices, per stream (mean, worst).",
             "", "`merged`: `merge_states` as shipped (one-to-one matching, then the repair over the devices' "
             "memories). `merged, prototypes only`: the same states without their memories (what the merge "
             "did before the repair). `union without matching`: match threshold 0, repair on.", ""]
    for case, what in (("disjoint", "disjoint halves of the characters"),
                       ("same", "every character (alternate drawings)")):
        c = res["cases"][case]
        lines += [f"## Two devices saw {what}", "", "| state | ACC | vs best device: mean | worst |", "|---|---|---|---|"]
        for row, v in c["rows"].items():
            lines.append(f"| {row} | {v['mean']:.3f} | {v['vs_best_device_mean']:+.3f} | {v['vs_best_device_worst']:+.3f} |")
        r = c["repaired"]
        lines += ["", f"Merged state: {c['clusters_merged']:.1f} clusters; the repair went over {r['samples']:.0f} "
                  f"remembered samples per merge and split {r['split']:.1f}, merged {r['merged']:.1f}, "
                  f"dissolved {r['dissolved']:.1f} clusters on average.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    streams = int(sys.argv[sys.argv.index("--streams") + 1]) if "--streams" in sys.argv else 10
    print(run(streams=streams).read_text())
