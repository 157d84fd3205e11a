"""FedSelect: personalized FL that grows each client's personal subnetwork during training.

Tamirisa, Xie, Bao, Wang, Wang & Zhao, "FedSelect: Personalized Federated Learning with Customized Selection of
Parameters for Fine-Tuning", CVPR 2024 (arXiv 2404.02478; official code ``lapisrocks/fedselect``). Instead of
fixing the personal layers in advance (FedPer, LG-FedAvg), every client starts fully shared and, every
``period`` rounds, turns the ``growth_rate`` fraction of its still-shared weights that changed most since its
last mask update into personal ones, up to ``cap`` of each weight tensor ("GradSelect", inspired by the lottery
ticket hypothesis). Local training is LocalAlt: per local epoch, one pass that updates only the personal entries,
then one that updates only the shared entries. The server averages each entry over the clients that share it and
broadcasts it to those clients only.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_modules.federated.aggregators import Aggregator
from lightning_modules.federated.local import ClientContext, LocalTrainer
from lightning_modules.ops.fedselect import grow_personal_mask, restore_inactive
from lightning_modules.pfl import PersonalizedFedAvg


class FedSelect(PersonalizedFedAvg):
    """FedSelect (Tamirisa et al., CVPR 2024), on :class:`~lightning_modules.pfl.PersonalizedFedAvg`.

    - **Masks.** One boolean mask per client over the parameters, all shared (``False``) at the start; only
      tensors whose name contains ``select`` (the official ``"weight"``: conv/linear weights, not biases) can
      become personal. Masks, client models and the reference weights of the growth rule are checkpointed.
    - **LocalAlt.** ``local.local_epochs`` alternations of a personal-only pass and a shared-only pass over the
      client's data (the official code: 15 alternations, plain SGD at lr 0.05). A pass updates only its
      entries, whatever the optimizer: the others are restored after every step. A personal pass with no
      personal entry (before the first growth) is skipped: it would change nothing.
    - **Growth** (after local training in rounds ``t > 0`` with ``t % period == 0``): per eligible tensor,
      :func:`~lightning_modules.ops.fedselect.grow_personal_mask` on ``|theta_now - theta_ref|`` (``theta_ref``:
      the client's weights at its previous growth, at first the initial model), then ``theta_ref = theta_now``.
    - **Aggregation/broadcast.** The round's average uses the masks in force during its training (as the official
      code); the broadcast uses the grown mask, so an entry is never overwritten by the server once it is personal
      (the official code broadcasts once more with the old mask).

    Args:
        net: the model (e.g. ``MnistCNN``).
        growth_rate: p, fraction of a tensor's shared entries turned personal per growth (official 0.25).
        cap: alpha, the largest personal fraction of each tensor (official 0.8).
        period: rounds between growths (official ``lth_epoch_iters`` = 3).
        select: substring of the parameter names that may become personal (official ``weight``).

    The arguments of :class:`~lightning_modules.pfl.PersonalizedFedAvg` pass through (``local.local_epochs`` =
    LocalAlt alternations).

    Official code (``lapisrocks/fedselect@0949f8a``), matched by ``configs/fedselect/``:

    - the budget, ``utils/options.py``: ``"--la_epochs", type=int, default=15, help="rounds of training for local
      alt optimization"``, used in ``fedselect.py:80-86``: ``epochs = args.la_epochs`` / ``for i in
      range(epochs):`` / ``train_loss = local_alt(`` (one personal and one shared pass each);
    - the knobs, ``utils/options.py``: ``"--lth_epoch_iters", default=3``, ``"--prune_percent", default=25``,
      ``"--prune_target", default=80``, ``"--shard_per_user", type=int, default=2``;
    - the evaluation (``eval_model: local``), ``fedselect.py``: ``cross_client_acc = cross_client_eval(`` runs
      after local training and before ``# Server broadcasts non lottery ticket parameters u_i to every device``,
      which is skipped in the last round (``if round_num < com_rounds - 1:``).
    """

    def __init__(
        self, net: nn.Module, growth_rate: float = 0.25, cap: float = 0.8, period: int = 3, select: str = "weight",
        **kwargs,
    ):  # fmt: skip
        super().__init__(net=net, **kwargs)
        if not (0.0 < growth_rate <= 1.0 and 0.0 <= cap <= 1.0 and period >= 1):
            raise ValueError(f"FedSelect needs 0 < growth_rate <= 1, 0 <= cap <= 1 and period >= 1, got "
                             f"{growth_rate}, {cap}, {period}")  # fmt: skip
        self.growth_rate, self.cap, self.period, self.select = growth_rate, cap, period, select

    def check_setup(self, dm: Any) -> None:
        super().check_setup(dm)
        if not any(self.select in n for n, _ in self.net.named_parameters()):
            raise ValueError(f"select={self.select!r} matches no parameter of {[n for n, _ in self.net.named_parameters()]}")

    def on_fit_start(self) -> None:
        fresh = not self.clients
        super().on_fit_start()
        if fresh:
            self.clients["reference"] = self.clients["params"].clone()

    def local_update(self, model: nn.Module, x: Tensor, y: Tensor, ctx: ClientContext) -> None:
        """LocalAlt: per alternation, a pass over the personal entries, then one over the shared entries."""
        personal = self.clients["personal"][ctx.client]
        one_pass = self.local.with_overrides(local_epochs=1)
        for _ in range(self.local.local_epochs):
            for active in (personal, ~personal):
                if active.any():
                    one_pass.train(model, x, y, ctx.generator, after_step=restore_inactive(model, active),
                                   pad_value=ctx.pad_value)

    def after_local_update(self, round: int, client: int) -> None:
        """Grow the client's mask every ``period`` rounds (not in round 0), per eligible tensor."""
        if round == 0 or round % self.period:
            return
        now, ref = self.clients["params"][client], self.clients["reference"][client]
        mask = self.clients["personal"][client]
        offset = 0
        for name, p in self.net.named_parameters():
            sl = slice(offset, offset + p.numel())
            if self.select in name:
                mask[sl] = grow_personal_mask(mask[sl], now[sl] - ref[sl], self.growth_rate, self.cap)
            offset += p.numel()
        self.clients["reference"][client] = now.clone()

    def personal_fraction(self) -> Tensor:
        """Per client, the personal fraction of the eligible (``select``) entries ``[N]``."""
        eligible = torch.cat([torch.full((p.numel(),), self.select in n, device=self.device)
                              for n, p in self.net.named_parameters()])  # fmt: skip
        return self.clients["personal"][:, eligible].float().mean(1)

    def compute_round(self, round: int, dm: Any) -> dict[str, Any]:
        out = super().compute_round(round, dm)
        out["info"]["personal_fraction_eligible"] = self.personal_fraction().mean()
        return out
