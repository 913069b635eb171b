"""Bundle loading and verification (runtime/bundle.py) on copies of the committed default bundle:
every way a bundle can be wrong must give BundleError naming the problem, never a loaded model."""
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from protoedge.cli import main
from protoedge.export.bundle_writer import pack_archive
from protoedge.runtime.bundle import MANIFEST_NAME, BundleError, load_bundle, safe_extract

DEFAULT_BUNDLE = Path(__file__).resolve().parent.parent / "models" / "omniglot" / "bundle"


@pytest.fixture
def bundle_dir(tmp_path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE, dst)
    return dst


def _manifest(root: Path) -> dict:
    return json.loads((root / MANIFEST_NAME).read_text())


def _write_manifest(root: Path, manifest: dict) -> None:
    (root / MANIFEST_NAME).write_text(json.dumps(manifest))


def test_default_bundle_loads_with_its_specs(bundle_dir):
    b = load_bundle(bundle_dir)
    assert b.input_spec["name"] == "images" and b.input_spec["dtype"] == "uint8"
    assert b.output_spec["name"] == "embedding" and b.output_spec["dim"] > 0
    assert b.onnx_path("fp32").is_file()
    assert b.calibration["distance"] == b.output_spec["distance"]
    with pytest.raises(BundleError, match="no 'bf16' variant"):
        b.onnx_path("bf16")


def test_default_bundle_calibration_separates_same_and_different_items():
    c = load_bundle(DEFAULT_BUNDLE).calibration
    same, diff = c["same_item_quantiles"], c["different_item_quantiles"]
    # The committed encoder is trained: most views of one item are closer than almost all other items.
    assert same["0.9"] < diff["0.05"]
    assert same["0.95"] <= c["new_cluster_threshold"] <= diff["0.05"]
    assert c["same_item_above_threshold"] < 0.1 and c["different_item_below_threshold"] < 0.1


def test_changed_byte_is_rejected(bundle_dir):
    onnx_file = bundle_dir / "encoder.fp32.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit inside the weights: the size stays the same
    onnx_file.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"encoder\.fp32\.onnx sha256 .* does not match"):
        load_bundle(bundle_dir)


def test_truncated_file_is_rejected(bundle_dir):
    onnx_file = bundle_dir / "encoder.int8.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:-10])
    with pytest.raises(BundleError, match="truncated or replaced"):
        load_bundle(bundle_dir)


def test_missing_file_is_rejected(bundle_dir):
    (bundle_dir / "encoder.fp16.onnx").unlink()
    with pytest.raises(BundleError, match=r"encoder\.fp16\.onnx is missing"):
        load_bundle(bundle_dir)


def test_missing_manifest_is_rejected(bundle_dir):
    (bundle_dir / MANIFEST_NAME).unlink()
    with pytest.raises(BundleError, match="no manifest.json"):
        load_bundle(bundle_dir)


@pytest.mark.parametrize("version", [2, 0, "1", None])
def test_unknown_schema_version_is_rejected(bundle_dir, version):
    m = _manifest(bundle_dir)
    m["schema_version"] = version
    _write_manifest(bundle_dir, m)
    with pytest.raises(BundleError, match="unknown schema_version"):
        load_bundle(bundle_dir)


def test_malformed_manifest_is_rejected(bundle_dir):
    (bundle_dir / MANIFEST_NAME).write_text('{"schema_version": 1,')
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(bundle_dir)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["output"].update(dim=m["output"]["dim"] + 1), "graph output .* does not match"),
    (lambda m: m["output"].update(name="features"), "graph output .* does not match"),
    (lambda m: m["input"].update(name="pixels"), "graph input .* does not match"),
    (lambda m: m["input"].update(height=32, width=32), "graph input .* does not match"),
    (lambda m: m["input"].update(dtype="float32"), "input must be uint8"),
    (lambda m: m["output"].update(distance="manhattan"), "output.distance"),
    (lambda m: m["calibration"].pop("new_cluster_threshold"), "new_cluster_threshold"),
    (lambda m: m["calibration"]["same_item_quantiles"].pop("0.95"), "same_item_quantiles"),
    (lambda m: m["variants"].pop("fp32"), "no fp32 variant"),
    (lambda m: m["variants"]["int8"].update(file="other.onnx"), "not listed in 'files'"),
])
def test_manifest_that_does_not_match_the_onnx_or_the_schema_is_rejected(bundle_dir, edit, message):
    m = _manifest(bundle_dir)
    edit(m)
    _write_manifest(bundle_dir, m)
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle_dir)


def test_file_entry_pointing_outside_the_bundle_is_rejected(bundle_dir):
    m = _manifest(bundle_dir)
    m["files"]["../encoder.fp32.onnx"] = m["files"].pop("encoder.fp32.onnx")
    m["variants"]["fp32"]["file"] = "../encoder.fp32.onnx"
    _write_manifest(bundle_dir, m)
    with pytest.raises(BundleError, match="not a plain relative path"):
        load_bundle(bundle_dir)


def test_archive_round_trip_and_cleanup(bundle_dir, tmp_path):
    archive = pack_archive(bundle_dir, tmp_path / "b.tar.gz", _manifest(bundle_dir))
    b = load_bundle(archive)
    extracted = b.root
    assert extracted.is_dir() and b.source == archive
    assert b.file_sha256("fp32") == load_bundle(bundle_dir).file_sha256("fp32")
    del b
    import gc

    gc.collect()
    assert not extracted.exists(), "the temporary extraction should go with the Bundle"


def _tar_with(tmp_path: Path, members) -> Path:
    path = tmp_path / "evil.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes = b"x") -> tuple:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _link(name: str, target: str, kind=tarfile.SYMTYPE) -> tuple:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


@pytest.mark.parametrize("members, message", [
    ([_file("bundle/manifest.json"), _file("bundle/../../escaped.txt")], "unsafe member path"),
    ([_file("/tmp/protoedge-abs-escape.txt")], "unsafe member path"),
    ([_file("bundle/manifest.json"), _link("bundle/encoder.fp32.onnx", "/etc/passwd")], "link or special file"),
    ([_file("bundle/manifest.json"), _link("bundle/x.onnx", "bundle/manifest.json", tarfile.LNKTYPE)],
     "link or special file"),
    ([_file("a/manifest.json"), _file("b/manifest.json")], "one top-level bundle folder"),
    ([_file(f"bundle/f{i}") for i in range(100)], "more members than the limit"),
])
def test_unsafe_archives_are_refused_before_anything_is_written(tmp_path, members, message):
    archive = _tar_with(tmp_path, members)
    dest = tmp_path / "out"
    with pytest.raises(BundleError, match=message):
        safe_extract(archive, dest)
    assert not dest.exists() or not any(dest.rglob("*"))
    assert not (tmp_path / "escaped.txt").exists() and not Path("/tmp/protoedge-abs-escape.txt").exists()
    with pytest.raises(BundleError):
        load_bundle(archive)


def test_archive_size_limit(tmp_path):
    archive = _tar_with(tmp_path, [_file("bundle/big.bin", b"\0" * 5000)])
    with pytest.raises(BundleError, match="more than 1000 bytes"):
        safe_extract(archive, tmp_path / "out", max_bytes=1000)


def test_truncated_archive(bundle_dir, tmp_path):
    archive = pack_archive(bundle_dir, tmp_path / "b.tar.gz", _manifest(bundle_dir))
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(BundleError, match="corrupt archive|extraction failed"):
        load_bundle(archive)


def test_not_an_archive(tmp_path):
    junk = tmp_path / "bundle.tar.gz"
    junk.write_bytes(b"this is not a tar file")
    with pytest.raises(BundleError, match="not a readable tar archive"):
        load_bundle(junk)


def test_info_command_exit_codes(bundle_dir):
    runner = CliRunner()
    ok = runner.invoke(main, ["info", str(bundle_dir)])
    assert ok.exit_code == 0, ok.output
    assert "verified" in ok.output and "embedding" in ok.output
    (bundle_dir / "encoder.int8.onnx").write_bytes(b"tampered")
    bad = runner.invoke(main, ["info", str(bundle_dir)])
    assert bad.exit_code != 0
    assert "verification FAILED" in bad.output and "encoder.int8.onnx" in bad.output


def test_loading_a_bundle_never_imports_torch(bundle_dir):
    code = ("import sys; from protoedge.runtime.bundle import load_bundle; "
            f"b = load_bundle({str(bundle_dir)!r}); assert b.output_spec['dim'] > 0; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_publish_replaces_a_bundle_but_never_other_folders(bundle_dir, tmp_path):
    from protoedge.export.bundle_writer import publish

    target = tmp_path / "target"
    target.mkdir()
    (target / "notes.txt").write_text("someone's files")
    with pytest.raises(FileExistsError, match="not a bundle"):
        publish(bundle_dir, target)
    assert (target / "notes.txt").exists() and bundle_dir.exists()
    old = tmp_path / "old"
    shutil.copytree(bundle_dir, old)
    (old / "stale.onnx").write_bytes(b"old")
    publish(bundle_dir, old)
    assert not (old / "stale.onnx").exists() and load_bundle(old).precisions
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old", "target"], "no leftovers beside the bundle"
