"""Encoder -> FP32 ONNX with the current (dynamo) exporter, and its parity against torch."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch

INPUT_NAME = "images"
OUTPUT_NAME = "embedding"
OPSET = 18  # the dynamo exporter's floor; inside TensorRT 10.3's parser range (JetPack 6)
FP32_MAX_ABS_TOLERANCE = 1e-4

log = logging.getLogger(__name__)


class ExportError(RuntimeError):
    """The export produced something that must not be shipped; the message says what."""


def export_fp32(encoder: torch.nn.Module, path: str | Path, max_batch: int = 4096) -> Path:
    """Write the encoder as one self-contained ONNX file (weights inside, dynamic batch) and check it.

    uint8 pixels go in and normalisation is part of the graph, exactly the encoder's contract.
    """
    import onnx

    path = Path(path)
    cfg = encoder.config
    example = torch.zeros(2, cfg.in_channels, cfg.input_size, cfg.input_size, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    # The exporter's chatter (deprecations, "torchvision is not installed") is not actionable here.
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    previous = registration_log.level
    registration_log.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(encoder.eval(), (example,), str(path), dynamo=True, opset_version=OPSET,
                          external_data=False, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_shapes={"pixels": {0: batch}}, verbose=False)
    registration_log.setLevel(previous)
    model = onnx.load(str(path))
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"{path}: onnx.checker rejects the exported graph: {e}") from None
    opset = {o.domain: o.version for o in model.opset_import}.get("", None)
    if opset != OPSET:
        raise ExportError(f"{path}: exported opset {opset}, wanted {OPSET}")
    return path


def run_onnx(path: str | Path, images: np.ndarray, batch_size: int = 256, threads: int = 1,
             unfused: bool = False) -> np.ndarray:
    """Embeddings of uint8 images from an ONNX file on ONNX Runtime's CPU provider.

    ``unfused``: no graph optimisation, so Q/DQ pairs run as written (quantise, dequantise, float
    operator) instead of as ONNX Runtime's fused int8 kernels. That is the arithmetic TensorRT
    reproduces (int32 accumulation), and the right way to score the TensorRT-form ``int8`` file on
    a CPU: on x86 without VNNI the fused s8 kernels saturate (AVX2 AMD EPYC, 3,000-step Omniglot
    encoder: worst cosine to FP32 0.857 fused against 0.987 unfused, 512 test images)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    if unfused:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    out = [session.run([OUTPUT_NAME], {INPUT_NAME: images[i:i + batch_size]})[0]
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out).astype(np.float32, copy=False)


def run_torch(encoder: torch.nn.Module, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    with torch.inference_mode():
        out = [encoder(torch.from_numpy(images[i:i + batch_size])).numpy()
               for i in range(0, len(images), batch_size)]
    return np.concatenate(out)


def compare(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """max |difference| and the worst per-image cosine similarity."""
    diff = float(np.abs(reference.astype(np.float64) - candidate).max())
    ref, cand = reference.astype(np.float64), candidate.astype(np.float64)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    cos = (ref * cand).sum(1) / np.maximum(norms, 1e-30)
    # Two all-zero embeddings (possible after ReLU) agree perfectly.
    cos[(norms == 0) & (np.abs(ref - cand).max(1) == 0)] = 1.0
    return {"max_abs_diff": diff, "min_cosine": float(cos.min()), "n_images": int(len(reference))}


def check_fp32_parity(encoder: torch.nn.Module, onnx_path: str | Path, images: np.ndarray,
                      tolerance: float = FP32_MAX_ABS_TOLERANCE) -> dict:
    """Parity of the FP32 ONNX file with torch on real images; ExportError when it is off."""
    stats = compare(run_torch(encoder, images), run_onnx(onnx_path, images))
    if not stats["max_abs_diff"] <= tolerance:  # also catches NaN
        raise ExportError(f"FP32 ONNX differs from the torch model by max |d| = {stats['max_abs_diff']:.3g} "
                          f"on {len(images)} real images (tolerance {tolerance:g}); refusing to write it")
    return stats
