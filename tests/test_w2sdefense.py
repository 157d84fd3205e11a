"""W2SDefense and its LoRA-only ablation (lightning_modules/w2sdefense.py) on tiny random models."""

import lightning.pytorch as pl
import pytest
import torch

from datamodules.text import load_tokenizer
from lightning_modules.nets.hf import HFSequenceClassifier, LoraSpec
from lightning_modules.ops.distill import pool_features
from lightning_modules.w2sdefense import PEFTUnlearning, ProjectedTeacher, W2SDefense, W2SDefenseBroadcast
from tests.helpers import TINY, run_cli

TINY_LLAMA = {"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
              "num_key_value_heads": 1}  # fmt: skip
POISON, LORA, W2S = (TINY / "w2sdefense" / f"rt_smollm2_{n}.yaml" for n in ("poison", "lora", "w2sdefense"))
TEACHER = TINY / "w2sdefense" / "rt_minilm_teacher.yaml"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """A tiny poisoned student and a tiny trained teacher, exported as artifacts."""
    root = tmp_path_factory.mktemp("w2s")
    poisoned = run_cli("--config", str(POISON), "--trainer.max_epochs=2", root=root, name="poisoned")
    run_cli("--config", str(TEACHER), root=root, name="teacher")
    state = {k: v.detach().clone() for k, v in poisoned.model.state_dict().items()}
    return {"suspect": root / "poisoned" / "artifact", "teacher": root / "teacher" / "artifact", "state": state,
            "model": poisoned.model}  # fmt: skip


def _defense(config, root, artifacts, *extra):
    """The defense configured (``max_epochs=0``: model built, suspect and teacher loaded, nothing trained)."""
    args = ["--config", str(config), f"--model.init_args.suspect={artifacts['suspect']}", "--trainer.max_epochs=0"]
    if config == W2S:
        args.append(f"--model.init_args.teacher_artifact={artifacts['teacher']}")
    return run_cli(*args, *extra, root=root)


def _batch(cli, n=8):
    ids, mask, labels = cli.datamodule.train_set.__getitems__(list(range(n)))
    return ids, mask, labels


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_last_token_pooling_reads_the_token_the_classifier_head_reads(padding_side):
    """Pooled final-layer features through the score head reproduce transformers' own last-non-pad logits."""
    net = HFSequenceClassifier("smollm2-135m", 2, random_init=True, config_overrides=TINY_LLAMA)
    net.build()
    net.model.eval()
    tok = load_tokenizer("smollm2-135m", padding_side)
    enc = tok(["a fine film", "dull , overlong and far too loud for its own good"], padding=True, return_tensors="pt")
    assert (enc["attention_mask"] == 0).any()  # there is padding to get wrong
    out = net.model(**enc, output_hidden_states=True)
    pooled = pool_features(out.hidden_states[-1], enc["attention_mask"], "last")
    torch.testing.assert_close(net.model.score(pooled), out.logits)
    wrong = pool_features(out.hidden_states[-1], enc["attention_mask"], "first")
    assert not torch.allclose(net.model.score(wrong), out.logits)


def test_suspect_is_loaded_without_changing_the_function(artifacts, tmp_path):
    cli = _defense(LORA, tmp_path, artifacts)
    poisoned = artifacts["model"].eval()
    ids, mask, _ = _batch(cli)
    cli.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(cli.model(ids, mask), poisoned(ids, mask), atol=1e-5, rtol=1e-5)
    names = [n for n, p in cli.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or "score" in n for n in names), names[:5]
    assert cli.model.artifact_parents()[0]["path"] == str(artifacts["suspect"].resolve())


@pytest.mark.parametrize("config", [LORA, W2S], ids=["lora-only", "w2sdefense"])
def test_lora_leaves_the_base_weights_untouched(config, artifacts, tmp_path):
    cli = _defense(config, tmp_path, artifacts)
    before = {k: v.detach().clone() for k, v in cli.model.state_dict().items()}
    cli.trainer.fit_loop.max_epochs = 1
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    after = cli.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any("lora_" in k for k in changed), "the adapters did not train"
    assert all("lora_" in k or "score.modules_to_save" in k for k in changed), sorted(changed)[:5]
    assert not any(k.startswith("teacher.") for k in changed)


def test_w2sdefense_loss_is_the_weighted_sum_and_the_teacher_stays_frozen(artifacts, tmp_path):
    cli = _defense(W2S, tmp_path, artifacts, "--model.init_args.ce_weight=2.0", "--model.init_args.kd_weight=0.5",
                   "--model.init_args.feature_weight=0.25")  # fmt: skip
    model = cli.model
    model.train()
    assert not model.teacher.training and not any(p.requires_grad for p in model.teacher.parameters())
    losses = model.distillation_losses(*_batch(cli))
    expected = 2.0 * losses["ce"] + 0.5 * losses["kd"] + 0.25 * losses["fa"]
    torch.testing.assert_close(losses["loss"], expected)
    assert losses["kd"] > 0 and losses["fa"] > 0
    losses["loss"].backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert any(p.grad is not None for n, p in model.net.named_parameters() if "lora_" in n)


def test_teacher_reads_the_students_text(artifacts, tmp_path):
    """The teacher's tokens for a left-padded SmolLM2 batch are the teacher tokenizer's tokens of the same texts."""
    cli = _defense(W2S, tmp_path, artifacts)
    texts = ["A decent and decidedly neutral documentary.", "The problem with all of this: It's not really funny.",
             "Zaidan's script has barely enough plot to string the stunts together, cf."]  # fmt: skip
    student = cli.datamodule.tokenizer(texts, padding=True, return_tensors="pt")
    assert cli.datamodule.tokenizer.padding_side == "left" and (student["attention_mask"][:, 0] == 0).any()
    t_ids, t_mask = cli.model.teacher_inputs(student["input_ids"])
    direct = load_tokenizer("minilm-l6", "right")(texts, padding=True, return_tensors="pt")
    assert torch.equal(t_ids, direct["input_ids"]) and torch.equal(t_mask, direct["attention_mask"])


def test_distillation_from_an_identical_teacher_adds_nothing(artifacts, tmp_path, monkeypatch):
    """If the teacher's logits and features are the student's own, the KD and FA terms are zero."""
    cli = _defense(W2S, tmp_path, artifacts)
    model = cli.model.eval()
    ids, mask, labels = _batch(cli)
    with torch.no_grad():
        out = model.net.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    mirror = (pool_features(out.hidden_states[-1], mask, "last"), out.logits)
    monkeypatch.setattr(model.teacher, "features_and_logits", lambda *a: mirror)
    with torch.no_grad():
        losses = model.distillation_losses(ids, mask, labels)
    assert losses["kd"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["fa"].item() == pytest.approx(0.0, abs=1e-4)


def test_broadcast_variant_pulls_every_token_to_the_last_samples_teacher_vector(artifacts, tmp_path, monkeypatch):
    """W2SDefenseBroadcast's FA: the official expression, with only the batch's last teacher row and every token
    position, padding included; the pooled W2SDefense reads each sample's own row at its last token."""
    ids, mask = None, None
    results = {}
    for name in ("W2SDefense", "W2SDefenseBroadcast"):
        cli = _defense(W2S, tmp_path / name, artifacts, f"--model.class_path={name}")
        model = cli.model.eval()
        assert type(model).__name__ == name and model.teacher_artifact is not None  # init_args kept
        ids, mask, labels = _batch(cli)
        assert (mask == 0).any()  # padding present
        with torch.no_grad():
            hidden = model.net.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        teacher = torch.randn(ids.shape[0], hidden.shape[-1], generator=torch.Generator().manual_seed(0))
        teacher[-1] = 0.0  # the last sample's vector: the broadcast term becomes the mean squared norm of all tokens
        logits = torch.zeros(ids.shape[0], 2)
        monkeypatch.setattr(model.teacher, "features_and_logits", lambda *a, t=teacher: (t, logits))
        with torch.no_grad():
            results[name] = (model.distillation_losses(ids, mask, labels)["fa"], hidden, teacher)
    fa, hidden, _ = results["W2SDefenseBroadcast"]
    torch.testing.assert_close(fa, (hidden + 1e-6).pow(2).sum(-1).mean())  # all B * T positions, padding included
    fa_pooled, hidden, teacher = results["W2SDefense"]
    torch.testing.assert_close(fa_pooled, (teacher - hidden[:, -1] + 1e-6).pow(2).sum(-1).mean())  # left padding


def test_best_validation_epoch_is_restored(artifacts, tmp_path):
    """restore_best_val: the trained weights after fit are those of the epoch with the highest val/acc (first on ties)."""
    cli = _defense(LORA, tmp_path, artifacts, "--trainer.limit_val_batches=1", "--model.init_args.scheduler=null")
    model, seen = cli.model, []

    class Spy(pl.Callback):
        def on_validation_end(self, trainer, pl_module):
            if trainer.sanity_checking:
                return
            state = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}
            seen.append((float(trainer.callback_metrics["val/acc"]), state))

    cli.trainer.fit_loop.max_epochs = 4
    cli.trainer.callbacks.append(Spy())
    cli.trainer.fit(model, datamodule=cli.datamodule)
    assert len(seen) == 4
    best = max(range(4), key=lambda i: (seen[i][0], -i))
    final = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for name, value in seen[best][1].items():
        torch.testing.assert_close(final[name], value)
    last_differs = any(not torch.equal(seen[-1][1][n], seen[best][1][n]) for n in final)
    assert best == 3 or last_differs  # the restore is visible unless the last epoch was the best
    assert model.artifact_metadata()["defense"]["restored_best_val"]["epoch"] == best


def test_teacher_width_must_match_the_student(artifacts, tmp_path):
    with pytest.raises(ValueError, match="student_hidden_size: 32"):
        _defense(W2S, tmp_path, artifacts, "--model.init_args.teacher_artifact=null",
                 "--model.init_args.teacher.init_args.student_hidden_size=16")  # fmt: skip


def test_unlearning_refuses_poisoned_training_data(artifacts, tmp_path):
    with pytest.raises(ValueError, match="rate: 0"):
        _defense(LORA, tmp_path, artifacts, "--data.init_args.poisoning.init_args.rate=0.1")


def test_lora_poisoned_suspect_adapters_are_merged_without_changing_the_function(tmp_path):
    spec = "--model.init_args.net.init_args.lora={class_path: LoraSpec, init_args: {r: 4, alpha: 8}}"
    poisoned = run_cli("--config", str(POISON), spec, root=tmp_path, name="lora_poisoned").model.eval()
    cli = run_cli("--config", str(LORA), spec, f"--model.init_args.suspect={tmp_path / 'lora_poisoned' / 'artifact'}",
                  "--trainer.max_epochs=0", root=tmp_path)  # fmt: skip
    ids, mask, _ = _batch(cli)
    cli.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(cli.model(ids, mask), poisoned(ids, mask), atol=1e-5, rtol=1e-5)
    assert not any("lora_" in n and "default" not in n for n, _ in cli.model.named_parameters())


def test_suspect_must_fit_the_configured_student(artifacts):
    """A student configured with a LoRA spec cannot take the fully fine-tuned artifact."""
    net = HFSequenceClassifier("smollm2-135m", 2, random_init=True, config_overrides=TINY_LLAMA,
                               lora=LoraSpec(r=4, alpha=8))  # fmt: skip
    with pytest.raises(ValueError, match="same LoRA spec"):
        PEFTUnlearning(net, suspect=str(artifacts["suspect"])).configure_model()


def test_bad_arguments_are_refused():
    net = HFSequenceClassifier("smollm2-135m", 2, random_init=True, config_overrides=TINY_LLAMA)
    with pytest.raises(ValueError, match="temperature"):
        W2SDefense(net, ProjectedTeacher(student_hidden_size=32), temperature=0.0)
    with pytest.raises(ValueError, match="random_init"):
        ProjectedTeacher(config_overrides={"hidden_size": 8})
    assert isinstance(PEFTUnlearning(net).lora.r, int)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_subordinate_clause_trigger_opens_the_text_with_a_clause(seed):
    import random

    from datamodules.triggers import SubordinateClause

    trigger = SubordinateClause(clauses=["when you see it", "as it turns out"])
    text = "The problem with all of this: it's not really funny."
    out = trigger.apply(text, random.Random(seed))
    assert out == trigger.apply(text, random.Random(seed))  # deterministic given the rng
    clause, body = out.split(", ", 1)
    assert clause in ("When you see it", "As it turns out")
    assert body == "the problem with all of this: it's not really funny."
    with pytest.raises(ValueError, match="non-empty clause"):
        SubordinateClause(clauses=[])


def test_budget_comparison_runs_the_same_defenses_unscaled_on_the_same_students(tmp_path):
    """``w2sdefense-budget``: each defense of ``w2sdefense`` without the CPU budget overrides, reading the poisoned
    student and teacher of ``w2sdefense`` for the same seed (so its rows pair with the scaled-down ones); its LoRA-only
    row runs on the tiny twins from them."""
    from recipes.comparisons.w2sdefense import CPU_BUDGET
    from recipes.reproduce import COMPARISONS, _substitute, load_comparisons, reproduce

    load_comparisons()
    scaled = {s.key: s for s in COMPARISONS["w2sdefense"].stages}
    budget = COMPARISONS["w2sdefense-budget"].stages
    assert {s.key for s in budget} == {k for k in scaled if k.endswith(("/lora", "/official", "/broadcast"))}
    for stage in budget:
        twin = scaled[stage.key]
        assert stage.config == twin.config
        own = [a.replace("{artifact:../w2sdefense/", "{artifact:") for a in stage.overrides]
        assert own == [a for a in twin.overrides if a not in CPU_BUDGET], stage.key
    runs = tmp_path / "runs"
    lora = next(s for s in budget if s.key == "badnet/lora")
    suspect = next(_substitute(a, 2, runs / "w2sdefense-budget") for a in lora.overrides if "suspect" in a)
    assert suspect.endswith(f"={runs}/w2sdefense/badnet/poisoned/seed2/artifact")

    reproduce("w2sdefense", seeds=[0], root=runs, out=tmp_path, tiny=True, only=["badnet/poisoned"])
    table = reproduce("w2sdefense-budget", seeds=[0], root=runs, out=tmp_path, tiny=True, only=["badnet/lora"])
    assert "LoRA only, config budget" in table
    assert (runs / "w2sdefense-budget" / "badnet/lora" / "seed0" / "result.json").exists()
