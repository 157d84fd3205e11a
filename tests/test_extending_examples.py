"""The worked examples of docs/extending.md run from tiny configs that name them by import path, and their one knob
does what the doc says."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from lightning_modules import MEMIT, SuspectFineTuning
from lightning_modules.ops import merging as merge_ops
from tests.examples.extending import (
    CappedGradientAscent, CoordinateClipping, FocalClassifier, InterpolatedFineTuning, NoisyPoisoning,
    NormCappedTaskArithmetic, TrustRegionMEMIT,
)
from tests.helpers import REPO, TINY, artifact_of, run_cli

EXAMPLES = REPO / "tests" / "examples"
FL = str(TINY / "fl" / "mnist_fedavg_naive.yaml")


def _run(tmp_path, *configs, name="run", extra=()):
    args = [a for c in configs for a in ("--config", str(c))]
    return run_cli(*args, *extra, root=tmp_path, name=name)


def test_classifier_example_runs_and_its_knob_is_the_loss(tmp_path):
    cli = _run(tmp_path, TINY / "backdoor" / "mnist_badnets.yaml", EXAMPLES / "focal_classifier.yaml")
    assert type(cli.model) is FocalClassifier and cli.model.gamma == 1.5
    assert cli.model.net.body[0].out_channels == 4  # the experiment's net survives the class_path change
    assert torch.isfinite(cli.trainer.callback_metrics["val/acc"])
    logits, labels = torch.randn(6, 10), torch.randint(0, 10, (6,))
    plain = FocalClassifier(net=cli.model.net, gamma=0.0)
    torch.testing.assert_close(plain.loss(logits, labels), F.cross_entropy(logits, labels))
    assert cli.model.loss(logits, labels) < plain.loss(logits, labels)  # (1 - p)^gamma < 1 down-weights


def test_federated_attack_example_keeps_the_schedule_and_adds_its_noise(tmp_path):
    cli = _run(tmp_path, FL, EXAMPLES / "noisy_poisoning.yaml")
    attack = cli.model.attack
    assert type(attack) is NoisyPoisoning and attack.noise_std == 0.05
    assert (attack.malicious_clients, attack.schedule.start_round, attack.schedule.end_round) == ([0], 1, 3)
    assert cli.trainer.global_step == 4
    ctx = SimpleNamespace(generator=torch.Generator().manual_seed(0))
    noise = attack.post_process(torch.zeros(20_000), ctx)
    assert abs(float(noise.std()) - 0.05) < 0.002


def test_aggregator_example_bounds_every_coordinate_of_the_server_step(tmp_path):
    cli = _run(tmp_path, FL, EXAMPLES / "coordinate_clipping.yaml")
    assert type(cli.model.aggregator) is CoordinateClipping and cli.model.aggregator.weighted  # FedAvg's default
    step = cli.model.last_server_update.abs()
    assert float(step.max()) == pytest.approx(0.001, rel=1e-5)  # clamped, and the clamp was active


def test_safeguard_example_with_the_cap_below_the_loss_only_retains(tmp_path):
    """A random model's forget loss (~10.8 nats) is above cap 10.5: the capped ascent gets no forget gradient, so it
    trains exactly like gradient ascent with forget_weight 0."""
    base = TINY / "tar" / "smollm2_gradient_ascent.yaml"
    quiet = ["--trainer.callbacks=[]"]
    capped = _run(tmp_path, base, EXAMPLES / "capped_gradient_ascent.yaml", name="capped", extra=quiet)
    assert type(capped.model) is CappedGradientAscent and capped.model.cap == 10.5
    retain_only = _run(tmp_path, base, name="retain_only", extra=[*quiet, "--model.init_args.forget_weight=0"])
    ascent = _run(tmp_path, base, name="ascent", extra=quiet)
    for (name, a), b, c in zip(capped.model.artifact_state_dict().items(), retain_only.model.artifact_state_dict().values(),
                               ascent.model.artifact_state_dict().values()):  # fmt: skip
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert any(not torch.equal(a, c) for a, c in zip(capped.model.artifact_state_dict().values(),
                                                     ascent.model.artifact_state_dict().values()))  # fmt: skip


def test_defense_example_interpolates_the_suspect_towards_the_pretrained_weights(tmp_path):
    base, only_purify = TINY / "finemixing" / "rt_minilm_finetune.yaml", ["--trainer.max_epochs=0"]
    plain = _run(tmp_path, base, name="plain", extra=only_purify)  # SuspectFineTuning: the suspect as it is
    cli = _run(tmp_path, base, EXAMPLES / "interpolated_finetuning.yaml", name="interpolated", extra=only_purify)
    assert type(plain.model) is SuspectFineTuning and type(cli.model) is InterpolatedFineTuning
    assert cli.model.alpha == 0.25 and cli.model.require_clean_data  # the base's default passes through
    suspect, pre = dict(plain.model.net.named_parameters()), cli.model.pretrained_state
    for name, w in cli.model.net.named_parameters():
        torch.testing.assert_close(w, pre[name] + 0.25 * (suspect[name] - pre[name]), msg=name)
    manifest = artifact_of(tmp_path, "interpolated").manifest
    assert manifest["defense"] == {"type": "InterpolatedFineTuning", "alpha": 0.25}


def test_merging_example_caps_each_task_vector_before_the_sum(tmp_path):
    """(``merging`` in the name: the session fixture builds the tiny merge pool for it.)"""
    cli = _run(tmp_path, TINY / "merging" / "pool_task_arithmetic.yaml", EXAMPLES / "norm_capped_task_arithmetic.yaml")
    rule = cli.model.rule
    assert type(rule) is NormCappedTaskArithmetic and (rule.max_norm, rule.scaling) == (0.15, 0.3)  # the twin's scaling
    norms = [float(torch.stack([t.norm() for t in tv.values()]).norm()) for tv in cli.model.task_vectors]
    assert max(norms) > 0.15, f"the cap should bind for some task vector of the tiny pool: {norms}"
    expected = dict(cli.model.pretrained_state)
    for tv, norm in zip(cli.model.task_vectors, norms):
        expected = merge_ops.add(expected, {k: 0.3 * min(1.0, 0.15 / norm) * t for k, t in tv.items()})
    merged = cli.model.merged_state()
    for name in expected:
        torch.testing.assert_close(merged[name], expected[name], msg=name)
    assert torch.isfinite(cli.trainer.callback_metrics["val/acc"])


def test_editor_example_clamps_delta_to_the_absolute_norm(tmp_path):
    cli = _run(tmp_path, TINY / "namet" / "smollm2_memit.yaml", EXAMPLES / "trust_region_memit.yaml")
    editor = cli.model
    assert type(editor) is TrustRegionMEMIT and editor.max_delta_norm == 0.01 and editor.hparams.v_num_grad_steps == 5
    assert editor.edit_summary["delta_over_clamp"] == pytest.approx(1.0, abs=1e-4)  # on the boundary: the cap binds
    with torch.enable_grad():
        delta, h_init, _ = editor.compute_targets(cli.datamodule.records[:2])
    assert float(delta.norm(dim=-1).max()) <= 0.01 * (1 + 1e-5)
    assert float(MEMIT.max_norm(editor, h_init).min()) > 0.01  # MEMIT's own radius alone would allow more
