"""The torch-free device runtime: bundles, backends, prototypes, streaming clustering, daemon.

Names are exported lazily so ``import protoedge.runtime`` stays cheap (no onnxruntime until an
encoder is opened).
"""
from importlib import import_module

_EXPORTS = {
    "load_bundle": "bundle", "Bundle": "bundle", "BundleError": "bundle",
    "open_encoder": "backends", "BACKENDS": "backends",
    "StreamClusterer": "clustering", "Assignment": "clustering", "ClusterInfo": "clustering",
    "threshold_from_calibration": "clustering",
    "Runtime": "pipeline",
    "InputError": "errors", "StateError": "errors", "BackendUnavailable": "errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
