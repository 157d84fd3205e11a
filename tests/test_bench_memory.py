"""The benchmarks' memory measurement: a fresh child's own peak (VmHWM), not the parent's inherited ru_maxrss, and
/usr/bin/time -v agreeing with it."""

import os
import subprocess
import sys

import pytest
import torch

from benchmarks._common import check_rss, run_fresh

CHILD = (
    "import json, resource, sys; sys.path.insert(0, '.');"
    "from benchmarks._common import peak_rss_kib;"
    "x = bytearray(80 * 2**20);"  # touch 80 MiB
    "print(json.dumps({'vmhwm': peak_rss_kib(), 'ru_maxrss': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))"
)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="VmHWM needs Linux /proc")
def test_fresh_child_reports_its_own_peak_not_the_large_parents():
    import json
    from pathlib import Path

    big = torch.ones(500 * 2**20 // 4)  # the parent touches 500 MiB: its high-water mark is above that
    root = Path(__file__).resolve().parents[1]
    stdout, time_kib = run_fresh([sys.executable, "-c", CHILD], cwd=root)
    child = json.loads(stdout.strip().splitlines()[-1])
    # started straight from this process, the child's ru_maxrss carries this process's peak through exec
    direct = subprocess.run([sys.executable, "-c", CHILD], cwd=root, capture_output=True, text=True, check=True)
    inherited = json.loads(direct.stdout.strip().splitlines()[-1])
    del big
    assert inherited["ru_maxrss"] > 500 * 1024 > 400 * 1024 > inherited["vmhwm"]
    assert 80 * 1024 < child["vmhwm"] < 400 * 1024  # 80 MiB buffer + the interpreter and torch-free imports
    if time_kib is not None:  # GNU time forks the child from its own small process
        assert abs(time_kib - child["vmhwm"]) <= 0.05 * child["vmhwm"]
        check_rss(child["vmhwm"] / 1024, time_kib / 1024, "child")


def test_check_rss_raises_on_disagreement_and_notes_a_missing_time():
    assert "VmHWM" in check_rss(100.0, 102.0, "x")
    with pytest.raises(RuntimeError, match="VmHWM 100 MB but /usr/bin/time -v 200 MB"):
        check_rss(100.0, 200.0, "x")
    assert "apt-get install time" in check_rss(100.0, None, "x")
