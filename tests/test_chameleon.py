"""Chameleon (Dai & Li, ICML 2023): the weighted SupCon loss on hand-computed cases, the two stages (projection,
head-only stage 2, lower poisoned loss), and the warm start from an artifact. The tiny twin of
configs/chameleon/mnist_normclip.yaml runs the attack through the CLI in tests/test_configs.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_modules.chameleon import ChameleonAttack
from lightning_modules.federated import AttackSchedule, NaivePoisoning
from lightning_modules.ops.contrastive import supcon_loss
from tests.test_federated import fit, flat, make_dm, make_recipe

Z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])  # the third normalises to the first
LABELS = torch.tensor([0, 1, 0])
PAIR = -(1.0 - math.log(1.0 + math.e))  # an anchor with one positive at cosine 1 and one negative at cosine 0


@pytest.mark.parametrize(
    "target_label, target_weight, expected",
    [
        (None, 1.0, 2 * PAIR / 3),  # anchors 0 and 2 have a positive, anchor 1 has none (0, still counted)
        (0, 6.0, 12 * PAIR / 3),  # target-label anchors' positive term weighted by 6
        (1, 6.0, 2 * PAIR / 3),  # anchor 1 is the target but has no positive: nothing changes
    ],
)
def test_supcon_loss_hand_computed(target_label, target_weight, expected):
    loss = supcon_loss(Z, LABELS, temperature=1.0, base_temperature=1.0, target_label=target_label,
                       target_weight=target_weight)  # fmt: skip
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_supcon_temperature_and_shape_checks():
    # τ = 0.5, τ_b = 1: logits double and the loss is scaled by τ/τ_b
    expected = 0.5 * 2 * -(2.0 - math.log(1.0 + math.exp(2.0))) / 3
    assert supcon_loss(Z, LABELS, temperature=0.5, base_temperature=1.0).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="features must be"):
        supcon_loss(Z, LABELS[:2])


def _attacker_round(attack: ChameleonAttack):
    recipe = make_recipe(attack=attack)
    dm = make_dm()
    dm.setup()
    out = recipe.compute_round(0, dm)
    assert out["clients"][0] == 0 and out["malicious"][0]
    return recipe, dm, out["updates"][0]


def _split(recipe, update):
    sizes = [p.numel() for p in recipe.net.parameters()]
    names = [n for n, _ in recipe.net.named_parameters()]
    parts = dict(zip(names, update.split(sizes)))
    head = torch.cat([v for n, v in parts.items() if n.startswith("head.")])
    body = torch.cat([v for n, v in parts.items() if not n.startswith("head.")])
    return body, head


def test_stage_two_alone_changes_only_the_head_and_the_update_stays_in_the_ball():
    attack = ChameleonAttack(schedule=AttackSchedule([0]), contrastive_epochs=0, head_epochs=3, head_lr=0.5, radius=0.2)
    recipe, _, update = _attacker_round(attack)
    body, head = _split(recipe, update)
    assert torch.count_nonzero(body) == 0, "stage 2 trains only the linear head"
    assert head.norm() > 0.01
    assert update.norm() <= 0.2 + 1e-5


def test_both_stages_move_the_encoder_within_the_radii_and_lower_the_poisoned_loss():
    attack = ChameleonAttack(schedule=AttackSchedule([0]), contrastive_epochs=3, contrastive_lr=0.05, contrastive_milestones=[],
                             head_epochs=3, head_lr=0.05, radius=0.5, radius_contrastive=0.5)  # fmt: skip
    recipe, dm, update = _attacker_round(attack)
    body, _ = _split(recipe, update)
    assert body.norm() > 0.01, "stage 1 trains the encoder"
    assert update.norm() <= 0.5 + 1e-5
    # the malicious model (global + update) fits triggered inputs to the target better than the global model
    x, y = dm.client_data(0)
    xp, yp = dm.poison_batch(x, y, 1.0)
    attacked = make_recipe().net
    torch.nn.utils.vector_to_parameters(flat(recipe.net) + update, attacked.parameters())
    before = F.cross_entropy(recipe.net(xp), yp).item()
    after = F.cross_entropy(attacked(xp), yp).item()
    assert after < before, (before, after)


def test_model_without_a_head_is_refused():
    recipe = make_recipe(attack=ChameleonAttack(schedule=AttackSchedule([0])))
    recipe.net.head = None  # a plain module list would have no separate linear head
    dm = make_dm()
    dm.setup()
    with pytest.raises(TypeError, match="features"):
        recipe.compute_round(0, dm)


def test_warm_start_from_an_artifact(tmp_path):
    from foundation.artifacts import save_artifact

    donor = make_recipe(attack=NaivePoisoning(schedule=AttackSchedule([0])))
    fit(donor, make_dm(), rounds=2)
    save_artifact(tmp_path / "warm", {k: v.clone() for k, v in donor.state_dict().items()}, {"recipe": "test"})
    torch.manual_seed(123)  # a different random init
    warm = make_recipe(init_from=str(tmp_path / "warm"))
    warm.configure_model()
    assert torch.equal(flat(warm.net), flat(donor.net))
    with torch.no_grad():
        next(warm.net.parameters()).add_(1.0)  # training moved it...
    warm.configure_model()  # ...and trainer.test calls the hook again: the trained weights must stay
    assert not torch.equal(flat(warm.net), flat(donor.net))
    assert warm.artifact_parents()[0]["sha256"]
    from lightning_modules.nets.cnn import MnistCNN

    wrong = make_recipe(net=MnistCNN(image_size=8, width=4, hidden=16), init_from=str(tmp_path / "warm"))
    with pytest.raises(ValueError, match="does not fit this net"):
        wrong.configure_model()


def test_chameleon_comparison_runs_on_tiny_twins(tmp_path):
    """``python -m recipes.reproduce chameleon --tiny``: the warm-up artifact feeds the clean continuation and every
    attack, the table has mean ± SE columns, the plot is written; ``chameleon-planted`` shares the warm-ups."""
    import json

    from recipes.reproduce import COMPARISONS, _substitute, reproduce

    table = reproduce("chameleon", seeds=[0], root=tmp_path / "runs", out=tmp_path / "out", tiny=True, only=["mnist"])
    stages = [s for s in COMPARISONS["chameleon"].stages if s.key.startswith("mnist")]
    assert [s.key for s in stages] == ["mnist/warmup", "mnist/clean", "mnist/baseline", "mnist/pgd",
                                       "mnist/neurotoxin_official", "mnist/chameleon"]  # fmt: skip
    for stage in stages:
        assert f"| {stage.label} |" in table
        if stage.key != "mnist/warmup":
            manifest = tmp_path / "runs/chameleon" / stage.key / "seed0/artifact/manifest.json"
            manifest = json.loads(manifest.read_text())
            assert "mnist/warmup/seed0/artifact" in manifest["parents"][0]["path"], stage.key
    assert "lifespan (rounds, BA ≥ 50%)" in table and "half-life" in table
    assert (tmp_path / "out" / "chameleon-mnist.png").stat().st_size > 5000
    result = json.loads((tmp_path / "runs/chameleon/mnist/chameleon/seed0/result.json").read_text())
    assert result["metrics"]["curve/window_length"] == 3 and "curve/half_life" in result["metrics"]

    planted = {s.key: s for s in COMPARISONS["chameleon-planted"].stages}
    assert "../chameleon/mnist/warmup" in planted and "../chameleon/mnist/clean" in planted
    warm = _substitute("{artifact:../chameleon/mnist/warmup}", 0, tmp_path / "runs/chameleon-planted")
    assert warm == str(tmp_path / "runs/chameleon/mnist/warmup/seed0/artifact")  # the run made above, shared
    attack = planted["mnist/chameleon"].overrides
    assert any("stop_at_ba=0.9" in a for a in attack)
    assert any("{artifact:../chameleon/mnist/warmup}" in a for a in attack)
