"""``reproduce --jobs N``: stages run as parallel processes, each once the stages whose artifacts it reads are done,
at most N at a time; a failed stage skips its dependents; finished stages are not run again."""

import json

import pytest

from recipes.parallel import run_parallel
from recipes.reproduce import Stage, dependencies

@pytest.fixture(autouse=True)
def _no_thread_setting(monkeypatch):
    """The launcher's one-thread default applies when the caller sets none (``make test`` may run under one)."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


STAGES = [Stage("warm", "x.yaml"), *[Stage(k, "x.yaml", ["--model.init_args.init_from={artifact:warm}"])
                                     for k in ("a", "b", "c")]]  # fmt: skip


class Launcher:
    """Stands in for subprocess.Popen: a 'process' ends at its second poll, writing its result unless told to fail."""

    def __init__(self, root, fail=()):
        self.root, self.fail, self.running, self.peak, self.order = root, set(fail), set(), 0, []

    def __call__(self, cmd, log, env):
        key, seed = cmd[cmd.index("--only") + 1], int(cmd[cmd.index("--seeds") + 1])
        assert env["OMP_NUM_THREADS"] == "1"
        self.order.append(("start", key, seed))
        self.running.add((key, seed))
        self.peak = max(self.peak, len(self.running))
        launcher = self

        class Proc:
            polls, returncode = 0, None

            def poll(self):
                self.polls += 1
                if self.polls < 2:
                    return None
                launcher.running.discard((key, seed))
                launcher.order.append(("end", key, seed))
                self.returncode = 1 if (key, seed) in launcher.fail else 0
                if not self.returncode:
                    run = launcher.root / "cmp" / key / f"seed{seed}"
                    run.mkdir(parents=True, exist_ok=True)
                    (run / "result.json").write_text(json.dumps({"metrics": {}, "seconds": 0.0}))
                return self.returncode

        return Proc()


def test_dependencies_are_the_artifact_placeholders():
    stage = Stage("s", "x.yaml", ["--a={artifact:x/y}", "--b=1", "--c={artifact:../o/w}:{artifact:x/y}"])
    assert dependencies(stage) == ["x/y", "../o/w"]


def test_stages_wait_for_the_artifacts_they_read_and_at_most_n_run(tmp_path):
    launch = Launcher(tmp_path)
    states = run_parallel("cmp", STAGES, [0, 1], tmp_path, jobs=2, poll=0, launch=launch)
    assert set(states.values()) == {"done"} and len(states) == 8
    assert launch.peak == 2
    for seed in (0, 1):
        warm_end = launch.order.index(("end", "warm", seed))
        for key in ("a", "b", "c"):
            assert launch.order.index(("start", key, seed)) > warm_end, (key, seed)
    launch.order.clear()
    assert set(run_parallel("cmp", STAGES, [0, 1], tmp_path, jobs=2, poll=0, launch=launch).values()) == {"cached"}
    assert launch.order == [], "finished stages must not run again"


def test_a_failed_stage_skips_its_dependents_only(tmp_path):
    launch = Launcher(tmp_path, fail={("warm", 0)})
    states = run_parallel("cmp", STAGES, [0, 1], tmp_path, jobs=3, poll=0, launch=launch)
    assert states[("warm", 0)] == "failed"
    assert [states[(k, 0)] for k in "abc"] == ["skipped"] * 3
    assert [states[(k, 1)] for k in ("warm", *"abc")] == ["done"] * 4
    assert ("start", "a", 0) not in launch.order


def test_a_missing_dependency_outside_the_selection_is_one_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="reads the artifact of 'warm'.*--only warm"):
        run_parallel("cmp", STAGES[1:], [0], tmp_path, jobs=2, poll=0, launch=Launcher(tmp_path))
    with pytest.raises(SystemExit, match="--jobs 0"):
        run_parallel("cmp", STAGES, [0], tmp_path, jobs=0, poll=0, launch=Launcher(tmp_path))


def test_the_command_each_process_gets_runs_its_stage(tmp_path):
    """The launched command line is a working ``reproduce`` call (run here in-process, on the tiny twins)."""
    from recipes.reproduce import main, select_stages

    class Done:
        returncode = 0

        def poll(self):
            return 0

    def launch(cmd, log, env):
        assert cmd[1:3] == ["-m", "recipes.reproduce"]
        assert main(cmd[3:]) == 0
        return Done()

    stages = select_stages("chameleon", ["mnist/warmup", "mnist/clean"])
    states = run_parallel("chameleon", stages, [0], tmp_path, jobs=2, tiny=True, poll=0, launch=launch)
    assert states == {("mnist/warmup", 0): "done", ("mnist/clean", 0): "done"}
    assert (tmp_path / "chameleon" / "mnist" / "clean" / "seed0" / "result.json").exists()
