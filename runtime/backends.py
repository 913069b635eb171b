"""Inference backends behind one small interface: ``encoder.embed(uint8 [N,C,H,W]) -> float32 [N,D]``.

* ``cpu``: ONNX Runtime, CPUExecutionProvider, tuned for latency (explicit intra-op threads, full
  graph optimisation, sequential execution, no spinning threads; batches of <= 8 on a
  single-threaded twin session, which needs no thread wake-up).
* ``cuda`` / ``ort-tensorrt``: ONNX Runtime with the CUDA / TensorRT execution providers; the
  TensorRT EP keeps engine and timing caches under a persistent cache folder.
* ``tensorrt``: native TensorRT (runtime/trt_backend.py), engine built once and cached.
* ``auto``: the first of tensorrt, ort-tensorrt, cuda, cpu that starts.

ONNX Runtime silently falls back to CPU when a provider fails to load, so every GPU session is
checked against ``session.get_providers()`` and a fallback is an error for an explicit choice.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from .errors import BackendUnavailable
from .validation import validate_pixels

log = logging.getLogger(__name__)

BACKENDS = ("auto", "cpu", "cuda", "tensorrt", "ort-tensorrt")
_AUTO_ORDER = ("tensorrt", "ort-tensorrt", "cuda", "cpu")
SMALL_BATCH = 8  # CPU batches up to this size run on the single-threaded session
_EP = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "ort-tensorrt": "TensorrtExecutionProvider"}


def default_cache_dir() -> Path:
    """Where engines and timing caches persist: $PROTOEDGE_CACHE_DIR, else the XDG cache folder."""
    env = os.environ.get("PROTOEDGE_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "protoedge"


def _input_geometry(bundle) -> tuple[int, int, int]:
    spec = bundle.input_spec
    return int(spec["channels"]), int(spec["height"]), int(spec["width"])


class OrtEncoder:
    """An ONNX Runtime session on one bundle variant."""

    def __init__(self, bundle, backend: str = "cpu", precision: str = "fp32", threads: int | None = None,
                 cache_dir: Path | None = None, max_batch: int = 256):
        import onnxruntime as ort

        self.bundle = bundle
        self.backend = backend
        self.precision = precision
        self.channels, self.height, self.width = _input_geometry(bundle)
        self.max_batch = int(max_batch)
        path = Path(bundle.onnx_path(precision))
        wanted = _EP[backend]
        if wanted not in ort.get_available_providers():
            raise BackendUnavailable(f"backend {backend!r} needs ONNX Runtime's {wanted}, which this "
                                     f"onnxruntime build lacks (has: {', '.join(ort.get_available_providers())})")
        self.threads = int(threads) if threads else (os.cpu_count() or 1)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning pool threads burn a core between frames, and a device shares its CPU. (ORT's
        # "session.force_spinning_stop", spinning only during a run, measured ~25% slower here.)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        providers = self._providers(backend, cache_dir or default_cache_dir(), precision)
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        # Without spinning, a multi-threaded run first has to wake its pool threads, which costs
        # milliseconds on a busy CPU; small CPU batches gain nothing from threads, so
        # they go to a second, single-threaded session of the same model.
        self.small_session = None
        if backend == "cpu" and self.threads > 1:
            opts.intra_op_num_threads = 1
            self.small_session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        self.providers = list(self.session.get_providers())
        if self.providers[0] != wanted:
            raise BackendUnavailable(f"ONNX Runtime could not start {wanted} and fell back to "
                                     f"{self.providers[0]} (check the CUDA/TensorRT libraries)")
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.output_name = self.session.get_outputs()[0].name
        # An export with a fixed batch size is fed in chunks of exactly that size.
        self.fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None

    @staticmethod
    def _providers(backend: str, cache_dir: Path, precision: str) -> list:
        if backend == "cpu":
            return ["CPUExecutionProvider"]
        if backend == "cuda":
            return [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
        engines = cache_dir / "ort-trt"
        engines.mkdir(parents=True, exist_ok=True)
        trt = {"device_id": 0, "trt_engine_cache_enable": True, "trt_engine_cache_path": str(engines),
               "trt_timing_cache_enable": True, "trt_timing_cache_path": str(engines)}
        # Precision comes from the ONNX variant (FP16 / Q-DQ files), not from weak-typing flags,
        # which TensorRT 11 removed.
        return [("TensorrtExecutionProvider", trt), ("CUDAExecutionProvider", {"device_id": 0}),
                "CPUExecutionProvider"]

    def validate(self, pixels) -> np.ndarray:
        return validate_pixels(pixels, self.channels, self.height, self.width)

    def embed(self, pixels) -> np.ndarray:
        x = self.validate(pixels)
        return self.embed_valid(x)

    def embed_valid(self, x: np.ndarray) -> np.ndarray:
        """embed() without the checks, for callers that validated already."""
        step = self.fixed_batch or self.max_batch
        if len(x) <= step and not self.fixed_batch:
            return self._run(x)
        out = []
        for i in range(0, len(x), step):
            chunk = x[i:i + step]
            n = len(chunk)
            if self.fixed_batch and n < step:  # pad the tail to the fixed batch, drop the padding after
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], step - n, axis=0)])
            out.append(self._run(chunk)[:n])
        return np.concatenate(out)

    def _run(self, x: np.ndarray) -> np.ndarray:
        session = self.small_session if self.small_session is not None and len(x) <= SMALL_BATCH else self.session
        y = session.run([self.output_name], {self.input_name: x})[0]
        return np.asarray(y, dtype=np.float32).reshape(len(x), -1)

    def describe(self) -> dict:
        return {"backend": self.backend, "providers": self.providers, "precision": self.precision,
                "threads": self.threads}


def open_encoder(bundle, backend: str = "auto", precision: str = "fp32", threads: int | None = None,
                 cache_dir=None, max_batch: int = 256):
    """Start an encoder on ``backend``; ``auto`` takes the best that starts. The choice and the
    active providers are logged and available as ``.backend`` / ``.providers``."""
    if backend not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    cache_dir = Path(cache_dir) if cache_dir else None
    order = _AUTO_ORDER if backend == "auto" else (backend,)
    reasons = []
    for name in order:
        try:
            if name == "tensorrt":
                from .trt_backend import TensorRTEncoder

                enc = TensorRTEncoder(bundle, precision=precision, cache_dir=cache_dir or default_cache_dir(),
                                      max_batch=max_batch)
            else:
                enc = OrtEncoder(bundle, name, precision, threads, cache_dir, max_batch)
        except BackendUnavailable as e:
            if backend != "auto":
                raise
            reasons.append(f"{name}: {e}")
            log.info("backend %s unavailable: %s", name, e)
            continue
        log.info("inference backend %s (providers: %s, precision %s)", enc.backend,
                 ", ".join(enc.providers), precision)
        if backend == "auto" and reasons:
            log.info("auto skipped: %s", "; ".join(reasons))
        return enc
    raise BackendUnavailable("no backend could start: " + "; ".join(reasons))
