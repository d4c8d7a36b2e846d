"""Shared test fixtures: where the golden sets live, CPU determinism, and the host heap policy of the test process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffgentor.engine.allocator import configure_heap, release_free_heap
from diffgentor.engine.config import EngineConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
GOLDEN_ROOT = REPO_ROOT.parent / "shared" / "golden"


def pytest_configure(config):
    torch.set_num_threads(min(2, torch.get_num_threads()))
    # the test process allocates like an engine process (engine/allocator.py), from its first test on, whatever the
    # order; DG_HUNYUAN_IMAGE_3_HEAP_REUSE_MEMORY=0 runs the suite with glibc's defaults instead
    configure_heap(EngineConfig.from_cli_and_env({}).cache.heap_reuse_bytes)


@pytest.fixture(autouse=True)
def _return_freed_heap():
    """Between tests the process is idle: what one test freed is not kept for the next (7 suites share a box)."""
    yield
    release_free_heap()


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
