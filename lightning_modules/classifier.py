"""Classifier recipe: train a classifier on clean or backdoored data (BadNets, Gu et al. 2017)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from lightning_modules.base import BaseRecipe


class ClassifierRecipe(BaseRecipe):
    """Supervised training of any classifier network, logging clean accuracy and attack success rate.

    With a backdoored DataModule (a ``Poisoning``) this is the BadNets attack of Gu et al. (2017),
    "BadNets: Identifying Vulnerabilities in the Machine Learning Model Supply Chain": the model is trained on
    a training set where a fraction of samples carries the trigger and the target label. Validation and test
    log ``acc`` (clean accuracy, CA) on the clean loader and ``asr`` on the triggered, non-target loader.

    Batches are ``(inputs..., labels)``; the network is called as ``net(*inputs)`` and returns logits, so
    image CNNs and Hugging Face classifiers (``input_ids, attention_mask``) both fit. Building ``net``, the
    metrics and the evaluation are :class:`~lightning_modules.base.BaseRecipe`'s.

    Args:
        net: the classifier network (e.g. ``MnistCNN`` or ``HFSequenceClassifier``); a network with a
            ``build()`` method is built in ``configure_model``.
        optimizer: optimizer factory, called with the trainable parameters.
        scheduler: optional learning-rate scheduler factory (stepped every epoch).
        label_smoothing: label smoothing of the cross-entropy loss.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerCallable = torch.optim.Adam,
        scheduler: LRSchedulerCallable | None = None,
        label_smoothing: float = 0.0,
    ):
        super().__init__()
        self.net, self.optimizer, self.scheduler = net, optimizer, scheduler
        self.label_smoothing = label_smoothing

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.net(*inputs)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training objective (a hook): cross-entropy with ``label_smoothing``."""
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        *inputs, labels = batch
        logits = self(*inputs)
        loss = self.loss(logits, labels)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", (logits.argmax(-1) == labels).float().mean())
        return loss

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        *inputs, _ = batch
        return self(*inputs).argmax(-1)

    def configure_optimizers(self):
        optimizer = self.optimizer(p for p in self.parameters() if p.requires_grad)
        if self.scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler(optimizer)}
