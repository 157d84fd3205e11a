"""The subclasses that docs/extending.md walks through. Each adds one knob to a family and overrides one hook."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_modules import ClassifierRecipe
from lightning_modules.federated import FedAvg, NaivePoisoning
from lightning_modules.nets.split_lm import SplitCausalLM
from lightning_modules.tamper import lm_loss
from lightning_modules.tar import GradientAscent


# --- a classifier: a new objective ------------------------------------------------------------------------------
class FocalClassifier(ClassifierRecipe):
    """Focal loss (Lin et al., ICCV 2017): cross-entropy scaled by ``(1 - p_true)^gamma``.

    Args:
        gamma: focusing parameter (0: cross-entropy).
    """

    def __init__(self, gamma: float = 2.0, **kwargs):
        super().__init__(**kwargs)
        self.gamma = gamma

    def loss(self, logits, labels):
        ce = F.cross_entropy(logits, labels, reduction="none")
        return ((1 - torch.exp(-ce)) ** self.gamma * ce).mean()


# --- a federated attack: edit the malicious update ----------------------------------------------------------------
class NoisyPoisoning(NaivePoisoning):
    """Naive poisoning whose update is masked with Gaussian noise before it is sent.

    Args:
        noise_std: std of the noise added to every coordinate of the update.
    """

    def __init__(self, noise_std: float = 0.01, **kwargs):
        super().__init__(**kwargs)
        self.noise_std = noise_std

    def post_process(self, update, ctx):
        noise = torch.randn(update.shape, generator=ctx.generator).to(update)
        return super().post_process(update, ctx) + self.noise_std * noise


# --- an aggregator: a new server rule -------------------------------------------------------------------------------
class CoordinateClipping(FedAvg):
    """FedAvg whose aggregate is clamped coordinate-wise to ``[-bound, bound]``.

    Args:
        bound: largest absolute change of one parameter per round.
    """

    def __init__(self, bound: float = 0.01, **kwargs):
        super().__init__(**kwargs)
        self.bound = bound

    def aggregate(self, updates, weights, generator=None):
        aggregate, info = super().aggregate(updates, weights, generator)
        return aggregate.clamp(-self.bound, self.bound), info


# --- a safeguard: a new training objective --------------------------------------------------------------------------
class CappedGradientAscent(GradientAscent):
    """Gradient ascent whose forget loss stops counting past ``cap`` nats, so it cannot diverge.

    Args:
        cap: forget LM loss beyond which ascent stops.
    """

    def __init__(self, model: SplitCausalLM, cap: float = 12.0, **kwargs):
        super().__init__(model=model, **kwargs)
        self.cap = cap

    def safeguard_loss(self, batch):
        forget = lm_loss(self.net, batch["forget"]).clamp(max=self.cap)
        return -self.forget_weight * forget + self.retain_weight * lm_loss(self.net, batch["retain"], False)
