"""Federated learning with backdoor attacks and robust aggregation: one Lightning training step = one round.

A round (McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
AISTATS 2017): sample clients -> each trains a copy of the global model G locally (a :class:`LocalTrainer`,
or an :class:`Attack` for a malicious client in an attack round) -> updates ``Δ_i = θ_i − G`` -> non-finite
updates are dropped -> an :class:`Aggregator` combines them -> server step ``G += server_lr · aggregate``
-> :class:`ServerDefense` hooks. Attacks, aggregators and defenses are injected objects, so any attack meets
any defense in a config. Extension points: subclass :class:`Attack` and override ``local_train`` (Chameleon:
two-stage local training) or ``post_process`` (scaling); subclass :class:`ServerDefense` (TrojanDam:
server-side training of G after aggregation); subclass :class:`Aggregator`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector
from torchmetrics.classification import MulticlassAccuracy

from lightning_modules.base import BaseRecipe
from lightning_modules.metrics import AttackSuccessRate
from lightning_modules.ops import aggregation as agg_ops
from lightning_modules.ops.fl_attacks import neurotoxin_mask, project_l2_ball, project_params_l2_


# ============================================================================================ aggregators
class Aggregator:
    """Server aggregation rule over client updates ``[n, d]``; thin wrappers of :mod:`lightning_modules.ops.aggregation`."""

    def check(self, num_clients_per_round: int) -> None:
        """Raise ``ValueError`` if the rule cannot work with this many clients per round."""

    def aggregate(
        self, updates: Tensor, weights: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Return the aggregate ``[d]`` and diagnostics; ``"admitted"`` holds the rows used (default: all)."""
        raise NotImplementedError


class FedAvg(Aggregator):
    """Federated averaging (McMahan et al. 2017).

    Args:
        weighted: weight clients by their number of samples; otherwise a plain mean.
    """

    def __init__(self, weighted: bool = True):
        self.weighted = weighted

    def aggregate(self, updates, weights, generator=None):
        return agg_ops.fedavg(updates, weights if self.weighted else None), {}


class NormClipping(FedAvg):
    """Norm bounding and weak differential privacy (Sun et al., "Can You Really Backdoor Federated Learning?",
    2019): each update is scaled into the L2 ball of radius ``max_norm``, then averaged, then Gaussian noise is
    added.

    Args:
        max_norm: clipping bound M.
        noise_std: std of the Gaussian noise added to the aggregate (0: no noise).
        weighted: weight clients by their number of samples.
    """

    def __init__(self, max_norm: float = 3.0, noise_std: float = 0.0, weighted: bool = True):
        super().__init__(weighted)
        self.max_norm, self.noise_std = max_norm, noise_std

    def aggregate(self, updates, weights, generator=None):
        clipped, norms = agg_ops.clip_by_norm(updates, self.max_norm)
        out, _ = super().aggregate(clipped, weights)
        if self.noise_std > 0:
            out = agg_ops.add_gaussian_noise(out, self.noise_std, generator)
        return out, {"clipped": (norms > self.max_norm).float().mean()}


class Median(Aggregator):
    """Coordinate-wise median (Yin et al., ICML 2018)."""

    def aggregate(self, updates, weights, generator=None):
        return agg_ops.coordinate_median(updates), {}


class TrimmedMean(Aggregator):
    """Coordinate-wise trimmed mean (Yin et al., ICML 2018).

    Args:
        trim_ratio: fraction of values cut from each end per coordinate, in ``[0, 0.5)``.
    """

    def __init__(self, trim_ratio: float = 0.1):
        if not 0.0 <= trim_ratio < 0.5:
            raise ValueError(f"trim_ratio must be in [0, 0.5), got {trim_ratio}")
        self.trim_ratio = trim_ratio

    def aggregate(self, updates, weights, generator=None):
        return agg_ops.trimmed_mean(updates, self.trim_ratio), {}


class Krum(Aggregator):
    """Krum, or Multi-Krum when ``num_selected > 1`` (Blanchard et al., NeurIPS 2017).

    Args:
        num_malicious: assumed number f of Byzantine clients per round; needs ``clients_per_round > 2f + 2``.
        num_selected: updates averaged (1: Krum).
    """

    def __init__(self, num_malicious: int = 1, num_selected: int = 1):
        self.num_malicious, self.num_selected = num_malicious, num_selected

    def check(self, num_clients_per_round: int) -> None:
        if num_clients_per_round <= 2 * self.num_malicious + 2:
            raise ValueError(
                f"Krum needs clients_per_round > 2 * num_malicious + 2, got {num_clients_per_round} <= "
                f"{2 * self.num_malicious + 2}; sample more clients per round or lower num_malicious"
            )
        if self.num_selected > num_clients_per_round:
            raise ValueError(f"Krum num_selected={self.num_selected} exceeds clients_per_round={num_clients_per_round}")

    def aggregate(self, updates, weights, generator=None):
        out, selected = agg_ops.krum(updates, self.num_malicious, self.num_selected)
        return out, {"admitted": selected}


class Flame(Aggregator):
    """FLAME: HDBSCAN filtering, adaptive clipping and noising (Nguyen et al., USENIX Security 2022).

    Args:
        noise_lambda: noise level λ (std = λ · median norm).
        min_cluster_size: HDBSCAN min_cluster_size (default: a strict majority of the round's clients).
    """

    def __init__(self, noise_lambda: float = 0.001, min_cluster_size: int | None = None):
        self.noise_lambda, self.min_cluster_size = noise_lambda, min_cluster_size

    def aggregate(self, updates, weights, generator=None):
        out, admitted = agg_ops.flame(updates, None, self.noise_lambda, self.min_cluster_size, generator)
        return out, {"admitted": admitted}


# ========================================================================================= local training
class LocalTrainer:
    """Benign local training: SGD with momentum and weight decay on cross-entropy, reshuffled every epoch.

    Args:
        lr: learning rate.
        momentum: SGD momentum.
        weight_decay: L2 weight decay.
        local_epochs: passes over the client's data.
        batch_size: local batch size.
        max_steps: stop after this many steps in total (``None``: run all epochs).
    """

    def __init__(
        self, lr: float = 0.05, momentum: float = 0.9, weight_decay: float = 5e-4, local_epochs: int = 1,
        batch_size: int = 64, max_steps: int | None = None,
    ):  # fmt: skip
        if lr <= 0 or local_epochs < 1 or batch_size < 1 or (max_steps is not None and max_steps < 1):
            raise ValueError("LocalTrainer needs lr > 0, local_epochs >= 1, batch_size >= 1 and max_steps >= 1")
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.local_epochs, self.batch_size, self.max_steps = local_epochs, batch_size, max_steps

    def with_overrides(self, lr: float | None = None, local_epochs: int | None = None) -> LocalTrainer:
        """A copy with another learning rate or epoch count (``None`` keeps this trainer's)."""
        out = copy.copy(self)
        out.lr = self.lr if lr is None else lr
        out.local_epochs = self.local_epochs if local_epochs is None else local_epochs
        return out

    def train(
        self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator,
        transform: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
        after_step: Callable[[nn.Module], None] | None = None,
        loss_fn: Callable[[nn.Module, Tensor, Tensor], Tensor] | None = None,
    ) -> None:  # fmt: skip
        """Train ``model``'s trainable parameters in place on ``(x, y)``. Hooks for attacks: ``transform`` edits
        each batch (poisoning), ``after_step`` runs after every optimizer step (projections), ``loss_fn(model,
        xb, yb)`` replaces the cross-entropy (e.g. a contrastive loss)."""
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        model.train()
        steps = 0
        for _ in range(self.local_epochs):
            perm = torch.randperm(len(y), generator=generator).to(y.device)
            for start in range(0, len(y), self.batch_size):
                idx = perm[start : start + self.batch_size]
                xb, yb = x[idx], y[idx]
                if transform is not None:
                    xb, yb = transform(xb, yb)
                loss = F.cross_entropy(model(xb), yb) if loss_fn is None else loss_fn(model, xb, yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if after_step is not None:
                    after_step(model)
                steps += 1
                if self.max_steps is not None and steps >= self.max_steps:
                    return


@dataclass
class ClientContext:
    """What a client knows in a round: the broadcast global model and the previous server step."""

    round: int
    client: int
    global_params: list[Tensor]  # the global model's parameters (read-only)
    global_flat: Tensor
    last_server_update: Tensor | None  # G_t − G_{t−1}, None in the first round
    datamodule: Any  # a FederatedDataModule (client data, poison_batch)
    local: LocalTrainer
    generator: torch.Generator


# ================================================================================================ attacks
class Attack:
    """A set of malicious clients and the rounds in which they attack; subclasses define the local training.

    Args:
        malicious_clients: ids of the malicious clients.
        attack_rounds: explicit list of attack rounds (0-based); overrides the window.
        start_round: first attack round of the window.
        end_round: end of the window, exclusive (``None``: until the end).
        force_participation: in an attack round every malicious client takes part (the fixed-frequency
            attacker of Sun et al. 2019 and Chameleon); otherwise they attack only when sampled.
    """

    def __init__(
        self, malicious_clients: list[int], attack_rounds: list[int] | None = None, start_round: int = 0,
        end_round: int | None = None, force_participation: bool = True,
    ):  # fmt: skip
        self.malicious_clients = [int(c) for c in malicious_clients]
        self.attack_rounds = None if attack_rounds is None else {int(r) for r in attack_rounds}
        self.start_round, self.end_round, self.force_participation = start_round, end_round, force_participation

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
        if self.attack_rounds is not None:
            return round in self.attack_rounds
        return round >= self.start_round and (self.end_round is None or round < self.end_round)

    def local_train(self, model: nn.Module, x: Tensor, y: Tensor, ctx: ClientContext) -> None:
        """Turn ``model`` (a copy of the global model) into the malicious local model, in place."""
        raise NotImplementedError

    def post_process(self, update: Tensor, ctx: ClientContext) -> Tensor:
        """Edit the flat malicious update ``θ − G`` before it is sent (scaling, projection)."""
        return update

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
        malicious_clients: ids of the malicious clients.
        poison_fraction: fraction of each local batch that gets the trigger and the target label.
        lr: local learning rate (``None``: the benign trainer's).
        local_epochs: local epochs (``None``: the benign trainer's).
        scale: factor applied to the malicious update (1: no boosting).
        attack_rounds: explicit attack rounds (overrides the window).
        start_round: first attack round.
        end_round: end of the attack window, exclusive.
        force_participation: malicious clients take part in every attack round.
    """

    def __init__(
        self, malicious_clients: list[int], poison_fraction: float = 0.5, lr: float | None = None,
        local_epochs: int | None = None, scale: float = 1.0, attack_rounds: list[int] | None = None,
        start_round: int = 0, end_round: int | None = None, force_participation: bool = True,
    ):  # fmt: skip
        super().__init__(malicious_clients, attack_rounds, start_round, end_round, force_participation)
        if not 0.0 < poison_fraction <= 1.0:
            raise ValueError(f"poison_fraction must be in (0, 1], got {poison_fraction}")
        self.poison_fraction, self.lr, self.local_epochs, self.scale = poison_fraction, lr, local_epochs, scale

    def constraint(self, model: nn.Module, x: Tensor, y: Tensor, ctx: ClientContext) -> Callable | None:
        """The projection applied after every local step (none for naive poisoning)."""
        return None

    def local_train(self, model, x, y, ctx):
        after_step = self.constraint(model, x, y, ctx)
        poison = lambda xb, yb: ctx.datamodule.poison_batch(xb, yb, self.poison_fraction)  # noqa: E731
        ctx.local.with_overrides(self.lr, self.local_epochs).train(model, x, y, ctx.generator, poison, after_step)

    def post_process(self, update, ctx):
        return update * self.scale if self.scale != 1.0 else update


class PGDPoisoning(NaivePoisoning):
    """Norm-constrained poisoning (projected gradient descent): after every local step the model is projected
    onto the L2 ball of radius ``radius`` around the global model, and so is the final (scaled) update
    (Sun et al. 2019; Wang et al., "Attack of the Tails", NeurIPS 2020). Evades norm clipping at M ≥ radius.

    Args:
        malicious_clients: ids of the malicious clients.
        radius: L2 radius of the update.
        poison_fraction: fraction of each local batch that is poisoned.
        lr: local learning rate (``None``: the benign trainer's).
        local_epochs: local epochs (``None``: the benign trainer's).
        scale: factor applied before the final projection.
        attack_rounds: explicit attack rounds (overrides the window).
        start_round: first attack round.
        end_round: end of the attack window, exclusive.
        force_participation: malicious clients take part in every attack round.
    """

    def __init__(
        self, malicious_clients: list[int], radius: float = 3.0, poison_fraction: float = 0.5,
        lr: float | None = None, local_epochs: int | None = None, scale: float = 1.0,
        attack_rounds: list[int] | None = None, start_round: int = 0, end_round: int | None = None,
        force_participation: bool = True,
    ):  # fmt: skip
        super().__init__(malicious_clients, poison_fraction, lr, local_epochs, scale, attack_rounds, start_round,
                         end_round, force_participation)  # fmt: skip
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
        malicious_clients: ids of the malicious clients.
        keep_ratio: fraction of coordinates the attacker may change (official ``gradmask_ratio``).
        mask_source: ``previous_round`` or ``clean_data``.
        radius: L2 radius of the update (``inf``: no projection).
        poison_fraction: fraction of each local batch that is poisoned.
        lr: local learning rate (``None``: the benign trainer's).
        local_epochs: local epochs (``None``: the benign trainer's).
        scale: factor applied before the final projection.
        attack_rounds: explicit attack rounds (overrides the window).
        start_round: first attack round.
        end_round: end of the attack window, exclusive.
        force_participation: malicious clients take part in every attack round.
    """

    def __init__(
        self, malicious_clients: list[int], keep_ratio: float = 0.99,
        mask_source: Literal["previous_round", "clean_data"] = "previous_round", radius: float = float("inf"),
        poison_fraction: float = 0.5, lr: float | None = None, local_epochs: int | None = None,
        scale: float = 1.0, attack_rounds: list[int] | None = None, start_round: int = 0,
        end_round: int | None = None, force_participation: bool = True,
    ):  # fmt: skip
        super().__init__(malicious_clients, radius, poison_fraction, lr, local_epochs, scale, attack_rounds,
                         start_round, end_round, force_participation)  # fmt: skip
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
        return update * self.scale if self.scale != 1.0 else update


class ServerDefense:
    """A server-side defense run after every server step (TrojanDam will fine-tune G on OOD data here)."""

    def after_aggregation(self, recipe: FederatedRecipe, round: int) -> None:
        """Edit ``recipe.net`` (the new global model) in place after round ``round``'s server step."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


# ================================================================================================= recipe
def _seed(*parts: int) -> int:
    """Mix integers into one 63-bit seed (so (seed, round, client) streams are independent)."""
    h = 0x5EED
    for p in parts:
        h = (h * 1_000_003 + int(p) + 0x9E3779B9) % (2**63 - 1)
    return h


class FederatedRecipe(BaseRecipe):
    """Federated training of ``net`` on a :class:`~datamodules.federated.FederatedDataModule`, one round per
    training step, with optional attack, robust aggregation and server-side defenses.

    The server step is a ``torch.optim.SGD`` step on the global model with gradient ``−aggregate``, so
    ``G += server_lr · aggregate`` (with ``server_momentum > 0``: FedAvgM, Hsu et al. 2019) and
    ``trainer.global_step`` counts rounds: ``trainer.max_steps`` is the number of rounds, and round ``t`` is
    seeded by ``(seed, t)`` whether or not the run was resumed. Validation (``val/acc`` = MA on the clean global
    test set, ``val/asr`` = BA on the triggered one) runs every epoch, i.e. every
    ``datamodule.rounds_per_epoch`` rounds. Under DDP, the round's ``j``-th client is trained on rank
    ``j % world_size`` and the updates are all-gathered, so every rank aggregates the same updates.

    Args:
        net: the global model (e.g. ``MnistCNN``).
        clients_per_round: clients sampled per round.
        local: benign local trainer (default ``LocalTrainer()``).
        aggregator: aggregation rule (default ``FedAvg()``).
        attack: malicious clients and their attack (``None``: all benign).
        server_defense_hooks: defenses run after each server step.
        server_lr: server learning rate η.
        server_momentum: server momentum (0: plain FedAvg step).
        buffers: ``average`` float buffers (BatchNorm statistics) over the round's finite clients, outside the
            aggregator (as Chameleon's code: norm clipping skips them), or ``keep`` the global buffers.
        seed: seed of client sampling, local shuffling and aggregation noise (``None``: the run's seed).
    """

    def __init__(
        self, net: nn.Module, clients_per_round: int = 10, local: LocalTrainer | None = None,
        aggregator: Aggregator | None = None, attack: Attack | None = None,
        server_defense_hooks: list[ServerDefense] | None = None, server_lr: float = 1.0,
        server_momentum: float = 0.0, buffers: Literal["average", "keep"] = "average", seed: int | None = None,
    ):  # fmt: skip
        super().__init__()
        self.save_hyperparameters(ignore=["net", "local", "aggregator", "attack", "server_defense_hooks"])
        self.automatic_optimization = False
        self.net, self.clients_per_round = net, clients_per_round
        self.local, self.aggregator = local or LocalTrainer(), aggregator or FedAvg()
        self.attack, self.server_defense_hooks = attack, list(server_defense_hooks or [])
        self.server_lr, self.server_momentum, self.buffers, self.seed = server_lr, server_momentum, buffers, seed
        self.last_server_update: Tensor | None = None
        self._scratch: list[nn.Module] = []  # one reusable client model, not a registered submodule

    def configure_model(self) -> None:
        if hasattr(self.net, "build"):
            self.net.build()

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        if stage == "fit":
            self.check_setup(dm)
        if self.seed is None:
            self.seed = torch.initial_seed()
        for split in ("val", "test"):
            if not hasattr(self, f"{split}_acc"):
                setattr(self, f"{split}_acc", MulticlassAccuracy(dm.num_classes, average="micro"))
            if dm.target_label is not None and not hasattr(self, f"{split}_asr"):
                setattr(self, f"{split}_asr", AttackSuccessRate(dm.target_label))

    def check_setup(self, dm: Any) -> None:
        """Catch bad settings before round 1 (``ValueError`` naming the fix)."""
        if not hasattr(dm, "client_data"):
            raise ValueError(f"FederatedRecipe needs a FederatedDataModule, got {type(dm).__name__}")
        if not 1 <= self.clients_per_round <= dm.num_clients:
            raise ValueError(f"clients_per_round={self.clients_per_round} must be in [1, num_clients={dm.num_clients}]")
        self.aggregator.check(self.clients_per_round)
        if self.attack is not None:
            self.attack.check(dm.num_clients, self.clients_per_round)
            if dm.poisoning is None:
                raise ValueError("an attack needs the trigger and target: set data.init_args.poisoning")

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=self.server_lr, momentum=self.server_momentum)

    # ---------------------------------------------------------------------------------------- a round
    def sample_clients(self, round: int, num_clients: int) -> list[int]:
        """The round's clients: malicious ones first when they are forced in, then a seeded random draw."""
        g = torch.Generator().manual_seed(_seed(self.seed, round))
        forced = self.attack.malicious_clients if self.attack is not None and self.attack.force_participation \
            and self.attack.is_active(round) else []  # fmt: skip
        pool = torch.tensor([c for c in range(num_clients) if c not in set(forced)], dtype=torch.long)
        return forced + pool[torch.randperm(len(pool), generator=g)[: self.clients_per_round - len(forced)]].tolist()

    def _scratch_model(self) -> nn.Module:
        if not self._scratch:
            self._scratch.append(copy.deepcopy(self.net))
        return self._scratch[0].to(self.device)

    def is_malicious(self, client: int, round: int) -> bool:
        return self.attack is not None and self.attack.is_active(round) and client in self.attack.malicious_clients

    def client_update(self, round: int, client: int, dm: Any) -> tuple[Tensor, Tensor]:
        """Train one client from the global model; returns (flat parameter update, flat float buffers)."""
        model = self._scratch_model()
        with torch.no_grad():
            for dst, src in zip(model.state_dict().values(), self.net.state_dict().values()):
                dst.copy_(src)
            for p, g in zip(model.parameters(), self.net.parameters()):  # undo an attack's freezing
                p.requires_grad_(g.requires_grad)
        global_params = [p.detach() for p in self.net.parameters()]
        global_flat = parameters_to_vector(global_params)
        x, y = (t.to(self.device) for t in dm.client_data(client))
        last = None if self.last_server_update is None else self.last_server_update.to(self.device)
        ctx = ClientContext(round, client, global_params, global_flat, last, dm, self.local,
                            torch.Generator().manual_seed(_seed(self.seed, round, client)))  # fmt: skip
        with torch.enable_grad():
            if self.is_malicious(client, round):
                self.attack.local_train(model, x, y, ctx)
            else:
                self.local.train(model, x, y, ctx.generator)
        update = parameters_to_vector(model.parameters()).detach() - global_flat
        if self.is_malicious(client, round):
            update = self.attack.post_process(update, ctx)
        bufs = [b.detach().flatten() for b in model.buffers() if b.is_floating_point()]
        return update, torch.cat(bufs) if bufs else update.new_zeros(0)

    def compute_round(self, round: int, dm: Any) -> dict[str, Any]:
        """Local training of the round's clients and aggregation; nothing is applied to the global model."""
        clients = self.sample_clients(round, dm.num_clients)
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self._trainer is not None else (1, 0)
        d = sum(p.numel() for p in self.net.parameters())
        nb = sum(b.numel() for b in self.net.buffers() if b.is_floating_point())
        updates, bufs = self.net_zeros(len(clients), d), self.net_zeros(len(clients), nb)
        for j, c in enumerate(clients):
            if j % world == rank:
                updates[j], bufs[j] = self.client_update(round, c, dm)
        if world > 1:  # rows of other ranks are zero, so the sum is exact
            updates = self.all_gather(updates).sum(0)
            bufs = self.all_gather(bufs).sum(0) if nb else bufs
        ok = agg_ops.finite_rows(updates) & torch.isfinite(bufs).all(1)
        weights = torch.tensor([float(dm.num_samples(c)) for c in clients], device=updates.device)
        malicious = torch.tensor([self.is_malicious(c, round) for c in clients], device=updates.device)
        info: dict[str, Tensor] = {}
        if ok.any():
            g = torch.Generator(device=updates.device).manual_seed(_seed(self.seed, round, -1))
            aggregate, info = self.aggregator.aggregate(updates[ok], weights[ok], g)
            new_bufs = agg_ops.fedavg(bufs[ok], weights[ok]) if nb else None
        else:
            rank_zero_warn(f"round {round}: every client update is non-finite; the global model is kept")
            aggregate, new_bufs = updates.new_zeros(d), None
        admitted = ok.nonzero().flatten()[info["admitted"]] if "admitted" in info else ok.nonzero().flatten()
        return {"clients": clients, "updates": updates, "finite": ok, "malicious": malicious, "aggregate": aggregate,
                "buffers": new_bufs, "admitted": admitted, "info": info}  # fmt: skip

    def net_zeros(self, n: int, d: int) -> Tensor:
        return torch.zeros(n, d, device=self.device, dtype=next(self.net.parameters()).dtype)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        round = self.global_step
        out = self.compute_round(round, self.trainer.datamodule)
        before = parameters_to_vector(self.net.parameters()).detach().clone()
        opt = self.optimizers()
        offset = 0
        for p in self.net.parameters():  # gradient −aggregate: SGD's step is G += server_lr · aggregate
            p.grad = -out["aggregate"][offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if out["buffers"] is not None and self.buffers == "average":
            with torch.no_grad():
                offset = 0
                for b in (b for b in self.net.buffers() if b.is_floating_point()):
                    b.copy_(out["buffers"][offset : offset + b.numel()].view_as(b))
                    offset += b.numel()
        after = parameters_to_vector(self.net.parameters()).detach()
        if not torch.isfinite(after).all():
            raise FloatingPointError(
                f"the global model became non-finite in round {round}; resume from the last checkpoint with a "
                "lower server_lr or local lr, or a robust aggregator"
            )
        self.last_server_update = after - before
        for hook in self.server_defense_hooks:
            hook.after_aggregation(self, round)
        self.log_dict(self.round_stats(round, out), on_step=True, on_epoch=False)

    def round_stats(self, round: int, out: dict[str, Any]) -> dict[str, float]:
        ok, mal = out["finite"], out["malicious"]
        norms = torch.linalg.vector_norm(out["updates"], dim=1)
        stats = {"round/nan_updates": float((~ok).sum()), "round/aggregate_norm": float(out["aggregate"].norm()),
                 "round/attack_active": float(self.attack is not None and self.attack.is_active(round))}  # fmt: skip
        # Every key every round (NaN where undefined): Lightning would otherwise repeat a stale value.
        nan = float("nan")
        stats["round/update_norm_mean"] = float(norms[ok & ~mal].mean()) if (ok & ~mal).any() else nan
        stats["round/malicious_norm"] = float(norms[ok & mal].mean()) if (ok & mal).any() else nan
        admitted = mal[out["admitted"]].sum() / (ok & mal).sum() if (ok & mal).any() else nan
        stats["round/malicious_admitted"] = float(admitted)
        for k, v in out["info"].items():
            if k != "admitted" and v.numel() == 1:
                stats[f"round/{k}"] = float(v)
        return stats

    # ------------------------------------------------------------------------------------- evaluation
    def _evaluate(self, split: str, batch, dataloader_idx: int) -> None:
        x, y = batch
        name = "acc" if dataloader_idx == 0 else "asr"
        metric = getattr(self, f"{split}_{name}")
        metric.update(self.net(x).argmax(-1), y)
        self.log(f"{split}/{name}", metric, prog_bar=True, add_dataloader_idx=False)

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate("val", batch, dataloader_idx)

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate("test", batch, dataloader_idx)

    # ------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["federated"] = {
            "last_server_update": None if self.last_server_update is None else self.last_server_update.cpu(),
            "attack": self.attack.state_dict() if self.attack is not None else {},
            "defenses": [h.state_dict() for h in self.server_defense_hooks],
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("federated", {})
        self.last_server_update = state.get("last_server_update")
        if self.attack is not None:
            self.attack.load_state_dict(state.get("attack", {}))
        for hook, s in zip(self.server_defense_hooks, state.get("defenses", [])):
            hook.load_state_dict(s)

    def artifact_metadata(self) -> dict:
        out = super().artifact_metadata()
        if self.attack is not None:
            out["attack"] = {"type": type(self.attack).__name__, "malicious_clients": self.attack.malicious_clients}
        out["aggregator"] = type(self.aggregator).__name__
        return out
