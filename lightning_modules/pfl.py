"""Personalized federated learning (PFL) on the federated engine: per-client state, masked aggregation and
personalized evaluation, with the usual baselines.

Every client keeps its own model. A boolean *personal mask* per client says which entries are its own: at the
start of a round the client takes the server's model on its shared entries and keeps its own values on the
personal ones (:func:`~lightning_modules.ops.fedselect.broadcast`), trains, and the server averages each entry
over the clients that share it (:func:`~lightning_modules.ops.fedselect.masked_average`). The baselines differ
only in the mask and the local training:

- :class:`PersonalizedFedAvg`: no personal entries, i.e. FedAvg (McMahan et al., AISTATS 2017); with
  ``finetune_epochs > 0`` the global model is fine-tuned on each client's data before it is evaluated there
  (FedAvg + FT, e.g. Wang et al., "Federated Evaluation of On-device Personalization", 2019).
- :class:`FedPer`: personal head, shared body (Arivazhagan et al., "Federated Learning with Personalization
  Layers", 2019).
- :class:`LGFedAvg`: personal body, shared head (Liang et al., "Think Locally, Act Globally", 2020).
- :class:`Ditto`: a full personal model trained with a proximal pull towards the global model, next to plain
  FedAvg training of the global one (Li, Hu, Beirami & Smith, ICML 2021).

Personalized evaluation (after every validation and at test): each client's personalized model is scored on
its own test split (``client_test_fraction`` of its samples, same label distribution); ``<split>/pacc`` is the
mean over clients, ``pacc_std`` the standard deviation over clients (the spread), ``pacc_min`` the worst client,
and at test ``test/pacc_client<i>`` every client's accuracy. ``val/acc`` stays the global model's accuracy on
the global test set. Client states and masks are saved in checkpoints, so a resumed run continues exactly.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from lightning_modules.federated.aggregators import Aggregator, FedAvg
from lightning_modules.federated.local import ClientContext, LocalTrainer
from lightning_modules.federated.recipe import (
    FederatedRecipe,
    _seed,
    black_pixel,
    flat_buffers,
    load_flat_buffers,
)
from lightning_modules.ops import aggregation as agg_ops
from lightning_modules.ops.fedselect import broadcast, masked_average


class PersonalizedFedAvg(FederatedRecipe):
    """FedAvg with per-client state and personalized evaluation; the base of the PFL recipes.

    Subclasses override :meth:`initial_personal_mask` (which entries are personal from the start),
    :meth:`local_update` (how a client trains) and :meth:`after_local_update` (e.g. mask growth); per-client
    tensors live in ``self.clients`` (``params`` [N, d]: each client's model after its last local training,
    ``personal`` [N, d] bool, ``buffers`` [N, b]: float buffers such as BatchNorm statistics, which stay local
    as in FedSelect's code) and are checkpointed.

    The arguments of :class:`~lightning_modules.federated.FederatedRecipe` pass through (``clients_per_round``:
    FedSelect's code trains all of its 10 clients every round; ``aggregator`` must be ``FedAvg``, whose
    ``weighted`` flag weights the per-entry average by sample counts, as robust aggregators are not defined for
    masked updates; ``server_lr`` 1: the average replaces the shared entries), except the attack, server
    defenses, server momentum and buffer averaging, which are fixed off.

    Args:
        net: the model (e.g. ``MnistCNN``).
        finetune_epochs: local epochs of fine-tuning of each personalized model on the client's training data
            before it is evaluated (0: none; FedAvg + FT when no entry is personal). Evaluation only.
        eval_model: ``broadcast`` scores the model a client holds after the server's broadcast (its personal
            entries and the new shared average); ``local`` scores its model right after local training, as
            FedSelect's official code does (for FedAvg that is the global model after one more local update).
    """

    def __init__(
        self, net: nn.Module, finetune_epochs: int = 0, eval_model: Literal["broadcast", "local"] = "broadcast",
        **kwargs,
    ):  # fmt: skip
        super().__init__(net=net, attack=None, server_defense_hooks=None, server_momentum=0.0, buffers="average",
                         **kwargs)  # fmt: skip
        if finetune_epochs < 0 or eval_model not in ("broadcast", "local"):
            raise ValueError(f"need finetune_epochs >= 0 and eval_model in (broadcast, local), got "
                             f"{finetune_epochs}, {eval_model!r}")  # fmt: skip
        self.finetune_epochs, self.eval_model = finetune_epochs, eval_model
        self.clients: dict[str, Tensor] = {}

    # ------------------------------------------------------------------------------------------ set-up
    def check_setup(self, dm: Any) -> None:
        super().check_setup(dm)
        if type(self.aggregator) is not FedAvg:
            raise ValueError(f"{type(self).__name__} averages each entry over the clients that share it; use "
                             f"aggregator FedAvg, not {type(self.aggregator).__name__}")  # fmt: skip
        if self.trainer.world_size > 1:
            raise ValueError(f"{type(self).__name__} keeps client state on one process; run it with devices=1")
        if any(len(dm.client_test(c)[1]) == 0 for c in range(dm.num_clients)):
            raise ValueError("personalized evaluation needs each client's own test split: set "
                             "data.init_args.client_test_fraction > 0 (e.g. 0.2)")  # fmt: skip

    def initial_personal_mask(self) -> Tensor:
        """Flat boolean ``[d]``: the entries every client starts with as personal (here: none)."""
        return torch.zeros(sum(p.numel() for p in self.net.parameters()), dtype=torch.bool, device=self.device)

    def name_mask(self, prefixes: list[str]) -> Tensor:
        """Flat boolean ``[d]``, ``True`` on the parameters whose name starts with one of ``prefixes``."""
        names = [n for n, _ in self.net.named_parameters()]
        if not any(n.startswith(tuple(prefixes)) for n in names):
            raise ValueError(f"no parameter name starts with {prefixes}; the net has {names}")
        parts = [torch.full((p.numel(),), n.startswith(tuple(prefixes)), dtype=torch.bool, device=self.device)
                 for n, p in self.net.named_parameters()]  # fmt: skip
        return torch.cat(parts)

    def on_fit_start(self) -> None:
        if not self.clients:  # a resumed run has them from the checkpoint
            n = self.trainer.datamodule.num_clients
            g = parameters_to_vector(self.net.parameters()).detach()
            self.clients = {"params": g.repeat(n, 1), "personal": self.initial_personal_mask().repeat(n, 1),
                            "buffers": flat_buffers(self.net).repeat(n, 1)}  # fmt: skip

    # ------------------------------------------------------------------------------------------ a round
    def client_start(self, client: int) -> Tensor:
        """The client's model at the start of a round: the server's shared entries, its own personal ones."""
        g = parameters_to_vector(self.net.parameters()).detach()
        return broadcast(g, self.clients["params"][client], self.clients["personal"][client])

    def local_update(self, model: nn.Module, x: Tensor, y: Tensor, ctx: ClientContext) -> None:
        """Train ``model`` in place on the client's data (here: all entries, ``self.local``)."""
        self.local.train(model, x, y, ctx.generator, pad_value=ctx.pad_value)

    def after_local_update(self, round: int, client: int) -> None:
        """Runs after the round's aggregation weights are fixed (FedSelect grows the mask here)."""

    def shared_mask(self, client: int) -> Tensor:
        """Entries of ``client`` that take part in this round's average (default: its non-personal ones)."""
        return ~self.clients["personal"][client]

    def _model(self, params: Tensor, buffers: Tensor) -> nn.Module:
        """The scratch model loaded with a copy of ``params`` (``vector_to_parameters`` would make the
        parameters views of ``params``, so training would write into it)."""
        model = self._scratch_model()
        with torch.no_grad():
            vector_to_parameters(params.clone(), model.parameters())
        for p in model.parameters():
            p.requires_grad_(True)
        load_flat_buffers(model, buffers)
        return model

    def client_update(self, round: int, client: int, dm: Any) -> tuple[Tensor, Tensor]:
        """Train one client from its broadcast model; store its new state; return (update, buffers)."""
        start = self.client_start(client)
        model = self._model(start, self.clients["buffers"][client])
        g = parameters_to_vector(self.net.parameters()).detach()
        x, y = (t.to(self.device) for t in dm.client_data(client))
        ctx = ClientContext(round, client, list(self.net.parameters()), g, None, dm, self.local,
                            torch.Generator().manual_seed(_seed(self.seed, round, client)), black_pixel(dm))  # fmt: skip
        with torch.enable_grad():
            self.local_update(model, x, y, ctx)
        new = parameters_to_vector(model.parameters()).detach()
        if torch.isfinite(new).all():  # a diverged client keeps its previous model (and is not averaged)
            self.clients["params"][client] = new
            self.clients["buffers"][client] = flat_buffers(model)
        return new - g, flat_buffers(model)

    def compute_round(self, round: int, dm: Any) -> dict[str, Any]:
        clients = self.sample_clients(round, dm.num_clients)
        shared = torch.stack([self.shared_mask(c) for c in clients])  # the masks in force while training
        rows = [self.client_update(round, c, dm) for c in clients]
        updates, bufs = torch.stack([u for u, _ in rows]), torch.stack([b for _, b in rows])
        ok = agg_ops.finite_rows(updates) & torch.isfinite(bufs).all(1)
        weights = torch.tensor([float(dm.num_samples(c)) for c in clients], device=updates.device)
        aggregate, count = masked_average(updates[ok], shared[ok], weights[ok] if self.aggregator.weighted else None)
        new_bufs = agg_ops.fedavg(bufs[ok], weights[ok]) if bufs.shape[1] and ok.any() else None
        for c in clients:
            self.after_local_update(round, c)
        personal = self.clients["personal"].float().mean()
        return {"clients": clients, "updates": updates, "finite": ok, "aggregate": aggregate, "buffers": new_bufs,
                "malicious": torch.zeros(len(clients), dtype=torch.bool, device=updates.device),
                "admitted": ok.nonzero().flatten(),
                "info": {"personal_fraction": personal, "unshared_fraction": (count == 0).float().mean()}}  # fmt: skip

    # ------------------------------------------------------------------------------------------ evaluation
    def personalized_model(self, client: int, dm: Any, eval_model: str | None = None) -> nn.Module:
        """The model that client ``client`` is evaluated with (``eval_model``: default this recipe's; see
        ``finetune_epochs``)."""
        own = self.clients["params"][client]
        params = self.client_start(client) if (eval_model or self.eval_model) == "broadcast" else own
        model = self._model(params, self.clients["buffers"][client])
        if self.finetune_epochs:
            x, y = (t.to(self.device) for t in dm.client_data(client))
            gen = torch.Generator().manual_seed(_seed(self.seed, -2, client))
            with torch.enable_grad():
                self.local.with_overrides(local_epochs=self.finetune_epochs).train(model, x, y, gen,
                                                                                   pad_value=black_pixel(dm))
        return model

    @torch.no_grad()
    def client_accuracies(self, dm: Any, eval_model: str | None = None) -> Tensor:
        """Each client's accuracy ``[N]`` on its own test split with its personalized model."""
        accs = []
        for c in range(dm.num_clients):
            model = self.personalized_model(c, dm, eval_model).eval()
            x, y = (t.to(self.device) for t in dm.client_test(c))
            pred = torch.cat([model(xb).argmax(-1) for xb in x.split(dm.eval_batch_size)])
            accs.append((pred == y).float().mean())
        return torch.stack(accs)

    def log_personalized(self, split: str, per_client: bool) -> None:
        if not self.clients:
            return
        with torch.inference_mode(False):  # Lightning evaluates in inference mode; fine-tuning needs autograd
            accs = self.client_accuracies(self.trainer.datamodule)
        stats = {"pacc": accs.mean(), "pacc_std": accs.std(unbiased=False), "pacc_min": accs.min(),
                 "personal_fraction": self.clients["personal"].float().mean()}  # fmt: skip
        if per_client:
            stats.update({f"pacc_client{c}": a for c, a in enumerate(accs)})
            other = "local" if self.eval_model == "broadcast" else "broadcast"
            with torch.inference_mode(False):
                others = self.client_accuracies(self.trainer.datamodule, other)
            stats.update({f"pacc_{self.eval_model}": accs.mean(), f"pacc_{other}": others.mean(),
                          f"pacc_min_{other}": others.min()})  # fmt: skip
        self.log_dict({f"{split}/{k}": v for k, v in stats.items()}, prog_bar=False)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.log_personalized("val", per_client=False)

    def on_test_epoch_end(self) -> None:
        """Test: per-client accuracies, and both evaluations side by side (``pacc_broadcast``, ``pacc_local``)."""
        self.log_personalized("test", per_client=True)

    # ------------------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["personalized"] = {k: v.cpu() for k, v in self.clients.items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.clients = {k: v.to(self.device) for k, v in checkpoint.get("personalized", {}).items()}


class FedPer(PersonalizedFedAvg):
    """FedPer: the layers named by ``personal_layers`` (default the classifier head) are personal, the rest is
    averaged (Arivazhagan, Aggarwal, Singh & Choudhary, "Federated Learning with Personalization Layers",
    arXiv 1912.00818, 2019). Local training updates all layers jointly.

    Args:
        net: the model (the arguments of :class:`PersonalizedFedAvg` pass through).
        personal_layers: parameter-name prefixes of the personal layers (``MnistCNN``: ``head`` / ``body``).
    """

    def __init__(self, net: nn.Module, personal_layers: list[str] | None = None, **kwargs):
        super().__init__(net=net, **kwargs)
        self.personal_layers = list(personal_layers or self.default_personal_layers())

    def default_personal_layers(self) -> list[str]:
        return ["head"]

    def initial_personal_mask(self) -> Tensor:
        return self.name_mask(self.personal_layers)


class LGFedAvg(FedPer):
    """LG-FedAvg: local representations (the body, personal) and a global classifier head (shared) (Liang, Liu,
    Ziyin, Allen, Auerbach, Brent, Salakhutdinov & Morency, "Think Locally, Act Globally: Federated Learning with
    Local and Global Representations", arXiv 2001.01523, 2020). :class:`FedPer` with ``personal_layers=["body"]``.

    Args:
        personal_layers: parameter-name prefixes of the personal layers (default ``["body"]``; the arguments of
            :class:`PersonalizedFedAvg` pass through).
    """

    def default_personal_layers(self) -> list[str]:
        return ["body"]


class Ditto(PersonalizedFedAvg):
    """Ditto: each client trains the global model as in FedAvg (its update is averaged) and, separately, its own
    personal model ``v`` on ``F_k(v) + lambda/2 ||v - w||^2``, pulled towards the global model ``w`` it received
    (Li, Hu, Beirami & Smith, "Ditto: Fair and Robust Federated Learning Through Personalization", ICML 2021,
    Alg. 1). The personal model is what the client is evaluated with.

    Args:
        net: the model (the arguments of :class:`PersonalizedFedAvg` pass through).
        prox_lambda: lambda, the strength of the pull towards the global model (0: local training only).
        personal_epochs: local epochs of the personal model per round (``None``: ``local.local_epochs``).
    """

    def __init__(self, net: nn.Module, prox_lambda: float = 0.1, personal_epochs: int | None = None, **kwargs):
        super().__init__(net=net, **kwargs)
        if prox_lambda < 0 or (personal_epochs is not None and personal_epochs < 1):
            raise ValueError(f"Ditto needs prox_lambda >= 0 and personal_epochs >= 1, got {prox_lambda}, {personal_epochs}")
        self.prox_lambda, self.personal_epochs = prox_lambda, personal_epochs

    def initial_personal_mask(self) -> Tensor:
        return ~super().initial_personal_mask()  # the personal model is entirely the client's

    def shared_mask(self, client: int) -> Tensor:
        return torch.ones_like(self.clients["personal"][client])  # the global model's update is fully averaged

    def client_update(self, round: int, client: int, dm: Any) -> tuple[Tensor, Tensor]:
        g = parameters_to_vector(self.net.parameters()).detach()
        x, y = (t.to(self.device) for t in dm.client_data(client))
        gen = torch.Generator().manual_seed(_seed(self.seed, round, client))  # FedAvg's stream for the global model
        personal_gen = torch.Generator().manual_seed(_seed(self.seed, round, client, 1))
        personal = self._model(self.clients["params"][client], self.clients["buffers"][client])
        anchor = [p.detach().clone() for p in self.net.parameters()]

        def prox_loss(model: nn.Module, xb: Tensor, yb: Tensor) -> Tensor:
            pull = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor))
            return F.cross_entropy(model(xb), yb) + 0.5 * self.prox_lambda * pull

        with torch.enable_grad():
            self.local.with_overrides(local_epochs=self.personal_epochs).train(personal, x, y, personal_gen,
                                                                            loss_fn=prox_loss, pad_value=black_pixel(dm))
            v = parameters_to_vector(personal.parameters()).detach()
            if torch.isfinite(v).all():
                self.clients["params"][client] = v
                self.clients["buffers"][client] = flat_buffers(personal)
            model = self._model(g, flat_buffers(self.net))  # the global model's FedAvg training
            self.local.train(model, x, y, gen, pad_value=black_pixel(dm))
        return parameters_to_vector(model.parameters()).detach() - g, flat_buffers(model)
