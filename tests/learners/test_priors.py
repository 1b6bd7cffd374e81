import math

import torch

from learners.priors import along_polyline, constant_velocity_control, route_control


def test_along_polyline_known_answers():
    pts = torch.tensor([[[0.0, 0.0], [4.0, 0.0], [4.0, 4.0]]])
    ok = torch.ones(1, 3, dtype=torch.bool)
    out = along_polyline(pts, ok, torch.tensor([[2.0, 6.0, 10.0]]))
    # along the L, then straight on along the last segment (+y)
    torch.testing.assert_close(out[0], torch.tensor([[2.0, 0.0], [4.0, 2.0], [4.0, 6.0]]))
    # invalid vertices are skipped
    pts = torch.tensor([[[0.0, 0.0], [4.0, 0.0], [99.0, -5.0], [8.0, 0.0]]])
    ok = torch.tensor([[True, True, False, True]])
    torch.testing.assert_close(along_polyline(pts, ok, torch.tensor([[6.0, 9.0]]))[0],
                               torch.tensor([[6.0, 0.0], [9.0, 0.0]]))
    # nothing but the start: straight ahead along +x
    ok = torch.tensor([[True, False, False, False]])
    torch.testing.assert_close(along_polyline(pts, ok, torch.tensor([[3.0]]))[0], torch.tensor([[3.0, 0.0]]))


def _obs(route_xy: torch.Tensor, speed: float, yaw_rate: float = 0.0) -> dict[str, torch.Tensor]:
    hist = torch.zeros(1, 16, 7)
    hist[:, -1, 4], hist[:, -1, 6] = speed, yaw_rate
    route = torch.cat([route_xy, torch.zeros(*route_xy.shape[:-1], 1)], -1)
    return {"ego_history": hist, "ego_history_mask": torch.ones(1, 16, dtype=torch.bool),
            "route": route, "route_mask": torch.ones(1, route.shape[1], dtype=torch.bool)}


def test_route_prior_follows_a_curve_at_the_current_speed():
    r, v = 50.0, 10.0
    s = torch.arange(1, 21) * 4.0  # waypoints 4 m apart on a left-hand circle through the origin
    route = torch.stack([r * torch.sin(s / r), r * (1 - torch.cos(s / r))], -1)[None]
    steps = (4, 8, 12, 16, 20)
    out = route_control(_obs(route, v), steps)[0]
    arc = torch.tensor(steps) * 0.1 * v
    expected = torch.stack([r * torch.sin(arc / r), r * (1 - torch.cos(arc / r))], -1)
    torch.testing.assert_close(out, expected, atol=0.05, rtol=0)  # chords of a 4 m polyline
    # the constant-velocity prior with a zero yaw rate goes straight instead
    cv = constant_velocity_control(_obs(route, v), steps)[0]
    torch.testing.assert_close(cv, torch.stack([arc, torch.zeros(5)], -1))
    cv = constant_velocity_control(_obs(route, v, yaw_rate=v / r), steps)[0]
    torch.testing.assert_close(cv, expected, atol=1e-3, rtol=0)
    assert math.isclose(float(out[-1].norm()), float(expected[-1].norm()), abs_tol=0.05)


def test_route_prior_when_stopped_or_without_route():
    s = torch.arange(1, 21) * 4.0
    route = torch.stack([s, torch.zeros(20)], -1)[None]
    assert torch.equal(route_control(_obs(route, 0.0), (4, 8)), torch.zeros(1, 2, 2))
    obs = _obs(route, 5.0)
    obs["route_mask"][:] = False
    torch.testing.assert_close(route_control(obs, (10,)), torch.tensor([[[5.0, 0.0]]]))
