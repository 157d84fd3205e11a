"""Behaviour of the Fine-mixing / E-PUR defenses on a tiny poisoned artifact (random 2-layer BERT, real tokenizer).

rho = 1 gives back the suspect and rho = 0 the pretrained weights; E-PUR changes only the rows it reports;
token frequencies come from the clean training set alone; the defenses chain onto a poisoned artifact.
"""

from __future__ import annotations

import pytest
import torch

from lightning_modules.ops import finemixing as ops
from foundation.artifacts import load_artifact
from recipes.reproduce import load_comparisons, reproduce
from tests.helpers import TINY, artifact_of, run_cli

POISON = str(TINY / "backdoor" / "rt_minilm_badnet.yaml")
FM = str(TINY / "finemixing" / "rt_minilm_finemixing.yaml")
EPUR_CFG = str(TINY / "finemixing" / "rt_minilm_epur.yaml")
FT = str(TINY / "finemixing" / "rt_minilm_finetune.yaml")
NO_TRAINING = ["--trainer.max_epochs=0"]
FIXED_RHO = ["--model.init_args.rho_candidates=null"]


@pytest.fixture(scope="module")
def suspect(tmp_path_factory):
    """A tiny backdoored classifier artifact (the rare-word twin, 10% poisoned)."""
    root = tmp_path_factory.mktemp("poisoned")
    run_cli("--config", POISON, root=root, name="poisoned")
    return root / "poisoned" / "artifact"


def _defend(config, suspect, root, *args, name="run"):
    return run_cli(
        "--config", config, f"--model.init_args.suspect={suspect}", "--model.init_args.reference=null",
        *args, root=root, name=name,
    )


def _net_state(cli):
    return {k: v.detach().cpu() for k, v in cli.model.net.state_dict().items()}


def _suspect_weights(path):
    return {k.removeprefix("net."): v for k, v in load_artifact(path).state_dict.items()}


def test_rho_one_returns_the_finetuned_weights(suspect, tmp_path):
    cli = _defend(FM, suspect, tmp_path, *NO_TRAINING, *FIXED_RHO, "--model.init_args.rho=1.0")
    state, expected = _net_state(cli), _suspect_weights(suspect)
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in state)


@pytest.mark.parametrize("head", ["reinit", "keep"])
def test_rho_zero_returns_the_pretrained_weights(suspect, tmp_path, head):
    cli = _defend(
        FM, suspect, tmp_path, *NO_TRAINING, *FIXED_RHO, "--model.init_args.rho=0.0",
        f"--model.init_args.head={head}",
    )
    state, pre, sus = _net_state(cli), cli.model.pretrained_state, _suspect_weights(suspect)
    params = dict(cli.model.net.named_parameters())
    differs = [k for k in params if not torch.equal(pre[k], sus[k])]
    assert len(differs) == len(params), "the tiny suspect should differ from the pretrained weights everywhere"
    for name in params:
        source = sus if head == "keep" and "classifier" in name else pre
        assert torch.equal(state[name], source[name]), name
    # testing after fit must not reload the suspect (Lightning calls configure_model again)
    cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    assert torch.equal(cli.model.net.state_dict()["model.bert.encoder.layer.0.output.dense.weight"].cpu(),
                       pre["model.bert.encoder.layer.0.output.dense.weight"])


def test_intermediate_rho_keeps_about_rho_of_the_entries(suspect, tmp_path):
    cli = _defend(FM, suspect, tmp_path, *NO_TRAINING, *FIXED_RHO, "--model.init_args.rho=0.3")
    state, pre, sus = _net_state(cli), cli.model.pretrained_state, _suspect_weights(suspect)
    kept = changed = 0
    for name, _ in cli.model.net.named_parameters():
        moved = sus[name] != pre[name]  # entries the poisoned fine-tuning changed
        assert torch.equal(state[name][~moved], pre[name][~moved])
        assert bool(((state[name] == sus[name]) | (state[name] == pre[name])).all()), "entries are taken, not blended"
        kept += int((state[name][moved] == sus[name][moved]).sum()) if "classifier" not in name else 0
        changed += int(moved.sum()) if "classifier" not in name else 0
    assert changed > 10_000 and abs(kept / changed - 0.3) < 0.02
    assert cli.model.defense_record["rho"] == 0.3


def test_epur_touches_only_the_chosen_rows(suspect, tmp_path):
    cli = _defend(EPUR_CFG, suspect, tmp_path, *NO_TRAINING, "--model.init_args.top_n=7")
    state, pre, sus = _net_state(cli), cli.model.pretrained_state, _suspect_weights(suspect)
    name = "model.bert.embeddings.word_embeddings.weight"
    rows = cli.model.defense_record["epur_rows"]
    assert len(rows) == 7 and len(cli.model.defense_record["epur_tokens"]) == 7
    others = torch.ones(len(sus[name]), dtype=torch.bool)
    others[rows] = False
    assert torch.equal(state[name][rows], pre[name][rows])
    assert not torch.equal(sus[name][rows], pre[name][rows])
    assert torch.equal(state[name][others], sus[name][others])
    assert all(torch.equal(state[k], sus[k]) for k in state if k != name), "E-PUR changed more than the embeddings"


def test_epur_frequencies_come_from_the_clean_training_set_only(suspect, tmp_path, monkeypatch):
    seen = {}
    original = ops.epur_scores

    def spy(pre, ft, frequencies, *args, **kwargs):
        seen["frequencies"] = frequencies.clone()
        return original(pre, ft, frequencies, *args, **kwargs)

    monkeypatch.setattr(ops, "epur_scores", spy)
    cli = _defend(EPUR_CFG, suspect, tmp_path, *NO_TRAINING)
    dm = cli.datamodule
    ids, mask, _ = dm.train_set.tensors
    freqs = seen["frequencies"]
    assert int(freqs.sum()) == int(mask.sum()), "every non-padding training token is counted exactly once"
    assert torch.equal(freqs, torch.bincount(ids[mask.bool()], minlength=len(freqs)))
    trigger_ids = dm.tokenizer.convert_tokens_to_ids(["cf", "mn", "bb"])
    assert dm.tokenizer.unk_token_id not in trigger_ids
    triggered_ids = torch.cat([dm.val_sets[1].tensors[0].flatten(), dm.test_sets[1].tensors[0].flatten()])
    assert any(bool((triggered_ids == i).any()) for i in trigger_ids), "the triggered sets carry the trigger"
    assert all(int(freqs[i]) == 0 for i in trigger_ids), "the triggered evaluation sets must not be counted"


def test_a_poisoned_finetuning_set_is_refused(suspect, tmp_path):
    with pytest.raises(ValueError, match="poisoned"):
        _defend(FT, suspect, tmp_path, "--data.init_args.poisoning.init_args.rate=0.1",
                "--data.init_args.train_size=96")


def test_rho_search_follows_the_validation_rule(suspect, tmp_path, monkeypatch):
    from lightning_modules import FineMixing

    calls = []

    def fake_accuracy(self):  # the suspect scores 0.8; the search's candidates 0.6, 0.79, 0.8 by call order
        calls.append(len(calls))
        return [0.8, 0.6, 0.79, 0.8][len(calls) - 1]

    monkeypatch.setattr(FineMixing, "clean_val_accuracy", fake_accuracy)
    cli = _defend(FM, suspect, tmp_path, *NO_TRAINING, "--model.init_args.rho_candidates=[0.6,0.2,0.4]",
                  "--model.init_args.max_acc_drop=0.02")
    record = cli.model.defense_record
    assert record["rho"] == 0.4, "the smallest rho within 2 points of the suspect's validation accuracy"
    assert [r for r, _ in record["rho_search"]["tried"]] == [0.2, 0.4], "the search stops at the first pass"
    assert record["rho_search"]["suspect_val_acc"] == 0.8


def test_each_rho_candidate_is_fine_tuned_with_the_full_budget(suspect, tmp_path, monkeypatch):
    from lightning_modules import FineMixing

    epochs = []
    original = FineMixing.finetune_copy

    def spy(self, n):
        epochs.append(n)
        return original(self, n)

    monkeypatch.setattr(FineMixing, "finetune_copy", spy)
    cli = _defend(FM, suspect, tmp_path, "--trainer.max_epochs=2", "--model.init_args.rho_candidates=[0.2,0.4]",
                  "--model.init_args.max_acc_drop=1.0")
    assert epochs == [2], "search_epochs: null gives the first (passing) candidate the run's 2 epochs"
    record = cli.model.defense_record
    assert record["rho"] == 0.2 and record["rho_search"]["search_epochs"] == 2
    assert record["rho_search"]["val_size"] == len(cli.datamodule.val_sets[0])
    epochs.clear()
    _defend(FM, suspect, tmp_path, "--trainer.max_epochs=2", "--model.init_args.rho_candidates=[0.2,0.4]",
            "--model.init_args.search_epochs=1", "--model.init_args.max_acc_drop=-1.0", name="short")
    assert epochs == [1, 1], "an explicit search_epochs is kept; no candidate passes, so both are tried"


def test_defense_chains_onto_the_poisoned_artifact(suspect, tmp_path):
    cli = _defend(FM, suspect, tmp_path, "--model.init_args.top_n=10")
    results = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    assert "test/asr" in results[1] and "test/acc" in results[0]
    manifest = artifact_of(tmp_path).manifest
    assert manifest["parents"][0]["sha256"] == load_artifact(suspect).sha256
    assert manifest["defense"]["type"] == "FineMixing" and 0 < manifest["defense"]["rho"] < 1
    assert len(manifest["defense"]["epur_rows"]) == 10


@pytest.mark.slow
def test_finemixing_comparison_on_tiny_twins(tmp_path):
    comp = load_comparisons()["finemixing"]
    table = reproduce("finemixing", seeds=[0], root=tmp_path / "runs", out=tmp_path / "docs", tiny=True)
    for stage in comp.stages:
        assert stage.label in table
    se_table = (tmp_path / "docs" / "finemixing-se.md").read_text()
    assert se_table.count("±") == 2 * len(comp.stages), "every stage gets CA and ASR with a standard error"
    for stage in comp.stages:
        manifest = artifact_of(tmp_path / "runs" / "finemixing" / stage.key, "seed0").manifest
        if stage.key not in ("badnet/poisoned", "clean/suspect", "insent/poisoned"):
            assert manifest["parents"], f"{stage.key} must start from its suspect (or, for EP, victim) artifact"


def test_a_reference_network_supplies_the_pretrained_weights(tmp_path):
    # the twin's own setting: net's built weights are the suspect, `reference` (another random draw) is w_pre
    cli = run_cli("--config", FM, *NO_TRAINING, *FIXED_RHO, "--model.init_args.rho=0.0",
                  "--model.init_args.head=reinit", root=tmp_path)
    assert cli.model.hparams.suspect is None and cli.model._parents == []
    state, pre = _net_state(cli), cli.model.pretrained_state
    assert all(torch.equal(state[k], pre[k]) for k, _ in cli.model.net.named_parameters())
    untouched = run_cli("--config", FM, *NO_TRAINING, *FIXED_RHO, "--model.init_args.rho=1.0", root=tmp_path, name="r1")
    name = "model.bert.encoder.layer.1.attention.self.query.weight"
    assert not torch.equal(untouched.model.net.state_dict()[name].cpu(), untouched.model.pretrained_state[name])


def test_suspects_never_train_on_the_defenses_validation_snippets():
    # the seeded split takes validation first, then training: a suspect that holds out fewer validation snippets than
    # a defense would have trained on part of the defense's validation set, inflating the rule's reference accuracy
    import inspect

    import yaml

    from datamodules.text import TextClassificationDataModule
    from tests.helpers import CONFIGS

    default = inspect.signature(TextClassificationDataModule).parameters

    def size(stage, key):
        given = [a.split("=", 1)[1] for a in stage.overrides if a.startswith(f"--data.init_args.{key}=")]
        config = yaml.safe_load((CONFIGS / stage.config).read_text())["data"]["init_args"]
        return int(given[-1]) if given else config.get(key, default[key].default)

    comp = load_comparisons()["finemixing"]
    suspects = [s for s in comp.stages if s.key in ("badnet/poisoned", "clean/suspect", "insent/poisoned")]
    defenses = [s for s in comp.stages if "suspect=" in " ".join(s.overrides)]
    assert suspects and defenses
    largest = max(size(s, "val_size") for s in defenses)
    assert largest >= 1000, "the rule scores candidates on >= 1000 validation snippets"
    assert all(size(s, "val_size") >= largest for s in suspects)
