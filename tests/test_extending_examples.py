"""The worked examples of docs/extending.md run from tiny configs that name them by import path, and their one knob
does what the doc says."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tests.examples.extending import CappedGradientAscent, CoordinateClipping, FocalClassifier, NoisyPoisoning
from tests.helpers import REPO, TINY, run_cli

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
