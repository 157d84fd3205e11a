"""TrojanDam (lightning_modules/trojandam.py): the injection changes only the redundant neurons' entries and no
batch-norm statistic, the mapping is fresh every round, the importance follows the server steps, and the hook
inside a federated round. The tiny twin of configs/trojandam/mnist_continuous.yaml and the overlay
configs/fl/defenses/trojandam.yaml run through the CLI in tests/test_configs.py."""

from __future__ import annotations

import pytest
import torch
import yaml
from torch import nn

from lightning_modules.federated import NormClipping
from lightning_modules.trojandam import TrojanDam
from tests.test_federated import fit, flat, make_dm, make_recipe


class BNNet(nn.Module):
    """conv -> BatchNorm -> linear -> head, on 8x8 digits."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc, self.head = nn.Linear(4 * 8 * 8, 16), nn.Linear(16, 10)

    def forward(self, x):
        return self.head(torch.relu(self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))))


def _bn_net_with_stats() -> BNNet:
    torch.manual_seed(0)
    net = BNNet()
    net.train()
    net(torch.randn(32, 1, 8, 8) * 2 + 1)  # non-trivial running statistics
    return net


def _data(n: int = 64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("bn_mode", ["eval", "restore"])
def test_injection_changes_only_redundant_entries_and_keeps_bn_statistics(bn_mode):
    net = _bn_net_with_stats()
    defense = TrojanDam(steps=5, lr=0.1, redundant_fraction=0.5, importance="weight", bn_mode=bn_mode)
    masks = defense.masks(net)
    assert masks["conv.weight"].flatten(1).all(1).sum() == 2  # half of the 4 kernels
    assert masks["fc.weight"].all(1).sum() == 8 and masks["fc.bias"].sum() == 8
    assert masks["head.weight"].all(0).sum() == 8 and not masks["head.bias"].any()  # columns of the head
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, y = _data()
    defense.inject(net, masks, x, y, torch.Generator().manual_seed(0))
    changed_any = False
    for name, p in net.named_parameters():
        changed = p.detach() != before[name]
        allowed = masks.get(name, torch.zeros_like(changed))
        assert not (changed & ~allowed).any(), f"{name} changed outside the redundant neurons"
        changed_any |= bool(changed.any())
    assert changed_any, "the injection must move the redundant neurons"
    for name, b in net.named_buffers():
        assert torch.equal(b, before[name]), f"BatchNorm statistic {name} changed"
    assert net.training, "the net's mode is restored"
    # the check can fail: a plain training-mode pass over the same data would move the statistics
    net(x)
    assert not torch.equal(net.bn.running_mean, before["bn.running_mean"])


def test_more_injection_fits_the_mapping_and_none_changes_nothing():
    x, y = _data(32)
    fits = {}
    for fraction in (0.0, 1.0):
        net = _bn_net_with_stats()
        start = flat(net)
        _, fits[fraction] = TrojanDam(steps=150, lr=0.05, redundant_fraction=fraction, importance="weight").inject(
            net, TrojanDam(redundant_fraction=fraction, importance="weight").masks(net), x, y,
            torch.Generator().manual_seed(0))  # fmt: skip
        if fraction == 0.0:
            assert torch.equal(flat(net), start)
    assert fits[1.0] > 0.9 > fits[0.0]


def test_update_importance_keeps_the_neurons_the_server_steps_move():
    net = BNNet()
    step = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
    step["fc.weight"][3] = 1.0  # the server moved fc neuron 3
    step["head.weight"][:, 5] = 1.0  # and the head's weights from hidden neuron 5
    defense = TrojanDam(redundant_fraction=0.5, importance="update", importance_decay=0.5)
    defense.track_update(net, torch.cat([v.flatten() for v in step.values()]))
    masks = defense.masks(net)
    assert not masks["fc.weight"][3].any() and not masks["head.weight"][:, 5].any()
    assert masks["fc.weight"].all(1).sum() == 8
    # moving average: a second, empty step halves the score but keeps the ranking
    defense.track_update(net, torch.zeros(sum(p.numel() for p in net.parameters())))
    assert defense.scores["fc.weight"][3].max() == 0.5
    assert torch.equal(defense.masks(net)["fc.weight"], masks["fc.weight"])


class TriggerMLP(nn.Module):
    """8x8 images -> 16 hidden ReLU units -> 10 logits, with a planted backdoor neuron: hidden unit 3 reads only
    pixel 0 (the trigger, 0 on clean images) through a bias of -1, and its head column votes for class 7."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.head = nn.Linear(64, 16), nn.Linear(16, 10)
        with torch.no_grad():
            self.fc.weight[3].zero_()
            self.fc.weight[3, 0], self.fc.bias[3] = 1.0, -1.0
            self.head.weight[:, 3] = 0.0
            self.head.weight[7, 3] = 5.0

    def forward(self, x):
        return self.head(torch.relu(self.fc(x.flatten(1))))


def test_clean_gradient_importance_marks_a_planted_backdoor_neuron_redundant():
    """The backdoor neuron carries the whole malicious server step, so ``update`` importance spares it; on clean
    inputs it never fires, so its clean gradient is zero and ``clean_gradient`` hands it to the injection."""
    net = TriggerMLP()
    x, y = _data(200)
    x[:, 0, 0, 0] = 0.0  # clean images: the trigger pixel is off
    triggered = x.clone()
    triggered[:, 0, 0, 0] = 10.0
    assert (net(triggered).argmax(-1) == 7).float().mean() > 0.9, "the planted neuron must be a working backdoor"
    # the malicious server step: exactly the planted weights (fc row 3 with its bias, head column 3)
    step = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
    step["fc.weight"][3], step["fc.bias"][3] = net.fc.weight[3].detach(), net.fc.bias[3].detach()
    step["head.weight"][:, 3] = net.head.weight[:, 3].detach()
    by_update = TrojanDam(redundant_fraction=0.5, importance="update", output_layer="head")
    by_update.track_update(net, torch.cat([v.flatten() for v in step.values()]))
    masks = by_update.masks(net)
    assert not masks["fc.weight"][3].any() and not masks["head.weight"][:, 3].any(), "update importance spares it"
    by_clean = TrojanDam(redundant_fraction=0.5, importance="clean_gradient", output_layer="head", batch_size=64)
    by_clean.track_clean_gradient(net, x, y)
    assert by_clean.scores["fc.weight"][3].abs().sum() == 0 and by_clean.scores["head.weight"][:, 3].sum() == 0
    masks = by_clean.masks(net)
    assert masks["fc.weight"][3].all() and masks["fc.bias"][3] and masks["head.weight"][:, 3].all()
    assert masks["fc.weight"].all(1).sum() == 8, "still half of the units"


def test_clean_gradient_hook_uses_a_server_set_outside_the_clients_and_the_test_set():
    dm = make_dm(test_size=200)  # of digits' 300 test images: 100 left for the server
    defense = TrojanDam(ood_source="noise", pool_size=64, steps=3, lr=0.05, clean_per_class=5)
    recipe = make_recipe(aggregator=NormClipping(1.0), server_defense_hooks=[defense])
    fit(recipe, dm, 2)
    x, y = defense.clean
    assert torch.equal(torch.bincount(y, minlength=10), torch.full((10,), 5)), "5 images of every class"
    flat_rows = lambda t: {tuple(r.tolist()) for r in t.flatten(1)}  # noqa: E731
    server = flat_rows(x)
    assert server <= flat_rows(dm.holdout[0]), "drawn from the test images beyond test_size"
    assert not server & flat_rows(dm.val_sets[0].tensors[0]) and not server & flat_rows(dm.train_x)
    assert set(defense.scores) == {n for n, _ in recipe.net.named_parameters()}
    with pytest.warns(UserWarning, match="fewer than 40 held-out images of some classes"):
        x, y = dm.server_clean_set(40)
    assert len(y) == len(dm.holdout[1]), "a short class gives all it has"
    everything = make_dm()  # test_size None: every test image is evaluation, none left for the server
    everything.setup()
    with pytest.raises(ValueError, match="lower data.test_size"):
        everything.server_clean_set(5)


@pytest.mark.parametrize("fresh_samples", [False, True])
def test_a_fresh_mapping_differs_between_rounds(fresh_samples):
    dm = make_dm()
    dm.setup()
    defense = TrojanDam(ood_source="patches", pool_size=200, fresh_samples=fresh_samples)
    mappings = []
    for round in range(3):
        defense.refresh(dm, round, dm.num_classes, seed=0)
        mappings.append((defense.images.clone(), defense.labels.clone()))
    for (x0, y0), (x1, y1) in zip(mappings, mappings[1:]):
        assert not torch.equal(y0, y1)
        if fresh_samples:
            assert not torch.equal(x0, x1)
        else:  # the same flood set, and every image's label changes
            assert torch.equal(x0, x1) and (y0 != y1).all()
    again = TrojanDam(ood_source="patches", pool_size=200, fresh_samples=fresh_samples)
    for round in range(3):
        again.refresh(dm, round, dm.num_classes, seed=0)
    assert torch.equal(again.labels, mappings[-1][1]), "mappings are seeded by (seed, round)"


def test_hook_in_a_federated_round_moves_only_redundant_entries():
    dm = make_dm()
    plain = make_recipe(aggregator=NormClipping(1.0))
    fit(plain, dm, 1)
    defense = TrojanDam(ood_source="noise", pool_size=64, steps=3, lr=0.05, redundant_fraction=0.5,
                        importance="update")
    defended = make_recipe(aggregator=NormClipping(1.0), server_defense_hooks=[defense])
    fit(defended, dm, 1)
    masks = defense.masks(plain.net)  # the masks of round 0: scores = |server step|, the same in both runs
    offset, moved = 0, 0
    diff = flat(defended.net) - flat(plain.net)
    for name, p in plain.net.named_parameters():
        d = diff[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
        assert not (d[~masks[name]] != 0).any(), name
        moved += int((d != 0).sum())
    assert moved > 0
    assert defense.labels is not None and len(defense.labels) == 64


def test_start_round_delays_injection_and_state_round_trips():
    dm = make_dm()
    plain, late = make_recipe(), make_recipe(server_defense_hooks=[TrojanDam(ood_source="noise", start_round=5)])
    fit(plain, dm, 1)
    fit(late, dm, 1)
    assert torch.equal(flat(plain.net), flat(late.net))
    dm.setup()
    a = TrojanDam(ood_source="noise", pool_size=20)
    a.refresh(dm, 0, 10, seed=1)
    b = TrojanDam(ood_source="noise", pool_size=20)
    b.load_state_dict(a.state_dict())
    a.refresh(dm, 1, 10, seed=1)
    b.refresh(dm, 1, 10, seed=1)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.images, b.images)


def test_ood_images_take_the_federations_shape_and_normalisation():
    dm = make_dm()
    dm.setup()
    g = torch.Generator().manual_seed(0)
    x = TrojanDam(ood_source="fashion-mnist", pool_size=10).draw_images(dm, g)
    assert x.shape == (10, 1, 8, 8) and torch.isfinite(x).all()
    pixels = dm.denormalize(x)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5 and pixels.std() > 0.05
    assert TrojanDam(pool_size=5).draw_images(dm, g).shape == (5, 1, 8, 8)  # auto: digits -> noise


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(redundant_fraction=1.5), "redundant_fraction"),
        (dict(period=0), "period >= 1"),
        (dict(importance="gradient"), "importance must be"),
    ],
)
def test_bad_settings_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrojanDam(**kwargs)


def test_unknown_output_layer_names_the_choices():
    with pytest.raises(ValueError, match="output_layer='classifier'.*'head'"):
        TrojanDam(output_layer="classifier").masks(BNNet())


@pytest.mark.parametrize(
    "record, expected",
    [
        # attack in rounds 0-5, evaluations after rounds 2, 4, 6, 8: the window's are 2, 4 and 6 (the first after it)
        ({"rounds": [2, 4, 6, 8], "ba": [0.2, 0.4, 0.6, 0.1], "ma": [0.9, 0.8, 0.7, 0.9], "attack_rounds": list(range(6))},
         (0.4, 0.8)),
        # no attack: every evaluation (a clean reference over the same rounds)
        ({"rounds": [3, 6], "ba": [0.1, 0.3], "ma": [0.5, 0.7], "attack_rounds": []}, (0.2, 0.6)),
        # BA not measured at one evaluation
        ({"rounds": [3, 6], "ba": [None, 0.3], "ma": [0.5, 0.7], "attack_rounds": [0, 1, 2, 3, 4, 5]}, (0.3, 0.6)),
    ],
)
def test_attack_summary_means_over_the_attack(record, expected):
    from callbacks.attack_curves import attack_summary

    out = attack_summary(record)
    assert (out["ba_mean_attack"], out["ma_mean_attack"]) == pytest.approx(expected)


@pytest.mark.parametrize("aggregator, admitted", [("fedavg", 1.0), ("krum", 0.0)])
def test_attack_curves_count_the_malicious_updates_the_aggregator_kept(aggregator, admitted, tmp_path):
    """A boosted attacker (update x 50) in every round: FedAvg keeps it every time, Krum (f = 1, one selected)
    never; the summary also holds the mean OOD fit of TrojanDam (NaN without it)."""
    from callbacks.attack_curves import AttackCurves
    from lightning_modules.federated import AttackSchedule, FedAvg, Krum, NaivePoisoning

    attack = NaivePoisoning(schedule=AttackSchedule([0], scale=50.0))
    agg = FedAvg() if aggregator == "fedavg" else Krum(num_malicious=1, num_selected=1)
    curves = AttackCurves(every_validation=False)
    recipe = make_recipe(attack=attack, aggregator=agg, clients_per_round=5)
    fit(recipe, make_dm(), 3, callbacks=[curves], default_root_dir=tmp_path)
    summary = curves.summary()
    assert len(curves.record["admitted"]) == 3 and summary["malicious_admitted"] == admitted
    assert summary["ood_fit_mean"] != summary["ood_fit_mean"]  # NaN: no TrojanDam


def test_comparison_runs_the_grid_from_the_chameleon_testbeds_warmup():
    """Every (attack, defense) pair on both datasets, in priority order, each warm-started from the warm-up the
    chameleon comparison shares, and every malicious update and the clipping bound at the dataset's stealthy radius."""
    from pathlib import Path

    from recipes.comparisons.trojandam import RADIUS
    from recipes.reproduce import load_comparisons

    comp = load_comparisons()["trojandam"]
    repo = Path(__file__).resolve().parents[1]
    keys = [s.key for s in comp.stages]
    for dataset in ("mnist", "fashion-mnist"):
        assert {f"{dataset}/{a}/{d}" for a in ("pgd", "neurotoxin", "chameleon")
                for d in ("fedavg", "normclip", "multikrum", "flame", "trojandam")} <= set(keys)  # fmt: skip
    assert keys.index("mnist/pgd/trojandam") < keys.index("mnist/chameleon/fedavg") < keys.index(
        "../chameleon/fashion-mnist/warmup")
    for stage in comp.stages:
        assert (repo / "configs" / stage.config).exists() and (repo / "tests/configs" / stage.config).exists()
        for arg in stage.overrides:
            if arg.startswith("--config="):
                assert (repo / arg.removeprefix("--config=")).exists(), arg
        if "warmup" not in stage.key:
            dataset = stage.key.split("/")[0]
            assert f"--model.init_args.init_from={{artifact:../chameleon/{dataset}/warmup}}" in stage.overrides
            if "/none/" not in stage.key:
                assert f"--model.init_args.attack.init_args.radius={RADIUS[dataset]}" in stage.overrides
            if stage.key.endswith(("normclip", "trojandam", "trojandam_fresh", "trojandam_fresh128")):
                assert f"--model.init_args.aggregator.init_args.max_norm={RADIUS[dataset]}" in stage.overrides
    assert RADIUS == {"mnist": 0.3, "fashion-mnist": 0.8}, "each dataset's median benign update norm"
    testbed = yaml.safe_load((repo / "configs" / "trojandam" / "testbed.yaml").read_text())["model"]["init_args"]
    assert testbed["attack"]["init_args"]["radius"] == RADIUS["mnist"], "the testbed's own PGD at MNIST's radius"


def test_backdoor_units_reset_takes_the_masked_entries_back_to_the_warm_up_and_keeps_the_rest():
    """scripts/trojandam_backdoor_units.py: a reset loads the final model, then sets exactly the masked parameter
    entries to the warm-up's; the other entries and every buffer (BatchNorm statistics) stay final."""
    from scripts.trojandam_backdoor_units import reset

    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    final = {k: torch.full_like(v, 2.0) for k, v in net.state_dict().items()}
    warm = {k: torch.zeros_like(v) for k, v in net.named_parameters()}
    mask = torch.tensor([[True, False, False], [False, False, True]])
    reset(net, final, warm, {"0.weight": mask})
    assert torch.equal(net[0].weight, torch.tensor([[0.0, 2.0, 2.0], [2.0, 2.0, 0.0]]))
    assert torch.equal(net[0].bias, torch.full((2,), 2.0)) and torch.equal(net[1].running_mean, torch.full((2,), 2.0))
