"""`protoedge report`: the page, its PNG figures, and that every number on it is the run.json's."""
import base64
import json
import re
from html.parser import HTMLParser
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from protoedge import datasets, rundir
from protoedge.cli import main
from protoedge.figures import FIGURE_PX
from protoedge.report import MONTAGE_PER_ROW, MONTAGE_ROWS, format_value, write_report
from protoedge.runtime.clustering import StreamClusterer
from protoedge.runtime.montage import montage_size
from protoedge.streamstats import stream_sections

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?%?(?![\w])")


def _pooled(images: np.ndarray) -> np.ndarray:
    """A cheap real embedding for report tests: 4x4 average-pooled pixels (49 dims)."""
    x = images[:, 0].astype(np.float32).reshape(len(images), 7, 4, 7, 4).mean((2, 4))
    return x.reshape(len(images), -1)


def make_run(run_dir: Path, n_classes: int = 40, metrics: bool = True) -> dict:
    """A real clustered stream: Omniglot test characters through the runtime's StreamClusterer."""
    test = datasets.load_split("omniglot-a", "test")
    keep = np.flatnonzero(test.labels < n_classes)
    rng = np.random.default_rng(0)
    stream = test.subset(rng.permutation(keep))
    emb = _pooled(stream.images)
    clusterer = StreamClusterer(dim=emb.shape[1], threshold=0.12, distance="cosine")
    assigned = np.array([a.cluster_id for a in clusterer.partial_fit(emb)], np.int64)
    latency = rng.gamma(4.0, 0.25, len(stream)).astype(np.float32)  # shape only; stands in for timings
    names = test.class_names[:n_classes]
    run = rundir.new_run("test", "report-test", settings={"distance": "cosine", "seed": 0, "threshold": 0.12},
                         timings_s={"stream": 1.25, "total": 3.5}, class_names=names,
                         **stream_sections(assigned, stream.labels, names, latency))
    rundir.write_run_json(run_dir, run)
    rundir.write_stream(run_dir, stream.images, assigned, labels=stream.labels, embedding=emb, latency_ms=latency)
    if metrics:
        for step in range(0, 300, 25):
            rec = {"stage": "meta", "step": step, "elapsed": step * 0.4, "loss": 2.0 / (1 + step / 50)}
            if step % 100 == 0:
                rec.update(event="validation", val_5w1s=60.0 + step / 10)
            rundir.append_metrics(run_dir, rec)
    return run


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    make_run(run_dir)
    page = write_report(run_dir, progress=False)
    return run_dir, page


class _Page(HTMLParser):
    """Collects tagged values, key names, free text and embedded images of the report."""

    def __init__(self):
        super().__init__()
        self.values, self.names, self.free_text, self.images = [], [], [], []
        self._stack = []  # per open element: ("key", path) | ("name", None) | (None, None)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a)
            return
        if "data-key" in a:
            self._stack.append(("key", json.loads(a["data-key"]), []))
        elif "data-name" in a:
            self._stack.append(("name", a["data-name"], []))
        else:
            self._stack.append((None, tag, []))

    def handle_endtag(self, tag):
        if tag == "img" or not self._stack:
            return
        kind, info, text = self._stack.pop()
        if kind == "key":
            self.values.append((info, "".join(text)))
        elif kind == "name":
            self.names.append((info, "".join(text)))

    def handle_data(self, data):
        owner = next((s for s in reversed(self._stack) if s[0] in ("key", "name")), None)
        if owner is not None:
            owner[2].append(data)
        elif not any(s[1] in ("style", "title") for s in self._stack if s[0] is None):
            self.free_text.append(data)


def _lookup(obj, path):
    for p in path:
        obj = obj[p]
    return obj


def test_report_page_and_every_figure_are_written(report):
    run_dir, page = report
    assert page == run_dir / "report.html" and page.stat().st_size > 10_000
    names = {p.stem for p in (run_dir / "figures").glob("*.png")}
    assert names == {"montage", "curves", "projection", "contingency", "latency"}


def test_figures_are_valid_pngs_of_the_expected_sizes(report):
    run_dir, _ = report
    run = json.loads((run_dir / "run.json").read_text())
    for name, size in FIGURE_PX.items():
        data = (run_dir / "figures" / f"{name}.png").read_bytes()
        assert data.startswith(PNG_SIGNATURE)
        with Image.open(BytesIO(data)) as im:
            im.verify()
        with Image.open(BytesIO(data)) as im:
            assert im.format == "PNG" and im.size == size, name
            # a blank canvas would also be a valid PNG of the right size
            assert np.asarray(im.convert("L")).std() > 5, name
    rows = min(len(run["clusters"]), MONTAGE_ROWS)
    with Image.open(run_dir / "figures" / "montage.png") as im:
        assert im.size == montage_size(rows, MONTAGE_PER_ROW, (28, 28))


def test_page_is_self_contained_with_the_same_pngs(report):
    run_dir, page = report
    parser = _Page()
    parser.feed(page.read_text())
    assert len(parser.images) == 5
    for img in parser.images:
        prefix = "data:image/png;base64,"
        assert img["src"].startswith(prefix)
        assert base64.b64decode(img["src"][len(prefix):]) == (run_dir / img["data-file"]).read_bytes()


def test_every_number_on_the_page_equals_the_run_json(report):
    run_dir, page = report
    run = json.loads((run_dir / "run.json").read_text())
    parser = _Page()
    parser.feed(page.read_text())
    numeric = 0
    for path, text in parser.values:
        value = _lookup(run, path)
        assert text == format_value(value), path
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            numeric += 1
            assert float(text) == pytest.approx(value, rel=1e-3, abs=1e-9), path
    shown = {tuple(p) for p, _ in parser.values}
    for key in ("acc", "ari", "nmi", "clusters_found", "clusters_true", "images"):
        assert ("summary", key) in shown
    assert ("latency_ms", "p50") in shown and ("clusters", 0, "purity") in shown
    assert numeric >= 30
    # Numbers anywhere else on the page would be typed twice: there must be none.
    stray = [m for t in parser.free_text for m in NUMBER.findall(t)]
    assert stray == []
    # Row names are run.json's keys.
    keys = set()
    def collect(o):
        if isinstance(o, dict):
            keys.update(o)
            [collect(v) for v in o.values()]
        elif isinstance(o, list):
            [collect(v) for v in o]
    collect(run)
    for name, _ in parser.names:
        assert name.split(".")[-1] in keys


def test_format_value_is_one_readable_rendering():
    assert format_value(0.123456) == "0.1235"
    assert format_value(12345.6) == "12346"
    assert format_value(3) == "3" and format_value(2.0) == "2"
    assert format_value(True) == "yes" and format_value(None) == "n/a"
    assert format_value(["a", 1, 0.5]) == "a, 1, 0.5"


def test_cli_report_without_curves_and_clusters_added_to_json(tmp_path):
    make_run(tmp_path, n_classes=10, metrics=False)
    run = json.loads((tmp_path / "run.json").read_text())
    for key in ("clusters", "summary", "latency_ms"):
        del run[key]
    rundir.write_run_json(tmp_path, run)
    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "report.html" in result.output
    completed = json.loads((tmp_path / "run.json").read_text())
    # the page's numbers were computed into run.json first, from the stream
    assert completed["summary"]["images"] == 200 and completed["summary"]["clusters_true"] == 10
    assert completed["clusters"][0]["size"] == max(c["size"] for c in completed["clusters"])
    assert not (tmp_path / "figures" / "curves.png").exists()
    assert (tmp_path / "figures" / "montage.png").exists()


def test_report_of_a_run_without_a_stream_has_tables_only(tmp_path):
    rundir.write_run_json(tmp_path, rundir.new_run("bench", "b", results={"acc_5w1s": 97.25, "episodes": 1000}))
    page = write_report(tmp_path, progress=False)
    text = page.read_text()
    assert "97.25" in text and "<img" not in text


@pytest.mark.parametrize("setup, message", [
    (lambda d: None, "run.json: missing"),
    (lambda d: (d / "run.json").write_text("{not json"), "not valid JSON"),
    (lambda d: (d / "run.json").write_text("[1, 2]"), "must hold a JSON object"),
    (lambda d: (rundir.write_run_json(d, {"kind": "x"}), (d / "metrics.jsonl").write_text('{"a": 1}\nnope\n')),
     "metrics.jsonl:2"),
    (lambda d: (rundir.write_run_json(d, {"kind": "x"}),
                np.savez(d / "stream.npz", images=np.zeros((3, 1, 28, 28), np.uint8), cluster=np.zeros(2))),
     "'cluster' has 2 rows for 3 images"),
])
def test_bad_run_directories_are_clear_errors(tmp_path, setup, message):
    setup(tmp_path)
    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code != 0
    assert message in result.output


def test_missing_run_directory_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(main, ["report", str(tmp_path / "nope")])
    assert result.exit_code != 0 and "no such run directory" in result.output
