"""Synthetic observation batches for policy tests (built from alpagym_ray.observations SPECS)."""

from __future__ import annotations

import math

import pytest
import torch

from alpagym_ray.observations import SPECS, mask_key


def random_obs(batch: int, keys, seed: int = 0, mask_prob: float = 0.7) -> dict[str, torch.Tensor]:
    """Random features for ``keys`` and random masks (each element kept with ``mask_prob``)."""
    g = torch.Generator().manual_seed(seed)
    obs = {}
    for k in keys:
        shape = SPECS[k].shape
        obs[k] = torch.randn((batch, *shape), generator=g)
        obs[mask_key(k)] = torch.rand((batch, shape[0]), generator=g) < mask_prob
    return obs


def driving_samples(n: int, horizon: int = 20, seed: int = 0) -> dict[str, torch.Tensor]:
    """A behaviour-cloning dataset whose expert future is a known function of the observation.

    Each sample drives at speed v (visible in ``ego_history``) with a constant acceleration a (the
    history's ``accel_lon``) along a circular arc of curvature k (visible only in the ``route``
    waypoints, 4 m apart). The history itself is straight, so constant velocity misses both the
    curve and the acceleration; a policy that reads the route and the history can predict the
    future exactly."""
    g = torch.Generator().manual_seed(seed)
    v = torch.rand(n, generator=g) * 15 + 2
    a = (torch.rand(n, generator=g) - 0.5) * 3
    k = (torch.rand(n, generator=g) - 0.5) * 0.06
    hist = torch.zeros(n, 16, 7)
    t_hist = torch.arange(-15, 1) * 0.1
    hist[..., 0] = v[:, None] * t_hist
    hist[..., 2] = 1.0
    hist[..., 4] = v[:, None]
    hist[..., 5] = a[:, None]
    s_route = torch.arange(1, 21) * 4.0
    route = torch.zeros(n, 20, 3)
    route[..., 0], route[..., 1], _ = _arc(s_route[None], k[:, None])
    t = torch.arange(1, horizon + 1) * 0.1
    s = (v[:, None] * t + 0.5 * a[:, None] * t**2).clamp(min=0)
    x, y, yaw = _arc(s, k[:, None])
    target = torch.stack([x, y, yaw], -1)
    return {
        "ego_history": hist, "ego_history_mask": torch.ones(n, 16, dtype=torch.bool),
        "route": route, "route_mask": torch.ones(n, 20, dtype=torch.bool),
        "target": target, "target_mask": torch.ones(n, horizon, dtype=torch.bool),
    }


def _arc(s: torch.Tensor, k: torch.Tensor):
    """Point at arc length ``s`` on a circle of curvature ``k`` leaving the origin along +x."""
    safe = torch.where(k.abs() < 1e-6, torch.full_like(k, 1e-6), k)
    x = torch.sin(safe * s) / safe
    y = (1 - torch.cos(safe * s)) / safe
    return x, y, torch.remainder(k * s + math.pi, 2 * math.pi) - math.pi


@pytest.fixture
def make_obs():
    return random_obs


@pytest.fixture
def make_driving():
    return driving_samples
