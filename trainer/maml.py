"""MAML (Finn et al. 2017) as an alternative meta-objective for the same encoder, with torch.func.

Tasks are UMTRA-style augmentation tasks (each image its own class). The classifier head of every
task starts from that task's prototypes (Proto-MAML, Triantafillou et al. 2020: W = 2c, b = -|c|^2,
which equals a ProtoNet with squared Euclidean distance), so no extra parameters are meta-learned
and a 0-step adaptation is exactly the ProtoNet used at test time.

Inner loop: torch.func.grad on a functional_call of the encoder; second order by default (the
outer gradient flows through the inner updates), first order with --set maml_first_order=true.
Tasks of a meta-batch run under torch.func.vmap, in fp32 (vmap and bf16 autocast do not mix).

BatchNorm policy (explicit, because vmap cannot update running statistics in place):
  - meta-training: every forward, inner and outer, normalises with the statistics of the batch it
    sees (transductive BN as in the original MAML); running statistics are neither used nor updated;
  - after meta-training: running statistics are re-estimated on clean unlabelled training images
    (cumulative average), so the exported encoder runs in eval mode like every other recipe.
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from .augment import augment
from .pseudotasks import augmentation_episode


@contextmanager
def batch_statistics_only(module: torch.nn.Module):
    """BN layers normalise with batch statistics and leave running_mean/var untouched."""
    norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [m.track_running_stats for m in norms]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m, s in zip(norms, saved):
            m.track_running_stats = s


class MamlTrainer:
    def __init__(self, run, pool: torch.Tensor):
        self.run, self.pool, self.cfg = run, pool, run.cfg
        self.vectorised = True  # falls back to a loop over tasks if vmap is refused

    def _task_loss(self, params: dict, buffers: dict, xs, ys, xq, yq):
        cfg, encoder = self.cfg, self.run.encoder

        def forward(p, x):
            return functional_call(encoder, (p, buffers), (x,))

        def inner_loss(fast, x, y):
            logits = forward(fast["enc"], x) @ fast["w"].T + fast["b"]
            return F.cross_entropy(logits, y)

        z = forward(params, xs)
        prototypes = z.view(cfg.maml_way, cfg.maml_shot, -1).mean(1)
        fast = {"enc": params, "w": 2 * prototypes, "b": -(prototypes ** 2).sum(1)}
        for _ in range(cfg.maml_inner_steps):
            g = grad(inner_loss)(fast, xs, ys)
            if cfg.maml_first_order:
                g = torch.utils._pytree.tree_map(lambda t: t.detach(), g)
            fast = torch.utils._pytree.tree_map(lambda p, d: p - cfg.maml_inner_lr * d, fast, g)
        logits = forward(fast["enc"], xq) @ fast["w"].T + fast["b"]
        return F.cross_entropy(logits, yq), (logits.argmax(1) == yq).float().mean()

    def _sample_tasks(self):
        cfg, run = self.cfg, self.run
        n_views = cfg.maml_shot + cfg.maml_query
        idx = np.stack([augmentation_episode(len(self.pool), cfg.maml_way, run.rng) for _ in range(cfg.maml_tasks)])
        index = torch.from_numpy(np.repeat(idx[..., None], n_views, -1).reshape(-1))
        views = augment(self.pool[index].to(run.device), cfg.augment, run.gen)
        views = views.view(cfg.maml_tasks, cfg.maml_way, n_views, *views.shape[1:])
        xs = views[:, :, :cfg.maml_shot].flatten(1, 2)
        xq = views[:, :, cfg.maml_shot:].flatten(1, 2)
        ys = torch.arange(cfg.maml_way, device=run.device).repeat_interleave(cfg.maml_shot)
        yq = torch.arange(cfg.maml_way, device=run.device).repeat_interleave(cfg.maml_query)
        return xs, ys.expand(cfg.maml_tasks, -1), xq, yq.expand(cfg.maml_tasks, -1)

    def step_loss(self) -> tuple[torch.Tensor, dict]:
        encoder = self.run.encoder
        params = dict(encoder.named_parameters())
        buffers = dict(encoder.named_buffers())
        xs, ys, xq, yq = self._sample_tasks()
        # fp32: vmap's batching rules and bf16 autocast disagree on dtypes in the backward pass.
        with batch_statistics_only(encoder), torch.autocast(self.run.device.type, enabled=False):
            if self.vectorised:
                try:
                    fn = vmap(self._task_loss, in_dims=(None, None, 0, 0, 0, 0), randomness="same")
                    losses, accs = fn(params, buffers, xs, ys, xq, yq)
                except RuntimeError:
                    self.vectorised = False
            if not self.vectorised:
                pairs = [self._task_loss(params, buffers, *t) for t in zip(xs, ys, xq, yq)]
                losses, accs = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        return losses.mean(), {"loss_maml": float(losses.detach().mean()), "acc_maml": float(accs.mean()),
                               "vmap": float(self.vectorised)}

    def recalibrate_batchnorm(self) -> None:
        recalibrate_batchnorm(self.run.encoder, self.pool, self.run.rng)


@torch.no_grad()
def recalibrate_batchnorm(encoder: torch.nn.Module, pool: torch.Tensor, rng: np.random.Generator,
                          batches: int = 20, batch_size: int = 500) -> None:
    """Running statistics as the plain average over clean training images (momentum=None).
    Also used to give the random-encoder baseline sensible statistics."""
    norms = [m for m in encoder.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    was_training = encoder.training
    encoder.train()
    device = next(encoder.parameters()).device
    for _ in range(batches):
        idx = torch.from_numpy(rng.choice(len(pool), min(batch_size, len(pool)), replace=False))
        encoder(pool[idx].to(device).float())
    for m, s in zip(norms, saved):
        m.momentum = s
    encoder.train(was_training)
