"""TAR and its baselines on a tiny random Llama: the inner loop's snapshot/restore is exact, the adversary's
optimizer never outlives its outer step, memory buffers are reused, the retain distance is zero for the reference
itself; the split model matches the plain HF forward; the harness attacks copies only."""

from __future__ import annotations

import gc
import weakref

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.core.optimizer import LightningOptimizer

from callbacks.tamper import TamperingHarness, load_attacks
from datamodules.tar_facts import (
    QUESTION_SPLITS,
    SENTENCE_SPLITS,
    TamperFactsDataModule,
)
from lightning_modules.nets.split_lm import SplitCausalLM
from lightning_modules.ops import tar as ops
from lightning_modules.tamper import TamperAttack, evaluate, lm_loss, run_attack
from lightning_modules.tar import TAR, GradientAscent
from tests.helpers import CONFIGS, TINY

TINY_LLAMA = {"num_hidden_layers": 4, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
              "num_key_value_heads": 1}  # fmt: skip


def tiny_net(trainable_layers: int | None = 2, cache: bool = True) -> SplitCausalLM:
    net = SplitCausalLM(random_init=True, config_overrides=TINY_LLAMA, trainable_layers=trainable_layers,
                        cache_trunk=cache, bos_token="<|endoftext|>")  # fmt: skip
    torch.manual_seed(0)  # the same random trunk every time (an artifact holds the trained blocks only)
    net.build()
    return net


@pytest.fixture(scope="module")
def dm():
    data = TamperFactsDataModule(forget_train_size=8, forget_meta_size=4, attack_size=6, forget_eval_size=8,
                                 retain_eval_size=8, batch_size=4, eval_batch_size=4)  # fmt: skip
    data.setup()
    return data


ADVERSARIES = [TamperAttack(name="adamw", lr=1e-2, steps=4, batch_size=4),
               TamperAttack(name="sgd_switch", optimizer="sgd", lr=1e-1, steps=4, batch_size=4,
                            data="retain_then_forget")]  # fmt: skip


class ProbedTAR(TAR):
    """Records, at every outer step: the weights when it starts, whether the inner loop moved them, whether they
    are back when the outer optimizer steps, and the adversary optimizers it made."""

    def setup(self, stage):
        self.records, self.inner_refs, self.inner_state_at_first_step, self.snapshot_ids = [], [], [], []

    def outer_step(self, batch):
        self.start = [p.detach().clone() for p in self.net.trainable_parameters()]
        self.inner_moved = False
        super().outer_step(batch)
        self.snapshot_ids.append([id(b) for b in self._snapshot] + [id(g) for g in self._tr_grad])

    def make_adversary_optimizer(self, adversary, params):
        # the previous outer step's optimizer must already be gone
        gc.collect()
        assert all(ref() is None for ref in self.inner_refs), "an adversary optimizer outlived its outer step"
        opt = super().make_adversary_optimizer(adversary, params)
        self.inner_refs.append(weakref.ref(opt))
        step = opt.step
        first = [True]

        def probed_step(closure=None):
            if first[0]:
                self.inner_state_at_first_step.append(len(opt.state))
                first[0] = False
            out = step(closure)
            moved = any(not torch.equal(p, s) for p, s in zip(self.net.trainable_parameters(), self.start))
            self.inner_moved = self.inner_moved or moved
            return out

        opt.step = probed_step
        return opt

    def configure_optimizers(self):
        opt = super().configure_optimizers()
        step = opt.step

        def probed_step(closure=None):
            restored = all(torch.equal(p, s) for p, s in zip(self.net.trainable_parameters(), self.start))
            self.records.append({"restored": restored, "inner_moved": self.inner_moved})
            return step(closure)

        opt.step = probed_step
        return opt


def fit(model, dm, steps: int) -> L.Trainer:
    trainer = L.Trainer(max_steps=steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(model, datamodule=dm)
    return trainer


def test_inner_loop_weights_are_restored_exactly_before_the_outer_update(dm):
    model = ProbedTAR(tiny_net(), ADVERSARIES, tr_every=2, meta_batch_size=4,
                      optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))  # fmt: skip
    fit(model, dm, steps=3)
    assert len(model.records) == 3
    assert all(r["inner_moved"] for r in model.records), "the adversary never changed the weights: nothing tested"
    assert all(r["restored"] for r in model.records)
    after = model.net.trainable_parameters()
    assert any(not torch.equal(p, s) for p, s in zip(after, model.start)), "the outer step changed nothing"


def test_adversary_optimizer_state_does_not_leak_and_buffers_are_reused(dm):
    model = ProbedTAR(tiny_net(), ADVERSARIES, tr_every=2, meta_batch_size=4)
    fit(model, dm, steps=4)
    assert model.inner_state_at_first_step == [0, 0, 0, 0]  # every adversary starts from an empty state
    gc.collect()
    assert all(ref() is None for ref in model.inner_refs)
    # the snapshot and TR-gradient buffers are allocated once: memory stays flat across outer steps
    assert all(ids == model.snapshot_ids[0] for ids in model.snapshot_ids)
    live = [o for o in gc.get_objects() if isinstance(o, torch.optim.Optimizer) and not isinstance(o, LightningOptimizer)
            and any(p is q for g in o.param_groups for p in g["params"] for q in model.net.parameters())]  # fmt: skip
    assert len(live) == 1  # only the outer optimizer (LightningOptimizer is its wrapper)


def test_retain_distance_is_zero_for_the_reference_model_itself(dm):
    model = TAR(tiny_net(), ADVERSARIES, tr_every=2)
    model.after_build()
    ids, mask, _ = dm.sample("retain_train", 4, torch.Generator().manual_seed(0))
    _, hidden = model.net(ids, mask)
    _, ref = model.reference(ids, mask)
    assert ops.representation_distance(hidden, ref, mask).item() == 0.0
    with torch.no_grad():
        model.net.trainable_parameters()[0].add_(0.1)
    _, hidden = model.net(ids, mask)
    assert ops.representation_distance(hidden, ref, mask).item() > 0.0


def test_tar_starts_from_an_artifact_and_keeps_the_original_as_reference(dm, tmp_path):
    from foundation.artifacts import save_artifact

    source = GradientAscent(tiny_net(), optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    fit(source, dm, steps=2)
    save_artifact(tmp_path / "ga", source.artifact_state_dict(), {"recipe": "GradientAscent"})
    model = TAR(tiny_net(), ADVERSARIES, tr_every=2, init_from=str(tmp_path / "ga"))
    model.configure_model()
    for (name, p), q in zip(model.named_parameters(), source.parameters()):
        assert torch.equal(p, q), name
    ids, mask, _ = dm.sample("retain_train", 4, torch.Generator().manual_seed(0))
    _, hidden = model.net(ids, mask)
    _, ref = model.reference(ids, mask)
    assert ops.representation_distance(hidden, ref, mask).item() > 0.0  # the reference is the original model
    assert model.artifact_parents()[0]["sha256"]


@pytest.mark.parametrize("cache", [True, False])
def test_split_forward_matches_the_hf_model(dm, cache):
    net = tiny_net(cache=cache)
    ids, mask, _ = dm.sample("forget_train", 4, torch.Generator().manual_seed(0))
    with torch.no_grad():
        h, hidden = net(ids, mask)
        ours = net.logits(h)
        theirs = net.lm(input_ids=ids, attention_mask=mask.long()).logits
    torch.testing.assert_close(ours[mask], theirs[mask], rtol=1e-4, atol=1e-4)
    assert len(hidden) == 2  # the trained blocks' outputs


def test_trunk_is_frozen_and_cached_once(dm):
    net = tiny_net()
    trained = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith(("lm.model.layers.2.", "lm.model.layers.3.", "lm.model.norm")) for n in trained)
    ids, mask, _ = dm.sample("forget_train", 4, torch.Generator().manual_seed(0))
    net(ids, mask)
    n = len(net.trunk_cache)
    net(ids[:2], mask[:2])  # the same sequences in another batch: served from the cache
    assert len(net.trunk_cache) == n == 4


def test_attack_trains_a_copy_and_leaves_the_model_and_cache_intact(dm):
    net = tiny_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    base = evaluate(net, dm)
    for attack in (TamperAttack(name="full", lr=1e-2, steps=3, batch_size=4),
                   TamperAttack(name="lora", lr=1e-1, steps=3, batch_size=4, lora_rank=2),
                   TamperAttack(name="all", lr=1e-2, steps=2, batch_size=4, layers="all")):  # fmt: skip
        metrics = run_attack(net, attack, dm)
        assert set(metrics) >= {"forget_acc", "retain_acc", "forget_nll", "retain_nll"}
        assert metrics["forget_nll"] != pytest.approx(base["forget_nll"], abs=1e-6), attack.name
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert evaluate(net, dm) == base  # the shared trunk cache was not polluted by the all-layers attack


def test_gradient_ascent_raises_the_forget_loss(dm):
    model = GradientAscent(tiny_net(), optimizer=lambda p: torch.optim.SGD(p, lr=0.5), retain_weight=0.0)
    batch = dm.sentences("forget_train").__getitems__(list(range(8)))
    before = lm_loss(model.net, batch).item()
    fit(model, dm, steps=3)
    assert lm_loss(model.net, batch).item() > before


def test_datamodule_splits_are_disjoint_and_questions_are_well_formed(dm):
    subjects = {name: {f.subject for f in dm.facts[name]} for name in ("forget_train", "forget_meta", "attack", "forget_eval")}
    names = list(subjects)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not subjects[a] & subjects[b], (a, b)
    assert not {(f.subject, f.relation) for f in dm.facts["retain_train"]} & {
        (f.subject, f.relation) for f in dm.facts["retain_eval"]}  # fmt: skip
    tok = dm.sets  # every split exists with the documented shapes
    for name in SENTENCE_SPLITS:
        ids, mask, ans = tok[name].tensors
        assert ids.shape == mask.shape == ans.shape and bool((ans <= mask).all())
    from datamodules.text import load_tokenizer

    t = load_tokenizer("smollm2-135m")
    for name in QUESTION_SPLITS:
        ids, mask, ans, label = tok[name].tensors
        assert ids.shape[1] == dm.num_options
        for q, fact in enumerate(dm.facts[name]):
            answer = t.decode(ids[q, label[q]][ans[q, label[q]]])
            assert answer.strip() == fact.target


def test_bad_settings_fail_with_a_clear_message():
    with pytest.raises(ValueError, match="lora_rank"):
        TAR(tiny_net(), [TamperAttack(name="lora", lora_rank=4)])
    with pytest.raises(ValueError, match="tr_every"):
        TAR(tiny_net(), [TamperAttack(name="short", steps=2)], tr_every=4)
    with pytest.raises(ValueError, match="trainable_layers"):
        SplitCausalLM(trainable_layers=None, cache_trunk=True)
    with pytest.raises(ValueError, match="unique"):
        TamperingHarness(attacks=[TamperAttack(name="a"), TamperAttack(name="a")])
    with pytest.raises(ValueError, match="unknown relation"):
        TamperFactsDataModule(forget_relation="capitol")


def test_recipes_tamper_cli_prints_every_attack(tmp_path, capsys):
    from recipes.tamper import main

    attacks = tmp_path / "attacks.yaml"
    attacks.write_text(yaml.safe_dump([{"name": "a1", "lr": 1e-3, "steps": 2, "batch_size": 4},
                                       {"name": "sgd", "optimizer": "sgd", "lr": 1e-2, "steps": 2, "batch_size": 4}]))  # fmt: skip
    assert [a.name for a in load_attacks(attacks)] == ["a1", "sgd"]
    assert main(["--config", str(TINY / "tar" / "smollm2_none.yaml"), "--attacks", str(attacks),
                 "--out", str(tmp_path / "rows.json")]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "| before attack |" in out and "| a1 |" in out and "| sgd |" in out
    assert (tmp_path / "rows.json").exists()


@pytest.mark.slow
def test_tar_comparison_runs_on_tiny_twins_and_writes_every_attack_row(tmp_path):
    from recipes.reproduce import reproduce

    from recipes.comparisons.tar import SAFEGUARDS

    table = reproduce("tar", seeds=[0], root=tmp_path / "runs", out=tmp_path / "out", tiny=True)
    assert len(table.splitlines()) == 2 + len(SAFEGUARDS)  # header, rule, one row per stage
    assert "floor: trained blocks re-initialised" in table
    attacks = (tmp_path / "out" / "tar-attacks.md").read_text()
    assert "## TAR (from Random Mapping" in (tmp_path / "out" / "tar-adversaries.md").read_text()
    assert "| adamw_lr1e-3 |" in attacks and "| lora_r2 |" in attacks and "before attack" in attacks
    for stage, parent in (("tar", "random_mapping"), ("ablation/no_representation", "random_mapping"),
                          ("top4/tar", "top4/random_mapping")):  # fmt: skip
        manifest = (tmp_path / "runs" / "tar" / stage / "seed0" / "artifact" / "manifest.json").read_text()
        assert f"/{parent}/seed0/artifact" in manifest, stage  # TAR started from that Random Mapping's artifact


@pytest.mark.parametrize("path", sorted((CONFIGS / "tar" / "attacks").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_attack_lists_load(path):
    """Every attack list shipped for `python -m recipes.tamper --attacks` parses into distinct, valid attacks."""
    attacks = load_attacks(path)
    assert attacks and len({a.name for a in attacks}) == len(attacks)


def test_an_artifact_of_another_trainable_span_is_refused(dm, tmp_path):
    """Trunk tensors must never load behind the trunk cache, and no trained block may silently stay pretrained."""
    from foundation.artifacts import save_artifact

    source = GradientAscent(tiny_net(trainable_layers=1))
    save_artifact(tmp_path / "one", source.artifact_state_dict(), {"recipe": "GradientAscent"})
    with pytest.raises(ValueError, match="trained tensors.*trainable_layers"):
        GradientAscent(tiny_net(trainable_layers=2), init_from=str(tmp_path / "one")).configure_model()


def test_training_adversary_table_groups_by_lr_data_and_window(tmp_path):
    """The diagnostic of where TR holds during training: hand-computed means and SEs per adversary and window."""
    from recipes.comparisons.tar import adversary_outcomes, adversary_rows, adversary_table

    csv_path = tmp_path / "metrics.csv"
    rows = ["epoch,step,train/adversary_loss,train/adversary_lr,train/adversary_retain_steps,val/forget_acc",
            "0,4,1.0,1e-05,0.0,", "0,9,3.0,1e-05,0.0,", "0,9,,,,0.5",  # a validation row is skipped
            "0,14,0.5,0.001,0.0,", "0,19,7.0,1e-05,3.0,", "0,24,5.0,1e-05,0.0,"]  # fmt: skip
    csv_path.write_text("\n".join(rows) + "\n")
    out = adversary_outcomes(adversary_rows(csv_path), window=20)
    assert out == {(1e-5, "forget"): {0: [1.0, 3.0], 1: [5.0]}, (1e-3, "forget"): {0: [0.5]},
                   (1e-5, "retain->forget"): {0: [7.0]}}  # fmt: skip
    table = adversary_table(out, window=20).splitlines()
    assert table[0] == "| adversary lr | data | steps 0-19 | steps 20-39 |"
    # mean 2, sample SD sqrt(2), SE 1; one value has no SE; an empty window is a dash
    assert "| 1e-05 | forget | 2.00 ± 1.00 (2) | 5.00 ± nan (1) |" in table
    assert "| 0.001 | forget | 0.50 ± nan (1) | — |" in table
    assert "| 1e-05 | retain->forget | 7.00 ± nan (1) | — |" in table
