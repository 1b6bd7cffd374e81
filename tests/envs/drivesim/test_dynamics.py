"""Known answers for drivesim's ego dynamics, plans, tracking controller and action sanitising.

The controller acceptance test replays synthetic logged drives (exactly integrated rear-axle
tracks) the way the env does: at every decision (every 2 ticks) the action is the logged future
poses in the current, simulated ego frame; the controller and the bicycle model run every tick.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from envs.drivesim.dynamics import (
    ControllerConfig,
    VehicleLimits,
    bicycle_step,
    perfect_tracking,
    plan_state_at,
    plan_to_world,
    rear_axle_to_center,
    sanitize_action,
    sanitize_tick_action,
    track,
    wrap_angle,
)

DT = 0.1
LIMITS = VehicleLimits()


def t32(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float32)


# ---- synthetic logs -----------------------------------------------------------------------------
def make_log(speed_knots, curv_knots, steps: int, sub: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Rear-axle poses ``[steps, 3]`` and speeds ``[steps]`` every 0.1 s of a vehicle whose speed is
    piecewise linear in time (``(t, v)`` knots) and curvature piecewise linear in arc length
    (``(s, κ)`` knots, clothoids), integrated with the trapezoid rule on a fine grid."""
    t = np.arange((steps - 1) * sub + 1) * (DT / sub)
    v = np.interp(t, *speed_knots)
    s = np.concatenate([[0.0], np.cumsum(0.5 * (v[1:] + v[:-1]) * np.diff(t))])
    k = np.interp(s, *curv_knots)
    ds = np.diff(s)
    yaw = np.concatenate([[0.0], np.cumsum(0.5 * (k[1:] + k[:-1]) * ds)])
    mid = 0.5 * (yaw[1:] + yaw[:-1])
    x = np.concatenate([[0.0], np.cumsum(np.cos(mid) * ds)])
    y = np.concatenate([[0.0], np.cumsum(np.sin(mid) * ds)])
    pose = np.stack([x, y, yaw], -1)[::sub]
    return pose, v[::sub]


def turn(start: float, ramp: float, kmax: float, angle: float):
    """Curvature knots of a clothoid-arc-clothoid turn by ``angle`` starting at arc ``start``."""
    arc = (angle - kmax * ramp) / kmax
    s = [0.0, start, start + ramp, start + ramp + arc, start + 2 * ramp + arc, 1e6]
    return s, [0.0, 0.0, kmax, kmax, 0.0, 0.0]


def const(value: float):
    return [0.0, 1e6], [value, value]


def profile(v0: float, *phases):
    """Speed knots from ``v0`` through ``(duration, accel)`` phases, clamped at 0."""
    t, v = [0.0], [v0]
    for duration, accel in phases:
        t.append(t[-1] + duration)
        v.append(max(v[-1] + accel * duration, 0.0))
    t.append(1e4)
    v.append(v[-1])
    return t, v


S_CURVE_S = np.linspace(0.0, 3000.0, 3001)
SCENARIOS = {
    "straight_15mps": (const(15.0), const(0.0)),
    "circle_r20": (const(8.0), const(1 / 20)),
    "circle_r50": (const(15.0), const(1 / 50)),
    "circle_r200_right": (const(25.0), const(-1 / 200)),
    "s_curve_r50": (const(14.0), (S_CURVE_S, 0.02 * np.sin(2 * np.pi * S_CURVE_S / 120))),
    "s_curve_r20": (const(6.0), (S_CURVE_S, 0.05 * np.sin(2 * np.pi * S_CURVE_S / 60))),
    "stop_and_go": (profile(10.0, (3, 0), (10 / 3, -3), (2, 0), (5, 2)), const(1 / 100)),
    "intersection_turn": (profile(10.0, (2, 0), (3, -2), (4, 0), (6, 1.5)), turn(45, 6, 1 / 12, math.pi / 2)),
    "from_standstill": (profile(0.0, (1, 0), (4.8, 2.5)), const(1 / 40)),
    "hard_brake": (profile(20.0, (2, 0), (20 / 6, -6), (3, 0), (4, 3)), const(0.0)),
    "slow_turn_to_stop": (profile(5.0, (2, -2.5), (2, 0), (6, 1.5)), turn(3, 4, 1 / 10, math.pi / 2)),
}


def logs(names, steps):
    poses, speeds = zip(*(make_log(*SCENARIOS[n], steps) for n in names), strict=True)
    return t32(np.stack(poses)), t32(np.stack(speeds))


def to_ego(world: torch.Tensor, pose: torch.Tensor) -> torch.Tensor:
    """World poses ``[B, H, 3]`` in the ego frame of ``pose [B, 3]`` (what a replay policy emits)."""
    c, s = torch.cos(pose[:, None, 2]), torch.sin(pose[:, None, 2])
    dx, dy = world[..., 0] - pose[:, None, 0], world[..., 1] - pose[:, None, 1]
    return torch.stack([c * dx + s * dy, -s * dx + c * dy, world[..., 2] - pose[:, None, 2]], -1)


def replay_errors(log, speed, horizon, ticks, every=2, cfg=None, rate_limit=True, plan_log=None,
                  start_offset=None):
    """Closed-loop replay of logs ``[B, T, 3]``; per-tick position errors ``[B, ticks]``."""
    cfg = cfg or ControllerConfig()
    plan_log = log if plan_log is None else plan_log
    pose, v = log[:, 0].clone(), speed[:, 0].clone()
    if start_offset is not None:
        pose = pose + t32(start_offset)
    k_prev = torch.zeros_like(v) if rate_limit else None
    errors = []
    for tick in range(ticks):
        if tick % every == 0:
            plan = plan_to_world(to_ego(plan_log[:, tick + 1 : tick + 1 + horizon], pose), pose)
            tau = torch.zeros_like(v)
        accel, curv = track(pose, v, plan, tau, DT, LIMITS, cfg)
        pose, v, _, k_applied = bicycle_step(pose, v, accel, curv, DT, LIMITS, prev_curvature=k_prev)
        k_prev = k_applied if rate_limit else None
        tau = tau + DT
        errors.append(torch.linalg.vector_norm(pose[:, :2] - log[:, tick + 1, :2], dim=-1))
        assert bool((v >= 0).all())
    return torch.stack(errors, 1)


# ---- limits and configs -------------------------------------------------------------------------
def test_limits_and_config_reject_bad_values():
    with pytest.raises(ValueError, match="max_decel"):
        VehicleLimits(max_decel=-9.0)
    with pytest.raises(ValueError, match="max_speed"):
        VehicleLimits(max_speed=float("nan"))
    with pytest.raises(ValueError, match="max_lookahead"):
        ControllerConfig(min_lookahead=5.0, max_lookahead=2.0)
    with pytest.raises(ValueError, match="speed_horizon"):
        ControllerConfig(speed_horizon=0.1)
    with pytest.raises(ValueError, match="feedforward"):
        ControllerConfig(feedforward=2.0)


# ---- bicycle model ------------------------------------------------------------------------------
def test_straight_at_constant_speed():
    pose = t32([[1.0, 2.0, math.pi / 2]])
    speed = t32([10.0])
    for _ in range(10):
        pose, speed, accel, curv = bicycle_step(pose, speed, t32([0.0]), t32([0.0]), DT, LIMITS)
    assert torch.allclose(pose, t32([[1.0, 12.0, math.pi / 2]]), atol=1e-4)
    assert speed.item() == pytest.approx(10.0)
    assert accel.item() == pytest.approx(0.0, abs=1e-5)
    assert curv.item() == 0.0


def test_constant_curvature_circle_returns_to_start():
    kappa, steps = 0.1, 100                          # radius 10 m, 100 steps per lap
    v = 2 * math.pi / kappa / (steps * DT)           # 6.28 m/s: lateral 3.9 m/s², within limits
    pose, speed = t32([[0.0, 0.0, 0.0]]), t32([v])
    for i in range(steps):
        pose, speed, _, curv = bicycle_step(pose, speed, t32([0.0]), t32([kappa]), DT, LIMITS)
        if i == steps // 2 - 1:                      # half a lap: top of the circle, heading back
            assert torch.allclose(pose[0, :2], t32([0.0, 20.0]), atol=1e-3)
            assert abs(wrap_angle(pose[0, 2] - math.pi).item()) < 1e-4
    assert curv.item() == pytest.approx(kappa)
    assert torch.allclose(pose[0, :2], t32([0.0, 0.0]), atol=2e-3)
    assert abs(wrap_angle(pose[0, 2]).item()) < 1e-4


def test_braking_to_a_stop_never_reverses():
    # stops inside one step: distance v² / (2|a|), mean acceleration -v/dt
    origin = t32([[0.0, 0.0, 0.0]])
    pose, speed, accel, _ = bicycle_step(origin, t32([0.5]), t32([-9.0]), t32([0.0]), DT, LIMITS)
    assert speed.item() == 0.0
    assert pose[0, 0].item() == pytest.approx(0.25 / 18.0, rel=1e-5)
    assert accel.item() == pytest.approx(-5.0, rel=1e-5)
    # from 10 m/s at -4 m/s²: stops after exactly v² / (2|a|) = 12.5 m and stays there
    pose, speed = t32([[0.0, 0.0, 0.0]]), t32([10.0])
    xs = []
    for _ in range(60):
        pose, speed, _, _ = bicycle_step(pose, speed, t32([-4.0]), t32([0.0]), DT, LIMITS)
        xs.append(pose[0, 0].item())
        assert speed.item() >= 0.0
    assert xs[-1] == pytest.approx(12.5, abs=1e-3)
    assert all(b >= a - 1e-6 for a, b in zip(xs, xs[1:], strict=False))


def test_limits_clamp_commands():
    pose = t32([[0.0, 0.0, 0.0]] * 5)
    speed = t32([5.0, 5.0, 1.0, 20.0, 39.9])
    accel = t32([100.0, -100.0, 0.0, 0.0, 4.0])
    curv = t32([0.0, 0.0, 1.0, 0.1, 0.0])
    _, v, a, k = bicycle_step(pose, speed, accel, curv, DT, LIMITS)
    assert a[0].item() == pytest.approx(4.0, rel=1e-5) and a[1].item() == pytest.approx(-9.0, rel=1e-5)
    assert k[2].item() == pytest.approx(0.2)                       # max_curvature
    assert k[3].item() == pytest.approx(8.0 / 400.0, rel=1e-5)     # max_lat_accel / v²
    assert v[4].item() == pytest.approx(40.0)                      # max_speed
    # curvature rate: 0.5 1/m/s over 0.1 s from the previous curvature
    _, _, _, k = bicycle_step(pose[:1], speed[:1], t32([0.0]), t32([0.2]), DT, LIMITS,
                              prev_curvature=t32([0.0]))
    assert k.item() == pytest.approx(0.05)


def test_rear_axle_to_center():
    c = rear_axle_to_center(t32([[1.0, 1.0, math.pi / 2]]), 1.5)
    assert torch.allclose(c, t32([[1.0, 2.5]]), atol=1e-6)


# ---- plans --------------------------------------------------------------------------------------
def test_plan_to_world_frames_and_continuous_yaw():
    action = t32([[[1.0, 0.0, 0.0], [2.0, 1.0, 0.5]]])
    plan = plan_to_world(action, t32([[10.0, 5.0, math.pi / 2]]))
    assert plan.shape == (1, 3, 3)
    assert torch.allclose(plan[0, 0], t32([10.0, 5.0, math.pi / 2]))
    assert torch.allclose(plan[0, 1], t32([10.0, 6.0, math.pi / 2]), atol=1e-6)
    assert torch.allclose(plan[0, 2], t32([9.0, 7.0, math.pi / 2 + 0.5]), atol=1e-6)
    # a plan turning through ±pi keeps a continuous yaw
    yaws = torch.arange(1, 11, dtype=torch.float32) * 0.05
    action = torch.stack([torch.arange(1, 11.0), torch.zeros(10), yaws], -1)[None]
    plan = plan_to_world(action, t32([[0.0, 0.0, 3.1]]))
    assert torch.allclose(plan[0, 1:, 2], 3.1 + yaws, atol=1e-5)


def straight_plan(speed: float, horizon: int, accel: float = 0.0) -> torch.Tensor:
    t = torch.arange(horizon + 1, dtype=torch.float32) * DT
    x = speed * t + 0.5 * accel * t * t
    return torch.stack([x, torch.zeros_like(x), torch.zeros_like(x)], -1)[None]


def test_plan_state_at_interpolates():
    pose, speed, accel, curv = plan_state_at(straight_plan(10.0, 20), t32([0.25]))
    assert torch.allclose(pose, t32([[2.5, 0.0, 0.0]]), atol=1e-5)
    assert speed.item() == pytest.approx(10.0) and accel.item() == pytest.approx(0.0, abs=1e-4)
    assert curv.item() == 0.0
    # constant acceleration 2 m/s²: positions are interpolated linearly, node speeds are central
    # differences (exact for a parabola), acceleration is their slope
    plan = straight_plan(4.0, 20, accel=2.0).repeat(2, 1, 1)
    pose, speed, accel, _ = plan_state_at(plan, t32([0.5, 0.55]))
    assert pose[0, 0].item() == pytest.approx(4.0 * 0.5 + 0.25, rel=1e-5)
    assert pose[1, 0].item() == pytest.approx(0.5 * (plan[0, 5, 0] + plan[0, 6, 0]).item(), rel=1e-5)
    assert speed[0].item() == pytest.approx(5.0, rel=1e-4)
    assert accel[1].item() == pytest.approx(2.0, rel=1e-3)
    # before the start: the first pose; a segment going backwards counts as standing still
    pose, speed, _, _ = plan_state_at(plan, t32([-1.0, 0.0]))
    assert torch.allclose(pose, plan[:, 0], atol=1e-6)
    back = straight_plan(-5.0, 6)
    assert plan_state_at(back, t32([0.3]))[1].item() == 0.0


def test_plan_state_at_extrapolates_at_last_speed_and_yaw_rate():
    radius, v, horizon = 20.0, 10.0, 5
    t = torch.arange(horizon + 1, dtype=torch.float32) * DT
    th = v * t / radius
    plan = torch.stack([radius * torch.sin(th), radius * (1 - torch.cos(th)), th], -1)[None]
    pose, speed, accel, curv = plan_state_at(plan, t32([1.5]))    # 1 s past the last pose
    # the chord speed of 0.05 rad segments is 0.9999 of the arc speed
    th_end = (v * 0.9999 * 1.0 + v * horizon * DT) / radius
    assert pose[0, 0].item() == pytest.approx(radius * math.sin(th_end), abs=2e-3)
    assert pose[0, 1].item() == pytest.approx(radius * (1 - math.cos(th_end)), abs=2e-3)
    assert pose[0, 2].item() == pytest.approx(th_end, abs=1e-4)
    assert speed.item() == pytest.approx(v, rel=1e-3) and accel.item() == 0.0
    assert curv.item() == pytest.approx(1 / radius, rel=1e-3)


def test_perfect_tracking_puts_the_ego_on_the_plan():
    plan = straight_plan(8.0, 20, accel=1.0)
    pose, speed = perfect_tracking(plan, t32([0.3]))
    ref_pose, ref_speed, _, _ = plan_state_at(plan, t32([0.3]))
    assert torch.equal(pose, ref_pose) and torch.equal(speed, ref_speed)
    assert pose[0, 0].item() == pytest.approx(plan[0, 3, 0].item())


# ---- controller: replay of logged drives --------------------------------------------------------
@pytest.mark.parametrize("horizon", [20, 64])
def test_controller_replays_logged_drives_within_half_a_metre(horizon):
    names = list(SCENARIOS)
    ticks = 200                                                      # 20 s
    log, speed = logs(names, ticks + horizon + 1)
    err = replay_errors(log, speed, horizon, ticks).max(1).values
    worst = {n: round(e, 3) for n, e in zip(names, err.tolist(), strict=True)}
    assert max(worst.values()) < 0.5, worst
    # guard against silent regressions: the defaults track these logs within 0.2 m
    assert max(worst.values()) < 0.2, worst


def test_controller_replay_without_rate_limit_and_at_10hz():
    names = ["s_curve_r20", "intersection_turn", "stop_and_go"]
    log, speed = logs(names, 150 + 21)
    assert replay_errors(log, speed, 20, 150, rate_limit=False).max() < 0.5
    assert replay_errors(log, speed, 20, 150, every=1).max() < 0.5
    # H = 5 (0.5 s): the controller extrapolates past the plan's end
    assert replay_errors(log, speed, 5, 150).max() < 0.5


def test_controller_recovers_from_an_offset_and_tolerates_noisy_logs():
    names = ["straight_15mps", "circle_r50", "s_curve_r50"]
    log, speed = logs(names, 150 + 21)
    err = replay_errors(log, speed, 20, 150, start_offset=[0.0, 1.0, 0.1])
    assert err[:, 0].min() > 0.5                                     # it did start off the log
    assert err[:, 50:].max() < 0.1                                   # and is back within 5 s
    gen = torch.Generator().manual_seed(0)
    noisy = log.clone()
    noisy[..., :2] += 0.05 * torch.randn(noisy[..., :2].shape, generator=gen)
    noisy[..., 2] += 0.01 * torch.randn(noisy[..., 2].shape, generator=gen)
    assert replay_errors(log, speed, 20, 150, plan_log=noisy).max() < 0.5


def test_stop_plan_brakes_without_reversing():
    pose, v = t32([[0.0, 0.0, 0.0]]), t32([20.0])
    plan = plan_to_world(torch.zeros(1, 20, 3), pose)               # "stop here"
    tau, xs = torch.zeros(1), []
    for _ in range(40):
        a, k = track(pose, v, plan, tau, DT, LIMITS, ControllerConfig())
        pose, v, _, _ = bicycle_step(pose, v, a, k, DT, LIMITS)
        tau += DT
        xs.append(pose[0, 0].item())
    assert v.item() == 0.0
    assert xs[-1] == pytest.approx(20.0**2 / (2 * 9.0), abs=0.5)     # maximal braking
    assert all(b >= a - 1e-6 for a, b in zip(xs, xs[1:], strict=False))


# ---- sanitising ---------------------------------------------------------------------------------
def test_sanitize_action_clip_and_reject():
    good = straight_plan(10.0, 8)[:, 1:]
    action = good.repeat(4, 1, 1)
    action[1, 3, 0] = float("nan")
    action[2, 5, 1] = 1e6
    action[3, 2, 2] = float("inf")
    clean, bad = sanitize_action(action, "clip")
    assert bad.tolist() == [False, True, True, True]
    assert torch.equal(clean[0], good[0])
    assert torch.equal(clean[1], torch.zeros_like(clean[1]))       # non-finite: "stop here"
    assert torch.equal(clean[3], torch.zeros_like(clean[3]))
    assert clean[2, 5, 1].item() == 200.0 and torch.equal(clean[2, :5], good[0, :5])
    assert torch.isfinite(clean).all()
    with pytest.raises(ValueError, match=r"env\(s\) \[1, 2, 3\]"):
        sanitize_action(action, "reject")
    out, bad = sanitize_action(good, "reject")
    assert torch.equal(out, good) and not bad.any()
    with pytest.raises(ValueError, match="H>=5"):
        sanitize_action(torch.zeros(2, 3, 3))
    with pytest.raises(ValueError, match="mode"):
        sanitize_action(good, "ignore")
    yaw = sanitize_action(torch.full((1, 5, 3), 4.0), "clip")[0][0, :, 2]
    assert torch.allclose(yaw, torch.full((5,), 4.0 - 2 * math.pi))


def test_sanitize_tick_action():
    action = t32([[1.0, 0.01], [float("nan"), 0.0], [50.0, -3.0]])
    clean, bad = sanitize_tick_action(action, "clip")
    assert bad.tolist() == [False, True, False]
    assert clean.tolist()[0] == pytest.approx([1.0, 0.01])
    assert clean.tolist()[1] == pytest.approx([-9.0, 0.0])           # emergency stop, straight
    assert clean.tolist()[2] == pytest.approx([4.0, -0.2])
    with pytest.raises(ValueError, match=r"env\(s\) \[1\]"):
        sanitize_tick_action(action, "reject")
    with pytest.raises(ValueError, match=r"\[B, 2\]"):
        sanitize_tick_action(torch.zeros(3))


@pytest.mark.gpu
def test_controller_on_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    names = ["intersection_turn", "s_curve_r20"]
    log, speed = logs(names, 60 + 21)
    cpu = replay_errors(log, speed, 20, 60)
    gpu = replay_errors(log.cuda(), speed.cuda(), 20, 60).cpu()
    assert torch.allclose(cpu, gpu, atol=1e-3)
