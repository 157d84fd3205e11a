"""Small networks and builders for Hugging Face backbones."""

from lightning_modules.nets.cnn import MnistCNN
from lightning_modules.nets.hf import HFSequenceClassifier, LoraSpec

__all__ = ["HFSequenceClassifier", "LoraSpec", "MnistCNN"]

from lightning_modules.nets.resnet import CifarResNet18  # noqa: E402

__all__ += ["CifarResNet18"]
