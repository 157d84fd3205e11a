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

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """The input layer: a 3x3 stride-1 conv-BN-ReLU (no max-pool)."""
        return F.relu(self.bn1(self.conv1(x)))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled feature vector ``[N, 8 * base_width]`` (the encoder; no normalisation, no projection head)."""
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return torch.flatten(self.pool(out), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def torchvision_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A torchvision-layout ResNet-18 state dict (``layerX.Y.downsample.{0,1}``, ``fc``) in this module's names
    (``shortcut.{0,1}``, ``head``)."""
    out = {}
    for key, value in state.items():
        key = key.replace(".downsample.", ".shortcut.")
        out["head." + key[3:] if key.startswith("fc.") else key] = value
    return out


class ResNet18(CifarResNet18):
    """The ImageNet ResNet-18 (torchvision's layout): a 7x7 stride-2 stem with a 3x3 stride-2 max-pool, which
    FedSelect's official code trains on CIFAR-10 (``torchvision.models.resnet18``, optionally ImageNet-pretrained:
    ``--pretrained_init``), with a new head.

    Args:
        weights: a safetensors file of ImageNet weights in torchvision's names (e.g. torchvision's
            ``resnet18-f37072fd.pth`` converted with ``safetensors.torch.save_file``, or timm's
            ``resnet18.tv_in1k``); the classifier (``fc``) is not loaded: the head is new, as officially.
            ``None``: random initialisation.

    The arguments of :class:`CifarResNet18` pass through (``base_width`` must be 64 to load ImageNet weights).
    """

    def __init__(self, weights: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.conv1 = nn.Conv2d(self.conv1.in_channels, self.conv1.out_channels, 7, stride=2, padding=3, bias=False)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.weights = weights
        if weights is not None:
            from safetensors.torch import load_file

            state = {k: v for k, v in torchvision_to_ours(load_file(weights)).items() if not k.startswith("head.")}
            try:
                missing, unexpected = self.load_state_dict(state, strict=False)
            except RuntimeError as err:  # shape mismatches
                raise ValueError(f"{weights} is not a torchvision ResNet-18 of this width (base_width "
                                 f"{self.conv1.out_channels}): {str(err).splitlines()[1].strip()}") from None  # fmt: skip
            if unexpected or [k for k in missing if not k.startswith("head.")]:
                raise ValueError(f"{weights} is not a torchvision ResNet-18 of this width: missing "
                                 f"{[k for k in missing if not k.startswith('head.')][:5]}, unexpected {unexpected[:5]}")  # fmt: skip

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """7x7 stride-2 conv-BN-ReLU, then a 3x3 stride-2 max-pool."""
        return self.maxpool(F.relu(self.bn1(self.conv1(x))))
