"""Shared test fixtures: where the golden sets live, and CPU determinism."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
GOLDEN_ROOT = REPO_ROOT.parent / "shared" / "golden"


def pytest_configure(config):
    torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def golden_root() -> Path:
    if not GOLDEN_ROOT.is_dir():
        pytest.skip(f"golden sets not found at {GOLDEN_ROOT} (../shared is absent)")
    return GOLDEN_ROOT


@pytest.fixture(scope="session")
def golden_tiny(golden_root) -> Path:
    return golden_root / "tiny"


@pytest.fixture(scope="session")
def golden_distil(golden_root) -> Path:
    return golden_root / "tiny_distil"
