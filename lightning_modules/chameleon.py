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
``radius`` (:meth:`PGDPoisoning.post_process`). Defaults follow the official pixel-pattern configuration
(ybdai7/Chameleon-durable-backdoor@c74618a, ``utils/params_pixel_trigger_cifar10.yaml`` and ``commands.sh``); each
is named below. Both stages step their lr schedule before each epoch, as the official loops do
(``for internal_epoch in range(1, retrain_no_times + 1):`` / ``if step_lr:`` / ``scheduler.step()``), and both use
SGD with the benign momentum 0.9.

The model must expose ``features(x)`` (the encoder) and ``head`` (the linear classifier), like
:class:`~lightning_modules.nets.cnn.MnistCNN`.
"""

from __future__ import annotations

from torch import Tensor, nn

from lightning_modules.federated.attacks import PGDPoisoning
from lightning_modules.federated.local import ClientContext
from lightning_modules.ops.contrastive import supcon_loss
from lightning_modules.ops.fl_attacks import project_params_l2_


class ChameleonAttack(PGDPoisoning):
    """Chameleon's two-stage local training for the malicious clients (see the module docstring).

    ``schedule`` (:class:`~lightning_modules.federated.attacks.AttackSchedule`: the paper has one attacker that
    takes part in every attack round; ``scale`` is the official ``scale_weights``, 1) and ``attacker_data``
    (official: ``{source: iid, batches: 25}``, a fixed IID sample of the training set) pass through to
    :class:`~lightning_modules.federated.attacks.Attack`.

    Args:
        poison_fraction: fraction of each local batch poisoned (official ``poison_batch_len`` 7 of 64 ≈ 0.11).
        poison_noise_std: std of the Gaussian noise added to poisoned images (official ``noise_level`` 0.01).
        contrastive_epochs: stage-1 epochs (official ``retrain_poison_contrastive`` 10).
        contrastive_lr: stage-1 SGD learning rate (official ``poison_lr_contrastive`` 0.005 for the pixel
            pattern).
        contrastive_milestones: stage-1 epochs where the lr is multiplied by 0.1 (official
            ``milestones_conrtastive`` [3, 5, 7, 9], ``lr_gamma_contrastive`` 0.1).
        contrastive_weight_decay: stage-1 weight decay (official ``decay_contrastive`` 5e-4).
        temperature: SupCon temperature τ (official 0.07).
        target_weight: up-weighting of target-label anchors' positive term (official
            ``contrastive_loss_scale_weight`` 6 for the pixel pattern).
        radius_contrastive: L2 ball radius around the global model during stage 1 (official
            ``s_norm_contrastive`` 5).
        head_epochs: stage-2 epochs (official ``retrain_poison`` 3).
        head_lr: stage-2 SGD learning rate (official ``poison_lr`` 0.001 for the pixel pattern).
        head_milestones: stage-2 milestones (official ``milestones`` [3, 5]).
        head_gamma: stage-2 lr decay factor (official ``lr_gamma`` 0.005).
        head_weight_decay: stage-2 weight decay: official 5e-4, the benign ``decay`` (training.py, the stage-2
            optimizer: ``poison_optimizer = torch.optim.SGD(filter(lambda p:p.requires_grad, model.parameters()),
            lr=poison_lr,`` / ``momentum=helper.params['momentum'],`` / ``weight_decay=helper.params['decay'])``;
            the yaml's ``poison_decay: 0.005`` is never read).
        step_lr_at_epoch_start: both stages' milestones count started epochs, as the official loops call
            ``scheduler.step()`` before each epoch (``False``: torch's completed-epoch use; see
            :class:`~lightning_modules.federated.local.LocalTrainer`).
        early_stop_loss: stage 2 stops after an epoch whose mean poisoned-batch loss is at most this while the
            clean accuracy on the attacker's data is not below its start (official 1e-4, there measured on the
            test sets; ``None``: never).
        radius: L2 radius of the final update and of stage 2 (official ``s_norm`` 5; the official server then
            clips it to ``norm_bound`` 3).
    """

    def __init__(
        self, poison_fraction: float = 7 / 64, poison_noise_std: float = 0.01, contrastive_epochs: int = 10,
        contrastive_lr: float = 0.005,
        contrastive_milestones: list[int] | None = None, contrastive_weight_decay: float = 5e-4,
        temperature: float = 0.07, target_weight: float = 6.0, radius_contrastive: float = 5.0,
        head_epochs: int = 3, head_lr: float = 0.001, head_milestones: list[int] | None = None,
        head_gamma: float = 0.005, head_weight_decay: float = 5e-4, early_stop_loss: float | None = 1e-4,
        step_lr_at_epoch_start: bool = True, radius: float = 5.0, **kwargs,
    ):  # fmt: skip
        super().__init__(radius=radius, poison_fraction=poison_fraction, poison_noise_std=poison_noise_std,
                         early_stop_loss=early_stop_loss, step_lr_at_epoch_start=step_lr_at_epoch_start, lr=None,
                         local_epochs=None, lr_milestones=None, lr_gamma=None, **kwargs)  # fmt: skip (own stages)
        if contrastive_epochs < 0 or head_epochs < 1:
            raise ValueError(f"need contrastive_epochs >= 0 and head_epochs >= 1, got {contrastive_epochs}, {head_epochs}")
        self.temperature, self.target_weight = temperature, target_weight
        self.contrastive_epochs, self.contrastive_lr = contrastive_epochs, contrastive_lr
        self.contrastive_milestones = [3, 5, 7, 9] if contrastive_milestones is None else list(contrastive_milestones)
        self.contrastive_weight_decay, self.radius_contrastive = contrastive_weight_decay, radius_contrastive
        self.head_epochs, self.head_lr, self.head_gamma = head_epochs, head_lr, head_gamma
        self.head_milestones = [3, 5] if head_milestones is None else list(head_milestones)
        self.head_weight_decay = head_weight_decay

    # ------------------------------------------------------------------------------------------ pieces
    def contrastive_loss(self, model: nn.Module, xb: Tensor, yb: Tensor, target: int) -> Tensor:
        """Stage-1 objective on the encoder features (override to change the loss, e.g. for an ablation)."""
        return supcon_loss(model.features(xb), yb, self.temperature, self.temperature, target, self.target_weight)

    def projector(self, model: nn.Module, ctx: ClientContext, radius: float):
        params = list(model.parameters())
        return lambda m: project_params_l2_(params, ctx.global_params, radius)

    # ------------------------------------------------------------------------------------------ the attack
    def local_train(self, model: nn.Module, x: Tensor, y: Tensor, ctx: ClientContext) -> None:
        if not (hasattr(model, "features") and isinstance(getattr(model, "head", None), nn.Module)):
            raise TypeError(f"Chameleon needs a model with features(x) and a head module, got {type(model).__name__}")
        target = ctx.datamodule.target_label
        poison = self.poison(ctx)
        if self.contrastive_epochs > 0:  # stage 1: supervised contrastive training of the encoder
            stage1 = ctx.local.with_overrides(
                lr=self.contrastive_lr, weight_decay=self.contrastive_weight_decay,
                local_epochs=self.contrastive_epochs, lr_milestones=self.contrastive_milestones, lr_gamma=0.1,
                step_lr_at_epoch_start=self.step_lr_at_epoch_start,
            )  # fmt: skip
            stage1.max_steps = None
            head = list(model.head.parameters())
            for p in head:
                p.requires_grad_(False)
            stage1.train(model, x, y, ctx.generator, poison, self.projector(model, ctx, self.radius_contrastive),
                         lambda m, xb, yb: self.contrastive_loss(m, xb, yb, target),
                         pad_value=ctx.pad_value)  # fmt: skip
            for p in head:
                p.requires_grad_(True)
        # stage 2: cross-entropy on poisoned batches, only the linear head trains
        head_ids = {id(p) for p in model.head.parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) in head_ids)
        stage2 = ctx.local.with_overrides(
            lr=self.head_lr, weight_decay=self.head_weight_decay, local_epochs=self.head_epochs,
            lr_milestones=self.head_milestones, lr_gamma=self.head_gamma,
            step_lr_at_epoch_start=self.step_lr_at_epoch_start,
        )  # fmt: skip
        stage2.max_steps = None
        stage2.train(model, x, y, ctx.generator, poison, self.projector(model, ctx, self.radius),
                     after_epoch=self.early_stop(model, x, y), pad_value=ctx.pad_value)  # fmt: skip


__all__ = ["ChameleonAttack"]
