"""The CPU encoder's data parallelism (runtime/backends.py): a batch split over single-threaded
sessions gives the same embeddings as one session, fixed-batch exports still get exact chunks, and
the thread pool neither spins nor outlives its encoder. Uses the committed bundle (no torch)."""
import gc
import hashlib
import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from protoedge.datasets import load_split
from protoedge.runtime import load_bundle
from protoedge.runtime.backends import SPLIT_MIN, OrtEncoder, auto_precision, open_encoder

REPO = Path(__file__).resolve().parent.parent
BUNDLE = REPO / "models" / "omniglot" / "bundle"
SIZES = (1, SPLIT_MIN - 1, SPLIT_MIN, 9, 63, 64, 65, 257)


def pool_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("protoedge-ort")]


@pytest.fixture(scope="module")
def bundle():
    return load_bundle(BUNDLE)


@pytest.fixture(scope="module")
def images():
    return load_split("omniglot-a", "test").images[:300]


def one_session(enc: OrtEncoder, x: np.ndarray) -> np.ndarray:
    """Reference: every image through the encoder's first session, one call of the whole batch."""
    return enc._run(enc.session, x)


@pytest.mark.parametrize("max_batch", [256, 40])
def test_split_batches_match_one_session(bundle, images, max_batch):
    with OrtEncoder(bundle, "cpu", threads=3, max_batch=max_batch) as enc:
        assert len(enc.sessions) == 3
        assert all(s.get_session_options().intra_op_num_threads == 1 for s in enc.sessions)
        ref = one_session(enc, images[:257])
        for n in SIZES:
            out = enc.embed(images[:n])
            assert out.shape == (n, 64) and out.dtype == np.float32
            np.testing.assert_allclose(out, ref[:n], atol=1e-5, err_msg=f"batch {n}")
        # a non-contiguous view is split like any other batch
        np.testing.assert_allclose(enc.embed(images[:130:2]), one_session(enc, images[:130:2]), atol=1e-5)


def test_one_thread_has_no_pool(bundle, images):
    before = len(pool_threads())
    enc = OrtEncoder(bundle, "cpu", threads=1)
    assert enc._pool is None and len(enc.sessions) == 1
    enc.embed(images[:65])
    assert len(pool_threads()) == before


def fixed_batch_bundle(tmp_path: Path, batch: int) -> Path:
    """The committed bundle with its fp32 graph pinned to one batch size (a TensorRT-style export)."""
    onnx = pytest.importorskip("onnx")
    root = tmp_path / "bundle"
    shutil.copytree(BUNDLE, root)
    path = root / "encoder.fp32.onnx"
    model = onnx.load(str(path))
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_value = batch
    onnx.save(model, str(path))
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["files"][path.name] = {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                                    "bytes": path.stat().st_size}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return root


def test_fixed_batch_export_is_fed_exact_chunks(bundle, images, tmp_path):
    with OrtEncoder(load_bundle(fixed_batch_bundle(tmp_path, 16)), "cpu", threads=2) as enc, \
            OrtEncoder(bundle, "cpu", threads=1) as dynamic:
        assert enc.fixed_batch == 16
        ref = one_session(dynamic, images[:257])
        for n in SIZES:  # the session refuses any batch but 16, so every chunk was exact
            np.testing.assert_allclose(enc.embed(images[:n]), ref[:n], atol=1e-5, err_msg=f"batch {n}")


def test_pool_does_not_spin_and_stops_with_the_encoder(bundle, images):
    before = len(pool_threads())
    enc = OrtEncoder(bundle, "cpu", threads=2)
    x = images[:64]
    first = enc.embed(x)
    assert len(pool_threads()) == before + 1
    cpu = time.process_time()
    time.sleep(0.3)
    assert time.process_time() - cpu < 0.02  # idle pool threads block, they do not spin
    enc.close()
    enc.close()  # idempotent
    assert len(pool_threads()) == before
    np.testing.assert_allclose(enc.embed(x), first, atol=1e-5)  # closed: one thread, same result
    assert len(pool_threads()) == before

    # an encoder dropped without close() takes its pool thread with it
    enc = OrtEncoder(bundle, "cpu", threads=2)
    enc.embed(x)
    assert len(pool_threads()) == before + 1
    del enc
    gc.collect()
    deadline = time.monotonic() + 5
    while len(pool_threads()) > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(pool_threads()) == before


def test_concurrent_callers_get_their_own_results(bundle, images):
    """The daemon may embed from an encoder thread while another caller uses the same encoder."""
    with OrtEncoder(bundle, "cpu", threads=2) as enc:
        ref = one_session(enc, images[:200])
        errors = []

        def worker(lo):
            for n in (9, 64, 65):
                out = enc.embed(images[lo:lo + n])
                if not np.allclose(out, ref[lo:lo + n], atol=1e-5):
                    errors.append((lo, n))

        threads = [threading.Thread(target=worker, args=(lo,)) for lo in (0, 50, 100)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors


def test_an_error_in_a_pool_thread_reaches_the_caller(bundle, images):
    with OrtEncoder(bundle, "cpu", threads=2) as enc:
        run = enc._run
        helper_session = enc.sessions[1]

        def failing(session, x):
            if session is helper_session:
                time.sleep(0.01)  # let the helper take a piece before the caller finishes them all
                raise RuntimeError("helper failed")
            return run(session, x)

        enc._run = failing
        with pytest.raises(RuntimeError, match="helper failed"):
            for _ in range(20):  # the helper might start too late to take any piece
                enc.embed(images[:256])
        enc._run = run
        np.testing.assert_allclose(enc.embed(images[:64]), one_session(enc, images[:64]), atol=1e-5)



def test_a_failed_piece_stops_the_others_and_the_first_error_in_order_is_raised(bundle, images):
    with OrtEncoder(bundle, "cpu", threads=2) as enc:
        run, calls = enc._run, []

        def third_fails(session, x):
            calls.append(len(x))
            if len(calls) == 3:
                raise ValueError("third piece failed")
            return run(session, x)

        enc._run = third_fails
        with pytest.raises(ValueError, match="third piece failed"):
            enc.embed(images[:256])  # 8 pieces of 32
        assert len(calls) < 8  # no piece was started after the failure (one may have been running)
        enc._run = run
        np.testing.assert_allclose(enc.embed(images[:64]), one_session(enc, images[:64]), atol=1e-5)


def test_the_tensorrt_int8_form_on_the_cpu_warns_towards_int8_cpu(bundle, caplog):
    with caplog.at_level("WARNING", logger="protoedge.runtime.backends"):
        open_encoder(bundle, "cpu", precision="int8", threads=1).close()
    assert any("use int8-cpu on the CPU" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="protoedge.runtime.backends"):
        open_encoder(bundle, "cpu", precision="int8-cpu", threads=1).close()
    assert not caplog.records


def test_auto_precision_is_int8_cpu_on_the_cpu_and_fp32_elsewhere_or_without_it(bundle, images):
    assert "int8-cpu" in bundle.precisions
    with open_encoder(bundle, "cpu", precision="auto", threads=1) as enc:
        assert enc.precision == "int8-cpu" and enc.describe()["precision"] == "int8-cpu"
        with open_encoder(bundle, "cpu", precision="int8-cpu", threads=1) as same:
            np.testing.assert_array_equal(enc.embed(images[:8]), same.embed(images[:8]))
    # GPU backends are not measured here, so auto never picks a reduced precision for them
    assert auto_precision(bundle, "cuda") == "fp32" and auto_precision(bundle, "tensorrt") == "fp32"
    # a bundle exported without the CPU INT8 variant runs its FP32 model
    only_fp32 = type("Bundle", (), {"precisions": ["fp32", "fp16"]})()
    assert auto_precision(only_fp32, "cpu") == "fp32"
