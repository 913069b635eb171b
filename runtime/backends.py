"""Inference backends behind one small interface: ``encoder.embed(uint8 [N,C,H,W]) -> float32 [N,D]``.

* ``cpu``: ONNX Runtime, CPUExecutionProvider, without spinning threads (full graph optimisation,
  sequential execution). Parallelism is over the batch, not inside operators: ``threads``
  single-threaded sessions of the model; a batch of >= SPLIT_MIN images is cut into a few pieces
  per thread, which the calling thread and ``threads - 1`` pool threads take in turn, each on its
  own session (ONNX Runtime releases the GIL during a run). Smaller batches run on one session in
  the calling thread.
* ``cuda`` / ``ort-tensorrt``: ONNX Runtime with the CUDA / TensorRT execution providers; the
  TensorRT EP keeps engine and timing caches under a persistent cache folder.
* ``tensorrt``: native TensorRT (runtime/trt_backend.py), engine built once and cached.
* ``auto``: the first of tensorrt, ort-tensorrt, cuda, cpu that starts.

``precision="auto"`` takes, per backend tried, the variant that runs fastest there among those
the bundle carries: int8-cpu on ``cpu`` (at batch 64, 1.9x FP32 on a 2-core Xeon with VNNI and
1.3x on an AVX2-only EPYC; 5-way 1-shot within 0.06 points, benchmarks/results/export.md), fp32 on
the GPU backends (the TensorRT and CUDA paths
are not measured here, so no reduced precision is chosen for them unasked).

ONNX Runtime silently falls back to CPU when a provider fails to load, so every GPU session is
checked against ``session.get_providers()`` and a fallback is an error for an explicit choice.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .errors import BackendUnavailable
from .validation import validate_pixels

log = logging.getLogger(__name__)

BACKENDS = ("auto", "cpu", "cuda", "tensorrt", "ort-tensorrt")
_AUTO_ORDER = ("tensorrt", "ort-tensorrt", "cuda", "cpu")
# CPU batches of at least SPLIT_MIN images are split over the threads: at batch 8 on 2 idle cores,
# 0.81-0.87x of a spinning bare session instead of 0.56-0.67x on one thread (measured).
SPLIT_MIN = 8
PIECE_MIN = 4  # images per piece of a split batch, at least
PIECES_PER_THREAD = 4  # pieces of a split batch per thread, at most
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
    """An ONNX Runtime session on one bundle variant (on the CPU: one single-threaded session per
    thread, see the module docstring). ``close()`` stops the thread pool; an encoder that is
    garbage-collected without it stops its pool too."""

    split_min, piece_min, pieces_per_thread = SPLIT_MIN, PIECE_MIN, PIECES_PER_THREAD

    def __init__(self, bundle, backend: str = "cpu", precision: str = "fp32", threads: int | None = None,
                 cache_dir: Path | None = None, max_batch: int = 256):
        import onnxruntime as ort

        self.bundle = bundle
        self.backend = backend
        self.precision = precision
        self.channels, self.height, self.width = _input_geometry(bundle)
        self.max_batch = int(max_batch)
        self._pool = None
        path = Path(bundle.onnx_path(precision))
        wanted = _EP[backend]
        if backend == "ort-tensorrt":
            from .tensorrt_build import PRECISIONS as TENSORRT_PRECISIONS  # the native backend's list too

            if precision not in TENSORRT_PRECISIONS:  # int8-cpu: asymmetric activations TensorRT rejects
                raise BackendUnavailable(f"TensorRT takes the {', '.join(TENSORRT_PRECISIONS)} variants, not "
                                         f"{precision!r} (use int8 for INT8 with ort-tensorrt)")
        if backend == "cpu" and precision == "int8":
            log.warning("int8 is the TensorRT form of the INT8 model (signed activations): on the CPU "
                        "provider it runs no faster than fp32, and x86 CPUs without VNNI saturate in its "
                        "int8 kernels (embeddings off by up to 0.14 in cosine); use int8-cpu on the CPU")
        if wanted not in ort.get_available_providers():
            raise BackendUnavailable(f"backend {backend!r} needs ONNX Runtime's {wanted}, which this "
                                     f"onnxruntime build lacks (has: {', '.join(ort.get_available_providers())})")
        self.threads = int(threads) if threads else (os.cpu_count() or 1)
        opts = ort.SessionOptions()
        # On the CPU each run is single-threaded: ORT's intra-op pool, without spinning, has to wake
        # its sleeping threads for every parallel operator, while a split batch wakes each pool
        # thread once per call (batch 64 on 2 idle cores: 1.05-1.18x of a spinning bare session
        # against 0.87-1.02x with a 2-thread intra-op pool, measured).
        opts.intra_op_num_threads = 1 if backend == "cpu" else self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning pool threads burn a core between frames, and a device shares its CPU. (ORT's
        # "session.force_spinning_stop", a 2-thread pool spinning only during a run, reached
        # 0.92-0.97x of bare at batch 8 on idle cores; beside one busy process it burnt twice the
        # CPU per image of one thread and was half as fast as the split batch, measured.)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        providers = self._providers(backend, cache_dir or default_cache_dir(), precision)
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        self.providers = list(self.session.get_providers())
        if self.providers[0] != wanted:
            raise BackendUnavailable(f"ONNX Runtime could not start {wanted} and fell back to "
                                     f"{self.providers[0]} (check the CUDA/TensorRT libraries)")
        # One session per thread, so concurrent pieces share no session state (memory arena); the
        # weights are small, and each arena grows to a piece instead of a whole batch (RSS after
        # batches up to 256: +51 MB over the interpreter, +126 MB with one 2-thread session for
        # whole batches, measured).
        self.sessions = [self.session]
        if backend == "cpu" and self.threads > 1:
            self.sessions += [ort.InferenceSession(str(path), sess_options=opts, providers=providers)
                              for _ in range(self.threads - 1)]
            # Idle pool threads block on a queue: no CPU between calls.
            self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="protoedge-ort")
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
        """embed() without the checks, for callers that validated already. A split batch's pieces
        are taken in turn by the calling thread and the pool; an error in a piece is raised once
        the pool has stopped."""
        n = len(x)
        pool = self._pool if n >= self.split_min else None
        if self.fixed_batch:  # pad the tail to the fixed batch, drop the padding after
            size = self.fixed_batch
        elif pool is None:
            size = self.max_batch
        else:
            # A few pieces per thread, so that a thread the scheduler runs late (the CPU is shared)
            # gets fewer; pieces of max_batch / threads at most, so a call holds about max_batch
            # images in flight.
            pieces = max(2, min(self.threads * self.pieces_per_thread, n // self.piece_min))
            size = min(-(-n // pieces), -(-self.max_batch // self.threads))
        starts = range(0, n, size)
        if len(starts) == 1 and (n == size or not self.fixed_batch):
            return self._run(self.session, x)
        out = [None] * len(starts)
        todo = iter(range(len(starts)))  # shared by the threads: next() is atomic under the GIL

        def work(session):
            for i in todo:
                try:
                    chunk = x[starts[i]:starts[i] + size]
                    m = len(chunk)
                    if m < size and self.fixed_batch:
                        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], size - m, axis=0)])
                    out[i] = self._run(session, chunk)[:m]
                except BaseException as e:  # raised by the caller, once every thread has stopped
                    out[i] = e
                    for _ in todo:  # no thread starts another piece
                        pass

        helpers = [pool.submit(work, s) for s in self.sessions[1:len(starts)]] if pool is not None else []
        try:
            work(self.session)  # the calling thread takes pieces too, until none is left
        finally:
            for f in helpers:  # a helper that has not started yet has nothing left to do
                if not f.cancel():
                    f.result()  # wait for its piece before returning
        # pieces are taken in order, so every piece before the first failed one was embedded
        for y in out:
            if isinstance(y, BaseException):
                raise y
        return np.concatenate(out)

    def _run(self, session, x: np.ndarray) -> np.ndarray:
        y = session.run([self.output_name], {self.input_name: x})[0]
        return np.asarray(y, dtype=np.float32).reshape(len(x), -1)

    def close(self) -> None:
        """Stop the thread pool (idempotent). A closed encoder still embeds, on one thread."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def describe(self) -> dict:
        return {"backend": self.backend, "providers": self.providers, "precision": self.precision,
                "threads": self.threads}


def auto_precision(bundle, backend: str) -> str:
    """The variant ``precision="auto"`` picks on ``backend`` (see the module docstring)."""
    return "int8-cpu" if backend == "cpu" and "int8-cpu" in bundle.precisions else "fp32"


def gpu_backend_possible() -> bool:
    """Whether ``backend="auto"`` might start a GPU backend here, judged without starting one
    (TensorRT's bindings import, or ONNX Runtime lists a GPU provider). True can still end on the
    CPU when the provider fails to load; False is certain."""
    import importlib.util

    import onnxruntime as ort

    if importlib.util.find_spec("tensorrt") is not None:
        return True
    return bool({_EP["cuda"], _EP["ort-tensorrt"]} & set(ort.get_available_providers()))


def open_encoder(bundle, backend: str = "auto", precision: str = "fp32", threads: int | None = None,
                 cache_dir=None, max_batch: int = 256):
    """Start an encoder on ``backend``; ``auto`` takes the best that starts. The choice and the
    active providers are logged and available as ``.backend`` / ``.providers`` / ``.precision``."""
    if backend not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    cache_dir = Path(cache_dir) if cache_dir else None
    order = _AUTO_ORDER if backend == "auto" else (backend,)
    reasons = []
    wanted = precision
    for name in order:
        precision = auto_precision(bundle, name) if wanted == "auto" else wanted
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
