"""Prototypical-Network episode loss (Snell et al. 2017) in the distance the runtime uses.

distance "sqeuclidean": logits = -||q - p||^2 on raw embeddings.
distance "cosine": embeddings are L2-normalised, prototypes are the plain mean of the
normalised support (not re-normalised, exactly as protoedge.fewshot and the runtime do it),
and logits = -temperature * ||q - p||^2. The temperature is learned (in log space, so it stays
positive) and is saved in the checkpoint; it multiplies the on-device distance directly.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ProtoHead(nn.Module):
    """Holds the distance choice and the learned temperature; turns an episode into logits."""

    def __init__(self, distance: str = "cosine", temperature: float = 5.0, learn_temperature: bool = True):
        super().__init__()
        if distance not in ("cosine", "sqeuclidean"):
            raise ValueError(f"distance must be 'cosine' or 'sqeuclidean', not {distance!r}")
        self.distance = distance
        log_t = torch.tensor(math.log(temperature if distance == "cosine" else 1.0))
        if distance == "cosine" and learn_temperature:
            self.log_temperature = nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t)

    @property
    def temperature(self) -> float:
        return float(self.log_temperature.detach().exp())

    def embed_space(self, z: torch.Tensor) -> torch.Tensor:
        return F.normalize(z, dim=-1) if self.distance == "cosine" else z

    def logits(self, support: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """support [n_way, k_shot, D], query [M, D] -> logits [M, n_way]."""
        prototypes = self.embed_space(support).mean(1)
        q = self.embed_space(query)
        d = (q * q).sum(1, keepdim=True) - 2 * q @ prototypes.T + (prototypes * prototypes).sum(1)[None]
        # Clamped so a runaway temperature cannot make the loss explode in a bad step.
        return -self.log_temperature.clamp(max=math.log(100.0)).exp() * d

    def loss(self, support: torch.Tensor, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """support [n_way, k_shot, D], query [n_way, n_query, D] -> (cross-entropy, accuracy)."""
        n_way, n_query = query.shape[:2]
        logits = self.logits(support, query.reshape(n_way * n_query, -1))
        target = torch.arange(n_way, device=query.device).repeat_interleave(n_query)
        return F.cross_entropy(logits, target), (logits.argmax(1) == target).float().mean()
