"""TrojanDam: a detection-free server-side backdoor defense that keeps injecting fresh OOD mappings into the
redundant neurons of the global model (Dai, Li, Gan, Gong, arXiv 2504.15674, 2025).

The paper's claim: backdoors succeed in FL because malicious and benign updates do not conflict on *redundant
neurons* (those the main task barely uses, the coordinates Neurotoxin hides in). The server therefore
"continuously injects fresh OOD mappings into the global model to activate redundant neurons, canceling the effect
of backdoor updates during aggregation", with no detection and no client overhead. No code is public; this is our
reading (docs/trojandam.md lists what is known and what we chose), with every uncertain choice a knob:

After the server step of round ``t`` (a :class:`~lightning_modules.federated.ServerDefense` hook; the paper's server
aggregates with FedAvg plus norm clipping, which the config sets as the aggregator):

1. **Importance.** Each ``Conv``/``Linear`` layer is split into units: output neurons (conv kernels, linear rows,
   with their bias), except the classifier ``output_layer``, whose units are its input features (the hidden
   neurons' outgoing weights). A unit's importance is the sum over its entries of a per-entry score, and the
   ``redundant_fraction`` least important units of each layer are redundant. The score (``importance``):

   - ``clean_gradient`` (default): ``|Σ_b ∇ CE|`` of the global model (after the server step, before injection) on
     a small clean set the server holds, ``clean_per_class`` images per class drawn from data no client holds,
     recomputed every round. A signal the attacker does not control: a backdoor's neurons are idle on clean
     inputs, so their clean gradient is small and they count as redundant, which is where the injection must
     act. The estimator is the one Neurotoxin's official attacker uses for "the coordinates benign training
     needs" (ybdai7/Backdoor-indicator-defense@04dec87, participants/clients/MaliciousClient.py
     ``_grad_mask_cv``: ``loss = nn.functional.cross_entropy(output, labels)`` / ``loss.backward(
     retain_graph=True)`` summed over the batches, then ``parms.grad.abs()``), and the per-class size is that
     harness's server-side set (utils/yamls/indicator/params_chameleon_Indicator.yaml: ``global_class_num: 20``).
     The paper's own signal is not public (docs/trojandam.md).
   - ``update``: an exponential moving average of ``|G_t − G_{t−1}|``. Under a continuous attack the server step
     holds the malicious update, so the attacker's units are marked important and spared (the first
     reproduction's error; kept as the ablation).
   - ``weight``: ``|w|`` (L1 structured-pruning importance).
2. **Fresh mapping.** Every ``period`` rounds the OOD flood set (``pool_size`` images from ``ood_source``: the
   other one of MNIST/Fashion-MNIST, pixel noise, random block patches, or any image dataset) gets new labels in
   the task's label space, each differing from the sample's previous label (or a new set is drawn,
   ``fresh_samples``).
3. **Injection.** ``steps`` SGD steps (batch ``batch_size``, learning rate ``lr``) of cross-entropy on the mapping,
   with gradients projected onto the redundant units (every other entry is restored exactly after each step) and
   batch-norm statistics left unchanged (``bn_mode``).

The paper's text past its abstract could not be read here, so each component a third-party summary names is
ours (docs/trojandam.md): the "kernel-level gradient projection" is step 3's projection onto redundant kernels
and rows; "BN-statistics handling" keeps the running statistics (``bn_mode``; the authors' BackdoorIndicator
server restores them: ybdai7/Backdoor-indicator-defense@04dec87, utils/yamls/indicator/params_pgd_Indicator.yaml
``replace_original_bn: True``, participants/servers/IndicatorServer.py ``self.global_model.state_dict()[key].
copy_(before_wm_injection_bn_stats_dict[key])``); "flood data" is the OOD set; a "shadow" set is not
implemented (its role is not stated anywhere we could read); how often a mapping is refreshed is ``period``,
set to 10 because a mapping fresh every round is never fitted within the MA budget
(scripts/probe_trojandam_mapping.py; ``configs/fl/defenses/trojandam_fresh.yaml`` is that regime).

Logged per round: ``round/ood_loss``, ``round/ood_fit`` (the injected model's loss and accuracy on the current
mapping) and ``round/ood_step_norm`` (L2 norm of the injection's change to the global model); NaN in rounds without
injection.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector

from lightning_modules.federated.attacks import Neurotoxin
from lightning_modules.federated.recipe import FederatedRecipe, ServerDefense
from lightning_modules.ops import trojandam as ops

Importance = Literal["clean_gradient", "update", "weight"]
OODSource = Literal["auto", "mnist", "fashion-mnist", "digits", "cifar10", "noise", "patches"]
_AUTO_OOD = {"mnist": "fashion-mnist", "fashion-mnist": "mnist"}


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers (independent streams per (seed, round))."""
    h = 0x7D4
    for p in parts:
        h = (h * 1_000_003 + int(p) + 0x9E3779B9) % (2**63 - 1)
    return h


class TrojanDam(ServerDefense):
    """Server-side injection of fresh OOD mappings into redundant neurons (see the module docstring).

    Args:
        ood_source: where the flood images come from: ``auto`` (Fashion-MNIST for an MNIST federation and vice
            versa, ``noise`` otherwise), an image dataset of :func:`datamodules.sources.load_image_dataset`
            (resized and channel-matched to the federation's images), ``noise`` (uniform pixels) or ``patches``
            (``patch_size`` blocks of one random intensity).
        pool_size: OOD images in the flood set (BackdoorIndicator, the same group's server: 800).
        fresh_samples: draw a new flood set at every refresh (``True``) or relabel the same one (``False``: each
            image's new label differs from its previous one).
        steps: SGD steps per injection.
        batch_size: OOD images per step.
        lr: injection learning rate ("small": BackdoorIndicator's ``global_lr`` is 0.0005-0.005 by attack,
            e.g. ``global_lr: 0.001`` in utils/yamls/indicator/params_pgd_Indicator.yaml at 04dec87).
        momentum: SGD momentum of the injection (its state is not kept across rounds).
        redundant_fraction: share of each layer's units counted as redundant, in ``[0, 1]``.
        importance: ``clean_gradient`` (``|gradient|`` on the server's clean set), ``update`` (moving average
            of ``|server step|``) or ``weight`` (``|w|``); see the module docstring.
        importance_decay: decay of the moving average of ``update`` (0: the last server step only).
        clean_per_class: images per class of the server's clean set (``clean_gradient``), drawn from the test
            images beyond the federation's ``test_size``.
        output_layer: name of the classifier module, whose units are its input features.
        period: rounds between fresh mappings (1: a new mapping every round; in between the same one is trained).
        start_round: first round with injection.
        bn_mode: ``eval`` (BatchNorm normalises with its running statistics and does not update them) or
            ``restore`` (batch statistics during injection, running statistics restored afterwards).
        patch_size: block side of ``patches`` images.
        seed: seed of the flood set and the mappings (``None``: the federated recipe's seed).
    """

    def __init__(
        self, ood_source: OODSource = "auto", pool_size: int = 800, fresh_samples: bool = False, steps: int = 10,
        batch_size: int = 64, lr: float = 0.01, momentum: float = 0.9, redundant_fraction: float = 0.5,
        importance: Importance = "clean_gradient", importance_decay: float = 0.9, clean_per_class: int = 20,
        output_layer: str = "head", period: int = 1, start_round: int = 0,
        bn_mode: Literal["eval", "restore"] = "eval", patch_size: int = 4, seed: int | None = None,
    ):  # fmt: skip
        if pool_size < 1 or steps < 0 or batch_size < 1 or period < 1 or lr <= 0:
            raise ValueError("TrojanDam needs pool_size >= 1, steps >= 0, batch_size >= 1, period >= 1 and lr > 0")
        if not 0.0 <= redundant_fraction <= 1.0 or not 0.0 <= importance_decay < 1.0:
            raise ValueError(f"need redundant_fraction in [0, 1] and importance_decay in [0, 1), got "
                             f"{redundant_fraction}, {importance_decay}")  # fmt: skip
        if importance not in ("clean_gradient", "update", "weight") or bn_mode not in ("eval", "restore"):
            raise ValueError(f"importance must be clean_gradient|update|weight and bn_mode eval|restore, got "
                             f"{importance}, {bn_mode}")  # fmt: skip
        if clean_per_class < 1:
            raise ValueError(f"clean_per_class must be >= 1, got {clean_per_class}")
        self.ood_source, self.pool_size, self.fresh_samples = ood_source, pool_size, fresh_samples
        self.steps, self.batch_size, self.lr, self.momentum = steps, batch_size, lr, momentum
        self.redundant_fraction, self.importance, self.importance_decay = redundant_fraction, importance, importance_decay
        self.clean_per_class = clean_per_class
        self.clean: tuple[Tensor, Tensor] | None = None  # the server's clean set (clean_gradient)
        self.output_layer, self.period, self.start_round = output_layer, period, start_round
        self.bn_mode, self.patch_size, self.seed = bn_mode, patch_size, seed
        self.images: Tensor | None = None  # the flood set, normalised like the federation's inputs
        self.labels: Tensor | None = None  # its current mapping
        self.scores: dict[str, Tensor] = {}  # per-entry score per parameter (update, clean_gradient)

    # ------------------------------------------------------------------------------------------ pieces
    def layers(self, net: nn.Module) -> dict[str, tuple[nn.Module, int]]:
        """The masked layers: name -> (module, unit dim); 1 for ``output_layer`` (input features), else 0."""
        out = {n: (m, 1 if n == self.output_layer else 0) for n, m in net.named_modules()
               if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))}  # fmt: skip
        if self.output_layer not in out:
            raise ValueError(f"output_layer={self.output_layer!r} is not a Linear/Conv module of the net; choose one "
                             f"of {list(out)}")  # fmt: skip
        return out

    def track_update(self, net: nn.Module, step: Tensor) -> None:
        """Fold the flat server step ``G_t − G_{t−1}`` into the moving average of ``|step|``."""
        named = list(net.named_parameters())
        for (name, p), part in zip(named, step.split([p.numel() for _, p in named])):
            new = part.detach().abs().view_as(p).to(p.device)
            old = self.scores.get(name)
            self.scores[name] = new if old is None else self.importance_decay * old + (1 - self.importance_decay) * new

    def track_clean_gradient(self, net: nn.Module, x: Tensor, y: Tensor) -> None:
        """Set the scores to ``|Σ_b ∇ CE|`` of ``net`` on the clean set ``(x, y)`` in batches of ``batch_size``
        (train mode, as the official estimator; buffers restored, so BatchNorm statistics do not move)."""
        device = next(net.parameters()).device
        grad = Neurotoxin.train_mode_gradient(net, [(x.to(device), y.to(device))], self.batch_size)
        named = list(net.named_parameters())
        for (name, p), part in zip(named, grad.split([p.numel() for _, p in named])):
            self.scores[name] = part.abs().view_as(p)

    def score(self, name: str, param: Tensor) -> Tensor:
        """Per-entry importance of parameter ``name``: its tracked score (``update``: the moving average of
        ``|server step|``; ``clean_gradient``: ``|clean gradient|``), ``|w|`` before the first one or with
        ``weight``."""
        if self.importance != "weight" and name in self.scores:
            return self.scores[name]
        return param.detach().abs()

    def redundant(self, net: nn.Module) -> dict[str, Tensor]:
        """Per masked layer (name -> ``[units]`` bool), its ``redundant_fraction`` least important units."""
        out: dict[str, Tensor] = {}
        for name, (module, dim) in self.layers(net).items():
            w, b = module.weight, getattr(module, "bias", None)
            prefix = f"{name}." if name else ""
            ws = self.score(prefix + "weight", w)
            bs = self.score(prefix + "bias", b) if b is not None and dim == 0 else None
            out[name] = ops.redundant_units(ops.unit_importance(ws, dim, bs), self.redundant_fraction)
        return out

    def entry_masks(self, net: nn.Module, units: dict[str, Tensor]) -> dict[str, Tensor]:
        """Boolean masks (parameter name -> mask) of the entries of the given units of each masked layer."""
        out: dict[str, Tensor] = {}
        for name, (module, dim) in self.layers(net).items():
            w, b = module.weight, getattr(module, "bias", None)
            prefix = f"{name}." if name else ""
            out[prefix + "weight"] = ops.unit_mask(units[name], w.shape, dim)
            if b is not None:
                out[prefix + "bias"] = units[name] if dim == 0 else torch.zeros_like(b, dtype=torch.bool)
        return out

    def masks(self, net: nn.Module) -> dict[str, Tensor]:
        """Boolean masks (parameter name -> mask) of the entries the injection may change: the redundant units'."""
        return self.entry_masks(net, self.redundant(net))

    def draw_images(self, datamodule: Any, generator: torch.Generator) -> Tensor:
        """``pool_size`` OOD images shaped and normalised like the federation's inputs."""
        shape = tuple(datamodule.train_x.shape[1:])
        source = _AUTO_OOD.get(datamodule.dataset, "noise") if self.ood_source == "auto" else self.ood_source
        if source == "noise":
            x = torch.rand(self.pool_size, *shape, generator=generator)
        elif source == "patches":
            x = ops.random_block_images(self.pool_size, shape, self.patch_size, generator)
        else:
            from datamodules.sources import load_image_dataset

            raw = load_image_dataset(source).train_x
            if self.pool_size > len(raw):
                raise ValueError(f"pool_size={self.pool_size} exceeds the {len(raw)} {source} training images")
            x = datamodule.pixels(raw[torch.randperm(len(raw), generator=generator)[: self.pool_size]])
            if x.shape[1] != shape[0]:
                x = x.mean(1, keepdim=True).expand(-1, shape[0], -1, -1)
            if x.shape[2:] != shape[1:]:
                x = F.interpolate(x, size=shape[1:], mode="area" if x.shape[2] > shape[1] else "bilinear")
        return datamodule.normalize(x.contiguous())

    def refresh(self, datamodule: Any, round: int, num_classes: int, seed: int) -> None:
        """A fresh mapping for round ``round`` (and a fresh flood set on the first call or with ``fresh_samples``)."""
        g = torch.Generator().manual_seed(_mix(seed, round))
        previous = self.labels
        if self.images is None or self.fresh_samples:
            self.images, previous = self.draw_images(datamodule, g), None
        self.labels = ops.fresh_labels(num_classes, g, previous, self.pool_size)

    def inject(self, net: nn.Module, masks: dict[str, Tensor], x: Tensor, y: Tensor,
               generator: torch.Generator) -> tuple[float, float]:  # fmt: skip
        """Train ``net`` on the mapping ``x -> y`` for ``steps`` steps, changing only the ``masks`` entries and no
        buffer; returns the loss and accuracy on the mapping afterwards."""
        params = dict(net.named_parameters())
        train = [(params[k], m.to(params[k].device)) for k, m in masks.items() if m.any()]
        frozen = [p.detach().clone() for p, _ in train]
        buffers = {k: b.clone() for k, b in net.named_buffers()} if self.bn_mode == "restore" else {}
        was_training = net.training
        net.train(self.bn_mode == "restore")  # eval: BatchNorm uses (and keeps) its running statistics
        opt = torch.optim.SGD([p for p, _ in train], lr=self.lr, momentum=self.momentum) if train else None
        x, y = x.to(next(net.parameters()).device), y.to(next(net.parameters()).device)
        with torch.enable_grad():
            for _ in range(self.steps if train else 0):
                idx = torch.randperm(len(y), generator=generator)[: self.batch_size].to(y.device)
                loss = F.cross_entropy(net(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                for p, m in train:  # project the gradient onto the redundant entries
                    p.grad.mul_(m)
                opt.step()
                with torch.no_grad():  # and restore every other entry exactly (momentum, rounding)
                    for (p, m), p0 in zip(train, frozen):
                        p.copy_(torch.where(m, p, p0))
        with torch.no_grad():
            live = dict(net.named_buffers())
            for k, b in buffers.items():
                live[k].copy_(b)
            net.eval()
            logits = torch.cat([net(x[i : i + 1000]) for i in range(0, len(y), 1000)])
            loss, fit = float(F.cross_entropy(logits, y)), float((logits.argmax(-1) == y).float().mean())
        net.train(was_training)
        return loss, fit

    # ------------------------------------------------------------------------------------------ the hook
    def after_aggregation(self, recipe: FederatedRecipe, round: int) -> None:
        net, dm = recipe.net, recipe.trainer.datamodule
        if self.importance == "update" and recipe.last_server_update is not None:
            self.track_update(net, recipe.last_server_update)
        nan = float("nan")
        stats = {"round/ood_loss": nan, "round/ood_fit": nan, "round/ood_step_norm": nan}
        if round >= self.start_round:
            seed = self.seed if self.seed is not None else int(recipe.seed)
            if self.importance == "clean_gradient":
                if self.clean is None:
                    self.clean = dm.server_clean_set(self.clean_per_class, seed)
                self.track_clean_gradient(net, *self.clean)
            if self.labels is None or (round - self.start_round) % self.period == 0:
                self.refresh(dm, round, dm.num_classes, seed)
            g = torch.Generator().manual_seed(_mix(seed, round, 1))
            before = parameters_to_vector(net.parameters()).detach().clone()
            loss, fit = self.inject(net, self.masks(net), self.images, self.labels, g)
            step = float((parameters_to_vector(net.parameters()).detach() - before).norm())
            stats = {"round/ood_loss": loss, "round/ood_fit": fit, "round/ood_step_norm": step}
        recipe.log_dict(stats, on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        return {"images": self.images, "labels": self.labels, "scores": {k: v.cpu() for k, v in self.scores.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.images, self.labels = state.get("images"), state.get("labels")
        self.scores = dict(state.get("scores", {}))


__all__ = ["TrojanDam"]
