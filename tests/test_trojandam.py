"""TrojanDam (lightning_modules/trojandam.py): the injection changes only the redundant neurons' entries and no
batch-norm statistic, the mapping is fresh every round, the importance follows the server steps, and the hook
inside a federated round. The tiny twin of configs/trojandam/mnist_continuous.yaml and the overlay
configs/fl/defenses/trojandam.yaml run through the CLI in tests/test_configs.py."""

from __future__ import annotations

import pytest
import torch
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
    defense = TrojanDam(ood_source="noise", pool_size=64, steps=3, lr=0.05, redundant_fraction=0.5)
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


def test_comparison_stages_point_at_existing_configs_and_warm_start_from_the_warmup():
    from pathlib import Path

    from recipes.reproduce import load_comparisons

    comp = load_comparisons()["trojandam"]
    repo = Path(__file__).resolve().parents[1]
    keys = [s.key for s in comp.stages]
    assert keys.index("mnist/naive/trojandam") < keys.index("mnist/chameleon/fedavg") < keys.index("fashion-mnist/warmup")
    for stage in comp.stages:
        assert (repo / "configs" / stage.config).exists() and (repo / "tests/configs" / stage.config).exists()
        for arg in stage.overrides:
            if arg.startswith("--config="):
                assert (repo / arg.removeprefix("--config=")).exists(), arg
        if "warmup" not in stage.key:
            dataset = stage.key.split("/")[0]
            assert f"--model.init_args.init_from={{artifact:{dataset}/warmup}}" in stage.overrides
