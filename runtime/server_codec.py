"""Request bodies -> uint8 pixels, and pixels -> PNG thumbnails, for the daemon.

Everything a client sends is untrusted: the npy header is parsed without pickle and checked
against the body's length before any array is made, images are checked for size before they are
decoded (decompression bombs), and every failure is an InputError that becomes a 4xx.
"""
from __future__ import annotations

import base64
import functools
import io
import json

import numpy as np

from protoedge.datasets import pil_to_pixels

from .errors import InputError
from .validation import validate_pixels

NPY_TYPES = ("application/x-npy",)
IMAGE_TYPES = ("image/png", "image/jpeg")
MAX_NPY_HEADER = 4096
MAX_IMAGE_SIDE = 4096  # a PNG/JPEG is resized to the model's input; bigger is not a camera frame


class UnsupportedMediaType(InputError):
    """Answered with 415: the body may be fine, its declared type is not one the route reads."""


def parse_npy(body: bytes, max_images: int) -> np.ndarray:
    """A uint8 array from .npy bytes (format 1.0/2.0/3.0), without pickle and without copying
    more than the array itself."""
    if len(body) < 10 or body[:6] != b"\x93NUMPY":
        raise InputError("not an .npy body (no \\x93NUMPY magic)")
    major = body[6]
    if major == 1:
        offset = 10 + int.from_bytes(body[8:10], "little")
    elif major in (2, 3):
        offset = 12 + int.from_bytes(body[8:12], "little")
    else:
        raise InputError(f"unsupported .npy format version {major}.{body[7]}")
    if offset > min(len(body), MAX_NPY_HEADER + 12):
        raise InputError("malformed .npy header (longer than the body or the limit)")
    shape, order, count = _npy_layout(bytes(body[:offset]), max_images)
    if len(body) - offset != count:
        raise InputError(f"the .npy header promises {count} bytes of pixels, the body has {len(body) - offset}")
    return np.ndarray(shape, np.uint8, body, offset, order=order)


def _npy_layout(header: bytes, max_images: int) -> tuple[tuple, str, int]:
    """(shape, memory order, byte count) of the pixels an accepted .npy header describes, or
    InputError. (A header a client repeats skips this: decode_pixels remembers accepted ones.)"""
    shape, fortran, dtype = _npy_header(header)
    if dtype.hasobject:
        raise InputError("object arrays are refused (no pickle)")
    if dtype != np.uint8:
        raise InputError(f"pixels must be uint8, got {dtype}")
    if len(shape) not in (3, 4):
        raise InputError(f"pixels must be shaped [N, H, W] or [N, C, H, W], got {list(shape)}")
    if shape[0] > max_images:
        raise InputError(f"{shape[0]} images in one request, more than the limit of {max_images}")
    count = 1
    for s in shape:
        count *= int(s)
    return tuple(int(s) for s in shape), "F" if fortran else "C", count


@functools.lru_cache(maxsize=256)
def _npy_header(header: bytes):
    """numpy's own header parser (literal_eval, no pickle), cached: a client sends the same few
    headers over and over, and parsing one costs more than the rest of a small request."""
    buf = io.BytesIO(header)
    try:
        version = np.lib.format.read_magic(buf)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(buf, max_header_size=MAX_NPY_HEADER)
        if version in ((2, 0), (3, 0)):
            return np.lib.format.read_array_header_2_0(buf, max_header_size=MAX_NPY_HEADER)
        raise InputError(f"unsupported .npy format version {version[0]}.{version[1]}")
    except InputError:
        raise
    except Exception as e:  # numpy's header parser can raise tokenize/syntax/value errors alike
        raise InputError(f"malformed .npy header ({type(e).__name__}: {e})") from None


def parse_image(body: bytes, channels: int, height: int, width: int) -> np.ndarray:
    """One PNG/JPEG -> uint8 [1, C, H, W], converted to the model's channels and resized to its input."""
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(io.BytesIO(body))
        if im.format not in ("PNG", "JPEG"):
            raise InputError(f"expected a PNG or JPEG image, got {im.format}")
        if max(im.size) > MAX_IMAGE_SIDE:
            raise InputError(f"image is {im.size[0]}x{im.size[1]}, larger than {MAX_IMAGE_SIDE} pixels a side")
        if im.format == "PNG":
            # Decoding alone does not check the chunk CRCs, so a damaged PNG could pass as an image.
            Image.open(io.BytesIO(body)).verify()
        arr = pil_to_pixels(im, (height, width), channels)
    except InputError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            EOFError) as e:
        raise InputError(f"unreadable image ({type(e).__name__}: {e})") from None
    return np.ascontiguousarray(arr[None])


def decode_pixels(body: bytes, content_type: str, input_spec: dict, max_images: int) -> np.ndarray:
    """Body -> validated uint8 [N, C, H, W] for this bundle, or InputError."""
    c, h, w = input_spec["channels"], input_spec["height"], input_spec["width"]
    if not body:
        raise InputError("empty body: send an application/x-npy array or one image/png or image/jpeg")
    if content_type in NPY_TYPES:
        if type(body) is bytes and body[6:7] == b"\x01":  # (the only .npy version numpy writes for these)
            offset = 10 + int.from_bytes(body[8:10], "little")
            key = (body[:offset], max_images, c, h, w)
            known = _NPY_ACCEPTED.get(key)
            if known is not None and len(body) == known[1]:
                return np.ndarray(known[0], np.uint8, body, offset)
        pixels = parse_npy(body, max_images)
        # The common case, checked cheaply: parse_npy gave uint8, C order, the right image size.
        shape = pixels.shape
        if shape[0] and pixels.flags.c_contiguous:
            if len(shape) == 3 and c == 1 and shape[1] == h and shape[2] == w:
                pixels = pixels.reshape(shape[0], 1, h, w)
            if pixels.ndim == 4 and pixels.shape[1:] == (c, h, w):
                if type(body) is bytes and body[6:7] == b"\x01":
                    _remember_npy(key, pixels.shape, len(body))
                return pixels
    elif content_type in IMAGE_TYPES:
        pixels = parse_image(body, c, h, w)
    else:
        raise UnsupportedMediaType(f"unsupported Content-Type {content_type!r}; use application/x-npy, image/png "
                                   "or image/jpeg")
    return validate_pixels(pixels, c, h, w)


# An accepted .npy header (with the limits and image size it was checked against) -> the shape
# decode_pixels returned for it and the body length that goes with it. Clients repeat a few
# headers, and this lookup replaces parse_npy's checks and the reshape (about 4 of the 5.5 us a
# request spent here on the event loop). Headers only enter after passing every check.
_NPY_ACCEPTED: dict = {}


def _remember_npy(key: tuple, shape: tuple, body_length: int) -> None:
    if len(_NPY_ACCEPTED) >= 256:
        _NPY_ACCEPTED.clear()
    _NPY_ACCEPTED[key] = (shape, body_length)


def parse_json(body: bytes, max_bytes: int = 1 << 16) -> dict:
    if len(body) > max_bytes:
        raise InputError(f"JSON body larger than {max_bytes} bytes")
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise InputError(f"body is not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise InputError("JSON body must be an object")
    return doc


def parse_labels(raw, n: int, max_len: int = 200) -> list[str]:
    """Labels for /v1/examples: a JSON list of n non-empty strings."""
    try:
        labels = json.loads(raw) if isinstance(raw, (str, bytes)) else raw
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise InputError(f"labels must be a JSON list of strings ({e})") from None
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise InputError("labels must be a JSON list of strings")
    if len(labels) != n:
        raise InputError(f"{len(labels)} labels for {n} images")
    for x in labels:
        if not x.strip() or len(x) > max_len:
            raise InputError(f"each label must be a non-empty string of at most {max_len} characters")
    return labels


def png_base64(img: np.ndarray) -> str:
    """uint8 [C, H, W] -> base64 PNG, for thumbnails inside JSON answers."""
    from PIL import Image

    x = np.asarray(img, dtype=np.uint8)
    x = x[0] if x.shape[0] == 1 else x.transpose(1, 2, 0)
    out = io.BytesIO()
    Image.fromarray(x).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode("ascii")
