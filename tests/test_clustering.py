"""StreamClusterer rules on small synthetic embeddings whose right answers are known, each test
run with the compiled per-sample loop (runtime/_rowloop.c) and with the numpy one."""
import math
import os

import numpy as np
import pytest

from protoedge.runtime import clustering
from protoedge.runtime.clustering import StreamClusterer, threshold_from_calibration
from protoedge.runtime.errors import InputError, StateError

D = 16


@pytest.fixture(autouse=True, params=["compiled", "numpy"])
def loop(request, monkeypatch):
    if request.param == "compiled" and clustering._rowloop is None:
        pytest.skip("the compiled loop was not built (no C compiler at install)")
    monkeypatch.setattr(StreamClusterer, "compiled", request.param == "compiled")
    return request.param


def unit(v):
    v = np.asarray(v, np.float64)
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def axis(i, scale=1.0):
    v = np.zeros(D, np.float32)
    v[i] = scale
    return v


def blobs(n_classes=5, per_class=40, noise=0.05, seed=0):
    rng = np.random.default_rng(seed)
    centres = unit(rng.normal(size=(n_classes, D)))
    y = rng.permutation(np.repeat(np.arange(n_classes), per_class))
    return unit(centres[y] + noise * rng.normal(size=(len(y), D))), y, centres


def snapshot(c):
    ids, protos = c.prototypes()
    return ids.tolist(), protos.copy(), [(i.id, i.label, i.count, i.seen) for i in c.clusters()], c.n_seen


def same_state(a, b):
    return a[0] == b[0] and np.array_equal(a[1], b[1]) and a[2] == b[2] and a[3] == b[3]


def test_new_cluster_beyond_threshold_and_join_within():
    c = StreamClusterer(D, threshold=0.5, merge_threshold=0)
    a = c.partial_fit(np.stack([axis(0), unit(axis(0) + axis(1, 0.3)), axis(1)]))
    assert [x.new_cluster for x in a] == [True, False, True]
    assert a[0].cluster_id == a[1].cluster_id != a[2].cluster_id
    # distance is 2 - 2cos to the prototype the sample met on arrival
    cos = float(unit(axis(0) + axis(1, 0.3)) @ axis(0))
    assert a[1].distance == pytest.approx(2 - 2 * cos, abs=1e-5)
    assert a[0].distance == math.inf and a[0].to_dict()["distance"] is None
    assert c.n_clusters == 2


def test_result_fields_and_confidence_ordering():
    c = StreamClusterer(D, threshold=0.5, temperature=10.0, merge_threshold=0)
    c.partial_fit(np.stack([axis(0), axis(1)]))
    near, far = c.predict(np.stack([unit(axis(0) + axis(2, 0.1)), unit(axis(0) + axis(2, 0.5))]))
    for r in (near, far):
        assert set(r.to_dict()) == {"cluster_id", "distance", "confidence", "new_cluster", "label"}
        assert 0.0 <= r.confidence <= 1.0
    assert near.cluster_id == far.cluster_id
    assert near.confidence > far.confidence


def test_running_mean_is_count_weighted_without_decay():
    c = StreamClusterer(D, threshold=1.0, distance="sqeuclidean", decay=1.0, merge_threshold=0)
    pts = np.stack([axis(0), axis(0, 1.2), axis(0, 0.9) + axis(1, 0.1), axis(0, 1.1)])
    ids = {r.cluster_id for r in c.partial_fit(pts)}
    assert len(ids) == 1
    _, protos = c.prototypes()
    np.testing.assert_allclose(protos[0], pts.mean(0), atol=1e-6)
    assert c.clusters()[0].count == pytest.approx(4.0)


def test_counts_decay_exponentially_and_recent_samples_weigh_more():
    decay = 0.9
    c = StreamClusterer(D, threshold=1.0, distance="sqeuclidean", decay=decay, merge_threshold=0)
    pts = [axis(0), axis(0, 1.2), axis(0, 1.4)]
    c.partial_fit(np.stack(pts))
    info = c.clusters()[0]
    # each sample adds 1, every later sample multiplies the count by decay
    assert info.count == pytest.approx(1 + decay + decay ** 2)
    assert info.seen == 3
    _, protos = c.prototypes()
    w = np.array([decay ** 2, decay, 1.0])
    np.testing.assert_allclose(protos[0], (w[:, None] * np.stack(pts)).sum(0) / w.sum(), atol=1e-5)
    assert protos[0][0] > np.mean([1.0, 1.2, 1.4])  # the newest sample pulls harder than a plain mean


def test_cap_evicts_least_used_unlabelled_cluster():
    c = StreamClusterer(D, threshold=0.5, max_clusters=3, decay=1.0, merge_threshold=0)
    c.learn_examples(np.stack([axis(0)]), ["zero"])            # a known class, seen once
    c.partial_fit(np.stack([axis(1)] * 3 + [axis(2)] * 2))      # 1 is used more than 2
    assert c.n_clusters == 3
    a = c.partial_fit(np.stack([axis(3)]))[0]
    assert a.new_cluster and c.n_clusters == 3
    kept = {info.label or tuple(np.flatnonzero(p > 0.5)) for info, p in zip(c.clusters(), c.prototypes()[1])}
    # the label-free cluster with the lowest count (axis 2) went; the known class stayed
    assert "zero" in kept and (1,) in kept and (3,) in kept and (2,) not in kept
    assert c.stats["evicted"] == 1


def test_clusters_that_drift_together_are_merged_and_ids_resolve():
    # 45 degrees apart: d = 2 - 2 cos 45 = 0.59 opens a second cluster; the merge line is 0.2
    c = StreamClusterer(D, threshold=0.5, merge_threshold=0.2, decay=1.0)
    a0 = c.partial_fit(np.stack([axis(0)] * 2))[0]  # two samples each: established clusters (min_size)
    a1 = c.partial_fit(np.stack([unit(axis(0) + axis(1, 1.0))] * 2))[0]
    assert a1.new_cluster and c.n_clusters == 2
    # samples in between pull the two prototypes together until they merge
    between = np.stack([unit(axis(0) + axis(1, 0.45))] * 30)
    c.partial_fit(between)
    assert c.n_clusters == 1 and c.stats["merged"] >= 1
    survivor = c.clusters()[0].id
    assert c.resolve(a0.cluster_id) == survivor and c.resolve(a1.cluster_id) == survivor


def test_merge_never_joins_two_different_known_classes():
    c = StreamClusterer(D, threshold=0.5, merge_threshold=1.5)
    ids = c.learn_examples(np.stack([axis(0), unit(axis(0) + axis(1, 0.5))]), ["a", "b"])
    c.partial_fit(np.stack([unit(axis(0) + axis(1, 0.2))] * 5))
    assert {i.label for i in c.clusters()} == {"a", "b"}
    with pytest.raises(InputError, match="different labels"):
        c.merge([ids["a"], ids["b"]])


def _two_blobs(sep, per=30, noise=0.02, seed=0):
    """Two blobs `sep` apart (squared distance), in random order."""
    rng = np.random.default_rng(seed)
    centres = np.stack([axis(0), axis(1)]) * math.sqrt(sep / 2)
    y = rng.permutation(np.repeat([0, 1], per))
    return (centres[y] + noise * rng.normal(size=(len(y), D))).astype(np.float32), y


def test_repair_splits_a_cluster_that_holds_two_classes():
    # blobs 0.5 apart, threshold 0.6: a sample of either blob is within the threshold of a mixed
    # prototype halfway between (0.125 + noise), so the online rule alone keeps one cluster
    x, y = _two_blobs(sep=0.5)
    kw = dict(threshold=0.6, distance="sqeuclidean", decay=1.0)
    plain = StreamClusterer(D, refine_every=0, **kw)
    plain.partial_fit(x)
    assert plain.n_clusters == 1
    c = StreamClusterer(D, refine_every=10, **kw)
    ids = np.array([a.cluster_id for a in c.partial_fit(x)])
    assert c.stats["split"] >= 1 and c.n_clusters == 2
    final = np.array([a.cluster_id for a in c.predict(x)])
    assert all(len(np.unique(y[final == k])) == 1 for k in np.unique(final))  # each cluster one blob
    assert all(len(np.unique(ids[20:][y[20:] == k])) == 1 for k in (0, 1))  # later samples: stable ids
    # mass is conserved: every sample still counts once (no decay)
    assert sum(i.count for i in c.clusters()) == pytest.approx(len(x), rel=1e-6)
    assert sum(i.seen for i in c.clusters()) == len(x)


def test_refine_repairs_over_given_samples_and_refuses_bad_input():
    """refine(): the repair over samples handed in with the cluster that learned them (what a fleet
    merge does with the devices' memories) splits the mixed cluster the online rule made, keeps
    every sample's count, and refuses ids or weights that do not fit."""
    x, y = _two_blobs(sep=0.5)
    c = StreamClusterer(D, refine_every=0, threshold=0.6, distance="sqeuclidean", decay=1.0)
    ids = np.array([a.cluster_id for a in c.partial_fit(x)])
    assert c.n_clusters == 1
    before = snapshot(c)
    for bad_ids, bad_w in ((ids[:-1], None), (ids.astype(float), None), (ids, np.zeros(len(x))),
                           (ids, np.full(len(x), np.nan)), (ids, np.ones(3))):
        with pytest.raises(InputError):
            c.refine(x, bad_ids, bad_w)
    assert same_state(snapshot(c), before)  # a refused call changes nothing
    done = c.refine(x, ids)
    assert done["split"] >= 1 and c.n_clusters == 2
    final = np.array([a.cluster_id for a in c.predict(x)])
    assert all(len(np.unique(y[final == k])) == 1 for k in np.unique(final))
    assert sum(i.count for i in c.clusters()) == pytest.approx(len(x), rel=1e-6)
    assert c.refine(x, np.full(len(x), 10**6)) == {"split": 0, "merged": 0, "dissolved": 0}  # unknown ids: skipped


def test_repair_never_splits_one_tight_class_and_merges_its_early_fragments():
    rng = np.random.default_rng(1)
    # one class spread along a line: its first two samples are the two ends, farther apart than the
    # threshold, so they open two clusters; the rest fill the space between
    line = np.linspace(-1, 1, 60)[:, None] * axis(0) * 0.45
    x = np.concatenate([line[[0, -1]], rng.permutation(line[1:-1])]) + 0.01 * rng.normal(size=(60, D))
    x = x.astype(np.float32)
    kw = dict(threshold=0.5, distance="sqeuclidean", decay=1.0, merge_threshold=1e-9)  # no per-sample merges
    plain = StreamClusterer(D, refine_every=0, **kw)
    plain.partial_fit(x)
    assert plain.n_found == 2
    c = StreamClusterer(D, refine_every=10, **kw)
    c.partial_fit(x)
    assert c.n_found == 1 and c.stats["merged"] >= 1 and c.stats["split"] == 0
    off = StreamClusterer(D, refine_every=10, **dict(kw, merge_threshold=0.0))  # 0 turns merging off
    off.partial_fit(x)
    assert off.stats["merged"] == 0


def test_repair_keeps_known_classes_and_forgets_removed_clusters():
    x, y = _two_blobs(sep=0.5)
    c = StreamClusterer(D, threshold=0.6, distance="sqeuclidean", decay=1.0, refine_every=10)
    c.learn_examples(x[:2], ["a", "b"] if y[0] != y[1] else ["a", "a"])
    c.partial_fit(x[2:30])
    victim = [i.id for i in c.clusters() if i.label is None]
    for cid in victim:
        c.remove(cid)
    c.partial_fit(x[30:])  # the repair meets remembered samples of removed clusters: dropped
    assert {"a"} <= {i.label for i in c.clusters()}
    assert c.stats["refinements"] == (len(x) - 2) // 10


def _pairs_stream(seed=0, per=40, noise=0.02):
    """Eight tight blobs in four pairs. A pair's blobs are 0.3 apart (squared): within the
    threshold of 1.0, so the stream rule gives each pair one cluster, and within the split distance,
    so the repair's 2-means leaves it; the pairs are 1.6 apart. Ward cut by silhouette separates
    all eight."""
    rng = np.random.default_rng(seed)
    centres = []
    for p in range(4):
        centre, offset = axis(p, math.sqrt(0.8)), axis(4 + p, math.sqrt(0.3) / 2)
        centres += [centre + offset, centre - offset]
    y = rng.permutation(np.repeat(np.arange(8), per))
    return (np.array(centres)[y] + noise * rng.normal(size=(len(y), D))).astype(np.float32), y


def test_recluster_separates_classes_the_threshold_rule_joins():
    from protoedge.metrics import hungarian_accuracy

    x, y = _pairs_stream()
    kw = dict(threshold=1.0, distance="sqeuclidean", decay=1.0)
    plain = StreamClusterer(D, **kw)
    plain_ids = np.array([a.cluster_id for a in plain.partial_fit(x)])
    assert plain.n_found == 4 and plain.stats["reclustered"] == 0
    c = StreamClusterer(D, recluster=True, **kw)
    ids = np.array([a.cluster_id for a in c.partial_fit(x)])
    assert c.stats["reclustered"] >= 1 and c.n_found == 8
    final = np.array([a.cluster_id for a in c.predict(x)])
    assert all(len(np.unique(y[final == k])) == 1 for k in np.unique(final))  # each cluster one blob
    assert hungarian_accuracy(y, ids) >= hungarian_accuracy(y, plain_ids) + 0.3  # on arrival too
    # the moves conserve mass: every sample still counts once (no decay)
    assert sum(i.count for i in c.clusters()) == pytest.approx(len(x), rel=1e-6)
    assert sum(i.seen for i in c.clusters()) == len(x)


def test_recluster_leaves_known_classes_alone():
    """Every class labelled from one example, closed world: the memory holds only members of
    labelled clusters, so recluster=True must change nothing at all."""
    x, y = _pairs_stream()
    first = [int(np.flatnonzero(y == k)[0]) for k in range(8)]
    rest = np.setdiff1d(np.arange(len(x)), first)
    runs = []
    for recluster in (False, True):
        c = StreamClusterer(D, threshold=1e9, distance="sqeuclidean", decay=1.0, recluster=recluster)
        c.learn_examples(x[first], [f"class {k}" for k in range(8)])
        runs.append(([(a.cluster_id, a.label) for a in c.partial_fit(x[rest])], snapshot(c), c.stats["reclustered"]))
    assert runs[0][0] == runs[1][0] and same_state(runs[0][1], runs[1][1]) and runs[1][2] == 0


def test_recluster_redraws_unlabelled_clusters_around_a_known_class():
    """One blob labelled, the stream open: the labelled cluster (which also takes its pair's other
    blob, within the threshold) keeps its id, label and members; the unlabelled pairs are split."""
    x, y = _pairs_stream()
    first = int(np.flatnonzero(y == 0)[0])
    rest = np.delete(np.arange(len(x)), first)
    c = StreamClusterer(D, threshold=1.0, distance="sqeuclidean", decay=1.0, recluster=True)
    known = c.learn_examples(x[[first]], ["zero"])["zero"]
    c.partial_fit(x[rest])
    assert c.stats["reclustered"] >= 1
    assert (c._slots_of(c._mem_id[c._ring()]) >= 0).all()  # every remembered sample's cluster is live
    final = c.predict(x)
    ids = np.array([a.cluster_id for a in final])
    assert set(ids[(y == 0) | (y == 1)]) == {known} and {a.label for a in final if a.cluster_id == known} == {"zero"}
    others = ids[y >= 2]
    assert known not in others and len(np.unique(others)) == 6
    assert all(len(np.unique(y[ids == k])) == 1 for k in np.unique(others))


def test_recluster_is_skipped_while_the_memory_is_spread_over_many_clusters(monkeypatch):
    from protoedge.runtime import recluster

    calls = []
    real = recluster.better_partition
    monkeypatch.setattr(recluster, "better_partition", lambda *a: calls.append(1) or real(*a))
    # 120 classes, 3 samples each: the memory's 256 samples touch ~100 clusters, fewer than
    # RECLUSTER_MIN_MEMBERS samples each
    x, _, _ = blobs(n_classes=120, per_class=3, noise=0.01, seed=3)
    c = StreamClusterer(D, threshold=0.05, recluster=True)
    c.partial_fit(x)
    assert c.stats["refinements"] >= 5 and not calls
    x, _ = _pairs_stream()  # the control: a few clusters, many samples each
    StreamClusterer(D, threshold=1.0, distance="sqeuclidean", recluster=True).partial_fit(x)
    assert calls


def test_recluster_setting_and_a_resumed_stream_survive_save_and_load(tmp_path):
    x, _ = _pairs_stream()
    kw = dict(threshold=1.0, distance="sqeuclidean", recluster=True)
    whole = StreamClusterer(D, **kw)
    whole.partial_fit(x)
    first = StreamClusterer(D, **kw)
    first.partial_fit(x[:150])
    first.save(tmp_path)
    resumed = StreamClusterer.load(tmp_path)
    assert resumed.recluster and resumed.get_params() == whole.get_params()
    resumed.partial_fit(x[150:])
    a, b = snapshot(resumed), snapshot(whole)
    assert a[0] == b[0] and np.array_equal(a[1], b[1]) and resumed.stats == whole.stats
    # counts are kept divided by a running scale; a resumed run's rounds in its last digits
    assert [(i, lab, seen) for i, lab, _, seen in a[2]] == [(i, lab, seen) for i, lab, _, seen in b[2]]
    assert [n for _, _, n, _ in a[2]] == pytest.approx([n for _, _, n, _ in b[2]], rel=1e-12)


def test_repairs_thin_out_while_the_full_memory_is_spread_over_many_clusters(tmp_path):
    """150 classes seen 4 times each: once the memory is full it touches more than a quarter as
    many clusters as it holds samples, and repairs come every SPARSE_PERIOD x refine_every samples;
    a stream of a few large clusters keeps the period. A resumed stream keeps the period too."""
    x, _, _ = blobs(n_classes=150, per_class=4, noise=0.01, seed=5)
    c = StreamClusterer(D, threshold=0.05)
    c.partial_fit(x)
    # at 50..250 the memory is not full; at 300 it is, and sparse: then 300 + 200 = 500
    assert c.stats["refinements"] == 7 and c._period == clustering.SPARSE_PERIOD * 50
    first = StreamClusterer(D, threshold=0.05)
    first.partial_fit(x[:333])
    first.save(tmp_path)
    resumed = StreamClusterer.load(tmp_path)
    resumed.partial_fit(x[333:])
    assert resumed.stats == c.stats and np.array_equal(resumed.prototypes()[1], c.prototypes()[1])
    dense, _ = _pairs_stream()
    d = StreamClusterer(D, threshold=1.0, distance="sqeuclidean")
    d.partial_fit(dense)
    assert d._period == 50 and d.stats["refinements"] == len(dense) // 50


def test_two_means_per_group_matches_a_direct_two_means():
    from protoedge.runtime.clustering import _two_means

    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, D)).astype(np.float32)
    x[:20] += 3.0  # group 0 (rows 0-29) holds two clear halves: rows 0-19 and 20-29
    far, gap = _two_means(x, np.array([30, 20]))
    halves = {tuple(np.flatnonzero(far[:30])), tuple(np.flatnonzero(~far[:30]))}
    assert tuple(range(20)) in halves and tuple(range(20, 30)) in halves
    assert gap[0] == pytest.approx(float(((x[:20].mean(0) - x[20:30].mean(0)) ** 2).sum()), rel=1e-4)
    assert gap[0] > 10 * gap[1]


def test_stream_recovers_well_separated_classes():
    from protoedge.metrics import clustering_scores

    x, y, _ = blobs(n_classes=8, per_class=50, noise=0.08)
    c = StreamClusterer(D, threshold=0.6, refine_every=100)
    pred = [c.resolve(a.cluster_id) for a in c.partial_fit(x)]
    s = clustering_scores(y, pred)
    assert s["acc"] > 0.97 and s["ari"] > 0.95
    assert abs(s["clusters_found"] - 8) <= 2


def test_few_shot_prototypes_classify_and_update():
    x, y, centres = blobs(n_classes=5, per_class=20, noise=0.1, seed=3)
    c = StreamClusterer(D, threshold=0.8)
    first = [int(np.flatnonzero(y == k)[0]) for k in range(5)]
    ids = c.learn_examples(x[first], [f"c{k}" for k in range(5)])
    assert len(ids) == 5 and c.n_clusters == 5
    pred = c.predict(x)
    acc = np.mean([p.label == f"c{t}" for p, t in zip(pred, y)])
    assert acc > 0.95
    # more examples of a known class refine its prototype instead of opening another
    before = c.clusters()
    c.learn_examples(x[y == 0][:5], ["c0"] * 5)
    after = {i.label: i for i in c.clusters()}
    assert c.n_clusters == 5 and after["c0"].count == pytest.approx(6.0)
    assert after["c0"].id == ids["c0"] and len(before) == 5


def test_label_turns_a_cluster_into_a_known_class():
    c = StreamClusterer(D, threshold=0.5)
    a = c.partial_fit(np.stack([axis(0), axis(1)]))
    c.label(a[0].cluster_id, "zero")
    r = c.predict(np.stack([unit(axis(0) + axis(1, 0.1))]))[0]
    assert r.label == "zero" and r.cluster_id == a[0].cluster_id
    # labelling a second cluster with the same name merges the two into one class
    survivor = c.label(a[1].cluster_id, "zero")
    assert c.n_clusters == 1 and c.clusters()[0].label == "zero"
    assert c.resolve(a[0].cluster_id) == c.resolve(a[1].cluster_id) == survivor


def test_predict_leaves_state_unchanged_and_flags_would_be_new():
    x, _, _ = blobs()
    c = StreamClusterer(D, threshold=0.5)
    c.partial_fit(x[:50])
    before = snapshot(c)
    far = c.predict(np.stack([-x[0]]))[0]
    c.predict(x[50:])
    assert same_state(before, snapshot(c))
    assert far.new_cluster and far.cluster_id >= 0  # the nearest cluster is still named


def test_nearest_prototype_search_matches_brute_force_after_growth():
    rng = np.random.default_rng(5)
    protos = unit(rng.normal(size=(300, D)))
    c = StreamClusterer(D, threshold=1e-6, max_clusters=1000, merge_threshold=0)
    c.partial_fit(protos)                        # 300 clusters: the matrix doubled several times
    assert c.n_clusters == 300
    q = unit(rng.normal(size=(50, D)))
    ids, p = c.prototypes()
    expected = ids[np.argmax(q @ p.T, axis=1)]
    assert [r.cluster_id for r in c.predict(q)] == expected.tolist()


@pytest.mark.parametrize("bad, message", [
    (np.full((2, D), np.nan, np.float32), "NaN"),
    (np.ones((2, D + 1), np.float32), "shaped"),
    (np.ones((0, D), np.float32), "empty"),
    (np.ones((2, 2, D), np.float32), "shaped"),
    (np.array([["a"] * D]), "floating"),
    (np.zeros((1, D), np.float32), "all-zero"),
])
def test_bad_embeddings_are_refused_without_touching_state(bad, message):
    x, _, _ = blobs()
    c = StreamClusterer(D, threshold=0.5)
    c.partial_fit(x[:30])
    before = snapshot(c)
    for call in (c.partial_fit, c.predict, lambda b: c.learn_examples(b, ["a"] * len(b))):
        with pytest.raises(InputError, match=message):
            call(bad)
    assert same_state(before, snapshot(c))


def test_bad_labels_and_ids_are_refused():
    c = StreamClusterer(D, threshold=0.5)
    with pytest.raises(InputError, match="labels for"):
        c.learn_examples(np.stack([axis(0), axis(1)]), ["a"])
    with pytest.raises(InputError, match="non-empty"):
        c.learn_examples(np.stack([axis(0)]), [""])
    with pytest.raises(InputError, match="no cluster"):
        c.label(42, "x")
    with pytest.raises(InputError):
        StreamClusterer(D, threshold=-1)
    assert c.n_clusters == 0


def test_threshold_from_calibration_rule_and_stored_threshold():
    cal = {"same_item_quantiles": {"0.95": 0.3, "0.99": 0.4}, "different_item_quantiles": {"0.05": 0.75},
           "new_cluster_threshold": 0.5}
    # a bundle exported before the threshold was stored: the rule, 1.2 x the midpoint
    assert threshold_from_calibration(cal) == pytest.approx(0.6)
    # the threshold export chose (and stored) wins over the rule
    stored = dict(cal, cluster_threshold={"value": 1.1, "chosen_by": "stream silhouette", "rule_threshold": 0.6})
    assert threshold_from_calibration(stored) == pytest.approx(1.1)
    with pytest.raises(StateError):
        threshold_from_calibration(dict(cal, cluster_threshold={"value": -1}))
    with pytest.raises(StateError):
        threshold_from_calibration({})


@pytest.mark.parametrize("distance", ["cosine", "sqeuclidean"])
def test_batched_partial_fit_equals_one_sample_at_a_time(distance):
    """partial_fit scores a batch with one matrix product and patches columns as prototypes change;
    that must be the same as learning sample by sample (merges, evictions, refinement included)."""
    x, _, _ = blobs(n_classes=12, per_class=25, noise=0.15, seed=7)
    params = dict(threshold=0.5, distance=distance, max_clusters=10, merge_threshold=0.45, refine_every=37,
                  decay=0.99, max_spread=4.0)
    batched, single = StreamClusterer(D, **params), StreamClusterer(D, **params)
    a = batched.partial_fit(x)
    b = [r for i in range(len(x)) for r in single.partial_fit(x[i:i + 1])]
    assert [(r.cluster_id, r.new_cluster, r.label) for r in a] == [(r.cluster_id, r.new_cluster, r.label) for r in b]
    np.testing.assert_allclose([r.distance for r in a[1:]], [r.distance for r in b[1:]], atol=1e-4)
    st = batched.stats
    assert st["merged"] > 0 and st["evicted"] > 0 and st["refinements"] > 0  # every path was exercised
    np.testing.assert_allclose(batched.prototypes()[1], single.prototypes()[1], atol=1e-4)


def test_merge_and_remove_by_id():
    c = StreamClusterer(D, threshold=0.5, distance="sqeuclidean", decay=1.0, merge_threshold=0, refine_every=0)
    a = c.partial_fit(np.stack([axis(0), axis(0), axis(0), axis(1), axis(2)]))
    ids = [a[0].cluster_id, a[3].cluster_id, a[4].cluster_id]
    survivor = c.merge(ids[:2])
    assert survivor == ids[0]  # the heavier cluster keeps its id
    info = {i.id: i for i in c.clusters()}
    assert set(info) == {ids[0], ids[2]} and info[ids[0]].count == pytest.approx(4.0)
    _, protos = c.prototypes()
    np.testing.assert_allclose(protos[0], (3 * axis(0) + axis(1)) / 4, atol=1e-6)
    assert c.resolve(ids[1]) == ids[0]
    c.remove(ids[2])
    assert [i.id for i in c.clusters()] == [ids[0]]
    assert c.predict(np.stack([axis(2)]))[0].cluster_id == ids[0]
    with pytest.raises(InputError, match="no cluster"):
        c.remove(ids[2])


def test_silhouette_matches_scikit_learn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    from protoedge.runtime.threshold_search import silhouette

    x, y, _ = blobs(n_classes=4, per_class=30, noise=0.3, seed=2)
    labels = y.copy()
    labels[:3] = 99  # a small cluster, and a singleton next
    labels[3] = 100
    assert silhouette(x, labels) == pytest.approx(sklearn_metrics.silhouette_score(x, labels), abs=1e-6)


def test_unlabelled_threshold_selection_recovers_a_too_small_threshold():
    from protoedge.runtime.threshold_search import select_threshold

    x, y, _ = blobs(n_classes=6, per_class=40, noise=0.12, seed=4)
    make = lambda tau: StreamClusterer(D, threshold=tau)
    base = 0.25  # too small: most samples would open a cluster of their own
    got = select_threshold(make, [x[:120], x[120:]], base)
    assert got["factor"] > 1.0
    c = StreamClusterer(D, threshold=got["threshold"])
    c.partial_fit(x)
    assert abs(c.n_clusters - 6) <= 2
    with pytest.raises(InputError):
        select_threshold(make, [x[:2]], base)


# ----------------------------------------------------------------------------- held candidates, merges

def test_a_far_sample_is_a_candidate_until_a_second_one_joins_it():
    c = StreamClusterer(D, threshold=0.3, decay=1.0, refine_every=0)
    first = c.partial_fit(np.stack([axis(0)]))[0]
    assert first.new_cluster and c.n_clusters == 1 and c.n_found == 0 and c.n_candidates == 1
    second = c.partial_fit(np.stack([unit(axis(0) + axis(1, 0.2))]))[0]
    # the cluster opens with the id the first sample was given on arrival
    assert not second.new_cluster and second.cluster_id == first.cluster_id
    assert c.n_found == 1 and c.n_candidates == 0
    lone = c.partial_fit(np.stack([axis(5)]))[0]  # far from everything and alone: held
    assert lone.new_cluster and c.n_found == 1 and c.n_candidates == 1
    c.learn_examples(np.stack([axis(7)]), ["seven"])  # one labelled example is a known class at once
    assert c.n_found == 2 and c.n_candidates == 1
    single = StreamClusterer(D, threshold=0.3, min_size=1)  # min_size=1: every cluster counts at once
    single.partial_fit(np.stack([axis(0)]))
    assert single.n_found == 1 and single.n_candidates == 0


def test_a_candidate_is_never_merged_until_it_is_established():
    c = StreamClusterer(D, threshold=0.01, decay=1.0, refine_every=0, merge_threshold=0.0)
    c.partial_fit(np.stack([axis(0)] * 3 + [unit(axis(0) + axis(1, 0.3))]))  # A: 3 samples, B: one
    ids = sorted(i.id for i in c.clusters())
    c.threshold, c.merge_threshold, c.max_spread = 0.5, 0.2, 0.25  # A and B are 0.084 apart
    c.partial_fit(np.stack([axis(0)]))  # joins A, B is the runner-up within merge distance
    assert c.stats["merged"] == 0 and c.n_clusters == 2 and c.n_candidates == 1
    c.partial_fit(np.stack([unit(axis(0) + axis(1, 0.3))]))  # B's second sample: now both are established
    assert c.stats["merged"] == 1 and c.n_clusters == 1
    assert c.resolve(ids[0]) == c.resolve(ids[1])


def test_merge_refused_when_the_merged_cluster_would_be_too_wide():
    c = StreamClusterer(D, threshold=0.01, decay=1.0, refine_every=0, merge_threshold=0.0)
    # two wide clusters (members spread across other axes) whose centres are 20 degrees (0.12) apart
    centre = lambda deg: unit(axis(0) * math.cos(math.radians(deg)) + axis(1, math.sin(math.radians(deg))))
    for mid in (0.0, 20.0):
        c.threshold = 0.01
        first = c.partial_fit(np.stack([centre(mid)] * 6))[0].cluster_id
        c.threshold = 0.5
        for k in range(2, 8):
            for sign in (1, -1):
                assert c.partial_fit(np.stack([unit(centre(mid) + axis(k, 0.45 * sign))]))[0].cluster_id == first
    ids, spread = c.spreads()
    assert len(ids) == 2 and (spread > 0.08).all()  # 12 of 18 members joined 0.15-0.25 from it
    c.merge_threshold, c.max_spread = 0.2, 0.15
    c.partial_fit(np.stack([centre(10.0)]))  # between the two: joins one, the other is the runner-up
    assert c.stats["merged"] == 0 and c.n_clusters == 2
    c.max_spread = 0.5  # a looser bound lets the same pair merge
    c.partial_fit(np.stack([centre(10.0)]))
    assert c.stats["merged"] == 1 and c.n_clusters == 1


def _separated_blobs(n=6, sep=0.3, noise=0.03, per=40, seed=0):
    rng = np.random.default_rng(seed)
    centres = np.eye(D)[:n] * math.sqrt(sep / 2)  # every pair of centres sep apart (squared)
    y = rng.permutation(np.repeat(np.arange(n), per))
    return (centres[y] + noise * rng.normal(size=(len(y), D))).astype(np.float32), y


def test_merges_do_not_chain_across_well_separated_clusters_with_a_low_temperature():
    """A weakly trained encoder: short distances and a low logit scale. The old soft refinement used
    that scale as is, so its votes were nearly uniform, pulled every prototype to the window mean,
    and the prototypes merged in a chain (the demo's one 817-image cluster). The repair is hard
    and must keep blobs 0.3 apart, threshold 0.15, apart:"""
    x, y = _separated_blobs()
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    assert d[y[:, None] == y[None]].max() < 0.15 < d[y[:, None] != y[None]].min()
    c = StreamClusterer(D, threshold=0.15, distance="sqeuclidean", temperature=1.0, refine_every=20, decay=1.0)
    ids = np.array([c.resolve(a.cluster_id) for a in c.partial_fit(x)])
    assert c.n_found == 6 and c.stats["merged"] == 0 and c.stats["split"] == 0
    assert c.stats["refinements"] == len(x) // 20
    assert all(len(np.unique(y[ids == k])) == 1 for k in np.unique(ids))  # every cluster is one blob


def test_state_format_1_still_loads(tmp_path):
    from protoedge.runtime.state import load_latest, save_generation

    c = StreamClusterer(D, threshold=0.3, refine_every=0)
    x, _, _ = blobs(n_classes=4, per_class=10, noise=0.05, seed=3)
    c.partial_fit(x)
    c.save(tmp_path / "new")
    arrays, meta, _ = load_latest(tmp_path / "new")
    # what format 1 wrote: no spread, no min_size / max_spread among the settings
    arrays = {k: v for k, v in arrays.items() if k != "stored_spread"}
    meta = dict(meta, format=1, params={k: v for k, v in meta["params"].items() if k not in ("min_size", "max_spread")})
    save_generation(tmp_path / "old", arrays, meta)
    r = StreamClusterer.load(tmp_path / "old")
    assert r.predict(x) == c.predict(x) and r.clusters() == c.clusters()
    ids, spread = r.spreads()
    assert np.allclose(spread, r.max_spread)  # unknown width: assumed as wide as a merge allows
    with pytest.raises(StateError, match="format"):
        save_generation(tmp_path / "future", arrays, dict(meta, format=99))
        StreamClusterer.load(tmp_path / "future")


def test_an_input_buffer_the_caller_reuses_does_not_change_the_refinement():
    # the refinement window keeps rows across calls: they must not be views of the caller's memory
    x, _ = _separated_blobs()
    fresh = StreamClusterer(D, threshold=0.1, distance="sqeuclidean", refine_every=20)
    reused = StreamClusterer(D, threshold=0.1, distance="sqeuclidean", refine_every=20)
    buf = np.empty((4, D), np.float32)
    for i in range(0, len(x), 4):
        want = fresh.partial_fit(x[i:i + 4].copy())
        buf[:] = x[i:i + 4]
        assert reused.partial_fit(memoryview(buf)) == want
    assert fresh.stats["refinements"] > 0
    np.testing.assert_array_equal(reused.prototypes()[1], fresh.prototypes()[1])


def test_blas_runs_on_one_thread_inside_the_clusterer_and_is_restored_after(monkeypatch):
    from threadpoolctl import threadpool_info, threadpool_limits

    from protoedge.runtime.clustering import one_blas_thread

    with one_blas_thread():  # picks the BLAS libraries loaded now: numpy's (scipy may bring its own later)
        pass
    ours = {lib.filepath for lib in one_blas_thread._libs}
    assert ours

    def blas_threads():
        return [i["num_threads"] for i in threadpool_info() if i["filepath"] in ours]

    # where the clusterer multiplies matrices: the numpy loop's batch and its repair, and the
    # re-clustering's distances (the compiled loop and repair use no BLAS)
    seen = []
    names = ["_recluster"] + ([] if StreamClusterer.compiled else ["_fit_batch", "_repair"])
    for name in names:
        def spy(self, *a, _real=getattr(StreamClusterer, name)):
            seen.append(blas_threads())
            return _real(self, *a)

        monkeypatch.setattr(StreamClusterer, name, spy)
    x, _, _ = blobs(n_classes=3, per_class=30)
    with threadpool_limits(limits=2, user_api="blas"):
        before = blas_threads()
        c = StreamClusterer(D, threshold=0.5, refine_every=20, recluster=True)
        c.partial_fit(x)
        assert blas_threads() == before
    assert c.stats["refinements"] > 0 and len(seen) >= len(names)
    assert all(t == [1] * len(before) for t in seen)


def test_the_one_thread_blas_limit_holds_until_the_last_block_on_any_thread_ends():
    """Blocks nest (a caller's block around several clusterer calls) and overlap across threads
    (the daemon's worker and a caller): the limit stays until the last one leaves, then the
    setting from before the first comes back. (OpenBLAS ignores a raise of its thread count asked
    from a thread other than the main one, so the restore is checked with the main thread last.)"""
    import threading

    from threadpoolctl import threadpool_info, threadpool_limits

    from protoedge.runtime.clustering import one_blas_thread

    with one_blas_thread():
        pass
    ours = {lib.filepath for lib in one_blas_thread._libs}

    def blas_threads():
        return [i["num_threads"] for i in threadpool_info() if i["filepath"] in ours]

    def other_thread_inside(inside, leave):
        with one_blas_thread():
            inside.set()
            leave.wait(10)

    with threadpool_limits(limits=2, user_api="blas"):
        before = blas_threads()
        one = [1] * len(before)
        with one_blas_thread():
            with one_blas_thread():
                assert blas_threads() == one
            assert blas_threads() == one  # the inner block left the limit on
            inside, leave = threading.Event(), threading.Event()
            t = threading.Thread(target=other_thread_inside, args=(inside, leave))
            t.start()
            assert inside.wait(10)
            leave.set()
            t.join(10)
            assert blas_threads() == one  # the other thread left first: this block still holds
        assert blas_threads() == before

        inside, leave = threading.Event(), threading.Event()
        t = threading.Thread(target=other_thread_inside, args=(inside, leave))
        with one_blas_thread():
            t.start()
            assert inside.wait(10)
        assert blas_threads() == one  # this block left first: the other thread's still holds
        leave.set()
        t.join(10)


@pytest.mark.parametrize("memory", [256, 10])
def test_a_batch_remembers_the_same_rows_as_one_sample_at_a_time(memory):
    """partial_fit writes a batch's rows into the repair memory in bulk (before each repair and at
    the end); the memory must be what sample-by-sample learning leaves, also when it is smaller
    than a batch."""
    x, _, _ = blobs(n_classes=6, per_class=30, noise=0.15, seed=3)
    params = dict(threshold=0.5, refine_every=23, memory=memory, max_spread=4.0)
    batched, single = StreamClusterer(D, **params), StreamClusterer(D, **params)
    batched.partial_fit(x[:100])
    batched.partial_fit(x[100:])
    for row in x:
        single.partial_fit(row)
    for got, want in zip(batched._memory(), single._memory()):
        np.testing.assert_array_equal(got, want)
    assert batched._pending == single._pending and batched.stats == single.stats


def test_atomic_undoes_every_call_in_a_block_that_raises():
    x, _, _ = blobs(n_classes=4, per_class=40, noise=0.15, seed=5)
    c = StreamClusterer(D, threshold=0.5, refine_every=16)
    c.partial_fit(x[:50])
    before, memory, stats = snapshot(c), c._memory(), c.stats
    with pytest.raises(InputError):
        with c.atomic():
            c.partial_fit(x[50:120])  # learns (repairs included) ...
            c.partial_fit(np.full((2, D), np.nan))  # ... then a piece is refused
    assert same_state(snapshot(c), before) and c.stats == stats
    assert all(np.array_equal(a, b) for a, b in zip(c._memory(), memory))
    with c.atomic():  # a block that succeeds keeps what it learned
        c.partial_fit(x[50:120])
    assert c.n_seen == 120


@pytest.mark.parametrize("handover", [None, 30])
def test_compiled_and_numpy_loops_agree_on_a_long_stream(loop, handover, monkeypatch):
    """Both loops run the same algorithm: on 1,800 samples of 60 noisy classes (opens, joins,
    merges, repairs, evictions at a cap of 40) every sample gets the same cluster, with distances
    equal to float precision. They round dot products differently, so not bit for bit. With
    ``handover`` the C loop gives way to the numpy one above that many clusters, mid-stream."""
    if loop == "numpy" or clustering._rowloop is None:
        pytest.skip("runs once, with both loops")
    if handover:
        monkeypatch.setattr(clustering, "ROWLOOP_MAX_CLUSTERS", handover)
    x, _, _ = blobs(n_classes=60, per_class=30, noise=0.1, seed=7)
    for distance, params in (("cosine", {}), ("sqeuclidean", {"max_clusters": 40})):
        runs = []
        for compiled in (True, False):
            monkeypatch.setattr(StreamClusterer, "compiled", compiled)
            c = StreamClusterer(D, threshold=0.8, distance=distance, refine_every=25, **params)
            runs.append([a for s in range(0, len(x), 64) for a in c.partial_fit(x[s:s + 64])])
            runs[-1].append(c.stats)
        fast, slow = runs
        assert [a.cluster_id for a in fast[:-1]] == [a.cluster_id for a in slow[:-1]]
        assert [a.new_cluster for a in fast[:-1]] == [a.new_cluster for a in slow[:-1]]
        np.testing.assert_allclose([a.distance for a in fast[:-1]], [a.distance for a in slow[:-1]], rtol=1e-4,
                                   atol=1e-5)
        assert fast[-1] == slow[-1] and fast[-1]["merged"] + fast[-1]["split"] > 0
        if distance == "sqeuclidean":
            assert fast[-1]["evicted"] > 0


def test_compiled_loop_refuses_arrays_of_the_wrong_kind(loop):
    """The loop writes into the arrays it is given: a wrong dtype, shape or length is an error,
    never a write past an array's end."""
    if loop == "numpy" or clustering._rowloop is None:
        pytest.skip("the compiled loop only")
    fit_rows = clustering._rowloop.fit_rows
    rows, cap, d = 4, 8, D
    good = dict(x=np.zeros((rows, d), np.float32), inv=np.ones(rows),
                xx=None, search=np.zeros((cap, d), np.float32), sums=np.zeros((cap, d), np.float32),
                counts=np.zeros(cap), spread=np.zeros(cap), seen=np.zeros(cap, np.int64),
                last=np.zeros(cap, np.int64), sqn=np.zeros(cap, np.float32), ids=np.arange(cap) + 7,
                out_j=np.zeros(rows, np.int64), out_d=np.zeros(rows), out_c=np.zeros(rows))

    def call(n=2, end=rows, labels=None, cls=clustering.Assignment, out=None, **bad):
        labels = ["x", None] if labels is None else labels
        return fit_rows(*{**good, **bad}.values(), n, 0, end, 0, 0.5, 0.0, 0.0, 10.0,  # merging off
                        labels, cls, [] if out is None else out)

    good["search"][:2, 0] = good["x"][:, 0] = 1.0
    results = []
    assert call(out=results)[:2] == (rows, 0)  # all four join slot 0: cluster id 7, named "x"
    assert [(type(a), a.cluster_id, a.new_cluster, a.label) for a in results] == [(clustering.Assignment, 7, False, "x")] * 4
    assert results[0].distance == 0.0 and 0 < results[0].confidence <= 1
    for bad in ({"x": np.zeros((rows, d))}, {"sums": np.zeros((cap, d + 1), np.float32)},
                {"counts": np.zeros(1)}, {"out_j": np.zeros(rows - 1, np.int64)},
                {"seen": np.zeros(cap, np.int32)}, {"search": np.zeros((cap, d), np.float32)[:, ::2]},
                {"xx": np.zeros(1)}, {"ids": np.zeros(1, np.int64)}):
        with pytest.raises((ValueError, BufferError)):
            call(**bad)
    for bad in ({"labels": ["x"]}, {"labels": ("x", None)}, {"cls": dict}, {"out": ()}):
        with pytest.raises(TypeError):
            call(**bad)
    with pytest.raises(ValueError):
        call(n=cap + 1, labels=[None] * (cap + 1))  # more slots than the arrays hold
    with pytest.raises(ValueError):
        call(end=rows + 1)
    ro = good["sums"].copy()
    ro.flags.writeable = False
    with pytest.raises((ValueError, BufferError)):
        call(sums=ro)
    with pytest.raises(TypeError):
        fit_rows(1, 2)


def _repair_stream(distance, seed, noise, threshold, classes):
    """A stream with known classes among its clusters, and a state in which the repair splits and
    merges (40 drawings a class, 60 clusters at most, repairs every 20 samples over 96)."""
    x, _, _ = blobs(n_classes=classes, per_class=40, noise=noise, seed=seed)
    c = StreamClusterer(D, threshold=threshold, distance=distance, refine_every=20, memory=96, max_clusters=60)
    c.learn_examples(x[:6], ["a", "b", "a", "c", "b", "d"])
    out = [a for s in range(6, len(x), 50) for a in c.partial_fit(x[s:s + 50])]
    return c, out


def _same_clusterer(fast, slow):
    assert fast.stats == slow.stats
    assert fast._labels == slow._labels and fast._slot == slow._slot and fast._aliases == slow._aliases
    n = fast._n
    assert np.array_equal(fast._ids[:n], slow._ids[:n]) and np.array_equal(fast._seen[:n], slow._seen[:n])
    assert np.array_equal(fast._created[:n], slow._created[:n]) and np.array_equal(fast._last[:n], slow._last[:n])
    assert all(np.array_equal(a, b) for a, b in zip(fast._memory(), slow._memory()))
    for name in ("_sums", "_counts", "_spread", "_search", "_sqn"):
        np.testing.assert_allclose(getattr(fast, name)[:n], getattr(slow, name)[:n], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("distance", ["cosine", "sqeuclidean"])
def test_compiled_repair_matches_the_numpy_repair(loop, distance, monkeypatch):
    """The repair in C (_rowloop.repair, its log replayed in Python) and the numpy repair make the
    same splits, moves, dissolves and merges: the same assignments, counters, ids, names, aliases
    and memory, and the same state to float precision; known classes keep their names."""
    if loop == "numpy" or clustering._rowloop is None:
        pytest.skip("runs once, with both loops")
    for seed, noise, threshold, classes in ((2, 0.2, 1.0, 20), (3, 0.3, 1.2, 12)):
        runs = []
        for compiled in (True, False):
            monkeypatch.setattr(StreamClusterer, "compiled", compiled)
            runs.append(_repair_stream(distance, seed, noise, threshold, classes))
        (fast, fast_out), (slow, slow_out) = runs
        assert [a.cluster_id for a in fast_out] == [a.cluster_id for a in slow_out]
        assert [a.label for a in fast_out] == [a.label for a in slow_out]
        _same_clusterer(fast, slow)
        assert fast.stats["split"] > 5 and fast.stats["merged"] > 3
        assert {"a", "b", "c", "d"} <= set(fast._labels)
    # Dissolves: point two clusters' prototypes away from their remembered members, so that all of
    # them, and so all of the clusters' mass (no decay, every sample remembered), move to the
    # neighbours; the unlabelled one is dissolved, the known class keeps its slot and name.
    states = []
    for compiled in (True, False):
        monkeypatch.setattr(StreamClusterer, "compiled", compiled)
        x, _, _ = blobs(n_classes=6, per_class=12, noise=0.1, seed=5)
        c = StreamClusterer(D, threshold=0.8, distance=distance, decay=1.0, refine_every=10**6, memory=128,
                            merge_threshold=0)
        c.partial_fit(x)
        ids, _ = c.prototypes()
        c.label(int(ids[2]), "known")
        for s in (1, 2):  # (slot 0 holds two classes: the repair splits it too)
            c._search[s] = -c._search[s]
            c._sqn[s] = float(c._search[s] @ c._search[s])
        flipped = c._search[2].copy()
        c._repair()
        states.append(c)
        known = c._slot[int(ids[2])]
        assert c._counts[known] * c._cscale < 1e-6 and np.array_equal(c._search[known], flipped)
    fast, slow = states
    _same_clusterer(fast, slow)
    assert fast.stats["dissolved"] == 1 and fast.stats["split"] == 1 and "known" in fast._labels
    assert int(ids[1]) not in fast._slot and fast.resolve(int(ids[1])) in fast._slot  # resolves to its heir


def test_compiled_repair_refuses_bad_arguments_before_changing_anything(loop):
    """_rowloop.repair checks every array (dtype, shape, room for the clusters a split may open,
    the log's length) and every slot before it writes anything."""
    if loop == "numpy" or clustering._rowloop is None:
        pytest.skip("the compiled loop only")
    c, _ = _repair_stream("cosine", 2, 0.2, 1.0, 20)
    n = c._n
    x, mem_ids, _ = c._memory()
    m = len(x)
    slots = c._slots_of(mem_ids)

    def call(**change):
        args = dict(x=x, slots=slots.copy(), weight=np.ones(m), fresh=np.ones(m, bool), mem_ids=np.empty(m, np.int64),
                    sums=c._sums, search=c._search, sqn=c._sqn, counts=c._counts, spread=c._spread, seen=c._seen,
                    created=c._created, last=c._last, ids=c._ids, codes=np.full(len(c._sums), -1, np.int64),
                    ops=np.empty((5 * m + 8, 5), np.int64), n=n, max_clusters=n)
        args.update(change)
        return clustering._rowloop.repair(*args.values(), 1, 10, 1.0, 1.0, clustering.SPLIT_DISTANCE,
                                          clustering.SPLIT_MIN, 0.25, clustering.MERGE_CAP, clustering.MERGE_COST,
                                          2, True)

    before = snapshot(c)
    bad_slots = slots.copy()
    bad_slots[3] = n
    with pytest.raises(ValueError, match="live slot"):
        call(slots=bad_slots)
    with pytest.raises(ValueError, match="wrong dtype"):
        call(x=x.astype(np.float64))
    with pytest.raises(ValueError, match="ops"):  # too short a log
        call(ops=np.empty((5 * m, 5), np.int64))
    with pytest.raises(ValueError, match="sums"):  # no room for the clusters a split may open
        call(max_clusters=len(c._sums) + 10)
    with pytest.raises(ValueError, match="max_clusters"):
        call(max_clusters=n - 1)
    with pytest.raises(TypeError):
        clustering._rowloop.repair(x, slots)
    assert same_state(snapshot(c), before)


@pytest.mark.parametrize("distance", ["cosine", "sqeuclidean"])
def test_compiled_move_matches_numpy_and_checks_slots(loop, distance, monkeypatch):
    """The re-clustering's move of remembered samples, in C, gives the numpy code's state to float
    precision; a slot outside the live ones is refused before anything is written."""
    if loop == "numpy" or clustering._rowloop is None:
        pytest.skip("the compiled loop only")
    x, _, _ = blobs(n_classes=6, per_class=30, noise=0.2, seed=11)

    def build():  # the same stream gives the same state
        c = StreamClusterer(D, threshold=0.6, distance=distance, refine_every=0)
        c.partial_fit(x)
        return c

    base = build()
    n = base._n
    rng = np.random.default_rng(2)
    rows = rng.choice(len(x), 40, replace=False)
    src, dst = rng.integers(0, n, 40), rng.integers(0, n, 40)
    weight = rng.uniform(0.5, 1.5, 40)
    states = []
    for compiled in (True, False):
        monkeypatch.setattr(StreamClusterer, "compiled", compiled)
        c = build()
        c._move(base._prepare(x[rows]), src, dst, weight)
        states.append(c)
    fast, slow = states
    for name in ("_sums", "_counts", "_spread", "_search", "_sqn"):
        np.testing.assert_allclose(getattr(fast, name)[:n], getattr(slow, name)[:n], rtol=1e-4, atol=1e-5)
    assert np.array_equal(fast._seen[:n], slow._seen[:n]) and not np.array_equal(fast._seen[:n], base._seen[:n])
    assert (fast._spread[:n] >= 0).all() and (fast._seen[:n] >= 0).all()
    before = fast._sums.copy()
    with pytest.raises(ValueError, match="live slot"):
        clustering._rowloop.move(fast._prepare(x[:2]), np.array([0, n], np.int64), np.array([1, 1], np.int64),
                                 np.ones(2), fast._sums, fast._counts, fast._spread, fast._seen, fast._search,
                                 fast._sqn, n, distance == "cosine")
    assert np.array_equal(fast._sums, before)


def test_avx2_scores_are_bit_for_bit_the_sse2_ones(loop, tmp_path):
    """The compiled loop's 8-wide AVX2 dot products (chosen at import where the CPU has AVX2) sum in
    the same lanes and order as its SSE2 ones: a stream gives the very same distances, bit for
    bit, with the AVX2 path turned off (PROTOEDGE_NO_AVX2)."""
    import subprocess
    import sys

    if loop == "numpy" or clustering._rowloop is None:
        pytest.skip("the compiled loop only")
    if "avx2" not in open("/proc/cpuinfo").read():
        pytest.skip("this CPU has no AVX2")
    x, _, _ = blobs(n_classes=30, per_class=20, noise=0.2, seed=4)
    np.save(tmp_path / "x.npy", np.concatenate([x, x[:, ::-1]], axis=1))  # 32 wide: the vector loop and more
    code = ("import sys, numpy as np\n"
            "from protoedge.runtime.clustering import StreamClusterer\n"
            "x = np.load(sys.argv[1])\n"
            "c = StreamClusterer(x.shape[1], threshold=0.7, refine_every=25)\n"
            "print([(a.cluster_id, a.distance.hex()) for a in c.partial_fit(x)])\n")
    runs = []
    for env in ({}, {"PROTOEDGE_NO_AVX2": "1"}):
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.npy")], capture_output=True, text=True,
                             env={**os.environ, **env}, check=True)
        runs.append(out.stdout)
    assert runs[0] == runs[1] and runs[0].count("0x") > 500


def test_compiled_normalisation_is_numpys_to_the_bit(loop):
    """_prepare's cosine normalisation in C (_rowloop.unit_rows) gives numpy's float32 result bit
    for bit, at every width (numpy's pairwise summation splits rows above 128) and scale, and
    reports NaN / infinite values and zero rows without writing."""
    if loop == "numpy" or clustering._rowloop is None:
        pytest.skip("the compiled loop only")
    rng = np.random.default_rng(0)
    for d in [1, 5, 8, 13, 16, 64, 127, 128, 129, 300, 1000]:
        for scale in (1e-3, 1.0, 1e4):
            x = (rng.normal(size=(20, d)) * scale).astype(np.float32)
            out = np.empty_like(x)
            assert clustering._rowloop.unit_rows(x, out) == 0
            assert np.array_equal(out, x / np.sqrt(np.add.reduce(x * x, axis=1, keepdims=True)))
    x = rng.normal(size=(3, 16)).astype(np.float32)
    for value, status in ((np.nan, 1), (np.inf, 1)):
        y, out = x.copy(), np.zeros_like(x)
        y[1, 3] = value
        assert clustering._rowloop.unit_rows(y, out) == status and not out.any()
    y = x.copy()
    y[2] = 0.0
    assert clustering._rowloop.unit_rows(y, np.empty_like(y)) == 2
    with pytest.raises(ValueError):
        clustering._rowloop.unit_rows(x, np.empty((2, 16), np.float32))


def test_compiled_id_lookup_finds_live_ids_and_reports_the_others(loop):
    """_slots_of's lookup in C (_rowloop.find_ids): every live id's slot, -1 and a count for the
    others (which Python resolves through its aliases), at table sizes around the powers of two."""
    if loop == "numpy" or clustering._rowloop is None:
        pytest.skip("the compiled loop only")
    rng = np.random.default_rng(1)
    for n in (0, 1, 7, 8, 9, 100, 1024, 3000):
        ids = rng.choice(10 * n + 10, size=n, replace=False).astype(np.int64)
        query = np.concatenate([ids, rng.integers(-5, 10 * n + 20, 200)]).astype(np.int64)
        rng.shuffle(query)
        out = np.empty(len(query), np.int64)
        missing = clustering._rowloop.find_ids(query, ids, n, out)
        slot = {int(v): s for s, v in enumerate(ids)}
        want = np.array([slot.get(int(q), -1) for q in query])
        assert np.array_equal(out, want) and missing == int((want < 0).sum())
    with pytest.raises(ValueError):  # fewer ids than n
        clustering._rowloop.find_ids(query, ids[:2], 3, out)
    with pytest.raises(ValueError):  # an output shorter than the query
        clustering._rowloop.find_ids(query, ids, n, out[:-1])


def test_repair_memory_holds_the_newest_samples_across_batch_sizes(loop):
    """The memory is the newest `memory` samples, oldest first, with the cluster each joined and
    its step, whatever the batches' sizes (one row, a few, more than the memory at once) and
    however often its buffer has moved its rows to the front."""
    x, _, _ = blobs(n_classes=6, per_class=60, noise=0.1, seed=3)
    c = StreamClusterer(D, threshold=0.8, refine_every=10**6, memory=32)  # remembers, never repairs
    rows, ids, seen = [], [], 0
    for size in [1, 7, 64, 5, 33, 100, 1, 1, 40, 31, 77]:
        batch = x[seen % len(x):][:size]
        out = c.partial_fit(batch)
        rows += list(c._prepare(batch))
        ids += [a.cluster_id for a in out]
        seen += len(batch)
        mem_x, mem_ids, mem_steps = c._memory()
        k = min(32, seen)
        assert np.array_equal(mem_x, np.array(rows[-k:])) and mem_ids.tolist() == ids[-k:]
        assert mem_steps.tolist() == list(range(seen - k, seen))
