"""Behaviour of the merge recipes on the tiny pool in tests/assets/merging (8x8 images, a width-4 CNN).

Every rule merges identical models to that model; task arithmetic with one task and weight 1 gives that task model;
AdaMerging and DAM train through the CLI and log per-task metrics; DAM's masks stay in [0, 1] (relaxed) and
{0, 1} (discrete); the released-code configuration has no detection mask; bad pools fail with clear errors.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_modules import (
    DAM,
    AdaMerging,
    Dare,
    MergeRecipe,
    TaskArithmetic,
    TaskFineTuning,
    Ties,
)
from lightning_modules.nets import MnistCNN
from foundation.artifacts import load_artifact
from tests.helpers import TINY, artifact_of, run_cli

POOL = Path(__file__).parent / "assets" / "merging" / "dam" / "pool"
PRE = str(POOL / "pretrained" / "seed0" / "artifact")
MNIST = str(POOL / "mnist_badnets" / "seed0" / "artifact")


def tiny_net(classes: int = 10) -> MnistCNN:
    return MnistCNN(num_classes=classes, image_size=8, width=4, hidden=16)


def shared_weights(path: str) -> dict[str, torch.Tensor]:
    state = {k.removeprefix("net."): v for k, v in load_artifact(path).state_dict.items()}
    return {k: v for k, v in state.items() if not k.startswith("head.")}


def assert_state_equal(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected)
    for k, value in expected.items():
        torch.testing.assert_close(actual[k], value, rtol=1e-5, atol=1e-6)


K = 3
SAME_POOL = {"pretrained": PRE, "task_models": [MNIST] * K}  # learned merges take the pool by keyword
IDENTICAL = [
    ("task arithmetic, 1/K", lambda: MergeRecipe(tiny_net(), PRE, [MNIST] * K, TaskArithmetic(1 / K))),
    ("TIES per task, density 1", lambda: MergeRecipe(tiny_net(), PRE, [MNIST] * K, Ties(1.0, 1.0, "task"))),
    ("TIES per tensor, density 1", lambda: MergeRecipe(tiny_net(), PRE, [MNIST] * K, Ties(1.0, 1.0, "tensor"))),
    ("DARE, density 1", lambda: MergeRecipe(tiny_net(), PRE, [MNIST] * K, Dare(1.0, 1 / K))),
    ("DARE + TIES, density 1", lambda: MergeRecipe(tiny_net(), PRE, [MNIST] * K, Dare(1.0, 1.0, "ties"))),
    ("AdaMerging task-wise", lambda: AdaMerging(tiny_net(), **SAME_POOL, granularity="task", init=1 / K)),
    ("AdaMerging layer-wise", lambda: AdaMerging(tiny_net(), **SAME_POOL, granularity="layer", init=1 / K)),
    # DAM with masks that keep everything (logits far above 0): the AdaMerging merge of the identical models
    ("DAM, all-keep masks", lambda: DAM(tiny_net(), **SAME_POOL, init=1 / K, shared_mask_init=30.0,
                                        detection_mask_init=30.0, discrete="threshold")),
]


@pytest.mark.parametrize("build", [b for _, b in IDENTICAL], ids=[n for n, _ in IDENTICAL])
def test_every_rule_merges_identical_models_to_that_model(build):
    recipe = build()
    recipe.configure_model()
    assert_state_equal(recipe.merged_state(), shared_weights(MNIST))


def test_task_arithmetic_with_one_task_and_weight_one_is_that_task_model():
    recipe = MergeRecipe(tiny_net(), PRE, [MNIST], TaskArithmetic(1.0))
    recipe.configure_model()
    recipe.refresh()
    assert_state_equal({k: v for k, v in recipe.net.state_dict().items() if not k.startswith("head.")}, shared_weights(MNIST))
    head = {k.removeprefix("net.head."): v for k, v in load_artifact(MNIST).state_dict.items() if k.startswith("net.head.")}
    assert_state_equal(recipe.heads[0].state_dict(), head)


def test_merge_of_different_models_is_neither_model():
    other = str(POOL / "digits" / "seed0" / "artifact")
    recipe = MergeRecipe(tiny_net(), PRE, [MNIST, other], TaskArithmetic(0.5))
    recipe.configure_model()
    merged, a, b = recipe.merged_state(), shared_weights(MNIST), shared_weights(other)
    for k in merged:
        torch.testing.assert_close(merged[k], (a[k] + b[k]) / 2, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(merged[k], a[k]) for k in merged)


def test_task_finetuning_starts_from_the_backbone_with_a_new_head():
    recipe = TaskFineTuning(tiny_net(2), PRE)
    recipe.configure_model()
    assert_state_equal({k: v for k, v in recipe.net.state_dict().items() if not k.startswith("head.")}, shared_weights(PRE))
    assert recipe.net.head.out_features == 2 and recipe.artifact_parents()[0]["recipe"].endswith("ClassifierRecipe")


def test_task_finetuning_keeps_a_frozen_head_from_the_clean_probe():
    probe = str(POOL / "probe_mnist" / "seed0" / "artifact")
    recipe = TaskFineTuning(tiny_net(10), PRE, head=probe, freeze_head=True)
    recipe.configure_model()
    head = {k.removeprefix("net.head."): v for k, v in load_artifact(probe).state_dict.items() if k.startswith("net.head.")}
    assert_state_equal(recipe.net.head.state_dict(), head)
    recipe.on_train_epoch_start()
    assert not any(p.requires_grad for p in recipe.net.head.parameters())
    assert all(p.requires_grad for n, p in recipe.net.named_parameters() if not n.startswith("head."))
    # the pool's backdoored task model kept that head through its fine-tuning
    assert_state_equal({k: v for k, v in load_artifact(MNIST).state_dict.items() if k.startswith("net.head.")},
                       {f"net.head.{k}": v for k, v in head.items()})
    with pytest.raises(ValueError, match="num_classes"):
        TaskFineTuning(tiny_net(2), PRE, head=probe).configure_model()
    with pytest.raises(ValueError, match="freeze_head"):
        TaskFineTuning(tiny_net(10), PRE, head=probe, freeze_head=True, linear_probe_epochs=1)


def test_adamerging_learns_coefficients_and_logs_per_task_metrics(tmp_path):
    cli = run_cli("--config", str(TINY / "merging" / "pool_adamerging.yaml"), root=tmp_path)
    results = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    assert {"test/acc", "test/asr", "test/mnist/acc", "test/mnist/asr", "test/digits/acc"} <= set(results)
    assert not torch.allclose(cli.model.merge_weights.detach(), torch.full_like(cli.model.merge_weights, 0.3))
    assert cli.model.merge_weights.shape == (3, len(cli.model.pretrained_state))
    art = artifact_of(tmp_path)
    assert art.manifest["backdoored"] == [True, False, False]
    assert {"heads.digits.weight", "heads.mnist.bias"} <= set(art.state_dict)
    # the exported shared weights are the merge that was evaluated
    merged = {k: v.cpu() for k, v in cli.model.merged_state().items()}
    assert_state_equal({k.removeprefix("net."): v for k, v in art.state_dict.items() if k.startswith("net.")}, merged)


@pytest.mark.parametrize("detection", [True, False])
def test_dam_masks_stay_in_unit_interval_and_end_discrete(tmp_path, detection):
    cli = run_cli("--config", str(TINY / "merging" / "pool_dam.yaml"), f"--model.init_args.detection_mask={detection}",
                  root=tmp_path)  # fmt: skip
    dam = cli.model
    shared, detect = dam.relaxed_masks()
    assert len(detect) == (len(shared) if detection else 0)
    for m in [*shared, *detect]:
        assert m.min() >= 0.0 and m.max() <= 1.0
    assert dam.final_masks is not None  # the second epoch ran AdaMerging with fixed discrete masks
    for task_masks in dam.final_masks:
        for m in task_masks.values():
            support = torch.unique((m != 0).float())
            assert set(support.tolist()) <= {0.0, 1.0}
    moved = [not torch.equal(lg, torch.full_like(lg, dam.shared_mask_init)) for lg in dam.shared_logits]
    assert any(moved), "the task-shared mask never changed"
    if detection:
        assert any(not torch.equal(lg, torch.full_like(lg, dam.detection_mask_init)) for lg in dam.detection_logits)


def test_wrong_number_of_task_models_is_named(tmp_path):
    with pytest.raises(ValueError, match="one artifact per task"):
        run_cli("--config", str(TINY / "merging" / "pool_task_arithmetic.yaml"), f"--model.init_args.task_models=[{MNIST}]",
                root=tmp_path)  # fmt: skip


def test_head_class_mismatch_points_at_the_order(tmp_path):
    with pytest.raises(ValueError, match="order of task_models"):  # the backbone's head has 4 rotation classes
        run_cli("--config", str(TINY / "merging" / "pool_task_arithmetic.yaml"),
                f"--model.init_args.task_models=[{PRE},{MNIST},{MNIST}]", root=tmp_path)  # fmt: skip


def test_bad_arguments_fail_early():
    with pytest.raises(ValueError, match="task_models is empty"):
        MergeRecipe(tiny_net(), PRE, [])
    with pytest.raises(ValueError, match="granularity"):
        AdaMerging(tiny_net(), pretrained=PRE, task_models=[MNIST], granularity="model")
    with pytest.raises(ValueError, match="safe_loss"):
        DAM(tiny_net(), pretrained=PRE, task_models=[MNIST], safe_loss="kl")


@pytest.mark.slow
def test_dam_comparison_runs_on_tiny_twins(tmp_path):
    """The whole reproduction (pool, then every merge rule on it, paired by merge seed) on the tiny twins, its table
    and its paired table; the permuted-mask control keeps DAM's kept fraction."""
    from recipes.reproduce import COMPARISONS, reproduce

    table = reproduce("dam", seeds=[0], root=tmp_path / "runs", out=tmp_path / "docs", tiny=True)
    for stage in COMPARISONS["dam"].stages:
        assert stage.label in table
    merged = load_artifact(tmp_path / "runs" / "dam" / "merge" / "dam" / "m1" / "seed0" / "artifact")
    assert merged.manifest["backdoored"] == [True, False, False]
    control = load_artifact(tmp_path / "runs" / "dam" / "merge" / "dam_permuted" / "m1" / "seed0" / "artifact")
    kept = [a.manifest["merge"]["kept_fraction_per_task"] for a in (merged, control)]
    assert kept[0] == pytest.approx(kept[1])
    assert control.manifest["merge"]["rule"] == "DAMPermutedMasks"
    paired = (tmp_path / "docs" / "dam-paired.md").read_text()
    assert "DAM − method: ASR" in paired and "control: DAM's learned masks" in paired
    assert {p["recipe"].rsplit(".", 1)[-1] for p in merged.manifest["parents"]} == {"ClassifierRecipe", "TaskFineTuning"}
