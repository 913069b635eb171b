"""Fleets (runtime/fleet.py, `protoedge state ...`): export/import of one device's state as a file,
and merging several devices' states so what one device learned another recognises.

The two-device test uses the committed bundle and real Omniglot Protocol-A test characters; the
matching and label rules are checked on small synthetic embeddings whose right answers are known.
"""
import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from protoedge.cli import main
from protoedge.datasets import load_split
from protoedge.metrics import hungarian_accuracy
from protoedge.runtime import Runtime, StateError, StreamClusterer, load_bundle, open_encoder
from protoedge.runtime.fleet import (PortableState, export_state, import_state, merge_into, merge_states,
                                     read_state, read_state_file)
from protoedge.runtime.state import generations

REPO = Path(__file__).resolve().parent.parent
BUNDLE = REPO / "models" / "omniglot" / "bundle"
N_CLASSES = 30  # 600 images: embedding them once takes ~1 s on one core


def cli(*args):
    return CliRunner().invoke(main, ["state", *map(str, args)], catch_exceptions=False)


def files_of(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.exists() else {}


@pytest.fixture(scope="module")
def bundle():
    return load_bundle(BUNDLE)


@pytest.fixture(scope="module")
def stream(bundle):
    """A shuffled stream of N_CLASSES Protocol-A test characters (20 drawings each), embedded once."""
    test = load_split("omniglot-a", "test")
    rng = np.random.default_rng(0)
    classes = rng.choice(int(test.labels.max()) + 1, N_CLASSES, replace=False)
    pick = rng.permutation(np.flatnonzero(np.isin(test.labels, classes)))
    x = open_encoder(bundle, backend="cpu", threads=1).embed(test.images[pick])
    return x, test.labels[pick], classes


def predicted(clusterer, x):
    return np.array([a.cluster_id for a in clusterer.predict(x)])


def device(bundle, x, state_dir) -> StreamClusterer:
    c = StreamClusterer.from_bundle(bundle)
    c.partial_fit(x)
    c.save(state_dir)
    return c


# ----------------------------------------------------------------------------- the fleet scenario

def test_two_devices_merged_state_recognises_both_halves(bundle, stream, tmp_path):
    x, y, classes = stream
    first = np.isin(y, classes[: N_CLASSES // 2])  # device A sees these classes, device B the rest
    a = device(bundle, x[first], tmp_path / "a")
    b = device(bundle, x[~first], tmp_path / "b")

    # the fleet round: export on each device, merge on the workstation, push back, resume there
    assert cli("export", tmp_path / "a", tmp_path / "a.npz").exit_code == 0
    assert cli("export", tmp_path / "b", tmp_path / "b.npz").exit_code == 0
    r = cli("merge", tmp_path / "merged", tmp_path / "a.npz", tmp_path / "b.npz",
            "--report", tmp_path / "report.json")
    assert r.exit_code == 0, r.output
    assert cli("export", tmp_path / "merged", tmp_path / "fleet.npz").exit_code == 0
    for dev in ("a", "b"):
        assert cli("import", tmp_path / "fleet.npz", tmp_path / dev).exit_code == 0
    # each device's runtime resumes the pushed state with its bundle (model identity checked there)
    ra = Runtime(bundle, backend="cpu", threads=1, state_dir=tmp_path / "a")
    rb = Runtime(bundle, backend="cpu", threads=1, state_dir=tmp_path / "b")
    report = json.loads((tmp_path / "report.json").read_text())
    assert ra.clusterer.n_clusters == rb.clusterer.n_clusters == report["clusters_out"]
    assert max(a.n_clusters, b.n_clusters) <= report["clusters_out"] <= a.n_clusters + b.n_clusters

    merged = predicted(ra.clusterer, x)
    assert np.array_equal(merged, predicted(rb.clusterer, x))  # every device now holds the same state
    acc = {"A": hungarian_accuracy(y, predicted(a, x)), "B": hungarian_accuracy(y, predicted(b, x)),
           "merged": hungarian_accuracy(y, merged)}
    # what a device learned is still recognised by the merged state: a sample of A's half goes to the
    # merged cluster that A's own cluster for it became (id_map), and the same for B
    agree = {}
    for name, dev, half, id_map in (("A", a, first, report["id_map"][0]), ("B", b, ~first, report["id_map"][1])):
        own = [id_map.get(str(i), -2) for i in predicted(dev, x[half])]
        agree[name] = float(np.mean(np.array(own) == merged[half]))
    # for scale: one device that saw the whole stream
    single = StreamClusterer.from_bundle(bundle)
    single.partial_fit(x)
    acc["one device, whole stream"] = hungarian_accuracy(y, predicted(single, x))
    print(f"\nfleet replay ACC ({len(x)} images, {N_CLASSES} classes): "
          + ", ".join(f"{k} {v:.3f}" for k, v in acc.items())
          + f"; clusters A {a.n_clusters}, B {b.n_clusters}, merged {report['clusters_out']} "
          f"(joined {report['matched']}); merged agrees with A on A's half {agree['A']:.3f}, "
          f"with B on B's half {agree['B']:.3f}")
    assert acc["merged"] >= max(acc["A"], acc["B"])
    assert min(agree.values()) >= 0.8


def test_devices_that_saw_the_same_classes_merge_without_duplicating_them(bundle, stream, tmp_path):
    """The other fleet case: every device sees every class (different drawings). Matching and the
    repair over the devices' memories must join a class's clusters across devices, or the merged
    state splits each class in two."""
    x, y, _ = stream
    even = np.arange(len(x)) % 2 == 0
    devices = [device(bundle, x[part], tmp_path / name) for name, part in (("a", even), ("b", ~even))]
    states = [read_state(tmp_path / "a"), read_state(tmp_path / "b")]
    merged, report = merge_states(states)
    union, _ = merge_states(states, match_threshold=0.0)
    # the same states without their repair memories: prototypes are all the merge has
    bare = [PortableState({k: v for k, v in s.arrays.items() if not k.startswith("window_")}, s.meta, s.source)
            for s in states]
    prototypes_only, bare_report = merge_states(bare)
    acc = [hungarian_accuracy(y, predicted(c, x)) for c in devices]
    acc_merged = hungarian_accuracy(y, predicted(merged.clusterer(), x))
    acc_union = hungarian_accuracy(y, predicted(union.clusterer(), x))
    acc_bare = hungarian_accuracy(y, predicted(prototypes_only.clusterer(), x))
    print(f"\nsame classes on both devices: ACC A {acc[0]:.3f}, B {acc[1]:.3f}, merged {acc_merged:.3f} "
          f"({report.clusters_out} clusters, {report.matched} joined, repair {report.repaired}), union "
          f"without matching {acc_union:.3f} ({union.summary()['clusters']} clusters), without the "
          f"memories {acc_bare:.3f}")
    assert report.repaired["samples"] == sum(len(s.arrays["window_ids"]) for s in states) > 0
    assert bare_report.repaired["samples"] == 0
    assert acc_merged > acc_bare + 0.03  # the memories are what mends the split classes
    # precision of the matching: a pair joined across devices should be one class seen twice
    majority = []
    for dev, part, id_map in zip(devices, (even, ~even), report.id_map):
        ids = predicted(dev, x[part])
        majority.append({id_map[int(c)]: np.bincount(y[part][ids == c]).argmax() for c in np.unique(ids)})
    joined = [k for k in majority[0] if k in majority[1]]
    precision = np.mean([majority[0][k] == majority[1][k] for k in joined])
    # the same for pairs drawn at random: device clusters are impure, so neither is near 0 or 1
    chance = np.mean([a == b for a in majority[0].values() for b in majority[1].values()])
    print(f"joined pairs with the same majority class: {precision:.3f} of {len(joined)} "
          f"(random pairs: {chance:.3f})")
    # pairs the matching joined, and any the repair merged after it
    assert len(joined) >= report.matched >= 0.2 * min(len(s.arrays["ids"]) for s in states)
    assert precision >= 5 * chance
    # measured over 10 random 30-class streams (benchmarks/fleet.py): merged - best device = +0.016
    # on average, worst -0.018; without the memories -0.042, worst -0.082
    assert acc_merged >= max(acc) - 0.03


# ----------------------------------------------------------------------------- export / import

def test_export_import_round_trip_is_exact(bundle, stream, tmp_path):
    x, _, _ = stream
    original = device(bundle, x[:300], tmp_path / "dev")
    learn_examples = {"a": x[300:303], "b": x[303:306]}
    for label, ex in learn_examples.items():
        original.learn_examples(ex, [label] * len(ex))
    original.save(tmp_path / "dev")
    st = export_state(tmp_path / "dev", tmp_path / "dev.npz")
    assert st.generation == generations(tmp_path / "dev")[0]
    json_path, _ = import_state(tmp_path / "dev.npz", tmp_path / "other")
    copy = StreamClusterer.load(tmp_path / "other")
    assert copy.clusters() == original.clusters() and copy.model == original.model
    assert copy.get_params() == original.get_params()
    for got, want in zip(copy.prototypes(), original.prototypes()):
        assert np.array_equal(got, want)
    # the copy keeps learning exactly as the original would have
    assert copy.partial_fit(x[306:400]) == original.partial_fit(x[306:400])
    assert copy.clusters() == original.clusters()
    # importing again adds a generation; the older ones stay as the fallback
    import_state(tmp_path / "dev.npz", tmp_path / "other")
    assert generations(tmp_path / "other") == [2, 1]
    # a state folder is also accepted as the source of an import, and `show` reads both kinds
    import_state(tmp_path / "dev", tmp_path / "third")
    assert StreamClusterer.load(tmp_path / "third").clusters() == StreamClusterer.load(tmp_path / "dev").clusters()
    for source in (tmp_path / "dev.npz", tmp_path / "third"):
        r = cli("show", source)
        assert r.exit_code == 0 and json.loads(r.output)["labelled"] == ["a", "b"], r.output


def test_corrupt_or_foreign_files_are_refused_and_change_nothing(bundle, stream, tmp_path):
    x, _, _ = stream
    device(bundle, x[:200], tmp_path / "dev")
    export_state(tmp_path / "dev", tmp_path / "good.npz")
    device(bundle, x[200:260], tmp_path / "target")
    before = files_of(tmp_path / "target")
    good = (tmp_path / "good.npz").read_bytes()

    bad = {}
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF
    bad["flipped byte"] = bytes(flipped)
    bad["truncated"] = good[: len(good) - 100]
    bad["empty"] = b""
    bad["not a zip"] = b"protoedge state? no\n" * 20
    # a well-formed npz whose prototypes were edited after export (zip CRCs recomputed, header kept)
    with np.load(tmp_path / "good.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["means"] = arrays["means"] + 0.01
    np.savez(tmp_path / "edited.npz", **arrays)
    bad["edited array"] = (tmp_path / "edited.npz").read_bytes()
    del arrays["__fleet__"]
    np.savez(tmp_path / "headless.npz", **arrays)
    bad["no header"] = (tmp_path / "headless.npz").read_bytes()
    np.savez(tmp_path / "pickled.npz", means=np.array([{"x": 1}], dtype=object))
    bad["object array"] = (tmp_path / "pickled.npz").read_bytes()
    with zipfile.ZipFile(tmp_path / "good.npz") as zin, zipfile.ZipFile(tmp_path / "extra.npz", "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, zin.read(info))
        extra = io.BytesIO()
        np.save(extra, np.zeros(3))
        zout.writestr("extra.npy", extra.getvalue())
    bad["extra member"] = (tmp_path / "extra.npz").read_bytes()

    for what, blob in bad.items():
        path = tmp_path / "bad.npz"
        path.write_bytes(blob)
        with pytest.raises(StateError):
            read_state_file(path)
        r = cli("import", path, tmp_path / "target")
        assert r.exit_code == 1 and "Error:" in r.output and "Traceback" not in r.output, (what, r.output)
        r = cli("merge", tmp_path / "out", tmp_path / "dev", path)
        assert r.exit_code == 1, what
        assert files_of(tmp_path / "target") == before, what
        assert not (tmp_path / "out").exists(), what
    assert cli("export", tmp_path / "missing", tmp_path / "x.npz").exit_code == 1
    assert not (tmp_path / "x.npz").exists()


# ----------------------------------------------------------------------------- refusing other models

def _restamped(src: Path, dst: Path, **model_changes) -> Path:
    c = StreamClusterer.load(src)
    c.model = dict(c.model, **model_changes)
    c.save(dst)
    return dst


def test_states_of_other_models_are_refused(bundle, stream, tmp_path):
    x, _, _ = stream
    device(bundle, x[:150], tmp_path / "a")
    device(bundle, x[150:300], tmp_path / "b")
    assert StreamClusterer.load(tmp_path / "a").model["weights_sha256"] == bundle.file_sha256("fp32")
    other = _restamped(tmp_path / "b", tmp_path / "other", weights_sha256="0" * 64)

    with pytest.raises(StateError, match="different models.*weights_sha256"):
        merge_into(tmp_path / "out", [tmp_path / "a", other])
    assert not (tmp_path / "out").exists()
    r = cli("merge", tmp_path / "out", tmp_path / "a", other)
    assert r.exit_code == 1 and "not comparable" in r.output

    # importing another model's state over a device's state is refused, and leaves it as it was
    before = files_of(tmp_path / "a")
    export_state(other, tmp_path / "other.npz")
    r = cli("import", tmp_path / "other.npz", tmp_path / "a")
    assert r.exit_code == 1 and "different models" in r.output
    assert files_of(tmp_path / "a") == before
    # --force replaces it; the device's runtime then refuses the state for its bundle, as it should
    assert cli("import", "--force", tmp_path / "other.npz", tmp_path / "a").exit_code == 0
    with pytest.raises(StateError, match="learned with model"):
        Runtime(bundle, backend="cpu", threads=1, state_dir=tmp_path / "a")

    # a state learned on a device with another bundle (same ONNX file, another model version)
    shutil.copytree(BUNDLE, tmp_path / "bundle2")
    manifest = json.loads((tmp_path / "bundle2" / "manifest.json").read_text())
    manifest["model"]["version"] = "0.2.0+retrained"
    (tmp_path / "bundle2" / "manifest.json").write_text(json.dumps(manifest))
    device(load_bundle(tmp_path / "bundle2"), x[:150], tmp_path / "v2")
    r = cli("merge", tmp_path / "out", tmp_path / "b", tmp_path / "v2")
    assert r.exit_code == 1 and "version differ" in r.output and "0.2.0+retrained" in r.output
    assert not (tmp_path / "out").exists()

    # a state of another embedding size
    c = StreamClusterer(dim=32, threshold=0.1, model=StreamClusterer.load(tmp_path / "b").model)
    c.partial_fit(np.random.default_rng(0).normal(size=(20, 32)).astype(np.float32))
    c.save(tmp_path / "d32")
    with pytest.raises(StateError, match="different embedding spaces"):
        merge_into(tmp_path / "out", [tmp_path / "b", tmp_path / "d32"])


# ----------------------------------------------------------------------------- matching rules

D = 16


def unit(v):
    v = np.asarray(v, np.float64)
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def portable(c: StreamClusterer, tmp_path: Path, name: str):
    c.save(tmp_path / name)
    return read_state(tmp_path / name)


def test_matching_joins_near_clusters_with_count_weighted_means(tmp_path):
    rng = np.random.default_rng(0)
    centres = unit(rng.normal(size=(6, D)))  # far apart: 2 - 2cos ~ 2 between random directions
    states, protos = [], []
    # three devices, each with a different subset of the classes and different amounts of data
    for k, (cls, n) in enumerate((([0, 1, 2, 3], 5), ([2, 3, 4], 9), ([0, 4, 5], 3))):
        c = StreamClusterer(D, threshold=0.5, decay=1.0, merge_threshold=0.2)
        for j in cls:
            c.partial_fit(unit(centres[j] + 0.02 * rng.normal(size=(n, D))))
        assert c.n_clusters == len(cls)
        states.append(portable(c, tmp_path, f"d{k}"))
    merged, report = merge_states(states)
    assert report.clusters_out == 6 and report.matched == 4 and report.match_threshold == 0.2
    m = merged.clusterer()
    # every class is one cluster whose prototype is the count-weighted mean of the devices' means
    for j in range(6):
        parts = [(s.arrays["means"][i], s.arrays["counts"][i]) for s in states
                 for i in range(len(s.arrays["ids"])) if float(s.arrays["means"][i] @ centres[j]) > 0.9]
        want = sum(mu * n for mu, n in parts) / sum(n for _, n in parts)
        got = merged.arrays["means"][int(np.argmax(merged.arrays["means"] @ centres[j]))]
        np.testing.assert_allclose(got, want, atol=1e-6)
    assert sorted(info.count for info in m.clusters()) == sorted([5 + 3, 5, 5 + 9, 5 + 9, 9 + 3, 3])
    # the id map sends every device's cluster to the merged cluster that now recognises its class
    for s, id_map in zip(states, report.id_map):
        for i, old in enumerate(s.arrays["ids"]):
            near = m.predict(s.arrays["means"][i:i + 1])[0].cluster_id
            assert id_map[int(old)] == near
    # with a threshold of 0 the matching joins nothing: the union of all clusters, which the repair
    # over the devices' memories then folds back to one cluster per class (as a device's own repair
    # merges two clusters of one class)
    union = merge_states(states, match_threshold=0.0)[1]
    assert union.matched == 0 and union.repaired["merged"] == 4 and union.clusters_out == 6
    bare = [PortableState({k: v for k, v in s.arrays.items() if not k.startswith("window_")}, s.meta, s.source)
            for s in states]
    assert merge_states(bare, match_threshold=0.0)[1].clusters_out == 4 + 3 + 3


def test_label_rules_and_cluster_cap(tmp_path):
    rng = np.random.default_rng(1)
    c0, c1, c2, c3 = unit(rng.normal(size=(4, D)))
    near = lambda c: unit(c + 0.01 * rng.normal(size=(4, D)))
    a = StreamClusterer(D, threshold=0.5, decay=1.0)
    a.learn_examples(near(c0), ["cat"] * 4)     # labelled "cat" at c0
    a.learn_examples(near(c1), ["dog"] * 4)     # labelled "dog" at c1
    a.partial_fit(near(c2))                     # unlabelled at c2
    b = StreamClusterer(D, threshold=0.5, decay=1.0)
    b.learn_examples(near(c3), ["cat"] * 4)     # "cat" too, but somewhere else: same label -> joined
    b.learn_examples(near(c1), ["wolf"] * 4)    # near "dog" but labelled otherwise -> kept apart
    b.partial_fit(near(c2)[:1])                 # unlabelled, near A's unlabelled cluster
    b.label(b.clusters()[-1].id, "bird")        # ... and named on B: the merged cluster is "bird"
    merged, report = merge_states([portable(a, tmp_path, "a"), portable(b, tmp_path, "b")])
    assert (report.joined_by_label, report.matched, report.label_conflicts) == (1, 1, 1)
    m = merged.clusterer()
    assert sorted(str(i.label) for i in m.clusters()) == ["bird", "cat", "dog", "wolf"]
    assert m.predict(c2[None])[0].label == "bird"
    assert {info.label: info.count for info in m.clusters()}["cat"] == 8

    # a cap below the cluster count drops the lowest-count unlabelled clusters, never a labelled one
    u = StreamClusterer(D, threshold=0.5, decay=1.0)
    u.learn_examples(near(c0), ["cat"] * 4)
    for k, c in enumerate((c1, c2, c3)):
        u.partial_fit(near(c)[: k + 1])
    merged, report = merge_states([portable(u, tmp_path, "u")], max_clusters=2)
    assert report.dropped == 2 and report.clusters_out == 2
    assert sorted((str(i.label), i.count) for i in merged.clusterer().clusters()) == [("None", 3.0), ("cat", 4.0)]
    with pytest.raises(StateError, match="labelled classes"):
        merge_states([portable(a, tmp_path, "a2")], max_clusters=1)


def test_daemon_state_folder_is_read_from_its_newest_snapshot(tmp_path):
    rng = np.random.default_rng(2)
    for seq, n in ((5, 3), (9, 7)):
        c = StreamClusterer(D, threshold=0.5)
        c.partial_fit(unit(rng.normal(size=(n, D))))
        c.save(tmp_path / "daemon" / "snapshots" / f"snap-{seq:020d}", keep=1)
    (tmp_path / "daemon" / "log").mkdir()
    r = cli("export", tmp_path / "daemon", tmp_path / "d.npz")
    assert r.exit_code == 0 and "updates logged after it are not included" in r.output
    assert read_state(tmp_path / "d.npz").summary()["samples_seen"] == 7
    r = cli("import", tmp_path / "d.npz", tmp_path / "daemon")
    assert r.exit_code == 1 and "daemon state folder" in r.output
