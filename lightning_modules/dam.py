"""DAM: defense-aware merging (Yang, Tang, Zhu, Chen, Shen, Wu, "Mitigating the Backdoor Effect for Multi-Task
Model Merging via Safety-Aware Subspace", ICLR 2025, arXiv:2410.13910).

The paper learns two masks over the task vectors, alternately, by first-order meta-learning together with the
AdaMerging coefficients, on unlabelled data, minimising ``L_total = L_perf + alpha * L_safe``:

- a **task-shared mask** ``m_s`` (one for all tasks): the parameters useful to every task (``L_perf``, the
  prediction entropy of AdaMerging);
- a **backdoor-detection mask** ``m_b,k`` per task: it isolates the harmful task-specific parameters, i.e. keeps
  an entry of ``tau_k`` only if it does not make the merged model sensitive to a trigger.

How we read it (only the abstract could be read; see /work/shared/research/methods-fl-merge.md):
``theta = theta_0 + sum_k lambda_k (m_s ⊙ m_b,k ⊙ tau_k)``, masks relaxed Bernoulli (Concrete, temperature 0.5),
``m_s`` rescaled by its mean per tensor as in the released code. Each step of the mask phase: (1) the base
learner takes one step on ``lambda`` (entropy, masks fixed); (2) a per-task trigger proxy ``delta_k`` (the released
code's learned input perturbation) takes one step to *maximise* the disagreement of ``f(x + delta_k)`` with the
clean pseudo-labels ``argmax f(x)``; (3) first-order meta step, evaluated at the updated ``lambda``: on even steps
``m_s`` minimises ``L_perf``, on odd steps ``m_b`` minimises ``L_perf + alpha * L_safe``, with ``L_safe`` the
cross-entropy of ``f(x + delta_k)`` against the pseudo-labels (the merged model must not follow the trigger
proxy). Then the masks are made discrete and ``lambda`` is re-learned by AdaMerging with them fixed.

The released code (tanganke/fusion_bench@5a5de1f, ``fusion_bench/method/concrete_subspace/
clip_safe_concrete_adamerging.py``, ``ConcreteSafeLayerWiseAdaMergingForCLIP.train_mask``, identical in
Yangjinluan/DAM) has only the shared mask. Its lines, quoted:

- mask sample: ``mask = mask_model.sample_mask(mask_type="continuous", temperature=config.temperature)`` then
  ``mask[name] = m / torch.mean(m)``;
- proxy: ``loss = torch.mean(-F.cross_entropy(logits_adv, ori_label, reduction="mean"))`` with
  ``ori_label = torch.argmax(logits, axis=1).long()``, no bound on ``perturbed_input``;
- mask loss: ``perturbed_images = torch.clamp(perturbed_images, min=0, max=1)``,
  ``loss_regu = entropy_loss(logits_adv)``, ``loss = loss_nat + self.config.adv_weight * loss_regu``;
- final mask: ``mask_model.sample_mask(mask_type=config.eval_mask_type, ...)``, then ``run_adamerging``.

Differences from the code, each a named option (the code's value first):

- one mask vs two: ``detection_mask`` (``false``: the code);
- ``L_safe``: ``safe_loss: entropy`` (the code) or ``consistency`` (our reading of the paper);
- ``alpha``: ``safety_weight`` (the code's ``adv_weight``: 0.1);
- proxy bound: ``trigger_norm`` (``None``: the code); clamp of ``x + delta``: ``clamp_inputs`` (the code clamps
  to ``[0, 1]``, its pixel range, though it applies it to normalised CLIP inputs; we clamp to the range of each
  task's unlabelled images, the pixel range in standardised units);
- ``lambda`` reset before every inner step: ``reset_merge_weights`` (``true``: the code);
- final mask: ``discrete: sample`` (the code: one Bernoulli draw, so a mask whose logits stayed near 0 is a
  random mask) or the deterministic ``threshold`` (keep probability > 0.5) or ``topk`` (per tensor, the
  ``keep_fraction`` largest shared logits);
- budget: the code takes 1000 mask steps at lr 1e-3 on CLIP; our pool gets far fewer steps, so the logits need a
  larger lr (``mask_optimizer``) to leave the neighbourhood of 0. ``train/mask/*`` and ``test``'s ``mask/*`` log
  the fraction of logits with ``|logit| > 1`` and the kept fractions, so a mask that did not learn is visible.

:class:`DAMPermutedMasks` is the matched control: DAM's own learned discrete masks, permuted within each tensor
(the same kept fraction per tensor and task, random positions).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from lightning_modules.adamerging import AdaMerging
from lightning_modules.ops import merging as ops


class DAM(AdaMerging):
    """Defense-aware merging: task-shared and backdoor-detection masks learned with the AdaMerging coefficients.

    Phases (by epoch): ``mask_epochs`` epochs of alternating meta-learning of the masks, then the remaining
    epochs of plain AdaMerging with the discrete masks fixed (the released code's final stage).

    Args:
        net: the pool's architecture (see :class:`~lightning_modules.merging.MergeRecipe`).
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
        discrete: the final shared mask: ``sample`` (one Bernoulli draw, the code), ``threshold`` (keep prob. > 0.5)
            or ``topk`` (the ``keep_fraction`` largest logits of each tensor); the detection mask is thresholded.
        keep_fraction: fraction of each tensor's shared mask kept by ``topk``.
        clamp_inputs: clamp ``x + delta_k`` to the value range of task ``k``'s unlabelled images (the code clamps
            to ``[0, 1]``, the pixel range) in the mask step.
        reset_merge_weights: reset ``lambda`` to ``init`` before every inner step (the code does).
        mask_seed: seed of the discrete mask draw (``sample``) and of :class:`DAMPermutedMasks`' permutation.
        masks_from: ``dam_masks.safetensors`` of an earlier run (written to its log dir when its mask phase ends):
            its mask logits replace the initial ones; with ``mask_epochs: 0`` they are used as they are (a control
            on the same learned masks without learning them again).
        mask_optimizer: optimizer of the mask logits (the code: Adam, lr 1e-3).
        trigger_optimizer: optimizer of the trigger proxy (the code: Adam, lr 1e-4).
        detection_optimizer: optimizer of the detection mask logits (``None``: ``mask_optimizer``).

    The arguments of :class:`~lightning_modules.adamerging.AdaMerging` pass through (``pretrained``, ``task_models``,
    ``granularity``, ``init``: 0.3 as the code, ``clamp``, ``optimizer``: of the merge coefficients, the inner step,
    ``head_prefix``).
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        mask_epochs: int = 1,
        temperature: float = 0.5,
        shared_mask_init: float = 0.0,
        detection_mask: bool = True,
        detection_mask_init: float = 3.0,
        safety_weight: float = 1.0,
        safe_loss: Literal["consistency", "entropy"] = "consistency",
        trigger_norm: float | None = None,
        discrete: Literal["sample", "threshold", "topk"] = "sample",
        keep_fraction: float = 0.5,
        clamp_inputs: bool = False,
        reset_merge_weights: bool = False,
        mask_seed: int = 0,
        masks_from: str | None = None,
        mask_optimizer: OptimizerCallable = torch.optim.Adam,
        trigger_optimizer: OptimizerCallable = torch.optim.Adam,
        detection_optimizer: OptimizerCallable | None = None,
        **kwargs,
    ):
        super().__init__(net=net, **kwargs)
        if safe_loss not in ("consistency", "entropy"):
            raise ValueError(f"safe_loss must be 'consistency' or 'entropy', got {safe_loss!r}")
        if trigger_norm is not None and trigger_norm <= 0:
            raise ValueError(f"trigger_norm must be > 0 (or None for no bound), got {trigger_norm}")
        self.mask_epochs, self.temperature, self.detection_mask = mask_epochs, temperature, detection_mask
        self.shared_mask_init, self.detection_mask_init = shared_mask_init, detection_mask_init
        self.safety_weight, self.safe_loss, self.trigger_norm = safety_weight, safe_loss, trigger_norm
        if discrete not in ("sample", "threshold", "topk"):
            raise ValueError(f"discrete must be 'sample', 'threshold' or 'topk', got {discrete!r}")
        if not 0.0 < keep_fraction <= 1.0:
            raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
        self.discrete, self.reset_merge_weights, self.mask_seed = discrete, reset_merge_weights, mask_seed
        self.keep_fraction, self.clamp_inputs, self.masks_from = keep_fraction, clamp_inputs, masks_from
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
        if self.masks_from is not None:
            self._load_logits(self.masks_from)

    def _logits(self) -> dict[str, torch.Tensor]:
        out = {f"shared.{i}": lg.detach() for i, lg in enumerate(self.shared_logits)}
        return {**out, **{f"detection.{i}": lg.detach() for i, lg in enumerate(self.detection_logits)}}

    def _load_logits(self, path: str) -> None:
        from safetensors.torch import load_file

        try:
            saved = load_file(path)
        except (OSError, RuntimeError) as err:
            raise ValueError(f"masks_from={path!r} is not a readable dam_masks.safetensors ({err})") from None
        own = self._logits()
        if set(saved) != set(own) or any(saved[k].shape != own[k].shape for k in own):
            raise ValueError(f"masks_from={path!r} does not match this pool and detection_mask setting")
        with torch.no_grad():
            for k, lg in [*((f"shared.{i}", p) for i, p in enumerate(self.shared_logits)),
                          *((f"detection.{i}", p) for i, p in enumerate(self.detection_logits))]:  # fmt: skip
                lg.copy_(saved[k])

    def save_logits(self) -> None:
        """Write the mask logits to ``<log dir>/dam_masks.safetensors`` (atomically), for ``masks_from``."""
        from safetensors.torch import save

        from foundation.artifacts import atomic_write_bytes

        if self.trainer.log_dir is not None and self.trainer.is_global_zero:
            logits = {k: v.cpu().contiguous() for k, v in self._logits().items()}
            atomic_write_bytes(f"{self.trainer.log_dir}/dam_masks.safetensors", save(logits))

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if not hasattr(self, "trigger"):  # one input perturbation per task, shaped like the DataModule's images
            shape = self.trainer.datamodule.splits[0].val[0].shape[1:]
            self.trigger = nn.Parameter(torch.zeros(len(self.task_vectors), *shape, device=self.device))
            self.input_range = [self._pixel_range(s.val[0]) for s in self.trainer.datamodule.splits]

    @staticmethod
    def _pixel_range(images) -> tuple[torch.Tensor, torch.Tensor]:
        """Per channel, the range of a task's normalised inputs, ``[C, 1, 1]`` each: the pixel range [0, 1] through
        the normalisation of a lazily decoded exported task, else the range of its unlabelled images."""
        if hasattr(images, "mean") and hasattr(images, "std") and not torch.is_tensor(images):
            mean, std = torch.tensor(images.mean), torch.tensor(images.std)
            return ((0.0 - mean) / std).view(-1, 1, 1), ((1.0 - mean) / std).view(-1, 1, 1)
        return images.amin(dim=(0, 2, 3)).view(-1, 1, 1), images.amax(dim=(0, 2, 3)).view(-1, 1, 1)

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
        shared = [ops.mean_rescale(ops.discrete_mask(lg.detach(), self.discrete, g, self.keep_fraction))
                  for lg in self.shared_logits]  # fmt: skip
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

    def perturbed(self, x: torch.Tensor, task: int, clamp: bool = False) -> torch.Tensor:
        """``x + delta_task``, clamped to the task's input range with ``clamp``."""
        out = x + self.trigger[task]
        if not clamp:
            return out
        lo, hi = (t.to(out) for t in self.input_range[task])
        return torch.maximum(torch.minimum(out, hi), lo)

    def _pseudo_label_loss(
        self, batch: dict, state: ops.StateDict, kind: str, clean: list[torch.Tensor] | None = None,
        clamp: bool = False,
    ) -> torch.Tensor:
        """``sum_k CE(f(x_k + delta_k), argmax f(x_k))`` (``consistency``) or ``sum_k H(f(x_k + delta_k))``;
        ``clean``: the clean logits ``f(x_k)`` per task when the caller has them already (saves a forward);
        ``clamp``: clamp ``x_k + delta_k`` to the task's input range (the code's mask step)."""
        total = 0.0
        for k, name in enumerate(self.task_names):
            x = batch[name][0]
            logits_adv = self.forward_merged(self.perturbed(x, k, clamp), k, state)
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
                self.save_logits()
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
            safe = self._pseudo_label_loss(batch, state, self.safe_loss, clean, self.clamp_inputs)
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
        self.log_dict({f"train/mask/{k}": v for k, v in self.mask_statistics().items()})
        return loss_mask

    @torch.no_grad()
    def mask_statistics(self) -> dict[str, float]:
        """How far the masks learned: the fraction of shared (detection) logits with ``|logit| > 1``, i.e. keep
        probabilities outside [0.27, 0.73]; the fraction of shared logits > 0 and of detection logits < 0
        (entries the detection mask drops); ``kept``: the mean over tasks of the kept fraction of the final
        discrete masks."""
        shared = torch.cat([lg.flatten() for lg in self.shared_logits])
        out = {"shared_moved": float((shared.abs() > 1).float().mean()), "shared_positive": float((shared > 0).float().mean())}
        if self.detection_mask:
            det = torch.cat([lg.flatten() for lg in self.detection_logits])
            out["detection_moved"] = float(((det - self.detection_mask_init).abs() > 1).float().mean())
            out["detection_dropped"] = float((det < 0).float().mean())
        masks = self.final_masks if self.final_masks is not None else self.discrete_masks()
        out["kept"] = sum(float(sum((m[n] != 0).sum() for n in m) / sum(m[n].numel() for n in m)) for m in masks) / len(masks)
        return out

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self.log_dict({f"mask/{k}": v for k, v in self.mask_statistics().items()})

    def describe_merge(self) -> dict:
        masks = self.final_masks if self.final_masks is not None else self.discrete_masks()
        kept = [float(sum((m[n] != 0).sum() for n in m) / sum(m[n].numel() for n in m)) for m in masks]
        return {**super().describe_merge(), "rule": type(self).__name__, "detection_mask": self.detection_mask,
                "kept_fraction_per_task": kept, "mask_statistics": self.mask_statistics()}  # fmt: skip


class DAMPermutedMasks(DAM):
    """The matched random-mask control of :class:`DAM`: the same training, then each tensor's final discrete masks
    (shared and detection, the same permutation for every task) are permuted at random within the tensor, seeded
    by ``mask_seed``. The kept fraction of every tensor and task is DAM's; only which entries are kept is random.
    Its arguments are :class:`DAM`'s."""

    def discrete_masks(self) -> list[ops.StateDict]:
        masks = super().discrete_masks()
        g = torch.Generator().manual_seed(10_000 + self.mask_seed)
        for n in self.pretrained_state:
            perm = torch.randperm(masks[0][n].numel(), generator=g).to(masks[0][n].device)
            for m in masks:
                m[n] = m[n].flatten()[perm].view_as(m[n])
        return masks
