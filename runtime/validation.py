"""Checks on what enters the runtime, so a bad call fails with a clear message before any state
is touched."""
from __future__ import annotations

import numpy as np

from .errors import InputError


def validate_pixels(pixels, channels: int, height: int, width: int) -> np.ndarray:
    """Return ``pixels`` as contiguous uint8 [N, C, H, W] or raise InputError.

    [N, H, W] is accepted for single-channel models. Floats are refused rather than guessed at
    (0-1 or 0-255?), but NaN is named as such since it usually means a broken upstream step.
    """
    arr = np.asarray(pixels)
    if arr.dtype == object:
        raise InputError("pixels must be a numeric array, got Python objects")
    if np.issubdtype(arr.dtype, np.floating) and np.isnan(arr).any():
        raise InputError(f"pixels contain NaN ({int(np.isnan(arr).sum())} values)")
    if arr.dtype != np.uint8:
        raise InputError(f"pixels must be uint8 0-255 (ink high, as stored), got {arr.dtype}; "
                         "scale 0-1 floats with (x * 255).round().astype(np.uint8)")
    if arr.ndim == 3 and channels == 1:
        arr = arr[:, None]
    if arr.ndim != 4:
        raise InputError(f"pixels must be shaped [N, {channels}, {height}, {width}], got {list(arr.shape)}")
    if arr.shape[0] == 0:
        raise InputError("empty batch: no images given")
    if arr.shape[1:] != (channels, height, width):
        raise InputError(f"each image must be {channels}x{height}x{width} (C x H x W) for this bundle, "
                         f"got {'x'.join(map(str, arr.shape[1:]))}; resize first "
                         "(protoedge.datasets.load_images does)")
    return np.ascontiguousarray(arr)


def validate_embeddings(x, dim: int, check_finite: bool = True) -> np.ndarray:
    """Return ``x`` as float32 [N, dim] or raise InputError (shape, dtype, empty, NaN/inf).

    ``check_finite=False`` leaves the NaN/inf check to the caller (the clusterer folds it into
    the row norms it computes anyway: a call on a few rows is mostly such fixed costs)."""
    arr = np.asarray(x)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise InputError(f"embeddings must be shaped [N, {dim}], got {list(np.shape(x))}")
    if arr.shape[0] == 0:
        raise InputError("empty batch: no embeddings given")
    if arr.dtype.kind not in "fiu":  # floats, signed and unsigned integers
        raise InputError(f"embeddings must be floating point, got {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if check_finite and not np.isfinite(arr).all():
        raise InputError("embeddings contain NaN or infinite values")
    return arr
