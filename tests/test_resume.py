"""Resume, preemption and refused checkpoints through ``python -m recipes`` (tiny MNIST twin, seconds each)."""

from __future__ import annotations

import csv
import os
import signal
from pathlib import Path

import lightning as L
import pytest
import torch

from foundation.artifacts import ArtifactError
from foundation.checkpoint_io import SafeCheckpointIO
from recipes.cli import main
from recipes.resume import ResumeError
from tests.helpers import TINY

MNIST = str(TINY / "backdoor" / "mnist_badnets.yaml")
FL = str(TINY / "fl" / "mnist_fedavg_naive.yaml")


class SignalAt(L.Callback):
    """Sends ``signum`` to this process at a point of ``fit``, as a scheduler would (tests inject it by class path).

    Args:
        step: The ``global_step`` at which to send it.
        hook: ``train`` (after a training batch) or ``validation`` (after the first validation batch).
        signum: The signal (15 = SIGTERM, 10 = SIGUSR1).
    """

    def __init__(self, step: int, hook: str = "train", signum: int = 15) -> None:
        self.step, self.hook, self.signum, self.sent = step, hook, signum, False

    def _maybe(self, trainer) -> None:
        if not self.sent and trainer.global_step == self.step:
            self.sent = True
            os.kill(os.getpid(), self.signum)

    def on_train_batch_end(self, trainer, *args) -> None:
        if self.hook == "train":
            self._maybe(trainer)

    def on_validation_batch_end(self, trainer, *args) -> None:
        if self.hook == "validation" and not trainer.sanity_checking:
            self._maybe(trainer)


class CrashAt(L.Callback):
    """Raises at ``global_step == step`` (a crash that saves nothing: the run resumes from an older checkpoint)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


def fit(root: Path, name: str, *extra: str, config: str = MNIST):
    return main(["fit", f"--config={config}", f"--trainer.default_root_dir={root}", f"--run_name={name}",
                 "--trainer.log_every_n_steps=1", *extra])  # fmt: skip


def callback(cls: str, **init_args) -> str:
    args = ", ".join(f'"{k}": {v!r}'.replace("'", '"') for k, v in init_args.items())
    return f'--trainer.callbacks+={{"class_path": "tests.test_resume.{cls}", "init_args": {{{args}}}}}'


def rows(root: Path, name: str) -> list[dict]:
    with open(root / name / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted 3-epoch run every resumed run must equal: its metrics rows and its final weights."""
    root = tmp_path_factory.mktemp("straight")
    cli = fit(root, "run", "--trainer.max_epochs=3")
    return rows(root, "run"), {k: v.clone() for k, v in cli.model.state_dict().items()}


def assert_same_run(cli, root, name, straight, exact: bool = True):
    """Same rows (epoch, step, keys) as the straight run; ``exact``: same values and weights too. A resume in the
    middle of an epoch is not exact: the image DataModule's loader is not resumable (Lightning warns), so the
    resumed epoch draws its remaining batches from the start of the epoch's permutation."""
    expected_rows, expected_weights = straight
    got = rows(root, name)
    assert [(r["epoch"], r["step"]) for r in got] == [(r["epoch"], r["step"]) for r in expected_rows], "each row once"
    assert [sorted(k for k, v in r.items() if v) for r in got] == [sorted(k for k, v in r.items() if v) for r in expected_rows]
    if not exact:
        return
    assert got == expected_rows
    for k, v in cli.model.state_dict().items():
        assert torch.equal(v, expected_weights[k]), k


# --- 1. resume appends; 2. `--ckpt_path last` resumes the run it names ------------------------------------------


def test_stop_and_resume_keeps_every_epoch_once(tmp_path, straight):
    fit(tmp_path, "run", "--trainer.max_epochs=1")
    cli = fit(tmp_path, "run", "--trainer.max_epochs=3", "--ckpt_path=last")
    assert_same_run(cli, tmp_path, "run", straight)


def test_crash_after_the_last_checkpoint_drops_the_rows_the_resumed_run_repeats(tmp_path, straight):
    with pytest.raises(RuntimeError, match="simulated crash"):  # in epoch 1: last.ckpt is from the end of epoch 0
        fit(tmp_path, "run", "--trainer.max_epochs=3", callback("CrashAt", step=6))
    assert len(rows(tmp_path, "run")) > 5, "the crashed run logged rows after its last checkpoint"
    cli = fit(tmp_path, "run", "--trainer.max_epochs=3", "--ckpt_path=last")
    assert_same_run(cli, tmp_path, "run", straight)


def test_ckpt_path_last_needs_the_run_name(tmp_path):
    fit(tmp_path, "run", "--trainer.max_epochs=1")
    with pytest.raises(ResumeError, match="add --run_name NAME"):
        main(["fit", f"--config={MNIST}", f"--trainer.default_root_dir={tmp_path}", "--ckpt_path=last"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"], "nothing started over in a new directory"


def test_a_fresh_launch_never_reuses_a_run_that_has_checkpoints(tmp_path):
    fit(tmp_path, "run", "--trainer.max_epochs=1")
    before = snapshot(tmp_path)
    with pytest.raises(ResumeError, match="resume it with --ckpt_path last"):
        fit(tmp_path, "run", "--trainer.max_epochs=2")
    assert snapshot(tmp_path) == before


def test_ckpt_path_last_on_a_new_run_name_starts_it(tmp_path):
    cli = fit(tmp_path, "job7", "--trainer.max_epochs=1", "--ckpt_path=last")  # a first SLURM launch
    assert cli.trainer.current_epoch == 1 and (tmp_path / "job7" / "checkpoints" / "last.ckpt").is_file()


# --- 4. preemption: a checkpoint wherever SIGTERM lands, exit status 143 -----------------------------------------


@pytest.mark.parametrize("hook,step", [("train", 5), ("validation", 8)], ids=["training", "validation"])
def test_sigterm_saves_and_exits_143_and_the_resume_equals_the_straight_run(tmp_path, straight, hook, step):
    with pytest.raises(SystemExit) as exit_:
        fit(tmp_path, "run", "--trainer.max_epochs=3", callback("SignalAt", step=step, hook=hook))
    assert exit_.value.code == 143
    saved = tmp_path / "run" / "checkpoints" / "preempted.ckpt"
    assert SafeCheckpointIO().load_checkpoint(saved)["global_step"] == step
    cli = fit(tmp_path, "run", "--trainer.max_epochs=3", "--ckpt_path=last")
    assert_same_run(cli, tmp_path, "run", straight)  # mid-epoch too: the loader continues the interrupted epoch
    assert not saved.exists(), "a finished fit removes the preemption checkpoint (OnExceptionCheckpoint)"


def test_sigterm_between_federated_rounds_saves_and_resumes(tmp_path):
    ref = fit(tmp_path, "ref", "--trainer.max_steps=6", config=FL)
    with pytest.raises(SystemExit) as exit_:
        fit(tmp_path, "run", "--trainer.max_steps=6", callback("SignalAt", step=3), config=FL)
    assert exit_.value.code == 143
    assert SafeCheckpointIO().load_checkpoint(tmp_path / "run" / "checkpoints" / "preempted.ckpt")["global_step"] == 3
    cli = fit(tmp_path, "run", "--trainer.max_steps=6", "--ckpt_path=last", config=FL)
    assert cli.trainer.global_step == 6
    assert [(r["step"], r.get("val/acc")) for r in rows(tmp_path, "run")] == [
        (r["step"], r.get("val/acc")) for r in rows(tmp_path, "ref")
    ]
    for k, v in cli.model.state_dict().items():
        assert torch.equal(v, ref.model.state_dict()[k]), k


# --- 5. bad checkpoints: one line naming the file, before anything is written -----------------------------------


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    Path(f"{path}.sha256").unlink()  # no sidecar: the load itself must fail cleanly


def _pickle(path: Path) -> None:
    torch.save({"state_dict": {}, "evil": L.Callback()}, path)  # an object, as a malicious file would hold
    Path(f"{path}.sha256").unlink()


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _remove(path: Path) -> None:
    path.unlink()


BAD = {
    "truncated": (_truncate, ArtifactError, "truncated or corrupted"),
    "pickle": (_pickle, ArtifactError, "non-tensor Python objects"),
    "hash mismatch": (_flip, ArtifactError, "hash mismatch"),
    "missing": (_remove, ArtifactError, "not found"),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_a_refused_checkpoint_leaves_the_run_directory_byte_identical(tmp_path, kind):
    spoil, error, message = BAD[kind]
    fit(tmp_path, "run", "--trainer.max_epochs=1")
    ckpt = tmp_path / "run" / "checkpoints" / "epoch=0-step=4.ckpt"
    spoil(ckpt)
    before = snapshot(tmp_path)
    with pytest.raises(error, match=message) as err:
        fit(tmp_path, "run", "--trainer.max_epochs=3", f"--ckpt_path={ckpt}")
    assert str(ckpt) in str(err.value) and "\n" not in str(err.value)
    assert "weights_only=False" not in str(err.value), "never torch's advice to unpickle"
    assert snapshot(tmp_path) == before


def test_checkpoint_hyperparameters_never_override_the_config_silently(tmp_path):
    fit(tmp_path, "run", "--trainer.max_epochs=1", "--model.init_args.label_smoothing=0.9")
    before = snapshot(tmp_path)
    with pytest.raises(ResumeError, match=r"label_smoothing: config 0\.0 vs checkpoint 0\.9"):
        fit(tmp_path, "run", "--trainer.max_epochs=2", "--ckpt_path=last")
    assert snapshot(tmp_path) == before
    kept = fit(tmp_path, "run", "--trainer.max_epochs=2", "--ckpt_path=last", "--ckpt_hparams=config")
    assert kept.model.hparams.label_smoothing == 0.0 and kept.trainer.current_epoch == 2


def test_checkpoint_hyperparameters_are_used_when_asked(tmp_path):
    fit(tmp_path, "run", "--trainer.max_epochs=1", "--model.init_args.label_smoothing=0.9")
    cli = fit(tmp_path, "run", "--trainer.max_epochs=2", "--ckpt_path=last", "--ckpt_hparams=checkpoint")
    assert cli.model.hparams.label_smoothing == 0.9


def test_a_resumable_loader_continues_the_interrupted_shuffle_where_it_stopped():
    """Three batches into a pass, the state goes into a checkpoint; a fresh loader (its generator elsewhere) that loads
    it yields the pass's remaining batches, then the same next pass, as the uninterrupted loader."""
    from torch.utils.data import DataLoader

    from datamodules.base import ResumableDataLoader, TensorBatchDataset, _already_batched

    def loader(seed: int) -> ResumableDataLoader:
        gen = torch.Generator().manual_seed(seed)
        return ResumableDataLoader(TensorBatchDataset(torch.arange(20)), batch_size=3, shuffle=True, generator=gen,
                                   collate_fn=_already_batched)  # fmt: skip

    straight = loader(0)
    passes = [[b[0].tolist() for b in straight] for _ in range(2)]
    assert passes[0] != passes[1] and sorted(sum(passes[0], [])) == list(range(20))
    plain = DataLoader(TensorBatchDataset(torch.arange(20)), batch_size=3, shuffle=True,
                       generator=torch.Generator().manual_seed(0), collate_fn=_already_batched)  # fmt: skip
    assert [[b[0].tolist() for b in plain] for _ in range(2)] == passes  # the orders of a plain shuffled loader
    interrupted = loader(0)
    it = iter(interrupted)
    assert [next(it)[0].tolist() for _ in range(3)] == passes[0][:3]
    state = torch.load(_roundtrip(interrupted.state_dict()), weights_only=True)  # as a checkpoint stores it
    resumed = loader(123)
    resumed.load_state_dict(state)
    assert [b[0].tolist() for b in resumed] == passes[0][3:]
    assert [b[0].tolist() for b in resumed] == passes[1]
    fresh = loader(123)
    assert [b[0].tolist() for b in fresh] != passes[0]  # a different generator alone would not give that pass
    cut = loader(0)  # a pass cut short (limit_train_batches), then the next epoch: a fresh draw, not a replay
    it = iter(cut)
    next(it)
    state = cut.state_dict()
    after_cut = [b[0].tolist() for b in cut]  # the uninterrupted loader's next pass starts where the cut one left off
    later = loader(123)
    later.load_state_dict(state)
    later.sampler.set_epoch(1)  # as Lightning announces the next epoch
    assert [b[0].tolist() for b in later] == after_cut != passes[1]
    whole = loader(0)  # a pass that had yielded its last batch (a cycling loader): it ends, the next pass follows
    it = iter(whole)
    assert [next(it)[0].tolist() for _ in range(len(whole))] == passes[0]
    cycled = loader(123)
    cycled.load_state_dict(whole.state_dict())
    assert list(cycled) == [] and [b[0].tolist() for b in cycled] == passes[1]


def _roundtrip(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf
