"""Shared fixtures: one Ray cluster per test process (for tests marked ``ray``), small scene sets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# keep Ray on 127.0.0.1, without auth tokens or usage reporting, in every test process
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
NUSCENES_MINI = SHARED_DATA / "scenarionet_nuscenes_mini"


@pytest.fixture(scope="session")
def ray_session():
    """The one Ray cluster of this test process (never attaches to another one)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False,
                 object_store_memory=256 * 1024 * 1024, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def nuscenes_mini_dir() -> Path:
    if not NUSCENES_MINI.is_dir() or not any(NUSCENES_MINI.glob("*.pkl")):
        pytest.skip(f"nuScenes-mini scenes not found at {NUSCENES_MINI}")
    return NUSCENES_MINI


@pytest.fixture
def one_thread():
    """Tiny models train faster on one thread, and a busy 2-core machine does not thrash."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
