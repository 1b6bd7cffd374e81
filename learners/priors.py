"""Priors a trajectory policy's mixture is centred on: where the ego goes if nothing changes.

Both return control points ``[B, C, 2]`` (ego frame) at control times ``times [C]`` (s):

* :func:`constant_velocity_control`: the arc at the current speed and yaw rate (``ego_history``);
* :func:`route_control`: the route polyline (``route`` waypoints, from the ego origin) travelled at
  the current speed. Following the route is the default behaviour a driving policy deviates from;
  unlike the constant-velocity arc it turns into curves before the ego's yaw rate does, and it
  leads back to the route after a drift, so a policy centred on it recovers in closed loop.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from alpagym_ray.observations import SPECS, mask_key
from learners.baselines import constant_velocity_trajectory

_HIST = SPECS["ego_history"].features
SPEED, YAW_RATE = _HIST.index("speed"), _HIST.index("yaw_rate")
EXTEND_M = 1000.0
"""Past the last route waypoint the polyline continues straight along its last segment."""


def current_speed_yaw_rate(obs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(speed [B] >= 0, yaw_rate [B])`` from the last row of ``ego_history`` (0 where invalid)."""
    hist = obs["ego_history"]
    now = obs[mask_key("ego_history")][:, -1].to(hist.dtype)
    return hist[:, -1, SPEED].clamp(min=0.0) * now, hist[:, -1, YAW_RATE] * now


def constant_velocity_control(obs: Mapping[str, torch.Tensor], steps: tuple[int, ...]) -> torch.Tensor:
    """Constant speed and yaw rate: control points ``[B, C, 2]`` at the 1-based ``steps``."""
    speed, yaw_rate = current_speed_yaw_rate(obs)
    traj = constant_velocity_trajectory(speed, yaw_rate, max(steps))
    idx = torch.as_tensor([s - 1 for s in steps], device=traj.device)
    return traj[:, idx, :2]


def along_polyline(points: torch.Tensor, valid: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
    """Positions ``[B, C, 2]`` at arc lengths ``dist [B, C]`` along polylines ``points [B, P, 2]``.

    Invalid vertices (``valid [B, P]`` False) are skipped; vertex 0 must be valid. The polyline is
    extended straight past its last valid vertex (direction of its last non-degenerate segment;
    +x when it has none)."""
    b, p, _ = points.shape
    ar = torch.arange(p, device=points.device).expand(b, p)
    last = torch.where(valid, ar, torch.zeros_like(ar)).cummax(dim=1).values  # hold the last valid vertex
    pts = points.gather(1, last[..., None].expand(-1, -1, 2))
    seg = pts[:, 1:] - pts[:, :-1]
    seg_len = torch.linalg.vector_norm(seg, dim=-1)
    # direction of the last segment longer than 1 cm, for the straight extension
    has = seg_len > 1e-2
    j_last = torch.where(has, ar[:, 1:] - 1, torch.full_like(ar[:, 1:], -1)).amax(dim=1)
    j = j_last.clamp(min=0)
    d = seg.gather(1, j[:, None, None].expand(-1, 1, 2)).squeeze(1)
    d = d / seg_len.gather(1, j[:, None]).clamp(min=1e-6)
    ahead = torch.tensor([1.0, 0.0], device=points.device, dtype=points.dtype).expand(b, 2)
    d = torch.where((j_last >= 0)[:, None], d, ahead)
    pts = torch.cat([pts, (pts[:, -1] + EXTEND_M * d)[:, None]], dim=1)
    seg = pts[:, 1:] - pts[:, :-1]
    seg_len = torch.linalg.vector_norm(seg, dim=-1)
    s = torch.cat([torch.zeros_like(seg_len[:, :1]), seg_len.cumsum(dim=1)], dim=1)  # [B, P + 1]
    j = (torch.searchsorted(s.contiguous(), dist.contiguous(), right=True) - 1).clamp(0, p - 1)  # [B, C]
    frac = (dist - s.gather(1, j)) / seg_len.gather(1, j).clamp(min=1e-6)
    start = pts.gather(1, j[..., None].expand(-1, -1, 2))
    return start + frac.clamp(0, 1)[..., None] * seg.gather(1, j[..., None].expand(-1, -1, 2))


def route_control(obs: Mapping[str, torch.Tensor], steps: tuple[int, ...], dt: float = 0.1) -> torch.Tensor:
    """Along the route at the current speed: control points ``[B, C, 2]`` at the 1-based ``steps``.

    The polyline starts at the ego (the origin) and runs through the valid route waypoints; without
    any valid waypoint it runs straight ahead."""
    route = obs["route"][..., :2]
    valid = obs[mask_key("route")].bool()
    b = route.shape[0]
    points = torch.cat([route.new_zeros(b, 1, 2), route], dim=1)
    ok = torch.cat([valid.new_ones(b, 1), valid], dim=1)
    speed, _ = current_speed_yaw_rate(obs)
    t = torch.as_tensor(steps, device=route.device, dtype=route.dtype) * dt
    return along_polyline(points, ok, speed[:, None] * t)
