"""Batched image augmentation on tensors (the federated engine trains on stored tensors, not a Dataset pipeline)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def random_crop_flip(
    images: Tensor, padding: int, generator: torch.Generator, fill: float = 0.0, flip: bool = True
) -> Tensor:
    """torchvision's ``RandomCrop(size, padding)`` + ``RandomHorizontalFlip()`` on a batch ``[N, C, H, W]``.

    Each image is padded by ``padding`` pixels of value ``fill`` on every side, an ``H x W`` window is cut at an
    offset drawn uniformly in ``[0, 2 * padding]`` per axis, and (with ``flip``) it is mirrored left-right with
    probability 1/2. The CIFAR-10 training transform of Chameleon's official code
    (ybdai7/Chameleon-durable-backdoor@c74618a, image_helper.py: ``transforms.RandomCrop(32, padding=4)``,
    ``transforms.RandomHorizontalFlip()``, then ``ToTensor`` and ``Normalize``). torchvision pads the
    un-normalised image with 0; on normalised tensors pass the normalised value of a black pixel as ``fill``.
    Draws come from ``generator`` (CPU), so a round is reproducible. Returns a new tensor.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    n, _, h, w = images.shape
    out = images
    if padding > 0:
        padded = F.pad(images, (padding, padding, padding, padding), value=fill)
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        rows = (dy[:, None] + torch.arange(h)[None]).to(images.device)  # [N, H]
        cols = (dx[:, None] + torch.arange(w)[None]).to(images.device)  # [N, W]
        idx = torch.arange(n, device=images.device)[:, None, None]
        out = padded.permute(0, 2, 3, 1)[idx, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if flip:
        mirror = (torch.rand(n, generator=generator) < 0.5).to(images.device)
        out = torch.where(mirror[:, None, None, None], out.flip(-1), out)
    return out.contiguous()
