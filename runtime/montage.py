"""Cluster montage: one row of member thumbnails per cluster, biggest first, as a PNG.

Pillow and numpy only (no matplotlib, no torch), so the device's daemon can show an operator what it
has found (`GET /v1/report`) with the same picture the workstation's HTML report embeds.

    keeper = MemberSamples(per_cluster=12)
    keeper.add(pixels, [a.cluster_id for a in assignments])      # as the stream goes by
    png = cluster_montage_png(keeper.rows(clusterer.clusters()))  # -> bytes
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np

THUMB_SCALE = 2  # 28x28 characters are too small to recognise at 1:1
GAP = 4
CAPTION_WIDTH = 190
HEADER_HEIGHT = 28
BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
MISMATCH = (220, 30, 30)  # frame of a member whose true class is not the cluster's majority


@dataclass
class MontageRow:
    """One cluster: its caption numbers and up to `per_row` member thumbnails uint8 [M, C, H, W]."""
    cluster_id: int
    size: int
    thumbnails: np.ndarray
    purity: float | None = None  # share of the cluster's majority class, 0..1, when labels are known
    label: str | None = None  # a user-given or majority-class name
    mismatched: np.ndarray | None = None  # bool [M]: member's true class differs from the majority


@dataclass
class MemberSamples:
    """Keeps the first `per_cluster` thumbnails of every cluster, bounded in memory, for the montage."""
    per_cluster: int = 12
    max_clusters: int = 5000
    _thumbs: dict[int, list[np.ndarray]] = field(default_factory=dict)

    def add(self, pixels: np.ndarray, cluster_ids) -> None:
        for img, cid in zip(pixels, cluster_ids):
            cid = int(cid)
            kept = self._thumbs.get(cid)
            if kept is None:
                if len(self._thumbs) >= self.max_clusters:
                    continue
                kept = self._thumbs[cid] = []
            if len(kept) < self.per_cluster:
                kept.append(np.array(img, dtype=np.uint8, copy=True))

    def forget(self, cluster_id: int) -> None:
        self._thumbs.pop(int(cluster_id), None)

    def merge(self, into: int, others) -> None:
        kept = self._thumbs.setdefault(int(into), [])
        for other in others:
            for img in self._thumbs.pop(int(other), []):
                if len(kept) < self.per_cluster:
                    kept.append(img)

    def rows(self, clusters) -> list[MontageRow]:
        """Rows for clusters given as objects or dicts with `id` (or `cluster_id`), a size and `label`.
        The size is `seen` (images ever absorbed: what an operator counts) when the cluster has it,
        else `size` or `count` (a StreamClusterer's count decays, so it is only the fallback)."""
        out = []
        for c in clusters:
            get = c.get if isinstance(c, dict) else lambda k, d=None, c=c: getattr(c, k, d)
            cid = int(get("id", get("cluster_id")))
            thumbs = self._thumbs.get(cid)
            if not thumbs:
                continue
            size = next((v for v in (get("seen"), get("size"), get("count")) if v is not None), len(thumbs))
            out.append(MontageRow(cid, int(round(size)), np.stack(thumbs), label=get("label")))
        return out


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _to_display(thumbs: np.ndarray, invert: bool) -> np.ndarray:
    """[M, C, H, W] uint8 -> [M, H, W, 3] uint8 as a person should see it."""
    x = np.asarray(thumbs, dtype=np.uint8)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"thumbnails must be uint8 [M, 1|3, H, W], got {list(x.shape)}")
    x = np.repeat(x, 3, axis=1) if x.shape[1] == 1 else x
    x = x.transpose(0, 2, 3, 1)
    return 255 - x if invert else x


def ink_is_high(thumbs: np.ndarray) -> bool:
    """Grey images on a dark border (Omniglot, MNIST store ink as high values) read better inverted."""
    x = np.asarray(thumbs)
    if x.ndim != 4 or x.shape[1] != 1 or x.size == 0:
        return False
    border = np.concatenate([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], axis=-1)
    return float(border.mean()) < 64


def montage_size(n_rows: int, per_row: int, thumb_hw: tuple[int, int]) -> tuple[int, int]:
    """(width, height) in pixels of the montage cluster_montage() draws for these dimensions."""
    th, tw = thumb_hw[0] * THUMB_SCALE, thumb_hw[1] * THUMB_SCALE
    width = CAPTION_WIDTH + per_row * (tw + GAP) + GAP
    height = HEADER_HEIGHT + max(n_rows, 1) * (th + GAP) + GAP
    return width, height


def _caption(row: MontageRow) -> list[str]:
    lines = [f"cluster {row.cluster_id}", f"size {row.size}"]
    if row.purity is not None:
        lines[-1] += f"   purity {100 * row.purity:.0f}%"
    if row.label:
        lines.append(str(row.label)[:28])
    return lines


def cluster_montage(rows: list[MontageRow], per_row: int = 12, max_rows: int = 40,
                    title: str | None = None, invert: bool | str = "auto"):
    """A PIL image: the biggest `max_rows` clusters, one row each, `per_row` thumbnails at most.

    invert: True/False, or "auto" to show ink-high grey images (Omniglot, MNIST) as dark on white.
    """
    from PIL import Image, ImageDraw

    rows = sorted(rows, key=lambda r: (-r.size, r.cluster_id))[:max_rows]
    for r in rows:
        shape = np.shape(r.thumbnails)
        if len(shape) != 4 or shape[1] not in (1, 3):
            raise ValueError(f"cluster {r.cluster_id}: thumbnails must be uint8 [M, 1|3, H, W], got {list(shape)}")
    sample = next((r.thumbnails for r in rows if len(r.thumbnails)), None)
    thumb_hw = (28, 28) if sample is None else tuple(sample.shape[2:])
    if invert == "auto":
        invert = sample is not None and ink_is_high(np.concatenate([r.thumbnails for r in rows]))
    width, height = montage_size(len(rows), per_row, thumb_hw)
    th, tw = thumb_hw[0] * THUMB_SCALE, thumb_hw[1] * THUMB_SCALE
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font, title_font = _font(12), _font(15)
    draw.text((GAP, 6), title or f"{len(rows)} largest clusters, one row each, biggest first",
              fill=TEXT, font=title_font)
    if not rows:
        draw.text((GAP, HEADER_HEIGHT + 8), "no clusters yet", fill=TEXT, font=font)
    for i, row in enumerate(rows):
        top = HEADER_HEIGHT + i * (th + GAP) + GAP
        for j, line in enumerate(_caption(row)):
            draw.text((GAP, top + 2 + 14 * j), line, fill=TEXT, font=font)
        thumbs = _to_display(row.thumbnails[:per_row], bool(invert))
        for k, img in enumerate(thumbs):
            left = CAPTION_WIDTH + k * (tw + GAP)
            tile = Image.fromarray(img).resize((tw, th), Image.NEAREST)
            canvas.paste(tile, (left, top))
            if row.mismatched is not None and k < len(row.mismatched) and row.mismatched[k]:
                draw.rectangle([left - 1, top - 1, left + tw, top + th], outline=MISMATCH, width=2)
    return canvas


def cluster_montage_png(rows: list[MontageRow], **kwargs) -> bytes:
    """cluster_montage() encoded as PNG bytes (what the daemon's `GET /v1/report` returns)."""
    buf = io.BytesIO()
    cluster_montage(rows, **kwargs).save(buf, format="PNG", optimize=True)
    return buf.getvalue()
