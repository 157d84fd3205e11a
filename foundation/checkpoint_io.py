"""A Lightning CheckpointIO that writes checkpoints atomically and never unpickles code.

What Lightning 2.6.6 does on its own (read from the installed source; torch 2.13):

* ``Trainer.fit/validate/test/predict(ckpt_path=...)`` load through the plugin: ``_CheckpointConnector.resume_start``
  -> ``trainer.strategy.load_checkpoint`` -> ``strategy.checkpoint_io.load_checkpoint(path, weights_only=None)``.
  Saving (``ModelCheckpoint``, ``trainer.save_checkpoint``) goes through ``checkpoint_io.save_checkpoint``.
* ``LightningModule.load_from_checkpoint`` (a classmethod, no trainer) bypasses the plugin: it calls
  ``lightning.fabric.utilities.cloud_io._load`` directly. Use :func:`load_module_from_checkpoint` instead.
* Both pass ``weights_only=None`` down to ``torch.load``, so torch's default applies: ``True`` since torch 2.6, but
  ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` in the environment flips an unset ``weights_only`` to ``False``, and for
  ``http(s)://`` paths ``_load`` itself passes ``weights_only=False``. This plugin passes ``weights_only=True``
  explicitly (the variable cannot override that) and refuses URLs.
* ``FSDPStrategy`` ignores the plugin when loading: a full ``.ckpt`` file is read by ``_lazy_load``, a plain
  ``pickle.Unpickler`` (it runs pickled code whatever ``weights_only`` says -- verified), and sharded checkpoints
  by torch.distributed.checkpoint, whose ``.metadata`` is read with ``pickle.load``. DeepSpeed has its own loader
  too. Only resume sharded runs from checkpoints you wrote yourself.
* Lightning's ``_atomic_save`` writes through an fsspec transaction whose temp file is in the system temp dir and
  is moved (a copy across filesystems) without fsync; here the temp file is beside the checkpoint and fsynced.

What a checkpoint holds: ``epoch``, ``global_step``, ``pytorch-lightning_version``, ``state_dict``, ``loops``,
``callbacks``, ``optimizer_states``, ``lr_schedulers``, ``hparams_name`` and ``hyper_parameters``
(``dict(module.hparams)``; under LightningCLI that is the YAML-dumped config plus the strings ``_instantiator``
and ``_class_path``, i.e. plain data). With AdamW, StepLR/OneCycleLR/ReduceLROnPlateau/CosineAnnealingLR/
LambdaLR/SequentialLR, ModelCheckpoint and EarlyStopping all of it loads with ``weights_only=True`` as is. A
module built in Python keeps the objects passed to ``__init__`` in its hparams: ``pathlib.Path`` is the one
common data-only type refused by default, and is allowed below. Enums, numpy scalars, dataclasses,
``functools.partial`` (an ``OptimizerCallable``), classes and Namespaces stay refused. ``AttributeDict`` never
reaches a checkpoint (hparams are dumped as ``dict``), and torch 2.13 could not rebuild it anyway.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path, PosixPath
from typing import Any, Callable, Optional, Union

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from foundation.artifacts import (
    ArtifactError,
    atomic_open,
    atomic_write_text,
    refuse_unsafe_pickles,
    safe_torch_load,
    sha256_file,
)

# Data-only classes the weights-only unpickler may rebuild from a checkpoint. Each is *called* with arguments
# from the file while loading, so each must be a constructor without side effects: never a function.
CHECKPOINT_SAFE_GLOBALS = [
    PosixPath,  # hparams such as `data_dir: Path`; PosixPath(*parts) only joins strings, touches no file
]

_FIX = (
    "The checkpoint is untrusted or was written by a different tool. If this project wrote it, keep "
    "hyper-parameters and callback state plain data (bool/int/float/str/None, list/tuple/dict, tensors, Path): "
    "convert enums with .value and numpy scalars with float()/int(), and leave objects (modules, callables, "
    "optimizers) out with self.save_hyperparameters(ignore=[...])."
)


def sidecar_path(path: str | os.PathLike) -> Path:
    """The ``<checkpoint>.sha256`` file beside the real checkpoint file (symlinks resolved)."""
    real = Path(os.path.realpath(path))
    return real.with_name(real.name + ".sha256")


def verify_sidecar(path: str | os.PathLike) -> None:
    """Raises :class:`ArtifactError` if ``<path>.sha256`` exists and does not match; no sidecar passes."""
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        return
    recorded = (sidecar.read_text(encoding="utf-8", errors="replace").split() or [""])[0].lower()
    actual = sha256_file(path)
    if recorded != actual:
        raise ArtifactError(
            f"{path}: hash mismatch with {sidecar.name}: the checkpoint was modified or corrupted after it was saved "
            f"(sidecar {recorded or '<empty>'}, file {actual}). Do not resume from it: use another checkpoint."
        )


def _local(path: str | os.PathLike) -> Path:
    if "://" in str(path):
        raise ArtifactError(f"{path} is a URL; SafeCheckpointIO reads and writes local files only: download it first")
    return Path(path)


class SafeCheckpointIO(TorchCheckpointIO):
    """Atomic, hash-checked checkpoints, always loaded with ``torch.load(weights_only=True)``.

    Saving writes the checkpoint to a temp file in the same directory, fsyncs and :func:`os.replace`-s it, then
    writes a ``<file>.sha256`` sidecar (``sha256sum -c`` format) the same way. The old sidecar is removed before
    the swap, so a crash leaves at worst a checkpoint without sidecar, never one that wrongly fails its check.
    The sidecar detects corruption and accidental edits; it is no signature (whoever can rewrite the file can
    rewrite the sidecar): the protection against malicious files is ``weights_only=True``.

    Use ``Trainer(plugins=[SafeCheckpointIO()])``, or in a LightningCLI config
    ``trainer: {plugins: [{class_path: foundation.checkpoint_io.SafeCheckpointIO}]}``.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Optional[Any] = None
    ) -> None:
        """Saves ``checkpoint`` atomically to ``path`` and writes its ``.sha256`` sidecar."""
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not support storage_options: remove the argument")
        path = _local(path)
        sidecar = path.with_name(path.name + ".sha256")  # not resolved: os.replace replaces a symlink, not its target
        with atomic_open(path) as f:
            torch.save(checkpoint, f)
            f.flush()
            digest = sha256_file(f.name)
            with contextlib.suppress(FileNotFoundError):
                sidecar.unlink()
        atomic_write_text(sidecar, f"{digest}  {path.name}\n")

    def load_checkpoint(
        self,
        path: str | os.PathLike,
        map_location: Optional[Union[Callable, str, torch.device]] = None,
        weights_only: Optional[bool] = None,
    ) -> dict[str, Any]:
        """Checks the sidecar (if any) and loads with ``weights_only=True``; ``map_location=None`` means CPU.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            ArtifactError: The sidecar does not match, or the file holds objects other than tensors and plain data.
            ValueError: ``weights_only=False`` was requested; this plugin never unpickles arbitrary objects.
        """
        if weights_only is False:
            raise ValueError(
                f"{type(self).__name__} always loads with weights_only=True, but weights_only=False was requested: "
                "remove the argument (checkpoints are untrusted input)"
            )
        path = _local(path)
        if not path.is_file():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        verify_sidecar(path)
        return safe_torch_load(path, map_location or "cpu", safe_globals=CHECKPOINT_SAFE_GLOBALS, fix=_FIX)

    def remove_checkpoint(self, path: str | os.PathLike) -> None:
        """Removes the checkpoint and, unless ``path`` is a symlink, its sidecar."""
        sidecar = None if os.path.islink(path) else sidecar_path(path)
        super().remove_checkpoint(path)
        if sidecar is not None:
            sidecar.unlink(missing_ok=True)


def load_module_from_checkpoint(cls: type, path: str | os.PathLike, **kwargs: Any) -> Any:
    """``cls.load_from_checkpoint(path, **kwargs)`` with :class:`SafeCheckpointIO`'s checks, for use without a Trainer.

    ``load_from_checkpoint`` bypasses the CheckpointIO plugin (see the module docstring), so this verifies the
    sidecar, refuses URLs, forces ``weights_only=True`` with the same allowlist, and raises :class:`ArtifactError`
    on refusal.
    """
    path = _local(path)
    verify_sidecar(path)
    with refuse_unsafe_pickles(path, CHECKPOINT_SAFE_GLOBALS, _FIX):
        return cls.load_from_checkpoint(path, weights_only=True, **kwargs)
