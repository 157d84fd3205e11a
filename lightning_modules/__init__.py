"""One LightningModule per method, grouped by family; pure tensor math in ``ops``, networks in ``nets``."""

from lightning_modules.base import BaseRecipe
from lightning_modules.classifier import ClassifierRecipe
from lightning_modules.metrics import AttackSuccessRate
from lightning_modules.nets import HFSequenceClassifier, LoraSpec, MnistCNN

__all__ = ["AttackSuccessRate", "BaseRecipe", "ClassifierRecipe", "HFSequenceClassifier", "LoraSpec", "MnistCNN"]
