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


def draw_augmentation(n: int, shape, cfg: AugmentConfig, gen: torch.Generator,
                      device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The random choices for n images of shape (C, H, W): every tensor has one row per image.

    Drawing depends on n and the shape only (never on pixels), so a process can draw the choices
    for a whole distributed step and apply only its own rows (apply_augmentation(x, rows_of(d, i)));
    the draws happen in the order augment() always used, so results are unchanged by the split."""
    c, h, w = shape
    u = lambda: torch.rand(n, generator=gen, device=device)
    angle = (2 * u() - 1) * math.radians(cfg.rotate_deg)
    zoom = cfg.scale[0] + u() * (cfg.scale[1] - cfg.scale[0])
    aspect = torch.exp((2 * u() - 1) * cfg.aspect)
    sx, sy = 1 / (zoom * aspect), aspect / zoom  # grid coordinates: inverse of the image change
    shear = (2 * u() - 1) * cfg.shear
    tx = (2 * u() - 1) * cfg.translate_px * 2 / w
    ty = (2 * u() - 1) * cfg.translate_px * 2 / h
    cos, sin = torch.cos(angle), torch.sin(angle)
    d = {"theta": torch.stack([
        torch.stack([cos * sx, (-sin + shear * cos) * sy, tx], 1),
        torch.stack([sin * sx, (cos + shear * sin) * sy, ty], 1),
    ], 1)}
    if cfg.dilate_p > 0:  # thicker strokes
        d["dilate"] = torch.rand(n, 1, 1, 1, generator=gen, device=device) < cfg.dilate_p
    if cfg.erase_p > 0:  # a random blank rectangle
        size_h = torch.randint(3, cfg.erase_max + 1, (n,), generator=gen, device=device)
        size_w = torch.randint(3, cfg.erase_max + 1, (n,), generator=gen, device=device)
        top = (torch.rand(n, generator=gen, device=device) * (h - size_h)).long()
        left = (torch.rand(n, generator=gen, device=device) * (w - size_w)).long()
        rows = torch.arange(h, device=device)[None, :, None]
        cols = torch.arange(w, device=device)[None, None, :]
        inside = ((rows >= top[:, None, None]) & (rows < (top + size_h)[:, None, None])
                  & (cols >= left[:, None, None]) & (cols < (left + size_w)[:, None, None]))
        pick = (torch.rand(n, generator=gen, device=device) < cfg.erase_p)[:, None, None]
        d["erase"] = (inside & pick)[:, None]
    if cfg.dropout_p > 0:  # pixel dropout on a share of the images
        pick = torch.rand(n, 1, 1, 1, generator=gen, device=device) < cfg.dropout_p
        keep = torch.rand((n, c, h, w), generator=gen, device=device) >= cfg.dropout_rate
        d["dropout_keep"] = keep | ~pick
    return d


def rows_of(draw: dict[str, torch.Tensor], rows: slice) -> dict[str, torch.Tensor]:
    return {k: v[rows] for k, v in draw.items()}


def apply_augmentation(pixels: torch.Tensor, draw: dict[str, torch.Tensor]) -> torch.Tensor:
    """uint8 or float pixels [N, C, H, W] (0-255) and N drawn choices -> float views, same scale."""
    x = pixels.float()
    grid = F.affine_grid(draw["theta"], list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if "dilate" in draw:
        x = torch.where(draw["dilate"], F.max_pool2d(x, 3, stride=1, padding=1), x)
    if "erase" in draw:
        x = x * (~draw["erase"]).to(x.dtype)
    if "dropout_keep" in draw:
        x = x * draw["dropout_keep"].to(x.dtype)
    return x.clamp_(0, 255)


def augment(pixels: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """uint8 or float pixels [N, C, H, W] (0-255) -> float views [N, C, H, W] in the same scale."""
    return apply_augmentation(pixels, draw_augmentation(len(pixels), pixels.shape[1:], cfg, gen, pixels.device))
