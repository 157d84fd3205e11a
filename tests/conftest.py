"""Test isolation: seeded, default dtype reset, no process group left behind, runs under tmp dirs."""

import hashlib
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    """The known warnings of recipes/quiet.py (pytest's own warning capture would show them again)."""
    from recipes.quiet import KNOWN_WARNINGS

    for pattern in KNOWN_WARNINGS:
        config.addinivalue_line("filterwarnings", f"ignore:{pattern}")


# variables through which a process learns that an outside launcher started it as one rank of several; one left
# in os.environ makes every later `fit` with devices=2 (and its children) wait for ranks nobody starts
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "MASTER_ADDR",
                 "MASTER_PORT")  # fmt: skip


@pytest.fixture(autouse=True)
def _isolation(tmp_path, monkeypatch):
    torch.manual_seed(0)
    torch.set_num_threads(1)  # small models: threads only add contention (and CI has 2 cores)
    torch.set_default_dtype(torch.float32)
    before = {k: os.environ.get(k) for k in LAUNCHER_VARS}
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    leaked = {k: os.environ.get(k) for k in LAUNCHER_VARS if os.environ.get(k) != before[k]}
    for k, v in before.items():  # restore first, so one leak does not hang the rest of the session
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    assert not leaked, f"the test left launcher variables in os.environ: {leaked}"


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run with the working directory in a tmp dir (relative run dirs land there)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


ROOT = Path(__file__).resolve().parents[1]
MERGE_POOL = Path(__file__).parent / "assets" / "merging"  # generated, git-ignored


def _build_merge_pool(tmp_path_factory) -> None:
    """The tiny merge pool (8x8 images, width-4 CNN: a backbone and five task models) that the merging tests and the
    twins of configs/merging read from tests/assets/merging. It is built by the ``dam`` comparison's own pool stages
    on the tiny twins, so it is the same recipe at toy size."""
    from recipes.reproduce import COMPARISONS, load_comparisons, reproduce

    load_comparisons()
    stages = [s for s in COMPARISONS["dam"].stages if s.key.startswith("pool/")]
    # the cache is keyed by the pool's recipe (stage overrides and the twins' configs), so a pool built by an older
    # version of the recipe is rebuilt instead of silently reused
    recipe = repr([(s.key, s.config, s.overrides) for s in stages])
    recipe += "".join(p.read_text() for p in sorted((ROOT / "tests" / "configs" / "merging").glob("*.yaml")))
    digest = hashlib.sha256(recipe.encode()).hexdigest()
    stamp = MERGE_POOL / "dam" / "recipe.sha256"
    built = all((MERGE_POOL / "dam" / s.key / "seed0" / "artifact" / "manifest.json").exists() for s in stages)
    if built and stamp.exists() and stamp.read_text() == digest:
        return
    shutil.rmtree(MERGE_POOL / "dam", ignore_errors=True)
    reproduce("dam", seeds=[0], root=MERGE_POOL.relative_to(ROOT), out=tmp_path_factory.mktemp("pool"), tiny=True,
              only=["pool/"])
    stamp.write_text(digest)


def _build_clip_pool(tmp_path_factory) -> None:
    """Image stores and a random 2-layer CLIP tower with three task models (configs/merging/clip twins)."""
    from tests.clip_pool import build_tiny_clip_pool

    build_tiny_clip_pool(ROOT)


def _write_sst2(tmp_path_factory) -> None:
    """The tiny SST-2 export, through the exporter's writer (configs/w2sdefense/llama3_8b_* twins)."""
    from tests.tiny_sst2 import write_tiny_sst2

    write_tiny_sst2()


def _write_wmdp(tmp_path_factory) -> None:
    """The tiny WMDP-style store of country facts, through the exporter's writer (configs/tar/llama3_8b_tar_fsdp)."""
    from tests.tar_wmdp_store import TINY_WMDP, write_tiny_wmdp_store

    write_tiny_wmdp_store(ROOT / TINY_WMDP)


# generated, git-ignored test assets: (parts of the test ids that need them, builder)
TINY_ASSETS = [
    (("merging",), _build_merge_pool),  # test_merging*.py, configs/merging twins
    (("[clip/", "merging_clip"), _build_clip_pool),
    (("llama3_8b", "text_export"), _write_sst2),
    (("llama3_8b_tar_fsdp", "tar_wmdp"), _write_wmdp),
]


@pytest.fixture(scope="session", autouse=True)
def _tiny_assets(request, tmp_path_factory):
    """Build each generated asset of :data:`TINY_ASSETS` once per session, only when a collected test needs it, with
    the working directory at the repository root (the twins' paths are relative to it)."""
    ids = [item.nodeid for item in request.session.items]
    cwd = os.getcwd()
    try:
        for needles, build in TINY_ASSETS:
            if any(needle in node for node in ids for needle in needles):
                os.chdir(ROOT)
                build(tmp_path_factory)
    finally:
        os.chdir(cwd)
