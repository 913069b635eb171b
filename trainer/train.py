"""The training run, top to bottom: data without labels, stage 1 (autoencoder), stage 3 (ProtoNet
on automatic pseudo-tasks, jointly with reconstruction; or MAML), checkpoints, metrics log.

Stage numbering follows the issue: stage 2 (pseudo-task construction) lives in pseudotasks.py and
is driven from inside stage 3, because the clustering tasks are rebuilt as the embedding improves.

Progress through a stage is step/steps when a step count is given (then a resumed run repeats an
uninterrupted one exactly) and otherwise the share of the time budget used, so `--time-budget`
ends the run on time whatever the machine's speed.
"""
from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from protoedge import datasets

from . import checkpoint as ckpt
from . import distributed
from .augment import apply_augmentation, draw_augmentation, rows_of
from .config import PROTONET_TASK_RECIPES, ConfigError, TrainConfig
from .data import FolderPool, TensorPool, resize_pixels
from .evaluate import embed, fewshot_table
from .model import Decoder, Encoder, EncoderConfig
from .protonet import ProtoHead
from .pseudotasks import ClusterTaskSampler, augmentation_episode, kmeans_partitions

FINAL_RESERVE_S = 10.0  # kept free at the end of the budget for the last checkpoint


# ----------------------------------------------------------------------------- data

def evenly_spaced(rows: np.ndarray, limit: int) -> np.ndarray:
    """At most limit rows, evenly spaced (cfg.pool_limit); all of them when limit is 0. The pool and
    the supervised baseline's labels both go through here, so they stay aligned."""
    if 0 < limit < len(rows):
        return rows[np.linspace(0, len(rows) - 1, limit).astype(np.int64)]
    return rows


def unlabelled_pool(protocol: str, limit: int = 0) -> tuple[torch.Tensor, str]:
    """Training images with their labels dropped, and the fingerprint recorded as provenance."""
    images = datasets.load_split(protocol, "train").images  # the labels are dropped right here
    images = evenly_spaced(images, limit)
    return torch.from_numpy(images), datasets.ImageSet(images, source=protocol).fingerprint()


def training_labels(protocol: str, limit: int = 0) -> np.ndarray:
    """Only the supervised ceiling baseline calls this (same subset rule as unlabelled_pool)."""
    return evenly_spaced(datasets.load_split(protocol, "train").labels, limit)


def validation_set(protocol: str) -> datasets.ImageSet | None:
    """Vinyals' validation characters (part of Protocol A's training images). Their labels are
    used for logging only, never for a gradient or for choosing the final checkpoint."""
    if protocol != "omniglot-a":
        return None
    data = datasets.load_split(protocol, "train")
    wanted = {line.strip() for line in open(datasets.data_dir() / "omniglot_splits/vinyals_val.txt") if line.strip()}
    keep = np.isin(np.array(data.class_names)[data.labels], sorted(wanted))
    return data.subset(keep)


def training_pool(cfg: TrainConfig) -> TensorPool | FolderPool:
    """cfg.data (a folder read lazily by worker processes) or the protocol's unlabelled images."""
    if cfg.data:
        return FolderPool(cfg.data, cfg.image_size, cfg.channels, cfg.data_workers)
    images, fingerprint = unlabelled_pool(cfg.protocol, cfg.pool_limit)
    if images.shape[1] != cfg.channels:
        raise ConfigError(f"{cfg.protocol} images have {images.shape[1]} channel(s), not channels={cfg.channels}")
    return TensorPool(images, fingerprint, cfg.image_size)


def native_bf16(device: torch.device) -> bool:
    """Whether the device computes bf16 in hardware, where autocast to it pays."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:  # oneDNN's own check (AVX512-BF16 or AMX); private, so a torch without it means no
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve(cfg: TrainConfig, world: int, device: torch.device | None = None) -> TrainConfig:
    """Fix the values that 0 or "auto" leave open when a run starts (saved in the checkpoint, so a
    resumed run keeps them whatever its number of processes)."""
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if native_bf16(device or torch.device("cpu")) else "fp32"
    elif precision not in ("bf16", "fp32"):
        raise ConfigError(f"precision must be auto, bf16 or fp32, not {precision!r}")
    cfg = dataclasses.replace(cfg, image_size=cfg.image_size or (84 if cfg.data else 28),
                              channels=cfg.channels or (3 if cfg.data else 1),
                              episodes_per_step=cfg.episodes_per_step or world, precision=precision)
    if cfg.episodes_per_step % world:
        raise ConfigError(f"episodes_per_step={cfg.episodes_per_step} does not split over {world} processes; "
                          f"use a multiple of {world} (--set episodes_per_step=N)")
    if world > 1 and cfg.recipe == "maml":
        raise ConfigError("the maml recipe runs in one process (torch.func's vmap is not wrapped in DDP)")
    if cfg.data and cfg.recipe in ("maml", "supervised"):
        raise ConfigError(f"the {cfg.recipe} recipe needs the shipped data (in memory, labelled for supervised)")
    return cfg


def code_version() -> str:
    """The commit the trainer code came from, '+modified' when trainer/ differs from it.
    Taken when the run starts: the code a process runs is the code it loaded."""
    here = Path(__file__).parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=here, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], capture_output=True, text=True,
                               cwd=here, timeout=5).stdout.strip()
        return (head + ("+modified" if dirty else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ----------------------------------------------------------------------------- run state

class Run:
    """Everything that a checkpoint must hold to continue exactly where it stopped."""

    def __init__(self, cfg: TrainConfig, device: torch.device):
        self.cfg = cfg
        self.device = device
        self.encoder = Encoder(EncoderConfig(
            in_channels=cfg.channels or 1, input_size=cfg.image_size or 28, width=cfg.width, depth=cfg.depth,
            backbone=cfg.backbone, pixel_mean=cfg.pixel_mean, pixel_std=cfg.pixel_std)).to(device)
        self.decoder = Decoder(self.encoder).to(device)
        self.head = ProtoHead(cfg.distance, cfg.temperature).to(device)
        # Default: on CPU only (measured 1.8x faster for Conv4 on this CPU with oneDNN); the gpu recipe sets it.
        if cfg.channels_last or (cfg.channels_last is None and device.type == "cpu"):
            for m in (self.encoder, self.decoder):
                m.to(memory_format=torch.channels_last)
        params = [*self.encoder.parameters(), *self.decoder.parameters(), *self.head.parameters()]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.gen = torch.Generator(device=device).manual_seed(cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)
        self.stage = "autoencoder"
        self.step = 0  # within the current stage
        self.total_steps = 0
        self.elapsed = 0.0  # seconds of training so far, over all sessions
        self.stage_start = 0.0  # elapsed when the current stage began
        self.partitions: list[np.ndarray] = []
        self.code_version = code_version()
        self.next_cluster = cfg.cluster_start
        self.refreshes = 0  # k-means refreshes so far (picks the partition to rebuild next)
        self.next_val = cfg.val_every

    def save(self, path: Path, extra_meta: dict | None = None) -> Path:
        tensors = {f"decoder.{k}": v for k, v in self.decoder.state_dict().items()}
        tensors.update({f"head.{k}": v for k, v in self.head.state_dict().items()})
        optim, groups = ckpt.optimizer_tensors(self.optimizer)
        tensors.update(optim)
        tensors["rng.torch"] = self.gen.get_state()
        for i, p in enumerate(self.partitions):
            tensors[f"partition.{i}"] = torch.from_numpy(p)
        meta = {
            "distance": self.cfg.distance,
            "temperature": self.head.temperature if self.cfg.distance == "cosine" else 1.0,
            "temperature_definition": "logits = -temperature * squared Euclidean distance "
                                      "(on L2-normalised embeddings when distance is cosine)",
            "config": self.cfg.to_dict(),
            "code_version": self.code_version,
            "state": {"stage": self.stage, "step": self.step, "total_steps": self.total_steps,
                      "elapsed": self.elapsed, "stage_start": self.stage_start,
                      "next_cluster": self.next_cluster, "next_val": self.next_val, "refreshes": self.refreshes,
                      "n_partitions": len(self.partitions), "optimizer_groups": groups,
                      "numpy_rng": ckpt.numpy_rng_state(self.rng)},
            **(extra_meta or {}),
        }
        return ckpt.save_checkpoint(path, self.encoder, meta, tensors)

    def load(self, path: Path) -> dict:
        tensors, meta = ckpt.load_checkpoint(path)
        part = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        self.encoder.load_state_dict(part("encoder."))
        self.decoder.load_state_dict(part("decoder."))
        self.head.load_state_dict(part("head."))
        s = meta.get("state")
        if s is None:
            raise ckpt.CheckpointError(f"{path}: holds no training state (an exported or stripped checkpoint)")
        ckpt.restore_optimizer(self.optimizer, tensors, s["optimizer_groups"])
        self.gen.set_state(tensors["rng.torch"])
        ckpt.restore_numpy_rng(self.rng, s["numpy_rng"])
        self.partitions = [tensors[f"partition.{i}"].numpy() for i in range(s["n_partitions"])]
        for key in ("stage", "step", "total_steps", "elapsed", "stage_start", "next_cluster", "next_val", "refreshes"):
            setattr(self, key, s[key])
        return meta


# ----------------------------------------------------------------------------- schedules

def cosine_lr(base: float, progress: float, warmup: float) -> float:
    if progress < warmup:
        return base * (progress + 1e-3) / warmup
    t = (progress - warmup) / max(1 - warmup, 1e-8)
    return base * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# ----------------------------------------------------------------------------- one step

def denoise_masks(run: Run, n: int, shape: tuple) -> torch.Tensor:
    """Pixel-dropout masks of the denoising autoencoder for n images (True: the pixel is kept)."""
    return torch.rand((n, *shape), generator=run.gen, device=run.device) >= run.cfg.denoise_rate


def reconstruction_loss(run: Run, clean: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Denoising autoencoder: reconstruct the clean image (as x/255) from a pixel-dropout copy."""
    noisy = clean.float() * keep
    logits = run.decoder(run.encoder(noisy.contiguous(memory_format=torch.channels_last)))
    return F.binary_cross_entropy_with_logits(logits.float(), clean.float() / 255.0)


def draw_step(run: Run, pool, sampler: ClusterTaskSampler | None) -> dict:
    """All episodes of one meta step: which images (numpy generator), which augmentations and
    denoising masks (torch generator). Every rank draws the whole step in the same order, so the
    generators stay equal everywhere and the step does not depend on the number of ranks; with one
    episode per step this is the draw order of the single-process trainer."""
    cfg, rng = run.cfg, run.rng
    episodes = []
    for _ in range(cfg.episodes_per_step):
        tasks = []
        if cfg.aug_way:
            idx = augmentation_episode(len(pool), cfg.aug_way, rng)
            tasks.append(("aug", cfg.aug_way, cfg.aug_shot, cfg.aug_query,
                          np.repeat(idx[:, None], cfg.aug_shot + cfg.aug_query, 1)))
        if sampler is not None and cfg.cluster_way:
            s_idx, q_idx = sampler.episode(cfg.cluster_way, cfg.cluster_shot, cfg.cluster_query, rng)
            tasks.append(("cluster", cfg.cluster_way, cfg.cluster_shot, cfg.cluster_query,
                          np.concatenate([s_idx, q_idx], 1)))
        recon = rng.choice(len(pool), cfg.recon_batch, replace=False) if cfg.recon_weight > 0 else None
        episodes.append({"tasks": tasks, "recon": recon})
    n_views = sum(t[4].size for t in episodes[0]["tasks"])
    views = draw_augmentation(n_views * len(episodes), pool.shape, cfg.augment, run.gen, run.device)
    keep = denoise_masks(run, cfg.recon_batch * len(episodes), pool.shape) if cfg.recon_weight > 0 else None
    return {"episodes": episodes, "n_views": n_views, "views": views, "keep": keep}


def my_episodes(run: Run, pool, step: dict, dist: distributed.Dist) -> list[dict]:
    """This rank's contiguous block of the step's episodes, read and augmented (only these)."""
    per_rank = run.cfg.episodes_per_step // dist.world
    n, b = step["n_views"], run.cfg.recon_batch
    out = []
    for e in range(dist.rank * per_rank, (dist.rank + 1) * per_rank):
        ep = step["episodes"][e]
        index = np.concatenate([t[4].reshape(-1) for t in ep["tasks"]])
        views = apply_augmentation(pool.take(index).to(run.device), rows_of(step["views"], slice(e * n, (e + 1) * n)))
        item = {"tasks": [t[:4] for t in ep["tasks"]], "views": views}
        if ep["recon"] is not None:
            item["clean"] = pool.take(ep["recon"]).to(run.device)
            item["keep"] = step["keep"][e * b:(e + 1) * b]
        out.append(item)
    return out


class EpisodeLoss(torch.nn.Module):
    """Encoder, decoder and head as one module, so DistributedDataParallel averages the gradients
    of all three; forward: the mean loss over the episodes given (this rank's share of the step)."""

    def __init__(self, run: Run):
        super().__init__()
        self.run = [run]  # a list: not a sub-module
        self.encoder, self.head = run.encoder, run.head
        self.decoder = run.decoder if run.cfg.recon_weight > 0 else None

    def forward(self, episodes: list[dict]) -> tuple[torch.Tensor, dict]:
        run, cfg = self.run[0], self.run[0].cfg
        total, logs = 0.0, {}
        for ep in episodes:  # one encoder pass per episode: BatchNorm sees one episode's views
            z = run.encoder(ep["views"].contiguous(memory_format=torch.channels_last)).float()
            loss, offset = 0.0, 0
            for name, way, shot, query in ep["tasks"]:
                zz = z[offset:offset + way * (shot + query)].view(way, shot + query, -1)
                offset += way * (shot + query)
                support, queries = zz[:, :shot], zz[:, shot:]
                part, acc = run.head.loss(support, queries)
                if shot == query:  # symmetric: each side is the other's support too (both views are equal)
                    part_b, _ = run.head.loss(queries, support)
                    part = (part + part_b) / 2
                loss = loss + (cfg.cluster_weight if name == "cluster" else 1.0) * part
                logs[f"loss_{name}"] = logs.get(f"loss_{name}", 0.0) + float(part.detach()) / len(episodes)
                logs[f"acc_{name}"] = logs.get(f"acc_{name}", 0.0) + float(acc) / len(episodes)
            if "clean" in ep:
                rec = reconstruction_loss(run, ep["clean"], ep["keep"])
                loss = loss + cfg.recon_weight * rec
                logs["loss_recon"] = logs.get("loss_recon", 0.0) + float(rec.detach()) / len(episodes)
            total = total + loss / len(episodes)
        return total, logs


class AutoencoderLoss(torch.nn.Module):
    """Stage 1's module for DDP: the mean reconstruction loss over this rank's batches."""

    def __init__(self, run: Run):
        super().__init__()
        self.run = [run]
        self.encoder, self.decoder = run.encoder, run.decoder

    def forward(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        return sum(reconstruction_loss(self.run[0], clean, keep) for clean, keep in batches) / len(batches)


# ----------------------------------------------------------------------------- stage 2: clustering tasks

def refresh_partitions(run: Run, pool, dist: distributed.Dist) -> None:
    """First call: every partition of cfg.cluster_ks. Later calls: only the oldest one, on the
    current embedding, so the tasks follow the embedding at a third of the k-means cost.
    k-means sees a random subset of at most cfg.cluster_pool images (any folder size); images
    outside it get id -1 and are not used by clustering tasks. Every rank draws the subset and the
    seed (the generators stay equal); rank 0 alone embeds and clusters, and broadcasts the ids."""
    cfg = run.cfg
    subset = np.sort(run.rng.choice(len(pool), min(cfg.cluster_pool, len(pool)), replace=False))
    seed = int(run.rng.integers(2**31))
    z = embed(run.encoder, pool.take(subset), device=run.device) if dist.main else None
    if len(run.partitions) != len(cfg.cluster_ks):
        slots = list(range(len(cfg.cluster_ks)))
    else:
        slots = [run.refreshes % len(cfg.cluster_ks)]
    for slot in slots:
        ids = np.full(len(pool), -1, np.int64)
        if dist.main:
            ids[subset] = kmeans_partitions(z, [cfg.cluster_ks[slot]], seed + slot, rescale_from=0 if slot else 1)[0]
        ids = dist.broadcast_ids(ids)
        if slot < len(run.partitions):
            run.partitions[slot] = ids
        else:
            run.partitions.append(ids)
    run.refreshes += 1


# ----------------------------------------------------------------------------- the run

def train(cfg: TrainConfig, out_dir: str | Path, resume: str | Path | None = None,
          progress: bool = True, stop_at_step: int | None = None) -> Path:
    """Train, writing out_dir/{config.json, metrics.jsonl, checkpoint.safetensors}; returns the checkpoint.

    stop_at_step ends this session after that meta step with a resumable checkpoint (a run split
    into sessions; `resume` continues it). Under torchrun every rank calls this; rank 0 writes."""
    out = Path(out_dir)
    torch.set_num_threads(cfg.threads)
    dist = distributed.setup(cfg.device)  # torchrun: the process group and this rank's device
    device = dist.device
    cfg = resolve(cfg, dist.world, device)
    torch.manual_seed(cfg.seed)
    run = Run(cfg, device)
    if resume:
        run.load(Path(resume))
    if cfg.compile:
        run.encoder.compile()  # in place: the state dict (and so the checkpoint) keeps its names
    pool = training_pool(cfg)
    val = validation_set(cfg.protocol) if not cfg.data and dist.main else None
    val_images = resize_pixels(val.images, cfg.image_size) if val is not None else None
    log_file = None
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        log_file = open(out / "metrics.jsonl", "a")
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.precision == "bf16" else nullcontext())
    session_start, last_save = time.time(), time.time()
    base_elapsed = run.elapsed
    budget = cfg.time_budget_s
    per_rank = cfg.episodes_per_step // dist.world
    norms = distributed.batchnorms(run.encoder, run.decoder)
    progress = progress and dist.main

    def now() -> float:
        return base_elapsed + time.time() - session_start

    def log(record: dict) -> None:
        if log_file is not None:
            log_file.write(json.dumps({"stage": run.stage, "step": run.step, "elapsed": round(now(), 2), **record}) + "\n")
            log_file.flush()

    def checkpoint(path: Path, **meta) -> Path:
        run.elapsed = now()
        if dist.main:
            run.save(path, {"data_fingerprint": pool.fingerprint, "world_size": dist.world, **meta})
        return path

    def finish(path: Path) -> Path:
        if log_file is not None:
            log_file.close()
        dist.barrier()  # the other ranks return once rank 0's checkpoint is written
        dist.close()
        return path

    def validate() -> dict:
        if val is None:
            return {}
        z = embed(run.encoder, val_images, device=device)
        table = fewshot_table(z, val.labels, cfg.distance, settings=((5, 1), (20, 1)),
                              episodes=cfg.val_episodes, seed=1)
        return {f"val_{k}": round(v["acc"], 2) for k, v in table.items()}

    # --- stage 1: autoencoder pretraining ---------------------------------------------------
    ae_budget = budget * cfg.ae_fraction
    if run.stage == "autoencoder" and (cfg.ae_steps or ae_budget > 0):
        run.total_steps = cfg.ae_steps
        model = dist.wrap(AutoencoderLoss(run))
        bar = tqdm(desc="stage 1 autoencoder", total=cfg.ae_steps or None, disable=not progress, initial=run.step)
        while True:
            done = (run.step >= cfg.ae_steps) if cfg.ae_steps else (now() - run.stage_start >= ae_budget)
            done, = dist.agree(float(done or now() >= budget - FINAL_RESERVE_S))  # rank 0's clock decides
            if done:
                break
            set_lr(run.optimizer, cfg.ae_lr)
            # The step's batches (one per episode) and their masks, drawn alike on every rank.
            index = [run.rng.choice(len(pool), cfg.ae_batch, replace=False) for _ in range(cfg.episodes_per_step)]
            keep = denoise_masks(run, cfg.ae_batch * cfg.episodes_per_step, pool.shape).split(cfg.ae_batch)
            mine = range(dist.rank * per_rank, (dist.rank + 1) * per_rank)
            before = distributed.batchnorm_snapshot(norms) if dist.active else None
            with amp:
                loss = model([(pool.take(index[e]).to(device), keep[e]) for e in mine])
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()  # DDP: gradients averaged over ranks
            run.optimizer.step()
            distributed.merge_batchnorm_statistics(dist, norms, before)
            run.step += 1
            bar.update(1)
            if run.step % cfg.log_every == 0:
                loss_value = dist.mean({"loss_recon": float(loss.detach())})["loss_recon"]
                log({"loss_recon": round(loss_value, 5)})
                bar.set_postfix(loss=f"{loss_value:.4f}")
            if time.time() - last_save > cfg.checkpoint_every_s:
                checkpoint(out / "checkpoint.safetensors")
                last_save = time.time()
        bar.close()
        log({"event": "stage_end", **validate()})
    if run.stage == "autoencoder":
        run.stage, run.step, run.stage_start = "meta", 0, now()
        run.next_cluster, run.next_val = cfg.cluster_start, cfg.val_every
        if cfg.recipe == "autoencoder":
            run.stage = "done"
        checkpoint(out / "stage1_autoencoder.safetensors")

    # --- stage 3: meta-learning on pseudo-tasks (stage 2 builds them as it goes) -------------
    if cfg.recipe == "maml" and run.stage == "meta":
        from .maml import MamlTrainer
        maml = MamlTrainer(run, pool.images)
    sampler = None
    if cfg.recipe == "supervised":
        run.partitions = [training_labels(cfg.protocol, cfg.pool_limit)]  # the ceiling: the true classes as tasks
    if run.partitions:
        sampler = ClusterTaskSampler(run.partitions, cfg.cluster_shot + cfg.cluster_query)
    model = dist.wrap(EpisodeLoss(run)) if run.stage == "meta" and cfg.recipe != "maml" else None
    meta_budget = budget - run.stage_start - FINAL_RESERVE_S
    bar = tqdm(desc=f"stage 3 {cfg.recipe}", total=cfg.steps or None, disable=not progress, initial=run.step)
    while run.stage == "meta":
        prog = run.step / cfg.steps if cfg.steps else (now() - run.stage_start) / max(meta_budget, 1e-6)
        prog, stop = dist.agree(prog, float(prog >= 1.0 or now() >= budget - FINAL_RESERVE_S))  # rank 0's clock
        if stop:
            break
        if stop_at_step is not None and run.step >= stop_at_step:
            bar.close()
            log({"event": "session_end"})
            return finish(checkpoint(out / "checkpoint.safetensors"))
        if cfg.recipe in PROTONET_TASK_RECIPES and cfg.cluster_way and prog >= run.next_cluster:
            t0 = time.time()
            refresh_partitions(run, pool, dist)
            sampler = ClusterTaskSampler(run.partitions, cfg.cluster_shot + cfg.cluster_query)
            while run.next_cluster <= prog:
                run.next_cluster += cfg.cluster_every
            log({"event": "recluster", "seconds": round(time.time() - t0, 1),
                 "usable_clusters": sampler.usable_clusters()})
        set_lr(run.optimizer, cosine_lr(cfg.lr, prog, cfg.warmup))
        before = distributed.batchnorm_snapshot(norms) if dist.active else None
        with amp:
            if cfg.recipe == "maml":
                loss, logs = maml.step_loss()
            else:
                step = draw_step(run, pool, sampler)  # the whole step, drawn alike on every rank
                loss, logs = model(my_episodes(run, pool, step, dist))  # this rank's episodes only
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DDP: gradients averaged over ranks = the gradient of the mean over all episodes
        torch.nn.utils.clip_grad_norm_(run.encoder.parameters(), 5.0)
        run.optimizer.step()
        distributed.merge_batchnorm_statistics(dist, norms, before)
        run.step += 1
        bar.update(1)
        if run.step % cfg.log_every == 0:
            logs = dist.mean({"loss": float(loss.detach()), **logs})  # over ranks: the whole step's episodes
            loss_value = logs.pop("loss")
            log({"loss": round(loss_value, 4), "lr": round(run.optimizer.param_groups[0]["lr"], 6),
                 "temperature": round(run.head.temperature, 3), **{k: round(v, 4) for k, v in logs.items()}})
            bar.set_postfix(loss=f"{loss_value:.3f}", t=f"{run.head.temperature:.1f}")
        if prog >= run.next_val:
            while run.next_val <= prog:  # a slow step (k-means) may jump over several marks: one validation
                run.next_val += cfg.val_every
            scores = validate()
            if scores:
                log({"event": "validation", **scores})
                bar.set_postfix(**scores)
        if time.time() - last_save > cfg.checkpoint_every_s:
            checkpoint(out / "checkpoint.safetensors")
            last_save = time.time()
    bar.close()
    if cfg.recipe == "maml" and run.stage == "meta":
        maml.recalibrate_batchnorm()
    final_val = validate()
    log({"event": "end", **final_val})
    run.stage = "done"
    path = checkpoint(out / "checkpoint.safetensors", metrics={"training": final_val, "seconds": round(now(), 1)})
    return finish(path)
