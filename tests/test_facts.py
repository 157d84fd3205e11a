"""CounterFact-style records from the country facts and from CounterFact / zsRE files."""

from pathlib import Path

import pytest

from datamodules import CounterFactDataModule
from datamodules.facts import RELATIONS, country_facts, load_counterfact, load_zsre

ASSETS = Path(__file__).parent / "assets"


def fake_scorer(prompts, targets):
    """'Knows' every fact whose subject's first letter is in the first half of the alphabet."""
    return [p.split()[0][0].upper() <= "M" if not p.startswith("The") else len(t) % 2 == 0 for p, t in zip(prompts, targets)]


@pytest.fixture(scope="module")
def dm():
    d = CounterFactDataModule(num_edits=40, relations=["city_country", "capital"], max_city_candidates=400,
                              num_neighbors=3, seed=1)
    d.select_known(fake_scorer)
    return d


def test_country_facts_have_one_relation_per_subject():
    facts = country_facts(["city_country", "us_state", "capital", "continent"], max_city_candidates=300)
    subjects = [f.subject for f in facts]
    assert len(subjects) == len(set(subjects))
    assert {f.relation for f in facts} == {"city_country", "us_state", "capital", "continent"}
    by = {(f.relation, f.subject): f.target for f in facts}
    assert by[("city_country", "Shanghai")] == "China"
    assert by.get(("capital", "France")) == "Paris"
    assert all(f.target.lower() not in f.subject.lower() for f in facts)


def test_records_are_known_unique_and_carry_held_out_neighbours(dm):
    recs = dm.records
    assert len(recs) == 40
    prompts, targets = dm.candidates()
    known = {(p, t) for p, t, k in zip(prompts, targets, fake_scorer(prompts, targets)) if k}
    edited = {r.subject for r in recs}
    assert len(edited) == len(recs)
    for r in recs:
        assert (r.text, r.target_true) in known
        assert r.target_new != r.target_true
        assert r.prompt == RELATIONS[r.relation].prompt
        assert len(r.paraphrase_prompts) == 2 and all(r.subject in p for p in r.paraphrase_prompts)
        assert 1 <= len(r.neighborhood) <= 3
        for prompt, true in r.neighborhood:
            assert (prompt, true) in known
            assert true != r.target_new
            assert not any(prompt.startswith(s + " ") for s in edited)  # held out of the edit set
        same_object = [f for f in dm.facts if f.relation == r.relation and f.target == r.target_true
                       and f.subject not in edited and (RELATIONS[f.relation].prompt.format(f.subject), f.target) in known]
        if same_object:  # CounterFact-style: facts sharing the true object come first
            assert r.neighborhood[0][1] == r.target_true


def test_edit_order_and_targets_follow_the_seed():
    a = CounterFactDataModule(num_edits=10, relations=["city_country"], max_city_candidates=200, seed=5)
    b = CounterFactDataModule(num_edits=10, relations=["city_country"], max_city_candidates=200, seed=5)
    c = CounterFactDataModule(num_edits=10, relations=["city_country"], max_city_candidates=200, seed=6)
    for d in (a, b, c):
        d.select_known(None)
    assert [(r.subject, r.target_new) for r in a.records] == [(r.subject, r.target_new) for r in b.records]
    assert [r.subject for r in a.records] != [r.subject for r in c.records]


def test_num_edits_is_capped_by_the_held_out_share():
    d = CounterFactDataModule(num_edits=10_000, relations=["capital"], held_out_fraction=0.25)
    d.select_known(lambda p, t: [True] * len(p))
    assert len(d.records) == d.num_known - round(0.25 * d.num_known)


def test_loaders_batch_edits_and_evaluate_a_prefix(dm):
    dm.edit_batch_size, dm.val_size, dm.eval_batch_size = 16, 8, 32
    train = list(dm.train_dataloader())
    assert [len(b) for b in train] == [16, 16, 8]
    assert [len(b) for b in dm.val_dataloader()] == [8]
    assert sum(len(b) for b in dm.test_dataloader()) == 40
    assert train[0][0] is dm.records[0]


def test_counterfact_and_zsre_files():
    cf = load_counterfact(ASSETS / "counterfact_tiny.json")
    assert len(cf) == 4
    assert cf[0].subject == "Danielle Darrieux" and cf[0].text == "The mother tongue of Danielle Darrieux is"
    assert (cf[0].target_true, cf[0].target_new) == ("French", "English")
    assert cf[0].neighborhood[0] == ("The mother tongue of Léon Blum is", "French")
    zs = load_zsre(ASSETS / "zsre_tiny.json")
    assert zs[0].prompt == "What university did {} attend?" and zs[0].target_new == "University of Michigan"
    assert zs[0].neighborhood == [("nq question: who played desmond doss father in hacksaw ridge?", "Hugo Weaving")]
    d = CounterFactDataModule(source=str(ASSETS / "counterfact_tiny.json"), num_edits=3)
    d.select_known(lambda p, t: [True, False, True, True])
    assert len(d.records) == 3 and "Ross Ice Shelf" not in {r.subject for r in d.records}
    z = CounterFactDataModule(source=str(ASSETS / "zsre_tiny.json"), num_edits=None)
    z.select_known(None)
    assert {r.subject for r in z.records} == {"Watts Humphrey", "Ramalinaceae"}
