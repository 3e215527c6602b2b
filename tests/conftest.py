"""Shared fixtures: every test writes under tmp_path only, and leaves no process group behind."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One intra-op thread per process: DDP tests run two processes on two cores, and timings stay out of the tests.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_and_cleanup():
    torch.manual_seed(0)
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.fixture(autouse=True)
def _no_artifacts_in_cwd(tmp_path, monkeypatch):
    """Run each test from its own tmp_path so nothing lands in the repository."""
    monkeypatch.chdir(tmp_path)
