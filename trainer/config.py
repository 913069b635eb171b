"""The full training configuration (saved in every checkpoint) and the named recipes."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import asdict, dataclass, field

from .augment import AugmentConfig


class ConfigError(ValueError):
    """A configuration that cannot run (the message says why)."""


RECIPES = ("default", "autoencoder", "cactus", "maml", "supervised", "gpu")
PROTONET_TASK_RECIPES = ("default", "cactus", "gpu")  # recipes that build k-means tasks as they go


@dataclass
class TrainConfig:
    protocol: str = "omniglot-a"
    recipe: str = "default"
    seed: int = 0
    time_budget_s: float = 1800.0  # everything included: AE stage, k-means, checkpoints
    steps: int = 0  # > 0: fixed number of meta steps (exactly reproducible); 0: fill the time budget
    device: str = "auto"  # auto | cpu | cuda
    # auto: bf16 autocast where the device computes in bf16 natively (CUDA with bf16, CPUs with
    # AVX512-BF16 / AMX), fp32 elsewhere: on an AVX2-only CPU bf16 autocast is emulated and a step
    # took ~5x as long (AMD EPYC, 2 cores: 10.9 s against 2.1 at aug_way=512) | bf16 | fp32
    precision: str = "auto"
    threads: int = 2
    pool_limit: int = 0  # > 0: train on an evenly spaced subset of this many images (tests, quick checks)
    data: str = ""  # an unlabelled image folder (recursive png/jpg, any size) instead of the protocol's images
    data_workers: int = 4  # DataLoader worker processes reading --data images
    # encoder (EncoderConfig fields)
    backbone: str = "conv4"  # conv4 | resnet12
    width: int = 64
    depth: int = 4
    image_size: int = 0  # 0: the data's own size (28 for the shipped sets); else images are resized to it
    channels: int = 0  # 0: the data's own (1 for the shipped sets); 1 or 3 for --data folders
    pixel_mean: float = 0.13  # input normalisation inside the encoder (of x/255)
    pixel_std: float = 0.31
    channels_last: bool | None = None  # None: on CPU only (where it was measured faster)
    compile: bool = False  # torch.compile the encoder (in place: checkpoints are unchanged)
    # distributed: a step is this many independent episodes; with torchrun each rank computes
    # episodes_per_step / world_size of them. 0: one per process (fixed when the run starts).
    episodes_per_step: int = 0
    # stage 1: autoencoder pretraining
    ae_fraction: float = 0.05  # share of the time budget
    ae_steps: int = 0  # > 0 overrides ae_fraction with a fixed number of steps
    ae_batch: int = 256
    ae_lr: float = 2e-3
    denoise_rate: float = 0.2  # pixel dropout on the AE input (denoising autoencoder)
    # stage 3: ProtoNet on pseudo-tasks
    distance: str = "cosine"
    temperature: float = 5.0  # initial value when learned (cosine)
    lr: float = 2e-3
    weight_decay: float = 5e-4
    warmup: float = 0.03  # share of stage-3 progress with a linear LR ramp
    aug_way: int = 256  # augmentation tasks: ways (each an image) per step, 0 disables
    aug_shot: int = 1
    aug_query: int = 1
    cluster_way: int = 64  # clustering tasks: ways (clusters) per step, 0 disables
    cluster_shot: int = 1
    cluster_query: int = 1
    cluster_weight: float = 1.0
    cluster_ks: list[int] = field(default_factory=lambda: [800, 1200, 1600])
    cluster_start: float = 0.3  # progress at which the first partitions are built
    cluster_every: float = 0.1  # progress between re-clusterings; each refreshes one partition (round robin)
    cluster_pool: int = 30000  # k-means on at most this many images (a fresh random subset each time)
    recon_weight: float = 0.1  # joint reconstruction loss, on recon_batch clean images
    recon_batch: int = 64
    # MAML (recipe "maml")
    maml_way: int = 5
    maml_shot: int = 1
    maml_query: int = 5
    maml_tasks: int = 8
    maml_inner_steps: int = 3
    maml_inner_lr: float = 0.05
    maml_first_order: bool = False
    # bookkeeping
    log_every: int = 25
    val_every: float = 0.2  # progress between validation evaluations (labels of val characters)
    val_episodes: int = 200
    checkpoint_every_s: float = 300.0
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config fields: {', '.join(sorted(unknown))}")
        d = dict(d)
        if isinstance(d.get("augment"), dict):
            d["augment"] = augment_config(d["augment"])
        return cls(**d)


def augment_config(fields: dict) -> AugmentConfig:
    """An AugmentConfig from a dict (a saved config, or ``--set augment={...}``): the fields it
    names, the defaults for the rest."""
    aug = dict(fields)
    if "scale" in aug:
        aug["scale"] = tuple(aug["scale"])
    known = {f.name for f in dataclasses.fields(AugmentConfig)}
    if set(aug) - known:
        raise ValueError(f"unknown augment fields: {', '.join(sorted(set(aug) - known))}")
    return AugmentConfig(**aug)


def recipe_config(recipe: str, protocol: str = "omniglot-a", **overrides) -> TrainConfig:
    """The documented settings of each recipe; overrides win."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; known: {', '.join(RECIPES)}")
    base: dict = {"recipe": recipe, "protocol": protocol}
    if protocol == "mnist":
        # 10 classes of 6,000 images: few, large clusters.
        base.update(cluster_ks=[20, 40, 80], cluster_way=16, cluster_shot=2, cluster_query=2, cluster_pool=20000)
    if recipe == "autoencoder":
        base.update(ae_fraction=1.0)
    elif recipe == "cactus":
        # CACTUs-ProtoNets: k-means tasks on the frozen autoencoder embedding, no augmentation tasks.
        base.update(aug_way=0, cluster_start=0.0, cluster_every=2.0, cluster_way=20, cluster_shot=1,
                    cluster_query=5, distance="sqeuclidean", recon_weight=0.0,
                    cluster_ks=[500] * 5 if protocol != "mnist" else [10] * 5)
    elif recipe == "supervised":
        base.update(aug_way=0, cluster_way=60, cluster_shot=1, cluster_query=5, cluster_start=0.0,
                    cluster_every=2.0, recon_weight=0.0, ae_fraction=0.0)
    elif recipe == "maml":
        base.update(distance="sqeuclidean", recon_weight=0.0)
    elif recipe == "gpu":
        # The default recipe scaled for GPUs (written to the documented APIs, not run on a GPU here):
        # ResNet-12 at 84x84, bf16 autocast, channels-last, torch.compile; one episode per GPU per step.
        base.update(backbone="resnet12", image_size=84, channels_last=True, compile=True, precision="bf16",
                    aug_way=128, cluster_way=64, recon_batch=32, ae_batch=128)
    base.update(overrides)
    if isinstance(base.get("augment"), dict):
        base["augment"] = augment_config(base["augment"])
    return TrainConfig(**base)


def parse_duration(text: str) -> float:
    """'30m', '90s', '1h', '1h30m' or plain seconds -> seconds."""
    text = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", text)
    if not parts or "".join(f"{a}{b}" for a, b in parts) != text.replace(" ", ""):
        raise ValueError(f"cannot read duration {text!r}; use e.g. 30m, 90s, 1h30m")
    return sum(float(a) * {"h": 3600, "m": 60, "s": 1}[b] for a, b in parts)
