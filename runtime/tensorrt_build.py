"""The one TensorRT engine builder: `protoedge export --tensorrt` on a workstation and the runtime's
native TensorRT backend on a device at first start both call :func:`build_or_load_engine`.

Engines run only on the TensorRT version and GPU that built them, so every device builds its own
and caches it under a key of everything that makes a plan invalid. Only the API that TensorRT 10.x
and 11.x share is used: a STRONGLY_TYPED network (precision comes from the ONNX file: FP32, FP16 or
Q/DQ INT8; no builder precision flags, no calibrators), OnnxParser.parse_from_file, a workspace
pool limit, one optimisation profile over the batch range, the builder optimisation level, a
timing cache loaded and saved, build_serialized_network.

Importing this module never needs TensorRT; building does, and raises TensorRTUnavailable with
the reason when it cannot (no tensorrt package, no CUDA device).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .bundle import sha256_file

log = logging.getLogger(__name__)

DEFAULT_PROFILE = (1, 8, 64)  # min / opt / max batch; activation memory scales with max
DEFAULT_WORKSPACE_BYTES = 1 << 30  # 1 GiB: leaves room on 8 GB unified-memory Orin boards
DEFAULT_OPTIMIZATION_LEVEL = 3  # TensorRT's default; lower builds faster on small devices
L4T_RELEASE_FILE = "/etc/nv_tegra_release"
PRECISIONS = ("fp32", "fp16", "int8")


class TensorRTUnavailable(RuntimeError):
    """TensorRT cannot build here; callers fall back to ONNX Runtime and show this message."""


class EngineBuildError(RuntimeError):
    """TensorRT is present but rejected the model; the message carries the parser/builder errors."""


@dataclass(frozen=True)
class DeviceIdentity:
    trt_version: str
    gpu_name: str
    compute_capability: str  # "8.7" for Orin
    l4t_release: str  # "R36.4.3", or "none" off Jetson


# ----------------------------------------------------------------------------- keys and shapes

def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower() or "unknown"


def check_profile(profile) -> tuple[int, int, int]:
    try:
        lo, opt, hi = (int(v) for v in profile)
    except (TypeError, ValueError):
        raise ValueError(f"profile must be three batch sizes (min, opt, max), got {profile!r}") from None
    if not 1 <= lo <= opt <= hi:
        raise ValueError(f"profile needs 1 <= min <= opt <= max, got ({lo}, {opt}, {hi})")
    return lo, opt, hi


def profile_shapes(profile, chw: tuple[int, int, int]) -> tuple[tuple[int, ...], ...]:
    """(min, opt, max) input shapes for a batch profile and the model's fixed C, H, W."""
    lo, opt, hi = check_profile(profile)
    c, h, w = (int(v) for v in chw)
    if min(c, h, w) <= 0:
        raise ValueError(f"channels/height/width must be positive, got {chw}")
    return tuple((n, c, h, w) for n in (lo, opt, hi))


def engine_cache_key(onnx_sha256: str, trt_version: str, gpu_name: str, compute_capability: str,
                     l4t_release: str, precision: str, profile, optimization_level: int = DEFAULT_OPTIMIZATION_LEVEL,
                     workspace_bytes: int = DEFAULT_WORKSPACE_BYTES) -> str:
    """File-name-safe key of everything that makes a cached plan unusable: the model bytes, the
    TensorRT version, the GPU and its compute capability, the L4T release, the precision, the batch
    profile, and the builder settings. Readable prefix for humans, digest of all inputs for safety."""
    if not re.fullmatch(r"[0-9a-f]{64}", onnx_sha256 or ""):
        raise ValueError(f"onnx_sha256 must be 64 lowercase hex digits, got {onnx_sha256!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    lo, opt, hi = check_profile(profile)
    fields = {"onnx_sha256": onnx_sha256, "trt_version": str(trt_version), "gpu_name": str(gpu_name),
              "compute_capability": str(compute_capability), "l4t_release": str(l4t_release),
              "precision": precision, "profile": [lo, opt, hi], "optimization_level": int(optimization_level),
              "workspace_bytes": int(workspace_bytes)}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    readable = "_".join([onnx_sha256[:12], f"trt{_slug(str(trt_version))}", _slug(str(gpu_name)),
                         f"sm{_slug(str(compute_capability)).replace('.', '')}", _slug(str(l4t_release)),
                         precision, f"b{lo}-{opt}-{hi}"])
    return f"{readable}_{digest}"


# ----------------------------------------------------------------------------- device facts

def l4t_release(path: str = L4T_RELEASE_FILE) -> str:
    """'R36.4.3' from /etc/nv_tegra_release ('# R36 (release), REVISION: 4.3, ...'); 'none' elsewhere."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "none"
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    return f"R{m.group(1)}.{m.group(2)}" if m else "unknown"


def _load_cudart():
    names = [ctypes.util.find_library("cudart"), "libcudart.so", "libcudart.so.13", "libcudart.so.12"]
    for name in filter(None, names):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise TensorRTUnavailable("the CUDA runtime library (libcudart) was not found: no CUDA on this machine")


def cuda_device(index: int = 0) -> tuple[str, str]:
    """(GPU name, compute capability) through libcudart with ctypes, so no CUDA Python package is
    needed. cudaDeviceProp starts with `char name[256]` in every CUDA release; the capability comes
    from cudaDeviceGetAttribute, whose enum values (75, 76) are stable."""
    cudart = _load_cudart()
    count = ctypes.c_int(0)
    if cudart.cudaGetDeviceCount(ctypes.byref(count)) != 0 or count.value <= index:
        raise TensorRTUnavailable("no CUDA device is visible (is the container started with the NVIDIA "
                                  "runtime, and is the user in the 'video' and 'render' groups?)")
    major, minor = ctypes.c_int(0), ctypes.c_int(0)
    cudart.cudaDeviceGetAttribute(ctypes.byref(major), 75, index)
    cudart.cudaDeviceGetAttribute(ctypes.byref(minor), 76, index)
    props = ctypes.create_string_buffer(4096)  # larger than cudaDeviceProp in any release
    get = getattr(cudart, "cudaGetDeviceProperties_v2", None) or cudart.cudaGetDeviceProperties
    name = props.raw[:256].split(b"\0", 1)[0].decode(errors="replace") if get(props, index) == 0 else "unknown-gpu"
    return name, f"{major.value}.{minor.value}"


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TensorRTUnavailable(
            f"TensorRT is not installed ({e}); on JetPack use the system python3-libnvinfer bindings, "
            "on a workstation `pip install tensorrt` from NVIDIA's index. ONNX Runtime runs the same "
            "ONNX files meanwhile") from None
    return trt


def device_identity(device: int = 0) -> DeviceIdentity:
    trt = import_tensorrt()
    gpu, cc = cuda_device(device)
    return DeviceIdentity(trt.__version__, gpu, cc, l4t_release())


# ----------------------------------------------------------------------------- building

def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def timing_cache_path(cache_dir: Path, identity: DeviceIdentity) -> Path:
    return Path(cache_dir) / (f"timing_trt{_slug(identity.trt_version)}_{_slug(identity.gpu_name)}_"
                              f"sm{identity.compute_capability.replace('.', '')}.cache")


def build_or_load_engine(onnx_path: str | os.PathLike, cache_dir: str | os.PathLike, precision: str,
                         profile=DEFAULT_PROFILE, *, input_name: str = "images",
                         optimization_level: int = DEFAULT_OPTIMIZATION_LEVEL,
                         workspace_bytes: int = DEFAULT_WORKSPACE_BYTES, onnx_sha256: str | None = None,
                         device: int = 0) -> Path:
    """Path of a serialized plan for this ONNX file on this device: from the cache when it is there,
    otherwise built (this takes minutes on a Jetson) and written atomically into the cache.

    precision only names the ONNX variant (the graph's own types decide; the network is strongly
    typed). Raises TensorRTUnavailable without TensorRT or a GPU, EngineBuildError when TensorRT
    rejects the model.
    """
    onnx_path, cache_dir = Path(onnx_path), Path(cache_dir)
    profile = check_profile(profile)
    identity = device_identity(device)
    sha = onnx_sha256 or sha256_file(onnx_path)
    key = engine_cache_key(sha, identity.trt_version, identity.gpu_name, identity.compute_capability,
                           identity.l4t_release, precision, profile, optimization_level, workspace_bytes)
    plan_path = cache_dir / f"{key}.plan"
    if plan_path.is_file() and plan_path.stat().st_size > 0:
        log.info("TensorRT engine from cache: %s", plan_path)
        return plan_path
    plan = _build_plan(onnx_path, cache_dir, profile, input_name, optimization_level, workspace_bytes, identity)
    _atomic_write(plan_path, plan)
    return plan_path


def _build_plan(onnx_path: Path, cache_dir: Path, profile, input_name: str, optimization_level: int,
                workspace_bytes: int, identity: DeviceIdentity) -> bytes:
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    try:
        builder = trt.Builder(logger)
    except (RuntimeError, TypeError) as e:  # "factory function returned nullptr" without a usable GPU
        raise TensorRTUnavailable(f"TensorRT could not create a builder ({e}): no usable CUDA device") from None
    # Required on 10.x, accepted and ignored on 11.x (always strongly typed). Never EXPLICIT_BATCH:
    # it is the only mode since 10.0 and the enum value is gone in 11.x.
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"{onnx_path}: TensorRT's ONNX parser failed: {errors}")
    tensor = next((network.get_input(i) for i in range(network.num_inputs)
                   if network.get_input(i).name == input_name), None)
    if tensor is None:
        raise EngineBuildError(f"{onnx_path}: no network input named {input_name!r}")
    chw = tuple(tensor.shape)[1:]
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    config.builder_optimization_level = int(optimization_level)
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(input_name, *profile_shapes(profile, chw))
    config.add_optimization_profile(opt_profile)

    timing_path = timing_cache_path(cache_dir, identity)
    timing_bytes = timing_path.read_bytes() if timing_path.is_file() else b""
    timing_cache = config.create_timing_cache(timing_bytes)
    if not config.set_timing_cache(timing_cache, ignore_mismatch=True):
        timing_cache = config.create_timing_cache(b"")  # a stale cache is only a slower build
        config.set_timing_cache(timing_cache, ignore_mismatch=True)

    log.warning("building a TensorRT engine for %s (profile %s, level %d); this can take minutes",
                onnx_path.name, profile, optimization_level)
    started = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(f"{onnx_path}: TensorRT failed to build an engine (see its log above)")
    log.warning("TensorRT engine built in %.1f s", time.perf_counter() - started)
    _atomic_write(timing_path, bytes(config.get_timing_cache().serialize()))
    return bytes(plan)
