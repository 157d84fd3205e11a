"""Merge recipes: a pool of models in (one pretrained backbone and task models fine-tuned from it, some possibly
backdoored), one model out, evaluated per task (accuracy and attack success rate).

The shared part of the network (everything but the classification head) is merged from the task vectors
``tau_k = theta_k - theta_0`` (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023); each task keeps
its own linear head from its task model, as with per-task (zero-shot) heads of CLIP in the merging papers.

- :class:`MergeRecipe` with a fixed rule (:mod:`lightning_modules.merge_rules`: task arithmetic, TIES, DARE);
- learned merges subclass it: AdaMerging (:mod:`lightning_modules.adamerging`) and DAM (:mod:`lightning_modules.dam`);
- :class:`TaskFineTuning` trains the task models of a pool from the pretrained backbone.

Fixed rules take no optimisation step: run them with ``trainer.max_epochs: 1`` and ``limit_train_batches: 1``
(the step is empty); validation and test evaluate the merged model.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call
from torchmetrics.classification import MulticlassAccuracy

from foundation.artifacts import load_artifact, parent_record
from lightning_modules.base import BaseRecipe
from lightning_modules.classifier import ClassifierRecipe
from lightning_modules.merge_rules import MergeRule, TaskArithmetic
from lightning_modules.metrics import AttackSuccessRate
from lightning_modules.ops import merging as ops


class TaskFineTuning(ClassifierRecipe):
    """Fine-tune one task model of a merge pool from the pretrained backbone (an artifact): the shared weights
    start from ``theta_0``, the head (keys starting with ``head_prefix``) is new; training is
    :class:`~lightning_modules.classifier.ClassifierRecipe`'s (clean or, with a poisoned DataModule, BadNets).
    With ``linear_probe_epochs`` the first epochs train the head alone on the frozen backbone, then everything
    (LP-FT, Kumar et al., ICLR 2022): the head then fits the pretrained features, which keeps task vectors small
    and mergeable, as the frozen zero-shot heads of CLIP do in the merging papers.

    With ``head`` the head starts from another artifact's (a clean linear probe, i.e. this recipe with
    ``linear_probe_epochs = max_epochs`` on clean data) and with ``freeze_head`` it never trains: a backdoor then has
    to live in the shared weights that merging combines, as with CLIP's frozen zero-shot heads (DAM's threat model).

    Args:
        net: the classifier network, with the task's number of classes.
        pretrained: artifact of the pretrained backbone (``None``: train from ``net``'s initialisation).
        head_prefix: prefix of the head's keys in ``net.state_dict()`` (not loaded from the backbone).
        linear_probe_epochs: epochs that train the head alone before full fine-tuning (0: none).
        head: artifact whose head (keys starting with ``head_prefix``) initialises this model's (``None``: new).
        freeze_head: never train the head (with ``head``: the clean probe's head is kept as it is).

    The arguments of :class:`~lightning_modules.classifier.ClassifierRecipe` pass through (``optimizer``,
    ``scheduler``, ``label_smoothing``).
    """

    def __init__(
        self,
        net: nn.Module,
        pretrained: str | None = None,
        head_prefix: str = "head.",
        linear_probe_epochs: int = 0,
        head: str | None = None,
        freeze_head: bool = False,
        **kwargs,
    ):
        super().__init__(net=net, **kwargs)
        if linear_probe_epochs < 0:
            raise ValueError(f"linear_probe_epochs must be >= 0, got {linear_probe_epochs}")
        if freeze_head and linear_probe_epochs:
            raise ValueError("freeze_head with linear_probe_epochs > 0 trains nothing while probing: set one of them")
        self.pretrained, self.head_prefix, self.linear_probe_epochs = pretrained, head_prefix, linear_probe_epochs
        self.head, self.freeze_head = head, freeze_head
        self._parents: list[dict] = []

    def on_train_epoch_start(self) -> None:
        probing = self.current_epoch < self.linear_probe_epochs
        for name, p in self.net.named_parameters():
            is_head = name.startswith(self.head_prefix)
            p.requires_grad_((is_head and not self.freeze_head) or (not is_head and not probing))

    def configure_model(self) -> None:
        super().configure_model()
        if self.pretrained is None or self._parents:
            return
        art = load_artifact(self.pretrained)
        shared = {k.removeprefix("net."): v for k, v in art.state_dict.items()
                  if not k.removeprefix("net.").startswith(self.head_prefix)}  # fmt: skip
        missing, unexpected = self.net.load_state_dict(shared, strict=False)
        wrong = [k for k in missing if not k.startswith(self.head_prefix)] + list(unexpected)
        if wrong:
            raise ValueError(f"{self.pretrained} does not match net outside the head: {wrong[:5]}")
        self._parents.append(parent_record(art))
        if self.head is not None:
            art = load_artifact(self.head)
            head = {k.removeprefix("net."): v for k, v in art.state_dict.items()
                    if k.removeprefix("net.").startswith(self.head_prefix)}  # fmt: skip
            own = {k for k in self.net.state_dict() if k.startswith(self.head_prefix)}
            if set(head) != own or any(head[k].shape != self.net.state_dict()[k].shape for k in own):
                raise ValueError(f"{self.head}: its head does not match net's ({sorted(own)}): check num_classes")
            self.net.load_state_dict(head, strict=False)
            self._parents.append(parent_record(art))

    def artifact_parents(self) -> list[dict]:
        return list(self._parents)


class _Features(nn.Module):
    """``net.features(x)`` as a module's forward, so it can run with functionally merged weights."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)


class MergeRecipe(BaseRecipe):
    """A pool of models in, one model out (a fixed :class:`MergeRule`), evaluated per task.

    ``configure_model`` loads the pretrained artifact and the task artifacts (safetensors, hashes verified),
    splits each state dict into the shared part and the head (keys starting with ``head_prefix``), builds the
    task vectors of the shared part and one linear head per task. Validation and test log, per task,
    ``<split>/<task>/acc`` and ``<split>/<task>/asr`` (if the task has a trigger), and ``<split>/acc`` (mean over
    tasks) and ``<split>/asr`` (mean over the tasks whose model was trained on poisoned data, read from the
    artifact manifests; over every task with a trigger if none was).

    Args:
        net: the architecture of the pool (e.g. ``MnistCNN``); it needs ``features(x)`` and a linear head.
        pretrained: artifact of the pretrained backbone ``theta_0`` (its head is ignored).
        task_models: artifacts of the task models, in the order of the DataModule's tasks.
        rule: the fixed merge rule (ignored by learned merges, which have their own).
        head_prefix: prefix of the head's keys in ``net.state_dict()``; the head must be an ``nn.Linear``.
    """

    def __init__(
        self,
        net: nn.Module,
        pretrained: str,
        task_models: list[str],
        rule: MergeRule | None = None,
        head_prefix: str = "head.",
    ):
        super().__init__()
        if not task_models:
            raise ValueError("task_models is empty: give one artifact per task of the DataModule")
        self.net = net
        self.__dict__["features"] = _Features(net)  # a view of net for functional calls, not a second submodule
        self.rule = rule if rule is not None else TaskArithmetic()
        self.pretrained_path, self.task_paths, self.head_prefix = pretrained, list(task_models), head_prefix
        self.heads = nn.ModuleList()
        self.pretrained_state: ops.StateDict = {}
        self.task_vectors: list[ops.StateDict] = []
        self.backdoored: list[bool] = []
        self._parents: list[dict] = []
        self.automatic_optimization = False

    # ------------------------------------------------------------------ the pool
    def configure_model(self) -> None:
        if self.task_vectors:
            return
        if hasattr(self.net, "build"):
            self.net.build()
        shared_keys = [n for n in self.net.state_dict() if not n.startswith(self.head_prefix)]
        if len(shared_keys) == len(self.net.state_dict()):
            raise ValueError(f"no key of net starts with head_prefix {self.head_prefix!r}: set it to the head's prefix")

        def load(path: str) -> tuple[ops.StateDict, ops.StateDict, dict]:
            art = load_artifact(path)
            self._parents.append(parent_record(art))
            state = {k.removeprefix("net."): v.float() for k, v in art.state_dict.items()}
            missing = [k for k in shared_keys if k not in state]
            if missing:
                raise ValueError(f"{path} lacks {missing[:5]}: task models must share net's architecture")
            head = {k: v for k, v in state.items() if k.startswith(self.head_prefix)}
            return {k: state[k] for k in shared_keys}, head, art.manifest

        self.pretrained_state = load(self.pretrained_path)[0]
        self.task_vectors = []
        for path in self.task_paths:  # one task model in memory at a time (8 CLIP towers would double the peak)
            shared, head, manifest = load(path)
            try:
                self.task_vectors += ops.task_vectors(self.pretrained_state, [shared])
            except ValueError as err:
                raise ValueError(f"{path}: {err}") from None
            self.heads.append(self._linear_head(head, path))
            self.backdoored.append(float(manifest.get("poisoning", {}).get("rate", 0.0)) > 0)
        self.load_shared(self.pretrained_state)

    def _linear_head(self, head: ops.StateDict, path: str) -> nn.Linear:
        weight, bias = head.get(self.head_prefix + "weight"), head.get(self.head_prefix + "bias")
        if weight is None or weight.dim() != 2:
            raise ValueError(f"{path}: no linear head weight under {self.head_prefix!r}weight")
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        with torch.no_grad():
            layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def load_shared(self, state: ops.StateDict) -> None:
        """Copy merged shared weights into ``net`` in place."""
        with torch.no_grad():
            own = self.net.state_dict(keep_vars=True)
            for name, tensor in state.items():
                own[name].copy_(tensor)

    def pool_to(self, device: torch.device) -> None:
        self.pretrained_state = {k: v.to(device) for k, v in self.pretrained_state.items()}
        self.task_vectors = [{k: v.to(device) for k, v in tv.items()} for tv in self.task_vectors]

    def merged_state(self) -> ops.StateDict:
        """The merged shared weights ``theta_0 + rule(tau_1..tau_K)``; learned merges override this."""
        return ops.add(self.pretrained_state, self.rule.merge(self.task_vectors))

    # ------------------------------------------------------------------ the DataModule's tasks
    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        tasks = getattr(dm, "tasks", None)
        if tasks is None:
            raise ValueError(
                f"{type(self).__name__} needs a multi-task DataModule (MultiTaskDataModule), got {type(dm).__name__}"
            )
        dm.setup(stage)
        self.configure_model()  # Lightning calls setup() before configure_model(); the pool is loaded once
        if len(tasks) != len(self.task_paths):
            raise ValueError(f"{len(tasks)} tasks in the DataModule but {len(self.task_paths)} task_models: give one "
                             "artifact per task, in order")
        self.task_names = [t.name for t in tasks]
        for k, (head, n) in enumerate(zip(self.heads, dm.num_classes)):
            if head.out_features != n:
                raise ValueError(f"task {self.task_names[k]!r} has {n} classes but its model's head has "
                                 f"{head.out_features}: check the order of task_models")
        for split in ("val", "test"):
            if not hasattr(self, f"{split}_metrics"):
                metrics = nn.ModuleDict()
                for t, n in zip(tasks, dm.num_classes):
                    metrics[f"{t.name}/acc"] = MulticlassAccuracy(n, average="micro")
                    if t.poisoning is not None:
                        metrics[f"{t.name}/asr"] = AttackSuccessRate(t.poisoning.target_label)
                setattr(self, f"{split}_metrics", metrics)

    def on_fit_start(self) -> None:
        self.pool_to(self.device)

    def refresh(self) -> None:
        """Write the current merge into ``net`` (evaluation and export use ``net`` directly)."""
        if self.pretrained_state and next(iter(self.pretrained_state.values())).device != self.device:
            self.pool_to(self.device)
        with torch.no_grad():
            self.load_shared(self.merged_state())

    # ------------------------------------------------------------------ steps
    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        return self.heads[task](self.features(x))

    def forward_merged(self, x: torch.Tensor, task: int, state: ops.StateDict) -> torch.Tensor:
        """Logits of task ``task`` with the shared weights ``state`` (differentiable in ``state``)."""
        feats = functional_call(self.features, {f"net.{k}": v for k, v in state.items()}, (x,))
        return self.heads[task](feats)

    def training_step(self, batch, batch_idx: int) -> None:
        """Fixed rules: nothing to optimise."""

    def configure_optimizers(self):
        return None

    def on_validation_epoch_start(self) -> None:
        self.refresh()

    def on_test_epoch_start(self) -> None:
        self.refresh()

    def _evaluate(self, split: str, batch, dataloader_idx: int) -> None:
        task, kind = self.trainer.datamodule.eval_index[dataloader_idx]
        x, y = batch
        preds = self(x, task).argmax(-1)
        name = f"{self.task_names[task]}/{'acc' if kind == 'clean' else 'asr'}"
        getattr(self, f"{split}_metrics")[name].update(preds, y)

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate("val", batch, dataloader_idx)

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate("test", batch, dataloader_idx)

    def _log_epoch(self, split: str) -> None:
        metrics = getattr(self, f"{split}_metrics")
        values = {name: m.compute() for name, m in metrics.items()}
        for m in metrics.values():
            m.reset()
        for name, v in values.items():
            self.log(f"{split}/{name}", v)
        self.log(f"{split}/acc", torch.stack([v for n, v in values.items() if n.endswith("/acc")]).mean())
        asr = [values[f"{t}/asr"] for t, bd in zip(self.task_names, self.backdoored) if bd and f"{t}/asr" in values]
        asr = asr or [v for n, v in values.items() if n.endswith("/asr")]
        if asr:
            self.log(f"{split}/asr", torch.stack(asr).mean())

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    # ------------------------------------------------------------------ export
    def artifact_state_dict(self) -> dict[str, torch.Tensor]:
        self.refresh()
        out = {f"net.{k}": v for k, v in self.net.state_dict().items() if not k.startswith(self.head_prefix)}
        names = getattr(self, "task_names", [str(k) for k in range(len(self.heads))])
        for name, head in zip(names, self.heads):
            out.update({f"heads.{name}.{k}": v for k, v in head.state_dict().items()})
        return out

    def artifact_metadata(self) -> dict:
        return {**super().artifact_metadata(), "merge": self.describe_merge(), "backdoored": self.backdoored}

    def artifact_parents(self) -> list[dict]:
        return list(self._parents)

    def describe_merge(self) -> dict:
        return self.rule.describe()
