"""CIFAR-style ResNet-18 (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, arXiv 1512.03385).

The CIFAR variant used by federated-backdoor papers (Bagdasaryan et al. 2020, Neurotoxin, Chameleon): a 3x3 stride-1
stem convolution and no max-pool, so 32x32 inputs keep their resolution into the first stage, then four stages of
two :class:`BasicBlock` each (strides 1, 2, 2, 2), global average pooling and one linear layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity shortcut (a 1x1 conv-BN projection when the shape changes).

    Args:
        in_planes: input channels.
        planes: output channels.
        stride: stride of the first convolution and of the projection.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet18(nn.Module):
    """ResNet-18 for small images: 3x3 stem (no max-pool), 4 stages of 2 :class:`BasicBlock`, global average
    pooling, linear head.

    Stage widths are ``base_width`` x (1, 2, 4, 8): ``base_width=64`` is the standard ResNet-18 (64/128/256/512,
    ~11.2M parameters for 10 classes); ``base_width=32`` is the narrower network of Chameleon's official code
    (``models/resnet.py`` of ybdai7/Chameleon-durable-backdoor: 32/64/128/256, ~2.8M parameters), used by
    ``configs/chameleon/cifar10_resnet18_normclip.yaml``. Pooling is adaptive, so 28x28 inputs (MNIST with
    ``in_channels=1``, as Chameleon's EMNIST variant) work as well as 32x32.

    :meth:`features` returns the pooled (un-normalised) feature vector and :attr:`head` is the linear classifier,
    the split :class:`~lightning_modules.chameleon.ChameleonAttack` needs (contrastive training of ``features``,
    then head-only training), as in :class:`~lightning_modules.nets.cnn.MnistCNN`; ``forward(x) ==
    head(features(x))``.

    BatchNorm: in federated training, :class:`~lightning_modules.federated.FederatedRecipe` with ``buffers:
    average`` (its default) replaces the global running means and variances by the clients' sample-weighted
    average every round, outside the aggregator (Chameleon's code likewise keeps BN statistics out of norm
    clipping); the integer ``num_batches_tracked`` keeps the global value. Each client trains on one process, so
    no SyncBatchNorm is needed under DDP. Evaluation uses the running statistics (``eval()`` mode).

    Args:
        num_classes: output classes.
        in_channels: image channels (3 for CIFAR-10, 1 for MNIST-like data).
        base_width: channels of the stem and first stage; the stages have 1x, 2x, 4x and 8x as many
            (64: standard ResNet-18; 32: Chameleon's official network).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, base_width: int = 64):
        super().__init__()
        if num_classes < 1 or in_channels < 1 or base_width < 1:
            raise ValueError(
                f"CifarResNet18 needs num_classes, in_channels and base_width >= 1, got {num_classes}, "
                f"{in_channels}, {base_width}"
            )
        widths = [base_width * m for m in (1, 2, 4, 8)]
        self.conv1 = nn.Conv2d(in_channels, base_width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(base_width)
        in_planes = base_width
        stages = []
        for width, stride in zip(widths, (1, 2, 2, 2)):
            stages.append(nn.Sequential(BasicBlock(in_planes, width, stride), BasicBlock(width, width, 1)))
            in_planes = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(widths[-1], num_classes)
        self.feature_dim = widths[-1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled feature vector ``[N, 8 * base_width]`` (the encoder; no normalisation, no projection head)."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return torch.flatten(self.pool(out), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
