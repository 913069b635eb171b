"""The TensorRT builder module: what runs without TensorRT (cache keys, profiles, device facts, the
fallback and its message) always; the real build only where TensorRT and a GPU exist."""
import importlib.util
import re
from pathlib import Path

import pytest

from protoedge.runtime import tensorrt_build as tb
from protoedge.runtime.bundle import load_bundle

DEFAULT_BUNDLE = Path(__file__).resolve().parent.parent / "models" / "omniglot" / "bundle"
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None

BASE = dict(onnx_sha256="a" * 64, trt_version="10.3.0.30", gpu_name="Orin", compute_capability="8.7",
            l4t_release="R36.4.3", precision="fp16", profile=(1, 8, 64))
CHANGED = {
    "onnx_sha256": "b" * 64,
    "trt_version": "11.4.0.106",
    "gpu_name": "NVIDIA Thor",
    "compute_capability": "11.0",
    "l4t_release": "R38.2.0",
    "precision": "int8",
    "profile": (1, 8, 32),
}


def test_cache_key_is_deterministic_and_file_name_safe():
    key = tb.engine_cache_key(**BASE)
    assert key == tb.engine_cache_key(**BASE)
    assert re.fullmatch(r"[A-Za-z0-9._-]+", key), key
    assert "fp16" in key and "sm87" in key and "b1-8-64" in key


@pytest.mark.parametrize("field", sorted(CHANGED))
def test_cache_key_changes_with_each_input(field):
    assert tb.engine_cache_key(**{**BASE, field: CHANGED[field]}) != tb.engine_cache_key(**BASE)


@pytest.mark.parametrize("opt, hi", [(4, 64), (8, 128)])
def test_cache_key_changes_with_each_profile_entry(opt, hi):
    assert tb.engine_cache_key(**{**BASE, "profile": (1, opt, hi)}) != tb.engine_cache_key(**BASE)


def test_cache_key_changes_with_builder_settings():
    base = tb.engine_cache_key(**BASE)
    assert tb.engine_cache_key(**BASE, optimization_level=2) != base
    assert tb.engine_cache_key(**BASE, workspace_bytes=1 << 28) != base


def test_cache_key_does_not_collide_when_slugs_do():
    # Names that differ only in punctuation make the same readable part; the digest keeps them apart.
    a = tb.engine_cache_key(**{**BASE, "gpu_name": "Orin (nvgpu)"})
    b = tb.engine_cache_key(**{**BASE, "gpu_name": "Orin nvgpu"})
    assert a != b


@pytest.mark.parametrize("bad, message", [
    ({"onnx_sha256": "xyz"}, "64 lowercase hex"),
    ({"precision": "bf16"}, "precision must be one of"),
    ({"profile": (8, 1, 64)}, "min <= opt <= max"),
    ({"profile": (0, 1, 2)}, "min <= opt <= max"),
    ({"profile": (1, 2)}, "three batch sizes"),
])
def test_cache_key_rejects_bad_inputs(bad, message):
    with pytest.raises(ValueError, match=message):
        tb.engine_cache_key(**{**BASE, **bad})


def test_profile_shapes_fill_in_the_model_input():
    assert tb.profile_shapes((1, 8, 64), (1, 28, 28)) == ((1, 1, 28, 28), (8, 1, 28, 28), (64, 1, 28, 28))
    with pytest.raises(ValueError, match="positive"):
        tb.profile_shapes((1, 8, 64), (1, 0, 28))


def test_l4t_release_parsing(tmp_path):
    f = tmp_path / "nv_tegra_release"
    f.write_text("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan 8\n")
    assert tb.l4t_release(str(f)) == "R36.4.3"
    f.write_text("garbage")
    assert tb.l4t_release(str(f)) == "unknown"
    assert tb.l4t_release(str(tmp_path / "absent")) == "none"


def test_atomic_write_leaves_only_the_target(tmp_path):
    target = tmp_path / "cache" / "x.plan"
    tb._atomic_write(target, b"plan-bytes")
    tb._atomic_write(target, b"newer")
    assert target.read_bytes() == b"newer"
    assert [p.name for p in target.parent.iterdir()] == ["x.plan"]


@pytest.mark.skipif(HAS_TENSORRT, reason="checks the fallback path of machines without TensorRT")
def test_without_tensorrt_the_build_falls_back_with_a_clear_message(tmp_path):
    bundle = load_bundle(DEFAULT_BUNDLE)
    with pytest.raises(tb.TensorRTUnavailable, match="TensorRT is not installed.*ONNX Runtime"):
        tb.build_or_load_engine(bundle.onnx_path("fp32"), tmp_path / "engines", "fp32")
    assert not (tmp_path / "engines").exists(), "nothing may be cached when nothing was built"


def test_build_and_cache_on_a_gpu(tmp_path):
    pytest.importorskip("tensorrt")
    try:
        tb.cuda_device()
    except tb.TensorRTUnavailable as e:
        pytest.skip(str(e))
    bundle = load_bundle(DEFAULT_BUNDLE)
    for precision in bundle.precisions:
        plan = tb.build_or_load_engine(bundle.onnx_path(precision), tmp_path, precision, (1, 4, 16))
        assert plan.stat().st_size > 0 and plan.suffix == ".plan"
        mtime = plan.stat().st_mtime_ns
        assert tb.build_or_load_engine(bundle.onnx_path(precision), tmp_path, precision, (1, 4, 16)) == plan
        assert plan.stat().st_mtime_ns == mtime, "the second call must come from the cache"
    assert list(tmp_path.glob("timing_*.cache")), "the timing cache must be saved"
