"""The encoder (and the decoder used for reconstruction).

The encoder's contract, which export and the runtime rely on:
  input  uint8 pixels [N, C, H, W], exactly as stored (ink high for Omniglot/MNIST);
  output float32 embedding [N, D].
Normalisation happens inside the model, so every consumer feeds raw pixels.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass
class EncoderConfig:
    in_channels: int = 1
    input_size: int = 28
    width: int = 64
    depth: int = 4
    pixel_mean: float = 0.13  # of x/255; MNIST's is 0.1307, Omniglot's 28x28 ink is similar
    pixel_std: float = 0.31

    def to_dict(self) -> dict:
        return asdict(self)


def conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True), nn.MaxPool2d(2))


class Encoder(nn.Module):
    """Conv4 (Vinyals et al. 2016; Snell et al. 2017): depth x [conv3x3-BN-ReLU-maxpool]."""

    def __init__(self, config: EncoderConfig | None = None):
        super().__init__()
        self.config = config or EncoderConfig()
        c = self.config
        layers, cin = [], c.in_channels
        for _ in range(c.depth):
            layers.append(conv_block(cin, c.width))
            cin = c.width
        self.features = nn.Sequential(*layers)
        self.register_buffer("pixel_mean", torch.tensor(c.pixel_mean * 255.0), persistent=False)
        self.register_buffer("pixel_scale", torch.tensor(1.0 / (c.pixel_std * 255.0)), persistent=False)
        with torch.no_grad():
            probe = torch.zeros(1, c.in_channels, c.input_size, c.input_size, dtype=torch.uint8)
            self.feature_shape = tuple(self.features(self.normalize(probe)).shape[1:])
        self.embedding_dim = int(torch.tensor(self.feature_shape).prod())

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels.float() - self.pixel_mean) * self.pixel_scale

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.features(self.normalize(pixels)).flatten(1)


class Decoder(nn.Module):
    """Mirror of the encoder for the reconstruction loss: embedding -> logits of x/255."""

    def __init__(self, encoder: Encoder):
        super().__init__()
        c = encoder.config
        self.feature_shape = encoder.feature_shape
        self.input_size = c.input_size
        layers = []
        for _ in range(c.depth - 1):
            layers += [nn.Upsample(scale_factor=2), nn.Conv2d(c.width, c.width, 3, padding=1, bias=False),
                       nn.BatchNorm2d(c.width), nn.ReLU(inplace=True)]
        layers += [nn.Upsample(scale_factor=2), nn.Conv2d(c.width, c.in_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        x = self.net(embedding.view(-1, *self.feature_shape))
        # Odd sizes (28 -> 14 -> 7 -> 3 -> 1) lose pixels on the way down; resample to the input size.
        return nn.functional.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                                         align_corners=False)
