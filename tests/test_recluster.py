"""runtime/recluster.py: Ward cuts and the silhouette choice, on points whose answer is known; and
its compiled ward_cut (runtime/_rowloop.c, on the distances recluster.distances computes) against
the numpy + scipy reference on real repair memories and on edge cases."""
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from protoedge.fewshot import pairwise_sqdist
from protoedge.runtime import recluster
from protoedge.runtime.recluster import better_partition, better_partition_numpy, distances, ward_cut_scores
from protoedge.runtime.threshold_search import silhouette_from_distances

REPO = Path(__file__).resolve().parent.parent
BUNDLE = REPO / "models" / "omniglot" / "bundle"
_rowloop = recluster._rowloop
needs_c = pytest.mark.skipif(_rowloop is None, reason="the extension was not built (no C compiler at install)")


def groups(sizes, spread=0.05, seed=0, dim=8):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(sizes), dim))
    y = np.repeat(np.arange(len(sizes)), sizes)
    return centres[y] + spread * rng.normal(size=(len(y), dim)), y


def labelling(rng, n, k):
    """Labels 0..k-1 for n points, every one used, in random order."""
    return rng.permutation(np.arange(n) % k)


@pytest.fixture(params=["compiled", "numpy"])
def path(request, monkeypatch):
    """better_partition on each path: the compiled ward_cut and the numpy + scipy reference."""
    if request.param == "compiled" and _rowloop is None:
        pytest.skip("the extension was not built (no C compiler at install)")
    monkeypatch.setattr(recluster, "compiled", request.param == "compiled")
    return request.param


def compiled_cut(x, current, span, margin):
    """ward_cut's answer on the rows' distances and its output array (filled with -7 before the
    call)."""
    out = np.full(len(x), -7, np.int64)
    k = _rowloop.ward_cut(distances(x), np.ascontiguousarray(current, np.int64), out, span, margin)
    return k, out


def assert_same_as_reference(x, current, span, margin, same_labels=False):
    """ward_cut gives better_partition_numpy's answer: None (and out untouched), or the same
    partition into as many clusters (and, if asked, the same numbering of them). Returns the
    reference's answer."""
    ref = better_partition_numpy(x, current, span, margin)
    k, out = compiled_cut(x, current, span, margin)
    if ref is None:
        assert k == 0 and (out == -7).all()
    else:
        assert k == ref.max() + 1 == out.max() + 1 and out.min() == 0
        assert len(set(zip(out.tolist(), ref.tolist()))) == k  # one-to-one: the same partition
        if same_labels:
            np.testing.assert_array_equal(out, ref)
    return ref


def test_ward_cut_scores_follow_scipy_fcluster():
    """Each cut is the partition scipy's fcluster gives at that K, and its silhouette (carried
    along the merges) is the one computed afresh from the distance matrix."""
    hierarchy = pytest.importorskip("scipy.cluster.hierarchy")
    x, _ = groups([12, 9, 15, 7, 11], spread=0.6, seed=1)
    tree = hierarchy.linkage(x, "ward")
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    cuts = ward_cut_scores(tree, d, range(2, 12))
    assert sorted(cuts) == list(range(2, 12))
    for k, (score, labels) in cuts.items():
        ref = hierarchy.fcluster(tree, k, "maxclust")
        # the same partition: a one-to-one map between the two labellings
        pairs = set(zip(labels.tolist(), ref.tolist()))
        assert len(pairs) == k == labels.max() + 1 == len(set(ref.tolist()))
        assert sorted(set(labels.tolist())) == list(range(k))
        assert score == pytest.approx(silhouette_from_distances(d, labels), abs=1e-12)
    assert len({round(s, 9) for s, _ in cuts.values()}) > 5  # the cuts do differ


def test_silhouette_from_distances_matches_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    x, y = groups([10, 8, 1, 12], spread=0.4, seed=2)  # a singleton cluster included
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    assert silhouette_from_distances(d, y) == pytest.approx(metrics.silhouette_score(x, y), abs=1e-9)


def test_better_partition_recovers_merged_groups_and_keeps_a_right_one(path):
    x, y = groups([20] * 6, seed=3)
    joined = y // 2  # pairs of groups in one cluster: 3 clusters for 6
    found = better_partition(x, joined, span=5, margin=0.0)
    assert found is not None and found.max() + 1 == 6
    assert len(set(zip(found.tolist(), y.tolist()))) == 6  # the six groups exactly
    assert better_partition(x, y, span=5, margin=0.0) is None  # nothing beats the truth
    assert better_partition(x, np.zeros(len(x), np.int64), span=5, margin=0.0) is None  # one cluster: no silhouette


# ----------------------------------------------------------------------------- compiled ward_cut

@pytest.fixture(scope="module")
def memories():
    """(x, current, span, margin) of every better_partition call the repair makes on 12 streams of
    20 Protocol-A test characters (20 drawings each, shuffled), with the committed bundle and
    recluster=True; the streams run on the reference path."""
    from protoedge.datasets import load_split
    from protoedge.runtime import StreamClusterer, load_bundle, open_encoder

    bundle = load_bundle(BUNDLE)
    test = load_split("omniglot-a", "test")
    rng = np.random.default_rng(11)
    streams = 12
    classes = rng.choice(int(test.labels.max()) + 1, 20 * streams, replace=False)
    pick = np.flatnonzero(np.isin(test.labels, classes))
    emb, labels = open_encoder(bundle, backend="cpu", threads=1).embed(test.images[pick]), test.labels[pick]
    calls = []

    def record(x, current, span, margin):
        calls.append((np.array(x), np.array(current), span, margin))
        return better_partition_numpy(x, current, span, margin)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(recluster, "better_partition", record)
        for s in range(streams):
            order = rng.permutation(np.flatnonzero(np.isin(labels, classes[20 * s:20 * s + 20])))
            c = StreamClusterer.from_bundle(bundle, recluster=True)
            c.partial_fit(emb[order])
    return calls


def test_distances_are_the_references_bit_for_bit(memories):
    """recluster.distances computes better_partition_numpy's matrix: the same bits."""
    for x, *_ in memories[::5] + [(groups([5, 7, 3], seed=9)[0],)]:
        x64 = x.astype(np.float64)
        ref = np.sqrt(pairwise_sqdist(x64, x64))
        np.fill_diagonal(ref, 0.0)
        got = distances(x)
        assert got.dtype == np.float64 and got.flags.c_contiguous
        np.testing.assert_array_equal(got.view(np.int64), ref.view(np.int64))


@needs_c
def test_ward_cut_gives_the_reference_partition_on_real_repair_memories(memories):
    """Every memory the repair handed to better_partition: the compiled cut is the reference's,
    label for label (the numbering follows ward_cut_scores' bookkeeping), and None where the
    reference finds nothing better."""
    assert len(memories) >= 60
    assert {len(x) for x, *_ in memories} >= {100, 200, 256}
    assert memories[0][0].dtype == np.float32  # the clusterer's memory, as the repair passes it
    found = 0
    for x, current, span, margin in memories:
        found += assert_same_as_reference(x, current, span, margin, same_labels=True) is not None
    assert 10 <= found <= len(memories) - 10  # both outcomes compared, many times each
    # and with a bar every cut clears, so that the choice among the cuts decides every time
    for x, current, span, _ in memories[::4]:
        assert assert_same_as_reference(x, current, span, -2.0, same_labels=True) is not None


@needs_c
def test_ward_cut_gives_the_reference_partition_on_edge_cases():
    rng = np.random.default_rng(7)
    cases = []
    # two current clusters (the smallest K0 tried), and every K0 on tiny memories (n = 4..9)
    x, y = groups([15, 12, 9, 14], spread=0.3, seed=4)
    cases += [(x, y // 2, 5, m) for m in (-2.0, 0.0, 0.01)]
    for n in range(4, 10):
        for k0 in range(2, n - 1):
            x = rng.normal(size=(n, 3))
            cases += [(x, labelling(rng, n, k0), span, m) for span in (0, 1, 5) for m in (-2.0, 0.0)]
    # the span reaching past n - 1 and below 2
    x, y = groups([3, 4, 3], spread=0.2, seed=5)
    cases += [(x, labelling(rng, len(x), k0), 20, m) for k0 in (2, 5, 8) for m in (-2.0, 0.0)]
    # ties: duplicated rows and small-integer coordinates (equal distances, equal merge heights),
    # in many orders: scipy's tie rules
    grid = rng.integers(0, 3, size=(24, 4)).astype(np.float64)
    for t in range(6):
        x = np.concatenate([grid, grid[: 8 + t]])[rng.permutation(32 + t)]
        cases += [(x, labelling(rng, len(x), k0), 4, m) for k0 in (2, 6, 12) for m in (-2.0, 0.0)]
    # all rows equal: every height zero, every silhouette zero
    cases.append((np.ones((12, 5)), labelling(rng, 12, 3), 5, -1.0))
    results = [assert_same_as_reference(*case) for case in cases]
    assert sum(r is not None for r in results) > len(results) // 2


@needs_c
def test_ward_cut_rejects_bad_inputs_without_writing():
    rng = np.random.default_rng(0)
    x, cur = rng.normal(size=(20, 8)), labelling(rng, 20, 4)
    d, out = distances(x), np.full(20, -7, np.int64)

    def spoilt(value, at=(3, 5)):
        e = d.copy()
        e[at] = value
        return e

    bad_values = [
        ((d.astype(np.float32), cur, out, 5, 0.0), "dist has the wrong dtype or shape"),
        ((d.ravel(), cur, out, 5, 0.0), "dist has the wrong dtype or shape"),
        ((np.asfortranarray(d[:, :19]), cur, out, 5, 0.0), "not C-contiguous"),
        ((d[:, :19].copy(), cur, out, 5, 0.0), "dist must be n x n"),
        ((d, cur.astype(np.int32), out, 5, 0.0), "current has the wrong dtype or shape"),
        ((d, cur[:19], out, 5, 0.0), "current has the wrong dtype or shape"),
        ((d, np.append(cur, 0), out, 5, 0.0), "current and out of length n"),
        ((d, cur, out[:19], 5, 0.0), "out has the wrong dtype or shape"),
        ((d, cur, np.zeros(20), 5, 0.0), "out has the wrong dtype or shape"),
        ((d, cur, np.frombuffer(bytes(160), np.int64), 5, 0.0), "read-only"),
        ((d, np.where(cur == 3, -1, cur), out, 5, 0.0), "label -1 of current is not in 0..19"),
        ((d, np.where(cur == 3, 20, cur), out, 5, 0.0), "label 20 of current is not in 0..19"),
        ((d, np.where(cur == 2, 3, cur), out, 5, 0.0), "must use every label"),
        ((spoilt(np.nan), cur, out, 5, 0.0), "dist must be finite"),
        ((spoilt(np.inf, at=(19, 0)), cur, out, 5, 0.0), "dist must be finite"),
        ((spoilt(-np.inf, at=(0, 19)), cur, out, 5, 0.0), "dist must be finite"),
        ((spoilt(0.5, at=(7, 7)), cur, out, 5, 0.0), "zero diagonal"),
        ((d, cur, out, -1, 0.0), "span must be >= 0"),
    ]
    for args, message in bad_values:
        with pytest.raises(ValueError, match=message):
            _rowloop.ward_cut(*args)
    for args in [(d, cur, out, 5), (d, cur, out, 1.5, 0.0), (d, cur, out, 5, "0"), (d.tolist(), cur, out, 5, 0.0)]:
        with pytest.raises(TypeError):
            _rowloop.ward_cut(*args)
    assert (out == -7).all()
    assert _rowloop.ward_cut(d, cur, out, 5, -2.0) > 0 and out.min() == 0  # the same arrays, valid


@needs_c
def test_better_partition_takes_the_clusterers_dtypes_and_the_numpy_switch(memories, monkeypatch):
    x, current, span, margin = next(m for m in memories if better_partition_numpy(*m) is not None)
    monkeypatch.setattr(recluster, "compiled", True)
    got = better_partition(x, current.astype(np.int32), span, margin)  # float32 rows, int32 labels
    np.testing.assert_array_equal(got, better_partition_numpy(x, current, span, margin))
    monkeypatch.setattr(recluster, "_rowloop", None)  # the numpy path must not touch the extension
    monkeypatch.setattr(recluster, "compiled", False)
    np.testing.assert_array_equal(better_partition(x, current, span, margin), got)
    env = dict(os.environ, PROTOEDGE_CLUSTER_LOOP="numpy")
    code = "from protoedge.runtime import recluster; print(recluster.compiled)"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "False"


@needs_c
def test_ward_cut_runs_in_threads(memories):
    """The arithmetic runs without the GIL: calls from two threads give each call's own answer."""
    jobs = memories[:16]
    alone = [compiled_cut(*m) for m in jobs]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda m: compiled_cut(*m), jobs * 2))
    for (k, out), (k2, out2) in zip(alone * 2, together):
        assert k == k2
        np.testing.assert_array_equal(out, out2)
