"""Whitening of the embedding (export/whitening.py): the map, its place in the exported graph, and
the label-free decision to use it, on the committed encoders and the shipped images."""
from pathlib import Path

import numpy as np
import pytest

from protoedge.datasets import load_split
from protoedge.export import pipeline
from protoedge.export.onnx_export import run_onnx, run_torch
from protoedge.export.whitening import RULE_FACTOR, fit_whitening, maybe_whiten
from protoedge.runtime import StreamClusterer
from protoedge.runtime.bundle import load_bundle
from protoedge.runtime.clustering import rule_threshold
from protoedge.trainer.checkpoint import load_encoder

OMNIGLOT = Path("models/omniglot/encoder.safetensors")
MNIST = Path("models/mnist/encoder.safetensors")


def _spectrum(x: np.ndarray) -> np.ndarray:
    return np.linalg.eigvalsh(np.cov(x, rowvar=False))


def test_fit_whitening_equalises_the_covariance_up_to_the_shrinkage():
    rng = np.random.default_rng(0)
    scales = np.geomspace(10.0, 0.1, 16)  # variances over 4 decades
    x = rng.normal(size=(20000, 16)) * scales + 3.0
    mean, w = fit_whitening(x, "sqeuclidean", shrinkage=0.25)
    y = (x - mean) @ w
    assert np.abs(y.mean(0)).max() < 1e-4
    lam = scales ** 2
    want = np.sort(lam / (lam + 0.25 * lam.mean()))  # what the shrunk inverse square root leaves
    assert _spectrum(y) == pytest.approx(want, rel=0.05)
    # the strong directions come out near unit variance; the weakest stay damped, not blown up
    assert 0.9 < _spectrum(y).max() < 1.0 and _spectrum(y).min() < 0.01


def test_fit_whitening_works_in_the_cosine_device_space_and_refuses_bad_input():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 8)) * np.arange(1, 9)
    mean, _ = fit_whitening(x, "cosine")
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    assert mean == pytest.approx(unit.mean(0), abs=1e-6)  # fitted on L2-normalised rows
    with pytest.raises(ValueError, match="more embeddings than dimensions"):
        fit_whitening(x[:8], "cosine")
    with pytest.raises(ValueError, match="shrinkage"):
        fit_whitening(x, "cosine", shrinkage=0.0)
    with pytest.raises(ValueError, match="mode"):
        maybe_whiten(None, x, "cosine", 1.0, mode="sometimes")


def test_auto_whitens_many_fine_classes_but_not_a_few_broad_ones():
    omniglot = load_split("omniglot-a", "train").images[::4]  # 6,000 unlabelled drawings
    enc, meta = load_encoder(OMNIGLOT)
    wrapped, record = maybe_whiten(enc, omniglot, meta["distance"], meta["temperature"])
    assert record["applied"] and wrapped is not enc and record["raw_stream_silhouette"] < 0.25
    mnist = load_split("mnist", "train").images[:6000]
    enc, meta = load_encoder(MNIST)
    kept, record = maybe_whiten(enc, mnist, meta["distance"], meta["temperature"])
    assert not record["applied"] and kept is enc and record["raw_stream_silhouette"] >= 0.25
    assert "broad structure" in record["reason"]
    off, record = maybe_whiten(enc, mnist, meta["distance"], meta["temperature"], mode="off")
    assert off is enc and not record["applied"]


@pytest.fixture(scope="module")
def whitened(tmp_path_factory):
    out = tmp_path_factory.mktemp("whitened") / "bundle"
    opts = pipeline.ExportOptions(precisions=("fp32",), whiten="on", eval_classes=40, episodes=100,
                                  parity_images=256, calib_items=400, speed_repeats=2, progress=False)
    pipeline.export_bundle(OMNIGLOT, out, opts)
    return load_bundle(out)


def test_whitened_export_is_one_graph_with_parity_and_a_record(whitened):
    m = whitened.manifest
    w = m["output"]["whitening"]
    assert w["applied"] and w["mode"] == "on" and w["shrinkage"] == 1.0 and w["images"] == 10000
    assert m["variants"]["fp32"]["max_abs_diff"] < 1e-4  # the export's own parity gate saw the wrapper
    # the same wrapper rebuilt from the same images and seed gives what the graph computes
    enc, meta = load_encoder(OMNIGLOT)
    calib = pipeline.resolve_images("omniglot-a", "train").images
    wrapped, _ = maybe_whiten(enc, calib, meta["distance"], meta["temperature"], mode="on")
    test = load_split("omniglot-a", "test").images[:300]
    assert np.abs(run_onnx(whitened.onnx_path("fp32"), test) - run_torch(wrapped, test)).max() < 1e-4
    # the runtime sees a more isotropic space: no direction holds most of the variance
    raw = run_torch(enc, test)
    raw /= np.linalg.norm(raw, axis=1, keepdims=True)
    white = run_onnx(whitened.onnx_path("fp32"), test)
    white /= np.linalg.norm(white, axis=1, keepdims=True)
    share = lambda s: s.max() / s.sum()
    assert share(_spectrum(white)) < 0.75 * share(_spectrum(raw))  # measured 0.13 vs 0.21


def test_whitened_bundle_threshold_uses_the_whitened_rule(whitened):
    cal = whitened.calibration
    ct = cal["cluster_threshold"]
    assert ct["rule_factor"] == RULE_FACTOR
    assert ct["rule_threshold"] == pytest.approx(rule_threshold(cal, RULE_FACTOR))
    assert StreamClusterer.from_bundle(whitened).threshold == pytest.approx(ct["value"])


def test_info_shows_the_whitening(whitened):
    from click.testing import CliRunner

    from protoedge.cli import main

    res = CliRunner().invoke(main, ["info", str(whitened.root)])
    assert res.exit_code == 0 and "whitening  in the graph, fitted on 10000 calibration images" in res.output
