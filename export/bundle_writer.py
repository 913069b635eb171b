"""Writing bundles: manifest with file hashes, the directory swap, and the shipping archive.
The format itself (schema, names, verification) belongs to protoedge.runtime.bundle."""
from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

from protoedge.runtime.bundle import MANIFEST_NAME, sha256_file, validate_manifest


def file_entry(path: Path) -> dict:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def write_manifest(root: Path, manifest: dict) -> Path:
    validate_manifest(manifest, f"{root / MANIFEST_NAME} (being written)")
    path = root / MANIFEST_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def publish(staging: Path, out: Path) -> Path:
    """Move a finished staging directory to out, replacing an older bundle there. The old one is
    renamed aside first, so a reader sees either the old bundle or the new one, never a mix."""
    out = Path(out)
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        if not (out / MANIFEST_NAME).is_file() and any(out.iterdir()):
            raise FileExistsError(f"{out} exists and is not a bundle; refusing to replace it")
        os.replace(out, old)
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def pack_archive(bundle_dir: Path, archive: Path, manifest: dict) -> Path:
    """One .tar.gz holding the bundle folder: the manifest and the files it lists, nothing else
    (no engines, no stray files), with fixed owners and times so the same bundle packs the same."""
    bundle_dir, archive = Path(bundle_dir), Path(archive)
    top = bundle_dir.name
    names = [MANIFEST_NAME, *sorted(manifest["files"])]
    tmp = archive.with_name(archive.name + ".tmp")
    with tarfile.open(tmp, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        folder = tarfile.TarInfo(top)
        folder.type, folder.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(folder)
        for name in names:
            data = (bundle_dir / name).read_bytes()
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, archive)
    return archive
