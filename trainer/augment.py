"""Batched image augmentations on tensors (the pseudo-tasks' "different view of the same thing").

Everything runs on whole batches with one affine_grid/grid_sample call plus a few elementwise
ops, because per-image PIL transforms would cost more CPU than the encoder itself.
Pixels stay in the stored 0-255 scale (ink high, background 0) so the encoder's own
normalisation applies unchanged; zero padding therefore means "blank paper".
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass
class AugmentConfig:
    rotate_deg: float = 15.0
    scale: tuple[float, float] = (0.8, 1.25)  # >1 zooms in, i.e. a random resized crop
    aspect: float = 0.15  # independent jitter of the x/y scale (log-uniform half-range)
    shear: float = 0.25  # radians-ish; Omniglot drawers slant their strokes
    translate_px: float = 3.0
    dilate_p: float = 0.3  # thicker strokes: another pen
    erase_p: float = 0.5  # a random blank rectangle: a partly missing drawing
    erase_max: int = 10
    dropout_p: float = 0.5  # share of images that get pixel dropout (UMTRA's Omniglot noise)
    dropout_rate: float = 0.15

    def to_dict(self) -> dict:
        return asdict(self)


def random_affine(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    n, _, h, w = x.shape
    u = lambda: torch.rand(n, generator=gen, device=x.device)
    angle = (2 * u() - 1) * math.radians(cfg.rotate_deg)
    zoom = cfg.scale[0] + u() * (cfg.scale[1] - cfg.scale[0])
    aspect = torch.exp((2 * u() - 1) * cfg.aspect)
    sx, sy = 1 / (zoom * aspect), aspect / zoom  # grid coordinates: inverse of the image change
    shear = (2 * u() - 1) * cfg.shear
    tx = (2 * u() - 1) * cfg.translate_px * 2 / w
    ty = (2 * u() - 1) * cfg.translate_px * 2 / h
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([
        torch.stack([cos * sx, (-sin + shear * cos) * sy, tx], 1),
        torch.stack([sin * sx, (cos + shear * sin) * sy, ty], 1),
    ], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_dilate(x: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    pick = torch.rand(len(x), 1, 1, 1, generator=gen, device=x.device) < p
    return torch.where(pick, F.max_pool2d(x, 3, stride=1, padding=1), x)


def random_erase(x: torch.Tensor, p: float, max_size: int, gen: torch.Generator) -> torch.Tensor:
    n, _, h, w = x.shape
    dev = x.device
    size_h = torch.randint(3, max_size + 1, (n,), generator=gen, device=dev)
    size_w = torch.randint(3, max_size + 1, (n,), generator=gen, device=dev)
    top = (torch.rand(n, generator=gen, device=dev) * (h - size_h)).long()
    left = (torch.rand(n, generator=gen, device=dev) * (w - size_w)).long()
    rows = torch.arange(h, device=dev)[None, :, None]
    cols = torch.arange(w, device=dev)[None, None, :]
    inside = ((rows >= top[:, None, None]) & (rows < (top + size_h)[:, None, None])
              & (cols >= left[:, None, None]) & (cols < (left + size_w)[:, None, None]))
    pick = (torch.rand(n, generator=gen, device=dev) < p)[:, None, None]
    return x * (~(inside & pick))[:, None].to(x.dtype)


def random_dropout(x: torch.Tensor, p: float, rate: float, gen: torch.Generator) -> torch.Tensor:
    pick = torch.rand(len(x), 1, 1, 1, generator=gen, device=x.device) < p
    keep = torch.rand(x.shape, generator=gen, device=x.device) >= rate
    return x * (keep | ~pick).to(x.dtype)


def augment(pixels: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """uint8 or float pixels [N, C, H, W] (0-255) -> float views [N, C, H, W] in the same scale."""
    x = pixels.float()
    x = random_affine(x, cfg, gen)
    if cfg.dilate_p > 0:
        x = random_dilate(x, cfg.dilate_p, gen)
    if cfg.erase_p > 0:
        x = random_erase(x, cfg.erase_p, cfg.erase_max, gen)
    if cfg.dropout_p > 0:
        x = random_dropout(x, cfg.dropout_p, cfg.dropout_rate, gen)
    return x.clamp_(0, 255)
