"""Every config parses, every experiment config has a tiny twin, and every tiny twin runs on CPU."""

import pytest
import torch
import yaml

from recipes.cli import main
from tests.helpers import CONFIGS, TINY, artifact_of, run_cli

OVERLAY_DIRS = ("trainer", "defenses", "attacks")  # partial configs stacked after an experiment config
EXPERIMENTS = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent.name not in OVERLAY_DIRS)
TRAINERS = sorted((CONFIGS / "trainer").glob("*.yaml"))
FL_OVERLAYS = sorted((CONFIGS / "fl").glob("[ad][te]*s/*.yaml"))
TWINS = sorted(TINY.rglob("*.yaml"))


def _ids(paths):
    return [str(p.relative_to(p.parents[1])) for p in paths]


@pytest.mark.parametrize("config", EXPERIMENTS, ids=_ids(EXPERIMENTS))
def test_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_.value.code in (0, None)
    assert "class_path" in capsys.readouterr().out


@pytest.mark.parametrize("trainer", TRAINERS, ids=_ids(TRAINERS))
def test_trainer_configs_stack_on_an_experiment(trainer, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(trainer), "--config", str(EXPERIMENTS[0]), "--print_config"])
    out = capsys.readouterr().out
    assert "accelerator" in out


@pytest.mark.parametrize("overlay", FL_OVERLAYS, ids=_ids(FL_OVERLAYS))
def test_fl_attack_and_defense_overlays_run_on_the_tiny_federation(overlay, tmp_path):
    """Every attack/defense overlay stacks on the federated experiment and runs its rounds end to end."""
    cli = run_cli("--config", str(TINY / "fl" / "mnist_fedavg_naive.yaml"), "--config", str(overlay), root=tmp_path)
    assert cli.trainer.global_step == cli.trainer.max_steps
    assert torch.isfinite(cli.trainer.callback_metrics["val/acc"])
    role = "aggregator" if overlay.parent.name == "defenses" else "attack"
    spec = yaml.safe_load(overlay.read_text())["model"]["init_args"][role]
    expected = "NoneType" if spec is None else spec["class_path"].rsplit(".", 1)[-1]
    assert type(getattr(cli.model, role)).__name__ == expected


@pytest.mark.parametrize("config", EXPERIMENTS, ids=_ids(EXPERIMENTS))
def test_every_config_has_a_tiny_twin(config):
    assert (TINY / config.relative_to(CONFIGS)).exists(), f"add a tiny twin at tests/configs/{config.relative_to(CONFIGS)}"


@pytest.mark.parametrize("twin", TWINS, ids=_ids(TWINS))
def test_tiny_twin_fits_tests_and_exports(twin, tmp_path):
    cli = run_cli("--config", str(twin), root=tmp_path)
    results = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    assert results and "test/acc" in results[0]
    art = artifact_of(tmp_path)
    assert art.manifest["recipe"].endswith(type(cli.model).__name__)
    assert "val/acc" in art.manifest["metrics"]
    assert set(art.state_dict) == set(cli.model.artifact_state_dict())


def test_config_typo_names_the_key(capsys):
    twin = TWINS[0]
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(twin), "--model.init_args.optimiser=x", "--print_config"])
    assert exit_.value.code != 0
    assert "optimiser" in capsys.readouterr().err


def test_wrong_type_is_rejected(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(TWINS[0]), "--data.init_args.batch_size=lots", "--print_config"])
    assert exit_.value.code != 0
    assert "batch_size" in capsys.readouterr().err


def test_lora_trains_adapters_and_leaves_base_weights(tmp_path):
    twin = TINY / "backdoor" / "rt_smollm2_lora_badnet.yaml"
    from recipes.cli import main as cli_main

    cli = cli_main(["fit", "--config", str(twin), f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=0"])
    before = {k: v.clone() for k, v in cli.model.state_dict().items()}
    cli.trainer.fit_loop.max_epochs = 1
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    after = cli.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k or "score" in k for k in changed), sorted(changed)[:5]
