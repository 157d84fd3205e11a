"""Preemption, NaN global models and the per-round curves of the federated engine (digits, seconds)."""

from __future__ import annotations

import json
import os
import signal

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from callbacks import CheckpointOnPreemption, RoundCurves
from lightning_modules.federated import AttackSchedule, FedAvg, NaivePoisoning
from foundation.checkpoint_io import SafeCheckpointIO
from recipes.cli import main
from tests.helpers import TINY
from tests.test_federated import flat, make_dm, make_recipe


class SigtermAfter(L.Callback):
    """Sends SIGTERM to this process after round ``step`` (as a scheduler preempting the job would)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def trainer_for(tmp_path, rounds: int, *callbacks) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", max_steps=rounds, logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, default_root_dir=tmp_path, plugins=[SafeCheckpointIO()],
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True), *callbacks],
    )  # fmt: skip


def attack():
    return NaivePoisoning(schedule=AttackSchedule([0], start_round=1, end_round=3), poison_fraction=0.5)


def test_sigterm_saves_a_checkpoint_and_the_resumed_run_is_bit_identical(tmp_path):
    reference_curves = RoundCurves(every_validation=False)
    reference = make_recipe(attack=attack())
    trainer_for(tmp_path / "ref", 6, reference_curves).fit(reference, make_dm())

    curves = RoundCurves(every_validation=False)
    preempted = CheckpointOnPreemption()
    with pytest.raises(SIGTERMException):  # round 3 of 6: in the middle of the second evaluation period
        trainer_for(tmp_path / "run", 6, curves, preempted, SigtermAfter(3)).fit(make_recipe(attack=attack()), make_dm())
    assert preempted.saved_path == tmp_path / "run" / "checkpoints" / "preempted.ckpt"
    ckpt = SafeCheckpointIO().load_checkpoint(preempted.saved_path)
    assert ckpt["global_step"] == 3

    resumed_curves = RoundCurves(every_validation=False)
    resumed = make_recipe(attack=attack())
    # Lightning's own ckpt_path="last" takes the newest of last.ckpt and the OnExceptionCheckpoint's file
    trainer = trainer_for(tmp_path / "run", 6, resumed_curves, CheckpointOnPreemption(str(tmp_path / "run" / "checkpoints")))
    trainer.fit(resumed, make_dm(), ckpt_path="last")
    assert trainer.global_step == 6
    assert torch.equal(flat(resumed.net), flat(reference.net)), "resume after SIGTERM must be bit-identical"
    assert resumed_curves.record["attack_rounds"] == reference_curves.record["attack_rounds"] == [1, 2]
    assert resumed_curves.record["ma"][-1] == reference_curves.record["ma"][-1]


class NaNAfter(FedAvg):
    """FedAvg that returns a NaN aggregate from its ``bad_call``-th call on (a diverging server)."""

    def __init__(self, bad_call: int):
        super().__init__()
        self.calls, self.bad_call = 0, bad_call

    def aggregate(self, updates, weights, generator=None):
        out, info = super().aggregate(updates, weights, generator)
        self.calls += 1
        return (torch.full_like(out, float("nan")) if self.calls > self.bad_call else out), info


def test_nan_global_model_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    recipe = make_recipe(aggregator=NaNAfter(bad_call=3))  # rounds 0-2 fine, round 3 diverges
    preempted = CheckpointOnPreemption()
    with pytest.raises(FloatingPointError, match="non-finite in round 3"):
        trainer_for(tmp_path, 6, preempted).fit(recipe, make_dm())
    assert preempted.saved_path is None, "a failed round must not overwrite the last good checkpoint"
    ckpt = SafeCheckpointIO().load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 2  # saved at the end of the first evaluation period
    assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values() if t.is_floating_point())


def test_round_curves_record_and_plot_the_attack_window(tmp_path):
    cli = main(["fit", f"--config={TINY / 'fl/mnist_fedavg_naive.yaml'}", f"--trainer.default_root_dir={tmp_path}",
                "--run_name=run", "--trainer.max_steps=6"])  # fmt: skip
    assert any(isinstance(c, CheckpointOnPreemption) for c in cli.trainer.callbacks), "the CLI installs it"
    record = json.loads((tmp_path / "run" / "curves.json").read_text())
    assert record["rounds"] == [2, 4, 6]
    assert record["attack_rounds"] == [1, 2]  # the tiny config's window: rounds 1-2
    assert len(record["ma"]) == len(record["ba"]) == 3 and all(0 <= v <= 1 for v in record["ma"] + record["ba"])
    assert (tmp_path / "run" / "curves.png").stat().st_size > 5000


def _breakdown_run(tmp_path, admitted_of):
    """A run directory as `recipes fit` writes it: config.yaml + metrics.csv with an admitted share per round."""
    import yaml

    from lightning_modules.federated.recipe import FederatedRecipe

    cfg = {"seed_everything": 3, "data": {"init_args": {"num_clients": 100}},
           "model": {"init_args": {"seed": None, "clients_per_round": 10, "attack": {"init_args": {
               "schedule": {"malicious_clients": list(range(10)), "force_participation": False}}}}}}  # fmt: skip
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    recipe = type("R", (), {"seed": 3, "attack": None, "clients_per_round": 10})()
    rows, expected = ["epoch,step,round/attack_active,round/malicious_admitted,val/acc"], {}
    for r in range(20):
        n = len(set(range(10)) & set(FederatedRecipe.sample_clients(recipe, r, 100)))
        share = admitted_of(r, n)
        rows.append(f"0,{r},1.0,{share},")
        if n:
            expected.setdefault(n, []).append(share)
    rows.append("0,19,,,0.9")  # a validation row has no round stats
    (tmp_path / "metrics.csv").write_text("\n".join(rows) + "\n")
    return expected


def test_filter_breakdown_groups_the_admitted_share_by_colluders_in_the_round(tmp_path):
    """scripts/fl_filter_breakdown.py redraws each round's clients: per number of colluders, the logged shares; a run
    whose logged rounds disagree with the redrawn clients is refused."""
    from scripts.fl_filter_breakdown import breakdown

    expected = _breakdown_run(tmp_path, lambda r, n: 1.0 / n if n else float("nan"))
    assert len(expected) >= 2 and sum(map(len, expected.values())) < 20  # 1 and 2+ colluders, and rounds with none
    assert breakdown(tmp_path) == expected
    _breakdown_run(tmp_path, lambda r, n: 1.0)  # a share in rounds that had no colluder: another sampler
    with pytest.raises(SystemExit, match="do not match"):
        breakdown(tmp_path)
