"""Shared test set-up: marker skipping, an isolated dataset cache, tiny configs."""

from __future__ import annotations

import importlib.util
import os
import tempfile

import pytest
import torch

# One thread: tests are small, and OpenMP threads stall badly on a busy 2-core machine.
torch.set_num_threads(1)

# Generated datasets go to a throw-away cache, never the user's ~/.cache/dymu.
os.environ["DYMU_CACHE"] = tempfile.mkdtemp(prefix="dymu-test-cache-")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    run_slow = config.getoption("--runslow") or os.environ.get("DYMU_RUN_SLOW") == "1"
    has_gpu = torch.cuda.is_available()
    has_trt = importlib.util.find_spec("tensorrt") is not None
    skips = {
        "slow": (run_slow, "slow: run with --runslow or DYMU_RUN_SLOW=1"),
        "gpu": (has_gpu, "gpu: no CUDA device"),
        "trt": (has_trt, "trt: TensorRT is not installed"),
    }
    for item in items:
        for marker, (available, reason) in skips.items():
            if marker in item.keywords and not available:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def _release_run_locks():
    """Library calls keep their run-directory locks until the process ends (the command
    line releases them when a command ends); each test starts and ends holding none."""
    from dymu.lock import release_all

    yield
    release_all()
