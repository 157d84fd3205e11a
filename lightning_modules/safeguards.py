"""The safeguards of tamper-resistance research over a causal LM (Tamirisa et al., "Tamper-Resistant Safeguards for
Open-Weight LLMs", ICLR 2025, arXiv 2408.00761): the :class:`Safeguard` base (model building, artifact hand-over,
forget/retain evaluation, one manual optimisation step of :meth:`Safeguard.safeguard_loss` per training step), the
undefended model, the floor control (the trained span re-initialised) and gradient-ascent unlearning. Random Mapping
and TAR are in :mod:`lightning_modules.tar`.
"""

from __future__ import annotations

import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.strategies.strategy import _ForwardRedirection
from torchmetrics import MeanMetric

from lightning_modules.base import BaseRecipe
from lightning_modules.nets.split_lm import SplitCausalLM
from lightning_modules.tamper import lm_loss, option_scores
from foundation.artifacts import load_artifact, parent_record

_METRICS = ("forget_acc", "forget_nll", "retain_acc", "retain_nll")


class Safeguard(BaseRecipe):
    """Base of the safeguards: model building, artifact hand-over, forget/retain evaluation, and one manual
    optimisation step of :meth:`safeguard_loss` on a ``{"forget", "retain"}`` sentence batch per training step.

    Args:
        model: the causal LM (its spec; built in ``configure_model``).
        optimizer: optimizer factory of the safeguard's (outer) training, over the trained parameters.
        init_from: artifact whose tensors (the trained parameters of an earlier safeguard) are loaded after
            building, e.g. TAR starting from Random Mapping.
        retain_weight: weight of the retain LM loss in the baselines' objective.
    """

    def __init__(
        self,
        model: SplitCausalLM,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        init_from: str | None = None,
        retain_weight: float = 1.0,
    ):
        super().__init__()
        self.net, self.optimizer, self.init_from, self.retain_weight = model, optimizer, init_from, retain_weight
        self.automatic_optimization = False
        self.configure_metrics()
        self._parents: list[dict] = []
        self._built = False

    # --- weights ------------------------------------------------------------------------------------------
    def configure_models(self) -> None:
        if self._built:  # Lightning calls this at every fit/test
            return
        super().configure_models()
        self.after_build()
        if self.init_from is not None:
            art = load_artifact(self.init_from)
            trained = set(self.artifact_state_dict())
            if set(art.state_dict) != trained:  # e.g. other trainable_layers: trunk weights would bypass the cache
                odd = sorted(set(art.state_dict) ^ trained)[:3]
                raise ValueError(f"{self.init_from} does not hold exactly this model's trained tensors (e.g. {odd}): "
                                 "was it exported by a safeguard over the same model spec (trainable_layers)?")  # fmt: skip
            self.load_state_dict(art.state_dict, strict=False)
            self._parents = [parent_record(art)]
        self._built = True

    def after_build(self) -> None:
        """Hook run after the model is built and before ``init_from`` is loaded."""

    def artifact_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained parameters only (the frozen trunk is the pretrained model's, named by the spec)."""
        return {k: v.detach() for k, v in self.named_parameters() if v.requires_grad}

    def artifact_parents(self) -> list[dict]:
        return self._parents

    def trained_parameters(self) -> list[torch.nn.Parameter]:
        """What the optimizers train: the net's trainable parameters, or, under FSDP with ``use_orig_params: false``
        (as the official TAR runs; its README: "it's important that `fsdp_use_orig_params=false`"), the flat
        parameters of the wrapped model, which then own the weights."""
        wrapped = getattr(self._trainer, "model", None) if self._trainer is not None else None
        if wrapped is not None and getattr(wrapped, "_use_orig_params", True) is False:
            return [p for p in wrapped.parameters() if p.requires_grad]
        return self.net.trainable_parameters()

    def configure_optimizers(self):
        return self.optimizer(self.trained_parameters())

    def through_wrapper(self, method: str, *args):
        """``self.<method>(*args)`` run as a forward of the strategy's wrapped model (FSDP, DDP) when there is one.
        A recipe that back-propagates several losses per training step (TAR) must compute each in a forward of the
        wrapper, as the official code calls ``model(**inputs)`` for each: FSDP1 unshards the root unit (embeddings,
        final norm, LM head) again after a backward resharded it (a direct call fails: "Expects `BACKWARD_PRE` or
        `BACKWARD_POST` state but got HandleTrainingState.FORWARD"), and DDP all-reduces each backward's gradients
        (a direct call skips it silently, and the ranks drift apart). Both checked with 2 gloo processes."""
        wrapped = getattr(self._trainer, "model", None) if self._trainer is not None else None
        if wrapped is None or wrapped is self:
            return getattr(self, method)(*args)
        return _ForwardRedirection()(wrapped, self, method, *args)

    def on_train_start(self) -> None:
        """Put optimizers that have modes (``schedulefree``'s) in training mode. The official TAR never calls
        ``optimizer.eval()`` (``tar.py``, ``modules/training.py``), so the weights it evaluates and saves are the
        training-mode ones (schedule-free's ``y``, not the average ``x``); here too."""
        for opt in self.trainer.optimizers:
            if callable(getattr(opt, "train", None)):
                opt.train()

    # --- training -----------------------------------------------------------------------------------------
    def safeguard_loss(self, batch: dict) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define safeguard_loss (or override training_step)")

    def training_step(self, batch: dict, batch_idx: int) -> None:
        opt = self.optimizers()
        loss = self.safeguard_loss(batch)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        self.log("train/loss", loss.detach(), prog_bar=True)

    # --- evaluation ---------------------------------------------------------------------------------------
    def configure_metrics(self) -> None:
        """Forget and retain multiple-choice accuracy and answer NLL per split (they need no DataModule, so
        ``__init__`` creates them)."""
        if not hasattr(self, "metrics"):
            self.metrics = torch.nn.ModuleDict({f"{s}_{m}": MeanMetric() for s in ("val", "test") for m in _METRICS})

    def evaluate(self, split: str, batch, dataloader_idx: int) -> None:
        ids, mask, ans, label = batch
        scores = option_scores(self.net, ids, mask, ans)
        domain = ("retain", "forget")[dataloader_idx]  # the DataModule's order
        acc = self.metrics[f"{split}_{domain}_acc"]
        nll = self.metrics[f"{split}_{domain}_nll"]
        acc.update((scores.argmax(-1) == label).float())
        nll.update(-scores.gather(-1, label[:, None]).squeeze(-1))
        self.log(f"{split}/{domain}_acc", acc, add_dataloader_idx=False, prog_bar=True)
        self.log(f"{split}/{domain}_nll", nll, add_dataloader_idx=False)
        if domain == "retain":
            self.log(f"{split}/acc", acc, add_dataloader_idx=False)


class NoSafeguard(Safeguard):
    """The undefended model: no training (one no-op step), evaluated like the safeguards."""

    def configure_optimizers(self):
        return None

    def training_step(self, batch: dict, batch_idx: int) -> None:
        return None


class RandomReinit(NoSafeguard):
    """The floor control: the trained span (the blocks every safeguard trains and every attack fine-tunes) drawn
    afresh from the model's initial distribution (:meth:`SplitCausalLM.reinitialise`), no training. After an attack
    its forget accuracy is what the attacker learns from its own data on top of the frozen trunk, so a safeguard of
    the same span cannot be expected to end below it: the target any tamper-resistant safeguard must reach.

    Args:
        model: the causal LM (see :class:`Safeguard`, whose other arguments pass through).
        reinit_seed: seed of the new weights.
    """

    def __init__(self, model: SplitCausalLM, reinit_seed: int = 0, **kwargs):
        super().__init__(model=model, **kwargs)
        self.reinit_seed = reinit_seed

    def after_build(self) -> None:
        self.net.reinitialise(self.reinit_seed)


class GradientAscent(Safeguard):
    """Gradient-ascent unlearning: maximise the LM loss on forget text while minimising it on retain text
    (``-forget_weight * L_LM(forget) + retain_weight * L_LM(retain)``), the simplest unlearning baseline.

    Args:
        model: the causal LM (see :class:`Safeguard`, whose other arguments pass through).
        forget_weight: weight of the (negated) forget LM loss.
    """

    def __init__(self, model: SplitCausalLM, forget_weight: float = 1.0, **kwargs):
        super().__init__(model=model, **kwargs)
        self.forget_weight = forget_weight

    def safeguard_loss(self, batch: dict) -> torch.Tensor:
        forget = lm_loss(self.net, batch["forget"])
        self.log("train/forget_lm", forget.detach())
        return -self.forget_weight * forget + self.retain_weight * lm_loss(self.net, batch["retain"], False)
