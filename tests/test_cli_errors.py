"""Bad input to ``python -m recipes`` ends in a short output whose last line is the validator's own message."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, TINY

MNIST_TINY = str(TINY / "backdoor" / "mnist_badnets.yaml")
MNIST_FULL = str(REPO / "configs" / "backdoor" / "mnist_badnets.yaml")

CASES = {  # name: (config, extra args, extra env, what the last line must say)
    "typo": (MNIST_TINY, ["--trainer.max_epochz=2"], {}, "error: unrecognized arguments: --trainer.max_epochz=2"),
    "wrong type": (MNIST_TINY, ["--data.init_args.batch_size=lots"], {}, "error: data.batch_size: Expected a <class 'int'>"),
    "out of range": (MNIST_TINY, ["--data.init_args.poisoning.init_args.rate=1.5"], {},
                     "error: poison rate must be in [0, 1), got 1.5"),
    "missing config": ("configs/backdoor/mnist_badnet.yaml", [], {}, "error: config: File does not exist"),
    "missing asset": (MNIST_FULL, [], {"SAFEWEIGHTS_CACHE": "{tmp}/empty-cache"}, "error: asset 'mnist':"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_prints_a_short_error_and_leaves_no_run_directory(case, tmp_path):
    config, extra, env, expected = CASES[case]
    env = {**os.environ, "PYTHONPATH": str(REPO), **{k: v.format(tmp=tmp_path) for k, v in env.items()}}
    root = tmp_path / "runs"
    cmd = [sys.executable, "-m", "recipes", "fit", f"--config={config}", f"--trainer.default_root_dir={root}", *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) < 15, "\n".join(lines)
    assert proc.stderr.strip().splitlines()[-1].startswith(expected), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not root.exists() or not any(root.rglob("*")), f"left behind: {list(root.rglob('*'))}"
