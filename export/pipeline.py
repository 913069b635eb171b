"""Checkpoint -> verified bundle: the steps of `protoedge export` in order.

FP32 ONNX + parity gate -> FP16 / INT8 variants, each scored (5-way 1-shot accuracy, CPU speed)
against FP32 and dropped if it loses too much -> distance calibration -> manifest with hashes ->
load_bundle() on the staging folder -> swap into place (-> archive, -> TensorRT engines).
"""
from __future__ import annotations

import datetime as dt
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from protoedge import __version__
from protoedge.datasets import ImageSet, load_images, load_split, protocols
from protoedge.runtime.bundle import SCHEMA_VERSION, Bundle, load_bundle, sha256_file

from . import bundle_writer, measure
from .calibration import cluster_threshold, distance_calibration
from .onnx_export import OPSET, ExportError, check_fp32_parity, compare, export_fp32, run_onnx, run_torch
from .precision import to_fp16, to_int8
from .whitening import RULE_FACTOR as WHITENED_RULE_FACTOR, SHRINKAGE, maybe_whiten

log = logging.getLogger(__name__)

# Largest accuracy loss (percentage points, 5-way 1-shot) a reduced-precision variant may have.
MAX_ACC_DROP = {"fp16": 0.5, "int8": 1.0, "int8-cpu": 1.0}
VARIANT_FILES = {"fp32": "encoder.fp32.onnx", "fp16": "encoder.fp16.onnx", "int8": "encoder.int8.onnx",
                 "int8-cpu": "encoder.int8-cpu.onnx"}


@dataclass
class ExportOptions:
    precisions: tuple[str, ...] = ("fp32", "fp16", "int8", "int8-cpu")
    calib: str | None = None  # unlabelled images: "protocol:part" or a path; default the training data
    eval: str | None = None  # labelled images of novel classes; default the protocol's test part
    eval_classes: int | None = None  # use only the first K classes of the eval set (quick runs)
    episodes: int = 1000
    parity_images: int = 512
    int8_calib_images: int = 512
    calib_items: int = 2000
    whiten: str = "auto"  # fold a whitening of the embedding, fitted on the calib images, into the graph
    whiten_shrinkage: float = SHRINKAGE
    speed_batch: int = 64
    speed_repeats: int = 30
    archive: Path | None = None
    tensorrt: bool = False
    engine_dir: Path | None = None
    seed: int = 0
    progress: bool = True


@dataclass
class ExportResult:
    bundle: Bundle
    rejected: dict = field(default_factory=dict)  # precision -> reason
    archive: Path | None = None
    engines: dict = field(default_factory=dict)  # precision -> plan path
    tensorrt_error: str | None = None


def accuracy_gate(precision: str, fp32_acc: float, acc: float) -> str | None:
    """Why a reduced-precision variant must not ship, or None when its accuracy loss is acceptable."""
    drop = fp32_acc - acc
    if drop > MAX_ACC_DROP[precision] or not np.isfinite(acc):
        return (f"{precision} loses {drop:.2f} points of 5-way 1-shot accuracy ({acc:.2f}% vs fp32 "
                f"{fp32_acc:.2f}%), more than the allowed {MAX_ACC_DROP[precision]} points; not written")
    return None


def resolve_images(spec: str, part_default: str, size: int = 28, channels: int = 1) -> ImageSet:
    """'omniglot-a:test', 'mnist' (part_default), or a folder / .npz / .npy path, at the encoder's
    input size (shipped 28x28 images are resized for an encoder trained at another size, e.g. 84)."""
    name, _, part = spec.partition(":")
    if name in protocols():
        images = load_split(name, part or part_default)
        if images.images.shape[2:] != (size, size):
            from protoedge.trainer.data import resize_pixels  # the trainer's resize: the pixels it trained on

            images = ImageSet(resize_pixels(images.images, size).numpy(), images.labels, images.class_names,
                              images.source)
        return images
    return load_images(spec, size=(size, size), channels=channels)


def default_protocol(meta: dict) -> str:
    config = meta.get("config") or {}
    for key in ("protocol", "data"):
        value = config.get(key)
        if isinstance(value, str) and value in protocols():
            return value
    return "omniglot-a"


def _keep_classes(images: ImageSet, k: int | None) -> ImageSet:
    if k is None or images.labels is None:
        return images
    return images.subset(np.flatnonzero(images.labels < k))


def _sample(images: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return images[np.sort(rng.choice(len(images), min(n, len(images)), replace=False))]


def _provenance(checkpoint: Path, meta: dict) -> dict:
    import onnx
    import onnxruntime
    import torch

    return {
        "checkpoint": checkpoint.name,
        "checkpoint_sha256": sha256_file(checkpoint),
        "config": meta.get("config", {}),
        "encoder_config": meta.get("encoder_config", {}),
        "data_fingerprint": meta.get("data_fingerprint"),
        "code_version": meta.get("code_version"),
        "benchmarks": meta.get("metrics", {}),
        "export": {"protoedge": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
                   "onnxruntime": onnxruntime.__version__, "opset": OPSET, "exporter": "torch.onnx dynamo",
                   "exported_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")},
    }


class _Steps:
    """A step counter shown as a progress bar (tqdm) on stderr."""

    def __init__(self, total: int, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc="export", unit="step", disable=not enabled, leave=False)

    def __call__(self, what: str) -> None:
        self.bar.set_postfix_str(what)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def export_bundle(checkpoint: str | Path, out: str | Path, options: ExportOptions | None = None) -> ExportResult:
    from protoedge.trainer.checkpoint import load_encoder

    opts = options or ExportOptions()
    checkpoint, out = Path(checkpoint), Path(out)
    unknown = set(opts.precisions) - set(VARIANT_FILES)
    if unknown or "fp32" not in opts.precisions:
        raise ValueError(f"precisions must include fp32 and come from {list(VARIANT_FILES)}, got {list(opts.precisions)}")
    encoder, meta = load_encoder(checkpoint)
    distance = meta.get("distance")
    if distance is None:
        log.warning("%s records no trained distance (untrained checkpoint?); assuming cosine", checkpoint)
        distance = "cosine"
    temperature = float(meta.get("temperature", 1.0))
    protocol = default_protocol(meta)
    cfg = encoder.config
    eval_set = _keep_classes(resolve_images(opts.eval or protocol, "test", cfg.input_size, cfg.in_channels),
                             opts.eval_classes)
    calib_set = resolve_images(opts.calib or protocol, "train", cfg.input_size, cfg.in_channels)
    want = (cfg.in_channels, cfg.input_size, cfg.input_size)
    for name, s in (("eval", eval_set), ("calib", calib_set)):
        if tuple(s.images.shape[1:]) != want:
            raise ExportError(f"{name} images {s.source} are {list(s.images.shape[1:])}, the encoder takes {list(want)}")
    if eval_set.labels is None:
        raise ExportError(f"eval images {eval_set.source} have no labels; accuracy needs a labelled set")
    rng = np.random.default_rng(opts.seed)
    # before anything is exported: a whitening is part of the graph
    encoder, whitening = maybe_whiten(encoder, calib_set.images, distance, temperature, opts.whiten,
                                      opts.whiten_shrinkage, opts.seed)
    whitened = whitening.get("applied", False)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would make the shipped folder private
    steps = _Steps(3 + 2 * (len(opts.precisions) - 1) + 3, opts.progress)
    try:
        fp32_path = export_fp32(encoder, staging / VARIANT_FILES["fp32"])
        steps("fp32 exported")
        parity_images = _sample(eval_set.images, opts.parity_images, rng)
        parity = check_fp32_parity(encoder, fp32_path, parity_images)
        torch_ref = run_torch(encoder, parity_images)
        steps("fp32 parity")

        variants, rejected = {}, {}
        base = None
        int8_calib = None  # both INT8 forms are calibrated on the same images
        for precision in VARIANT_FILES:
            if precision not in opts.precisions:
                continue
            path = staging / VARIANT_FILES[precision]
            if precision == "fp16":
                to_fp16(fp32_path, path)
                steps("fp16 converted")
            elif precision in ("int8", "int8-cpu"):
                if int8_calib is None:
                    int8_calib = _sample(calib_set.images, opts.int8_calib_images, rng)
                to_int8(fp32_path, path, int8_calib, target="cpu" if precision == "int8-cpu" else "tensorrt")
                steps(f"{precision} quantised")
            # int8 is the TensorRT form: scored with TensorRT's arithmetic, not the CPU's fused kernels
            unfused = precision == "int8"
            stats = parity if precision == "fp32" else compare(torch_ref, run_onnx(path, parity_images, unfused=unfused))
            acc = measure.accuracy_5w1s(run_onnx(path, eval_set.images, unfused=unfused), eval_set.labels, distance,
                                        opts.episodes, opts.seed)
            entry = {"file": path.name, "max_abs_diff": stats["max_abs_diff"], "min_cosine": stats["min_cosine"],
                     "acc_5w1s": acc["acc"], "acc_ci95": acc["ci95"]}
            if base is None:
                base = entry
            else:
                entry["acc_drop_vs_fp32"] = base["acc_5w1s"] - entry["acc_5w1s"]
                reason = accuracy_gate(precision, base["acc_5w1s"], entry["acc_5w1s"])
                if reason:
                    rejected[precision] = reason
                    path.unlink()
                    steps(f"{precision} rejected")
                    continue
            variants[precision] = entry
            steps(f"{precision} scored")

        speed = measure.interleaved_latency({p: staging / v["file"] for p, v in variants.items()}, parity_images,
                                            opts.speed_batch, opts.speed_repeats)
        for p, v in variants.items():
            v[f"cpu_images_per_s_b{opts.speed_batch}"] = speed[p]["images_per_s"]
            if p != "fp32":
                v["speedup_vs_fp32"] = speed[p]["images_per_s"] / speed["fp32"]["images_per_s"]
        steps("speed")
        calibration = distance_calibration(lambda x: run_onnx(fp32_path, x), calib_set.images, distance,
                                           opts.calib_items, opts.seed)
        calibration["cluster_threshold"] = cluster_threshold(lambda x: run_onnx(fp32_path, x), calib_set.images,
                                                             calibration, temperature, seed=opts.seed,
                                                             rule_factor=WHITENED_RULE_FACTOR if whitened else None)
        steps("calibration")
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "model": {"name": (f"protoedge-resnet12-{cfg.width}" if cfg.backbone == "resnet12"
                               else f"protoedge-conv{cfg.depth}-{cfg.width}"),
                      "version": str(meta.get("version") or f"{__version__}+{sha256_file(checkpoint)[:12]}")},
            "input": {"name": "images", "dtype": "uint8", "layout": "NCHW", "channels": cfg.in_channels,
                      "height": cfg.input_size, "width": cfg.input_size,
                      "pixels": "0-255 as stored in the training data (ink high for Omniglot/MNIST); "
                                f"the graph normalises (x/255 - {cfg.pixel_mean}) / {cfg.pixel_std}"},
            "output": {"name": "embedding", "dim": int(encoder.embedding_dim), "distance": distance,
                       "temperature": temperature, "whitening": whitening},
            "calibration": {**calibration, "source": calib_set.source},
            "variants": variants,
            "rejected_variants": rejected,
            "evaluation": {"protocol": "5-way 1-shot, 15 queries per class", "source": eval_set.source,
                           "classes": int(len(np.unique(eval_set.labels))), "episodes": opts.episodes,
                           "seed": opts.seed, "parity_images": int(len(parity_images)),
                           "speed": f"onnxruntime CPU, 1 thread, batch {opts.speed_batch}, median of "
                                    f"{opts.speed_repeats} runs per variant, variants interleaved"},
            "files": {v["file"]: bundle_writer.file_entry(staging / v["file"]) for v in variants.values()},
            "provenance": _provenance(checkpoint, meta),
        }
        bundle_writer.write_manifest(staging, manifest)
        load_bundle(staging)  # the bundle must pass the runtime's own verification before it ships
        steps("verified")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        steps.close()
    bundle_writer.publish(staging, out)
    result = ExportResult(bundle=load_bundle(out), rejected=rejected)
    if opts.archive:
        result.archive = bundle_writer.pack_archive(out, Path(opts.archive), manifest)
    if opts.tensorrt:
        _build_engines(result, opts)
    return result


def _build_engines(result: ExportResult, opts: ExportOptions) -> None:
    from protoedge.runtime.tensorrt_build import PRECISIONS as TENSORRT_PRECISIONS
    from protoedge.runtime.tensorrt_build import EngineBuildError, TensorRTUnavailable, build_or_load_engine

    engine_dir = opts.engine_dir or (result.bundle.root / "engines")
    for precision in result.bundle.precisions:
        if precision not in TENSORRT_PRECISIONS:  # int8-cpu: asymmetric INT8, which TensorRT rejects
            continue
        try:
            result.engines[precision] = build_or_load_engine(
                result.bundle.onnx_path(precision), engine_dir, precision,
                onnx_sha256=result.bundle.file_sha256(precision))
        except (TensorRTUnavailable, EngineBuildError) as e:
            result.tensorrt_error = str(e)
            return
