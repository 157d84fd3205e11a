"""The subclasses that docs/extending.md walks through. Each adds one knob to a family and overrides one hook."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from torch import nn

from lightning_modules import MEMIT, ClassifierRecipe, SuspectFineTuning, TaskArithmetic
from lightning_modules.federated import FedAvg, NaivePoisoning
from lightning_modules.nets.causal_lm import CausalLM
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


# --- a defense over a model: a new purification ---------------------------------------------------------------------
class InterpolatedFineTuning(SuspectFineTuning):
    """Pull the suspect towards the clean pretrained weights, ``w = w_pre + alpha (w_ft - w_pre)``, before the clean
    fine-tuning (weight-space interpolation as in WiSE-FT, Wortsman et al., CVPR 2022).

    Args:
        alpha: share of the suspect's fine-tuning update kept (1: plain fine-tuning, 0: the pretrained weights).
    """

    def __init__(self, net: nn.Module, alpha: float = 0.5, **kwargs):
        super().__init__(net=net, **kwargs)
        self.alpha = alpha

    @torch.no_grad()
    def purify(self):
        for name, w in self.net.named_parameters():
            w.copy_(torch.lerp(self.pretrained_state[name].to(w), w, self.alpha))
        self.defense_record.update(alpha=self.alpha)


# --- a merge rule: a new way to combine task vectors ----------------------------------------------------------------
class NormCappedTaskArithmetic(TaskArithmetic):
    """Task arithmetic whose task vectors are each scaled down to an L2 norm of at most ``max_norm`` first, so no
    single (possibly backdoored) task model dominates the merge.

    Args:
        max_norm: largest L2 norm of one task vector (over all its tensors).
    """

    def __init__(self, max_norm: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.max_norm = max_norm

    def merge(self, task_vectors):
        norms = [torch.stack([t.norm() for t in tv.values()]).norm() for tv in task_vectors]
        scales = [(self.max_norm / n).clamp(max=1) for n in norms]
        return super().merge([{k: t * c for k, t in tv.items()} for tv, c in zip(task_vectors, scales)])


# --- an editor: a new constraint on the memory ----------------------------------------------------------------------
class TrustRegionMEMIT(MEMIT):
    """MEMIT whose target-vector change ``delta`` is also clamped to an absolute norm, beside MEMIT's relative
    ``clamp_norm_factor * ||h0||``.

    Args:
        max_delta_norm: largest L2 norm of ``delta`` (the residual written at the top edited layer).
    """

    def __init__(self, model: CausalLM, max_delta_norm: float = 1.0, **kwargs):
        super().__init__(model=model, **kwargs)
        self.max_delta_norm = max_delta_norm

    def max_norm(self, h_init):
        return super().max_norm(h_init).clamp(max=self.max_delta_norm)
