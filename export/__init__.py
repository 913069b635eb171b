"""Checkpoint -> ONNX (FP32/FP16/INT8) -> verifiable model bundle, and TensorRT engines."""
