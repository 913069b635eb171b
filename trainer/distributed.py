"""Data-parallel training under torchrun with PyTorch's DistributedDataParallel: the few pieces
train.py needs, and nothing when the run is a single process.

How a step is split (see train.py: draw_step / my_episodes): a step is cfg.episodes_per_step
independent episodes. Every rank draws the whole step from the same generators in the same order
(the run's numpy and torch generators are seeded alike and stay equal on all ranks), then computes
the loss of its own contiguous block of episodes only. Each episode goes through the encoder on its
own (so BatchNorm sees the same batch whatever the number of ranks), the rank's loss is the mean over
its block, and DDP averages gradients over ranks: the averaged gradient is the single-process
gradient of the mean over all episodes. BatchNorm running statistics are merged exactly after each
step (merge_batchnorm_statistics), so a W-rank run computes the same model as a 1-process run
with the same episodes_per_step, up to floating-point rounding.

Rank 0 alone logs, validates, clusters (the result is broadcast as an int64 tensor, no pickle) and
writes checkpoints; decisions that depend on the clock (stop, re-cluster, validate, the learning
rate under a time budget) are rank 0's, broadcast every step, so ranks never disagree and deadlock.
"""
from __future__ import annotations

import datetime
import inspect
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as td
from torch import nn
from torch.nn.parallel import DistributedDataParallel

TIMEOUT = datetime.timedelta(hours=2)  # rank 0 may run k-means or validation while the others wait


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def wrap(self, module: nn.Module) -> nn.Module:
        """DDP around a module whose forward returns this rank's loss; the module itself when alone.
        Buffers are not broadcast: merge_batchnorm_statistics keeps them equal, exactly."""
        if not self.active:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:  # newer torch
            return DistributedDataParallel(module, device_ids=ids, forward_sync_buffers=False)
        return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)

    def agree(self, *values: float) -> list[float]:
        """Rank 0's values on every rank (clock-based decisions)."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        td.broadcast(t, src=0)
        return t.tolist()

    def broadcast_ids(self, ids: np.ndarray) -> np.ndarray:
        """Rank 0's int64 array (same length everywhere) on every rank."""
        if not self.active:
            return ids
        t = torch.from_numpy(np.ascontiguousarray(ids, np.int64)).to(self.device)
        td.broadcast(t, src=0)
        return t.cpu().numpy()

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """The average over ranks of per-rank numbers with the same keys (for the log)."""
        if not self.active or not values:
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        td.all_reduce(t)
        return {k: v / self.world for k, v in zip(keys, t.tolist())}

    def barrier(self) -> None:
        if self.active:
            td.barrier()

    def close(self) -> None:
        if self.owns_group:
            td.destroy_process_group()
            self.owns_group = False


def setup(device: str) -> Dist:
    """Single process unless torchrun set WORLD_SIZE > 1: then the process group (nccl on CUDA,
    gloo on CPU, rendezvous from torchrun's environment) and this rank's device."""
    if not launched_by_torchrun():
        dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available()
                           else ("cpu" if device == "auto" else device))
        return Dist(device=dev)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dev = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    owns = not td.is_initialized()
    if owns:
        td.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    return Dist(rank=td.get_rank(), world=td.get_world_size(), device=dev, owns_group=owns)


# ----------------------------------------------------------------------------- BatchNorm statistics

def batchnorms(*modules: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for mod in modules for m in mod.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def batchnorm_snapshot(norms) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    return [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in norms]


@torch.no_grad()
def merge_batchnorm_statistics(dist: Dist, norms, before) -> None:
    """Running statistics as if one process had made every rank's BatchNorm updates in rank order.

    With momentum m, a rank that made d updates from r0 holds (1-m)^d r0 + S_rank; one process making
    all ranks' updates in order holds (1-m)^(dW) r0 + sum_rank (1-m)^(d (W-1-rank)) S_rank. Each rank
    contributes its weighted S to one all-reduce (sum)."""
    if not dist.active or not norms:
        return
    flat, plans = [], []
    for m, (mean0, var0, n0) in zip(norms, before):
        if m.momentum is None:
            raise ValueError("merging cumulative-average BatchNorm statistics is not supported")
        d = int(m.num_batches_tracked - n0)  # this rank's updates (the same on every rank)
        decay = 1.0 - m.momentum
        weight = decay ** (d * (dist.world - 1 - dist.rank))
        flat += [weight * (m.running_mean - decay ** d * mean0), weight * (m.running_var - decay ** d * var0)]
        plans.append((m, mean0, var0, n0, decay ** (d * dist.world), d * dist.world))
    sizes = [t.numel() for t in flat]
    total = torch.cat([t.reshape(-1).float() for t in flat])
    td.all_reduce(total)
    parts = iter(total.split(sizes))
    for m, mean0, var0, n0, keep, updates in plans:
        m.running_mean.copy_(keep * mean0 + next(parts).view_as(mean0))
        m.running_var.copy_(keep * var0 + next(parts).view_as(var0))
        m.num_batches_tracked.copy_(n0 + updates)
