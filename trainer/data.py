"""The unlabelled training pool: the shipped arrays in memory, or an image folder of any size read
from disk by DataLoader worker processes.

Both answer len(pool) and pool.take(indices) -> uint8 [n, C, H, W] at the encoder's input size, so
the training loop draws indices the same way for both (from the run's generator, hence exactly
resumable and identical on every distributed rank) and reads only the images it needs.

Limit: a folder step's images are read when the step has been drawn (parallel over the workers, but
no prefetch of the next step, whose indices depend on k-means refreshes that happen in between).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from protoedge import datasets

FOLDER_SUFFIXES = (".png", ".jpg", ".jpeg")


def resize_pixels(images: np.ndarray | torch.Tensor, size: int, batch: int = 2048) -> torch.Tensor:
    """uint8 [N, C, H, W] -> uint8 [N, C, size, size], bilinear (antialiased when shrinking).
    The one resize the trainer and `protoedge eval` use for shipped images of another size."""
    images = torch.as_tensor(images)
    if tuple(images.shape[2:]) == (size, size):
        return images
    out = [F.interpolate(images[i:i + batch].float(), size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True).round_().clamp_(0, 255).to(torch.uint8)
           for i in range(0, len(images), batch)]
    return torch.cat(out)


class TensorPool:
    """Images held in memory (the shipped sets), resized once if the encoder wants another size."""

    def __init__(self, images: np.ndarray | torch.Tensor, fingerprint: str, size: int = 0):
        self.images = resize_pixels(images, size) if size else torch.as_tensor(images)
        self.fingerprint = fingerprint
        self.shape = tuple(self.images.shape[1:])

    def __len__(self) -> int:
        return len(self.images)

    def take(self, index: np.ndarray) -> torch.Tensor:
        return self.images[torch.from_numpy(np.asarray(index, np.int64))]


class ImageFiles(torch.utils.data.Dataset):
    """One image file -> uint8 [C, H, W] via protoedge.datasets (Pillow), at the requested size."""

    def __init__(self, files: list[Path], size: int, channels: int):
        self.files, self.size, self.channels = files, size, channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        pixels = datasets._read_image(self.files[i], (self.size, self.size), self.channels)
        return torch.from_numpy(pixels.copy())  # Pillow's buffer is read-only


class _Wanted(torch.utils.data.Sampler):
    """The indices of the next read; set before each pass over the loader (persistent workers stay)."""

    def __init__(self):
        self.indices: list[int] = []

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class FolderPool:
    """An unlabelled folder (recursive, png/jpg, any number of images), never loaded whole: take()
    reads the requested files in `workers` DataLoader processes (persistent between steps)."""

    def __init__(self, root: str | Path, size: int, channels: int, workers: int = 4, chunk: int = 32):
        root = Path(root)
        if not root.is_dir():
            raise datasets.DataError(f"{root}: not a folder")
        self.files = sorted(p for p in root.rglob("*") if p.suffix.lower() in FOLDER_SUFFIXES and p.is_file())
        if not self.files:
            raise datasets.DataError(f"{root}: no images ({', '.join(FOLDER_SUFFIXES)}) found, recursively")
        self.dataset = ImageFiles(self.files, size, channels)
        self.shape = (channels, size, size)
        # Provenance without reading every image: names and sizes (a changed file of equal size is missed).
        h = hashlib.sha256()
        for p in self.files:
            h.update(f"{p.relative_to(root)}\0{p.stat().st_size}\n".encode())
        self.fingerprint = h.hexdigest()
        self._wanted = _Wanted()
        self.loader = torch.utils.data.DataLoader(self.dataset, batch_size=chunk, sampler=self._wanted,
                                                  num_workers=workers, persistent_workers=workers > 0)

    def __len__(self) -> int:
        return len(self.files)

    def take(self, index: np.ndarray) -> torch.Tensor:
        self._wanted.indices = [int(i) for i in np.asarray(index).reshape(-1)]
        if not self._wanted.indices:
            return torch.zeros((0, *self.shape), dtype=torch.uint8)
        return torch.cat(list(self.loader))  # the loader keeps the order of the indices
