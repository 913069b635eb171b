"""The device runtime end to end on a real bundle: ONNX Runtime sessions, files, the CLI, and a
fresh interpreter that must never import torch.

The bundle is exported here from a random trainer Encoder (so the test can compare against the
torch model); without torch the committed default bundle is used instead.
"""
import hashlib
import json
import logging
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from protoedge.cli import main
from protoedge.datasets import load_split
from protoedge.runtime import (BACKENDS, BundleError, InputError, Runtime, StateError, StreamClusterer,
                               load_bundle, open_encoder)
from protoedge.runtime.errors import BackendUnavailable

REPO = Path(__file__).resolve().parent.parent


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_bundle(root: Path, model, images: np.ndarray) -> Path:
    """A bundle as export writes it: ONNX with a dynamic batch, calibration from embeddings."""
    import torch

    root.mkdir(parents=True)
    onnx_path = root / "encoder.fp32.onnx"
    torch.onnx.export(model, (torch.zeros(2, 1, 28, 28, dtype=torch.uint8),), str(onnx_path), dynamo=True,
                      opset_version=18, external_data=False, input_names=["images"], output_names=["embedding"],
                      dynamic_shapes={"pixels": {0: torch.export.Dim("batch", min=1, max=4096)}})
    with torch.no_grad():
        e = model(torch.from_numpy(images)).numpy()
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    d = np.maximum(2 - 2 * e[: len(e) // 2] @ e[len(e) // 2:].T, 0).ravel()
    q = lambda *ps: {str(p): float(np.quantile(d, p)) for p in ps}
    manifest = {
        "schema_version": 1,
        "model": {"name": "test-conv4", "version": "0"},
        "input": {"name": "images", "dtype": "uint8", "layout": "NCHW", "channels": 1, "height": 28,
                  "width": 28, "pixels": "0-255, ink high"},
        "output": {"name": "embedding", "dim": 64, "distance": "cosine", "temperature": 10.0},
        "calibration": {"distance": "cosine", "n_items": len(images), "same_item_quantiles": q(0.01, 0.05, 0.9, 0.95),
                        "different_item_quantiles": q(0.01, 0.05, 0.1, 0.5),
                        "new_cluster_threshold": float(np.quantile(d, 0.02))},
        "variants": {"fp32": {"file": onnx_path.name}},
        "files": {onnx_path.name: {"sha256": _sha(onnx_path), "bytes": onnx_path.stat().st_size}},
        "provenance": {},
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return root


@pytest.fixture(scope="module")
def data():
    test = load_split("omniglot-a", "test")
    pick = np.flatnonzero(test.labels < 10)
    return test.images[pick], test.labels[pick]


@pytest.fixture(scope="module")
def bundle_and_model(tmp_path_factory, data):
    try:
        import torch

        from protoedge.trainer.model import Encoder
    except ImportError:
        return REPO / "models" / "omniglot" / "bundle", None
    torch.manual_seed(0)
    model = Encoder().eval()
    return write_bundle(tmp_path_factory.mktemp("b") / "bundle", model, data[0][:100]), model


@pytest.fixture(scope="module")
def bundle_dir(bundle_and_model):
    return bundle_and_model[0]


@pytest.fixture(scope="module")
def bundle(bundle_dir):
    return load_bundle(bundle_dir)


def state_of(rt):
    ids, protos = rt.clusterer.prototypes()
    return ids.tolist(), protos.tobytes(), rt.clusterer.n_seen


# ----------------------------------------------------------------------------- torch-free

def test_whole_clustering_pass_never_imports_torch(bundle_dir, tmp_path):
    code = textwrap.dedent(f"""
        import sys
        import protoedge.runtime as r
        assert "onnxruntime" not in sys.modules, "importing the package must stay light"
        from protoedge.datasets import load_split
        rt = r.Runtime({str(bundle_dir)!r}, backend="auto", state_dir={str(tmp_path)!r})
        images = load_split("omniglot-a", "test").images[:200]
        out = rt.cluster(images) + rt.assign(images[:10])
        rt.add_examples(images[:2], ["a", "b"])
        rt.save()
        assert len(out) == 210 and r.StreamClusterer.load({str(tmp_path)!r}).n_seen == 200
        bad = [m for m in sys.modules if m == "torch" or m.startswith("torch.")]
        assert not bad, bad
        print("ok", rt.backend)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("ok")


# ----------------------------------------------------------------------------- backends

def test_cpu_backend_matches_torch_and_is_tuned_for_latency(bundle, bundle_and_model, data):
    enc = open_encoder(bundle, backend="cpu", threads=2)
    assert enc.backend == "cpu" and enc.providers == ["CPUExecutionProvider"]
    opts = enc.session.get_session_options()
    import onnxruntime as ort

    # two threads = two single-threaded sessions, a split batch runs on both (no intra-op pool)
    assert len(enc.sessions) == 2 and enc.sessions[0] is enc.session
    assert all(s.get_session_options().intra_op_num_threads == 1 for s in enc.sessions)
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    images = data[0][:37]
    e = enc.embed(images)
    assert e.shape == (37, 64) and e.dtype == np.float32
    # batch composition does not change results
    np.testing.assert_allclose(enc.embed(images[:1])[0], e[0], atol=1e-5)
    model = bundle_and_model[1]
    if model is not None:
        import torch

        with torch.no_grad():
            ref = model(torch.from_numpy(images)).numpy()
        np.testing.assert_allclose(e, ref, atol=1e-4)


def test_no_idle_spinning_after_a_run(bundle, data):
    """The pool threads must not keep a core busy between frames (ONNX Runtime's default does)."""
    import time

    enc = open_encoder(bundle, backend="cpu", threads=2)
    batch = np.repeat(data[0][:8], 8, axis=0)  # 64 images: split over both threads
    for _ in range(3):
        enc.embed(batch)
    cpu = time.process_time()
    time.sleep(0.5)
    assert time.process_time() - cpu < 0.02


def test_auto_picks_an_available_backend_and_reports_it(bundle, caplog):
    import onnxruntime as ort

    with caplog.at_level(logging.INFO, logger="protoedge.runtime.backends"):
        enc = open_encoder(bundle, backend="auto")
    assert enc.backend in BACKENDS and enc.backend != "auto"
    assert any(enc.backend in m for m in caplog.messages)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert enc.backend == "cpu" and enc.providers == ["CPUExecutionProvider"]


def test_unavailable_backend_is_a_clear_error_not_a_silent_cpu_fallback(bundle):
    import onnxruntime as ort

    available = ort.get_available_providers()
    for backend, provider in (("cuda", "CUDAExecutionProvider"), ("ort-tensorrt", "TensorrtExecutionProvider")):
        if provider not in available:
            with pytest.raises(BackendUnavailable, match=provider):
                open_encoder(bundle, backend=backend)
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(BackendUnavailable, match="TensorRT"):
            open_encoder(bundle, backend="tensorrt")
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        open_encoder(bundle, backend="gpu")


def test_cpu_int8_variant_embeds_like_fp32_and_tensorrt_refuses_it():
    """The committed bundle's int8-cpu file (uint8 activations) runs on the CPU provider close to
    FP32; the TensorRT paths refuse it by name instead of failing inside an engine build."""
    b = load_bundle(REPO / "models" / "omniglot" / "bundle")
    images = load_split("omniglot-a", "test").images[:64]
    ref = open_encoder(b, backend="cpu").embed(images)
    got = open_encoder(b, backend="cpu", precision="int8-cpu").embed(images)
    cos = (ref * got).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    assert got.shape == ref.shape and cos.min() > 0.99
    assert b.manifest["variants"]["int8-cpu"]["acc_drop_vs_fp32"] <= 1.0
    for backend in ("ort-tensorrt", "tensorrt"):
        with pytest.raises(BackendUnavailable, match="int8"):
            open_encoder(b, backend=backend, precision="int8-cpu")


def test_gpu_providers_keep_engine_and_timing_caches_on_a_persistent_path(tmp_path):
    from protoedge.runtime.backends import OrtEncoder

    providers = OrtEncoder._providers("ort-tensorrt", tmp_path, "fp16")
    name, opts = providers[0]
    assert name == "TensorrtExecutionProvider" and providers[-1] == "CPUExecutionProvider"
    assert opts["trt_engine_cache_enable"] and opts["trt_timing_cache_enable"]
    assert Path(opts["trt_engine_cache_path"]).is_dir()
    assert Path(opts["trt_engine_cache_path"]).is_relative_to(tmp_path)
    assert OrtEncoder._providers("cuda", tmp_path, "fp32")[0][0] == "CUDAExecutionProvider"


def test_native_tensorrt_backend_on_a_gpu(bundle, data, tmp_path):
    pytest.importorskip("tensorrt")
    try:
        enc = open_encoder(bundle, backend="tensorrt", cache_dir=tmp_path)
    except BackendUnavailable as e:
        pytest.skip(f"no usable GPU: {e}")
    ref = open_encoder(bundle, backend="cpu").embed(data[0][:16])
    np.testing.assert_allclose(enc.embed(data[0][:16]), ref, atol=1e-2)
    assert any(p.suffix == ".plan" for p in tmp_path.rglob("*"))  # cached for the next start


# ----------------------------------------------------------------------------- Runtime

def test_runtime_clusters_pixels_and_few_shot_examples(bundle, data):
    images, labels = data
    rt = Runtime(bundle, backend="cpu")
    assert rt.clusterer.threshold == pytest.approx(1.2 * bundle.calibration["new_cluster_threshold"])  # the rule
    out = rt.cluster(images)
    assert len(out) == len(images) and out[0].new_cluster
    st = rt.clusterer.stats
    assert st["created"] - st["split"] == len({a.cluster_id for a in out if a.new_cluster})
    assert rt.clusterer.n_clusters == st["created"] - st["merged"] - st["dissolved"] - st["evicted"]
    before = state_of(rt)
    rt.assign(images[:20])
    assert state_of(rt) == before
    first = [int(np.flatnonzero(labels == k)[0]) for k in range(3)]
    ids = rt.add_examples(images[first], ["a", "b", "c"])
    got = rt.assign(images[first])
    assert [g.label for g in got] == ["a", "b", "c"] and [g.cluster_id for g in got] == list(ids.values())



def test_cluster_equals_embed_then_partial_fit(bundle, data):
    images = data[0]
    rt = Runtime(bundle, backend="cpu", threads=2)
    twin = StreamClusterer.from_bundle(bundle)
    for lo, n in ((0, 1), (1, 8), (9, 64), (73, 65), (138, 62)):
        got, want = rt.cluster(images[lo:lo + n]), twin.partial_fit(rt.embed(images[lo:lo + n]))
        assert [(a.cluster_id, a.new_cluster, a.label) for a in got] == [
            (a.cluster_id, a.new_cluster, a.label) for a in want]
        np.testing.assert_allclose([a.distance for a in got[1:]], [a.distance for a in want[1:]], atol=1e-5)
    assert rt.clusterer.stats == twin.stats and twin.stats["refinements"] > 0
    np.testing.assert_allclose(rt.clusterer.prototypes()[1], twin.prototypes()[1], atol=1e-5)


@pytest.mark.parametrize("fault", ["nan", "error"])
def test_a_batch_whose_embedding_fails_leaves_the_state_untouched(bundle, data, monkeypatch, fault):
    """A later piece of a split batch fails (an encoder error, or NaN out of the encoder): nothing
    of the batch is learned, though the pieces before it were embedded."""
    images = data[0]
    rt = Runtime(bundle, backend="cpu", threads=2)
    rt.cluster(images[:30])
    before, stats = state_of(rt), rt.clusterer.stats
    run, runs, learned = rt.encoder._run, [], []

    def sixth_run_fails(session, x):
        runs.append(len(x))
        if len(runs) == 6:  # a later piece
            if fault == "error":
                raise RuntimeError("piece failed")
            return np.full((len(x), 64), np.nan, np.float32)
        return run(session, x)

    fit = rt.clusterer.partial_fit

    def fit_and_count(e):
        out = fit(e)
        learned.append(len(out))
        return out

    monkeypatch.setattr(rt.encoder, "_run", sixth_run_fails)
    monkeypatch.setattr(rt.clusterer, "partial_fit", fit_and_count)
    with pytest.raises(InputError if fault == "nan" else RuntimeError, match="NaN" if fault == "nan" else "failed"):
        rt.cluster(images[30:94])
    assert len(runs) >= 6 and not learned
    assert state_of(rt) == before and rt.clusterer.stats == stats
    monkeypatch.undo()
    assert len(rt.cluster(images[30:94])) == 64  # and the runtime works on


def test_threshold_override_and_explicit_params(bundle, data):
    rt = Runtime(bundle, backend="cpu", threshold=1e-9, max_clusters=50)
    rt.cluster(data[0][:60])
    assert rt.clusterer.threshold == 1e-9 and rt.clusterer.n_clusters == 50
    assert rt.clusterer.stats["evicted"] == 10


@pytest.mark.parametrize("bad, message", [
    (np.zeros((2, 1, 32, 32), np.uint8), "28x28"),
    (np.zeros((2, 3, 28, 28), np.uint8), "1x28x28"),
    (np.zeros((2, 28 * 28), np.uint8), "shaped"),
    (np.zeros((0, 1, 28, 28), np.uint8), "empty"),
    (np.full((2, 1, 28, 28), np.nan, np.float32), "NaN"),
    (np.zeros((2, 1, 28, 28), np.float32), "uint8"),
    (np.zeros((2, 1, 28, 28), np.int64), "uint8"),
])
def test_bad_pixels_are_refused_and_state_untouched(bundle, data, bad, message):
    rt = Runtime(bundle, backend="cpu")
    rt.cluster(data[0][:30])
    before = state_of(rt)
    for call in (rt.validate, rt.cluster, rt.assign, lambda b: rt.add_examples(b, ["x"] * len(b))):
        with pytest.raises(InputError, match=message):
            call(bad)
    assert state_of(rt) == before


def test_a_bundle_that_fails_verification_is_refused(bundle_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(bundle_dir, broken)
    onnx = broken / "encoder.fp32.onnx"
    blob = bytearray(onnx.read_bytes())
    blob[-10] ^= 0xFF
    onnx.write_bytes(bytes(blob))
    with pytest.raises(BundleError, match="sha256"):
        Runtime(broken, backend="cpu")


def test_state_resumes_and_must_come_from_the_same_model(bundle_dir, data, tmp_path):
    images = data[0]
    rt = Runtime(bundle_dir, backend="cpu", state_dir=tmp_path / "s")
    rt.cluster(images[:100])
    rt.save()
    again = Runtime(bundle_dir, backend="cpu", state_dir=tmp_path / "s")
    assert again.assign(images[100:]) == rt.assign(images[100:])
    other = tmp_path / "other"
    shutil.copytree(bundle_dir, other)
    m = json.loads((other / "manifest.json").read_text())
    m["model"]["version"] = "another"
    (other / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StateError, match="fresh state folder"):
        Runtime(other, backend="cpu", state_dir=tmp_path / "s")


# ----------------------------------------------------------------------------- CLI

def _records(text):
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_cli_clusters_files_prints_scores_and_saves_state(bundle_dir, data, tmp_path):
    images, labels = data
    npz = tmp_path / "stream.npz"
    np.savez(npz, images=images, labels=labels)
    out = tmp_path / "out.jsonl"
    state = tmp_path / "state"
    r = CliRunner().invoke(main, ["cluster", str(bundle_dir), str(npz), "--labels", "--backend", "cpu",
                                  "-o", str(out), "--state", str(state)])
    assert r.exit_code == 0, r.output
    recs = _records(out.read_text())
    assert len(recs) == len(images) and recs[0]["new_cluster"] is True
    assert {"cluster_id", "distance", "confidence", "new_cluster", "label"} <= set(recs[5])
    assert "ACC" in r.output and "ARI" in r.output and "NMI" in r.output and "(true 10)" in r.output
    assert StreamClusterer.load(state).n_seen == len(images)
    # resuming: the second run continues from the saved clusters
    r2 = CliRunner().invoke(main, ["cluster", str(bundle_dir), str(npz), "--backend", "cpu", "-o", str(out),
                                   "--state", str(state)])
    assert r2.exit_code == 0, r2.output
    assert StreamClusterer.load(state).n_seen == 2 * len(images)


def test_cli_precision_auto_runs_int8_cpu_and_shares_its_state_with_fp32(data, tmp_path):
    """`cluster --precision auto` picks the daemon's CPU encoder; a state learned with FP32 goes on
    with it (a state records the model, not the variant)."""
    committed = REPO / "models" / "omniglot" / "bundle"
    npz, state = tmp_path / "stream.npz", tmp_path / "state"
    np.savez(npz, images=data[0][:40])
    for precision in ("fp32", "auto"):
        r = CliRunner().invoke(main, ["cluster", str(committed), str(npz), "--backend", "cpu", "--precision",
                                      precision, "-o", str(tmp_path / f"{precision}.jsonl"), "--state", str(state)])
        assert r.exit_code == 0, r.output
    assert StreamClusterer.load(state).n_seen == 80
    rt = Runtime(committed, backend="cpu", precision="auto", threads=1)
    assert rt.encoder.precision == "int8-cpu" and rt.describe()["encoder"]["precision"] == "int8-cpu"


def test_cli_reads_npy_arrays_from_stdin(bundle_dir, data, tmp_path):
    import io

    buf = io.BytesIO()
    np.save(buf, data[0][:7, 0])            # [N, H, W]
    np.save(buf, data[0][7:12])             # [N, C, H, W]
    np.savetxt(tmp_path / "y.txt", data[1][:12], fmt="%d")
    r = CliRunner().invoke(main, ["cluster", str(bundle_dir), "-", "--backend", "cpu",
                                  "--labels-file", str(tmp_path / "y.txt")], input=buf.getvalue())
    assert r.exit_code == 0, r.output
    recs = _records(r.stdout)
    assert [x["source"] for x in recs] == ["stdin[0]"] * 7 + ["stdin[1]"] * 5
    assert "ACC" in r.output


def test_cli_reads_an_image_folder(bundle_dir, data, tmp_path):
    from PIL import Image

    for k in range(2):
        (tmp_path / "imgs" / f"class{k}").mkdir(parents=True)
    for i, (img, y) in enumerate(zip(data[0][:40], data[1][:40])):
        Image.fromarray(img[0]).save(tmp_path / "imgs" / f"class{y % 2}" / f"{i}.png")
    r = CliRunner().invoke(main, ["cluster", str(bundle_dir), str(tmp_path / "imgs"), "--backend", "cpu",
                                  "--labels"])
    assert r.exit_code == 0, r.output
    assert len(_records(r.stdout)) == 40 and "(true 2)" in r.output


@pytest.mark.parametrize("case", ["unreadable_image", "wrong_size_npy", "float_npy", "empty_npy", "bad_bundle",
                                  "garbage_stdin", "nan_stdin"])
def test_cli_bad_input_is_a_clear_error_and_state_stays(bundle_dir, data, tmp_path, case):
    state = tmp_path / "state"
    ok = tmp_path / "ok.npy"
    np.save(ok, data[0][:20])
    assert CliRunner().invoke(main, ["cluster", str(bundle_dir), str(ok), "--backend", "cpu", "--state",
                                     str(state), "-o", str(tmp_path / "o.jsonl")]).exit_code == 0
    snapshot = {p.name: p.read_bytes() for p in state.iterdir()}
    args, stdin = [str(bundle_dir)], None
    if case == "unreadable_image":
        folder = tmp_path / "imgs"
        folder.mkdir()
        from PIL import Image

        Image.fromarray(data[0][0, 0]).save(folder / "a.png")
        (folder / "b.png").write_bytes(b"not an image")
        args += [str(ok), str(folder)]
        expect = "cannot read image"
    elif case == "wrong_size_npy":
        np.save(tmp_path / "x.npy", np.zeros((3, 2, 28, 28), np.uint8))
        args += [str(tmp_path / "x.npy")]
        expect = "channels"
    elif case == "float_npy":
        np.save(tmp_path / "x.npy", np.zeros((3, 28, 28), np.float32))
        args += [str(tmp_path / "x.npy")]
        expect = "uint8"
    elif case == "empty_npy":
        np.save(tmp_path / "x.npy", np.zeros((0, 1, 28, 28), np.uint8))
        args += [str(tmp_path / "x.npy")]
        expect = "empty"
    elif case == "bad_bundle":
        broken = tmp_path / "broken"
        shutil.copytree(bundle_dir, broken)
        (broken / "encoder.fp32.onnx").write_bytes(b"tampered")
        args = [str(broken), str(ok)]
        expect = "bytes"
    elif case == "garbage_stdin":
        args += ["-"]
        stdin = b"this is not npy"
        expect = "npy"
    else:
        import io

        buf = io.BytesIO()
        np.save(buf, data[0][:5])
        np.save(buf, np.full((2, 28, 28), np.nan, np.float32))
        args += ["-"]
        stdin = buf.getvalue()
        expect = "uint8"
    r = CliRunner().invoke(main, ["cluster", *args, "--backend", "cpu", "--state", str(state)], input=stdin)
    assert r.exit_code == 1, r.output
    assert "Error:" in r.output and expect in r.output and "Traceback" not in r.output
    assert {p.name: p.read_bytes() for p in state.iterdir()} == snapshot


def test_cli_tunes_the_threshold_on_unlabelled_images(bundle_dir, data, tmp_path):
    np.save(tmp_path / "unlabelled.npy", data[0][:120])
    np.save(tmp_path / "stream.npy", data[0][120:])
    r = CliRunner().invoke(main, ["cluster", str(bundle_dir), str(tmp_path / "stream.npy"), "--backend", "cpu",
                                  "--tune-threshold", str(tmp_path / "unlabelled.npy"), "--state", str(tmp_path / "s")])
    assert r.exit_code == 0, r.output
    assert "picked without labels" in r.output
    tuned = StreamClusterer.load(tmp_path / "s")
    default = Runtime(bundle_dir, backend="cpu").clusterer
    factor = tuned.threshold / default.threshold
    assert any(abs(factor - f) < 1e-6 for f in (0.7, 1.0, 1.3, 1.6, 2.0, 2.5, 3.0))
    # a resumed state keeps its threshold: tuning again is refused
    r2 = CliRunner().invoke(main, ["cluster", str(bundle_dir), str(tmp_path / "stream.npy"), "--backend", "cpu",
                                   "--tune-threshold", str(tmp_path / "unlabelled.npy"), "--state", str(tmp_path / "s")])
    assert r2.exit_code == 1 and "fresh --state" in r2.output
