"""Attacks of malicious clients: naive data poisoning (with optional boosting), PGD-constrained poisoning and
Neurotoxin. A new attack subclasses :class:`Attack` and overrides ``local_train`` (e.g. Chameleon's two-stage
local training) and/or ``post_process``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector

from lightning_modules.federated.local import ClientContext
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
    """

    malicious_clients: list[int]
    attack_rounds: list[int] | None = None
    start_round: int = 0
    end_round: int | None = None
    force_participation: bool = True
    scale: float = 1.0

    def __post_init__(self) -> None:
        self.malicious_clients = [int(c) for c in self.malicious_clients]
        if self.attack_rounds is not None:
            self.attack_rounds = sorted({int(r) for r in self.attack_rounds})

    def is_active(self, round: int) -> bool:
        if self.attack_rounds is not None:
            return round in self.attack_rounds
        return round >= self.start_round and (self.end_round is None or round < self.end_round)


class Attack:
    """A set of malicious clients and the rounds in which they attack (an :class:`AttackSchedule`); subclasses
    define the local training (:meth:`local_train`) and may edit the update (:meth:`post_process`).

    Args:
        schedule: who attacks, when and how hard.
    """

    def __init__(self, schedule: AttackSchedule):
        self.schedule = schedule

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
        return self.schedule.is_active(round)

    def local_train(self, model: nn.Module, x: Tensor, y: Tensor, ctx: ClientContext) -> None:
        """Turn ``model`` (a copy of the global model) into the malicious local model, in place."""
        raise NotImplementedError

    def post_process(self, update: Tensor, ctx: ClientContext) -> Tensor:
        """Edit the flat malicious update ``θ − G`` before it is sent (here: boosting by ``schedule.scale``)."""
        return update * self.scale if self.scale != 1.0 else update

    def state_dict(self) -> dict[str, Any]:
        """Attack state to checkpoint (none by default)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


class NaivePoisoning(Attack):
    """BadNets data poisoning (Gu et al. 2017) by a malicious client, optionally boosted (model replacement,
    Bagdasaryan et al., "How To Backdoor Federated Learning", AISTATS 2020: ``Δ ← scale · Δ``, with
    ``scale ≈ n / server_lr`` replacing the global model).

    Args:
        poison_fraction: fraction of each local batch that gets the trigger and the target label.
        lr: local learning rate (``None``: the benign trainer's).
        local_epochs: local epochs (``None``: the benign trainer's).

    ``schedule`` (who, when, how hard) passes through to :class:`Attack`.
    """

    def __init__(
        self, poison_fraction: float = 0.5, lr: float | None = None, local_epochs: int | None = None, **kwargs
    ):  # fmt: skip
        super().__init__(**kwargs)
        if not 0.0 < poison_fraction <= 1.0:
            raise ValueError(f"poison_fraction must be in (0, 1], got {poison_fraction}")
        self.poison_fraction, self.lr, self.local_epochs = poison_fraction, lr, local_epochs

    def constraint(self, model: nn.Module, x: Tensor, y: Tensor, ctx: ClientContext) -> Callable | None:
        """The projection applied after every local step (none for naive poisoning)."""
        return None

    def local_train(self, model, x, y, ctx):
        after_step = self.constraint(model, x, y, ctx)
        poison = lambda xb, yb: ctx.datamodule.poison_batch(xb, yb, self.poison_fraction)  # noqa: E731
        ctx.local.with_overrides(self.lr, self.local_epochs).train(model, x, y, ctx.generator, poison, after_step)


class PGDPoisoning(NaivePoisoning):
    """Norm-constrained poisoning (projected gradient descent): after every local step the model is projected
    onto the L2 ball of radius ``radius`` around the global model, and so is the final (scaled) update
    (Sun et al. 2019; Wang et al., "Attack of the Tails", NeurIPS 2020). Evades norm clipping at M ≥ radius.

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
    not overwrite the backdoor. The top ``1 − keep_ratio`` coordinates by ``|benign update|`` are frozen at
    the global value after every step (exactly zero there), then the PGD projection is applied.

    The benign update is estimated, by default, from the previous round's server step ``G_t − G_{t−1}``
    (observable by any client from two broadcasts); ``mask_source="clean_data"`` uses instead the gradient
    on the attacker's own clean data at G, as the official code does (there from 30 clean clients). In the
    first round (no previous step) the clean-data gradient is used.

    Args:
        keep_ratio: fraction of coordinates the attacker may change (official ``gradmask_ratio``).
        mask_source: ``previous_round`` or ``clean_data``.
        radius: L2 radius of the update (``inf``: no projection).

    The arguments of :class:`NaivePoisoning` pass through.
    """

    def __init__(
        self, keep_ratio: float = 0.99, mask_source: Literal["previous_round", "clean_data"] = "previous_round",
        radius: float = float("inf"), **kwargs,
    ):  # fmt: skip
        super().__init__(radius=radius, **kwargs)
        if mask_source not in ("previous_round", "clean_data"):
            raise ValueError(f"mask_source must be 'previous_round' or 'clean_data', got {mask_source!r}")
        self.keep_ratio, self.mask_source = keep_ratio, mask_source

    def benign_estimate(self, model: nn.Module, x: Tensor, y: Tensor, ctx: ClientContext) -> Tensor:
        if self.mask_source == "previous_round" and ctx.last_server_update is not None:
            return ctx.last_server_update
        model.zero_grad(set_to_none=True)
        for start in range(0, len(y), ctx.local.batch_size):
            sl = slice(start, start + ctx.local.batch_size)
            F.cross_entropy(model(x[sl]), y[sl], reduction="sum").backward()
        grad = parameters_to_vector([p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()])
        model.zero_grad(set_to_none=True)
        return grad

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
