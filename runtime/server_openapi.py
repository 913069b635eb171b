"""The daemon's OpenAPI 3.1 description (GET /openapi.json), kept next to the routes it documents.
A test checks that every route the app serves is described here and vice versa."""
from __future__ import annotations

PIXELS_BODY = {
    "description": "uint8 pixels: an .npy array [N, H, W] (single-channel models) or [N, C, H, W], "
                   "or one PNG/JPEG image (converted to the model's channels and resized to its input).",
    "required": True,
    "content": {"application/x-npy": {"schema": {"type": "string", "format": "binary"}},
                "image/png": {"schema": {"type": "string", "format": "binary"}},
                "image/jpeg": {"schema": {"type": "string", "format": "binary"}}},
}
ERROR = {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
ERRORS = {"400": ERROR, "401": ERROR, "413": ERROR, "503": {**ERROR, "description": "queue full or not ready; "
                                                                                    "see Retry-After"}}


def _json(ref: str) -> dict:
    return {"description": "OK", "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}}


def _op(summary: str, ok: dict, body: dict | None = None, params: list | None = None, errors=True) -> dict:
    op = {"summary": summary, "responses": {"200": ok, **(ERRORS if errors else {})}}
    if body:
        op["requestBody"] = body
    if params:
        op["parameters"] = params
    return op


ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 0}}
EMPTY = {"description": "true (empty body)"}


def openapi_document(daemon) -> dict:
    from .. import __version__

    spec = daemon.bundle.input_spec
    json_body = lambda ref: {"required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}}  # noqa: E731
    paths = {
        "/v2/health/live": {"get": _op("The process is up.", EMPTY, errors=False)},
        "/v2/health/ready": {"get": _op("The engine is built and warmed up (503 until then).", EMPTY, errors=False)},
        "/v2": {"get": _op("Server metadata (KServe v2).", _json("Object"), errors=False)},
        "/v2/models/encoder": {"get": _op("Model metadata (KServe v2): input/output names, datatypes, shapes.",
                                          _json("Object"))},
        "/v2/models/encoder/ready": {"get": _op("Model readiness (KServe v2).", EMPTY, errors=False)},
        "/v2/models/encoder/infer": {"post": _op("KServe v2 JSON inference: one UINT8 tensor [N, C, H, W] -> "
                                                 "FP32 embeddings.", _json("Object"), json_body("Object"))},
        "/v1/embed": {"post": _op("Embeddings of the images (JSON, or .npy float32 with Accept: application/x-npy).",
                                  _json("Embeddings"), PIXELS_BODY)},
        "/v1/cluster": {"post": _op("Assign each image to a cluster and learn from it (durable when answered).",
                                    _json("Assignments"), PIXELS_BODY)},
        "/v1/assign": {"post": _op("Assign each image to its nearest cluster; the state is unchanged.",
                                   _json("Assignments"), PIXELS_BODY)},
        "/v1/examples": {"post": _op("Labelled few-shot examples: create or update known classes.",
                                     _json("Object"), PIXELS_BODY, [
                                         {"name": "label", "in": "query", "schema": {"type": "string"},
                                          "description": "one label for all images"},
                                         {"name": "labels", "in": "query", "schema": {"type": "string"},
                                          "description": "JSON list with one label per image"}])},
        "/v1/clusters": {"get": _op("All clusters.", _json("Clusters"))},
        "/v1/clusters/{id}": {
            "get": _op("One cluster, with member thumbnails (base64 PNG) on request.", _json("Cluster"), params=[
                ID, {"name": "thumbnails", "in": "query", "schema": {"type": "integer", "minimum": 0, "maximum": 12}}]),
            "delete": _op("Remove a cluster.", _json("Object"), params=[ID])},
        "/v1/clusters/{id}/label": {"post": _op("Name a cluster (merges with a cluster that has the same label).",
                                                _json("Object"), json_body("Label"), [ID])},
        "/v1/clusters/merge": {"post": _op("Merge clusters; returns the surviving id.", _json("Object"),
                                           json_body("Merge"))},
        "/v1/report": {"get": _op("PNG montage: a row of member thumbnails per cluster, biggest first.",
                                  {"description": "PNG", "content": {"image/png": {}}})},
        "/v1/state/snapshot": {"post": _op("Write an atomic snapshot now and trim the update log.", _json("Object"))},
        "/metrics": {"get": _op("Prometheus text format 0.0.4.", {"description": "metrics",
                                                                  "content": {"text/plain": {}}})},
        "/openapi.json": {"get": _op("This document.", _json("Object"), errors=False)},
    }
    assignment = {"type": "object", "properties": {
        "cluster_id": {"type": "integer"}, "distance": {"type": ["number", "null"]},
        "confidence": {"type": "number"}, "new_cluster": {"type": "boolean"}, "label": {"type": ["string", "null"]}}}
    cluster = {"type": "object", "properties": {
        "id": {"type": "integer"}, "label": {"type": ["string", "null"]}, "count": {"type": "number"},
        "seen": {"type": "integer"}, "created": {"type": "integer"}, "last_seen": {"type": "integer"},
        "thumbnails": {"type": "array", "items": {"type": "object"}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "protoedge daemon", "version": __version__,
                 "description": f"Local clustering daemon for model {daemon.bundle.manifest['model'].get('name')}: "
                                f"images {spec['channels']}x{spec['height']}x{spec['width']} uint8. "
                                "Authorization: Bearer <token> when started with --token-file "
                                "(the health routes stay open)."},
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
                "Object": {"type": "object"},
                "Assignment": assignment,
                "Assignments": {"type": "object", "properties": {
                    "assignments": {"type": "array", "items": assignment}, "seq": {"type": "integer"}}},
                "Embeddings": {"type": "object", "properties": {
                    "embeddings": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
                    "dim": {"type": "integer"}}},
                "Cluster": cluster,
                "Clusters": {"type": "object", "properties": {"clusters": {"type": "array", "items": cluster},
                                                              "n_clusters": {"type": "integer"},
                                                              "seen": {"type": "integer"}, "seq": {"type": "integer"}}},
                "Label": {"type": "object", "required": ["label"], "properties": {"label": {"type": "string"}}},
                "Merge": {"type": "object", "required": ["ids"],
                          "properties": {"ids": {"type": "array", "items": {"type": "integer"}, "minItems": 2}}},
            },
        },
        "security": [{"bearer": []}],
    }
