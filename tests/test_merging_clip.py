"""The CLIP image classifier and the tiny CLIP merge pool (tests/clip_pool.py: a random 2-layer CLIP checkpoint, 3
tasks from the image store). The net's features are unit-norm and its head is the linear layer MergeRecipe keeps per
task; the zero-shot head is CLIP's own text-image similarity and stays frozen in fine-tuning; the theta_0 export is
the checkpoint's tower; merging identical task models gives that model (pretrained + task vector identity) through
MergeRecipe, AdaMerging and DAM; learned merges run on store-backed tasks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules import (
    DAM,
    AdaMerging,
    CLIPImageClassifier,
    MergeRecipe,
    TaskArithmetic,
    Ties,
)
from lightning_modules.nets.clip import FrozenLinear
from foundation.artifacts import load_artifact
from tests.clip_pool import CLIP_ASSETS, ROOT, artifact
from tests.helpers import TINY, artifact_of, run_cli

TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
         "image_size": 32, "patch_size": 8, "projection_dim": 16}  # fmt: skip
PRE, MNIST = str(artifact("pretrained")), str(artifact("mnist_badnets"))
CHECKPOINT = str(ROOT / CLIP_ASSETS / "tiny-clip")
STORE = str(ROOT / CLIP_ASSETS / "data" / "mnist")


def tiny_clip(classes: int = 10) -> CLIPImageClassifier:
    """A random tower from a config (no checkpoint)."""
    return CLIPImageClassifier(classes, model_name_or_path=None, vision_config=TOWER)


def pool_clip(classes: int = 10, **kwargs) -> CLIPImageClassifier:
    """The tiny pool's architecture, read from its safetensors checkpoint."""
    return CLIPImageClassifier(classes, model_name_or_path=CHECKPOINT, **kwargs)


def shared_weights(path: str) -> dict[str, torch.Tensor]:
    state = {k.removeprefix("net."): v for k, v in load_artifact(path).state_dict.items()}
    return {k: v for k, v in state.items() if not k.startswith("head.")}


def assert_state_equal(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected)
    for k, value in expected.items():
        torch.testing.assert_close(actual[k], value, rtol=1e-5, atol=1e-6)


def test_features_are_unit_norm_and_the_head_is_linear_at_clip_scale():
    net = tiny_clip(5)
    net.build()
    x = torch.randn(4, 3, 32, 32)
    feats = net.features(x)
    assert feats.shape == (4, 16)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(4))
    assert isinstance(net.head, nn.Linear) and net.head.out_features == 5
    torch.testing.assert_close(net.head.weight.norm(dim=-1), torch.full((5,), 100.0))  # CLIP's logit scale
    torch.testing.assert_close(net(x), feats @ net.head.weight.T)  # bias starts at 0
    keys = net.state_dict()
    assert {"head.weight", "head.bias"} <= set(keys) and all(k.startswith(("vision.", "head.")) for k in keys)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"model_name_or_path": None}, "exactly one"), ({"vision_config": TOWER}, "exactly one"),
     ({"model_name_or_path": None, "vision_config": TOWER, "num_classes": 0}, "num_classes"),
     ({"head_init": "zero_shot"}, "class_names"),
     ({"model_name_or_path": None, "vision_config": TOWER, "head_init": "zero_shot", "class_names": ["a"]},
      "text tower"),
     ({"templates": ["a photo"]}, "exactly one '{}'")],
    ids=["neither", "both", "no classes", "zero-shot without names", "zero-shot without checkpoint", "template"],
)
def test_bad_specs_fail_early(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CLIPImageClassifier(**kwargs)


def test_wrong_input_size_names_the_datamodule_setting():
    net = tiny_clip()
    net.build()
    with pytest.raises(ValueError, match="image_size"):
        net.features(torch.randn(2, 3, 28, 28))
    with pytest.raises(RuntimeError, match="build"):
        tiny_clip().features(torch.randn(2, 3, 32, 32))


def test_zero_shot_head_is_clips_own_image_text_similarity():
    """The frozen head's logits are CLIP's: logit_scale * cos(image embedding, mean unit prompt embedding)."""
    from transformers import AutoTokenizer, CLIPModel

    templates = ["a photo of a {}.", "a {}"]
    net = pool_clip(10, head_init="zero_shot", class_names=STORE, templates=templates, freeze_head=True)
    net.build()
    assert isinstance(net.head, FrozenLinear) and not [n for n, _ in net.named_parameters() if n.startswith("head.")]
    clip, tok = CLIPModel.from_pretrained(CHECKPOINT, use_safetensors=True).eval(), AutoTokenizer.from_pretrained(CHECKPOINT)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        prompts = tok([t.format(c) for c in "0123456789" for t in templates], padding=True, return_tensors="pt")
        out = clip(**prompts, pixel_values=x)
        text = F.normalize(F.normalize(out.text_embeds, dim=-1).view(10, 2, -1).mean(1), dim=-1)
        expected = 100.0 * F.normalize(out.image_embeds[:2], dim=-1) @ text.T
        torch.testing.assert_close(net(x), expected, rtol=1e-4, atol=1e-3)
    assert set(net.state_dict()) >= {"head.weight", "head.bias"}  # saved and merged like nn.Linear's


@pytest.mark.parametrize(
    "kwargs, match",
    [({"class_names": ["a", "b"]}, "2 class names for a 10-class head"),
     ({"class_names": str(ROOT / "nowhere")}, "foundation.export_images")],
    ids=["count", "missing store"],
)
def test_zero_shot_class_name_errors(kwargs, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        pool_clip(10, head_init="zero_shot", **kwargs).build()


def test_pretrained_export_is_the_checkpoints_tower():
    """theta_0 comes from a linear probe with the tower frozen: its shared weights are the checkpoint's, exactly."""
    net = pool_clip()
    net.build()
    expected = {k: v for k, v in net.state_dict().items() if k.startswith("vision.")}
    assert_state_equal(shared_weights(PRE), expected)


def test_task_model_trains_the_tower_under_a_frozen_zero_shot_head():
    net = pool_clip(10, head_init="zero_shot", class_names=STORE, freeze_head=True)
    net.build()
    state = {k.removeprefix("net."): v for k, v in load_artifact(MNIST).state_dict.items()}
    torch.testing.assert_close(state["head.weight"], net.head.weight)  # unchanged by fine-tuning
    assert any(not torch.equal(state[k], v) for k, v in shared_weights(PRE).items())


K = 3
SAME_POOL = {"pretrained": PRE, "task_models": [MNIST] * K}  # learned merges take the pool by keyword
IDENTICAL = [
    ("task arithmetic, 1/K", lambda: MergeRecipe(pool_clip(), PRE, [MNIST] * K, TaskArithmetic(1 / K))),
    ("TIES, density 1", lambda: MergeRecipe(pool_clip(), PRE, [MNIST] * K, Ties(1.0, 1.0, "task"))),
    ("AdaMerging layer-wise", lambda: AdaMerging(pool_clip(), **SAME_POOL, granularity="layer", init=1 / K)),
    ("DAM, all-keep masks", lambda: DAM(pool_clip(), **SAME_POOL, init=1 / K, shared_mask_init=30.0,
                                        detection_mask_init=30.0, discrete="threshold")),
]


@pytest.mark.parametrize("build", [b for _, b in IDENTICAL], ids=[n for n, _ in IDENTICAL])
def test_identical_clip_task_models_merge_to_that_model(build):
    recipe = build()
    recipe.configure_model()
    assert_state_equal(recipe.merged_state(), shared_weights(MNIST))
    assert not any(k.startswith("head.") for k in recipe.pretrained_state)


def test_one_task_vector_at_weight_one_restores_the_task_model_and_its_head():
    recipe = MergeRecipe(pool_clip(), PRE, [MNIST], TaskArithmetic(1.0))
    recipe.configure_model()
    recipe.refresh()
    shared = {k: v for k, v in recipe.net.state_dict().items() if not k.startswith("head.")}
    assert_state_equal(shared, shared_weights(MNIST))
    head = {k.removeprefix("net.head."): v for k, v in load_artifact(MNIST).state_dict.items() if k.startswith("net.head.")}
    assert_state_equal(recipe.heads[0].state_dict(), head)
    x = torch.randn(2, 3, 32, 32)
    model = pool_clip(10, head_init="zero_shot", class_names=STORE, freeze_head=True)
    model.build()
    model.load_state_dict({k.removeprefix("net."): v for k, v in load_artifact(MNIST).state_dict.items()})
    torch.testing.assert_close(recipe(x, 0), model(x), rtol=1e-4, atol=1e-4)  # the merge is the task model


def test_task_models_differ_from_theta0_and_record_it_as_parent():
    tau = {k: shared_weights(MNIST)[k] - v for k, v in shared_weights(PRE).items()}
    assert any(t.abs().max() > 0 for t in tau.values())
    parent = load_artifact(MNIST).manifest["parents"][0]
    assert parent["sha256"] == load_artifact(PRE).manifest["sha256"]


def test_dam_learns_on_store_tasks_with_a_trigger_proxy_shaped_like_clip_inputs(tmp_path):
    cli = run_cli("--config", str(TINY / "merging" / "clip" / "dam.yaml"), root=tmp_path)
    dam = cli.model
    assert dam.trigger.shape == (3, 3, 32, 32)
    assert dam.final_masks is not None and dam.detection_mask and dam.discrete == "topk"
    results = cli.trainer.test(dam, datamodule=cli.datamodule, verbose=False)[0]
    assert {"test/acc", "test/asr", "test/mnist/asr", "test/fashion/asr", "test/digits/acc"} <= set(results)
    art = artifact_of(tmp_path)
    assert art.manifest["backdoored"] == [True, False, False]  # read from the task models' manifests
    assert {"heads.mnist.weight", "heads.digits.bias"} <= set(art.state_dict)


def test_cluster_comparison_wires_the_8_task_pool_in_the_configs_order():
    """``recipes.reproduce dam_clip``: every artifact a stage names is built by an earlier stage, every config exists,
    and the merges' task models follow the tasks of the merge configs."""
    import yaml

    from recipes.reproduce import COMPARISONS, load_comparisons
    from tests.helpers import CONFIGS

    load_comparisons()
    comp = COMPARISONS["dam_clip"]
    seen: list[str] = []
    for stage in comp.stages:
        assert (CONFIGS / stage.config).exists() and (TINY / stage.config).exists()
        for arg in stage.overrides:
            for ref in arg.split("{artifact:")[1:]:
                assert ref.split("}")[0] in seen, f"{stage.key} uses {ref} before it is built"
        seen.append(stage.key)
    config = yaml.safe_load((CONFIGS / "merging" / "clip" / "dam.yaml").read_text())
    tasks = [t["init_args"]["name"] for t in config["data"]["init_args"]["tasks"]]
    assert tasks == ["sun397", "cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]
    models = config["model"]["init_args"]["task_models"]
    assert [m.split("/pool/")[1].split("/")[0].removesuffix("_badnets") for m in models] == tasks
    bd2 = next(s for s in comp.stages if s.key == "merge/bd2/dam/m0")
    assert "pool/eurosat_badnets" in " ".join(bd2.overrides) and "pool/gtsrb_badnets" in " ".join(bd2.overrides)
