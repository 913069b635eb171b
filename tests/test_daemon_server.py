"""The daemon as a separate process on loopback TCP and a Unix socket: every route, SIGTERM with a
final snapshot, the bearer token, socket permissions, overload (503), limits."""
import errno
import io
import json
import os
import shutil
import socket as so
import tempfile
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from protoedge.client import Client, ClientError

from daemon_support import BUNDLE, ENV, Server, free_port, images


def png_bytes(img: np.ndarray, fmt: str = "PNG", size=None) -> bytes:
    im = Image.fromarray(img[0] if img.ndim == 3 else img)
    if size:
        im = im.resize(size)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with Server(tmp_path_factory.mktemp("daemon")) as srv:
        yield srv


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_every_route_over_each_transport(server, transport):
    url = server.tcp_url if transport == "tcp" else server.unix_url
    with Client(url) as c:
        assert c.live() and c.ready()
        meta = c.model()
        assert meta["inputs"][0]["shape"] == [-1, 1, 28, 28] and meta["inputs"][0]["datatype"] == "UINT8"
        assert meta["outputs"][0]["shape"] == [-1, 64]
        # the CPU defaults: the INT8 encoder made for ONNX Runtime's CPU kernels, and the worker
        # thread applying each batch itself
        params = meta["parameters"]
        assert params["backend"]["backend"] == "cpu" and params["backend"]["precision"] == "int8-cpu"
        assert params["pipeline"] is False
        from protoedge.runtime import clustering

        assert params["clusterer_loop"] == ("c" if clustering._rowloop is not None else "numpy")
        before = {x["id"]: x for x in c.clusters()}

        x = images(6, seed=hash(transport) % 1000)
        emb = c.embed(x)
        assert emb.shape == (6, 64) and emb.dtype == np.float32
        full = c.cluster_full(x)
        assert len(full["assignments"]) == 6 and full["seq"] > 0
        ids = {a["cluster_id"] for a in full["assignments"]}
        after = {x["id"]: x for x in c.clusters()}
        assert sum(a["seen"] for a in after.values()) == sum(b["seen"] for b in before.values()) + 6

        # assign: the same images land where cluster put them, and nothing changes
        snap = c.clusters()
        assigned = c.assign(x)
        assert {a["cluster_id"] for a in assigned} <= {x["id"] for x in snap}
        assert c.clusters() == snap

        # a [N, H, W] array and a PNG / JPEG of the same image are accepted
        assert len(c.assign(x[:, 0])) == 6
        assert len(c.assign(png_bytes(x[0]))) == 1
        assert len(c.assign(png_bytes(x[0], "JPEG", size=(56, 56)))) == 1

        cid = sorted(ids)[0]
        info = c.cluster_info(cid, thumbnails=2)
        assert info["id"] == cid and 1 <= len(info["images"]) <= 2
        assert info["images"].shape[1:] == (1, 28, 28)

        classes = c.add_examples(images(3, seed=500), labels=["cat", "cat", "dog"])
        assert set(classes) == {"cat", "dog"}
        assert {x["label"] for x in c.clusters()} >= {"cat", "dog"}

        new_name = f"named-{transport}"
        assert c.label(cid, new_name) >= 0
        assert any(x["label"] == new_name for x in c.clusters())

        unlabelled = [x["id"] for x in c.clusters() if x["label"] is None]
        if len(unlabelled) >= 2:
            survivor = c.merge(unlabelled[:2])
            live = {x["id"] for x in c.clusters()}
            assert survivor in live and len(live & set(unlabelled[:2])) == 1
        victim = c.clusters()[-1]["id"]
        assert c.remove(victim) == victim
        with pytest.raises(ClientError) as e:
            c.cluster_info(victim)
        assert e.value.status == 404

        png = c.report_png()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        metrics = c.metrics()
        for name in ("protoedge_request_duration_seconds_bucket", "protoedge_batch_images_bucket",
                     "protoedge_queue_depth", "protoedge_clusters", "protoedge_resident_memory_bytes",
                     "protoedge_engine_build_seconds"):
            assert name in metrics
        assert c.openapi()["openapi"].startswith("3.")


def test_kserve_infer_matches_embed(server):
    with Client(server.tcp_url) as c:
        x = images(2, seed=3)
        body = json.dumps({"id": "r1", "inputs": [{"name": "images", "shape": [2, 1, 28, 28], "datatype": "UINT8",
                                                  "data": x.ravel().tolist()}]}).encode()
        out = c._call("POST", "/v2/models/encoder/infer", body, "application/json")
        assert out["id"] == "r1" and out["outputs"][0]["shape"] == [2, 64]
        np.testing.assert_allclose(np.array(out["outputs"][0]["data"]).reshape(2, 64), c.embed(x), rtol=1e-5,
                                   atol=1e-6)
        assert c.request("GET", "/v2")[0] == 200 and c.request("GET", "/v2/models/encoder/ready")[0] == 200


def test_openapi_describes_exactly_the_served_routes():
    from protoedge.runtime.bundle import load_bundle
    from protoedge.runtime.server import ServerConfig
    from protoedge.runtime.server_openapi import openapi_document
    from protoedge.runtime.server_routes import build_app

    daemon = SimpleNamespace(config=ServerConfig(bundle=str(BUNDLE)), bundle=load_bundle(BUNDLE), token=None)
    app = build_app(daemon)
    served = {(r.method.lower(), r.resource.canonical) for r in app.router.routes() if r.method != "HEAD"}
    doc = openapi_document(daemon)
    described = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert served == described


def test_limits_on_body_size_and_images_per_request(tmp_path):
    with Server(tmp_path, "--max-body-mb", "0.05", "--max-images", "8", unix=False) as srv, srv.client() as c:
        status, _, body = c.request("POST", "/v1/cluster", Client._body(images(70), None)[0], "application/x-npy")
        assert status == 413 and "error" in json.loads(body)
        status, _, body = c.request("POST", "/v1/cluster", Client._body(images(9), None)[0], "application/x-npy")
        assert status == 400 and "limit" in json.loads(body)["error"]
        assert c.clusters() == []


def test_sigterm_drains_in_flight_requests_snapshots_and_exits_0(tmp_path):
    srv = Server(tmp_path, "--fsync", "interval", "--fsync-interval", "5")
    try:
        srv.start()
        answered, errors = [], []

        def stream(seed):
            with srv.client(timeout=20) as c:
                for i in range(1000):
                    try:
                        answered.append(c.cluster_full(images(2, seed=seed * 1000 + i))["seq"])
                    except (OSError, ClientError) as e:
                        errors.append(e)
                        return

        threads = [threading.Thread(target=stream, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while len(answered) < 40 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(answered) >= 40, (errors, srv.output())
        assert srv.terminate() == 0
        for t in threads:
            t.join(20)
        out = srv.output()
        assert "final snapshot at sequence" in out and "stopped (exit 0)" in out
        assert not os.path.exists(srv.socket_path), "the socket file is removed on exit"
        snaps = sorted((srv.state_dir / "snapshots").glob("snap-*"))
        last_seq = int(snaps[-1].name.split("-")[1])
        assert last_seq >= max(answered), "every answered update is in the final snapshot"
        # The final snapshot covers everything: no log record is left to replay.
        srv.start()
        with srv.client() as c:
            seen = sum(x["seen"] for x in c.clusters())
            assert c._call("GET", "/v1/clusters")["seq"] == last_seq
        assert "0 updates replayed" in srv.output()
        assert seen >= 2 * len(answered)
        assert srv.terminate() == 0
    finally:
        srv.stop()


def test_recluster_flag_reaches_the_clusterer_and_is_pinned_in_the_state(tmp_path):
    from protoedge.runtime.fleet import read_state

    srv = Server(tmp_path, "--recluster")
    try:
        srv.start()
        with srv.client() as c:
            c.cluster(images(8))
        assert srv.terminate() == 0
        assert read_state(srv.state_dir).params["recluster"] is True
        # a later start without the flag keeps the folder's setting, and says so
        srv.cmd.remove("--recluster")
        srv.cmd.append("--no-recluster")
        srv.start()
        assert srv.terminate() == 0
        assert read_state(srv.state_dir).params["recluster"] is True
        assert "keeps the settings it was created with" in srv.output()
    finally:
        srv.stop()


def test_bearer_token_is_required_except_for_health(tmp_path):
    token = "s3cret-token-0123456789"
    tf = tmp_path / "token"
    tf.write_text(token + "\n")
    tf.chmod(0o600)
    with Server(tmp_path, "--token-file", str(tf)) as srv:
        for url in (srv.tcp_url, srv.unix_url):
            with Client(url) as anon, Client(url, token="wrong-token-0123456789") as wrong, \
                    Client(url, token=token) as good:
                assert anon.ready() and anon.live()
                for c in (anon, wrong):
                    for method, path in (("GET", "/v1/clusters"), ("GET", "/metrics"), ("POST", "/v1/cluster"),
                                         ("GET", "/v2/models/encoder"), ("DELETE", "/v1/clusters/0")):
                        status, headers, body = c.request(method, path, b"", "application/x-npy")
                        assert status == 401 and headers.get("www-authenticate") == "Bearer"
                        assert "token" in json.loads(body)["error"]
                assert isinstance(good.clusters(), list) and len(good.cluster(images(1))) == 1


def test_unix_socket_is_0600_stale_socket_replaced_and_non_socket_refused(tmp_path):
    sock_path = tmp_path / "pe.sock"
    stale = so.socket(so.AF_UNIX, so.SOCK_STREAM)
    stale.bind(str(sock_path))  # bound but nobody listening: a dead daemon's leftover
    stale.close()
    with Server(tmp_path, tcp=False, state=False) as srv:
        mode = stat.S_IMODE(os.stat(srv.socket_path).st_mode)
        assert mode == 0o600
        with srv.client() as c:
            assert c.ready()
        # A second daemon on the same socket is refused while the first is listening.
        second = subprocess.run([sys.executable, "-m", "protoedge.cli", "serve", str(BUNDLE), "--socket",
                                 srv.socket_path], env=ENV, capture_output=True, text=True, timeout=60)
        assert second.returncode == 2 and "another daemon" in second.stdout + second.stderr
        assert srv.terminate() == 0
    if os.geteuid() == 0:  # show the kernel enforcing the mode: another user cannot connect
        public = Path(tempfile.mkdtemp(prefix="protoedge-sock-"))
        try:
            public.chmod(0o755)  # the folder lets everyone in, so only the socket's mode decides
            control = so.socket(so.AF_UNIX, so.SOCK_STREAM)
            control.bind(str(public / "open.sock"))
            os.chmod(public / "open.sock", 0o666)
            control.listen(1)
            assert _connect_as_user(str(public / "open.sock"), 65534) == 0
            control.close()
            with Server(tmp_path, tcp=False, state=False, socket_path=str(public / "pe.sock")) as srv:
                assert _connect_as_user(srv.socket_path, 65534) == errno.EACCES
        finally:
            shutil.rmtree(public, ignore_errors=True)
    regular = tmp_path / "not-a-socket"
    regular.write_text("keep me")
    r = subprocess.run([sys.executable, "-m", "protoedge.cli", "serve", str(BUNDLE), "--socket", str(regular)],
                       env=ENV, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "not a socket" in r.stdout + r.stderr
    assert regular.read_text() == "keep me"


def _connect_as_user(path: str, uid: int) -> int:
    """errno of connecting to the Unix socket from a child process running as uid (0 = connected)."""
    pid = os.fork()
    if pid == 0:  # child: drop to uid, try, report through the exit code (no imports: fork-safe)
        code = 0
        try:
            os.setgid(uid)
            os.setuid(uid)
            so.socket(so.AF_UNIX, so.SOCK_STREAM).connect(path)
        except OSError as e:
            code = e.errno or 255
        except BaseException:
            code = 254
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_non_loopback_host_needs_a_token(tmp_path):
    r = subprocess.run([sys.executable, "-m", "protoedge.cli", "serve", str(BUNDLE), "--host", "0.0.0.0",
                        "--port", str(free_port())], env=ENV, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "loopback" in r.stderr


@pytest.mark.parametrize("limit", [("--max-queue", "2"), ("--max-queue", "1000", "--max-queue-mb", "0.5")],
                         ids=["requests", "bytes"])
def test_overload_answers_503_with_retry_after_and_memory_stays_bounded(tmp_path, limit):
    with Server(tmp_path, *limit, "--max-batch", "32", "--max-wait-ms", "0", state=False) as srv:
        with srv.client() as c:
            rss0 = _rss(c.metrics())
        statuses, retry_after = [], []
        body = Client._body(images(256, seed=1), None)[0]

        def flood():
            with srv.client(timeout=60) as c:
                for _ in range(6):
                    status, headers, data = c.request("POST", "/v1/assign", body, "application/x-npy")
                    statuses.append(status)
                    if status == 503:
                        retry_after.append(headers.get("retry-after"))
                        assert "queue" in json.loads(data)["error"]

        threads = [threading.Thread(target=flood) for _ in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert set(statuses) <= {200, 503}, set(statuses)
        assert statuses.count(503) > 0 and statuses.count(200) > 0
        assert all(r == "1" for r in retry_after)
        with srv.client() as c:
            m = c.metrics()
            assert f"protoedge_overload_rejections_total {float(statuses.count(503))}" in m
            # 24 clients x 200 KB bodies: the queue holds at most 2 of them, so the daemon grows by far
            # less than the offered load (24 * 6 * 200 KB = 29 MB) and not without bound.
            assert _rss(m) - rss0 < 150e6
            assert len(c.assign(images(1))) == 1  # and it still works


def _rss(metrics: str) -> float:
    for line in metrics.splitlines():
        if line.startswith("protoedge_resident_memory_bytes "):
            return float(line.split()[1])
    raise AssertionError("no RSS metric")


def test_before_ready_the_daemon_is_live_and_answers_503(tmp_path):
    # The daemon listens (live) before the engine is built; until then ready and the API answer 503.
    # Whether a poll lands in that window depends on timing, so only the answers are checked.
    srv = Server(tmp_path, state=False)
    try:
        srv.start(wait=False)
        with srv.client(timeout=5) as c:
            seen = set()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    status = c.request("GET", "/v2/health/ready")[0]
                except OSError:
                    time.sleep(0.01)
                    continue
                seen.add(status)
                if status == 200:
                    break
                assert c.request("GET", "/v2/health/live")[0] == 200
                body = Client._body(images(1), None)[0]
                assert c.request("POST", "/v1/cluster", body, "application/x-npy")[0] in (200, 503)
            assert 200 in seen and seen <= {200, 503}
        assert srv.terminate() == 0
    finally:
        srv.stop()


def test_the_daemon_process_never_loads_torch(server):
    with Client(server.tcp_url) as c:
        c.cluster(images(2, seed=77))  # every layer has run at least once
    maps = open(f"/proc/{server.proc.pid}/maps").read()
    assert "onnxruntime" in maps and "torch" not in maps


def test_concurrent_single_image_requests_share_encoder_calls(server):
    def metric(text, name):  # a histogram has no series before its first observation
        return float(next((line.split()[1] for line in text.splitlines() if line.startswith(name + " ")), 0))

    with Client(server.tcp_url) as c:
        before = c.metrics()
        seen0 = sum(x["seen"] for x in c.clusters())
    answers = []

    def client(k):
        with Client(server.tcp_url) as c:
            for i in range(25):
                answers.append(len(c.cluster(images(1, seed=10_000 + 100 * k + i))))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    with Client(server.tcp_url) as c:
        after = c.metrics()
        assert sum(x["seen"] for x in c.clusters()) == seen0 + 200
    calls = metric(after, "protoedge_batch_images_count") - metric(before, "protoedge_batch_images_count")
    imgs = metric(after, "protoedge_batch_images_sum") - metric(before, "protoedge_batch_images_sum")
    assert answers == [1] * 200 and imgs == 200
    assert calls < 200, "200 concurrent single-image requests must share encoder calls"


@pytest.mark.parametrize("loop,pipeline", [("asyncio", "--no-pipeline"), ("uvloop", "--pipeline")])
def test_runs_on_asyncio_s_own_loop_and_on_uvloop_with_and_without_pipeline(tmp_path, loop, pipeline):
    """uvloop is optional: the daemon runs on asyncio's own loop too (and says which it uses); the
    clusterer may run on the worker thread or (--pipeline) on the event loop."""
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    with Server(tmp_path, "--event-loop", loop, pipeline) as srv:
        for url in (srv.tcp_url, srv.unix_url):
            with Client(url) as c:
                assert len(c.cluster(images(3, seed=5))) == 3 and len(c.cluster(images(1, seed=6))) == 1
                cid = c.clusters()[0]["id"]
                c.label(cid, "first")  # a mutation, in order with the batches
                assert {x["id"]: x["label"] for x in c.clusters()}[cid] == "first"
                params = c.model()["parameters"]
                assert params["event_loop"] == loop and params["pipeline"] == (pipeline == "--pipeline")
                assert params["inline_idle"]
        assert srv.terminate() == 0
        assert "stopped (exit 0)" in srv.output()


def _responses(sock, n: int) -> list[tuple[int, dict, bytes]]:
    """Read n HTTP/1.1 responses (Content-Length bodies) from a socket."""
    return _read_responses(sock, n)[0]


def _read_responses(sock, n: int) -> tuple[list[tuple[int, dict, bytes]], bytes]:
    """_responses, plus the bytes read after the n-th answer (the start of the next one)."""
    buf, out = b"", []
    while len(out) < n:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            head = buf[:end].decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in head[1:])}
            length = int(headers.get("content-length", 0))
            if len(buf) >= end + 4 + length:
                out.append((int(head[0].split()[1]), headers, buf[end + 4:end + 4 + length]))
                buf = buf[end + 4 + length:]
                continue
        data = sock.recv(65536)
        assert data, f"connection closed after {len(out)} of {n} answers"
        buf += data
    return out, buf


def _post(path: str, body: bytes, ctype: str = "application/x-npy") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_fast_path_answers_in_order_and_hands_other_requests_to_aiohttp(server, transport):
    """POST /v1/cluster|assign with .npy bodies are answered by the lean HTTP path (server_fast.py),
    pipelined requests in order; the first other request moves the connection to aiohttp, which
    answers the same request with the same bytes."""
    one = Client._body(images(1, seed=77), None)[0]
    bad = Client._body(np.zeros((1, 1, 27, 28), np.uint8), None)[0]
    if transport == "tcp":
        s = so.create_connection(("127.0.0.1", server.port))
    else:
        s = so.socket(so.AF_UNIX, so.SOCK_STREAM)
        s.connect(server.socket_path)
    s.settimeout(30)
    with s:
        s.sendall(_post("/v1/cluster", one) + _post("/v1/assign", one) + _post("/v1/cluster", bad)
                  + _post("/v1/assign", one) + b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
                  + _post("/v1/assign", one))
        answers = _responses(s, 6)
    statuses = [a[0] for a in answers]
    assert statuses == [200, 200, 400, 200, 200, 200], statuses
    fast = [a[1]["server"] == "protoedge" for a in answers]
    assert fast == [True, True, True, True, False, False], [a[1]["server"] for a in answers]
    cluster, assign1, error, assign2, _, assign3 = (a[2] for a in answers)
    assert json.loads(cluster)["assignments"][0]["cluster_id"] == json.loads(assign1)["assignments"][0]["cluster_id"]
    assert isinstance(json.loads(cluster)["seq"], int)
    assert "27" in json.loads(error)["error"] or "shape" in json.loads(error)["error"]
    assert assign1 == assign2 == assign3  # the fast path and aiohttp answer alike
    for _, headers, _ in answers[:4]:
        assert headers["content-type"] == "application/json; charset=utf-8"
    with server.client() as c:
        m = c.metrics()
    assert 'protoedge_requests_total{route="/v1/cluster",status="400"}' in m


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_fast_path_hands_over_exactly_wherever_the_reads_split(server, transport):
    """llhttp does not say where in a read a request begins, so the fast path keeps the bytes since
    the last known boundary and replays pipelined requests to find it. Whatever the read
    boundaries (inside a header block, inside a body that spans reads, between requests), aiohttp
    gets the handed request from its first byte, and the answers come in order."""
    import random

    one = Client._body(images(1, seed=78), None)[0]
    big = Client._body(images(48, seed=79), None)[0]  # ~37 KB: a body that spans reads
    health = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
    streams = [
        ([_post("/v1/assign", one), _post("/v1/assign", big), health, _post("/v1/assign", one)],
         [True, True, False, False]),
        ([_post("/v1/assign", big), _post("/v1/assign", one), _post("/v1/assign?x=1", one), _post("/v1/assign", one)],
         [True, True, False, False]),
        ([health, _post("/v1/assign", one)], [False, False]),
    ]
    rng = random.Random(3)
    for round_ in range(12):
        parts, expect_fast = streams[round_ % len(streams)]
        data = b"".join(parts)
        cuts = sorted(rng.sample(range(1, len(data)), 5))
        if round_ % 4 == 0:  # a cut a few bytes into each request, and one just before each
            starts = [sum(len(p) for p in parts[:i]) for i in range(1, len(parts))]
            cuts = sorted({c + d for c in starts for d in (-1, 3) if 0 < c + d < len(data)})
        if transport == "tcp":
            s = so.create_connection(("127.0.0.1", server.port))
            s.setsockopt(so.IPPROTO_TCP, so.TCP_NODELAY, 1)
        else:
            s = so.socket(so.AF_UNIX, so.SOCK_STREAM)
            s.connect(server.socket_path)
        s.settimeout(30)
        with s:
            for a, b in zip([0] + cuts, cuts + [len(data)]):
                s.sendall(data[a:b])
                time.sleep(0.005)  # separate reads on the daemon's side
            answers = _responses(s, len(parts))
        assert [a[0] for a in answers] == [200] * len(parts), (round_, cuts, answers)
        fast = [a[1]["server"] == "protoedge" for a in answers]
        assert fast == expect_fast, (round_, cuts, [a[1]["server"] for a in answers])


def test_fast_path_leaves_large_header_blocks_and_bad_syntax_to_aiohttp(server):
    """A hot-route request with a header block over 8 KiB, or one llhttp refuses, is answered by
    aiohttp (400), after the requests before it on the connection."""
    one = Client._body(images(1, seed=80), None)[0]
    big_head = (b"POST /v1/assign HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 9000 + b"\r\nContent-Type: application/x-npy\r\n"
                + b"Content-Length: %d\r\n\r\n" % len(one) + one)
    for bad in (big_head, b"POST /v1/assign HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
                b"POST /v1/assign HTTP/1.1\r\nHost: x\r\nX: a\rb\r\n\r\n"):
        with so.create_connection(("127.0.0.1", server.port)) as s:
            s.settimeout(30)
            s.sendall(_post("/v1/assign", one) + bad)
            (first,), rest = _read_responses(s, 1)  # the 400 may arrive in the same read as the 200
            assert first[0] == 200 and first[1]["server"] == "protoedge"
            while b"\r\n\r\n" not in rest:
                data = s.recv(65536)
                assert data, f"connection closed after {rest[:200]!r}"
                rest += data
            assert rest.startswith(b"HTTP/1.") and rest.split(b" ")[1] == b"400", rest[:200]  # aiohttp's own 400
            assert b"\r\nServer: protoedge\r\n" not in rest.split(b"\r\n\r\n")[0]
