"""The extension surface: subclasses forward ``**kwargs`` and jsonargparse still types, documents and validates the
parent's arguments; moved config keys name their new place; no subclass re-declares its parent's ``__init__``."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
import torch

from lightning_modules import ClassifierRecipe, MnistCNN
from lightning_modules.federated import AttackSchedule, FederatedRecipe, Neurotoxin
from recipes.cli import main
from tests.helpers import CONFIGS, TINY

FL = str(TINY / "fl" / "mnist_fedavg_naive.yaml")
NEUROTOXIN = str(CONFIGS / "fl" / "attacks" / "neurotoxin.yaml")
TAR = str(TINY / "tar" / "smollm2_tar.yaml")
ATTACK = "--model.init_args.attack.init_args"


def _parse(capsys, *args):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *args, "--print_config"])
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


def test_subclass_config_carries_the_parents_typed_arguments(capsys):
    code, out, _ = _parse(capsys, "--config", FL, "--config", NEUROTOXIN, f"{ATTACK}.poison_fraction=0.25",
                          f"{ATTACK}.schedule.end_round=4")  # fmt: skip
    assert code in (0, None)
    assert "class_path: lightning_modules.federated.Neurotoxin" in out
    assert "poison_fraction: 0.25" in out  # NaivePoisoning's argument, through PGDPoisoning and Neurotoxin
    assert "end_round: 4" in out and "start_round: 1" in out  # the experiment's schedule survives the overlay


@pytest.mark.parametrize(
    "arg, named",
    [
        (f"{ATTACK}.poison_fraction=lots", "poison_fraction"),  # a parent's argument, wrong type
        (f"{ATTACK}.schedule.end_rond=3", "end_rond"),  # a typo inside the injected schedule
        (f"{ATTACK}.end_rond=3", "end_rond"),  # a typo at the attack's level
    ],
)
def test_subclass_rejects_bad_parent_arguments_by_name(capsys, arg, named):
    code, _, err = _parse(capsys, "--config", FL, "--config", NEUROTOXIN, arg)
    assert code != 0 and named in err


def test_safeguard_variant_validates_the_base_arguments(capsys):
    code, _, err = _parse(capsys, "--config", TAR, "--model.init_args.retain_weight=heavy")
    assert code != 0 and "retain_weight" in err
    code, out, _ = _parse(capsys, "--config", TAR, "--model.init_args.retain_weight=0.5")
    assert code in (0, None) and "retain_weight: 0.5" in out and "tr_every: 2" in out


def test_help_of_a_subclass_documents_the_parents_arguments(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--model.help", "lightning_modules.tar.TAR"])
    out = capsys.readouterr().out
    assert "weight of the retain LM loss" in out  # Safeguard's docstring, two classes up
    assert "--model.mapping_seed" in out and "--model.tr_every" in out


@pytest.mark.parametrize("old", ["malicious_clients", "start_round", "end_round", "attack_rounds", "scale"])
def test_moved_schedule_keys_name_the_new_key(capsys, old):
    code, _, err = _parse(capsys, "--config", FL, f"{ATTACK}.{old}=1")
    assert code == 2
    assert f"model.init_args.attack.init_args.schedule.{old}" in err


def test_moved_key_in_a_config_file_names_the_new_key(capsys, tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("model:\n  init_args:\n    attack:\n      init_args: {malicious_clients: [0], end_round: 3}\n")
    code, _, err = _parse(capsys, "--config", FL, "--config", str(old))
    assert code == 2 and "attack.init_args.schedule.malicious_clients" in err and "schedule.end_round" in err


def test_base_recipe_saves_plain_hyperparameters_of_the_whole_init_chain():
    net = MnistCNN(num_classes=10, image_size=8, width=4, hidden=16)
    hparams = ClassifierRecipe(net, optimizer=torch.optim.SGD, label_smoothing=0.1).hparams
    assert hparams.label_smoothing == 0.1 and "net" not in hparams and "optimizer" not in hparams
    attack = Neurotoxin(schedule=AttackSchedule([0]), keep_ratio=0.9)
    recipe = FederatedRecipe(net=net, attack=attack, server_lr=0.5)
    assert set(recipe.hparams) == {"clients_per_round", "server_lr", "server_momentum", "buffers", "seed", "init_from",
                                   "benign_lr_knots", "post_attack_lr", "post_attack_from", "decay_rounds"}
    assert recipe.hparams.server_lr == 0.5


def test_schedule_decides_who_attacks_when_and_how_hard():
    s = AttackSchedule([2, 1], start_round=3, end_round=5, scale=4.0)
    assert [r for r in range(8) if s.is_active(r)] == [3, 4]
    assert [r for r in range(8) if AttackSchedule([0], attack_rounds=[6, 1]).is_active(r)] == [1, 6]
    assert not any(AttackSchedule([], start_round=0).is_active(r) for r in range(8))  # no attacker: never active
    attack = Neurotoxin(schedule=s)
    assert attack.malicious_clients == [2, 1] and attack.radius == float("inf")
    assert torch.equal(attack.post_process(torch.ones(3), None), torch.full((3,), 4.0))


# ------------------------------------------------------------------------------------ no re-declared __init__
def _project_classes():
    for package in ("lightning_modules", "datamodules", "callbacks"):
        pkg = importlib.import_module(package)
        for info in pkgutil.walk_packages(pkg.__path__, f"{package}."):
            module = importlib.import_module(info.name)
            for cls in vars(module).values():
                if inspect.isclass(cls) and cls.__module__ == module.__name__ and "__init__" in vars(cls):
                    yield cls


def _redeclared(cls) -> list[str]:
    parent = next((b for b in cls.__mro__[1:] if "__init__" in vars(b)), object)
    if not parent.__module__.split(".")[0] in ("lightning_modules", "datamodules", "callbacks"):
        return []
    own = inspect.signature(cls.__init__).parameters
    theirs = inspect.signature(parent.__init__).parameters
    first = next((n for n in own if n != "self"), None)
    return [n for n, p in own.items() if n in theirs and n not in ("self", "kwargs", first)
            and p.default == theirs[n].default]  # fmt: skip  (re-declared with the same default)


def test_no_subclass_redeclares_its_parents_arguments():
    offenders = {cls.__qualname__: bad for cls in _project_classes() if (bad := _redeclared(cls))}
    assert not offenders, f"forward **kwargs to super().__init__ instead of re-declaring: {offenders}"


@pytest.mark.parametrize(
    "key, cls, inherited, withheld",
    [
        ("model", "lightning_modules.AdaMerging", "--model.task_models", "--model.rule"),  # the coefficients are the rule
        ("model", "lightning_modules.FineMixing", "--model.suspect", None),  # two classes up, through EPUR
        ("model", "lightning_modules.W2SDefense", "--model.restore_best_val", None),
        ("data", "datamodules.TaskImageDataModule", "--data.num_workers", "--data.poisoning"),  # the task's
    ],
)
def test_a_subclass_offers_its_parents_arguments_except_those_it_sets(capsys, key, cls, inherited, withheld):
    with pytest.raises(SystemExit):
        main(["fit", f"--{key}.help", cls])
    out = capsys.readouterr().out
    assert inherited in out and (withheld is None or withheld not in out)
