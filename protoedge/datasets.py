"""Image sets: the shipped benchmark arrays, image folders and .npz/.npy files.

Everything comes back as an :class:`ImageSet`: uint8 pixels ``[N, C, H, W]`` exactly as the
encoder's contract wants them (ink high for Omniglot/MNIST), with optional integer labels.
Only numpy and Pillow are used, so the torch-free runtime can load data too.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# Checked on first load so that a truncated or swapped data file fails loudly, not as bad accuracy.
SHIPPED_SHA256 = {
    "omniglot.npz": "7ca543579e937e43edb44f727a1805f6b2c123d191668e0526a8cfac42c4fc45",
    "mnist.npz": "06af5dfe73b70e3bc1c36439982b18a8d76803db9b544f6fdf838a37fbb01b64",
}


class DataError(ValueError):
    """A data file or folder could not be read; the message names it."""


@dataclass
class ImageSet:
    images: np.ndarray  # uint8 [N, C, H, W]
    labels: np.ndarray | None = None  # int64 [N], or None for unlabelled data
    class_names: list[str] = field(default_factory=list)
    source: str = ""

    def __post_init__(self):
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise DataError(f"{self.source or 'images'}: expected uint8 [N, C, H, W], "
                            f"got {self.images.dtype} {list(self.images.shape)}")
        if self.labels is not None and len(self.labels) != len(self.images):
            raise DataError(f"{self.source}: {len(self.labels)} labels for {len(self.images)} images")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index) -> "ImageSet":
        labels = None if self.labels is None else self.labels[index]
        return ImageSet(self.images[index], labels, self.class_names, self.source)

    def fingerprint(self) -> str:
        """sha256 of pixels (and labels): recorded as training provenance."""
        h = hashlib.sha256(np.ascontiguousarray(self.images).tobytes())
        if self.labels is not None:
            h.update(np.ascontiguousarray(self.labels).tobytes())
        return h.hexdigest()


# ----------------------------------------------------------------------------- shipped data

def data_dir() -> Path:
    """The folder holding the shipped arrays: $PROTOEDGE_DATA, else the repository's data/."""
    env = os.environ.get("PROTOEDGE_DATA")
    path = Path(env) if env else Path(__file__).resolve().parent.parent / "data"
    if not (path / "protocols.json").is_file():
        raise DataError(f"shipped data not found in {path}: set PROTOEDGE_DATA to the folder "
                        "holding omniglot.npz, mnist.npz and protocols.json")
    return path


@lru_cache(maxsize=None)
def _shipped(name: str) -> dict:
    path = data_dir() / name
    if not path.is_file():
        raise DataError(f"{path}: missing")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if SHIPPED_SHA256.get(name) not in (None, digest):
        raise DataError(f"{path}: sha256 {digest} does not match the shipped {SHIPPED_SHA256[name]}")
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def protocols() -> dict:
    with open(data_dir() / "protocols.json") as f:
        return {k: v for k, v in json.load(f).items() if not k.startswith("_")}


def _omniglot_character_names(arrays: dict) -> np.ndarray:
    """'Alphabet/characterNN' for every row, the naming used by the Vinyals split files."""
    alphabet = arrays["alphabet"]
    number = arrays["char_in_alphabet"].astype(int)
    return np.char.add(np.char.add(alphabet, "/character"), np.char.zfill(number.astype(str), 2))


def load_split(protocol: str, part: str) -> ImageSet:
    """Images of one part ('train' or 'test') of a protocol in data/protocols.json.

    Labels are always returned (the shipped sets are labelled); training code that claims to be
    unsupervised must not read them, and the trainer drops them before it sees the data.
    """
    table = protocols()
    if protocol not in table:
        raise DataError(f"unknown protocol {protocol!r}; known: {', '.join(table)}")
    if part not in ("train", "test"):
        raise DataError(f"part must be 'train' or 'test', not {part!r}")
    spec, rule = table[protocol], table[protocol][part]
    source = f"{protocol}:{part}"
    if spec["dataset"] == "mnist":
        arrays = _shipped("mnist.npz")
        x, y = arrays[f"x_{rule['mnist_part']}"], arrays[f"y_{rule['mnist_part']}"]
        return ImageSet(x[:, None], y.astype(np.int64), [str(i) for i in range(10)], source)
    arrays = _shipped("omniglot.npz")
    if "omniglot_split" in rule:
        keep = arrays["split"] == rule["omniglot_split"]
    else:
        wanted: set[str] = set()
        for rel in rule["characters_from"]:
            wanted.update(line.strip() for line in open(data_dir() / rel) if line.strip())
        names = _omniglot_character_names(arrays)
        keep = np.isin(names, sorted(wanted))
        if len(np.unique(arrays["char_id"][keep])) != len(wanted):
            raise DataError(f"{source}: split lists name characters missing from omniglot.npz")
    char_id = arrays["char_id"][keep].astype(np.int64)
    classes, labels = np.unique(char_id, return_inverse=True)
    names = _omniglot_character_names(arrays)[keep]
    class_names = [str(names[np.argmax(char_id == c)]) for c in classes]
    return ImageSet(arrays["images"][keep][:, None], labels.astype(np.int64), class_names, source)


# ----------------------------------------------------------------------------- user data

def pil_to_pixels(im, size: tuple[int, int], channels: int) -> np.ndarray:
    """A Pillow image -> uint8 [C, H, W]: converted to the model's channels, resized to (H, W).
    Shared by the folder loader and the daemon's PNG/JPEG bodies, so both see the same pixels."""
    from PIL import Image

    im = im.convert("L" if channels == 1 else "RGB")
    if im.size != (size[1], size[0]):
        im = im.resize((size[1], size[0]), Image.BILINEAR)
    arr = np.asarray(im, dtype=np.uint8)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def _read_image(path: Path, size: tuple[int, int], channels: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return pil_to_pixels(im, size, channels)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DataError(f"{path}: cannot read image ({e})") from None


def _fit_array(arr: np.ndarray, source: str, size, channels) -> np.ndarray:
    """Bring an [N,H,W], [N,C,H,W] or [N,H,W,C] uint8 array to [N, C, H, W]."""
    if arr.dtype != np.uint8:
        raise DataError(f"{source}: pixels must be uint8, got {arr.dtype}")
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4 and arr.shape[1] not in (1, 3) and arr.shape[3] in (1, 3):
        arr = arr.transpose(0, 3, 1, 2)
    if arr.ndim != 4:
        raise DataError(f"{source}: expected images shaped [N, H, W] or [N, C, H, W], got {list(arr.shape)}")
    if channels is not None and arr.shape[1] != channels:
        if arr.shape[1] == 3 and channels == 1:
            gray = 0.299 * arr[:, 0] + 0.587 * arr[:, 1] + 0.114 * arr[:, 2]  # ITU-R 601, as Pillow's "L"
            arr = np.round(gray)[:, None].astype(np.uint8)
        elif arr.shape[1] == 1 and channels == 3:
            arr = np.repeat(arr, 3, axis=1)
        else:
            raise DataError(f"{source}: {arr.shape[1]} channels, model wants {channels}")
    if size is not None and tuple(arr.shape[2:]) != tuple(size):
        from PIL import Image

        out = np.empty((len(arr), arr.shape[1], *size), np.uint8)
        for i, img in enumerate(arr):
            for c in range(arr.shape[1]):
                out[i, c] = np.asarray(Image.fromarray(img[c]).resize((size[1], size[0]), Image.BILINEAR))
        arr = out
    return np.ascontiguousarray(arr)


def load_images(path: str | os.PathLike, size: tuple[int, int] | None = (28, 28),
                channels: int | None = 1) -> ImageSet:
    """Load a folder of images or an .npz/.npy array file.

    A flat folder is unlabelled; a folder with one sub-folder per class is labelled by sub-folder.
    An .npz needs an image array under 'images' (or 'x'/'x_test'/the first array) and may carry
    'labels' (or 'y'/'y_test'). Images are converted to ``channels`` and resized to ``size``
    (pass None to keep what is stored).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        return _load_folder(path, size, channels)
    if path.suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise DataError(f"{path}: not a readable .npy file ({e})") from None
        return ImageSet(_fit_array(arr, str(path), size, channels), None, [], str(path))
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (ValueError, OSError, EOFError) as e:
            raise DataError(f"{path}: not a readable .npz file ({e})") from None
        key = next((k for k in ("images", "x", "x_test") if k in arrays), None) or next(iter(arrays), None)
        if key is None:
            raise DataError(f"{path}: holds no arrays")
        images = _fit_array(arrays[key], f"{path}:{key}", size, channels)
        lkey = next((k for k in ("labels", "y", "y_test") if k in arrays), None)
        labels = None if lkey is None else arrays[lkey].astype(np.int64).reshape(-1)
        return ImageSet(images, labels, [], str(path))
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return ImageSet(_read_image(path, size or (28, 28), channels or 1)[None], None, [], str(path))
    raise DataError(f"{path}: unsupported file type (want an image folder, .npz, .npy or an image)")


def _load_folder(path: Path, size, channels) -> ImageSet:
    size, channels = size or (28, 28), channels or 1
    subdirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if subdirs:
        files, labels = [], []
        for label, sub in enumerate(subdirs):
            found = sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            files += found
            labels += [label] * len(found)
        names = [p.name for p in subdirs]
    else:
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        labels, names = None, []
    if not files:
        raise DataError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    images = np.stack([_read_image(f, size, channels) for f in files])
    return ImageSet(images, None if labels is None else np.array(labels, np.int64), names, str(path))
