"""Attacks of malicious clients: naive data poisoning (with optional boosting), PGD-constrained poisoning (with the
official local schedule of Chameleon's "Baseline" attacker as an option) and Neurotoxin. A new attack subclasses
:class:`Attack` and overrides ``local_train`` (e.g. Chameleon's two-stage local training) and/or ``post_process``.

Official lines quoted below are from ybdai7/Chameleon-durable-backdoor at commit c74618a (the baselines of the
Chameleon paper are run by its ``training.py``, see ``commands.sh``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector

from lightning_modules.federated.local import ClientContext, LocalTrainer
from lightning_modules.ops.fl_attacks import neurotoxin_mask, project_l2_ball, project_params_l2_


@dataclass
class AttackSchedule:
    """Who attacks, when, and how hard: the argument group every federated attack shares (``schedule:`` in a
    config, e.g. ``{malicious_clients: [0], start_round: 30, end_round: 40}``).

    Args:
        malicious_clients: ids of the malicious clients.
        attack_rounds: explicit list of attack rounds (0-based); overrides the window.
        start_round: first attack round of the window.
        end_round: end of the window, exclusive (``None``: until the end).
        force_participation: in an attack round every malicious client takes part (the fixed-frequency
            attacker of Sun et al. 2019 and Chameleon); otherwise they attack only when sampled.
        scale: factor applied to the malicious update before it is sent (1: no boosting; ``n / server_lr``
            replaces the global model, Bagdasaryan et al., AISTATS 2020).
        stop_at_ba: end the window early, after the first attack round whose server step leaves the global
            model's backdoor accuracy (on the triggered test set) at or above this level, so that attacks of
            different strength hand over equally planted backdoors to the decay phase (``end_round`` /
            ``attack_rounds`` stay the cap; ``None``: the fixed window).
    """

    malicious_clients: list[int]
    attack_rounds: list[int] | None = None
    start_round: int = 0
    end_round: int | None = None
    force_participation: bool = True
    scale: float = 1.0
    stop_at_ba: float | None = None

    def __post_init__(self) -> None:
        self.malicious_clients = [int(c) for c in self.malicious_clients]
        if self.attack_rounds is not None:
            self.attack_rounds = sorted({int(r) for r in self.attack_rounds})
        if self.stop_at_ba is not None and not 0.0 < self.stop_at_ba <= 1.0:
            raise ValueError(f"stop_at_ba must be in (0, 1], got {self.stop_at_ba}")

    def is_active(self, round: int) -> bool:
        if not self.malicious_clients:  # a clean continuation run through an attack config: no one attacks
            return False
        if self.attack_rounds is not None:
            return round in self.attack_rounds
        return round >= self.start_round and (self.end_round is None or round < self.end_round)

    def window_end(self) -> int | None:
        """The round after the last attack round (``None``: the window never closes)."""
        if self.attack_rounds is not None:
            return self.attack_rounds[-1] + 1 if self.attack_rounds else 0
        return self.end_round


@dataclass
class AttackerData:
    """The images a malicious client trains on.

    Args:
        source: ``own``: its partition of the federation; ``iid``: a fixed IID sample of the whole training set,
            ``batches`` local batches of distinct images each, drawn once per federation and client (from the
            data seed), as the official attacker (image_helper.py, ``poison_dataset``: ``for batches in range(0,
            self.params['size_of_secret_dataset']):`` / ``range_iter = random.sample(range_no_id,
            self.params['batch_size'])``, over all 50,000 training images).
        batches: size of the ``iid`` sample in local batches (official ``size_of_secret_dataset``, 25 for the
            pixel trigger: 1,600 images at batch size 64).
    """

    source: Literal["own", "iid"] = "own"
    batches: int = 25

    def __post_init__(self) -> None:
        if self.source not in ("own", "iid") or self.batches < 1:
            raise ValueError(f"attacker_data needs source 'own' or 'iid' and batches >= 1, got {self}")


@torch.no_grad()
def clean_accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> float:
    """Accuracy of ``model`` on ``(x, y)`` in eval mode (the mode is restored)."""
    was_training = model.training
    model.eval()
    correct = sum(int((model(x[i : i + batch_size]).argmax(-1) == y[i : i + batch_size]).sum())
                  for i in range(0, len(y), batch_size))  # fmt: skip
    model.train(was_training)
    return correct / max(len(y), 1)


class Attack:
    """A set of malicious clients and the rounds in which they attack (an :class:`AttackSchedule`); subclasses
    define the local training (:meth:`local_train`) and may edit the update (:meth:`post_process`).

    Args:
        schedule: who attacks, when and how hard.
        attacker_data: which images the malicious clients train on (default: their own partition).
    """

    def __init__(self, schedule: AttackSchedule, attacker_data: AttackerData | None = None):
        self.schedule, self.attacker_data = schedule, attacker_data or AttackerData()
        self.stopped_at: int | None = None  # set by stop(): the window closed early (schedule.stop_at_ba)

    @property
    def malicious_clients(self) -> list[int]:
        return self.schedule.malicious_clients

    @property
    def force_participation(self) -> bool:
        return self.schedule.force_participation

    @property
    def scale(self) -> float:
        return self.schedule.scale

    def check(self, num_clients: int, clients_per_round: int) -> None:
        """Raise ``ValueError`` on ids out of range, duplicates, or more attackers than fit in a round."""
        bad = [c for c in self.malicious_clients if not 0 <= c < num_clients]
        if bad or len(set(self.malicious_clients)) != len(self.malicious_clients):
            raise ValueError(f"malicious_clients {self.malicious_clients} must be distinct ids in [0, {num_clients})")
        if self.force_participation and len(self.malicious_clients) > clients_per_round:
            raise ValueError(
                f"{len(self.malicious_clients)} malicious clients cannot all take part in rounds of "
                f"{clients_per_round} clients; raise clients_per_round or set force_participation: false"
            )

    def is_active(self, round: int) -> bool:
        return self.schedule.is_active(round) and (self.stopped_at is None or round < self.stopped_at)

    def window_end(self) -> int | None:
        """The round after the last attack round: the start of the decay phase (``None``: never)."""
        return self.stopped_at if self.stopped_at is not None else self.schedule.window_end()

    def stop(self, round: int) -> None:
        """Close the window before round ``round`` (no attack from then on)."""
        self.stopped_at = round

    def training_data(self, x: Tensor, y: Tensor, ctx: ClientContext) -> tuple[Tensor, Tensor]:
        """The images the malicious client trains on in this round (see :class:`AttackerData`)."""
        if self.attacker_data.source == "own":
            return x, y
        dm = ctx.datamodule
        g = torch.Generator().manual_seed(int(getattr(dm, "seed", 0)) * 1_000_003 + ctx.client)
        n, bs = len(dm.train_y), ctx.local.batch_size
        idx = torch.cat([torch.randperm(n, generator=g)[:bs] for _ in range(self.attacker_data.batches)])
        return dm.train_x[idx].to(x.device), dm.train_y[idx].to(y.device)

    def local_train(self, model: nn.Module, x: Tensor, y: Tensor, ctx: ClientContext) -> None:
        """Turn ``model`` (a copy of the global model) into the malicious local model, in place."""
        raise NotImplementedError

    def post_process(self, update: Tensor, ctx: ClientContext) -> Tensor:
        """Edit the flat malicious update ``θ − G`` before it is sent (here: boosting by ``schedule.scale``)."""
        return update * self.scale if self.scale != 1.0 else update

    def state_dict(self) -> dict[str, Any]:
        """Attack state to checkpoint (where an early-stopped window closed)."""
        return {"stopped_at": self.stopped_at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.stopped_at = state.get("stopped_at")


class NaivePoisoning(Attack):
    """BadNets data poisoning (Gu et al. 2017) by a malicious client, optionally boosted (model replacement,
    Bagdasaryan et al., "How To Backdoor Federated Learning", AISTATS 2020: ``Δ ← scale · Δ``, with
    ``scale ≈ n / server_lr`` replacing the global model).

    The local training is the benign trainer's, with the settings below replaced where given (``None`` keeps
    the benign value). The official "Baseline" attacker of Chameleon's code is this with
    ``lr=0.1, local_epochs=5, lr_milestones=[3, 5], lr_gamma=0.01, step_lr_at_epoch_start=True``, projected
    (:class:`PGDPoisoning`); see ``configs/fl/attacks/baseline.yaml``.

    Args:
        poison_fraction: fraction of each local batch that gets the trigger and the target label (official
            ``poison_batch_len`` 7 of 64 ≈ 0.109).
        lr: local learning rate.
        local_epochs: local epochs.
        lr_milestones: local epochs at which the lr is multiplied by ``lr_gamma``.
        lr_gamma: the lr decay factor.
        step_lr_at_epoch_start: milestones count started epochs (the official loop) instead of completed ones.
        poison_noise_std: std of the Gaussian noise added to the poisoned images (official ``noise_level``
            0.01: training.py, ``batch[0][poison_pos].add_(torch.FloatTensor(batch[0][poison_pos].shape)
            .normal_(0, helper.params['noise_level']))``, in every attacker's loop).
        early_stop_loss: stop after an epoch whose mean poisoned-batch loss is at most this while the clean
            accuracy on the attacker's data is not below its start (official 1e-4: ``if loss_p<=0.0001:`` /
            ``if helper.params['type'] == 'image' and acc<acc_initial:`` ... ``continue`` / ``raise
            ValueError()``, there on the poisoned and clean test sets; ``None``: never).

    ``schedule`` (who, when, how hard) and ``attacker_data`` pass through to :class:`Attack`.
    """

    def __init__(
        self, poison_fraction: float = 0.5, lr: float | None = None, local_epochs: int | None = None,
        lr_milestones: list[int] | None = None, lr_gamma: float | None = None,
        step_lr_at_epoch_start: bool | None = None, poison_noise_std: float = 0.0,
        early_stop_loss: float | None = None, **kwargs,
    ):  # fmt: skip
        super().__init__(**kwargs)
        if not 0.0 < poison_fraction <= 1.0:
            raise ValueError(f"poison_fraction must be in (0, 1], got {poison_fraction}")
        self.poison_fraction, self.lr, self.local_epochs = poison_fraction, lr, local_epochs
        self.lr_milestones, self.lr_gamma, self.step_lr_at_epoch_start = lr_milestones, lr_gamma, step_lr_at_epoch_start
        self.poison_noise_std, self.early_stop_loss = poison_noise_std, early_stop_loss

    def poison(self, ctx: ClientContext) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """Batch transform: the first ``poison_fraction`` of the batch gets the trigger and the target label, plus
        N(0, ``poison_noise_std``²) noise drawn from the client's generator (so rounds are reproducible)."""

        def transform(xb: Tensor, yb: Tensor) -> tuple[Tensor, Tensor]:
            xb, yb = ctx.datamodule.poison_batch(xb, yb, self.poison_fraction)
            k = round(self.poison_fraction * len(xb))
            if self.poison_noise_std > 0 and k > 0:
                noise = torch.randn(xb[:k].shape, generator=ctx.generator).to(xb.device, xb.dtype)
                xb = torch.cat([xb[:k] + self.poison_noise_std * noise, xb[k:]])
            return xb, yb

        return transform

    def early_stop(self, model: nn.Module, x: Tensor, y: Tensor) -> Callable[[nn.Module, int, float], bool] | None:
        """The ``after_epoch`` hook of ``early_stop_loss`` (``None`` when it is off)."""
        if self.early_stop_loss is None:
            return None
        clean_start = clean_accuracy(model, x, y)
        return lambda m, epoch, loss: loss <= self.early_stop_loss and clean_accuracy(m, x, y) >= clean_start

    def constraint(self, model: nn.Module, x: Tensor, y: Tensor, ctx: ClientContext) -> Callable | None:
        """The projection applied after every local step (none for naive poisoning)."""
        return None

    def local_trainer(self, ctx: ClientContext) -> LocalTrainer:
        """The round's benign trainer with this attack's settings."""
        return ctx.local.with_overrides(
            lr=self.lr, local_epochs=self.local_epochs, lr_milestones=self.lr_milestones, lr_gamma=self.lr_gamma,
            step_lr_at_epoch_start=self.step_lr_at_epoch_start,
        )  # fmt: skip

    def local_train(self, model, x, y, ctx):
        after_step = self.constraint(model, x, y, ctx)
        self.local_trainer(ctx).train(model, x, y, ctx.generator, self.poison(ctx), after_step,
                                      after_epoch=self.early_stop(model, x, y), pad_value=ctx.pad_value)  # fmt: skip


class PGDPoisoning(NaivePoisoning):
    """Norm-constrained poisoning (projected gradient descent): after every local step the model is projected
    onto the L2 ball of radius ``radius`` around the global model, and so is the final (scaled) update
    (Sun et al. 2019; Wang et al., "Attack of the Tails", NeurIPS 2020). Evades norm clipping at M ≥ radius.
    The official code projects the same way, after every step and once more at the end (training.py,
    ``if helper.params['diff_privacy']:`` / ``if model_norm > helper.params['s_norm']:``).

    Args:
        radius: L2 radius of the update (``schedule.scale`` is applied before the final projection).

    The arguments of :class:`NaivePoisoning` pass through.
    """

    def __init__(self, radius: float = 3.0, **kwargs):
        super().__init__(**kwargs)
        self.radius = radius

    def constraint(self, model, x, y, ctx):
        params = list(model.parameters())
        return lambda m: project_params_l2_(params, ctx.global_params, self.radius)

    def post_process(self, update, ctx):
        return project_l2_ball(super().post_process(update, ctx), torch.zeros_like(update), self.radius)


class Neurotoxin(PGDPoisoning):
    """Neurotoxin (Zhang et al., "Neurotoxin: Durable Backdoors in Federated Learning", ICML 2022): the
    malicious update is confined to the coordinates benign clients change least, so later benign rounds do
    not overwrite the backdoor. The top ``1 − keep_ratio`` coordinates by ``|benign estimate|`` (one ranking
    over all layers) are frozen at the global value after every step (exactly zero there), then the PGD
    projection is applied.

    The benign estimate (``mask_source``):

    - ``previous_round``: the previous round's server step ``G_t − G_{t−1}`` (observable by any client from two
      broadcasts; the clean-data gradient in the first round);
    - ``clean_data``: the gradient of the cross-entropy on the attacker's own clean data at G;
    - ``clean_clients``: the official one, recomputed every attack round: the gradient at G summed over the
      batches (batch-mean loss) of ``mask_clients`` random benign clients (ybdai7/Chameleon-durable-backdoor@83e8f13,
      training.py: ``num_clean_data = 30``
      / ``subset_data_chunks_mask = random.sample(range(1,helper.params['number_of_total_participants']),
      num_clean_data)``; helper.py ``grad_mask_cv``: ``loss = criterion(output, labels)`` /
      ``loss.backward(retain_graph=True)`` over every batch, then ``torch.topk(-1*grad_list,
      int(len(grad_list)*ratio))`` over all layers, ``aggregate_all_layer: 1``). It runs in train mode as there;
      BatchNorm statistics are restored afterwards (the official code leaves them updated in the global model).
      The mask is computed once per round and shared by the round's colluders, as the official loop does
      (same commit, training.py: ``if helper.params['gradmask_ratio'] != 1 :`` …
      ``mask_grad_list = helper.grad_mask_cv(...)`` before ``weight_accumulator = train(...)`` trains the round's
      participants); the 30 clients are drawn with the round's shared seed (``ClientContext.round_seed``), so
      every rank of a distributed run draws the same ones.

    The official code multiplies the gradients by the mask before each step (``apply_grad_mask``), so weight
    decay and momentum still move masked coordinates slightly; here they stay exactly at the global value.

    Args:
        keep_ratio: fraction of coordinates the attacker may change (official ``gradmask_ratio``, 0.99).
        mask_source: ``previous_round``, ``clean_data`` or ``clean_clients``.
        mask_clients: benign clients whose data estimate the mask for ``clean_clients`` (official 30).
        radius: L2 radius of the update (``inf``: no projection).

    The arguments of :class:`NaivePoisoning` pass through.
    """

    def __init__(
        self, keep_ratio: float = 0.99,
        mask_source: Literal["previous_round", "clean_data", "clean_clients"] = "previous_round",
        mask_clients: int = 30, radius: float = float("inf"), **kwargs,
    ):  # fmt: skip
        super().__init__(radius=radius, **kwargs)
        if mask_source not in ("previous_round", "clean_data", "clean_clients"):
            raise ValueError(
                f"mask_source must be 'previous_round', 'clean_data' or 'clean_clients', got {mask_source!r}"
            )
        if mask_clients < 1:
            raise ValueError(f"mask_clients must be >= 1, got {mask_clients}")
        self.keep_ratio, self.mask_source, self.mask_clients = keep_ratio, mask_source, mask_clients
        self._round_estimate: tuple[tuple, Tensor] | None = None  # (round key, estimate) for the round's colluders

    @staticmethod
    def clean_gradient(model: nn.Module, data: list[tuple[Tensor, Tensor]], batch_size: int, mean: bool) -> Tensor:
        """The flat gradient at ``model`` of the cross-entropy over ``data``, batch by batch (``mean``: each batch's
        mean loss, summed over batches, as the official mask; otherwise the summed loss)."""
        model.zero_grad(set_to_none=True)
        for xc, yc in data:
            for start in range(0, len(yc), batch_size):
                sl = slice(start, start + batch_size)
                F.cross_entropy(model(xc[sl]), yc[sl], reduction="mean" if mean else "sum").backward()
        grad = parameters_to_vector([p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()])
        model.zero_grad(set_to_none=True)
        return grad

    @staticmethod
    def train_mode_gradient(model: nn.Module, data: list[tuple[Tensor, Tensor]], batch_size: int) -> Tensor:
        """:meth:`clean_gradient` with batch-mean losses in train mode, as the official mask (``model.train()``),
        with the buffers restored afterwards so BatchNorm statistics do not move."""
        buffers = [b.detach().clone() for b in model.buffers()]
        was_training = model.training
        model.train()
        with torch.enable_grad():
            grad = Neurotoxin.clean_gradient(model, data, batch_size, mean=True)
        with torch.no_grad():
            for b, saved in zip(model.buffers(), buffers):
                b.copy_(saved)
        model.train(was_training)
        return grad

    def benign_estimate(self, model: nn.Module, x: Tensor, y: Tensor, ctx: ClientContext) -> Tensor:
        if self.mask_source == "previous_round" and ctx.last_server_update is not None:
            return ctx.last_server_update
        if self.mask_source != "clean_clients":
            return self.clean_gradient(model, [(x, y)], ctx.local.batch_size, mean=False)
        key = (ctx.round, ctx.round_seed, float(ctx.global_flat.sum()))  # the round and its global model
        if self._round_estimate is not None and self._round_estimate[0] == key:
            return self._round_estimate[1]  # another colluder of this round computed it
        dm, device = ctx.datamodule, ctx.global_flat.device
        pool = [c for c in range(dm.num_clients) if c not in set(self.malicious_clients)]
        g = torch.Generator().manual_seed(ctx.round_seed)
        chosen = [pool[i] for i in torch.randperm(len(pool), generator=g)[: self.mask_clients].tolist()]
        data = [tuple(t.to(device) for t in dm.client_data(c)) for c in chosen]
        estimate = self.train_mode_gradient(model, data, ctx.local.batch_size)
        self._round_estimate = (key, estimate)
        return estimate

    def constraint(self, model, x, y, ctx):
        keep = neurotoxin_mask(self.benign_estimate(model, x, y, ctx), self.keep_ratio)
        params = list(model.parameters())
        masks = [m.view_as(p) for m, p in zip(keep.split([p.numel() for p in params]), params)]
        project = super().constraint(model, x, y, ctx) if self.radius < float("inf") else None

        @torch.no_grad()
        def after_step(m: nn.Module) -> None:
            for p, g, k in zip(params, ctx.global_params, masks):
                p.copy_(torch.where(k, p, g))
            if project is not None:
                project(m)

        return after_step

    def post_process(self, update, ctx):
        if self.radius < float("inf"):
            return super().post_process(update, ctx)
        return Attack.post_process(self, update, ctx)
