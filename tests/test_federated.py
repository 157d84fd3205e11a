"""Behaviour of the federated engine on digits: FedAvg algebra, server lr, NaN exclusion, config errors
before round 1, attacks (naive BA gain, PGD norm bound, Neurotoxin mask), resume, and the DataModule."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.nn.utils import parameters_to_vector

from datamodules.federated import FederatedDataModule
from datamodules.poisoning import Poisoning
from datamodules.triggers import PixelPattern
from lightning_modules.federated import (
    Attack,
    AttackSchedule,
    FederatedRecipe,
    Krum,
    LocalTrainer,
    NaivePoisoning,
    Neurotoxin,
    NormClipping,
    PGDPoisoning,
)
from lightning_modules.nets.cnn import MnistCNN
from lightning_modules.ops.fl_attacks import neurotoxin_mask

OFFSETS = [(1, 1), (2, 2), (1, 3)]


def make_dm(**kw) -> FederatedDataModule:
    args = dict(dataset="digits", num_clients=10, partition="iid", rounds_per_epoch=2, eval_batch_size=300,
                poisoning=Poisoning(PixelPattern(OFFSETS), target_label=0))  # fmt: skip
    return FederatedDataModule(**{**args, **kw})


def make_recipe(**kw) -> FederatedRecipe:
    torch.manual_seed(0)
    args = dict(net=MnistCNN(image_size=8, width=8, hidden=32), clients_per_round=4, seed=0,
                local=LocalTrainer(lr=0.05, batch_size=32))  # fmt: skip
    return FederatedRecipe(**{**args, **kw})


def fit(recipe, dm, rounds: int, validate: bool = False, **trainer_kw) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu", max_steps=rounds, logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=None if validate else 0,
        **{"enable_checkpointing": False, **trainer_kw},
    )  # fmt: skip
    trainer.fit(recipe, dm)
    return trainer


def flat(module) -> torch.Tensor:
    return parameters_to_vector(module.parameters()).detach().clone()


def test_fedavg_of_identical_clients_is_the_local_update():
    dm = make_dm()
    dm.setup()
    x0, y0 = dm.client_data(0)
    dm.client_data = lambda i: (x0, y0)  # every client holds client 0's data
    local = LocalTrainer(lr=0.1, momentum=0.0, weight_decay=0.0, local_epochs=3, batch_size=10_000)  # full batch
    recipe = make_recipe(local=local)
    solo = copy.deepcopy(recipe.net)
    local.train(solo, x0, y0, torch.Generator().manual_seed(123))
    out = recipe.compute_round(0, dm)
    expected = flat(solo) - flat(recipe.net)
    assert expected.norm() > 0.01
    torch.testing.assert_close(out["aggregate"], expected, atol=1e-5, rtol=1e-4)
    for row in out["updates"]:
        torch.testing.assert_close(row, expected, atol=1e-5, rtol=1e-4)


def test_server_lr_scales_the_step_and_the_round_is_reproducible():
    steps = {}
    for lr in (1.0, 0.5, 1.0):
        recipe = make_recipe(server_lr=lr)
        before = flat(recipe.net)
        fit(recipe, make_dm(), rounds=1)
        steps.setdefault(lr, []).append(flat(recipe.net) - before)
    assert torch.equal(steps[1.0][0], steps[1.0][1]), "same seed, same round: same result"
    torch.testing.assert_close(steps[0.5][0], 0.5 * steps[1.0][0], atol=1e-7, rtol=1e-5)


class NaNAttack(Attack):
    """Sends a NaN update (a crashed or hostile client)."""

    def local_train(self, model, x, y, ctx):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float("nan"))


def test_nan_update_is_excluded_and_the_run_goes_on():
    recipe = make_recipe(attack=NaNAttack(AttackSchedule([3])))
    trainer = fit(recipe, make_dm(), rounds=3)
    assert trainer.global_step == 3
    assert torch.isfinite(flat(recipe.net)).all()
    assert trainer.callback_metrics["round/nan_updates"] == 1
    assert recipe.last_server_update.norm() > 0, "the three finite clients still moved the model"


def test_norm_clipping_bounds_the_aggregate():
    recipe = make_recipe(aggregator=NormClipping(max_norm=0.05))
    dm = make_dm()
    dm.setup()
    out = recipe.compute_round(0, dm)
    assert out["updates"].norm(dim=1).min() > 0.05
    assert out["aggregate"].norm() <= 0.05 + 1e-6 and out["info"]["clipped"] == 1.0


@pytest.mark.parametrize(
    "recipe_kw, dm_kw, match",
    [
        ({"clients_per_round": 11}, {}, "clients_per_round=11 must be in"),
        ({"attack": NaivePoisoning(schedule=AttackSchedule([10]))}, {}, r"distinct ids in \[0, 10\)"),
        ({"attack": NaivePoisoning(schedule=AttackSchedule([0, 1, 2, 3, 4]))}, {}, "cannot all take part"),
        ({"aggregator": Krum(num_malicious=1)}, {}, "Krum needs clients_per_round > 2"),
        ({"attack": NaivePoisoning(schedule=AttackSchedule([0]))}, {"poisoning": None}, "set data.init_args.poisoning"),
    ],
)
def test_bad_config_fails_before_round_one(recipe_kw, dm_kw, match):
    recipe = make_recipe(**recipe_kw)
    before = flat(recipe.net)
    with pytest.raises(ValueError, match=match):
        fit(recipe, make_dm(**dm_kw), rounds=2)
    assert torch.equal(flat(recipe.net), before)


def test_bad_partition_fails_at_construction():
    with pytest.raises(ValueError, match="alpha must be > 0"):
        make_dm(partition="dirichlet", alpha=0.0)


def test_naive_poisoning_plants_a_backdoor_under_fedavg():
    kw = dict(clients_per_round=10, local=LocalTrainer(lr=0.05, local_epochs=2, batch_size=32))
    results = {}
    attacks = {"clean": None, "attacked": NaivePoisoning(schedule=AttackSchedule([0, 1]), poison_fraction=0.5, local_epochs=4)}
    for name, attack in attacks.items():  # 2 of 10 clients, every round, 20 rounds
        trainer = fit(make_recipe(attack=attack, **kw), make_dm(rounds_per_epoch=20), rounds=20, validate=True)
        results[name] = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    clean, attacked = results["clean"], results["attacked"]
    assert clean["val/acc"] > 0.8 and attacked["val/acc"] > 0.8, results
    assert clean["val/asr"] < 0.1 and attacked["val/asr"] > 0.8, results


def _malicious_updates(recipe, round=0):
    dm = make_dm()
    dm.setup()
    out = recipe.compute_round(round, dm)
    assert out["malicious"].sum() == 1 and out["clients"][0] == 0
    return out["updates"][out["malicious"]][0], out


def test_pgd_keeps_the_update_in_the_ball():
    attack = PGDPoisoning(schedule=AttackSchedule([0], scale=5.0), radius=0.05, lr=0.1, local_epochs=2)
    update, out = _malicious_updates(make_recipe(attack=attack))
    assert update.norm() <= 0.05 + 1e-6
    assert update.norm() > 0.049, "the boosted update uses the whole budget"
    assert out["updates"][~out["malicious"]].norm(dim=1).min() > 0.05, "benign updates are not constrained"


@pytest.mark.parametrize("radius", [float("inf"), 0.3])
def test_neurotoxin_update_is_zero_on_the_masked_coordinates(radius):
    recipe = make_recipe(attack=Neurotoxin(schedule=AttackSchedule([0]), keep_ratio=0.9, radius=radius))
    d = flat(recipe.net).numel()
    recipe.last_server_update = torch.randn(d, generator=torch.Generator().manual_seed(1))
    update, _ = _malicious_updates(recipe, round=1)
    keep = neurotoxin_mask(recipe.last_server_update, 0.9)
    assert torch.count_nonzero(update[~keep]) == 0
    assert torch.count_nonzero(update[keep]) > 0.5 * keep.sum()
    assert update.norm() <= radius + 1e-5


def test_neurotoxin_first_round_masks_by_the_clean_gradient():
    update, _ = _malicious_updates(make_recipe(attack=Neurotoxin(schedule=AttackSchedule([0]), keep_ratio=0.8)))
    assert (update == 0).float().mean() >= 0.2


@pytest.mark.filterwarnings("ignore:Checkpoint directory")
def test_resume_matches_the_uninterrupted_run(tmp_path):
    def run(rounds, root, ckpt_path=None):
        recipe = make_recipe(attack=NaivePoisoning(schedule=AttackSchedule([0], start_round=1)), aggregator=NormClipping(1.0, 0.001))
        ckpt = ModelCheckpoint(dirpath=root, save_last=True)
        trainer = L.Trainer(accelerator="cpu", max_steps=rounds, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                            callbacks=[ckpt], default_root_dir=root)  # fmt: skip
        trainer.fit(recipe, make_dm(), ckpt_path=ckpt_path)
        return recipe

    straight = run(4, tmp_path / "straight")
    run(2, tmp_path / "part")
    resumed = run(4, tmp_path / "part", ckpt_path=str(tmp_path / "part" / "last.ckpt"))
    assert torch.equal(flat(straight.net), flat(resumed.net))
    assert torch.equal(straight.last_server_update, resumed.last_server_update)


def test_datamodule_clients_poisoning_and_loaders():
    dm = make_dm(partition="dirichlet", alpha=0.5, client_test_fraction=0.2, rounds_per_epoch=3)
    dm.setup()
    again = make_dm(partition="dirichlet", alpha=0.5, client_test_fraction=0.2)
    again.setup()
    assert all(torch.equal(a, b) for a, b in zip(dm.client_train_idx, again.client_train_idx))
    all_idx = torch.cat(dm.client_train_idx + dm.client_test_idx)
    assert all_idx.unique().numel() == all_idx.numel() == len(dm.train_y)
    assert sum(dm.num_samples(i) + len(dm.client_test(i)[1]) for i in range(10)) == len(dm.train_y)
    x, y = dm.client_data(0)
    assert x.shape[1:] == (1, 8, 8) and abs(float(dm.train_x.mean())) < 1e-4
    xp, yp = dm.poison_batch(x, y, 0.5)
    k = round(0.5 * len(x))
    pix = dm.denormalize(xp)
    for dh, dw in OFFSETS:
        torch.testing.assert_close(pix[:k, 0, 8 - dh, 8 - dw], torch.ones(k))
    assert (yp[:k] == 0).all() and torch.equal(yp[k:], y[k:]) and torch.equal(xp[k:], x[k:])
    assert not torch.equal(dm.client_data(0)[0][:k], xp[:k]), "poison_batch must not edit client data"
    clean, triggered = dm.val_dataloader()
    assert len(triggered.dataset) == int((dm.val_sets[0].tensors[1] != 0).sum())
    assert [b[0].item() for b in dm.train_dataloader()] == [0, 1, 2]


def test_ddp_two_processes_equal_one_process(tmp_path):
    """Two gloo processes split each round's clients (client j on rank j % 2) and all-gather the updates: the
    global model equals the single-process one bit for bit (attack rounds and aggregation noise included)."""
    import os
    import subprocess
    import sys

    from tests.helpers import REPO, TINY, artifact_of

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for name, extra in {"single": [], "ddp": ["--config", str(REPO / "configs" / "trainer" / "ddp_cpu.yaml")]}.items():
        cmd = [sys.executable, "-m", "recipes", "fit", "--config", str(TINY / "fl" / "mnist_fedavg_naive.yaml"),
               "--config", str(REPO / "configs" / "fl" / "defenses" / "normclip.yaml"), *extra, f"--trainer.default_root_dir={tmp_path}", f"--run_name={name}"]  # fmt: skip
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    single, ddp = artifact_of(tmp_path, "single").state_dict, artifact_of(tmp_path, "ddp").state_dict
    assert "devices: 2" in artifact_of(tmp_path, "ddp").manifest["config"]
    for k in single:
        assert torch.equal(single[k], ddp[k]), k


def test_round_stats_give_the_benign_update_norms_mean_and_median_and_the_kept_malicious_share():
    recipe = make_recipe()
    updates = torch.tensor([[3.0, 4.0], [0.0, 1.0], [0.0, 2.0], [6.0, 8.0]])  # norms 5, 1, 2, 10
    out = {"updates": updates, "finite": torch.tensor([True, True, True, True]),
           "malicious": torch.tensor([False, False, False, True]), "aggregate": torch.zeros(2),
           "admitted": torch.tensor([0, 1, 2]), "info": {}}  # fmt: skip
    stats = recipe.round_stats(0, out)
    assert stats["round/update_norm_mean"] == pytest.approx(8 / 3)
    assert stats["round/update_norm_median"] == 2.0  # the benign norms 1, 2, 5 (the malicious 10 left out)
    assert stats["round/malicious_norm"] == 10.0 and stats["round/malicious_admitted"] == 0.0
