"""The daemon's per-request shortcuts give exactly what the general code gives: .npy decoding of
a header seen before, the /v1/cluster answer of one image, and a log record's cached header."""
from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest

from protoedge.runtime import server_codec, update_log
from protoedge.runtime.clustering import Assignment
from protoedge.runtime.errors import InputError
from protoedge.runtime.server_fast import _assignments_json, _cluster_answer

SPEC = {"channels": 1, "height": 28, "width": 28}


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _error(fn, *args):
    try:
        fn(*args)
    except InputError as e:
        return str(e)
    raise AssertionError("no InputError")


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 28, 28), (1, 1, 28, 28), (2, 1, 28, 28)])
def test_a_header_seen_before_decodes_to_the_same_pixels(shape):
    rng = np.random.default_rng(len(shape))
    for _ in range(3):  # the first call checks and remembers the header, the others use it
        a = rng.integers(0, 256, shape, dtype=np.uint8)
        got = server_codec.decode_pixels(_npy(a), "application/x-npy", SPEC, 64)
        assert got.shape == (shape[0], 1, 28, 28) and got.dtype == np.uint8 and got.flags.c_contiguous
        assert np.array_equal(got, a.reshape(got.shape))


def test_a_remembered_header_still_gets_every_check():
    body = _npy(np.zeros((2, 28, 28), np.uint8))
    server_codec.decode_pixels(body, "application/x-npy", SPEC, 64)  # remembered
    for bad in (body[:-1], body + b"\0"):  # the pixels do not match the header's count
        server_codec._NPY_ACCEPTED.clear()
        fresh = _error(server_codec.decode_pixels, bad, "application/x-npy", SPEC, 64)
        server_codec.decode_pixels(body, "application/x-npy", SPEC, 64)
        assert _error(server_codec.decode_pixels, bad, "application/x-npy", SPEC, 64) == fresh
    assert "more than the limit" in _error(server_codec.decode_pixels, body, "application/x-npy", SPEC, 1)
    assert _error(server_codec.decode_pixels, body, "application/x-npy", {**SPEC, "height": 32}, 64)
    rgb = {"channels": 3, "height": 28, "width": 28}
    assert _error(server_codec.decode_pixels, body, "application/x-npy", rgb, 64)


def test_fortran_order_and_other_dtypes_are_not_remembered_wrongly():
    a = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 1, 28, 28)
    f = server_codec.decode_pixels(_npy(np.asfortranarray(a)), "application/x-npy", SPEC, 64)
    assert np.array_equal(f, a)
    f = server_codec.decode_pixels(_npy(np.asfortranarray(a)), "application/x-npy", SPEC, 64)
    assert np.array_equal(f, a)
    for _ in range(2):
        assert "uint8" in _error(server_codec.decode_pixels, _npy(a.astype(np.int16)), "application/x-npy", SPEC, 64)


@pytest.mark.parametrize("a", [
    Assignment(3, 0.8123456789012345, 0.91, False, None),
    Assignment(0, 0.0, 1.0, True, None),
    Assignment(12, 1e-300, 5e-324, False, None),
    Assignment(-1, math.inf, 1.0, True, None),
    Assignment(7, 0.5, 0.5, False, "k\u00e4se \"x\""),
])
def test_the_one_image_answer_is_the_general_answer(a):
    seq = 123456789
    got = _cluster_answer([a], seq)
    assert got == '{"assignments": %s, "seq": %d}' % (_assignments_json([a]), seq)
    assert json.loads(got) == {"assignments": [a.to_dict()], "seq": seq}
    two = _cluster_answer([a, a], seq)
    assert json.loads(two) == {"assignments": [a.to_dict(), a.to_dict()], "seq": seq}


@pytest.mark.parametrize("arrays", [
    [np.ones((8, 64), np.float32)], [np.ones((1, 64), np.float32)], [np.zeros((0, 64), np.float32)],
    [np.ones((3, 64), ">f4")], [np.asfortranarray(np.ones((3, 64), np.float32))],
    [np.ones((3, 64), np.float64)[:, ::2]],
])
def test_a_cached_record_header_is_the_general_one(arrays):
    def general(op, args, arrs):  # the encoding without the cache, as written before it
        specs, blobs = [], []
        for a in arrs:
            a = np.ascontiguousarray(a)
            dtype = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
            a = a.astype(dtype, copy=False)
            specs.append({"dtype": dtype.str, "shape": list(a.shape)})
            blobs.append(a.tobytes())
        header = json.dumps({"op": op, "args": args, "arrays": specs}, separators=(",", ":")).encode()
        return len(header).to_bytes(4, "little") + header + b"".join(blobs)

    for _ in range(2):  # the second one comes from the cache
        payload = update_log.encode_payload("fit", {}, arrays)
        assert payload == general("fit", {}, arrays)
        rec = update_log.decode_payload(1, payload)
        assert rec.op == "fit" and rec.args == {} and np.array_equal(rec.arrays[0], arrays[0])
    with pytest.raises(update_log.LogError):
        update_log.encode_payload("fit", {}, [np.ones((2, 2), np.float16)])
