"""Python client for the protoedge daemon (`protoedge serve`), over TCP or a Unix socket.

Standard library + numpy only, so any process on the device can use it:

    from protoedge.client import Client

    with Client("http://127.0.0.1:8470") as c:          # or Client("unix:///run/protoedge/sock")
        c.wait_ready()
        for a in c.cluster(frames):                      # uint8 [N, H, W] or [N, C, H, W]
            print(a["cluster_id"], a["confidence"])
        c.add_examples(five_cats, label="cat")
        c.label(3, "dog"); c.merge([4, 7]); c.remove(9)
        print(c.clusters())

One Client holds one keep-alive connection and is not thread-safe: use one per thread.
Errors are ClientError(status, message); a full queue is Overloaded with .retry_after seconds.
If the connection drops (the daemon restarted), reads are retried once on a new connection;
updates are not, since the daemon may have applied them: they raise ConnectionError.
"""
from __future__ import annotations

import http.client
import io
import json
import socket
import time
import urllib.parse

import numpy as np

NPY = "application/x-npy"
# The daemon (aiohttp) closes keep-alive connections idle for 75 s; reconnect well before that
# rather than find out by losing a request.
MAX_IDLE_S = 30.0
# Requests that change nothing, so sending them again after a dropped connection is harmless.
_SAFE_POSTS = ("/v1/assign", "/v1/embed", "/v2/models/encoder/infer")


class ClientError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status, self.message = status, message


class Overloaded(ClientError):
    def __init__(self, status: int, message: str, retry_after: float):
        super().__init__(status, message)
        self.retry_after = retry_after


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def to_npy(pixels) -> bytes:
    arr = np.ascontiguousarray(pixels)
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


class Client:
    def __init__(self, url: str = "http://127.0.0.1:8470", token: str | None = None, timeout: float = 30.0):
        """url: http://HOST:PORT or unix:///path/to/socket. token: the daemon's bearer token."""
        self.url, self.timeout = url, timeout
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme == "unix":
            self._factory = lambda: _UnixConnection(parsed.path, timeout)
        elif parsed.scheme == "http":
            self._factory = lambda: http.client.HTTPConnection(parsed.hostname, parsed.port or 80, timeout=timeout)
        else:
            raise ValueError(f"url must be http://HOST:PORT or unix:///PATH, not {url!r}")
        self._conn: http.client.HTTPConnection | None = None
        self._last_used = 0.0

    # ------------------------------------------------------------------ transport

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None,
                accept: str | None = None) -> tuple[int, dict, bytes]:
        """One HTTP exchange; returns (status, headers, body) without raising on 4xx/5xx."""
        headers = dict(self._headers)
        if content_type:
            headers["Content-Type"] = content_type
        if accept:
            headers["Accept"] = accept
        if self._conn is not None and time.monotonic() - self._last_used > MAX_IDLE_S:
            self.close()
        reused = self._conn is not None
        if self._conn is None:
            self._conn = self._factory()
        try:
            self._conn.request(method, path, body=body, headers=headers)
            resp = self._conn.getresponse()
            data = resp.read()
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
            self.close()
            if not (reused and _idempotent(method, path)):
                # The daemon may have applied the update before the connection dropped (it crashed
                # or restarted): sending it again could apply it twice, so the caller decides.
                raise
            return self.request(method, path, body, content_type, accept)
        except BaseException:
            self.close()
            raise
        self._last_used = time.monotonic()
        if resp.will_close:
            self.close()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data

    def _call(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None,
              accept: str | None = None):
        status, headers, data = self.request(method, path, body, content_type, accept)
        if status >= 400:
            try:
                message = json.loads(data)["error"]
            except (ValueError, KeyError, TypeError):
                message = data.decode(errors="replace")[:500] or http.client.responses.get(status, "")
            if status == 503:
                raise Overloaded(status, message, float(headers.get("retry-after", 1)))
            raise ClientError(status, message)
        ctype = headers.get("content-type", "")
        if ctype.startswith("application/json"):
            return json.loads(data)
        if ctype.startswith(NPY):
            return np.load(io.BytesIO(data), allow_pickle=False)
        return data

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ health and metadata

    def live(self) -> bool:
        try:
            return self.request("GET", "/v2/health/live")[0] == 200
        except OSError:
            return False

    def ready(self) -> bool:
        try:
            return self.request("GET", "/v2/health/ready")[0] == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float = 60.0, poll: float = 0.05) -> None:
        """Block until the daemon is ready (engine built and warmed up) or raise TimeoutError."""
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.url} not ready after {timeout} s")
            time.sleep(poll)

    def model(self) -> dict:
        return self._call("GET", "/v2/models/encoder")

    def metrics(self) -> str:
        return self._call("GET", "/metrics").decode()

    def openapi(self) -> dict:
        return self._call("GET", "/openapi.json")

    # ------------------------------------------------------------------ images in

    @staticmethod
    def _body(images, content_type: str | None):
        if isinstance(images, (bytes, bytearray)):  # one encoded PNG/JPEG
            if content_type is None:
                content_type = "image/png" if images[:8] == b"\x89PNG\r\n\x1a\n" else "image/jpeg"
            return bytes(images), content_type
        return to_npy(images), NPY

    def embed(self, images, content_type: str | None = None) -> np.ndarray:
        """float32 [N, D] embeddings."""
        body, ctype = self._body(images, content_type)
        return self._call("POST", "/v1/embed", body, ctype, accept=NPY)

    def cluster(self, images, content_type: str | None = None) -> list[dict]:
        """Assign and learn; durable when this returns (with the daemon's default --fsync always)."""
        return self.cluster_full(images, content_type)["assignments"]

    def cluster_full(self, images, content_type: str | None = None) -> dict:
        """The whole answer of /v1/cluster: {"assignments": [...], "seq": n}."""
        body, ctype = self._body(images, content_type)
        return self._call("POST", "/v1/cluster", body, ctype)

    def assign(self, images, content_type: str | None = None) -> list[dict]:
        """Assign only; the daemon's state is unchanged."""
        body, ctype = self._body(images, content_type)
        return self._call("POST", "/v1/assign", body, ctype)["assignments"]

    def add_examples(self, images, labels=None, label: str | None = None) -> dict:
        """Labelled examples: one label for all images (label=) or one per image (labels=).
        Returns {label: cluster id}."""
        if (labels is None) == (label is None):
            raise ValueError("give exactly one of labels= (one per image) or label= (for all)")
        query = {"label": label} if label is not None else {"labels": json.dumps(list(labels))}
        body, ctype = self._body(images, None)
        return self._call("POST", "/v1/examples?" + urllib.parse.urlencode(query), body, ctype)["classes"]

    # ------------------------------------------------------------------ clusters

    def clusters(self) -> list[dict]:
        return self._call("GET", "/v1/clusters")["clusters"]

    def cluster_info(self, cluster_id: int, thumbnails: int = 0) -> dict:
        """One cluster; with thumbnails=k, up to k member images as uint8 [k, C, H, W] under 'images'."""
        info = self._call("GET", f"/v1/clusters/{int(cluster_id)}?thumbnails={int(thumbnails)}")
        if thumbnails:
            info["images"] = _decode_thumbnails(info.get("thumbnails", []))
        return info

    def label(self, cluster_id: int, label: str) -> int:
        body = json.dumps({"label": label}).encode()
        return self._call("POST", f"/v1/clusters/{int(cluster_id)}/label", body, "application/json")["id"]

    def merge(self, ids) -> int:
        body = json.dumps({"ids": [int(i) for i in ids]}).encode()
        return self._call("POST", "/v1/clusters/merge", body, "application/json")["id"]

    def remove(self, cluster_id: int) -> int:
        return self._call("DELETE", f"/v1/clusters/{int(cluster_id)}")["removed"]

    def snapshot(self) -> dict:
        return self._call("POST", "/v1/state/snapshot")

    def report_png(self) -> bytes:
        return self._call("GET", "/v1/report")


def _idempotent(method: str, path: str) -> bool:
    return method in ("GET", "HEAD") or (method == "POST" and path.split("?")[0] in _SAFE_POSTS)


def _decode_thumbnails(items: list[dict]) -> np.ndarray:
    import base64

    from PIL import Image

    imgs = []
    for item in items:
        arr = np.asarray(Image.open(io.BytesIO(base64.b64decode(item["base64"]))))
        imgs.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
    return np.stack(imgs) if imgs else np.zeros((0,), np.uint8)
