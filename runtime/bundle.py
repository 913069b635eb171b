"""Model bundles: load, verify and (for archives) safely extract them. numpy/onnxruntime only.

A bundle is a directory holding ``manifest.json`` and the ONNX files it lists, or a ``.tar.gz`` of
that directory. :func:`load_bundle` checks everything before it returns anything: the manifest's
schema, every listed file's size and sha256, and that each ONNX graph's input/output names, dtypes
and embedding size agree with the manifest. Anything wrong raises :class:`BundleError` naming the
problem, so a device never runs half a model.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import weakref
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
PRECISIONS = ("fp32", "fp16", "int8", "int8-cpu")  # int8-cpu: see export/precision.py
DISTANCES = ("cosine", "sqeuclidean")

# Archive limits: a bundle of a few small encoders is megabytes; anything far bigger is not ours.
MAX_ARCHIVE_MEMBERS = 64
MAX_ARCHIVE_BYTES = 2 * 1024**3
MAX_MANIFEST_BYTES = 4 * 1024**2

_ONNX_DTYPES = {"uint8": "tensor(uint8)", "float32": "tensor(float)"}


class BundleError(ValueError):
    """The bundle cannot be used; the message says which file and what is wrong with it."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class Bundle:
    root: Path
    manifest: dict
    source: Path = field(default=None)  # what the caller passed: the directory or the archive
    _cleanup: object = field(default=None, repr=False, compare=False)

    @property
    def input_spec(self) -> dict:
        return self.manifest["input"]

    @property
    def output_spec(self) -> dict:
        return self.manifest["output"]

    @property
    def calibration(self) -> dict:
        return self.manifest["calibration"]

    @property
    def precisions(self) -> list[str]:
        return [p for p in PRECISIONS if p in self.manifest["variants"]]

    @property
    def distance(self) -> str:
        return self.manifest["output"]["distance"]

    def onnx_path(self, precision: str = "fp32") -> Path:
        variants = self.manifest["variants"]
        if precision not in variants:
            raise BundleError(f"{self.source}: no {precision!r} variant in this bundle "
                              f"(it has {', '.join(self.precisions)})")
        return self.root / variants[precision]["file"]

    def file_sha256(self, precision: str = "fp32") -> str:
        return self.manifest["files"][self.manifest["variants"][precision]["file"]]["sha256"]

    def summary(self) -> str:
        m, i, o, c = self.manifest, self.input_spec, self.output_spec, self.calibration
        lines = [
            f"bundle     {self.source}",
            f"model      {m['model']['name']} {m['model']['version']}",
            f"input      {i['name']} {i['dtype']} {i['layout']} [N, {i['channels']}, {i['height']}, "
            f"{i['width']}]  pixels: {i['pixels']}",
            f"output     {o['name']} float32 [N, {o['dim']}]  distance={o['distance']} "
            f"temperature={o['temperature']:.4g}",
        ]
        w = o.get("whitening")
        if isinstance(w, dict) and w.get("applied"):
            lines.append(f"whitening  in the graph, fitted on {w.get('images', '?')} calibration images "
                         f"(shrinkage {w.get('shrinkage', '?')})")
        elif isinstance(w, dict):
            lines.append(f"whitening  none: {w.get('reason', '?')}")
        lines += [
            f"calibration n_items={c['n_items']} new_cluster_threshold={c['new_cluster_threshold']:.4g} "
            f"(same-item q0.95={c['same_item_quantiles']['0.95']:.4g}, "
            f"different-item q0.05={c['different_item_quantiles']['0.05']:.4g})",
        ]
        ct = c.get("cluster_threshold")
        if isinstance(ct, dict) and _is_number(ct.get("value")):
            merge = f" merge_threshold={ct['merge_threshold']:.4g}" if _is_number(ct.get("merge_threshold")) else ""
            lines.append(f"clustering threshold={ct['value']:.4g}{merge} (chosen by {ct.get('chosen_by', '?')}; "
                         f"calibration rule {ct.get('rule_threshold', float('nan')):.4g})")
        for p in self.precisions:
            v = m["variants"][p]
            f = m["files"][v["file"]]
            extras = "  ".join(f"{k}={v[k]:.4g}" for k in ("acc_5w1s", "max_abs_diff", "min_cosine",
                                                          "speedup_vs_fp32") if isinstance(v.get(k), (int, float)))
            lines.append(f"variant    {p:5s} {v['file']}  {f['bytes'] / 1024:.0f} KiB  sha256 {f['sha256'][:12]}  {extras}")
        for p, why in (m.get("rejected_variants") or {}).items():
            lines.append(f"refused    {p}: {why}")
        prov = m.get("provenance", {})
        lines.append(f"provenance checkpoint {str(prov.get('checkpoint_sha256', '?'))[:12]}  "
                     f"code {prov.get('code_version', '?')}  data {str(prov.get('data_fingerprint', '?'))[:12]}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- schema

def _require(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise BundleError(f"{where}: {msg}")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def validate_manifest(manifest: dict, where: str = "manifest.json") -> None:
    """Schema check (hand-written: the manifest is small and the device install has no jsonschema)."""
    _require(isinstance(manifest, dict), where, "is not a JSON object")
    version = manifest.get("schema_version")
    _require(version == SCHEMA_VERSION, where,
             f"unknown schema_version {version!r}; this protoedge reads version {SCHEMA_VERSION} "
             "(re-export the bundle, or upgrade protoedge)")
    for key in ("model", "input", "output", "calibration", "variants", "files"):
        _require(isinstance(manifest.get(key), dict), where, f"missing or malformed {key!r} section")
    i, o, c = manifest["input"], manifest["output"], manifest["calibration"]
    for key, kind in (("name", str), ("dtype", str), ("layout", str), ("pixels", str),
                      ("channels", int), ("height", int), ("width", int)):
        _require(isinstance(i.get(key), kind), where, f"input.{key} missing or not {kind.__name__}")
    _require(i["dtype"] == "uint8" and i["layout"] == "NCHW", where,
             f"input must be uint8 NCHW, manifest says {i['dtype']} {i['layout']}")
    _require(all(i[k] > 0 for k in ("channels", "height", "width")), where, "input sizes must be positive")
    _require(isinstance(o.get("name"), str), where, "output.name missing")
    _require(isinstance(o.get("dim"), int) and o["dim"] > 0, where, "output.dim missing or not a positive int")
    _require(o.get("distance") in DISTANCES, where, f"output.distance must be one of {DISTANCES}")
    _require(_is_number(o.get("temperature")), where, "output.temperature missing or not a number")
    _require(c.get("distance") == o["distance"], where,
             f"calibration.distance {c.get('distance')!r} differs from output.distance {o['distance']!r}")
    _require(_is_number(c.get("new_cluster_threshold")), where, "calibration.new_cluster_threshold missing")
    _require(isinstance(c.get("n_items"), int), where, "calibration.n_items missing")
    for key, needed in (("same_item_quantiles", "0.95"), ("different_item_quantiles", "0.05")):
        q = c.get(key)
        _require(isinstance(q, dict) and all(_is_number(v) for v in q.values()) and needed in q, where,
                 f"calibration.{key} missing or without the {needed} quantile")
    variants, files = manifest["variants"], manifest["files"]
    _require("fp32" in variants, where, "no fp32 variant (every bundle carries the reference model)")
    for p, v in variants.items():
        _require(p in PRECISIONS, where, f"unknown precision {p!r} in variants (known: {PRECISIONS})")
        _require(isinstance(v, dict) and isinstance(v.get("file"), str), where, f"variants.{p}.file missing")
        _require(v["file"] in files, where, f"variants.{p}.file {v['file']!r} is not listed in 'files'")
    for name, entry in files.items():
        _require(_safe_relative(name), where, f"file name {name!r} is not a plain relative path")
        _require(isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                 and len(entry["sha256"]) == 64 and isinstance(entry.get("bytes"), int), where,
                 f"files.{name} needs sha256 (64 hex) and bytes")


def _safe_relative(name: str) -> bool:
    p = PurePosixPath(name)
    return bool(name) and not p.is_absolute() and ".." not in p.parts and "\\" not in name and ":" not in name


# ----------------------------------------------------------------------------- verification

def verify_files(root: Path, manifest: dict) -> None:
    """Every listed file exists, is a regular file inside the bundle, and has its size and sha256."""
    for name, entry in manifest["files"].items():
        path = root / name
        if path.is_symlink() or not path.is_file():
            raise BundleError(f"{root}: {name} is missing (or not a regular file)")
        if not path.resolve().is_relative_to(root.resolve()):
            raise BundleError(f"{root}: {name} points outside the bundle")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise BundleError(f"{root}: {name} is {size} bytes, the manifest says {entry['bytes']} "
                              "(truncated or replaced file)")
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise BundleError(f"{root}: {name} sha256 {digest[:16]}... does not match the manifest's "
                              f"{entry['sha256'][:16]}... (the file was changed after export)")


def verify_graphs(root: Path, manifest: dict) -> None:
    """Each ONNX file's declared I/O matches the manifest. Read through onnxruntime, which a device
    has anyway; the session is discarded (backends make their own with their own options)."""
    import onnxruntime as ort

    i, o = manifest["input"], manifest["output"]
    want_in = [i["name"], _ONNX_DTYPES[i["dtype"]], [i["channels"], i["height"], i["width"]]]
    want_out = [o["name"], _ONNX_DTYPES["float32"], o["dim"]]
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # only the I/O is read
    opts.intra_op_num_threads = 1
    for precision, v in manifest["variants"].items():
        where = f"{root / v['file']} ({precision})"
        try:
            session = ort.InferenceSession(str(root / v["file"]), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own exception types for unreadable graphs
            raise BundleError(f"{where}: onnxruntime cannot load it ({str(e).splitlines()[0]})") from None
        ins, outs = session.get_inputs(), session.get_outputs()
        _require(len(ins) == 1 and len(outs) == 1, where,
                 f"expected one input and one output, graph has {len(ins)} and {len(outs)}")
        got_in = [ins[0].name, ins[0].type, list(ins[0].shape[1:])]
        got_out = [outs[0].name, outs[0].type, outs[0].shape[-1]]
        _require(got_in == want_in, where, f"graph input {got_in} does not match the manifest's {want_in}")
        _require(got_out == want_out, where, f"graph output {got_out} does not match the manifest's {want_out}")


# ----------------------------------------------------------------------------- archives

def safe_extract(archive: str | os.PathLike, dest: str | os.PathLike,
                 max_members: int = MAX_ARCHIVE_MEMBERS, max_bytes: int = MAX_ARCHIVE_BYTES) -> Path:
    """Extract a bundle archive into dest, refusing anything that is not plain files and folders
    below one top directory: absolute paths, '..', links, devices, too many members, too many bytes.
    Every member is checked before the first byte is written."""
    archive, dest = Path(archive), Path(dest)
    try:
        tar = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise BundleError(f"{archive}: not a readable tar archive ({e})") from None
    with tar:
        # Members are read one at a time so a huge or endless archive stops at the first limit
        # instead of being decompressed in full just to be listed.
        members, total = [], 0
        try:
            for m in tar:
                members.append(m)
                if len(members) > max_members:
                    raise BundleError(f"{archive}: more members than the limit of {max_members}")
                if not _safe_relative(m.name):
                    raise BundleError(f"{archive}: unsafe member path {m.name!r} (absolute or '..')")
                if not (m.isfile() or m.isdir()):
                    raise BundleError(f"{archive}: member {m.name!r} is a link or special file; bundles hold "
                                      "only regular files")
                total += m.size
                if total > max_bytes:
                    raise BundleError(f"{archive}: more than {max_bytes} bytes uncompressed")
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            raise BundleError(f"{archive}: corrupt archive ({e})") from None
        tops = {PurePosixPath(m.name).parts[0] for m in members}
        if len(tops) != 1:
            raise BundleError(f"{archive}: expected one top-level bundle folder, found {sorted(tops)}")
        dest.mkdir(parents=True, exist_ok=True)
        try:
            # The stdlib's 'data' filter (Python >= 3.10.12) repeats the checks above at write time.
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, members=members, filter="data")
            else:
                tar.extractall(dest, members=members)
        except (tarfile.TarError, OSError) as e:
            raise BundleError(f"{archive}: extraction failed ({e})") from None
    return dest / tops.pop()


# ----------------------------------------------------------------------------- loading

def read_manifest(root: Path) -> dict:
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"{root}: no {MANIFEST_NAME} (not a protoedge bundle)")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{path}: larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path}: not valid JSON ({e})") from None
    validate_manifest(manifest, str(path))
    return manifest


def load_bundle(path: str | os.PathLike, check_graphs: bool = True,
                extract_to: str | os.PathLike | None = None) -> Bundle:
    """A verified bundle from a directory or a .tar.gz archive; BundleError on any problem.

    Archives are extracted into extract_to, or into a temporary folder removed with the Bundle.
    check_graphs=False skips opening the ONNX files with onnxruntime (the hashes are still checked).
    """
    source = Path(path)
    if not source.exists():
        raise BundleError(f"{source}: no such bundle directory or archive")
    cleanup = None
    if source.is_dir():
        root = source
    else:
        target = Path(extract_to) if extract_to else Path(tempfile.mkdtemp(prefix="protoedge-bundle-"))
        try:
            root = safe_extract(source, target)
        except BundleError:
            if not extract_to:
                shutil.rmtree(target, ignore_errors=True)
            raise
    try:
        manifest = read_manifest(root)
        verify_files(root, manifest)
        if check_graphs:
            verify_graphs(root, manifest)
    except BundleError:
        if source.is_file() and not extract_to:
            shutil.rmtree(root.parent, ignore_errors=True)
        raise
    bundle = Bundle(root=root, manifest=manifest, source=source)
    if source.is_file() and not extract_to:
        bundle._cleanup = weakref.finalize(bundle, shutil.rmtree, str(root.parent), True)
    return bundle
