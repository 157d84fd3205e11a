"""Small convolutional networks for 28x28 / 8x8 grayscale images."""

from __future__ import annotations

import torch
from torch import nn


class MnistCNN(nn.Module):
    """Two conv blocks and two linear layers (~0.2M parameters at the defaults), the usual small MNIST CNN of
    FL backdoor papers. No batch norm and no dropout by default, so data-parallel runs equal single-process
    runs exactly; ``body``/``head`` split the encoder from the linear classifier (for head-only training).

    Args:
        num_classes: output classes.
        in_channels: image channels.
        image_size: input side length (28 for MNIST / Fashion-MNIST, 8 for digits).
        width: channels of the first conv layer (the second has twice as many).
        hidden: width of the penultimate (feature) layer.
        dropout: dropout before the head (0 disables it).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        width: int = 16,
        hidden: int = 128,
        dropout: float = 0.0,
    ):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"image_size must be divisible by 4 (two 2x2 poolings), got {image_size}")
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * width * (image_size // 4) ** 2, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
        )
        self.head = nn.Linear(hidden, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))
