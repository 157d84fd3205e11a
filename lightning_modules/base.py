"""The base of every recipe, in the style of torchgeo's ``BaseTask``: one extension surface.

``BaseRecipe.__init__`` saves the hyperparameters of the whole ``__init__`` chain (plain values only: networks,
optimizer factories and injected objects are rebuilt from the config, never pickled), Lightning's
``configure_model`` hook calls :meth:`BaseRecipe.configure_models` (build lazily specified networks),
``setup`` calls :meth:`BaseRecipe.configure_metrics`, and ``validation_step``/``test_step`` call
:meth:`BaseRecipe.evaluate`, whose default is the backdoor evaluation every classifier-shaped family shares:
clean accuracy (``{split}/acc``, dataloader 0) and attack success rate (``{split}/asr``, dataloader 1, the
triggered non-target inputs). A variant overrides one of these hooks and forwards ``**kwargs`` to
``super().__init__`` by keyword, so jsonargparse still types, documents and validates the parent's arguments.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.core.mixins import HyperparametersMixin
from lightning.pytorch.utilities.parsing import collect_init_args
from torchmetrics.classification import MulticlassAccuracy

from lightning_modules.metrics import AttackSuccessRate


def _object_typed(cls: type, name: str) -> bool:
    """Whether ``name`` is annotated in ``cls``'s ``__init__`` chain with a class (an injected object, a network,
    an optimizer factory) rather than plain data (builtins and ``Literal``)."""
    for klass in cls.__mro__:
        param = inspect.signature(klass.__init__).parameters.get(name) if "__init__" in vars(klass) else None
        if param is not None and param.annotation is not inspect.Parameter.empty:
            names = re.findall(r"[A-Za-z_][\w.]*", str(param.annotation))
            return any(n.split(".")[-1][:1].isupper() and n not in ("Literal", "None") for n in names)
    return False


def _plain(value: Any) -> bool:
    """Whether ``value`` is data a checkpoint may hold (read back with ``weights_only=True``)."""
    if value is None or isinstance(value, (bool, int, float, str)) or dataclasses.is_dataclass(value):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


class BaseRecipe(L.LightningModule):
    """A LightningModule that knows what it exports, which hyperparameters it has and how it is evaluated.

    Hooks, each overridden alone by a variant:

    - :meth:`configure_models`: build lazily specified networks (called from Lightning's ``configure_model``,
      so FSDP and meta-device initialisation work); default: ``net.build()`` when ``net`` is a lazy spec.
    - :meth:`configure_metrics`: create the evaluation metrics once the DataModule is known (``setup``);
      default: clean accuracy and, when the DataModule has a ``target_label``, attack success rate.
    - :meth:`evaluate`: one evaluation batch of ``validation_step``/``test_step``; default: the backdoor
      evaluation (accuracy on dataloader 0, ASR on dataloader 1), batches ``(inputs..., labels)``.
    - :meth:`artifact_state_dict` (what a later stage loads), :meth:`artifact_metadata` (trigger, target, ... for
      the manifest) and :meth:`artifact_parents` (the artifacts it started from), read by ``ExportArtifact``.

    ``monitor``/``mode`` tell callbacks which metric says "better".

    Args:
        ignore: init arguments not to save as hyperparameters, beyond the ones that are not plain data or that
            are typed as an injected object (those are never saved: the config rebuilds them).
    """

    monitor: str = "val/acc"
    mode: str = "max"

    def __init__(self, ignore: Sequence[str] = ()):
        super().__init__()
        frame = inspect.currentframe()
        init_args: dict[str, Any] = {}
        for local_args in collect_init_args(frame, [], classes=(HyperparametersMixin,)):
            init_args.update(local_args)
        skip = {"ignore", *ignore}
        skip |= {k for k, v in init_args.items() if not _plain(v) or (v is None and _object_typed(type(self), k))}
        self.save_hyperparameters(ignore=sorted(skip), frame=frame)

    # ---------------------------------------------------------------------------------------------- models
    def configure_model(self) -> None:
        """Lightning's hook (it runs at every fit/validate/test): delegates to :meth:`configure_models`."""
        self.configure_models()

    def configure_models(self) -> None:
        """Build ``net`` if it is a lazy spec (``build()`` is idempotent); extend to build more networks or to
        warm-start or adapt them."""
        net = getattr(self, "net", None)
        if callable(getattr(net, "build", None)):
            net.build()

    # --------------------------------------------------------------------------------------------- metrics
    def setup(self, stage: str) -> None:
        self.configure_metrics()

    def configure_metrics(self) -> None:
        """Create ``{val,test}_acc`` (clean accuracy) and, with a target label, ``{val,test}_asr`` once."""
        dm = getattr(self._trainer, "datamodule", None)
        num_classes = getattr(dm, "num_classes", None) or 2
        target = getattr(dm, "target_label", None)
        for split in ("val", "test"):
            if not hasattr(self, f"{split}_acc"):
                setattr(self, f"{split}_acc", MulticlassAccuracy(num_classes, average="micro"))
            if target is not None and not hasattr(self, f"{split}_asr"):
                setattr(self, f"{split}_asr", AttackSuccessRate(target))

    # ------------------------------------------------------------------------------------------ evaluation
    def evaluate(self, split: str, batch: Any, dataloader_idx: int) -> None:
        """The backdoor evaluation: ``{split}/acc`` on the clean loader (0), ``{split}/asr`` on the triggered
        one (1); the network is called as ``self(*inputs)`` and returns logits."""
        *inputs, labels = batch
        preds = self(*inputs).argmax(-1)
        name = "acc" if dataloader_idx == 0 else "asr"
        metric = getattr(self, f"{split}_{name}")
        metric.update(preds, labels)
        self.log(f"{split}/{name}", metric, prog_bar=True, add_dataloader_idx=False)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.evaluate("val", batch, dataloader_idx)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.evaluate("test", batch, dataloader_idx)

    # ------------------------------------------------------------------------------------------- artifacts
    def artifact_state_dict(self) -> dict[str, torch.Tensor]:
        return self.state_dict()

    def artifact_metadata(self) -> dict:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        return dm.describe() if hasattr(dm, "describe") else {}

    def artifact_parents(self) -> list[dict]:
        return []
