"""Checkpoints as safetensors files: tensors plus a JSON header, so loading executes no pickle.

Layout of one file:
  tensors  "encoder.<name>"  encoder weights and buffers (what export needs)
           any other prefix  decoder, optimizer moments, RNG states (what exact resume needs)
  metadata "protoedge" -> JSON: {"format": 1, "encoder_config": {...}, "config": {...}, ...}
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .model import Encoder, EncoderConfig

FORMAT = 1


class CheckpointError(ValueError):
    pass


def save_checkpoint(path: str | os.PathLike, encoder: Encoder, meta: dict | None = None,
                    extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Write atomically (temporary file + rename) so an interrupted save never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"encoder.{k}": v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    for k, v in (extra or {}).items():
        tensors[k] = v.detach().cpu().contiguous()
    header = {"format": FORMAT, "encoder_config": encoder.config.to_dict(), **(meta or {})}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"protoedge": json.dumps(header)})
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({e})") from None
    if "protoedge" not in header:
        raise CheckpointError(f"{path}: not a protoedge checkpoint (no 'protoedge' metadata)")
    meta = json.loads(header["protoedge"])
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format')} is not supported (want {FORMAT})")
    return tensors, meta


def load_encoder(path: str | os.PathLike) -> tuple[Encoder, dict]:
    """The encoder in eval mode, and the checkpoint's metadata."""
    tensors, meta = load_checkpoint(path)
    encoder = Encoder(EncoderConfig(**meta["encoder_config"]))
    state = {k[len("encoder."):]: v for k, v in tensors.items() if k.startswith("encoder.")}
    try:
        encoder.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the encoder config ({e})") from None
    return encoder.eval(), meta


# ----------------------------------------------------------------------------- exact resume

def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    """Optimizer moments as flat tensors ("optim.<param>.<key>") plus the JSON-able param groups."""
    state = optimizer.state_dict()
    tensors = {}
    for pid, per_param in state["state"].items():
        for key, value in per_param.items():
            tensors[f"optim.{pid}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, state["param_groups"]


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                      param_groups: list) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def numpy_rng_state(rng) -> dict:
    """numpy Generator state with its 128-bit integers as strings (JSON cannot hold them)."""
    s = rng.bit_generator.state
    return {"bit_generator": s["bit_generator"], "state": {k: str(v) for k, v in s["state"].items()},
            "has_uint32": s["has_uint32"], "uinteger": s["uinteger"]}


def restore_numpy_rng(rng, saved: dict) -> None:
    rng.bit_generator.state = {"bit_generator": saved["bit_generator"],
                               "state": {k: int(v) for k, v in saved["state"].items()},
                               "has_uint32": saved["has_uint32"], "uinteger": saved["uinteger"]}


def strip_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, **extra_meta) -> Path:
    """The encoder weights and provenance only (no decoder, optimizer, RNG): the small file that is
    committed and exported. The training state's step counters are dropped with it."""
    encoder, meta = load_encoder(src)
    meta = {k: v for k, v in meta.items() if k not in ("state", "format", "encoder_config")}
    return save_checkpoint(dst, encoder, {**meta, **extra_meta})
