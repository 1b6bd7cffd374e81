"""Trajectory anchors and the control-point parameterisation of a trajectory action.

A trajectory is parameterised by ``C`` control points: the ego-frame positions ``(x, y)`` at ``C``
control steps ``t_1 < ... < t_C = H`` (steps of 0.1 s). The full trajectory is the natural cubic
spline through the current pose (the origin at ``t = 0``) and the control points, evaluated at
``t = 1..H``; yaw is the direction of motion (:func:`yaw_from_velocity`). The spline interpolates,
so the control points can be read back from a trajectory exactly (:func:`control_points_of`), which
is what makes a policy's log-probability recomputable from the stored action alone.

Anchors are ``K`` typical control-point sets: k-means over logged expert futures
(:func:`kmeans_anchors`), or a fan of constant-speed arcs when no data is at hand
(:func:`fan_anchors`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.interpolate import CubicSpline

from alpagym_ray.policy import ACTION_DT


def default_num_control_points(horizon: int) -> int:
    """One control point every 0.4 s (4 steps), at least 2 and at most 16."""
    return max(2, min(16, math.ceil(horizon / 4)))


def control_steps(horizon: int, num_control_points: int) -> tuple[int, ...]:
    """Control steps ``t_c`` (1-based step numbers, last = ``horizon``), spread evenly.

    Raises ValueError when they cannot be distinct (``num_control_points > horizon``)."""
    if not 1 <= num_control_points <= horizon:
        raise ValueError(
            f"num_control_points must be in [1, horizon={horizon}], got {num_control_points}"
        )
    steps = tuple(round(horizon * (c + 1) / num_control_points) for c in range(num_control_points))
    if len(set(steps)) != len(steps) or steps[0] < 1:
        raise ValueError(f"control steps {steps} are not distinct for horizon {horizon}")
    return steps


def spline_basis(horizon: int, steps: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear maps from control values to the trajectory and to its time derivative.

    Returns ``(W [H, C], dW [H, C])`` float32 such that ``traj[t - 1] = W[t - 1] @ y`` and
    ``d traj / d step`` at ``t`` is ``dW[t - 1] @ y`` for the natural cubic spline through
    ``(0, 0)`` and ``(t_c, y_c)``. Rows at the control steps are exact unit vectors.
    """
    knots = np.array((0.0, *map(float, steps)))
    t = np.arange(1, horizon + 1, dtype=np.float64)
    c = len(steps)
    values = np.zeros((c + 1, c))
    values[1:] = np.eye(c)
    if c == 1:  # a straight line through the origin (a spline needs 3 knots for curvature)
        w = (t / steps[0])[:, None]
        dw = np.full((horizon, 1), 1.0 / steps[0])
    else:
        spline = CubicSpline(knots, values, axis=0, bc_type="natural")
        w, dw = spline(t), spline(t, 1)
    w[np.array(steps) - 1] = np.eye(c)  # exact, so control points read back bit for bit
    return torch.from_numpy(w).float(), torch.from_numpy(dw).float()


def control_points_of(traj: torch.Tensor, steps: tuple[int, ...]) -> torch.Tensor:
    """``traj [..., H, >=2]`` -> control points ``[..., C, 2]`` (positions at the control steps)."""
    idx = torch.as_tensor([s - 1 for s in steps], device=traj.device)
    return traj[..., idx, :2]


def yaw_from_velocity(vel: torch.Tensor, min_speed: float = 0.5) -> torch.Tensor:
    """Heading ``[..., H]`` of a path from its velocity ``vel [..., H, 2]`` (m per step).

    The heading is the direction of motion; below ``min_speed`` (m/s) the last heading is held
    (0 = the current ego heading before any motion), and motion against the held heading (more than
    90 degrees off in one step) counts as reversing, so the car keeps its heading instead of
    spinning around. Deterministic and loop-free.
    """
    moving = vel.norm(dim=-1) > min_speed * ACTION_DT
    theta = torch.atan2(vel[..., 1], vel[..., 0])
    h = theta.shape[-1]
    # hold the last moving heading: index of the last moving step at or before t (-1: none yet)
    ar = torch.arange(h, device=vel.device).expand_as(theta)
    last = torch.where(moving, ar, torch.full_like(ar, -1)).cummax(dim=-1).values
    padded = torch.cat([torch.zeros_like(theta[..., :1]), theta], dim=-1)  # slot 0: heading 0
    held = padded.gather(-1, last + 1)
    # reversing: a jump of more than 90 degrees between consecutive held headings flips the parity
    prev = torch.cat([torch.zeros_like(held[..., :1]), held[..., :-1]], dim=-1)
    jump = torch.remainder(held - prev + math.pi, 2 * math.pi) - math.pi
    flips = (jump.abs() > math.pi / 2).long().cumsum(dim=-1) % 2
    yaw = held + math.pi * flips
    return torch.remainder(yaw + math.pi, 2 * math.pi) - math.pi


def trajectory_from_control(
    control: torch.Tensor, w: torch.Tensor, dw: torch.Tensor, min_speed: float = 0.5
) -> torch.Tensor:
    """Control points ``[..., C, 2]`` -> trajectory action ``[..., H, 3]`` (x, y, yaw)."""
    xy = torch.einsum("hc,...cd->...hd", w, control)
    vel = torch.einsum("hc,...cd->...hd", dw, control)
    return torch.cat([xy, yaw_from_velocity(vel, min_speed)[..., None]], dim=-1)


def fan_anchors(num_anchors: int, steps: tuple[int, ...], max_speed: float = 25.0) -> torch.Tensor:
    """``[K, C, 2]`` constant-speed, constant-yaw-rate arcs: a prior for a policy without data.

    Speeds spread over ``[0, max_speed]`` m/s and lateral accelerations over ±3 m/s²."""
    n_speed = max(1, int(round(math.sqrt(num_anchors))))
    n_turn = math.ceil(num_anchors / n_speed)
    speeds = np.linspace(0.0, max_speed, n_speed)
    lat = np.linspace(-3.0, 3.0, n_turn) if n_turn > 1 else np.zeros(1)
    t = np.array(steps, dtype=np.float64) * ACTION_DT
    out = []
    for v in speeds:
        for a in lat:
            w = a / max(v, 1.0)  # yaw rate (rad/s) giving lateral acceleration a at speed v
            x, y = _arc(v, w, t)
            out.append(np.stack([x, y], axis=-1))
    return torch.from_numpy(np.stack(out[:num_anchors])).float()


def residual_fan_anchors(num_anchors: int, steps: tuple[int, ...]) -> torch.Tensor:
    """``[K, C, 2]`` deviations from a constant-velocity prior: constant longitudinal accelerations
    in [-3, 2] m/s² crossed with lateral ones in [-2, 2] m/s² (``(a t²/2, l t²/2)``)."""
    n_lon = max(1, int(round(math.sqrt(num_anchors))))
    n_lat = math.ceil(num_anchors / n_lon)
    lon = np.linspace(-3.0, 2.0, n_lon) if n_lon > 1 else np.zeros(1)
    lat = np.linspace(-2.0, 2.0, n_lat) if n_lat > 1 else np.zeros(1)
    half_t2 = 0.5 * (np.array(steps, dtype=np.float64) * ACTION_DT) ** 2
    out = [np.stack([a * half_t2, b * half_t2], -1) for a in lon for b in lat]
    return torch.from_numpy(np.stack(out[:num_anchors])).float()


def _arc(v: float, w: float, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rear-axle position after ``t`` s at constant speed ``v`` and yaw rate ``w`` from the origin."""
    if abs(w) < 1e-6:
        return v * t, np.zeros_like(t)
    return v * np.sin(w * t) / w, v * (1 - np.cos(w * t)) / w


def kmeans_anchors(
    control: torch.Tensor, num_anchors: int, seed: int = 0, iters: int = 50
) -> torch.Tensor:
    """K-means (k-means++ initialisation, Lloyd iterations) over control points ``[N, C, 2]``.

    Returns ``[K, C, 2]`` cluster centres, deterministic for a seed. An empty cluster is re-seeded
    at the point farthest from its centre. Raises ValueError when ``N < K``."""
    n = control.shape[0]
    if n < num_anchors:
        raise ValueError(f"k-means needs at least num_anchors={num_anchors} samples, got {n}")
    x = control.reshape(n, -1).double().cpu()
    gen = torch.Generator().manual_seed(seed)
    centres = [x[torch.randint(n, (1,), generator=gen)].squeeze(0)]
    d2 = ((x - centres[0]) ** 2).sum(-1)
    for _ in range(1, num_anchors):
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / n)
        i = torch.multinomial(probs, 1, generator=gen).item()
        centres.append(x[i])
        d2 = torch.minimum(d2, ((x - x[i]) ** 2).sum(-1))
    c = torch.stack(centres)
    for _ in range(iters):
        dist = torch.cdist(x, c)
        assign = dist.argmin(dim=1)
        new = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=num_anchors).to(x.dtype)
        empty = counts == 0
        new = new / counts.clamp(min=1)[:, None]
        if empty.any():
            far = dist.gather(1, assign[:, None]).squeeze(1).argsort(descending=True)
            new[empty] = x[far[: int(empty.sum())]]
        if torch.allclose(new, c):
            c = new
            break
        c = new
    return c.reshape(num_anchors, *control.shape[1:]).float()
