"""The device-side cluster montage (runtime/montage.py): Pillow only, fixed geometry, bounded memory."""
import subprocess
import sys
from io import BytesIO

import numpy as np
import pytest
from PIL import Image

from protoedge import datasets
from protoedge.runtime.montage import (CAPTION_WIDTH, THUMB_SCALE, MemberSamples, MontageRow, cluster_montage,
                                       cluster_montage_png, ink_is_high, montage_size)


@pytest.fixture(scope="module")
def characters():
    test = datasets.load_split("omniglot-a", "test")
    return test.images, test.labels


def test_montage_png_has_one_row_per_cluster_biggest_first(characters):
    images, labels = characters
    rows = [MontageRow(cluster_id=c, size=int(5 + c), thumbnails=images[labels == c][:8], purity=1.0)
            for c in range(6)]
    png = cluster_montage_png(rows, per_row=8)
    with Image.open(BytesIO(png)) as im:
        assert im.format == "PNG" and im.size == montage_size(6, 8, (28, 28))
        pixels = np.asarray(im.convert("L"))
    # Biggest first: cluster 5 (size 10) is the top row; its first thumbnail, inverted to dark ink
    # on white, sits right of the caption column.
    top = 28 + 4  # HEADER_HEIGHT + GAP
    tile = pixels[top:top + 28 * THUMB_SCALE, CAPTION_WIDTH:CAPTION_WIDTH + 28 * THUMB_SCALE]
    expected = 255 - np.kron(images[labels == 5][0, 0], np.ones((THUMB_SCALE, THUMB_SCALE), np.uint8))
    assert np.array_equal(tile, expected)


def test_montage_caps_rows_and_members(characters):
    images, labels = characters
    rows = [MontageRow(c, 20, images[labels == c]) for c in range(50)]
    im = cluster_montage(rows, per_row=5, max_rows=7)
    assert im.size == montage_size(7, 5, (28, 28))


def test_ink_high_detection_and_explicit_invert(characters):
    images, _ = characters
    assert ink_is_high(images[:10])
    assert not ink_is_high(255 - images[:10])
    assert not ink_is_high(np.zeros((2, 3, 28, 28), np.uint8))  # colour images are never inverted
    plain = np.asarray(cluster_montage([MontageRow(0, 1, images[:1])], per_row=1, invert=False).convert("L"))
    assert plain[32:32 + 56, CAPTION_WIDTH:CAPTION_WIDTH + 56].mean() < 128  # ink high: mostly dark


def test_empty_montage_is_still_a_picture():
    png = cluster_montage_png([])
    with Image.open(BytesIO(png)) as im:
        assert im.size == montage_size(0, 12, (28, 28))


def test_bad_thumbnails_are_a_clear_error():
    with pytest.raises(ValueError, match=r"uint8 \[M, 1\|3, H, W\]"):
        cluster_montage([MontageRow(0, 1, np.zeros((2, 28, 28), np.uint8))])


def test_member_samples_are_bounded_and_follow_merges(characters):
    images, labels = characters
    keeper = MemberSamples(per_cluster=3, max_clusters=4)
    keeper.add(images[:40], np.arange(40) // 4)  # ten clusters of four images
    rows = keeper.rows([{"id": i, "count": 4} for i in range(10)])
    assert [r.cluster_id for r in rows] == [0, 1, 2, 3]  # max_clusters
    assert all(len(r.thumbnails) == 3 for r in rows)
    assert np.array_equal(rows[0].thumbnails, images[:3])  # copies of the first members
    keeper.merge(0, [1])
    keeper.forget(2)
    ids = [r.cluster_id for r in keeper.rows([{"id": i} for i in range(4)])]
    assert ids == [0, 3]


def test_montage_needs_neither_matplotlib_nor_torch():
    code = ("import sys, numpy as np\n"
            "from protoedge.runtime.montage import MontageRow, cluster_montage_png\n"
            "png = cluster_montage_png([MontageRow(1, 3, np.zeros((3, 1, 28, 28), np.uint8), 0.5, 'a')])\n"
            "assert png[:4] == b'\\x89PNG'\n"
            "bad = [m for m in ('torch', 'matplotlib') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)
