"""Test isolation: seeded, default dtype reset, no process group left behind, runs under tmp dirs."""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _isolation(tmp_path, monkeypatch):
    torch.manual_seed(0)
    torch.set_num_threads(1)  # small models: threads only add contention (and CI has 2 cores)
    torch.set_default_dtype(torch.float32)
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run with the working directory in a tmp dir (relative run dirs land there)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


MERGE_POOL = Path(__file__).parent / "assets" / "merging"  # generated, git-ignored


@pytest.fixture(scope="session", autouse=True)
def _tiny_merge_pool(request, tmp_path_factory):
    """Build the tiny merge pool (8x8 images, width-4 CNN: a backbone and five task models) that the merging tests
    and the tiny twins of configs/merging read from tests/assets/merging, once, when a collected test needs it.
    It is built by the ``dam`` comparison's own pool stages on the tiny twins, so it is the same recipe at toy size."""
    if not any("merging" in item.nodeid for item in request.session.items):  # test_merging.py, configs/merging twins
        return
    from recipes.reproduce import COMPARISONS, load_comparisons, reproduce

    load_comparisons()
    stages = [s.key for s in COMPARISONS["dam"].stages if s.key.startswith("pool/")]
    if all((MERGE_POOL / "dam" / key / "seed0" / "artifact" / "manifest.json").exists() for key in stages):
        return
    root = Path(__file__).resolve().parents[1]
    cwd = os.getcwd()
    os.chdir(root)  # the twins' paths are relative to the repository root
    try:
        reproduce("dam", seeds=[0], root=MERGE_POOL.relative_to(root), out=tmp_path_factory.mktemp("pool"), tiny=True,
                  only=["pool/"])
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="session", autouse=True)
def _tiny_clip_pool(request):
    """Build the tiny CLIP pool (image stores and a random 2-layer CLIP tower with three task models) that the twins
    of configs/merging/clip and tests/test_merging_clip.py read from tests/assets/merging/clip, once, when needed."""
    if not any("[clip/" in item.nodeid or "merging_clip" in item.nodeid for item in request.session.items):
        return
    from tests.clip_pool import ROOT, build_tiny_clip_pool

    cwd = os.getcwd()
    os.chdir(ROOT)  # the twins' paths are relative to the repository root
    try:
        build_tiny_clip_pool(ROOT)
    finally:
        os.chdir(cwd)
