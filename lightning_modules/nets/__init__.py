"""Small networks (MNIST CNN, CIFAR ResNet-18) and builders for Hugging Face backbones."""

from lightning_modules.nets.cnn import MnistCNN
from lightning_modules.nets.hf import HFSequenceClassifier, LoraSpec
from lightning_modules.nets.resnet import CifarResNet18, ResNet18

__all__ = ["CifarResNet18", "HFSequenceClassifier", "LoraSpec", "MnistCNN", "ResNet18"]
