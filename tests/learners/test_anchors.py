import math

import pytest
import torch

from learners.anchors import (
    control_points_of,
    control_steps,
    default_num_control_points,
    fan_anchors,
    kmeans_anchors,
    spline_basis,
    trajectory_from_control,
    yaw_from_velocity,
)


def test_control_steps_known_answers():
    assert control_steps(20, 5) == (4, 8, 12, 16, 20)
    assert control_steps(64, 16) == tuple(range(4, 65, 4))
    assert control_steps(5, 5) == (1, 2, 3, 4, 5)
    assert default_num_control_points(20) == 5
    assert default_num_control_points(64) == 16
    assert default_num_control_points(5) == 2
    with pytest.raises(ValueError, match="num_control_points"):
        control_steps(5, 6)


def test_spline_interpolates_and_reproduces_lines():
    steps = control_steps(20, 5)
    w, dw = spline_basis(20, steps)
    assert w.shape == (20, 5) and dw.shape == (20, 5)
    # rows at the control steps are exact unit vectors: control points read back bit for bit
    assert torch.equal(w[[s - 1 for s in steps]], torch.eye(5))
    # a constant-speed straight line (linear in time, through the origin) is reproduced exactly
    v = 1.3  # m per step
    control = torch.tensor([[v * s, -0.5 * v * s] for s in steps])
    xy = w @ control
    t = torch.arange(1, 21, dtype=torch.float32)
    torch.testing.assert_close(xy, torch.stack([v * t, -0.5 * v * t], -1), atol=1e-5, rtol=0)
    torch.testing.assert_close(dw @ control, torch.tensor([[v, -0.5 * v]]).expand(20, 2), atol=1e-5, rtol=0)


def test_trajectory_round_trip_of_control_points():
    steps = control_steps(20, 5)
    w, dw = spline_basis(20, steps)
    control = torch.randn(7, 5, 2) * 10
    traj = trajectory_from_control(control, w, dw)
    assert traj.shape == (7, 20, 3)
    assert torch.equal(control_points_of(traj, steps), control)


def test_yaw_straight_arc_stop_and_reverse():
    # straight ahead: yaw 0
    vel = torch.tensor([1.0, 0.0]).expand(1, 10, 2)
    assert torch.equal(yaw_from_velocity(vel), torch.zeros(1, 10))
    # a left arc: heading = direction of velocity
    ang = torch.linspace(0.1, 1.0, 10)
    vel = torch.stack([torch.cos(ang), torch.sin(ang)], -1)[None]
    torch.testing.assert_close(yaw_from_velocity(vel), ang[None])
    # moving then stopped: the heading is held
    vel = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]])[None]
    torch.testing.assert_close(yaw_from_velocity(vel), torch.full((1, 4), math.pi / 2))
    # never moving: the current heading (0)
    assert torch.equal(yaw_from_velocity(torch.zeros(1, 4, 2)), torch.zeros(1, 4))
    # creeping backwards: a reversing car keeps heading 0 instead of turning around
    vel = torch.tensor([[-0.2, 0.0], [-0.2, 0.0], [0.3, 0.0]])[None]
    torch.testing.assert_close(yaw_from_velocity(vel), torch.zeros(1, 3), atol=1e-6, rtol=0)


def test_kmeans_recovers_separated_clusters_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    pts = centres.repeat_interleave(50, 0) + 0.1 * torch.randn(150, 2, generator=g)
    control = pts[:, None, :]  # [N, C=1, 2]
    a = kmeans_anchors(control, 3, seed=1)
    b = kmeans_anchors(control, 3, seed=1)
    assert torch.equal(a, b)
    assert a.shape == (3, 1, 2)
    found = a[:, 0]
    dist = torch.cdist(centres, found).min(dim=1).values
    assert (dist < 0.1).all()
    with pytest.raises(ValueError, match="at least num_anchors"):
        kmeans_anchors(control[:2], 3)


def test_fan_anchors_cover_stop_and_straight():
    steps = control_steps(20, 5)
    a = fan_anchors(16, steps)
    assert a.shape == (16, 5, 2)
    assert torch.isfinite(a).all()
    assert (a.norm(dim=-1).amax(-1) == 0).any()  # a standing-still anchor
    t = torch.tensor(steps, dtype=torch.float32) * 0.1
    straight_fast = a[-4:]  # fastest speed row includes a near-straight arc
    assert (straight_fast[..., 0].amax(0) <= 25.0 * t + 1e-4).all()
