"""The reproduction runner runs every stage through the CLI, caches results and writes a table and a plot."""

from recipes.reproduce import COMPARISONS, Stage, _substitute, reproduce


def test_backdoor_comparison_on_tiny_twins(tmp_path):
    table = reproduce("backdoor", seeds=[0], root=tmp_path / "runs", out=tmp_path / "docs", tiny=True)
    assert (tmp_path / "docs" / "backdoor.md").read_text().count("|") > 20
    assert (tmp_path / "docs" / "backdoor.png").stat().st_size > 1000
    for stage in COMPARISONS["backdoor"].stages:
        assert stage.label in table
        assert (tmp_path / "runs" / "backdoor" / stage.key / "seed0" / "artifact" / "manifest.json").exists()
    result = tmp_path / "runs" / "backdoor" / "mnist/poisoned" / "seed0" / "result.json"
    stamp = result.stat().st_mtime_ns
    reproduce("backdoor", seeds=[0], root=tmp_path / "runs", out=tmp_path / "docs", tiny=True)
    assert result.stat().st_mtime_ns == stamp, "a finished stage must be reused, not rerun"


def test_artifact_placeholders_point_at_earlier_stages(tmp_path):
    arg = _substitute("--model.init_args.parent={artifact:mnist/poisoned}", 2, tmp_path)
    assert arg == f"--model.init_args.parent={tmp_path}/mnist/poisoned/seed2/artifact"
    assert Stage("a", "b.yaml").overrides == []


def test_comparisons_in_their_own_modules_are_registered(tmp_path, monkeypatch):
    import sys

    import recipes.comparisons
    from recipes import reproduce as R

    pkg = tmp_path / "plugin_pkg"
    pkg.mkdir()
    (pkg / "extra_cmp.py").write_text(
        "from recipes.reproduce import COMPARISONS, Comparison, Stage\n"
        "COMPARISONS['extra-cmp'] = Comparison(title='t', stages=[Stage('a', 'x.yaml')], columns={})\n"
    )
    monkeypatch.setattr(recipes.comparisons, "__path__", [str(pkg)])
    try:
        assert "extra-cmp" in R.load_comparisons()
        assert R.COMPARISONS is COMPARISONS
    finally:
        COMPARISONS.pop("extra-cmp", None)
        sys.modules.pop("recipes.comparisons.extra_cmp", None)


def test_fl_attack_comparisons_keep_one_federation_across_run_seeds(tmp_path):
    """The attacker's data must not change with the run seed (seed 1's partition once left it 178 images and no
    attack landed): every chameleon and trojandam stage draws its partition with data seed 0."""
    from recipes.reproduce import load_comparisons

    load_comparisons()
    for name in ("chameleon", "trojandam"):
        for stage in COMPARISONS[name].stages:
            data_seeds = {_substitute(a, 1, tmp_path) for a in stage.overrides if a.startswith("--data.init_args.seed=")}
            assert data_seeds == {"--data.init_args.seed=0"}, (name, stage.key)


def test_only_takes_prefixes_but_a_whole_stage_key_selects_that_stage_alone(tmp_path, monkeypatch):
    from recipes import reproduce as R

    ran = []
    monkeypatch.setattr(R, "run_stage", lambda stage, *a: ran.append(stage.key) or {"metrics": {}, "seconds": 0.0})
    stages = [Stage(k, "x.yaml") for k in ("a/x", "a/x_fresh", "a/y", "b/x")]
    COMPARISONS["only-cmp"] = R.Comparison(title="t", stages=stages, columns={}, plot=lambda r, p: None)
    try:
        for only, expected in ((["a/x"], ["a/x"]), (["a/"], ["a/x", "a/x_fresh", "a/y"]),
                               (["a/x_", "b"], ["a/x_fresh", "b/x"])):  # fmt: skip
            ran.clear()
            reproduce("only-cmp", seeds=[0], root=tmp_path, out=tmp_path, only=only)
            assert ran == expected, only
    finally:
        COMPARISONS.pop("only-cmp", None)
