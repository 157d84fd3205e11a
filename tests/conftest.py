"""Test isolation: seeded, default dtype reset, no process group left behind, runs under tmp dirs."""

import os

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
