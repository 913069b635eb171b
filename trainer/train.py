"""The training run, top to bottom: data without labels, stage 1 (autoencoder), stage 3 (ProtoNet
on automatic pseudo-tasks, jointly with reconstruction; or MAML), checkpoints, metrics log.

Stage numbering follows the issue: stage 2 (pseudo-task construction) lives in pseudotasks.py and
is driven from inside stage 3, because the clustering tasks are rebuilt as the embedding improves.

Progress through a stage is step/steps when a step count is given (then a resumed run repeats an
uninterrupted one exactly) and otherwise the share of the time budget used, so `--time-budget`
ends the run on time whatever the machine's speed.
"""
from __future__ import annotations

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
from .augment import augment
from .config import TrainConfig
from .evaluate import embed, fewshot_table
from .model import Decoder, Encoder, EncoderConfig
from .protonet import ProtoHead
from .pseudotasks import ClusterTaskSampler, augmentation_episode, kmeans_partitions

FINAL_RESERVE_S = 10.0  # kept free at the end of the budget for the last checkpoint


# ----------------------------------------------------------------------------- data

def unlabelled_pool(protocol: str, limit: int = 0) -> tuple[torch.Tensor, str]:
    """Training images with their labels dropped, and the fingerprint recorded as provenance."""
    images = datasets.load_split(protocol, "train").images  # the labels are dropped right here
    if 0 < limit < len(images):
        images = images[np.linspace(0, len(images) - 1, limit).astype(np.int64)]
    return torch.from_numpy(images), datasets.ImageSet(images, source=protocol).fingerprint()


def training_labels(protocol: str, limit: int = 0) -> np.ndarray:
    """Only the supervised ceiling baseline calls this (same subset rule as unlabelled_pool)."""
    labels = datasets.load_split(protocol, "train").labels
    if 0 < limit < len(labels):
        labels = labels[np.linspace(0, len(labels) - 1, limit).astype(np.int64)]
    return labels


def validation_set(protocol: str) -> datasets.ImageSet | None:
    """Vinyals' validation characters (part of Protocol A's training images). Their labels are
    used for logging only, never for a gradient or for choosing the final checkpoint."""
    if protocol != "omniglot-a":
        return None
    data = datasets.load_split(protocol, "train")
    wanted = {line.strip() for line in open(datasets.data_dir() / "omniglot_splits/vinyals_val.txt") if line.strip()}
    keep = np.isin(np.array(data.class_names)[data.labels], sorted(wanted))
    return data.subset(keep)


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
        self.encoder = Encoder(EncoderConfig(width=cfg.width, depth=cfg.depth)).to(device)
        self.decoder = Decoder(self.encoder).to(device)
        self.head = ProtoHead(cfg.distance, cfg.temperature).to(device)
        if device.type == "cpu":  # measured 1.8x faster for Conv4 on this CPU (oneDNN)
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


# ----------------------------------------------------------------------------- losses of one step

def reconstruction_loss(run: Run, clean: torch.Tensor) -> torch.Tensor:
    """Denoising autoencoder: reconstruct the clean image (as x/255) from a pixel-dropout copy."""
    keep = torch.rand(clean.shape, generator=run.gen, device=clean.device) >= run.cfg.denoise_rate
    noisy = clean.float() * keep
    logits = run.decoder(run.encoder(noisy.contiguous(memory_format=torch.channels_last)))
    return F.binary_cross_entropy_with_logits(logits.float(), clean.float() / 255.0)


def protonet_step_loss(run: Run, pool: torch.Tensor, sampler: ClusterTaskSampler | None) -> tuple[torch.Tensor, dict]:
    """One forward pass over every view of this step's pseudo-tasks, then the episode losses."""
    cfg, rng = run.cfg, run.rng
    batches, logs = [], {}
    if cfg.aug_way:
        idx = augmentation_episode(len(pool), cfg.aug_way, rng)
        batches.append(("aug", cfg.aug_way, cfg.aug_shot, cfg.aug_query,
                        np.repeat(idx[:, None], cfg.aug_shot + cfg.aug_query, 1)))
    if sampler is not None and cfg.cluster_way:
        s_idx, q_idx = sampler.episode(cfg.cluster_way, cfg.cluster_shot, cfg.cluster_query, rng)
        batches.append(("cluster", cfg.cluster_way, cfg.cluster_shot, cfg.cluster_query,
                        np.concatenate([s_idx, q_idx], 1)))
    recon_idx = rng.choice(len(pool), cfg.recon_batch, replace=False) if cfg.recon_weight > 0 else None

    index = np.concatenate([b[4].reshape(-1) for b in batches])
    views = augment(pool[torch.from_numpy(index)].to(run.device), cfg.augment, run.gen)
    z = run.encoder(views.contiguous(memory_format=torch.channels_last)).float()

    loss, offset = 0.0, 0
    for name, way, shot, query, idx in batches:
        zz = z[offset:offset + idx.size].view(way, shot + query, -1)
        offset += idx.size
        support, queries = zz[:, :shot], zz[:, shot:]
        part, acc = run.head.loss(support, queries)
        if shot == query:  # symmetric: each side is the other's support too (both views are equal)
            part_b, _ = run.head.loss(queries, support)
            part = (part + part_b) / 2
        loss = loss + (cfg.cluster_weight if name == "cluster" else 1.0) * part
        logs[f"loss_{name}"], logs[f"acc_{name}"] = float(part.detach()), float(acc)
    if recon_idx is not None:
        rec = reconstruction_loss(run, pool[torch.from_numpy(recon_idx)].to(run.device))
        loss = loss + cfg.recon_weight * rec
        logs["loss_recon"] = float(rec.detach())
    return loss, logs


# ----------------------------------------------------------------------------- stage 2: clustering tasks

def refresh_partitions(run: Run, pool: torch.Tensor) -> None:
    """First call: every partition of cfg.cluster_ks. Later calls: only the oldest one, on the
    current embedding, so the tasks follow the embedding at a third of the k-means cost."""
    cfg = run.cfg
    subset = np.sort(run.rng.choice(len(pool), min(cfg.cluster_pool, len(pool)), replace=False))
    z = embed(run.encoder, pool[torch.from_numpy(subset)], device=run.device)
    seed = int(run.rng.integers(2**31))
    if len(run.partitions) != len(cfg.cluster_ks):
        slots = list(range(len(cfg.cluster_ks)))
    else:
        slots = [run.refreshes % len(cfg.cluster_ks)]
    for slot in slots:
        ids = np.full(len(pool), -1, np.int64)
        ids[subset] = kmeans_partitions(z, [cfg.cluster_ks[slot]], seed + slot, rescale_from=0 if slot else 1)[0]
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
    into sessions; `resume` continues it)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if cfg.device == "auto" else cfg.device))
    torch.manual_seed(cfg.seed)
    run = Run(cfg, device)
    if resume:
        run.load(Path(resume))
    pool, fingerprint = unlabelled_pool(cfg.protocol, cfg.pool_limit)
    val = validation_set(cfg.protocol)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    log_file = open(out / "metrics.jsonl", "a")
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.precision == "bf16" else nullcontext())
    session_start, last_save = time.time(), time.time()
    base_elapsed = run.elapsed
    budget = cfg.time_budget_s

    def now() -> float:
        return base_elapsed + time.time() - session_start

    def log(record: dict) -> None:
        log_file.write(json.dumps({"stage": run.stage, "step": run.step, "elapsed": round(now(), 2), **record}) + "\n")
        log_file.flush()

    def checkpoint(path: Path, **meta) -> Path:
        run.elapsed = now()
        return run.save(path, {"data_fingerprint": fingerprint, **meta})

    def validate() -> dict:
        if val is None:
            return {}
        z = embed(run.encoder, val.images, device=device)
        table = fewshot_table(z, val.labels, cfg.distance, settings=((5, 1), (20, 1)),
                              episodes=cfg.val_episodes, seed=1)
        return {f"val_{k}": round(v["acc"], 2) for k, v in table.items()}

    # --- stage 1: autoencoder pretraining ---------------------------------------------------
    ae_budget = budget * cfg.ae_fraction
    if run.stage == "autoencoder" and (cfg.ae_steps or ae_budget > 0):
        run.total_steps = cfg.ae_steps
        bar = tqdm(desc="stage 1 autoencoder", total=cfg.ae_steps or None, disable=not progress, initial=run.step)
        while True:
            done = (run.step >= cfg.ae_steps) if cfg.ae_steps else (now() - run.stage_start >= ae_budget)
            if done or now() >= budget - FINAL_RESERVE_S:
                break
            set_lr(run.optimizer, cfg.ae_lr)
            idx = torch.from_numpy(run.rng.choice(len(pool), cfg.ae_batch, replace=False))
            with amp:
                loss = reconstruction_loss(run, pool[idx].to(device))
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            run.optimizer.step()
            run.step += 1
            bar.update(1)
            if run.step % cfg.log_every == 0:
                log({"loss_recon": round(float(loss.detach()), 5)})
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
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
        maml = MamlTrainer(run, pool)
    sampler = None
    if cfg.recipe == "supervised":
        run.partitions = [training_labels(cfg.protocol, cfg.pool_limit)]  # the ceiling: the true classes as tasks
    if run.partitions:
        sampler = ClusterTaskSampler(run.partitions, cfg.cluster_shot + cfg.cluster_query)
    meta_budget = budget - run.stage_start - FINAL_RESERVE_S
    bar = tqdm(desc=f"stage 3 {cfg.recipe}", total=cfg.steps or None, disable=not progress, initial=run.step)
    while run.stage == "meta":
        prog = run.step / cfg.steps if cfg.steps else (now() - run.stage_start) / max(meta_budget, 1e-6)
        if prog >= 1.0 or now() >= budget - FINAL_RESERVE_S:
            break
        if stop_at_step is not None and run.step >= stop_at_step:
            bar.close()
            log({"event": "session_end"})
            path = checkpoint(out / "checkpoint.safetensors")
            log_file.close()
            return path
        if cfg.recipe in ("default", "cactus") and cfg.cluster_way and prog >= run.next_cluster:
            t0 = time.time()
            refresh_partitions(run, pool)
            sampler = ClusterTaskSampler(run.partitions, cfg.cluster_shot + cfg.cluster_query)
            while run.next_cluster <= prog:
                run.next_cluster += cfg.cluster_every
            log({"event": "recluster", "seconds": round(time.time() - t0, 1),
                 "usable_clusters": sampler.usable_clusters()})
        set_lr(run.optimizer, cosine_lr(cfg.lr, prog, cfg.warmup))
        with amp:
            if cfg.recipe == "maml":
                loss, logs = maml.step_loss()
            else:
                loss, logs = protonet_step_loss(run, pool, sampler)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(run.encoder.parameters(), 5.0)
        run.optimizer.step()
        run.step += 1
        bar.update(1)
        if run.step % cfg.log_every == 0:
            log({"loss": round(float(loss.detach()), 4), "lr": round(run.optimizer.param_groups[0]["lr"], 6),
                 "temperature": round(run.head.temperature, 3), **{k: round(v, 4) for k, v in logs.items()}})
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", t=f"{run.head.temperature:.1f}")
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
    log_file.close()
    return path
