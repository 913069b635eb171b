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


BACKBONES = ("conv4", "resnet12")


@dataclass
class EncoderConfig:
    in_channels: int = 1
    input_size: int = 28
    width: int = 64  # conv4: every block; resnet12: the first block (then x2.5, x5, x10)
    depth: int = 4  # conv4 blocks (resnet12 always has 4)
    backbone: str = "conv4"  # checkpoints written before the field existed are conv4
    pixel_mean: float = 0.13  # of x/255; MNIST's is 0.1307, Omniglot's 28x28 ink is similar
    pixel_std: float = 0.31

    def to_dict(self) -> dict:
        return asdict(self)


def conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True), nn.MaxPool2d(2))


def resnet12_widths(width: int) -> list[int]:
    """64 -> 64, 160, 320, 640 (the few-shot literature's ResNet-12); other widths scale alike."""
    return [width, round(width * 2.5), width * 5, width * 10]


class ResidualBlock(nn.Module):
    """ResNet-12 block (Oreshkin et al. 2018; Lee et al. 2019): 3 x [conv3x3-BN], LeakyReLU 0.1 between,
    a conv1x1-BN shortcut, LeakyReLU after the sum, then max-pool 2."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        conv = lambda a, b: nn.Conv2d(a, b, 3, padding=1, bias=False)
        self.body = nn.Sequential(conv(cin, cout), nn.BatchNorm2d(cout), nn.LeakyReLU(0.1),
                                  conv(cout, cout), nn.BatchNorm2d(cout), nn.LeakyReLU(0.1),
                                  conv(cout, cout), nn.BatchNorm2d(cout))
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.act = nn.LeakyReLU(0.1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.act(self.body(x) + self.shortcut(x)))


class Encoder(nn.Module):
    """conv4 (Vinyals et al. 2016; Snell et al. 2017): depth x [conv3x3-BN-ReLU-maxpool], flattened.
    resnet12: 4 residual blocks of widths 64-160-320-640, then global average pooling (D = 640)."""

    def __init__(self, config: EncoderConfig | None = None):
        super().__init__()
        self.config = config or EncoderConfig()
        c = self.config
        if c.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {', '.join(BACKBONES)}, not {c.backbone!r}")
        layers, cin = [], c.in_channels
        if c.backbone == "resnet12":
            for cout in resnet12_widths(c.width):
                layers.append(ResidualBlock(cin, cout))
                cin = cout
        else:
            for _ in range(c.depth):
                layers.append(conv_block(cin, c.width))
                cin = c.width
        self.features = nn.Sequential(*layers)
        self.global_pool = c.backbone == "resnet12"
        self.register_buffer("pixel_mean", torch.tensor(c.pixel_mean * 255.0), persistent=False)
        self.register_buffer("pixel_scale", torch.tensor(1.0 / (c.pixel_std * 255.0)), persistent=False)
        with torch.no_grad():
            probe = torch.zeros(1, c.in_channels, c.input_size, c.input_size, dtype=torch.uint8)
            self.feature_shape = tuple(self.features(self.normalize(probe)).shape[1:])
        if self.global_pool:
            self.feature_shape = (self.feature_shape[0], 1, 1)
        self.embedding_dim = int(torch.tensor(self.feature_shape).prod())

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels.float() - self.pixel_mean) * self.pixel_scale

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.features(self.normalize(pixels))
        if self.global_pool:
            x = x.mean((2, 3), keepdim=True)
        return x.flatten(1)


class Decoder(nn.Module):
    """Mirror of the encoder for the reconstruction loss: embedding -> logits of x/255."""

    def __init__(self, encoder: Encoder):
        super().__init__()
        c = encoder.config
        self.feature_shape = encoder.feature_shape
        self.input_size = c.input_size
        self.stem = None
        if encoder.global_pool:  # a pooled vector: a linear map back to a small feature map first
            cells = -(-c.input_size // 16)
            self.stem = nn.Linear(encoder.embedding_dim, c.width * cells * cells)
            self.feature_shape = (c.width, cells, cells)
        layers = []
        for _ in range((4 if encoder.global_pool else c.depth) - 1):
            layers += [nn.Upsample(scale_factor=2), nn.Conv2d(c.width, c.width, 3, padding=1, bias=False),
                       nn.BatchNorm2d(c.width), nn.ReLU(inplace=True)]
        layers += [nn.Upsample(scale_factor=2), nn.Conv2d(c.width, c.in_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        if self.stem is not None:
            embedding = self.stem(embedding)
        x = self.net(embedding.view(-1, *self.feature_shape))
        # Odd sizes (28 -> 14 -> 7 -> 3 -> 1) lose pixels on the way down; resample to the input size.
        return nn.functional.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                                         align_corners=False)
