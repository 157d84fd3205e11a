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
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector

from lightning_modules.base import BaseRecipe
from lightning_modules.federated.aggregators import Aggregator, FedAvg
from lightning_modules.federated.attacks import Attack
from lightning_modules.federated.local import ClientContext, LocalTrainer
from lightning_modules.ops import aggregation as agg_ops
from lightning_modules.ops.schedules import piecewise_linear
from foundation.artifacts import load_artifact, parent_record


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
@torch.no_grad()
def backdoor_accuracy(net: nn.Module, dm: Any, device: torch.device | str = "cpu") -> float:
    """BA of ``net`` on ``dm``'s triggered test set (``val_sets[1]``): the share of its non-target images classified
    as the target."""
    x, labels = dm.val_sets[1].tensors[:2]
    was_training = net.training
    net.eval()
    hits = total = 0
    for i in range(0, len(labels), 1000):
        xb, yb = x[i : i + 1000].to(device), labels[i : i + 1000].to(device)
        keep = yb != dm.target_label
        hits += int((net(xb).argmax(-1)[keep] == dm.target_label).sum())
        total += int(keep.sum())
    net.train(was_training)
    return hits / max(total, 1)


def _seed(*parts: int) -> int:
    """Mix integers into one 63-bit seed (so (seed, round, client) streams are independent)."""
    h = 0x5EED
    for p in parts:
        h = (h * 1_000_003 + int(p) + 0x9E3779B9) % (2**63 - 1)
    return h


def flat_buffers(model: nn.Module) -> Tensor:
    """The model's floating-point buffers (BatchNorm statistics) as one flat vector (empty if it has none)."""
    bufs = [b.detach().flatten() for b in model.buffers() if b.is_floating_point()]
    return torch.cat(bufs) if bufs else parameters_to_vector(model.parameters()).new_zeros(0)


def load_flat_buffers(model: nn.Module, flat: Tensor) -> None:
    """Copy a :func:`flat_buffers` vector back into the model's floating-point buffers."""
    offset = 0
    with torch.no_grad():
        for b in (b for b in model.buffers() if b.is_floating_point()):
            b.copy_(flat[offset : offset + b.numel()].view_as(b))
            offset += b.numel()


def black_pixel(dm: Any) -> float:
    """The normalised value of a black pixel: the fill of ``LocalTrainer``'s random crop (``augment``)."""
    return float(dm.normalize(torch.zeros(()))) if hasattr(dm, "normalize") else 0.0


class FederatedRecipe(BaseRecipe):
    """Federated training of ``net`` on a :class:`~datamodules.federated.FederatedDataModule`, one round per
    training step, with optional attack, robust aggregation and server-side defenses.

    The server step is a ``torch.optim.SGD`` step on the global model with gradient ``−aggregate``, so
    ``G += server_lr · aggregate`` (with ``server_momentum > 0``: FedAvgM, Hsu et al. 2019) and
    ``trainer.global_step`` counts rounds: ``trainer.max_steps`` is the number of rounds, and round ``t`` is
    seeded by ``(seed, t)`` whether or not the run was resumed. Validation (``val/acc`` = MA on the clean global
    test set, ``val/asr`` = BA on the triggered one) runs every epoch, i.e. every
    ``datamodule.rounds_per_epoch`` rounds (:class:`~lightning_modules.base.BaseRecipe`'s backdoor evaluation). Under DDP, the round's ``j``-th client is trained on rank
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
        init_from: artifact (e.g. a clean federated warm-up exported by ``ExportArtifact``) whose ``net.*``
            tensors initialise the global model, so an attack study does not retrain the clean phase; its
            sha256 is verified and it is recorded as this run's parent. Round numbers restart at 0.
        benign_lr_knots: the benign clients' local lr per round, ``[[round, lr], ...]`` interpolated linearly
            (:func:`~lightning_modules.ops.schedules.piecewise_linear`; ``None``: ``local``'s constant lr). The
            official schedule is a linear ramp from 0.001 to 0.2 over rounds 1-500 and a linear decay after it
            (Chameleon-durable-backdoor@c74618a, training.py: ``if epoch <= 500:`` / ``lr = epoch*(target_lr -
            lr_init)/499.0 + lr_init - (target_lr - lr_init)/499.0`` / ``else:`` / ``lr = epoch*(-target_lr)/1500
            + target_lr*4.0/3.0``, floored at 1e-4).
        post_attack_lr: the benign clients' local lr from ``post_attack_from`` on: the official decay phase, which
            sets the *benign clients'* lr, not the server's, after the last poisoning round (training.py: ``if
            epoch > helper.params['poison_epochs'][-1]:`` / ``lr = helper.params['persistence_diff']``;
            ``persistence_diff`` is 0.03 for the pixel trigger in commands.sh, 0.005 in the yaml, 0.001 for the
            green car). ``None``: no change.
        post_attack_from: first round of ``post_attack_lr`` (``None``: the end of the attack window, which an
            early-stopped window moves; a run without an attack must name it).
        decay_rounds: stop the run this many rounds after the attack window closes (so windows of different
            length are followed by decay phases of equal length; ``trainer.max_steps`` stays the cap).
    """

    progress_step_name = "round"  # callbacks.progress prints "round 15/60", not "step 15/60"

    def __init__(
        self, net: nn.Module, clients_per_round: int = 10, local: LocalTrainer | None = None,
        aggregator: Aggregator | None = None, attack: Attack | None = None,
        server_defense_hooks: list[ServerDefense] | None = None, server_lr: float = 1.0,
        server_momentum: float = 0.0, buffers: Literal["average", "keep"] = "average", seed: int | None = None,
        init_from: str | None = None, benign_lr_knots: list[tuple[float, float]] | None = None,
        post_attack_lr: float | None = None, post_attack_from: int | None = None, decay_rounds: int | None = None,
    ):  # fmt: skip
        super().__init__()
        self.automatic_optimization = False
        self.net, self.clients_per_round = net, clients_per_round
        self.local, self.aggregator = local or LocalTrainer(), aggregator or FedAvg()
        self.attack, self.server_defense_hooks = attack, list(server_defense_hooks or [])
        self.server_lr, self.server_momentum, self.buffers, self.seed = server_lr, server_momentum, buffers, seed
        self.init_from, self._warm_started = init_from, False
        self.benign_lr_knots = [tuple(k) for k in benign_lr_knots] if benign_lr_knots else None
        self.post_attack_lr, self.post_attack_from, self.decay_rounds = post_attack_lr, post_attack_from, decay_rounds
        self.last_server_update: Tensor | None = None
        self._scratch: list[nn.Module] = []  # one reusable client model, not a registered submodule

    def configure_models(self) -> None:
        """Build a lazily specified net, then warm-start it from ``init_from``, once: Lightning calls this hook
        again for ``trainer.test``, which must see the trained model (a resumed run's checkpoint is restored after
        this hook, so it wins)."""
        super().configure_models()
        if self.init_from is not None and not self._warm_started:
            self._warm_started = True
            state = load_artifact(self.init_from).state_dict
            weights = {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}
            try:
                missing, unexpected = self.net.load_state_dict(weights, strict=False)
            except RuntimeError as err:  # shape mismatch
                raise ValueError(f"init_from={self.init_from} does not fit this net: {err}") from None
            if missing or unexpected or not weights:
                raise ValueError(
                    f"init_from={self.init_from} does not fit this net (missing {missing[:5]}, unexpected "
                    f"{unexpected[:5]}): warm-start from an artifact of the same net config"
                )

    def artifact_parents(self) -> list[dict]:
        return [parent_record(self.init_from)] if self.init_from is not None else []

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        if stage == "fit":
            self.check_setup(dm)
        if self.seed is None:
            self.seed = torch.initial_seed()
        super().setup(stage)

    def check_setup(self, dm: Any) -> None:
        """Catch bad settings before round 1 (``ValueError`` naming the fix)."""
        if not hasattr(dm, "client_data"):
            raise ValueError(f"FederatedRecipe needs a FederatedDataModule, got {type(dm).__name__}")
        if not 1 <= self.clients_per_round <= dm.num_clients:
            raise ValueError(f"clients_per_round={self.clients_per_round} must be in [1, num_clients={dm.num_clients}]")
        self.aggregator.check(self.clients_per_round)
        if self.post_attack_lr is not None and self.post_attack_from is None and self.attack is None:
            raise ValueError("post_attack_lr without an attack needs post_attack_from (the round the decay phase "
                             "starts, e.g. the attack runs' window end) or post_attack_lr: null")  # fmt: skip
        if self.post_attack_lr is not None and self.post_attack_lr <= 0:
            raise ValueError(f"post_attack_lr must be > 0, got {self.post_attack_lr}")
        stops_early = self.attack is not None and self.attack.schedule.stop_at_ba is not None
        if stops_early and len(getattr(dm, "val_sets", [])) < 2:
            raise ValueError("schedule.stop_at_ba needs the triggered test set: set data.init_args.poisoning")
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

    def decay_start(self) -> int | None:
        """The first round of ``post_attack_lr`` (``None``: not known yet, or never)."""
        if self.post_attack_from is not None:
            return self.post_attack_from
        return self.attack.window_end() if self.attack is not None else None

    def benign_lr(self, round: int) -> float:
        """The benign clients' local lr in round ``round`` (round schedule, then the decay phase)."""
        start = self.decay_start()
        if self.post_attack_lr is not None and start is not None and round >= start:
            return self.post_attack_lr
        return piecewise_linear(round, self.benign_lr_knots) if self.benign_lr_knots else self.local.lr

    def local_for(self, round: int) -> LocalTrainer:
        """The benign trainer of round ``round`` (``local`` with the round's lr)."""
        lr = self.benign_lr(round)
        return self.local if lr == self.local.lr else self.local.with_overrides(lr=lr)

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
        pad = black_pixel(dm)
        ctx = ClientContext(round, client, global_params, global_flat, last, dm, self.local_for(round),
                            torch.Generator().manual_seed(_seed(self.seed, round, client)), pad,
                            _seed(self.seed, round, -2))  # fmt: skip
        with torch.enable_grad():
            if self.is_malicious(client, round):
                x, y = self.attack.training_data(x, y, ctx)
                self.attack.local_train(model, x, y, ctx)
            else:
                ctx.local.train(model, x, y, ctx.generator, pad_value=pad)
        update = parameters_to_vector(model.parameters()).detach() - global_flat
        if self.is_malicious(client, round):
            update = self.attack.post_process(update, ctx)
        return update, flat_buffers(model)

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
            load_flat_buffers(self.net, out["buffers"])
        after = parameters_to_vector(self.net.parameters()).detach()
        if not torch.isfinite(after).all():
            raise FloatingPointError(
                f"the global model became non-finite in round {round}; resume from the last checkpoint with a "
                "lower server_lr or local lr, or a robust aggregator"
            )
        self.last_server_update = after - before
        for hook in self.server_defense_hooks:
            hook.after_aggregation(self, round)
        stats = self.round_stats(round, out)
        self.end_window_early(round, stats)
        end = self.attack.window_end() if self.attack is not None else None
        if self.decay_rounds is not None and end is not None and round + 1 >= end + self.decay_rounds:
            self.trainer.should_stop = True  # the decay phase is complete (Lightning still validates)
        self.log_dict(stats, on_step=True, on_epoch=False)

    def backdoor_accuracy(self) -> float:
        """BA of the global model on the DataModule's triggered test set (its non-target images)."""
        return backdoor_accuracy(self.net, self.trainer.datamodule, self.device)

    def end_window_early(self, round: int, stats: dict[str, float]) -> None:
        """``schedule.stop_at_ba``: after an attack round that leaves BA at or above it, the window closes."""
        if self.attack is None or self.attack.schedule.stop_at_ba is None:
            return
        if not self.attack.is_active(round):
            stats["round/ba_global"] = float("nan")  # every key every round (see round_stats)
            return
        ba = self.backdoor_accuracy()
        stats["round/ba_global"] = ba
        if ba >= self.attack.schedule.stop_at_ba:
            self.attack.stop(round + 1)

    def round_stats(self, round: int, out: dict[str, Any]) -> dict[str, float]:
        ok, mal = out["finite"], out["malicious"]
        norms = torch.linalg.vector_norm(out["updates"], dim=1)
        stats = {"round/nan_updates": float((~ok).sum()), "round/aggregate_norm": float(out["aggregate"].norm()),
                 "round/attack_active": float(self.attack is not None and self.attack.is_active(round)),
                 "round/benign_lr": self.benign_lr(round)}  # fmt: skip
        # Every key every round (NaN where undefined): Lightning would otherwise repeat a stale value.
        nan = float("nan")
        benign = norms[ok & ~mal]
        stats["round/update_norm_mean"] = float(benign.mean()) if len(benign) else nan
        stats["round/update_norm_median"] = float(benign.median()) if len(benign) else nan
        stats["round/malicious_norm"] = float(norms[ok & mal].mean()) if (ok & mal).any() else nan
        admitted = mal[out["admitted"]].sum() / (ok & mal).sum() if (ok & mal).any() else nan
        stats["round/malicious_admitted"] = float(admitted)
        for k, v in out["info"].items():
            if k != "admitted" and v.numel() == 1:
                stats[f"round/{k}"] = float(v)
        return stats

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
