"""A hand-built episode in drivesim's per-tick series form, for the reward tests."""

from __future__ import annotations

import numpy as np
import pytest

from envs.drivesim.metric_names import DRIVESIM_METRICS

WARMUP = 3
"""Ticks 0-2 replay the log (eval_relevant 0); ticks 3.. are driven by the policy."""
NUM_TICKS = 11


def build_episode(num_ticks: int = NUM_TICKS, warmup: int = WARMUP, invalid: dict | None = None,
                  **values) -> dict:
    """``{name: (values [T], valid [T], Aggregation)}`` for every drivesim metric.

    Defaults: progress 0.1 * t, gt_dist_traveled_m 50, ttc_s 10, everything else 0; keyword
    arguments replace a series' values; ``invalid={name: [ticks]}`` marks ticks invalid."""
    t = np.arange(num_ticks, dtype=np.float64)
    base = {name: np.zeros(num_ticks) for name in DRIVESIM_METRICS}
    base["eval_relevant"] = (t >= warmup).astype(np.float64)
    base["progress"] = 0.1 * t
    base["gt_dist_traveled_m"] = np.full(num_ticks, 50.0)
    base["ttc_s"] = np.full(num_ticks, 10.0)
    for name, v in values.items():
        assert name in base, name
        base[name] = np.asarray(v, dtype=np.float64)
    out = {}
    for name, v in base.items():
        valid = np.ones(num_ticks, dtype=bool)
        for tick in (invalid or {}).get(name, []):
            valid[tick] = False
        out[name] = (v, valid, DRIVESIM_METRICS[name])
    return out


def flag(*ticks: int, num_ticks: int = NUM_TICKS) -> np.ndarray:
    """A 0/1 series set on ``ticks``."""
    v = np.zeros(num_ticks)
    v[list(ticks)] = 1.0
    return v


@pytest.fixture
def episode():
    return build_episode


@pytest.fixture
def flags():
    return flag
