"""FP16 and INT8 (Q/DQ) variants of the FP32 ONNX file.

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


def to_int8(src: str | Path, dst: str | Path, calibration_images: np.ndarray, batch_size: int = 64) -> Path:
    """Static INT8 quantisation with QuantizeLinear/DequantizeLinear pairs, calibrated (min/max) on
    real unlabelled images: symmetric int8 activations and per-channel int8 weights, the form
    TensorRT consumes in strongly typed mode."""
    import onnx

    if len(calibration_images) == 0:
        raise ValueError("INT8 calibration needs at least one image")
    reader = _ImageBatches(calibration_images, batch_size)
    with _quiet_root_logger():
        quantize_static(str(src), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    onnx.checker.check_model(onnx.load(str(dst)), full_check=True)
    return Path(dst)
