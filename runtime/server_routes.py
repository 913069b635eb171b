"""HTTP routes of the daemon (aiohttp): KServe-v2-style health/metadata, the /v1 clustering API,
Prometheus metrics and the OpenAPI document.

Handlers only translate HTTP <-> Python: every model or state operation goes through the
Daemon's micro-batcher or its single worker thread (server.py), so requests never race on the
clusterer. A client's mistake is a 4xx with {"error": "..."}; nothing it sends reaches a 5xx.
"""
from __future__ import annotations

import hmac
import logging
import time

import numpy as np
from aiohttp import web

from .errors import InputError, StateError
from .server_batcher import Overloaded
from .server_codec import UnsupportedMediaType, decode_pixels, parse_json, parse_labels, png_base64
from .server_metrics import CONTENT_TYPE as METRICS_TYPE
from .server_openapi import openapi_document
from .server_state import Job, NotFound, PersistError

log = logging.getLogger(__name__)

NPY = "application/x-npy"
OPEN_ROUTES = ("/v2/health/live", "/v2/health/ready")  # probes work without the token
MAX_THUMBNAILS = 12
MAX_ID = 2**62


def error(status: int, message: str, headers: dict | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


# ------------------------------------------------------------------------------ middlewares

def make_middlewares(daemon):
    """One middleware for every request: bearer token, errors -> 4xx/5xx JSON, metrics. One
    layer instead of three: it runs on every request, and each layer is a coroutine call."""
    clock = time.perf_counter

    @web.middleware
    async def handle(request: web.Request, handler):
        t0 = clock()
        resp = None
        try:
            token = daemon.token
            if token is not None and request.path not in OPEN_ROUTES and not _token_ok(request, token):
                resp = error(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
            else:
                resp = await handler(request)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            reason = e.text if e.text and not e.text.startswith(f"{e.status}:") else e.reason
            resp = error(e.status, reason, {k: v for k, v in e.headers.items() if k in ("Allow",)})
        except Exception as e:
            status, message, extra = error_for(e, daemon)
            if status == 500:
                log.exception("unexpected error in %s %s", request.method, request.path)
            resp = error(status, message, dict(extra) or None)
        finally:
            route = request.match_info.route.resource
            name = route.canonical if route is not None else "unmatched"
            metrics = daemon.metrics
            metrics.latency.observe(clock() - t0, name)
            metrics.requests.inc(name, str(resp.status) if resp is not None else "500")
        return resp

    return [handle]


# ------------------------------------------------------------------------------ helpers

def error_for(e: BaseException, daemon) -> tuple[int, str, tuple]:
    """(status, message, extra headers) answering an exception raised while serving a request:
    the client's mistakes are 4xx, overload and shutdown 503, anything unexpected 500."""
    if isinstance(e, NotFound):
        return 404, str(e), ()
    if isinstance(e, UnsupportedMediaType):
        return 415, str(e), ()
    if isinstance(e, InputError):
        return 400, str(e), ()
    if isinstance(e, StateError):
        return 409, str(e), ()
    if isinstance(e, Unavailable):
        return 503, str(e), (("Retry-After", "2"),)
    if isinstance(e, Overloaded):
        daemon.metrics.rejected.inc()
        return 503, "the request queue is full; retry shortly", (("Retry-After", "1"),)
    if isinstance(e, PersistError):
        return 503, str(e), (("Retry-After", "5"),)
    return 500, "internal error (logged by the daemon)", ()


def _token_ok(request: web.Request, token: bytes) -> bool:
    given = request.headers.get("Authorization", "")
    return given.startswith("Bearer ") and hmac.compare_digest(given[7:].strip().encode(), token)


class Unavailable(Exception):
    """Not an overload: the engine is still being built, or the daemon is shutting down."""


def require_ready(daemon) -> None:
    if daemon.draining:
        raise Unavailable("the daemon is shutting down")
    if not daemon.ready:
        raise Unavailable("the engine is still being built or warmed up; see /v2/health/ready")


def cluster_id_of(request: web.Request) -> int:
    raw = request.match_info["id"]
    try:
        cid = int(raw)
    except ValueError:
        raise InputError(f"cluster id must be an integer, not {raw[:40]!r}") from None
    if not 0 <= cid < MAX_ID:
        raise NotFound(f"no cluster with id {cid}")
    return cid


def query_int(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        v = int(raw)
    except ValueError:
        raise InputError(f"{name} must be an integer") from None
    if not lo <= v <= hi:
        raise InputError(f"{name} must be between {lo} and {hi}")
    return v


def cluster_json(info) -> dict:
    return {"id": info.id, "label": info.label, "count": info.count, "seen": info.seen,
            "created": info.created, "last_seen": info.last_seen}


# ------------------------------------------------------------------------------ routes

def build_app(daemon) -> web.Application:
    cfg = daemon.config
    app = web.Application(client_max_size=cfg.max_body_bytes, middlewares=make_middlewares(daemon))
    routes = web.RouteTableDef()

    async def read_pixels(request: web.Request) -> np.ndarray:
        body = await request.read()  # aiohttp answers 413 past client_max_size (chunked bodies too)
        spec = daemon.bundle.input_spec
        if request.content_type in ("image/png", "image/jpeg"):
            return await daemon.decode_image(body, request.content_type)
        return decode_pixels(body, request.content_type, spec, cfg.max_images_per_request)

    def body_cost(request: web.Request) -> int:
        """Bytes to reserve in the queue for this body; 413 right away if it is announced too big."""
        if request.content_length is not None and request.content_length > cfg.max_body_bytes:
            raise web.HTTPRequestEntityTooLarge(max_size=cfg.max_body_bytes, actual_size=request.content_length)
        # A chunked body has no length up front: count it at the limit it may grow to.
        return request.content_length if request.content_length is not None else cfg.max_body_bytes

    async def pixel_job(request: web.Request, op: str, labels_from_query: bool = False):
        require_ready(daemon)
        cost = body_cost(request)
        daemon.worker.admit(cost)
        try:
            pixels = await read_pixels(request)
            labels = examples_labels(request, len(pixels)) if labels_from_query else None
        except BaseException:
            daemon.worker.release(cost)
            raise
        return await daemon.worker.submit(Job(op, pixels, labels), cost)

    def examples_labels(request: web.Request, n: int) -> list[str]:
        if "labels" in request.query:
            return parse_labels(request.query["labels"], n)
        if "label" in request.query:
            return parse_labels([request.query["label"]] * n, n)
        raise InputError("give the examples' labels: ?label=NAME for all images, or ?labels=[JSON list]")

    # --- KServe v2 style: health, metadata, infer ---------------------------------------------

    @routes.get("/v2/health/live")
    async def live(request):
        return web.Response(status=200)

    @routes.get("/v2/health/ready")
    async def ready(request):
        # KServe says "4xx means false"; 503 is what HTTP and the probes read as "not yet".
        return web.Response(status=200 if daemon.ready else 503)

    @routes.get("/v2")
    async def server_metadata(request):
        from .. import __version__

        return web.json_response({"name": "protoedge", "version": __version__, "extensions": []})

    @routes.get("/v2/models/encoder")
    async def model_metadata(request):
        return web.json_response(daemon.model_metadata())

    @routes.get("/v2/models/encoder/ready")
    async def model_ready(request):
        return web.Response(status=200 if daemon.ready else 503)

    @routes.post("/v2/models/encoder/infer")
    async def infer(request):
        require_ready(daemon)
        cost = body_cost(request)
        daemon.worker.admit(cost)
        try:
            doc = parse_json(await request.read(), max_bytes=cfg.max_body_bytes)
            req_id, pixels = kserve_pixels(doc, daemon.bundle.input_spec, cfg.max_images_per_request)
        except BaseException:
            daemon.worker.release(cost)
            raise
        emb = await daemon.worker.submit(Job("embed", pixels), cost)
        out = {"model_name": "encoder", "outputs": [{"name": daemon.bundle.output_spec["name"], "datatype": "FP32",
                                                    "shape": list(emb.shape), "data": emb.ravel().tolist()}]}
        if req_id is not None:
            out["id"] = req_id
        return web.json_response(out)

    # --- /v1: pixels in ---------------------------------------------------------------------

    @routes.post("/v1/embed")
    async def embed(request):
        emb = await pixel_job(request, "embed")
        if NPY in request.headers.get("Accept", ""):
            import io

            buf = io.BytesIO()
            np.save(buf, emb, allow_pickle=False)
            return web.Response(body=buf.getvalue(), content_type=NPY)
        return web.json_response({"embeddings": emb.tolist(), "dim": int(emb.shape[1])})

    @routes.post("/v1/cluster")
    async def cluster(request):
        assignments, seq = await pixel_job(request, "cluster")
        return web.json_response({"assignments": [a.to_dict() for a in assignments], "seq": seq})

    @routes.post("/v1/assign")
    async def assign(request):
        assignments = await pixel_job(request, "assign")
        return web.json_response({"assignments": [a.to_dict() for a in assignments]})

    @routes.post("/v1/examples")
    async def examples(request):
        classes, seq = await pixel_job(request, "examples", labels_from_query=True)
        return web.json_response({"classes": classes, "seq": seq})

    # --- /v1: clusters ------------------------------------------------------------------------

    @routes.get("/v1/clusters")
    async def list_clusters(request):
        require_ready(daemon)
        info, seq, seen = await daemon.call(lambda s: (s.clusterer.clusters(), s.seq, s.clusterer.n_seen))
        return web.json_response({"clusters": [cluster_json(c) for c in info], "n_clusters": len(info),
                                  "seen": seen, "seq": seq})

    @routes.get("/v1/clusters/{id}")
    async def get_cluster(request):
        require_ready(daemon)
        cid = cluster_id_of(request)
        k = query_int(request, "thumbnails", 0, 0, MAX_THUMBNAILS)

        def read(s):
            info = s.cluster(cid)
            if info is None:
                raise NotFound(f"no cluster with id {cid} (it may have been evicted, merged away or removed)")
            return info, (s.thumbnails(info.id, k) if k else [])

        info, thumbs = await daemon.call(read)
        body = cluster_json(info)
        if info.id != cid:
            body["merged_from"] = cid
        if k:
            body["thumbnails"] = [{"format": "png", "base64": png_base64(t)} for t in thumbs]
        return web.json_response(body)

    @routes.post("/v1/clusters/merge")
    async def merge(request):
        require_ready(daemon)
        doc = parse_json(await request.read())
        ids = doc.get("ids")
        if not isinstance(ids, list) or not 2 <= len(ids) <= 1000 or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise InputError('body must be {"ids": [at least two integer cluster ids]}')
        if len(set(ids)) != len(ids):
            raise InputError("cluster ids to merge must be distinct")
        for i in ids:
            if not 0 <= i < MAX_ID:
                raise NotFound(f"no cluster with id {i}")
        survivor, seq = await daemon.call_mutation(lambda s: s.merge(ids))
        return web.json_response({"id": survivor, "seq": seq})

    @routes.post("/v1/clusters/{id}/label")
    async def label(request):
        require_ready(daemon)
        cid = cluster_id_of(request)
        doc = parse_json(await request.read())
        name = doc.get("label")
        (name,) = parse_labels([name], 1) if isinstance(name, str) else (None,)
        if name is None:
            raise InputError('body must be {"label": "a non-empty name"}')
        survivor, seq = await daemon.call_mutation(lambda s: s.label(cid, name))
        return web.json_response({"id": survivor, "label": name, "seq": seq})

    @routes.delete("/v1/clusters/{id}")
    async def remove(request):
        require_ready(daemon)
        cid = cluster_id_of(request)
        removed, seq = await daemon.call_mutation(lambda s: s.remove(cid))
        return web.json_response({"removed": removed, "seq": seq})

    @routes.get("/v1/report")
    async def report(request):
        require_ready(daemon)
        from .montage import cluster_montage_png

        rows = await daemon.call(lambda s: s.thumbs.rows(s.clusterer.clusters()))
        png = await daemon.in_thread(cluster_montage_png, rows)
        return web.Response(body=png, content_type="image/png")

    @routes.post("/v1/state/snapshot")
    async def snapshot(request):
        require_ready(daemon)
        info = await daemon.call(lambda s: s.snapshot())
        daemon.metrics.snapshots.inc()
        return web.json_response(info)

    # --- operations ---------------------------------------------------------------------------

    @routes.get("/metrics")
    async def metrics(request):
        return web.Response(body=daemon.metrics.render().encode(), headers={"Content-Type": METRICS_TYPE})

    @routes.get("/openapi.json")
    async def openapi(request):
        return web.json_response(openapi_document(daemon))

    app.add_routes(routes)
    return app


def kserve_pixels(doc: dict, spec: dict, max_images: int) -> tuple[str | None, np.ndarray]:
    """The one UINT8 input tensor of a KServe v2 JSON infer request, as [N, C, H, W]."""
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise InputError('"inputs" must be a list with one tensor')
    t = inputs[0]
    if t.get("datatype") != "UINT8":
        raise InputError(f'input datatype must be "UINT8", not {str(t.get("datatype"))[:20]!r}')
    shape, data = t.get("shape"), t.get("data")
    want = [spec["channels"], spec["height"], spec["width"]]
    if not (isinstance(shape, list) and len(shape) == 4 and all(isinstance(s, int) for s in shape)
            and shape[1:] == want and 1 <= shape[0] <= max_images):
        raise InputError(f"input shape must be [N, {', '.join(map(str, want))}] with 1 <= N <= {max_images}")
    if not isinstance(data, list) or len(data) != int(np.prod(shape)):
        raise InputError(f"input data must be a flat list of {int(np.prod(shape))} integers")
    if not all(type(v) is int for v in data):
        raise InputError("input data must be integers 0-255")
    arr = np.asarray(data, dtype=object)
    if arr.min() < 0 or arr.max() > 255:
        raise InputError("input data must be integers 0-255")
    req_id = doc.get("id")
    return (str(req_id)[:200] if req_id is not None else None), np.asarray(data, dtype=np.uint8).reshape(shape)
