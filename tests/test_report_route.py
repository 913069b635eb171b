"""`GET /v1/report` of the real daemon (`protoedge serve` in a subprocess): the live cluster montage."""
from io import BytesIO

import numpy as np
import pytest
from PIL import Image

from protoedge import datasets
from protoedge.runtime.montage import CAPTION_WIDTH, GAP, HEADER_HEIGHT, THUMB_SCALE, montage_size

from daemon_support import Server


@pytest.fixture(scope="module")
def characters():
    """Six never-seen Omniglot characters, all 20 drawings each, in a fixed random order."""
    test = datasets.load_split("omniglot-a", "test")
    keep = np.flatnonzero(test.labels < 6)
    return test.images[np.random.default_rng(0).permutation(keep)]


def _tile(pixels: np.ndarray, row: int, col: int) -> np.ndarray:
    size = 28 * THUMB_SCALE
    top = HEADER_HEIGHT + row * (size + GAP) + GAP
    left = CAPTION_WIDTH + col * (size + GAP)
    return pixels[top:top + size, left:left + size]


@pytest.mark.slow
def test_live_report_is_a_montage_of_what_the_daemon_found(tmp_path, characters):
    with Server(tmp_path, unix=False, state=False) as server, server.client() as c:
        empty = c.report_png()
        with Image.open(BytesIO(empty)) as im:
            assert im.format == "PNG" and im.size == montage_size(0, 12, (28, 28))

        assigned = []
        for i in range(0, len(characters), 10):  # a camera-like stream of small batches
            assigned += [a["cluster_id"] for a in c.cluster(characters[i:i + 10])]
        clusters = c.clusters()
        live = {x["id"] for x in clusters}

        png = c.report_png()
        with Image.open(BytesIO(png)) as im:
            assert im.format == "PNG"
            # one row per live cluster (up to 40), 12 thumbnail slots wide
            assert im.size == montage_size(min(len(live), 40), 12, (28, 28))
            pixels = np.asarray(im.convert("L"))

        # Biggest first: the top row is the cluster that absorbed the most images, and its first
        # thumbnail is the first drawing the daemon put there, shown as dark ink on white.
        top = min(clusters, key=lambda x: (-x["seen"], x["id"]))
        first = characters[assigned.index(top["id"])][0]
        expected = 255 - np.kron(first, np.ones((THUMB_SCALE, THUMB_SCALE), np.uint8))
        assert np.array_equal(_tile(pixels, 0, 0), expected)

        # the montage follows the state: a removed cluster loses its row
        assert len(live) > 1
        c.remove(top["id"])
        with Image.open(BytesIO(c.report_png())) as im:
            assert im.size == montage_size(min(len(live) - 1, 40), 12, (28, 28))
