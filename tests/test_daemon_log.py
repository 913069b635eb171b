"""The update log (runtime/update_log.py) and replay through DaemonState, in-process: torn and corrupt
tails are cut and never replayed, gaps are refused, and replaying the log rebuilds exactly the state
the live daemon had (StreamClusterer is deterministic given the same inputs)."""
import os

import numpy as np
import pytest

from protoedge.runtime.bundle import load_bundle
from protoedge.runtime.backends import open_encoder
from protoedge.runtime.server_state import DaemonState, Job
from protoedge.runtime.update_log import LogError, UpdateLog

from daemon_support import BUNDLE, images


def _fill(log: UpdateLog, n: int, rng) -> list[np.ndarray]:
    arrays = []
    for i in range(n):
        x = rng.standard_normal((3, 8)).astype(np.float32)
        arrays.append(x)
        log.append("fit", {"i": i}, [x])
    log.commit()
    return arrays


def test_records_round_trip_with_arrays_and_args(tmp_path):
    log = UpdateLog(tmp_path, fsync="always")
    log.recover(0)
    arrays = _fill(log, 5, np.random.default_rng(0))
    log.append("label", {"id": 3, "label": "ünïcode"}, [])
    log.close()
    again = UpdateLog(tmp_path)
    recs = again.recover(0)
    assert [r.seq for r in recs] == [1, 2, 3, 4, 5, 6]
    assert all(np.array_equal(r.arrays[0], a) for r, a in zip(recs, arrays))
    assert recs[-1].op == "label" and recs[-1].args == {"id": 3, "label": "ünïcode"}
    assert again.last_seq == 6
    assert [r.seq for r in UpdateLog(tmp_path).recover(4)] == [5, 6]


def _record_ends(data: bytes) -> list[int]:
    ends, pos = [], 0
    while pos < len(data):
        pos += 16 + int.from_bytes(data[pos:pos + 4], "little")
        ends.append(pos)
    return ends


def test_a_torn_tail_is_cut_at_every_possible_byte(tmp_path):
    log = UpdateLog(tmp_path / "ref")
    log.recover(0)
    _fill(log, 3, np.random.default_rng(1))
    log.close()
    (seg,) = (tmp_path / "ref").glob("*.log")
    data = seg.read_bytes()
    ends = _record_ends(data)
    assert len(ends) == 3 and ends[-1] == len(data)
    start3 = ends[1]
    for cut in range(start3 + 1, len(data)):  # every torn length of the last record
        d = tmp_path / f"cut{cut}"
        d.mkdir()
        (d / seg.name).write_bytes(data[:cut])
        got = UpdateLog(d).recover(0)
        assert [r.seq for r in got] == [1, 2]
        assert (d / seg.name).stat().st_size == start3, "the torn bytes must be cut from disk"


@pytest.mark.parametrize("where", ["crc", "length", "payload"])
def test_a_corrupt_record_ends_replay_and_everything_after_it_is_dropped(tmp_path, where):
    log = UpdateLog(tmp_path)
    log.recover(0)
    _fill(log, 4, np.random.default_rng(2))
    log.close()
    (seg,) = tmp_path.glob("*.log")
    data = bytearray(seg.read_bytes())
    off = _record_ends(bytes(data))[1]  # the third record
    if where == "crc":
        data[off + 12] ^= 0xFF
    elif where == "length":
        data[off:off + 4] = (2**31).to_bytes(4, "little")
    else:
        data[off + 40] ^= 0x01
    seg.write_bytes(bytes(data))
    got = UpdateLog(tmp_path).recover(0)
    assert [r.seq for r in got] == [1, 2]
    assert seg.stat().st_size == off


def test_garbage_appended_after_a_crash_is_not_replayed(tmp_path):
    log = UpdateLog(tmp_path)
    log.recover(0)
    _fill(log, 2, np.random.default_rng(3))
    log.close()
    (seg,) = tmp_path.glob("*.log")
    with open(seg, "ab") as f:
        f.write(os.urandom(300))
    assert [r.seq for r in UpdateLog(tmp_path).recover(0)] == [1, 2]


def test_a_gap_between_snapshot_and_log_is_refused(tmp_path):
    log = UpdateLog(tmp_path)
    log.recover(0)
    _fill(log, 5, np.random.default_rng(4))
    log.close()
    (seg,) = tmp_path.glob("*.log")
    data = seg.read_bytes()
    seg.unlink()  # keep records 3-5 only: as if the segment with 1-2 was lost
    (tmp_path / f"{3:020d}.log").write_bytes(data[_record_ends(data)[1]:])
    with pytest.raises(LogError, match="missing"):
        UpdateLog(tmp_path).recover(0)


def _crashed_preallocated_segment(tmp_path, n: int):
    """A preallocated segment with n synced records, left as a kill -9 leaves it (not closed)."""
    log = UpdateLog(tmp_path, prealloc_bytes=1 << 16)
    log.recover(0)
    _fill(log, n, np.random.default_rng(5))
    (seg,) = tmp_path.glob("*.log")
    end = log.size_bytes()
    assert seg.stat().st_size == 1 << 16 and end < 1 << 16, "records are written over preallocated zeros"
    assert seg.read_bytes()[end:] == bytes((1 << 16) - end)
    os.close(log._fd)  # the process died: no close(), no truncation of the zeros
    return seg, end


def test_the_zeros_after_the_last_record_of_a_preallocated_segment_end_it_cleanly(tmp_path):
    seg, end = _crashed_preallocated_segment(tmp_path, 3)
    again = UpdateLog(tmp_path, prealloc_bytes=1 << 16)
    assert [r.seq for r in again.recover(0)] == [1, 2, 3]
    assert seg.stat().st_size == end, "the unused zeros are dropped (nothing is appended to an old segment)"
    again.open_segment()  # writing resumes in a new segment after the records
    again.append("fit", {}, [np.ones((1, 8), np.float32)])
    again.close()
    assert [r.seq for r in UpdateLog(tmp_path).recover(0)] == [1, 2, 3, 4]
    assert [p.stat().st_size for p in sorted(tmp_path.glob("*.log"))][0] == end


@pytest.mark.parametrize("tail", ["torn", "after_zeros", "garbage_after_zeros"])
def test_a_torn_record_in_a_preallocated_segment_is_cut(tmp_path, tail):
    seg, end = _crashed_preallocated_segment(tmp_path, 3)
    data = bytearray(seg.read_bytes())
    record = data[_record_ends(bytes(data[:end]))[1]:end]  # a whole valid-looking record (the third)
    if tail == "torn":  # a fourth record torn mid-write over the zeros
        fourth = bytearray(record)
        fourth[4:12] = (4).to_bytes(8, "little")
        data[end:end + len(fourth) // 2] = fourth[:len(fourth) // 2]
    elif tail == "after_zeros":  # a record that reached the disk while the one before it did not
        data[end + 512:end + 512 + len(record)] = record
    else:
        data[-100:-90] = os.urandom(10)
    seg.write_bytes(bytes(data))
    assert [r.seq for r in UpdateLog(tmp_path).recover(0)] == [1, 2, 3]
    assert seg.stat().st_size == end


def test_unknown_fsync_policy_is_refused(tmp_path):
    with pytest.raises(LogError):
        UpdateLog(tmp_path, fsync="sometimes")


# ----------------------------------------------------------------------------- replay == live

@pytest.fixture(scope="module")
def bundle_and_encoder():
    bundle = load_bundle(BUNDLE)
    return bundle, open_encoder(bundle, backend="cpu", threads=1)


def _snapshot_arrays(state: DaemonState) -> dict:
    c = state.clusterer
    ids, protos = c.prototypes()
    infos = c.clusters()
    return {"ids": ids, "protos": protos, "step": c.n_seen, "stats": c.stats,
            "clusters": [(i.id, i.label, i.seen, i.created, i.last_seen) for i in infos],
            "counts": np.array([i.count for i in infos])}


def _assert_same_state(got: dict, want: dict) -> None:
    assert got["clusters"] == want["clusters"]
    assert np.array_equal(got["ids"], want["ids"]) and np.array_equal(got["protos"], want["protos"])
    assert got["step"] == want["step"] and got["stats"] == want["stats"]
    # Decayed counts are kept internally as count / decay**step; a save/load round trip rescales
    # them, which can move the last bit. Everything else must match exactly.
    np.testing.assert_allclose(got["counts"], want["counts"], rtol=1e-12, atol=0)


def _drive(state: DaemonState, rng) -> None:
    """A mixed history: batches of stream updates, examples, labels, merges, removals."""
    for step in range(30):
        px = images(int(rng.integers(1, 9)), seed=int(rng.integers(1 << 30)))
        state.run_batch([Job("cluster", px)], max_batch=64)
        if step == 5:
            state.run_batch([Job("examples", images(3, seed=99), ["a", "a", "b"])], 64)
        if step % 7 == 6:
            clusters = state.clusterer.clusters()
            unlabelled = [c.id for c in clusters if c.label is None]
            if len(unlabelled) >= 4:
                state.merge(unlabelled[-2:])
                state.label(unlabelled[0], f"name{step}")
                state.remove(unlabelled[1])


def test_replaying_the_log_rebuilds_exactly_the_live_state(tmp_path, bundle_and_encoder):
    bundle, encoder = bundle_and_encoder
    live = DaemonState(bundle, encoder, tmp_path / "s", fsync="always")
    live.open()
    _drive(live, np.random.default_rng(5))
    assert live.seq > 30
    expected = _snapshot_arrays(live)
    live.close()
    # Replay from the log only (no snapshot was taken) ...
    again = DaemonState(bundle, encoder, tmp_path / "s")
    again.open()
    assert again.replayed == live.seq
    _assert_same_state(_snapshot_arrays(again), expected)
    # ... and from a snapshot in the middle plus the rest of the log.
    again.snapshot()
    _drive(again, np.random.default_rng(6))
    expected2 = _snapshot_arrays(again)
    again.close()
    third = DaemonState(bundle, encoder, tmp_path / "s")
    third.open()
    assert third.snapshot_seq > 0 and third.replayed > 0
    _assert_same_state(_snapshot_arrays(third), expected2)
    third.close()


def test_a_crash_between_snapshot_and_log_trim_applies_nothing_twice(tmp_path, bundle_and_encoder):
    bundle, encoder = bundle_and_encoder
    s = DaemonState(bundle, encoder, tmp_path / "s")
    s.open()
    _drive(s, np.random.default_rng(7))
    expected = _snapshot_arrays(s)
    old_segments = {p.name: p.read_bytes() for p in (tmp_path / "s" / "log").glob("*.log")}
    s.snapshot()
    s.close()
    # Put the already-snapshotted log back, as if the process died before deleting it.
    for name, data in old_segments.items():
        (tmp_path / "s" / "log" / name).write_bytes(data)
    again = DaemonState(bundle, encoder, tmp_path / "s")
    again.open()
    assert again.replayed == 0
    _assert_same_state(_snapshot_arrays(again), expected)
    again.close()


def test_state_from_another_model_is_refused(tmp_path, bundle_and_encoder):
    import json
    bundle, encoder = bundle_and_encoder
    s = DaemonState(bundle, encoder, tmp_path / "s")
    s.open()
    s.run_batch([Job("cluster", images(4))], 64)
    info = s.snapshot()
    s.close()
    meta_path = tmp_path / "s" / "snapshots" / os.path.basename(info["path"]) / "daemon.json"
    meta = json.loads(meta_path.read_text())
    meta["bundle_fp32_sha256"] = "0" * 64
    meta_path.write_text(json.dumps(meta))
    from protoedge.runtime.errors import StateError
    with pytest.raises(StateError, match="another model"):
        DaemonState(bundle, encoder, tmp_path / "s").open()


def test_one_daemon_per_state_folder(tmp_path, bundle_and_encoder):
    from protoedge.runtime.errors import StateError
    bundle, encoder = bundle_and_encoder
    first = DaemonState(bundle, encoder, tmp_path / "s")
    first.open()
    with pytest.raises(StateError, match="in use"):
        DaemonState(bundle, encoder, tmp_path / "s").open()
    first.close()
    again = DaemonState(bundle, encoder, tmp_path / "s")
    again.open()  # released on close
    again.close()


def test_a_damaged_newest_snapshot_falls_back_to_the_older_one_plus_the_log(tmp_path, bundle_and_encoder):
    bundle, encoder = bundle_and_encoder
    s = DaemonState(bundle, encoder, tmp_path / "s")
    s.open()
    _drive(s, np.random.default_rng(8))
    s.snapshot()
    _drive(s, np.random.default_rng(9))
    newest = s.snapshot()
    _drive(s, np.random.default_rng(10))
    expected = _snapshot_arrays(s)
    s.close()
    for npz in (tmp_path / "s" / "snapshots" / os.path.basename(newest["path"])).glob("*.npz"):
        data = bytearray(npz.read_bytes())
        data[len(data) // 2] ^= 0xFF  # bit rot in the newest snapshot
        npz.write_bytes(bytes(data))
    again = DaemonState(bundle, encoder, tmp_path / "s")
    again.open()
    assert again.snapshot_seq < newest["seq"] and again.replayed > 0
    _assert_same_state(_snapshot_arrays(again), expected)
    again.close()


def test_settings_are_pinned_by_the_first_snapshot(tmp_path, bundle_and_encoder):
    bundle, encoder = bundle_and_encoder
    s = DaemonState(bundle, encoder, tmp_path / "s", threshold=0.05)
    s.open()
    s.run_batch([Job("cluster", images(5))], 64)
    s.close()  # no snapshot since the first one: the history is in the log only
    again = DaemonState(bundle, encoder, tmp_path / "s", threshold=0.5)
    again.open()
    assert again.clusterer.threshold == 0.05 and again.replayed == 1
    again.close()


def test_a_snapshot_interrupted_mid_write_is_discarded_and_the_log_replays(tmp_path, bundle_and_encoder):
    bundle, encoder = bundle_and_encoder
    s = DaemonState(bundle, encoder, tmp_path / "s")
    s.open()
    _drive(s, np.random.default_rng(12))
    expected = _snapshot_arrays(s)
    s.close()
    # What a kill -9 during snapshot() leaves: a half-written temporary folder, never renamed.
    tmp = tmp_path / "s" / "snapshots" / f".tmp-{999:020d}-1234"
    tmp.mkdir()
    (tmp / "gen-000001.npz").write_bytes(b"PK\x03\x04 half")
    again = DaemonState(bundle, encoder, tmp_path / "s")
    again.open()
    assert not tmp.exists() and again.replayed > 0
    _assert_same_state(_snapshot_arrays(again), expected)
    again.close()
