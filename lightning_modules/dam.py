"""DAM: defense-aware merging (Yang, Tang, Zhu, Chen, Shen, Wu, "Mitigating the Backdoor Effect for Multi-Task
Model Merging via Safety-Aware Subspace", ICLR 2025, arXiv:2410.13910).

The paper learns two masks over the task vectors, alternately, by first-order meta-learning together with the
AdaMerging coefficients, on unlabelled data, minimising ``L_total = L_perf + alpha * L_safe``:

- a **task-shared mask** ``m_s`` (one for all tasks): the parameters useful to every task (``L_perf``, the
  prediction entropy of AdaMerging);
- a **backdoor-detection mask** ``m_b,k`` per task: it isolates the harmful task-specific parameters, i.e. keeps
  an entry of ``tau_k`` only if it does not make the merged model sensitive to a trigger.

How we read it (the paper's full text was not available, see docs/results/dam-section.md):
``theta = theta_0 + sum_k lambda_k (m_s ⊙ m_b,k ⊙ tau_k)``, masks relaxed Bernoulli (Concrete, temperature 0.5),
``m_s`` rescaled by its mean per tensor as in the released code. Each step of the mask phase: (1) the base
learner takes one step on ``lambda`` (entropy, masks fixed); (2) a per-task trigger proxy ``delta_k`` (the released
code's learned input perturbation) takes one step to *maximise* the disagreement of ``f(x + delta_k)`` with the
clean pseudo-labels ``argmax f(x)``; (3) first-order meta step, evaluated at the updated ``lambda``: on even steps
``m_s`` minimises ``L_perf``, on odd steps ``m_b`` minimises ``L_perf + alpha * L_safe``, with ``L_safe`` the
cross-entropy of ``f(x + delta_k)`` against the pseudo-labels (the merged model must not follow the trigger
proxy). Then the masks are made discrete and ``lambda`` is re-learned by AdaMerging with them fixed.

The released code (fusion_bench ``clip_safe_concrete_*_adamerging``) has only the shared mask, and its mask loss
is ``L_perf + 0.1 * H(f(x + delta))``: ``detection_mask: false, safe_loss: entropy, safety_weight: 0.1,
reset_merge_weights: true, discrete: sample`` reproduces it (without its clamp of normalised inputs to [0, 1]).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from lightning_modules.merging import AdaMerging
from lightning_modules.ops import merging as ops


class DAM(AdaMerging):
    """Defense-aware merging: task-shared and backdoor-detection masks learned with the AdaMerging coefficients.

    Phases (by epoch): ``mask_epochs`` epochs of alternating meta-learning of the masks, then the remaining
    epochs of plain AdaMerging with the discrete masks fixed (the released code's final stage).

    Args:
        net: the pool's architecture (see :class:`~lightning_modules.merging.MergeRecipe`).
        pretrained: artifact of the pretrained backbone.
        task_models: artifacts of the task models, in the DataModule's task order.
        granularity: ``task`` or ``layer`` merge coefficients.
        init: initial merge coefficient (0.3, the code).
        clamp: clamp merge coefficients to ``[0, 1]``.
        mask_epochs: epochs of the mask phase; later epochs re-learn ``lambda`` with the discrete masks fixed.
        temperature: temperature of the relaxed Bernoulli masks (the code: 0.5).
        shared_mask_init: initial logit of the task-shared mask (the code: 0, keep probability 0.5).
        detection_mask: learn the per-task backdoor-detection mask (``false``: the released code's single mask).
        detection_mask_init: initial logit of the detection mask (3: keep with probability 0.95).
        safety_weight: ``alpha``, the weight of ``L_safe`` in the detection mask's loss (the code: 0.1).
        safe_loss: ``consistency`` (cross-entropy of ``f(x + delta)`` against the clean pseudo-labels, our reading
            of the paper) or ``entropy`` (``H(f(x + delta))``, the released code).
        trigger_norm: L-infinity bound of the trigger proxy in standardised input units (``None``: unbounded,
            as the code, whose ``trigger_norm`` key is unused).
        discrete: the final masks: ``sample`` (one Bernoulli draw, the code) or ``threshold`` (keep prob. > 0.5).
        reset_merge_weights: reset ``lambda`` to ``init`` before every inner step (the code does).
        mask_seed: seed of the discrete mask draw.
        optimizer: optimizer of the merge coefficients (inner step).
        mask_optimizer: optimizer of the mask logits (the code: Adam, lr 1e-3).
        trigger_optimizer: optimizer of the trigger proxy (the code: Adam, lr 1e-4).
        detection_optimizer: optimizer of the detection mask logits (``None``: ``mask_optimizer``).
        head_prefix: prefix of the head's keys in ``net.state_dict()``.
    """

    def __init__(
        self,
        net: nn.Module,
        pretrained: str,
        task_models: list[str],
        granularity: Literal["task", "layer"] = "layer",
        init: float = 0.3,
        clamp: bool = True,
        mask_epochs: int = 1,
        temperature: float = 0.5,
        shared_mask_init: float = 0.0,
        detection_mask: bool = True,
        detection_mask_init: float = 3.0,
        safety_weight: float = 1.0,
        safe_loss: Literal["consistency", "entropy"] = "consistency",
        trigger_norm: float | None = None,
        discrete: Literal["sample", "threshold"] = "sample",
        reset_merge_weights: bool = False,
        mask_seed: int = 0,
        optimizer: OptimizerCallable = torch.optim.Adam,
        mask_optimizer: OptimizerCallable = torch.optim.Adam,
        trigger_optimizer: OptimizerCallable = torch.optim.Adam,
        detection_optimizer: OptimizerCallable | None = None,
        head_prefix: str = "head.",
    ):
        super().__init__(net, pretrained, task_models, granularity, init, clamp, optimizer, head_prefix)
        self.save_hyperparameters(
            ignore=["net", "optimizer", "mask_optimizer", "trigger_optimizer", "detection_optimizer"]
        )
        if safe_loss not in ("consistency", "entropy"):
            raise ValueError(f"safe_loss must be 'consistency' or 'entropy', got {safe_loss!r}")
        if trigger_norm is not None and trigger_norm <= 0:
            raise ValueError(f"trigger_norm must be > 0 (or None for no bound), got {trigger_norm}")
        self.mask_epochs, self.temperature, self.detection_mask = mask_epochs, temperature, detection_mask
        self.shared_mask_init, self.detection_mask_init = shared_mask_init, detection_mask_init
        self.safety_weight, self.safe_loss, self.trigger_norm = safety_weight, safe_loss, trigger_norm
        self.discrete, self.reset_merge_weights, self.mask_seed = discrete, reset_merge_weights, mask_seed
        self.mask_optimizer, self.trigger_optimizer = mask_optimizer, trigger_optimizer
        self.detection_optimizer = detection_optimizer or mask_optimizer
        self.final_masks: list[ops.StateDict] | None = None
        self._step = 0

    def configure_model(self) -> None:
        if hasattr(self, "shared_logits"):
            return
        super().configure_model()
        shapes = [t.shape for t in self.pretrained_state.values()]
        num_tasks = len(self.task_vectors)
        self.shared_logits = nn.ParameterList([nn.Parameter(torch.full(s, self.shared_mask_init)) for s in shapes])
        self.detection_logits = nn.ParameterList(
            [nn.Parameter(torch.full((num_tasks, *s), self.detection_mask_init)) for s in shapes]
            if self.detection_mask
            else []
        )

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if not hasattr(self, "trigger"):  # one input perturbation per task, shaped like the DataModule's images
            shape = self.trainer.datamodule.splits[0].val[0].shape[1:]
            self.trigger = nn.Parameter(torch.zeros(len(self.task_vectors), *shape, device=self.device))

    # ------------------------------------------------------------------ masks
    def relaxed_masks(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """One relaxed Bernoulli sample of the task-shared masks (per tensor) and of the detection masks (per
        tensor, ``[K, ...]``; empty without ``detection_mask``), all in ``[0, 1]``."""
        shared = [ops.relaxed_bernoulli(lg, self.temperature) for lg in self.shared_logits]
        detection = [ops.relaxed_bernoulli(lg, self.temperature) for lg in self.detection_logits]
        return shared, detection

    def sample_masks(self) -> list[ops.StateDict]:
        """Per task ``mean_rescale(m_s) * m_b,k`` from one relaxed sample (differentiable in the logits)."""
        shared, detection = self.relaxed_masks()
        shared = [ops.mean_rescale(m) for m in shared]
        names = list(self.pretrained_state)
        return [{n: shared[i] * detection[i][k] if detection else shared[i] for i, n in enumerate(names)}
                for k in range(len(self.task_vectors))]  # fmt: skip

    def discrete_masks(self) -> list[ops.StateDict]:
        """The final 0/1 masks (the shared one rescaled by its mean, as in training)."""
        g = torch.Generator(device=self.device).manual_seed(self.mask_seed)
        names = list(self.pretrained_state)
        shared = [ops.mean_rescale(ops.discrete_mask(lg.detach(), self.discrete, g)) for lg in self.shared_logits]
        masks = []
        for k in range(len(self.task_vectors)):
            masks.append({n: shared[i] * (ops.discrete_mask(self.detection_logits[i][k].detach(), "threshold")
                                          if self.detection_mask else 1.0) for i, n in enumerate(names)})  # fmt: skip
        return masks

    def merged_state(self, masks: list[ops.StateDict] | None = None) -> ops.StateDict:
        if masks is None:
            masks = self.final_masks if self.final_masks is not None else self.discrete_masks()
        return super().merged_state(masks)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        opts = [self.optimizer([self.merge_weights]), self.mask_optimizer(list(self.shared_logits)),
                self.trigger_optimizer([self.trigger])]  # fmt: skip
        if self.detection_mask:
            opts.append(self.detection_optimizer(list(self.detection_logits)))
        return opts

    def _pseudo_label_loss(
        self, batch: dict, state: ops.StateDict, kind: str, clean: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """``sum_k CE(f(x_k + delta_k), argmax f(x_k))`` (``consistency``) or ``sum_k H(f(x_k + delta_k))``;
        ``clean``: the clean logits ``f(x_k)`` per task when the caller has them already (saves a forward)."""
        total = 0.0
        for k, name in enumerate(self.task_names):
            x = batch[name][0]
            logits_adv = self.forward_merged(x + self.trigger[k], k, state)
            if kind == "entropy":
                total = total + ops.entropy(logits_adv)
            else:
                if clean is None:
                    with torch.no_grad():
                        pseudo = self.forward_merged(x, k, state).argmax(-1)
                else:
                    pseudo = clean[k].detach().argmax(-1)
                total = total + F.cross_entropy(logits_adv, pseudo)
        return total

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        opts = self.optimizers()
        opt_w, opt_shared, opt_trigger = opts[:3]
        if self.current_epoch >= self.mask_epochs:  # final stage: AdaMerging with the discrete masks fixed
            if self.final_masks is None:
                self.final_masks = self.discrete_masks()
                with torch.no_grad():
                    self.merge_weights.fill_(self.init)
            return super().training_step(batch, batch_idx)
        masks = self.sample_masks()
        # (1) inner step on the merge coefficients, masks fixed
        if self.reset_merge_weights:
            with torch.no_grad():
                self.merge_weights.fill_(self.init)
        detached = [{n: m.detach() for n, m in mk.items()} for mk in masks]
        loss_w = self.entropy_loss(batch, self.merged_state(detached))
        opt_w.zero_grad()
        self.manual_backward(loss_w)
        opt_w.step()
        # (2) trigger proxy: maximise the disagreement with the clean pseudo-labels, merged weights fixed
        with torch.no_grad():
            frozen = self.merged_state(detached)
        loss_trigger = -self._pseudo_label_loss(batch, frozen, "consistency")
        opt_trigger.zero_grad()
        self.manual_backward(loss_trigger)
        opt_trigger.step()
        if self.trigger_norm is not None:
            with torch.no_grad():
                self.trigger.clamp_(-self.trigger_norm, self.trigger_norm)
        # (3) first-order meta step on one mask, at the updated coefficients (alternating)
        state = self.merged_state(masks)
        clean = [self.forward_merged(batch[name][0], k, state) for k, name in enumerate(self.task_names)]
        perf = sum((ops.entropy(logits) for logits in clean), 0.0)  # entropy_loss, keeping the logits
        update_detection = self.detection_mask and self._step % 2 == 1
        if update_detection or not self.detection_mask:
            safe = self._pseudo_label_loss(batch, state, self.safe_loss, clean)  # pseudo-labels from those logits
            loss_mask = perf + self.safety_weight * safe
            self.log("train/safe", safe)
        else:
            loss_mask = perf
        opt_mask = opts[3] if update_detection else opt_shared
        opt_mask.zero_grad()
        self.manual_backward(loss_mask)
        opt_mask.step()
        self._step += 1
        self.log_dict({"train/entropy": perf, "train/trigger_disagreement": -loss_trigger}, prog_bar=True)
        return loss_mask

    def describe_merge(self) -> dict:
        masks = self.final_masks if self.final_masks is not None else self.discrete_masks()
        kept = [float(sum((m[n] != 0).sum() for n in m) / sum(m[n].numel() for n in m)) for m in masks]
        return {**super().describe_merge(), "rule": "DAM", "detection_mask": self.detection_mask,
                "kept_fraction_per_task": kept}  # fmt: skip
