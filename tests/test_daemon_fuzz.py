"""5,000+ malformed requests against the real daemon (TCP and Unix socket): every answer is a 4xx
with {"error": ...}, never a 5xx or a crash, and the clusters, the log sequence and the state files
are unchanged afterwards."""
import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from protoedge.client import Client

from daemon_support import Server, images

N_REQUESTS = 5200
MAX_BODY = 64 * 1024


def npy_header(descr: str, shape, fortran=False, version=(1, 0), pad_to=64) -> bytes:
    d = "{'descr': %r, 'fortran_order': %s, 'shape': %s, }" % (descr, fortran, tuple(shape))
    hlen = len(d) + 1
    total = 10 + hlen if version == (1, 0) else 12 + hlen
    d += " " * ((pad_to - total % pad_to) % pad_to) + "\n"
    if version == (1, 0):
        return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(d)) + d.encode()
    return b"\x93NUMPY" + bytes(version) + struct.pack("<I", len(d)) + d.encode()


def npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def png(arr, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge canvas (decompression-bomb shape) with a valid CRC."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))  # noqa: E731
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")


def malformed(rng, live_ids: list[int]):
    """One malformed request: (method, path, body, content type)."""
    good = npy(images(2, seed=int(rng.integers(1000))))
    good_png = png(images(1)[0, 0])
    pixel_route = str(rng.choice(["/v1/cluster", "/v1/assign", "/v1/embed", "/v1/examples?label=x"]))
    kind = int(rng.integers(0, 24))
    rand = lambda n: rng.integers(0, 256, n, dtype=np.uint8).tobytes()  # noqa: E731
    if kind == 0:
        return "POST", pixel_route, rand(int(rng.integers(0, 400))), "application/x-npy"
    if kind == 1:  # magic, then garbage header
        return "POST", pixel_route, b"\x93NUMPY\x01\x00" + rand(int(rng.integers(0, 200))), "application/x-npy"
    if kind == 2:  # wrong dtypes
        descr = str(rng.choice(["<f4", "<f8", "<i2", "<u2", "|b1", "<c8", "|O", "|V4", "<U3", "|S2"]))
        return "POST", pixel_route, npy_header(descr, (1, 28, 28)) + rand(784 * 4), "application/x-npy"
    if kind == 3:  # wrong shapes
        shape = [(0, 28, 28), (1, 28), (28,), (), (1, 1, 1, 28, 28), (1, 3, 28, 28), (1, 1, 27, 28), (2, 28, 29),
                 (1, 2, 28, 28), (1, 28, 28, 1)][int(rng.integers(10))]
        return "POST", pixel_route, npy_header("|u1", shape) + rand(int(np.prod(shape)) if shape else 1), \
            "application/x-npy"
    if kind == 4:  # the header promises more (or fewer) bytes than the body has
        n = int(rng.integers(1, 5))
        delta = int(rng.choice([-1, 1, -100, 50]))
        return "POST", pixel_route, npy_header("|u1", (n, 28, 28)) + rand(max(n * 784 + delta, 0)), \
            "application/x-npy"
    if kind == 5:  # absurd shapes: overflow, negative, huge counts
        shape = [(10**12, 28, 28), (2**62, 2**62, 28, 28), (-1, 28, 28), (65, 28, 28), (10**9, 1, 28, 28)][
            int(rng.integers(5))]
        return "POST", pixel_route, npy_header("|u1", shape) + rand(784), "application/x-npy"
    if kind == 6:  # body over the size limit
        return "POST", pixel_route, rand(MAX_BODY + int(rng.integers(1, 5000))), "application/x-npy"
    if kind == 7:  # corrupt PNGs: flipped bytes, truncated
        b = bytearray(good_png)
        for _ in range(int(rng.integers(1, 6))):
            b[int(rng.integers(8, len(b)))] ^= int(rng.integers(1, 256))
        if rng.random() < 0.5:
            b = b[:int(rng.integers(8, len(b)))]
        return "POST", pixel_route.split("?")[0], bytes(b), "image/png"
    if kind == 8:
        return "POST", pixel_route.split("?")[0], png_claiming(int(rng.integers(5000, 2**31 - 1)), 100000), "image/png"
    if kind == 9:  # a JPEG that is not one, or a GIF sent as PNG
        if rng.random() < 0.5:
            return "POST", "/v1/cluster", good_png[:40] + rand(50), "image/jpeg"
        gif = png(images(1)[0, 0], "GIF")
        return "POST", "/v1/cluster", gif, "image/png"
    if kind == 10:  # unsupported content types
        ctype = str(rng.choice(["text/plain", "application/json", "image/gif", "multipart/form-data", ""]))
        return "POST", pixel_route, good, ctype
    if kind == 11:  # empty body
        return "POST", pixel_route, b"", "application/x-npy"
    if kind == 12:  # fortran order / version 3 / pickle-looking payloads
        return "POST", pixel_route, npy_header("|O", (1,), version=(3, 0)) + b"\x80\x04\x95" + rand(30), \
            "application/x-npy"
    if kind == 13:  # unknown cluster ids
        cid = int(rng.choice([10**6, 2**40, 2**63 + 5, 99999]))
        method, path = [("GET", f"/v1/clusters/{cid}"), ("DELETE", f"/v1/clusters/{cid}"),
                        ("POST", f"/v1/clusters/{cid}/label")][int(rng.integers(3))]
        return method, path, json.dumps({"label": "x"}).encode(), "application/json"
    if kind == 14:  # ids that are not integers
        cid = str(rng.choice(["abc", "-1", "1.5", "0x10", "%00", "1e3", "" + "9" * 30]))
        return str(rng.choice(["GET", "DELETE"])), f"/v1/clusters/{cid}", b"", ""
    if kind == 15:  # bad JSON for label
        target = int(rng.choice(live_ids)) if live_ids else 0
        body = [b"{", b"[]", b'"str"', b"null", b'{"label": ""}', b'{"label": 5}', b'{"label": null}',
                b'{"nolabel": "x"}', json.dumps({"label": "x" * 500}).encode(), b"\xff\xfe",
                b'{"label": "   "}', b"[" * 5000 + b"]" * 5000][int(rng.integers(12))]
        return "POST", f"/v1/clusters/{target}/label", body, "application/json"
    if kind == 16:  # bad merge bodies
        ids = live_ids[:2] if len(live_ids) >= 2 else [0, 1]
        body = [b"{}", b'{"ids": 3}', json.dumps({"ids": [ids[0]]}).encode(), json.dumps({"ids": [ids[0]] * 2}).encode(),
                json.dumps({"ids": ["a", "b"]}).encode(), json.dumps({"ids": [True, False]}).encode(),
                json.dumps({"ids": [ids[0], 10**7]}).encode(), json.dumps({"ids": [ids[0], 2**70]}).encode(),
                json.dumps({"ids": [1.5, 2.5]}).encode(), b"not json", json.dumps({"ids": list(range(2000))}).encode()
                ][int(rng.integers(11))]
        return "POST", "/v1/clusters/merge", body, "application/json"
    if kind == 17:  # examples with bad labels
        query = str(rng.choice(["", "?labels=notjson", "?labels=%5B%5D", "?labels=%5B1%2C2%5D", "?label=",
                                "?labels=%5B%22a%22%5D", "?labels=%5B%22a%22%2C%22%22%5D", "?label=%20%20"]))
        return "POST", "/v1/examples" + query, good, "application/x-npy"
    if kind == 18:  # wrong methods and unknown paths
        return [("GET", "/v1/cluster"), ("PUT", "/v1/clusters/0"), ("GET", "/v1/nothing"), ("POST", "/v2/health/live"),
                ("PATCH", "/v1/clusters"), ("GET", "/v1/state/snapshot"), ("DELETE", "/v1/clusters")][
            int(rng.integers(7))] + (b"", "")
    if kind == 19:  # KServe infer with bad tensors
        bad = [{"inputs": []}, {"inputs": [{"datatype": "FP32", "shape": [1, 1, 28, 28], "data": [0] * 784}]},
               {"inputs": [{"datatype": "UINT8", "shape": [1, 1, 28, 28], "data": [0] * 10}]},
               {"inputs": [{"datatype": "UINT8", "shape": [1, 1, 28, 28], "data": [300] * 784}]},
               {"inputs": [{"datatype": "UINT8", "shape": [1, 1, 28, 28], "data": ["a"] * 784}]},
               {"inputs": [{"datatype": "UINT8", "shape": [0, 1, 28, 28], "data": []}]},
               {"inputs": [{"datatype": "UINT8", "shape": [1, 1, 28, 28], "data": [-1] * 784}]},
               {"inputs": "x"}, [1, 2]][int(rng.integers(9))]
        return "POST", "/v2/models/encoder/infer", json.dumps(bad).encode(), "application/json"
    if kind == 20:  # bad thumbnail counts
        target = int(rng.choice(live_ids)) if live_ids else 0
        return "GET", f"/v1/clusters/{target}?thumbnails={rng.choice(['x', '-1', '13', '99999', '1.5'])}", b"", ""
    # The rest: random byte flips in the header of a valid npy body. A flip may leave it valid
    # (padding), so only routes that change nothing are used here.
    pixel_route = str(rng.choice(["/v1/assign", "/v1/embed"]))
    b = bytearray(good)
    for _ in range(int(rng.integers(1, 4))):
        b[int(rng.integers(0, 128))] ^= int(rng.integers(1, 256))
    if bytes(b) == good:
        b = b[:-1]
    return "POST", pixel_route, bytes(b), "application/x-npy"


def state_files(root):
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_malformed_requests_get_4xx_and_change_nothing(tmp_path):
    rng = np.random.default_rng(5)
    with Server(tmp_path, "--max-body-mb", str(MAX_BODY / 2**20), "--max-images", "64") as srv:
        with srv.client() as c:
            c.cluster(images(12, seed=1))
            c.add_examples(images(2, seed=2), label="known")
            live_ids = [x["id"] for x in c.clusters()]
            before = c._call("GET", "/v1/clusters")
        files_before = state_files(srv.state_dir)
        statuses: dict[int, int] = {}
        bad = []
        clients = [Client(srv.tcp_url, timeout=30), Client(srv.unix_url, timeout=30)]
        valid_flipped = 0
        for i in range(N_REQUESTS):
            method, path, body, ctype = malformed(rng, live_ids)
            status, headers, data = clients[i % 2].request(method, path, body or None, ctype or None)
            if status == 200 and path.startswith("/v1/") and method == "POST" and ctype == "application/x-npy":
                # A byte flip in the pixel data of a valid array is still a valid array: only the
                # assign/embed routes may accept it (they change nothing); cluster/examples must not be hit.
                assert path in ("/v1/assign", "/v1/embed"), (path, body[:80])
                valid_flipped += 1
                continue
            statuses[status] = statuses.get(status, 0) + 1
            try:
                message = json.loads(data)["error"]
            except (ValueError, KeyError, TypeError):
                message = None
            if not 400 <= status < 500 or not message:
                bad.append((status, method, path, ctype, body[:60], data[:200]))
        for c in clients:
            c.close()
        assert not bad, bad[:10]
        assert sum(statuses.values()) + valid_flipped == N_REQUESTS
        assert sum(statuses.values()) >= 5000
        with srv.client() as c:
            assert c._call("GET", "/v1/clusters") == before
            assert c.ready()
        assert state_files(srv.state_dir) == files_before
        assert srv.proc.poll() is None
    print("statuses:", statuses, "accepted harmless byte flips:", valid_flipped)


RAW = [
    b"GARBAGE\r\n\r\n",
    b"GET / HTTP/9.9\r\n\r\n",
    b"POST /v1/cluster HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    b"POST /v1/cluster HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"POST /v1/cluster HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello",
    b"POST /v1/cluster HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    b"GET /v1/clusters HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
    b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v1/clusters HTTP/1.1\r\nBad Header Line\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40),  # a TLS hello on the plain port
    b"POST /v1/cluster HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Type: application/x-npy\r\n\r\n"
    + b"%x\r\n" % (MAX_BODY + 10) + b"a" * (MAX_BODY + 10) + b"\r\n0\r\n\r\n",
]
# Aimed at the HTTP fast path (POST /v1/cluster|assign with .npy bodies, server_fast.py): requests
# that look like its own but are not valid HTTP, or not its to serve. Each must get a 4xx.
_NPY_HEAD = b"POST /v1/cluster HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-npy\r\n"
RAW += [
    _NPY_HEAD + b"Content-Length: 4\r\nContent-Length: 4\r\n\r\nabcd",             # duplicate Content-Length
    _NPY_HEAD + b"Content-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
    _NPY_HEAD + b"Content-Length: 4, 4\r\n\r\nabcd",
    _NPY_HEAD + b"Content-Length: 99999999999999999999999999\r\n\r\nabcd",       # oversized
    _NPY_HEAD + b"Content-Length: %d\r\n\r\n" % (MAX_BODY + 1) + b"a" * (MAX_BODY + 1),  # over the limit
    _NPY_HEAD + b"Content-Length: +4\r\n\r\nabcd",
    _NPY_HEAD + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n",  # CL + TE
    _NPY_HEAD + b"Transfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n",                  # chunked garbage
    _NPY_HEAD + b"Transfer-Encoding: gzip, chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n",
    _NPY_HEAD + b"Content-Length: 4\r\nX: a\rContent-Length: 9\r\n\r\nabcd",     # header injection: bare CR
    _NPY_HEAD + b"Content-Length: 4\r\nX: a\nContent-Length: 9\r\n\r\nabcd",     # bare LF
    _NPY_HEAD + b"Content-Length: 4\r\nX: a\x00b\r\n\r\nabcd",                   # NUL in a value
    _NPY_HEAD + b"Content-Length: 4\r\n Content-Length: 9\r\n\r\nabcd",           # obs-fold
    _NPY_HEAD + b"Content-Length : 4\r\n\r\nabcd",                                # space before the colon
    _NPY_HEAD + b"Content-Length: 4\r\nX\x7fY: 1\r\n\r\nabcd",                    # DEL in a name
    b"POST  /v1/cluster HTTP/1.1\r\nContent-Type: application/x-npy\r\nContent-Length: 4\r\n\r\nabcd",
    b"POST /v1/cluster HTTP/1.1 x\r\nContent-Type: application/x-npy\r\nContent-Length: 4\r\n\r\nabcd",
    b"POST /v1/cluster\r\nContent-Type: application/x-npy\r\nContent-Length: 4\r\n\r\nabcd",
    b"POST /v1/cluster HTTP/1.1\nContent-Type: application/x-npy\nContent-Length: 4\n\nabcd",
    b"post /v1/cluster HTTP/1.1\r\nContent-Type: application/x-npy\r\nContent-Length: 4\r\n\r\nabcd",
    b"POST /v1/cluster HTTP/1.1\r\n\r\n",                                            # no length, no type
    b"POST /v1/cl\x00uster HTTP/1.1\r\nContent-Type: application/x-npy\r\nContent-Length: 4\r\n\r\nabcd",
    b"POST http://x/v1/cluster HTTP/1.1\r\nContent-Type: application/x-npy\r\nContent-Length: 4\r\n\r\nabcd",
    b"POST /v1/%63luster HTTP/1.1\r\nContent-Type: application/x-npy\r\nContent-Length: 4\r\n\r\nabcd",
    b"POST /v1/cluster HTTP/1.1\r\nContent-Type: application/x-npy\r\nContent-Length: 4\r\n\r\nabcd",  # bad .npy
]


def test_malformed_http_gets_4xx_or_a_closed_connection_and_no_crash(tmp_path):
    rng = np.random.default_rng(11)
    with Server(tmp_path, "--max-body-mb", str(MAX_BODY / 2**20)) as srv:
        with srv.client() as c:
            c.cluster(images(4, seed=3))
            before = c._call("GET", "/v1/clusters")
        files_before = state_files(srv.state_dir)
        statuses = []
        for i in range(300 + 2 * len(RAW)):
            payload = RAW[i % len(RAW)] if i < 2 * len(RAW) else rng.integers(0, 256, int(rng.integers(1, 300)),
                                                                                dtype=np.uint8).tobytes() + b"\r\n\r\n"
            s = _raw_connection(srv, unix=bool(i % 2))
            try:
                s.sendall(payload)
                head = s.recv(64)
            except (ConnectionResetError, BrokenPipeError):
                head = b""
            finally:
                s.close()
            if head:  # an answer must be a 4xx; no answer (closed) is acceptable for garbage
                status = int(head.split(b" ")[1])
                statuses.append(status)
                assert 400 <= status < 500, (payload[:80], head)
        assert statuses, "some malformed requests must get an HTTP error answer"
        with srv.client() as c:
            assert c.ready() and c._call("GET", "/v1/clusters") == before
        assert state_files(srv.state_dir) == files_before and srv.proc.poll() is None


def _raw_connection(srv, unix: bool):
    """A plain socket to the server: its Unix socket or its TCP port."""
    import socket

    if unix:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(srv.socket_path)
    else:
        s = socket.create_connection(("127.0.0.1", srv.port))
    s.settimeout(10)
    return s


def test_pipelined_garbage_after_a_valid_fast_path_request(tmp_path):
    """A valid .npy request answered by the fast path, then garbage on the same connection (each
    RAW case, a TLS hello, random bytes): the first answer is a 200, whatever follows is a 4xx or a
    closed connection, never a 5xx; the state does not change (/v1/assign changes nothing)."""
    rng = np.random.default_rng(12)
    good = npy(images(1, seed=9))
    valid = (b"POST /v1/assign HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-npy\r\n"
             b"Content-Length: %d\r\n\r\n" % len(good) + good)
    with Server(tmp_path, "--max-body-mb", str(MAX_BODY / 2**20)) as srv:
        with srv.client() as c:
            c.cluster(images(4, seed=3))
            before = c._call("GET", "/v1/clusters")
        files_before = state_files(srv.state_dir)
        tails = RAW + [rng.integers(0, 256, int(rng.integers(1, 300)), dtype=np.uint8).tobytes() + b"\r\n\r\n"
                       for _ in range(40)]
        for i, tail in enumerate(tails):
            s = _raw_connection(srv, unix=bool(i % 2))
            data = b""
            try:
                s.sendall(valid + tail)
                while data.count(b"HTTP/") < 2:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            except (ConnectionResetError, BrokenPipeError):
                pass
            finally:
                s.close()
            assert data.startswith(b"HTTP/1.1 200 "), (tail[:80], data[:200])
            head, _, rest = data.partition(b"\r\n\r\n")
            assert b"\r\nServer: protoedge\r\n" in head + b"\r\n"
            length = int(next(h.split(b":", 1)[1] for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:")))
            rest = rest[length:]  # what follows the first answer: nothing (closed), or a 4xx
            assert not rest or (rest.startswith(b"HTTP/") and rest.split(b" ", 2)[1][:1] == b"4"), (tail[:80], rest[:300])
        with srv.client() as c:
            assert c.ready() and c._call("GET", "/v1/clusters") == before
        assert state_files(srv.state_dir) == files_before and srv.proc.poll() is None
