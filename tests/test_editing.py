"""MEMIT / NAMET on a tiny random Llama (fast) and on SmolLM2-135M (slow): closed form, batching, caching, edits."""

import pytest
import torch

from datamodules import CounterFactDataModule, EditRecord
from lightning_modules import MEMIT, NAMET, CausalLM, editing_stats
from foundation import assets

TINY = {"num_hidden_layers": 4, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2}
SUBJECTS = ["Zorbland", "Quintara", "Melvoria", "Droskan", "Tellurin", "Vashtor", "Pelamir", "Ostrava"]
NEW = ["Japan", "Brazil", "Kenya", "Peru", "Chile", "Spain"]


def tiny_editor(tmp_path, cls=MEMIT, **kw):
    torch.manual_seed(0)
    args = {"layers": [0, 1], "stats_dir": str(tmp_path), "stats_tokens": 3000, "stats_seq_len": 32,
            "context_seeds": ["The", "Because"], "context_length": 4, "eval_prefixes": 2, "eval_prefix_length": 3,
            "fluency_records": 0, "v_num_grad_steps": 8}
    args.update(kw)
    m = cls(CausalLM("smollm2-135m", random_init=True, config_overrides=TINY), **args)
    m.configure_model()
    m.prepare()
    return m


def records(subjects, start=0):
    return [EditRecord(start + i, s, "{} is located in the country of", "France", NEW[i % len(NEW)])
            for i, s in enumerate(subjects)]


def clean_states(m, recs):
    """Hidden states at the top edited layer, at the subject's last token of the bare prompts."""
    templates, m.templates = m.templates, ["{}"]
    try:
        keys, hidden = m._reps(recs, m.layers[0])
    finally:
        m.templates = templates
    return keys[:, 0], hidden[:, 0]


@pytest.mark.parametrize("cls", [MEMIT, NAMET])
def test_batched_and_sequential_target_vectors_agree(tmp_path, cls):
    m = tiny_editor(tmp_path, cls, v_lr=0.3, v_stop_loss=-1.0, v_weight_decay=0.0, kl_factor=0.0)
    recs = records(SUBJECTS[:5])
    m.hparams.v_num_grad_steps = 1
    _, _, start_nll = m.compute_targets(recs)  # the loss before any step (δ = 0)
    m.hparams.v_num_grad_steps = 8
    with torch.enable_grad():
        _, _, free_nll = m.compute_targets(recs)
    # a threshold that the fastest-improving request crosses half-way: exercises freezing and dropping
    j = int((start_nll - free_nll).argmax())
    m.hparams.v_stop_loss = float(start_nll[j] + free_nll[j]) / 2
    m.hparams.v_batch_size = 5
    with torch.enable_grad():
        d_batch, h_batch, nll_batch = m.compute_targets(recs)
    m.hparams.v_batch_size = 1
    with torch.enable_grad():
        d_seq, h_seq, nll_seq = m.compute_targets(recs)
    assert nll_batch[j] > free_nll[j] + 1e-6 and d_batch[j].norm() > 0  # stopped early, after some steps
    torch.testing.assert_close(h_batch, h_seq, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(d_batch, d_seq, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(nll_batch, nll_seq, atol=1e-4, rtol=1e-4)
    m.hparams.prefix_cache = False  # the reference's way: full sequences at every step
    with torch.enable_grad():
        d_full, h_full, _ = m.compute_targets(recs)
    torch.testing.assert_close(h_full, h_seq, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(d_full, d_seq, atol=1e-4, rtol=1e-3)


def test_one_request_one_layer_update_matches_the_closed_form(tmp_path):
    """With one request and one layer ``l = L``: ``Δ = δ kᵀ C⁻¹ / (λ + kᵀ C⁻¹ k)`` (Sherman-Morrison), ``k`` the
    down_proj input at the subject's last token averaged over the context templates."""
    lam = 7.0
    m = tiny_editor(tmp_path, layers=[1], mom2_update_weight=lam)
    (rec,) = records(SUBJECTS[:1])
    w = m.lm.model.layers[1].mlp.down_proj.weight
    before = w.detach().clone()
    keys = []
    hook = m.lm.model.layers[1].mlp.down_proj.register_forward_hook(lambda mod, i, o: keys.append(i[0][0, -1].detach()))
    with torch.no_grad():
        for t in m.templates:
            template = t.format(rec.prompt)
            ids = m.net.encode(template.format(rec.subject))[: m.net.subject_last(template, rec.subject) + 1]
            m.lm(torch.tensor([ids]))
    hook.remove()
    k = ((keys[0] + torch.stack(keys[1:]).mean(0)) / 2).double()
    with torch.enable_grad():
        delta, h_init, _ = m.compute_targets([rec])
    m.apply_update([rec], delta, h_init)
    cinv_k = torch.linalg.solve(m.cov[1], k)
    expected = delta[0].double().outer(cinv_k) / (lam + k @ cinv_k)
    torch.testing.assert_close((w.detach() - before).double(), expected, atol=1e-5, rtol=1e-4)


def test_update_writes_the_targets_and_spares_other_subjects(tmp_path):
    """λ → 0 and the bare prompt as the only context: after the last layer the stored value *is* z = h₀ + δ;
    held-out subjects move much less than the edited ones."""
    m = tiny_editor(tmp_path, context_seeds=[], mom2_update_weight=1e-3)
    edits, held_out = records(SUBJECTS[:4]), records(SUBJECTS[4:], start=10)
    with torch.enable_grad():
        delta, h_init, _ = m.compute_targets(edits)
    _, before = clean_states(m, held_out)
    m.apply_update(edits, delta, h_init)
    _, after_edit = clean_states(m, edits)
    _, after = clean_states(m, held_out)
    z = h_init[:, 0] + delta
    assert ((after_edit - z).norm(dim=-1) / delta.norm(dim=-1)).max() < 1e-3
    assert (after - before).norm(dim=-1).max() < 0.5 * delta.norm(dim=-1).min()


def test_namet_extracts_memory_under_the_prefixed_contexts(tmp_path):
    m = tiny_editor(tmp_path, NAMET)
    assert m.residual_columns() == [1, 2]  # the two prefixed templates, not the bare prompt nor the KL prompt
    h = torch.randn(3, 4, 8)
    delta = torch.randn(3, 8)
    expected = m.hparams.v_weight_decay * 2.0 * delta.norm(dim=-1) / h.flatten(1).norm(dim=-1)
    torch.testing.assert_close(m.weight_decay(delta, h), expected)
    torch.testing.assert_close(m.max_norm(h), m.hparams.clamp_norm_factor * h.flatten(1).norm(dim=-1))
    memit = tiny_editor(tmp_path, MEMIT)
    torch.testing.assert_close(memit.max_norm(h), memit.hparams.clamp_norm_factor * h[:, 0].norm(dim=-1))


def test_statistics_are_cached_by_model_and_layer(tmp_path, monkeypatch):
    m = tiny_editor(tmp_path)
    files = sorted(p.name for p in (tmp_path / m._model_key()).glob("*.safetensors"))
    assert len(files) == 2 and all("down_proj" in f for f in files)
    cov = m.cov[0]
    assert torch.allclose(cov, cov.T) and torch.linalg.eigvalsh(cov).min() > -1e-6

    def boom(*args, **kwargs):
        raise AssertionError("statistics recomputed although cached")

    monkeypatch.setattr(editing_stats, "compute_second_moments", boom)
    again = tiny_editor(tmp_path)
    torch.testing.assert_close(again.cov[0], cov)


def test_score_matches_a_plain_forward(tmp_path):
    m = tiny_editor(tmp_path)
    prompt, target = "Zorbland is located in the country of", "New Zealand"
    nll, strict = m.score([prompt, prompt], [target, "Peru"])
    p, t = m.net.encode(prompt), m.net.encode_target(prompt, target)
    with torch.no_grad():
        logp = m.lm(torch.tensor([p + t])).logits[0].log_softmax(-1)
    rows = logp[len(p) - 1 : len(p) - 1 + len(t)]
    expected = -rows.gather(1, torch.tensor(t)[:, None]).mean()
    assert nll[0].item() == pytest.approx(expected.item(), rel=1e-4)
    assert bool(strict[0]) == bool((rows.argmax(-1) == torch.tensor(t)).all())


def test_known_facts_are_cached_per_model(tmp_path):
    m = tiny_editor(tmp_path)
    first = m.knows(["Zorbland is located in the country of"], ["France"])
    assert list(tmp_path.glob("known-*.json"))
    m.score = None  # a second call must not score again
    assert m.knows(["Zorbland is located in the country of"], ["France"]) == first


@pytest.mark.slow
def test_memit_edits_real_facts_of_smollm2_and_spares_neighbours(tmp_path):
    """SmolLM2-135M: 10 known country facts rewritten at once; the new targets become the greedy answers and the
    held-out neighbourhood facts (cities of the same countries) stay."""
    try:
        assets.smollm2_dir()
    except assets.AssetNotFoundError as err:
        pytest.skip(str(err))
    torch.manual_seed(0)
    m = MEMIT(CausalLM("smollm2-135m", attn_implementation="eager", bos_token="<|endoftext|>"), layers=[3, 4],
              mom2_update_weight=2100.0, compute_dtype="bfloat16", stats_tokens=20_000, fluency_records=0)
    m.configure_model()
    m.prepare()
    dm = CounterFactDataModule(num_edits=10, relations=["city_country", "capital"], max_city_candidates=300, seed=3)
    dm.select_known(m.knows)
    recs = dm.records
    nbr_prompts = [p for r in recs for p, _ in r.neighborhood]
    nbr_true = [t for r in recs for _, t in r.neighborhood]
    _, new_before = m.score([r.text for r in recs], [r.target_new for r in recs])
    _, nbr_before = m.score(nbr_prompts, nbr_true)
    assert not new_before.any() and nbr_before.all()  # known facts, and no new target is stated yet
    with torch.enable_grad():
        delta, h_init, _ = m.compute_targets(recs)
    m.apply_update(recs, delta, h_init)
    _, new_after = m.score([r.text for r in recs], [r.target_new for r in recs])
    _, nbr_after = m.score(nbr_prompts, nbr_true)
    assert new_after.float().mean() >= 0.8
    assert nbr_after.float().mean() >= 0.8


def test_target_vectors_are_cached_by_records_and_optimisation_hparams(tmp_path):
    m = tiny_editor(tmp_path, targets_dir=str(tmp_path / "targets"))
    recs = records(SUBJECTS[:3])
    d1, h1, n1, s1, cached1 = m.cached_targets(recs)
    files = list((tmp_path / "targets").glob("memit-*.safetensors"))
    assert not cached1 and len(files) == 1 and s1 > 0
    m.compute_targets = None  # a second call with the same key must read the file
    d2, h2, n2, s2, cached2 = m.cached_targets(recs)
    assert cached2 and s2 == pytest.approx(s1)
    torch.testing.assert_close(d2, d1)
    torch.testing.assert_close(h2, h1)
    torch.testing.assert_close(n2, n1)
    m.lams = [10 * x for x in m.lams]  # λ is not part of the key: a sweep re-uses the vectors
    assert m.cached_targets(recs)[4]
    other = tiny_editor(tmp_path, targets_dir=str(tmp_path / "targets"), v_lr=0.1)  # another optimisation: new key
    assert not other.cached_targets(recs)[4] and not other.cached_targets(records(SUBJECTS[3:5]))[4]
    namet = tiny_editor(tmp_path, NAMET, targets_dir=str(tmp_path / "targets"))
    assert not namet.cached_targets(recs)[4]
    assert len(list((tmp_path / "targets").glob("*.safetensors"))) == 4


def test_matched_configs_differ_only_in_the_method():
    """configs/namet/smollm2_{memit,namet}.yaml (and the Llama-2 pair): NAMET's change is the only difference."""
    import yaml

    for a, b in (("smollm2_memit", "smollm2_namet"), ("smollm2_memit_wide", "smollm2_namet_wide"),
                 ("llama2_7b_counterfact_memit", "llama2_7b_counterfact_namet")):
        ca, cb = (yaml.safe_load(open(f"configs/namet/{x}.yaml")) for x in (a, b))
        assert (ca["model"].pop("class_path"), cb["model"].pop("class_path")) == ("MEMIT", "NAMET")
        ca["trainer"].pop("default_root_dir"), cb["trainer"].pop("default_root_dir")
        assert ca == cb
        assert ca["model"]["init_args"]["compute_dtype"] == "float32"


def test_causal_trace_restoring_the_last_state_recovers_the_clean_run(tmp_path):
    """Subject at the end of the prompt: restoring the last block's output there gives the clean ``p(answer)``
    exactly; without noise, the corrupted run is the clean one."""
    from lightning_modules.causal_trace import trace_fact

    m = tiny_editor(tmp_path)
    ids = m.net.encode("The capital city of Zorbland")
    span = (len(m.net.encode("The capital city of")), len(ids))
    args = ("model.layers.{}", "model.layers.{}.mlp", "model.embed_tokens", torch.Generator().manual_seed(0))
    noisy = trace_fact(m.lm, ids, span, 42, 5.0, 2, "hidden", 1, *args)
    assert noisy["corrupted"] != pytest.approx(noisy["clean"], rel=1e-3)
    assert float(noisy["restored"][-1]) == pytest.approx(noisy["clean"], rel=1e-4)
    clean = trace_fact(m.lm, ids, span, 42, 0.0, 1, "mlp", 3, *args)
    assert clean["corrupted"] == pytest.approx(clean["clean"], rel=1e-5)
    torch.testing.assert_close(clean["restored"], torch.full_like(clean["restored"], clean["clean"]), rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_namet_comparison_runs_on_the_tiny_twins(tmp_path):
    from recipes.reproduce import reproduce

    stages = ["n300/unedited", "n300/memit/x1", "n300/memit/x2", "n300/namet/x1"]
    table = reproduce("namet", seeds=[0], root=tmp_path / "runs", out=tmp_path / "docs", tiny=True, only=stages)
    rows = [line for line in table.splitlines() if line.startswith("| SmolLM2")]
    assert [r.split(" | ")[1] for r in rows] == ["unedited", "MEMIT, λ x1", "MEMIT, λ x2", "NAMET, λ x1"]
    edit_time = [r.split(" | ")[-3] for r in rows]
    assert edit_time[0] == "—" and all(float(t) > 0 for t in edit_time[1:])
    import json

    from pathlib import Path

    x2 = json.loads((tmp_path / "runs" / "namet" / "n300" / "memit" / "x2" / "seed0" / "result.json").read_text())
    assert x2["metrics"]["test/z_cached"] == 1.0  # the λ x2 stage re-used the x1 stage's target vectors
    assert 0 < x2["metrics"]["test/delta_over_clamp"] <= 1.0 + 1e-4
    per = json.loads((Path(x2["log_dir"]) / "per_record_test.json").read_text())
    assert len(per["case_id"]) == len(per["efficacy_strict"]) == int(x2["metrics"]["test/records"])
    (paired_md,) = (tmp_path / "docs").glob("*-paired.md")
    paired = paired_md.read_text().splitlines()
    assert [line.split(" | ")[1] for line in paired[2:]] == ["1"]  # only x1 has both methods


def test_edit_metrics_keep_each_records_values_with_its_case_id():
    """The per-record values behind the standard errors are kept with their case ids (paired tables)."""
    import torch

    from datamodules.facts import EditRecord
    from lightning_modules.editing_eval import EditMetrics

    recs = [EditRecord(case_id=c, subject="S", prompt="{} is in", target_true="A", target_new="B",
                       neighborhood=[("T is in", "A")]) for c in (7, 3)]

    def score(prompts, targets):  # record 7: new target preferred and greedy; record 3: neither
        nll = torch.tensor([1.0, 2.0, 1.0, 2.0, 2.0, 1.0, 2.0, 1.0])
        strict = torch.tensor([True, False, True, False, False, False, False, True])
        return nll, strict

    m = EditMetrics()
    m.update(recs, score, prefixes=[])
    values = m.compute()
    per = m.last_per_record
    assert per["case_id"] == [7, 3]
    assert per["efficacy_strict"] == [1.0, 0.0] and per["efficacy"] == [1.0, 0.0]
    # neighbourhood wants the true target: record 7's neighbour prefers the new one (loose 0), strict: true not greedy
    assert per["neighborhood"] == [0.0, 1.0] and per["neighborhood_strict"] == [0.0, 1.0]
    assert values["efficacy_strict"] == 0.5 and abs(values["efficacy_strict_se"] - 0.5) < 1e-9
    m.compute()
    assert m.last_per_record == {}  # reset after compute: nothing was scored since


def test_namet_paired_table_math():
    from recipes.comparisons.namet import interpolate, paired_difference

    a = {"case_id": [1, 2, 3], "efficacy_strict": [1.0, 0.0, 1.0]}
    b = {"case_id": [3, 1, 9], "efficacy_strict": [0.0, 1.0, 1.0]}
    assert paired_difference(a, b, "efficacy_strict") == [-1.0, 0.0]  # case 9 has no partner
    curve = [(50.0, 80.0), (40.0, 90.0), (30.0, 95.0)]
    assert interpolate(curve, 45.0) == 85.0 and interpolate(curve, 30.0) == 95.0
    assert interpolate(curve, 55.0) is None


def test_namet_per_seed_differences_and_the_gap_on_each_seeds_memit_curve():
    """Two seeds by hand: NAMET minus MEMIT per seed, and NAMET's ES strict against that seed's MEMIT curve."""
    from recipes.comparisons.namet import per_seed

    def run(seed, es, ns):
        return {"seed": seed, "metrics": {"test/efficacy_strict": es, "test/neighborhood_strict": ns}}

    results = {  # seed 0: MEMIT (ns, es) at x1 (0.40, 0.90) and x2 (0.50, 0.80); seed 1 only x1, so no curve
        "n9/memit/x1": [run(0, 0.90, 0.40), run(1, 0.70, 0.30)], "n9/memit/x2": [run(0, 0.80, 0.50)],
        "n9/namet/x1": [run(0, 0.88, 0.45), run(1, 0.75, 0.20)], "n9/namet/x2": [run(1, 0.60, 0.60)],
    }  # fmt: skip
    (es0, ns0, gap0), (es1, ns1, gap1) = per_seed(results, "n9", 1.0)
    assert (round(es0, 6), round(ns0, 6), round(gap0, 6)) == (-2.0, 5.0, 3.0)  # MEMIT at NS 45: ES 85; 88 - 85
    assert (round(es1, 6), round(ns1, 6), gap1) == (5.0, -10.0, None)  # a one-point curve: outside its range
    assert per_seed(results, "n9", 2.0) == []  # no seed has both methods at x2
