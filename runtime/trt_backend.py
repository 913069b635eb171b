"""Native TensorRT backend: the engine comes from runtime/tensorrt_build.py (built on first start,
then cached under a key of ONNX hash, TensorRT version, GPU and precision); inference uses named
I/O tensors and execute_async_v3 with buffers from the ctypes CUDA wrapper."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .errors import BackendUnavailable
from .validation import validate_pixels

log = logging.getLogger(__name__)


class TensorRTEncoder:
    backend = "tensorrt"

    def __init__(self, bundle, precision: str = "fp32", cache_dir: Path | None = None, max_batch: int = 256):
        from .tensorrt_build import PRECISIONS

        if precision not in PRECISIONS:  # int8-cpu: asymmetric activations, which TensorRT rejects
            raise BackendUnavailable(f"TensorRT takes the {', '.join(PRECISIONS)} variants, not {precision!r} "
                                     f"(use int8 for INT8 on TensorRT)")
        try:
            import tensorrt as trt
        except ImportError as e:
            raise BackendUnavailable(f"TensorRT Python bindings not importable ({e})") from None
        from .cudart import CudaRuntime
        from .tensorrt_build import build_or_load_engine

        self.cuda = CudaRuntime()  # raises BackendUnavailable without a GPU
        spec = bundle.input_spec
        self.channels, self.height, self.width = int(spec["channels"]), int(spec["height"]), int(spec["width"])
        self.max_batch = int(max_batch)
        self.precision = precision
        log.warning("TensorRT: loading or building the engine (a first build can take minutes)")
        try:
            plan = build_or_load_engine(Path(bundle.onnx_path(precision)), Path(cache_dir) / "engines",
                                        precision, profile=(1, min(64, self.max_batch), self.max_batch),
                                        input_name=spec["name"], onnx_sha256=bundle.file_sha256(precision))
        except Exception as e:  # builder errors vary by TensorRT version; `auto` must fall back on any
            raise BackendUnavailable(f"TensorRT engine build failed: {e}") from e
        self._trt_logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._trt_logger)
        self.engine = self._runtime.deserialize_cuda_engine(Path(plan).read_bytes())
        if self.engine is None:
            raise BackendUnavailable(f"TensorRT could not deserialize {plan} (stale or foreign engine)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if len(inputs) != 1 or len(outputs) != 1:
            raise BackendUnavailable(f"engine has inputs {inputs} and outputs {outputs}; expected one each")
        self.input_name, self.output_name = inputs[0], outputs[0]
        self.out_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.output_name)))
        self.dim = int(bundle.output_spec["dim"])
        self.stream = self.cuda.stream()
        per_image = self.channels * self.height * self.width
        self.d_in = self.cuda.malloc(self.max_batch * per_image)
        self.d_out = self.cuda.malloc(self.max_batch * self.dim * self.out_dtype.itemsize)
        self.context.set_tensor_address(self.input_name, self.d_in)
        self.context.set_tensor_address(self.output_name, self.d_out)
        self.providers = [f"TensorRT {trt.__version__}"]
        self.embed_valid(np.zeros((1, self.channels, self.height, self.width), np.uint8))  # warm up

    def validate(self, pixels) -> np.ndarray:
        return validate_pixels(pixels, self.channels, self.height, self.width)

    def embed(self, pixels) -> np.ndarray:
        return self.embed_valid(self.validate(pixels))

    def embed_valid(self, x: np.ndarray) -> np.ndarray:
        out = np.empty((len(x), self.dim), np.float32)
        for i in range(0, len(x), self.max_batch):
            chunk = np.ascontiguousarray(x[i:i + self.max_batch])
            host = np.empty((len(chunk), self.dim), self.out_dtype)
            self.context.set_input_shape(self.input_name, chunk.shape)
            self.cuda.htod(self.d_in, chunk, self.stream)
            if not self.context.execute_async_v3(self.stream):
                raise RuntimeError("TensorRT execution failed")
            self.cuda.dtoh(host, self.d_out, self.stream)
            self.cuda.sync(self.stream)
            out[i:i + len(chunk)] = host
        return out

    def describe(self) -> dict:
        return {"backend": self.backend, "providers": self.providers, "precision": self.precision}

    def __del__(self):
        cuda = getattr(self, "cuda", None)
        if cuda is None:
            return
        for ptr in (getattr(self, "d_in", None), getattr(self, "d_out", None)):
            if ptr:
                try:
                    cuda.free(ptr)
                except Exception:  # interpreter shutdown: the driver frees it anyway
                    pass
