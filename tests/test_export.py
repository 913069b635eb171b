"""Export end to end on real data: one small export (seeded encoder, shipped Omniglot images) shared
by the module, then parity, variants, calibration statistics and the gates are checked on it."""
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from protoedge.cli import main
from protoedge.datasets import load_split
from protoedge.export import pipeline
from protoedge.export.onnx_export import ExportError, check_fp32_parity, run_onnx, run_torch
from protoedge.runtime.bundle import load_bundle
from protoedge.trainer.checkpoint import load_encoder, save_checkpoint
from protoedge.trainer.model import Encoder

# whiten="off": these tests check the encoder's own graph; tests/test_whitening.py the whitened one
QUICK = dict(eval_classes=40, episodes=100, parity_images=256, int8_calib_images=128, calib_items=400,
             speed_repeats=2, progress=False, whiten="off")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "encoder.safetensors"
    save_checkpoint(path, Encoder(), {"distance": "cosine", "temperature": 7.5,
                                      "config": {"protocol": "omniglot-a"}, "code_version": "test"})
    return path


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "bundle"
    opts = pipeline.ExportOptions(archive=out.parent / "bundle.tar.gz", tensorrt=True, **QUICK)
    return pipeline.export_bundle(checkpoint, out, opts)


@pytest.fixture(scope="module")
def test_images() -> np.ndarray:
    # Images the export never saw (it samples from the first 40 classes for parity).
    return load_split("omniglot-a", "test").images[-300:]


def test_fp32_parity_on_real_images(exported, checkpoint, test_images):
    encoder, _ = load_encoder(checkpoint)
    ref = run_torch(encoder, test_images)
    got = run_onnx(exported.bundle.onnx_path("fp32"), test_images)
    assert np.abs(ref - got).max() < 1e-4
    cos = (ref * got).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    assert cos.min() > 0.9999
    fp32 = exported.bundle.manifest["variants"]["fp32"]
    assert 0 <= fp32["max_abs_diff"] < 1e-4 and fp32["min_cosine"] > 0.9999


def test_onnx_graph_follows_the_contract(exported, test_images):
    model = onnx.load(str(exported.bundle.onnx_path("fp32")))
    assert {o.domain: o.version for o in model.opset_import}[""] == 18
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "images" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert out.name == "embedding" and out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert inp.type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    for n in (1, 7, 130):  # dynamic batch, including one larger than any export-time batch
        assert run_onnx(exported.bundle.onnx_path("fp32"), test_images[:n], batch_size=n).shape == (n, 64)


def test_reduced_precision_variants(exported, test_images):
    b = exported.bundle
    assert b.precisions == ["fp32", "fp16", "int8", "int8-cpu"]
    ref = run_onnx(b.onnx_path("fp32"), test_images)
    fp16 = onnx.load(str(b.onnx_path("fp16")))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in fp16.graph.initializer)
    # activations: symmetric int8 for TensorRT, asymmetric uint8 (ONNX Runtime's fast CPU form) for int8-cpu
    for p, act in (("int8", onnx.TensorProto.INT8), ("int8-cpu", onnx.TensorProto.UINT8)):
        g = onnx.load(str(b.onnx_path(p))).graph
        assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in g.node}
        zero_points = {t.name: t for t in g.initializer}
        q_types = {zero_points[n.input[2]].data_type for n in g.node if n.op_type == "QuantizeLinear"}
        assert q_types == {act}, p
    # weights: full int8 range for TensorRT; 7 bits for int8-cpu, whose u8 x s8 products x86 without
    # VNNI sums into a saturating int16 (export/precision.py)
    from onnx import numpy_helper

    for p, lo, hi in (("int8", 100, 127), ("int8-cpu", 32, 64)):
        g = onnx.load(str(b.onnx_path(p))).graph
        weights = [numpy_helper.to_array(t) for t in g.initializer
                   if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]  # conv kernels
        assert weights and lo <= max(int(np.abs(w.astype(int)).max()) for w in weights) <= hi, p
    sizes = {p: b.manifest["files"][b.manifest["variants"][p]["file"]]["bytes"] for p in b.precisions}
    assert sizes["int8"] < sizes["fp16"] < sizes["fp32"] and sizes["int8-cpu"] < sizes["fp16"]
    for p, min_cos in (("fp16", 0.999), ("int8", 0.99), ("int8-cpu", 0.99)):
        got = run_onnx(b.onnx_path(p), test_images, unfused=p == "int8")  # same uint8 in, float32 out as FP32
        assert got.dtype == np.float32 and got.shape == ref.shape
        cos = (ref * got).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
        assert cos.min() > min_cos, p
        v = b.manifest["variants"][p]
        assert v["acc_drop_vs_fp32"] <= pipeline.MAX_ACC_DROP[p] and v["speedup_vs_fp32"] > 0


def test_calibration_statistics_are_present_and_sane(exported):
    c = exported.bundle.calibration
    same, diff = c["same_item_quantiles"], c["different_item_quantiles"]
    assert c["distance"] == "cosine" and c["n_items"] == QUICK["calib_items"]
    assert list(same.values()) == sorted(same.values()) and list(diff.values()) == sorted(diff.values())
    assert all(0 <= v <= 4 for v in [*same.values(), *diff.values()])  # 2 - 2cos lies in [0, 4]
    assert same["0.5"] < diff["0.5"], "two views of one item must be closer than different items"
    assert same["0.9"] < diff["0.5"]
    lo, hi = sorted((same["0.95"], diff["0.05"]))
    assert lo <= c["new_cluster_threshold"] <= hi


def test_manifest_carries_specs_and_provenance(exported, checkpoint):
    m = exported.bundle.manifest
    assert m["output"] == {"name": "embedding", "dim": 64, "distance": "cosine", "temperature": 7.5,
                           "whitening": {"applied": False, "reason": "turned off (--whiten off)"}}
    assert (m["input"]["channels"], m["input"]["height"], m["input"]["width"]) == (1, 28, 28)
    prov = m["provenance"]
    from protoedge.runtime.bundle import sha256_file

    assert prov["checkpoint_sha256"] == sha256_file(checkpoint)
    assert prov["code_version"] == "test" and prov["config"] == {"protocol": "omniglot-a"}
    assert prov["export"]["opset"] == 18
    assert m["evaluation"]["classes"] == QUICK["eval_classes"]


def test_archive_is_verifiable(exported):
    assert exported.archive and exported.archive.is_file()
    b = load_bundle(exported.archive)
    assert b.manifest == exported.bundle.manifest


def test_tensorrt_request_without_tensorrt_reports_why(exported):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert "TensorRT is not installed" in exported.tensorrt_error and not exported.engines
    else:
        assert exported.engines or exported.tensorrt_error


def test_parity_gate_refuses_a_graph_that_differs(exported, checkpoint, test_images):
    encoder, _ = load_encoder(checkpoint)
    with torch.no_grad():
        encoder.features[0][0].weight.mul_(1.01)  # a 1% change the ONNX file does not have
    with pytest.raises(ExportError, match="differs from the torch model"):
        check_fp32_parity(encoder, exported.bundle.onnx_path("fp32"), test_images)


@pytest.mark.parametrize("precision, drop, refused", [
    ("fp16", 0.4, False), ("fp16", 0.6, True), ("int8", 0.9, False), ("int8", 1.1, True),
])
def test_accuracy_gate_thresholds(precision, drop, refused):
    reason = pipeline.accuracy_gate(precision, 90.0, 90.0 - drop)
    assert bool(reason) == refused
    if refused:
        assert precision in reason and "not written" in reason


def test_refused_variant_is_not_written_and_tensorrt_fallback_is_reported(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(pipeline.MAX_ACC_DROP, "int8", -100.0)  # any INT8 result now counts as too lossy
    out = tmp_path / "b"
    result = CliRunner().invoke(main, ["export", str(checkpoint), "--out", str(out), "--precision", "int8",
                                       "--episodes", "50", "--eval-classes", "20", "--calib-items", "100",
                                       "--tensorrt"])
    assert "refused int8" in result.output and "not written" in result.output
    assert load_bundle(out).precisions == ["fp32"]
    assert not (out / "encoder.int8.onnx").exists()
    assert "int8" in load_bundle(out).manifest["rejected_variants"]
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert result.exit_code != 0
        assert "bundle written and verified" in result.output and "TensorRT is not installed" in result.output
    else:
        assert result.exit_code == 0, result.output


def test_export_cli_errors_are_clear(tmp_path):
    runner = CliRunner()
    missing = runner.invoke(main, ["export", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "b")])
    assert missing.exit_code != 0 and "no such checkpoint file" in missing.output
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    bad = runner.invoke(main, ["export", str(junk), "--out", str(tmp_path / "b")])
    assert bad.exit_code != 0 and "not a readable safetensors checkpoint" in bad.output
    prec = runner.invoke(main, ["export", str(junk), "--out", str(tmp_path / "b"), "--precision", "fp8"])
    assert prec.exit_code != 0 and "unknown precision fp8" in prec.output
    assert not (tmp_path / "b").exists(), "a failed export must not leave a bundle behind"


def test_failed_export_leaves_the_old_bundle_in_place(checkpoint, tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"old": True}))
    # Fails after the FP32 export has been written to the staging folder: INT8 without calibration data.
    with pytest.raises(ValueError, match="INT8 calibration needs at least one image"):
        pipeline.export_bundle(checkpoint, out, pipeline.ExportOptions(
            precisions=("fp32", "int8"), **{**QUICK, "int8_calib_images": 0}))
    assert json.loads((out / "manifest.json").read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["b"], "no staging folder may be left behind"


def test_calibration_and_eval_data_sources(tmp_path):
    from protoedge.datasets import DataError

    assert pipeline.resolve_images("omniglot-a", "train").source == "omniglot-a:train"
    assert pipeline.resolve_images("mnist:test", "train").source == "mnist:test"
    unlabelled = load_split("omniglot-a", "train").images[:50]
    np.savez(tmp_path / "calib.npz", images=unlabelled)
    got = pipeline.resolve_images(str(tmp_path / "calib.npz"), "train")
    assert got.labels is None and np.array_equal(got.images, unlabelled)
    with pytest.raises(DataError, match="no such file or folder"):
        pipeline.resolve_images(str(tmp_path / "missing"), "train")
    assert pipeline.default_protocol({"config": {"protocol": "mnist"}}) == "mnist"
    assert pipeline.default_protocol({}) == "omniglot-a"


def test_bundle_stores_the_clustering_threshold_and_info_shows_it(exported):
    from protoedge.runtime import StreamClusterer
    from protoedge.runtime.clustering import rule_threshold

    cal = exported.bundle.calibration
    ct = cal["cluster_threshold"]
    assert ct["chosen_by"] in ("calibration rule", "stream silhouette")
    assert ct["rule_threshold"] == pytest.approx(rule_threshold(cal)) and ct["value"] > 0
    assert ct["search"]["images"] == 5000 and set(ct["search"]["silhouette_by_merge_fraction_and_factor"]) == {"0.25", "0.5"}
    c = StreamClusterer.from_bundle(exported.bundle)
    assert c.threshold == pytest.approx(ct["value"])  # the runtime's default is what export stored
    res = CliRunner().invoke(main, ["info", str(exported.bundle.root)])
    assert res.exit_code == 0 and f"clustering threshold={ct['value']:.4g}" in res.output


def _unit_rows(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_cluster_threshold_search_wins_only_when_it_finds_structure():
    from protoedge.export.calibration import cluster_threshold

    rng = np.random.default_rng(0)
    # a few broad classes: 6 directions, wide spread around each; the rule's threshold (1.2 x the
    # midpoint below) cuts every class into many clusters, the search finds the classes
    centres = _unit_rows(rng.normal(size=(6, 16)))
    broad = _unit_rows(centres[rng.integers(0, 6, 3000)] + 0.1 * rng.normal(size=(3000, 16)))
    cal = {"distance": "cosine", "new_cluster_threshold": 0.1}
    got = cluster_threshold(lambda x: x, broad, cal, temperature=10.0, n_images=2000)
    assert got["chosen_by"] == "stream silhouette" and got["value"] > got["rule_threshold"] == pytest.approx(0.12)
    assert got["search"]["best_silhouette"] >= 0.25 and got["merge_threshold"] > 0
    # no structure (directions uniformly at random): the rule stands, no merge setting is stored
    flat = _unit_rows(rng.normal(size=(3000, 16)))
    got = cluster_threshold(lambda x: x, flat, {"distance": "cosine", "new_cluster_threshold": 1.0}, 10.0,
                            n_images=2000)
    assert got["chosen_by"] == "calibration rule" and got["value"] == pytest.approx(1.2)
    assert got["search"]["best_silhouette"] < 0.25 and "merge_threshold" not in got
