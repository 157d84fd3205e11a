"""Chameleon: durable federated backdoors by adapting to peer images (Dai & Li, ICML 2023, arXiv 2304.12961).

A malicious client of the federated engine (:class:`~lightning_modules.federated.FederatedRecipe`). Benign
images of the target class ("facilitators") and of the poisoned images' original classes ("interferers") are
the peer images whose later benign updates erase an ordinary backdoor. Chameleon trains in two stages so that
poisoned images land among the facilitators in feature space, where benign training keeps them:

1. **Contrastive encoder.** Supervised contrastive loss (:func:`~lightning_modules.ops.contrastive.supcon_loss`)
   on the L2-normalised encoder features of batches mixing poisoned images (relabelled to the target) with the
   client's benign images; the positive term of target-label anchors is up-weighted (official
   ``contrastive_loss_scale_weight``). The head is not used. After every step the model is projected onto the
   L2 ball of radius ``radius_contrastive`` around the global model.
2. **Head.** Everything but the linear head is frozen (the original repository's semantics; the second
   implementation in Backdoor-indicator-defense leaves the encoder trainable by a typo, ``require_grad``), and
   the head is trained with cross-entropy on poisoned batches, projected onto the ball of radius ``radius``
   after every step. It stops early once the poisoned-batch loss is ``<= early_stop_loss`` and the clean
   accuracy on the client's data is not below its value before the attack.

The update may then be scaled (``scale``, 1 = none) and is projected once more onto the ball of radius
``radius`` (:meth:`PGDPoisoning.post_process`). Defaults follow the official pixel-pattern configuration (``utils/params_*.yaml``) except where the
CNN on 28x28 digits needs otherwise; each is named below.

The model must expose ``features(x)`` (the encoder) and ``head`` (the linear classifier), like
:class:`~lightning_modules.nets.cnn.MnistCNN`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_modules.federated.attacks import PGDPoisoning
from lightning_modules.federated.local import ClientContext, LocalTrainer
from lightning_modules.ops.contrastive import supcon_loss
from lightning_modules.ops.fl_attacks import project_params_l2_


class ChameleonAttack(PGDPoisoning):
    """Chameleon's two-stage local training for the malicious clients (see the module docstring).

    ``schedule`` (:class:`~lightning_modules.federated.attacks.AttackSchedule`: the paper has one attacker that
    takes part in every attack round; ``scale`` is the official ``scale_weights``, 1) passes through.

    Args:
        poison_fraction: fraction of each local batch poisoned (official ``poison_batch_len`` 7 of 64 ≈ 0.11).
        poison_noise_std: std of the Gaussian noise added to poisoned images (official 0.01).
        contrastive_epochs: stage-1 epochs (official ``retrain_poison_contrastive`` 10).
        contrastive_lr: stage-1 SGD learning rate (official ``poison_lr_contrastive`` 0.005 for the pixel
            pattern).
        contrastive_milestones: stage-1 epochs where the lr is multiplied by 0.1 (official [3, 5, 7, 9]).
        contrastive_weight_decay: stage-1 weight decay (official 5e-4).
        temperature: SupCon temperature τ (official 0.07).
        target_weight: up-weighting of target-label anchors' positive term (official
            ``contrastive_loss_scale_weight`` 6 for the pixel pattern).
        radius_contrastive: L2 ball radius around the global model during stage 1 (official
            ``s_norm_contrastive`` 5).
        head_epochs: stage-2 epochs (official ``retrain_poison`` 3).
        head_lr: stage-2 SGD learning rate (official ``poison_lr`` 0.001 for the pixel pattern).
        head_milestones: stage-2 milestones (official [3, 5]).
        head_gamma: stage-2 lr decay factor (official ``lr_gamma`` 0.005).
        head_weight_decay: stage-2 weight decay (official 0.005).
        early_stop_loss: stage-2 stops once the mean poisoned-batch loss of an epoch is at most this and the
            clean accuracy is not below its starting value (official 1e-4).
        radius: L2 radius of the final update and of stage 2 (official ``s_norm`` 5; put it at or below the
            server's clipping bound so that norm clipping does not shrink the update).
    """

    def __init__(
        self, poison_fraction: float = 7 / 64, poison_noise_std: float = 0.01,
        contrastive_epochs: int = 10, contrastive_lr: float = 0.005,
        contrastive_milestones: list[int] | None = None, contrastive_weight_decay: float = 5e-4,
        temperature: float = 0.07, target_weight: float = 6.0, radius_contrastive: float = 5.0,
        head_epochs: int = 3, head_lr: float = 0.001, head_milestones: list[int] | None = None,
        head_gamma: float = 0.005, head_weight_decay: float = 0.005, early_stop_loss: float = 1e-4,
        radius: float = 5.0, **kwargs,
    ):  # fmt: skip
        super().__init__(radius=radius, poison_fraction=poison_fraction, lr=None, local_epochs=None, **kwargs)
        if contrastive_epochs < 0 or head_epochs < 1:
            raise ValueError(f"need contrastive_epochs >= 0 and head_epochs >= 1, got {contrastive_epochs}, {head_epochs}")
        self.poison_noise_std, self.temperature, self.target_weight = poison_noise_std, temperature, target_weight
        self.contrastive_epochs, self.contrastive_lr = contrastive_epochs, contrastive_lr
        self.contrastive_milestones = [3, 5, 7, 9] if contrastive_milestones is None else list(contrastive_milestones)
        self.contrastive_weight_decay, self.radius_contrastive = contrastive_weight_decay, radius_contrastive
        self.head_epochs, self.head_lr, self.head_gamma = head_epochs, head_lr, head_gamma
        self.head_milestones = [3, 5] if head_milestones is None else list(head_milestones)
        self.head_weight_decay, self.early_stop_loss = head_weight_decay, early_stop_loss

    # ------------------------------------------------------------------------------------------ pieces
    def poison(self, ctx: ClientContext, generator: torch.Generator):
        """Batch transform: the first ``poison_fraction`` of the batch gets the trigger, the target label and
        N(0, ``poison_noise_std``²) noise (drawn from the client's generator, so rounds are reproducible)."""

        def transform(xb: Tensor, yb: Tensor) -> tuple[Tensor, Tensor]:
            xb, yb = ctx.datamodule.poison_batch(xb, yb, self.poison_fraction)
            k = round(self.poison_fraction * len(xb))
            if self.poison_noise_std > 0 and k > 0:
                noise = torch.randn(xb[:k].shape, generator=generator).to(xb.device, xb.dtype)
                xb = torch.cat([xb[:k] + self.poison_noise_std * noise, xb[k:]])
            return xb, yb

        return transform

    def contrastive_loss(self, model: nn.Module, xb: Tensor, yb: Tensor, target: int) -> Tensor:
        """Stage-1 objective on the encoder features (override to change the loss, e.g. for an ablation)."""
        return supcon_loss(model.features(xb), yb, self.temperature, self.temperature, target, self.target_weight)

    def projector(self, model: nn.Module, ctx: ClientContext, radius: float):
        params = list(model.parameters())
        return lambda m: project_params_l2_(params, ctx.global_params, radius)

    @staticmethod
    @torch.no_grad()
    def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> float:
        was_training = model.training
        model.eval()
        correct = sum(int((model(x[i : i + batch_size]).argmax(-1) == y[i : i + batch_size]).sum())
                      for i in range(0, len(y), batch_size))  # fmt: skip
        model.train(was_training)
        return correct / max(len(y), 1)

    # ------------------------------------------------------------------------------------------ the attack
    def local_train(self, model: nn.Module, x: Tensor, y: Tensor, ctx: ClientContext) -> None:
        if not (hasattr(model, "features") and isinstance(getattr(model, "head", None), nn.Module)):
            raise TypeError(f"Chameleon needs a model with features(x) and a head module, got {type(model).__name__}")
        target = ctx.datamodule.target_label
        poison = self.poison(ctx, ctx.generator)
        base = ctx.local
        if self.contrastive_epochs > 0:  # stage 1: supervised contrastive training of the encoder
            stage1 = LocalTrainer(self.contrastive_lr, base.momentum, self.contrastive_weight_decay,
                                  self.contrastive_epochs, base.batch_size, None, self.contrastive_milestones, 0.1)  # fmt: skip
            head = list(model.head.parameters())
            for p in head:
                p.requires_grad_(False)
            stage1.train(model, x, y, ctx.generator, poison, self.projector(model, ctx, self.radius_contrastive),
                         lambda m, xb, yb: self.contrastive_loss(m, xb, yb, target))  # fmt: skip
            for p in head:
                p.requires_grad_(True)
        # stage 2: cross-entropy on poisoned batches, only the linear head trains
        head_ids = {id(p) for p in model.head.parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) in head_ids)
        clean_start = self.accuracy(model, x, y)

        def early_stop(m: nn.Module, epoch: int, loss: float) -> bool:
            return loss <= self.early_stop_loss and self.accuracy(m, x, y) >= clean_start

        stage2 = LocalTrainer(self.head_lr, base.momentum, self.head_weight_decay, self.head_epochs,
                              base.batch_size, None, self.head_milestones, self.head_gamma)  # fmt: skip
        stage2.train(model, x, y, ctx.generator, poison, self.projector(model, ctx, self.radius),
                     after_epoch=early_stop)  # fmt: skip


__all__ = ["ChameleonAttack"]
