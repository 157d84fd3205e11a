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


def test_cached_tabulates_the_results_on_disk_and_runs_nothing(tmp_path, monkeypatch):
    """``--cached``: the stages and seeds with a result.json enter the table, the others none, and nothing runs."""
    import json

    import pytest

    from recipes import reproduce as R

    def fail(*a, **k):
        raise AssertionError("--cached must not run a stage")

    stages = [Stage(k, "x.yaml", label=k) for k in ("a", "b", "c")]
    COMPARISONS["cached-cmp"] = R.Comparison(title="t", stages=stages, columns={"test/acc": "acc"},
                                             plot=lambda r, p: None)  # fmt: skip
    try:
        for key, seed, acc in (("a", 0, 0.5), ("a", 1, 0.7), ("b", 1, 0.9)):
            run = tmp_path / "cached-cmp" / key / f"seed{seed}"
            run.mkdir(parents=True)
            (run / "result.json").write_text(json.dumps({"metrics": {"test/acc": acc}, "seconds": 1.0}))
        monkeypatch.setattr(R.shutil, "rmtree", fail)
        monkeypatch.setattr("recipes.cli.main", fail)
        table = reproduce("cached-cmp", seeds=[0, 1], root=tmp_path, out=tmp_path, cached=True)
        rows = {line.split("|")[2].strip(): line for line in table.splitlines() if line.count("|") > 3}
        assert "60.0" in rows["a"] and "| 2 |" in rows["a"]  # mean of seeds 0 and 1
        assert "90.0" in rows["b"] and "| 1 |" in rows["b"]
        assert "| 0 |" in rows["c"]  # listed, with no seed
        assert "--cached" in (tmp_path / "cached-cmp.md").read_text()
        with pytest.raises(SystemExit, match="no stage"):
            reproduce("cached-cmp", seeds=[5], root=tmp_path, out=tmp_path, cached=True)
    finally:
        COMPARISONS.pop("cached-cmp", None)


def test_a_long_only_list_gives_a_short_unique_table_name(tmp_path, monkeypatch):
    from recipes import reproduce as R

    monkeypatch.setattr(R, "run_stage", lambda stage, *a: {"metrics": {}, "seconds": 0.0})
    keys = [f"dataset-name/attack-{i}/defense-name" for i in range(12)]
    COMPARISONS["long-cmp"] = R.Comparison(title="t", stages=[Stage(k, "x.yaml") for k in keys], columns={},
                                           plot=lambda r, p: None)  # fmt: skip
    try:
        reproduce("long-cmp", seeds=[0], root=tmp_path, out=tmp_path, only=keys)
        reproduce("long-cmp", seeds=[0], root=tmp_path, out=tmp_path, only=keys[:11])
        names = sorted(p.name for p in tmp_path.glob("long-cmp-*.md"))
        assert len(names) == 2 and all(len(n) < 140 for n in names), names
    finally:
        COMPARISONS.pop("long-cmp", None)


def test_a_stage_whose_artifact_source_is_missing_stops_before_anything_runs(tmp_path, monkeypatch):
    """Selecting a stage without the stage it reads (and no result of it on disk) is one clear line, not an
    artifact error from inside the CLI after the earlier stages have run."""
    import pytest

    from recipes import reproduce as R

    ran = []
    monkeypatch.setattr(R, "run_stage", lambda stage, *a: ran.append(stage.key) or {"metrics": {}, "seconds": 0.0})
    stages = [Stage("warm", "x.yaml"), Stage("a", "x.yaml", ["--init={artifact:warm}"]), Stage("b", "x.yaml")]
    COMPARISONS["deps-cmp"] = R.Comparison(title="t", stages=stages, columns={}, plot=lambda r, p: None)
    try:
        with pytest.raises(SystemExit, match=r"'a' \(seed 0\) reads the artifact of 'warm'.*--only warm"):
            reproduce("deps-cmp", seeds=[0], root=tmp_path, out=tmp_path, only=["b", "a"])
        assert ran == []
        reproduce("deps-cmp", seeds=[0], root=tmp_path, out=tmp_path, only=["warm", "a"])
        assert ran == ["warm", "a"]
        R.result_path(tmp_path / "deps-cmp", "warm", 0).parent.mkdir(parents=True)
        R.result_path(tmp_path / "deps-cmp", "warm", 0).write_text("{}")  # a finished source on disk will do
        ran.clear()
        reproduce("deps-cmp", seeds=[0], root=tmp_path, out=tmp_path, only=["a"])
        assert ran == ["a"]
    finally:
        COMPARISONS.pop("deps-cmp", None)
