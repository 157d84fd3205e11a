"""The official Chameleon testbed pieces of the federated engine (issue 22): local lr schedules stepped as the official
loop steps them, the benign clients' round schedule and decay-phase lr, the official Baseline attacker's local
schedule, an attacker sampling IID batches of the whole training set, Neurotoxin's mask from clean clients, attack
windows that close once the backdoor is planted, decay phases of fixed length, and the CIFAR crop-and-flip."""

from __future__ import annotations

import pytest
import torch

from lightning_modules.chameleon import ChameleonAttack
from lightning_modules.federated import (
    AttackerData,
    AttackSchedule,
    LocalTrainer,
    NaivePoisoning,
    Neurotoxin,
    PGDPoisoning,
)
from lightning_modules.federated.local import ClientContext
from lightning_modules.ops.augment import random_crop_flip
from lightning_modules.ops.schedules import multistep_lr, piecewise_linear
from tests.test_federated import fit, make_dm, make_recipe


# ------------------------------------------------------------------------------------------------ schedules
@pytest.mark.parametrize("milestones, gamma", [([3, 5], 0.01), ([3, 5, 7, 9], 0.1), ([], 0.5), ([1], 0.2)])
@pytest.mark.parametrize("at_start", [False, True])
def test_multistep_lr_is_torch_multisteplr_stepped_after_or_before_each_epoch(milestones, gamma, at_start):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=gamma)
    seen = []
    with pytest.warns(UserWarning) if at_start else _nothing():  # torch warns about step() before opt.step()
        for _ in range(10):
            if at_start:
                sched.step()
            seen.append(opt.param_groups[0]["lr"])
            opt.step()
            if not at_start:
                sched.step()
    ours = [multistep_lr(0.1, e, milestones, gamma, at_start) for e in range(10)]
    assert ours == pytest.approx(seen, rel=1e-12)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_official_baseline_schedule_decays_one_epoch_earlier_than_torch_use():
    # commands.sh Baseline: --retrain_poison 5 --poison_lr 0.1 (milestones [3, 5]) --lr_gamma 0.01
    official = LocalTrainer(lr=0.1, local_epochs=5, lr_milestones=[3, 5], lr_gamma=0.01, step_lr_at_epoch_start=True)
    assert [official.epoch_lr(e) for e in range(5)] == pytest.approx([0.1, 0.1, 1e-3, 1e-3, 1e-5])
    late = official.with_overrides(step_lr_at_epoch_start=False)
    assert [late.epoch_lr(e) for e in range(5)] == pytest.approx([0.1, 0.1, 0.1, 1e-3, 1e-3])
    with pytest.raises(TypeError, match="no setting"):
        official.with_overrides(learning_rate=1.0)


def test_piecewise_linear_reproduces_the_official_benign_lr_formula():
    def official(epoch: int) -> float:  # training.py, the benign clients' lr of round `epoch` (1-based)
        if epoch <= 500:
            return epoch * (0.2 - 0.001) / 499.0 + 0.001 - (0.2 - 0.001) / 499.0
        return max(epoch * (-0.2) / 1500 + 0.2 * 4.0 / 3.0, 0.0001)

    knots = [[0, 0.001], [499, 0.2], [500, official(501)], [1998.25, 0.0001]]  # engine round r = official r + 1
    for r in (0, 1, 250, 499, 500, 1000, 1799, 1839, 1990, 2100):
        assert piecewise_linear(r, knots) == pytest.approx(official(r + 1), abs=1e-9), r
    assert piecewise_linear(5, [[0, 1.0], [5, 1.0], [5, 2.0]]) == 2.0  # a repeated x is a step
    with pytest.raises(ValueError, match="sorted"):
        piecewise_linear(1, [[2, 1.0], [1, 0.0]])


# --------------------------------------------------------------------------------------------- augmentation
def test_random_crop_flip_shifts_within_the_padding_and_is_seeded():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float).view(2, 3, 6, 6)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.equal(random_crop_flip(x, 0, g(), flip=False), x)
    out = random_crop_flip(x, 2, g(), fill=-9.0)
    assert out.shape == x.shape and torch.equal(out, random_crop_flip(x, 2, g(), fill=-9.0))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-9.0)
    for i in range(2):  # every output image is some 6x6 window of its padded image, maybe mirrored
        windows = [padded[i, :, dy : dy + 6, dx : dx + 6] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(-1)) for w in windows)
    many = torch.randn(64, 1, 4, 4)
    flipped = random_crop_flip(many, 0, g())  # flip only: each image is itself or its mirror, both occur
    same = (flipped == many).flatten(1).all(1)
    assert torch.equal(flipped[~same], many[~same].flip(-1)) and 0 < int(same.sum()) < 64


# --------------------------------------------------------------------------------------------- the attacks
def _ctx(recipe, dm, client: int = 0, round: int = 0, round_seed: int = 0) -> ClientContext:
    params = [p.detach() for p in recipe.net.parameters()]
    flat = torch.nn.utils.parameters_to_vector(params)
    return ClientContext(round, client, params, flat, None, dm, recipe.local, torch.Generator().manual_seed(7),
                         round_seed=round_seed)  # fmt: skip


def test_official_baseline_attacker_trains_with_the_official_local_schedule():
    attack = PGDPoisoning(schedule=AttackSchedule([0]), radius=1.0, lr=0.1, local_epochs=5, lr_milestones=[3, 5],
                          lr_gamma=0.01, step_lr_at_epoch_start=True)  # fmt: skip
    recipe, dm = make_recipe(attack=attack), make_dm()
    trainer = attack.local_trainer(_ctx(recipe, dm))
    assert [trainer.epoch_lr(e) for e in range(trainer.local_epochs)] == pytest.approx([0.1, 0.1, 1e-3, 1e-3, 1e-5])
    assert trainer.momentum == recipe.local.momentum and trainer.weight_decay == recipe.local.weight_decay
    naive = NaivePoisoning(schedule=AttackSchedule([0]))  # None everywhere: the benign trainer's settings
    assert vars(naive.local_trainer(_ctx(recipe, dm))) == vars(recipe.local)


def test_chameleon_defaults_are_the_official_stage_settings():
    attack = ChameleonAttack(schedule=AttackSchedule([0]))
    assert attack.head_weight_decay == 5e-4 and attack.step_lr_at_epoch_start  # decay, scheduler.step() first
    assert attack.poison_noise_std == 0.01 and attack.early_stop_loss == 1e-4 and attack.poison_fraction == 7 / 64


def test_iid_attacker_data_is_a_fixed_sample_of_the_whole_training_set():
    dm = make_dm(partition="shards", shards_per_client=1)  # client 0 holds one shard: one or two classes
    dm.setup()
    attack = NaivePoisoning(schedule=AttackSchedule([0]), attacker_data=AttackerData(source="iid", batches=3))
    recipe = make_recipe(attack=attack)
    x0, y0 = dm.client_data(0)
    x, y = attack.training_data(x0, y0, _ctx(recipe, dm, round=0))
    again, _ = attack.training_data(x0, y0, _ctx(recipe, dm, round=5))
    assert len(y) == 3 * recipe.local.batch_size and torch.equal(x, again), "drawn once: the same every round"
    assert len(set(y.tolist())) > len(set(y0.tolist())), "IID over the whole set, not the attacker's shard"
    own = NaivePoisoning(schedule=AttackSchedule([0]))
    assert own.training_data(x0, y0, _ctx(recipe, dm))[0] is x0
    with pytest.raises(ValueError, match="source"):
        AttackerData(source="everything")


def test_neurotoxin_clean_clients_mask_uses_benign_clients_batch_mean_gradients():
    dm = make_dm()
    dm.setup()
    attack = Neurotoxin(schedule=AttackSchedule([0]), mask_source="clean_clients", mask_clients=3, keep_ratio=0.9)
    recipe = make_recipe(attack=attack)
    asked = []
    client_data = dm.client_data
    dm.client_data = lambda c: asked.append(c) or client_data(c)
    model = recipe._scratch_model()
    estimate = attack.benign_estimate(model, *client_data(0), _ctx(recipe, dm))
    assert len(asked) == 3 and 0 not in asked, "30 (here 3) random benign clients, never the attacker"
    expected = Neurotoxin.clean_gradient(model, [client_data(c) for c in asked], recipe.local.batch_size, mean=True)
    torch.testing.assert_close(estimate, expected)
    first = list(asked)
    again = attack.benign_estimate(model, *client_data(1), _ctx(recipe, dm, client=1))
    assert len(asked) == 3 and again is estimate, "one mask per round, shared by the round's colluders (official)"
    attack.benign_estimate(model, *client_data(1), _ctx(recipe, dm, client=1, round=1, round_seed=99))
    assert len(asked) == 6 and asked[3:] != first, "a new round draws its own clients from its shared seed"
    with pytest.raises(ValueError, match="clean_clients"):
        Neurotoxin(schedule=AttackSchedule([0]), mask_source="server")


# ------------------------------------------------------------------------------------ rounds, windows, decay
def test_post_attack_lr_applies_to_benign_clients_after_the_window():
    attack = NaivePoisoning(schedule=AttackSchedule([0], start_round=0, end_round=2))
    recipe = make_recipe(attack=attack, post_attack_lr=0.01, benign_lr_knots=[[0, 0.04], [4, 0.02]])
    assert [recipe.benign_lr(r) for r in range(4)] == pytest.approx([0.04, 0.035, 0.01, 0.01])
    assert recipe.local_for(3).lr == 0.01 and recipe.local_for(0).lr == 0.04 and recipe.local.lr == 0.05
    clean = make_recipe(post_attack_lr=0.01)
    with pytest.raises(ValueError, match="post_attack_from"):
        fit(clean, make_dm(), rounds=1)
    clean = make_recipe(post_attack_lr=0.01, post_attack_from=1)
    assert [clean.benign_lr(r) for r in range(3)] == [0.05, 0.01, 0.01]


def test_benign_clients_train_at_the_round_lr():
    seen = []
    recipe = make_recipe(attack=NaivePoisoning(schedule=AttackSchedule([0], end_round=1)), post_attack_lr=0.01)
    original = LocalTrainer.train

    def spy(self, *args, **kwargs):
        seen.append(self.lr)
        return original(self, *args, **kwargs)

    LocalTrainer.train = spy
    try:
        dm = make_dm()
        dm.setup()
        recipe.compute_round(0, dm)
        recipe.compute_round(1, dm)
    finally:
        LocalTrainer.train = original
    per_round = recipe.clients_per_round
    assert seen[:per_round] == [0.05] * per_round  # round 0: attacker (benign lr, 0.05) and benign clients
    assert seen[per_round:] == [0.01] * per_round  # round 1: the decay phase


def test_window_closes_once_the_backdoor_is_planted_and_the_decay_phase_has_fixed_length(tmp_path):
    schedule = AttackSchedule([0], start_round=0, end_round=20, stop_at_ba=1e-9)  # any BA > 0 plants it
    attack = NaivePoisoning(schedule=schedule, poison_fraction=0.5, lr=0.2, local_epochs=3)
    recipe = make_recipe(attack=attack, decay_rounds=3)
    trainer = fit(recipe, make_dm(), rounds=30)
    end = attack.window_end()
    assert end is not None and end < 20, "the window closed early"
    assert not attack.is_active(end) and attack.state_dict() == {"stopped_at": end}
    assert trainer.global_step == end + 3, "decay_rounds rounds after the window, not max_steps"
    with pytest.raises(ValueError, match="stop_at_ba"):
        AttackSchedule([0], stop_at_ba=1.5)


# -------------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("root", ["configs", "tests/configs"])
def test_warmup_and_attack_configs_share_the_federation_network_and_server(root):
    """The warm-up artifact must fit the attack runs and be trained in the same federation by the same server."""
    import yaml

    from tests.helpers import CONFIGS

    base = CONFIGS.parent / root / "chameleon"
    attack, warm = (yaml.safe_load((base / f"mnist_testbed{s}.yaml").read_text()) for s in ("", "_warmup"))
    for key in ("net", "clients_per_round", "server_lr", "aggregator"):
        assert attack["model"]["init_args"][key] == warm["model"]["init_args"][key], key
    data = [{k: v for k, v in c["data"]["init_args"].items() if k != "rounds_per_epoch"} for c in (attack, warm)]
    assert data[0] == data[1]
    assert warm["model"]["init_args"]["attack"] is None
    assert attack["model"]["init_args"]["aggregator"]["init_args"]["weighted"] is False  # official: unweighted
