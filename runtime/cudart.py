"""A thin ctypes wrapper over libcudart: the few calls the native TensorRT backend needs
(device buffers, one stream, async copies), so the runtime needs neither pycuda nor torch."""
from __future__ import annotations

import ctypes
import ctypes.util

import numpy as np

from .errors import BackendUnavailable

_H2D, _D2H = 1, 2  # cudaMemcpyKind
_NAMES = ("libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0")


class CudaRuntime:
    def __init__(self):
        found = ctypes.util.find_library("cudart")
        lib = None
        for name in ((found,) if found else ()) + _NAMES:
            try:
                lib = ctypes.CDLL(name)
                break
            except OSError:
                continue
        if lib is None:
            raise BackendUnavailable("libcudart not found (install the CUDA runtime)")
        self.lib = lib
        lib.cudaGetErrorString.restype = ctypes.c_char_p
        lib.cudaMalloc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t]
        lib.cudaFree.argtypes = [ctypes.c_void_p]
        lib.cudaMemcpyAsync.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                        ctypes.c_void_p]
        lib.cudaStreamCreate.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
        lib.cudaStreamSynchronize.argtypes = [ctypes.c_void_p]
        lib.cudaStreamDestroy.argtypes = [ctypes.c_void_p]
        count = ctypes.c_int(0)
        if lib.cudaGetDeviceCount(ctypes.byref(count)) != 0 or count.value == 0:
            raise BackendUnavailable("no CUDA device visible")

    def _check(self, status: int, what: str) -> None:
        if status != 0:
            msg = self.lib.cudaGetErrorString(status).decode(errors="replace")
            raise RuntimeError(f"CUDA {what} failed: {msg} ({status})")

    def malloc(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p()
        self._check(self.lib.cudaMalloc(ctypes.byref(ptr), nbytes), "malloc")
        return ptr.value

    def free(self, ptr: int) -> None:
        self._check(self.lib.cudaFree(ptr), "free")

    def stream(self) -> int:
        s = ctypes.c_void_p()
        self._check(self.lib.cudaStreamCreate(ctypes.byref(s)), "stream create")
        return s.value

    def htod(self, dst: int, src: np.ndarray, stream: int) -> None:
        self._check(self.lib.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes, _H2D, stream), "copy to device")

    def dtoh(self, dst: np.ndarray, src: int, stream: int) -> None:
        self._check(self.lib.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes, _D2H, stream), "copy to host")

    def sync(self, stream: int) -> None:
        self._check(self.lib.cudaStreamSynchronize(stream), "stream synchronize")

    def destroy_stream(self, stream: int) -> None:
        self.lib.cudaStreamDestroy(stream)
