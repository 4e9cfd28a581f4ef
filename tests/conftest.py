"""Shared fixtures and reference implementations (float64, written from method.md)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

# Tests are small; one thread keeps them fast and deterministic on 2 shared cores.
torch.set_num_threads(int(os.environ.get("PATTERNNET_TEST_THREADS", "1")))

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
