"""FP16 and INT8 (Q/DQ) variants of the FP32 ONNX file.

Two INT8 forms, because the two consumers want different ones: ``int8`` has symmetric signed int8
activations, the only form TensorRT accepts; ``int8-cpu`` has asymmetric unsigned int8 activations
(signed weights), the "u8s8" form ONNX Runtime's CPU kernels run fastest (VNNI on x86, dot-product
instructions on Arm). On the 2-core x86 CI machine the first ran at 0.9-1.1x FP32's speed and the
second at 1.5x (batch 1-8) to 1.9x (batch 64), single-threaded sessions, measured side by side
(benchmarks/results/export.md).

Precision lives in the graph, not in builder flags, so one file serves ONNX Runtime, TensorRT 10.x
(strongly typed) and TensorRT 11.x (which removed the FP16/INT8 flags and INT8 calibrators).
Both conversions use onnxruntime's own tools, which ship with the onnxruntime wheel.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from .onnx_export import INPUT_NAME


def to_fp16(src: str | Path, dst: str | Path) -> Path:
    """Weights and activations in float16; the uint8 input and float32 output stay as declared, so
    callers do not change."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(dst))
    return Path(dst)


class _ImageBatches(CalibrationDataReader):
    """Feeds uint8 image batches to onnxruntime's calibrator."""

    def __init__(self, images: np.ndarray, batch_size: int):
        self._batches = iter([{INPUT_NAME: images[i:i + batch_size]} for i in range(0, len(images), batch_size)])

    def get_next(self):
        return next(self._batches, None)


@contextmanager
def _quiet_root_logger():
    # quantize_static logs "consider pre-processing" on the root logger; quant_pre_process does not
    # work on dynamo-exported graphs (see docs/ notes), so the advice does not apply.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def to_int8(src: str | Path, dst: str | Path, calibration_images: np.ndarray, batch_size: int = 64,
            target: str = "tensorrt") -> Path:
    """Static INT8 quantisation with QuantizeLinear/DequantizeLinear pairs, calibrated (min/max) on
    real unlabelled images, per-channel int8 weights. ``target="tensorrt"``: symmetric int8
    activations, the form TensorRT consumes in strongly typed mode; ``target="cpu"``: asymmetric
    uint8 activations, the form ONNX Runtime's CPU provider runs fastest (see the module doc), with
    7-bit weights (``reduce_range``): x86 CPUs without VNNI (AVX2, plain AVX-512) multiply u8 x s8
    pairs into a saturating int16 sum, and full-range weights overflowed it. On an AVX2-only AMD
    EPYC the 3,000-step Omniglot encoder's int8-cpu embeddings were within cosine 0.970 of FP32's
    at worst with 8-bit weights and 0.994 with 7-bit ones (512 test images); VNNI and Arm's dot
    products do not saturate, so there the range costs one bit of weight precision and no speed."""
    import onnx

    if len(calibration_images) == 0:
        raise ValueError("INT8 calibration needs at least one image")
    if target not in ("tensorrt", "cpu"):
        raise ValueError(f"target must be 'tensorrt' or 'cpu', not {target!r}")
    symmetric = target == "tensorrt"
    reader = _ImageBatches(calibration_images, batch_size)
    with _quiet_root_logger():
        quantize_static(str(src), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                        weight_type=QuantType.QInt8, reduce_range=not symmetric,
                        extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True})
    onnx.checker.check_model(onnx.load(str(dst)), full_check=True)
    return Path(dst)
