"""Ego dynamics of drivesim: a kinematic bicycle at the rear axle, the trajectory action turned into
a world-frame plan, the controller that tracks it every tick, and action sanitising.

Everything is batched over B envs, pure torch (same code on CPU and CUDA, float32), with no Python
loop over envs. Frames (DESIGN.md, "Frames and actions"): poses are rear-axle ``(x, y, yaw)`` in the
scene frame; an action is H future rear-axle poses in the *ego frame* (x forward, y left, yaw CCW) at
``t + 0.1·k`` s, k = 1..H.

One tick of the simulator with the default controller::

    plan = plan_to_world(sanitize_action(action, "clip")[0], pose)      # at a decision, tau = 0
    accel, curvature = track(pose, speed, plan, tau, DT, limits, cfg)    # every tick
    pose, speed, _, _ = bicycle_step(pose, speed, accel, curvature, DT, limits)
    tau += DT
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from envs.drivesim.scene import DT

Tensor = torch.Tensor

PLAN_DT = DT
"""Seconds between two poses of a plan (the action's 0.1 s spacing)."""
MIN_ARC_FOR_CURVATURE = 0.05
"""Plan segments shorter than this (m) get their curvature from this length: a near-stationary
plan with a heading change would otherwise give an unbounded curvature (the limits clip it anyway)."""


def wrap_angle(a: Tensor) -> Tensor:
    """Angles wrapped to ``[-pi, pi)``."""
    return torch.remainder(a + math.pi, 2.0 * math.pi) - math.pi


# ---- vehicle limits and the bicycle model -------------------------------------------------------
@dataclass(frozen=True)
class VehicleLimits:
    """Physical limits of the ego. Commands beyond them are clipped, never rejected."""

    max_accel: float = 4.0
    """Largest forward acceleration (m/s²)."""
    max_decel: float = 9.0
    """Largest braking deceleration, a positive number (m/s²); about a dry-road emergency stop."""
    max_curvature: float = 0.2
    """Largest path curvature |κ| (1/m), i.e. a 5 m turning radius at the rear axle."""
    max_lat_accel: float = 8.0
    """Largest lateral acceleration v²·|κ| (m/s²): |κ| is further limited to max_lat_accel / v²."""
    max_curvature_rate: float = 0.5
    """Largest change of curvature per second (1/m/s), applied when ``bicycle_step`` is given the
    previous curvature. 0.5 lets the ego go from straight to the tightest turn in 0.4 s, about
    1.4 rad/s at the road wheels of a 2.8 m wheelbase: an evasive manoeuvre. Replays of logged
    turns need at most ~0.35 (tests), so the limit only bites on erratic plans."""
    max_speed: float = 40.0
    """Top speed (m/s). There is no reverse: speed is clamped at 0."""

    def __post_init__(self) -> None:
        for name in ("max_accel", "max_decel", "max_curvature", "max_lat_accel", "max_curvature_rate",
                     "max_speed"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"VehicleLimits.{name} must be a finite number > 0, got {value!r}")


def _arc(kappa: Tensor, dist: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Displacement ``(dx, dy, dyaw)`` in the start frame after ``dist`` metres at constant
    curvature ``kappa``. Exact for any κ (sinc forms, no division by κ, smooth at κ = 0)."""
    dyaw = kappa * dist
    dx = dist * torch.sinc(dyaw / math.pi)                                     # sin(θ) / κ
    dy = dist * torch.sin(0.5 * dyaw) * torch.sinc(dyaw / (2.0 * math.pi))    # (1 - cos θ) / κ
    return dx, dy, dyaw


def _advance(pose: Tensor, kappa: Tensor, dist: Tensor) -> Tensor:
    """Pose ``[..., 3]`` after ``dist`` metres along an arc of curvature ``kappa`` (yaw not wrapped)."""
    dx, dy, dyaw = _arc(kappa, dist)
    c, s = torch.cos(pose[..., 2]), torch.sin(pose[..., 2])
    x = pose[..., 0] + c * dx - s * dy
    y = pose[..., 1] + s * dx + c * dy
    return torch.stack([x, y, pose[..., 2] + dyaw], -1)


def curvature_bound(speed: Tensor, limits: VehicleLimits) -> Tensor:
    """Largest admissible |κ| ``[B]`` at ``speed``: min(max_curvature, max_lat_accel / v²)."""
    return torch.clamp(limits.max_lat_accel / speed.square().clamp(min=1e-6), max=limits.max_curvature)


def bicycle_step(
    pose: Tensor,
    speed: Tensor,
    accel: Tensor,
    curvature: Tensor,
    dt: float,
    limits: VehicleLimits,
    prev_curvature: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One step of the kinematic bicycle model at the rear axle.

    Args:
        pose: ``[B, 3]`` rear-axle x, y, yaw in the scene frame.
        speed: ``[B]`` m/s, ≥ 0.
        accel: ``[B]`` commanded longitudinal acceleration (m/s²), held over ``dt``.
        curvature: ``[B]`` commanded path curvature (1/m, > 0 turns left), held over ``dt``.
        dt: step length (s).
        limits: clip ranges. The acceleration is clipped to [-max_decel, max_accel] and so that the
            speed stays in [0, max_speed]; the curvature to the rate limit around ``prev_curvature``
            (when given), then to ±min(max_curvature, max_lat_accel / v²) with v the larger of the
            speeds at the start and end of the step (so the lateral limit holds throughout).
        prev_curvature: ``[B]`` curvature applied on the previous step, for the rate limit.

    Returns:
        ``(pose [B, 3], speed [B], accel_applied [B], curvature_applied [B])``. The integration is
        exact for constant acceleration and curvature: the rear axle travels
        d = v·dt + a·dt²/2 along a circular arc (curvature is constant per metre, so the pose
        depends only on d). A vehicle that would reach zero speed within ``dt`` stops there
        (d = v²/(2|a|)) and stays stopped; ``accel_applied`` is then the mean acceleration
        (v_end - v) / dt actually realised. Yaw is wrapped to [-pi, pi).
    """
    a = accel.clamp(-limits.max_decel, limits.max_accel)
    a = torch.minimum(a, (limits.max_speed - speed) / dt).clamp(min=-limits.max_decel)
    v_end_free = speed + a * dt
    stops = v_end_free < 0.0
    # braking to a stop within dt: distance v² / (2|a|); a < 0 whenever `stops`
    d_stop = speed.square() / (2.0 * (-a).clamp(min=1e-6))
    dist = torch.where(stops, d_stop, speed * dt + 0.5 * a * dt * dt)
    v_end = torch.where(stops, torch.zeros_like(speed), v_end_free)
    k = curvature
    if prev_curvature is not None:
        step = limits.max_curvature_rate * dt
        k = torch.minimum(torch.maximum(k, prev_curvature - step), prev_curvature + step)
    bound = curvature_bound(torch.maximum(speed, v_end), limits)
    k = torch.minimum(torch.maximum(k, -bound), bound)
    new_pose = _advance(pose, k, dist)
    new_pose = torch.cat([new_pose[:, :2], wrap_angle(new_pose[:, 2:])], -1)
    return new_pose, v_end, (v_end - speed) / dt, k


def rear_axle_to_center(pose: Tensor, offset: Tensor | float) -> Tensor:
    """Box centre ``[B, 2]`` of rear-axle poses ``[B, 3]``; ``offset`` [B] or float is the
    rear-axle-to-centre distance (the scene's value, else 0.3 × length)."""
    offset = torch.as_tensor(offset, dtype=pose.dtype, device=pose.device)
    heading = torch.stack([torch.cos(pose[..., 2]), torch.sin(pose[..., 2])], -1)
    return pose[..., :2] + heading * offset[..., None]


# ---- trajectory actions as world-frame plans ----------------------------------------------------
def plan_to_world(action: Tensor, pose: Tensor) -> Tensor:
    """The action's ego-frame poses in the scene frame, the current pose prepended.

    Args:
        action: ``[B, H, 3]`` rear-axle poses at t + 0.1·k s, k = 1..H, in the ego frame.
        pose: ``[B, 3]`` current rear-axle pose in the scene frame.

    Returns:
        ``[B, H + 1, 3]`` plan; index 0 is ``pose``. Yaw is made continuous along the plan (no 2π
        jumps between neighbours) so it can be interpolated.
    """
    c, s = torch.cos(pose[:, None, 2]), torch.sin(pose[:, None, 2])
    x = pose[:, None, 0] + c * action[..., 0] - s * action[..., 1]
    y = pose[:, None, 1] + s * action[..., 0] + c * action[..., 1]
    yaw = torch.cat([pose[:, None, 2], pose[:, None, 2] + action[..., 2]], 1)
    steps = torch.cat([torch.zeros_like(yaw[:, :1]), wrap_angle(yaw.diff(dim=1))], 1)
    yaw = yaw[:, :1] + torch.cumsum(steps, 1)
    xy = torch.cat([pose[:, None, :2], torch.stack([x, y], -1)], 1)
    return torch.cat([xy, yaw[..., None]], -1)


@dataclass
class _Profile:
    """Finite-difference kinematics of a plan ``[B, H+1, 3]`` (private to this module)."""

    plan: Tensor     # [B, H+1, 3]
    dyaw: Tensor     # [B, H] wrapped yaw change per segment
    arc: Tensor      # [B, H+1] signed progress along the plan's own heading (jitter cancels out)
    arc_mono: Tensor  # [B, H+1] running maximum of `arc`, for look-ups by distance
    v_node: Tensor   # [B, H+1] speed at each pose
    k_seg: Tensor    # [B, H] mean curvature of each segment

    @classmethod
    def of(cls, plan: Tensor) -> _Profile:
        seg = plan[:, 1:, :2] - plan[:, :-1, :2]
        ds = torch.linalg.vector_norm(seg, dim=-1)
        dyaw = wrap_angle(plan[:, 1:, 2] - plan[:, :-1, 2])
        mid = plan[:, :-1, 2] + 0.5 * dyaw
        # progress is measured along the plan's yaw: a segment against it is negative progress
        # (no reverse), and position noise around a stop sums to ~0 instead of creeping forward
        prog = seg[..., 0] * torch.cos(mid) + seg[..., 1] * torch.sin(mid)
        arc = torch.cat([torch.zeros_like(ds[:, :1]), torch.cumsum(prog, 1)], 1)
        v_seg = prog.clamp(min=0.0) / PLAN_DT
        v_node = torch.cat([v_seg[:, :1], 0.5 * (v_seg[:, :-1] + v_seg[:, 1:]), v_seg[:, -1:]], 1)
        k_seg = dyaw / ds.clamp(min=MIN_ARC_FOR_CURVATURE)
        return cls(plan, dyaw, arc, torch.cummax(arc, 1).values, v_node, k_seg)

    @property
    def horizon(self) -> int:
        return self.dyaw.shape[1]

    def locate(self, tau: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Segment index ``[B, 1]`` (long), fraction in it ``[B]`` and time beyond the last pose ``[B]``."""
        u = tau.clamp(min=0.0) / PLAN_DT
        i = torch.clamp(torch.floor(u), max=self.horizon - 1).long()
        frac = (u - i).clamp(max=1.0)
        beyond = (u - self.horizon).clamp(min=0.0) * PLAN_DT
        return i[:, None], frac, beyond

    def at(self, tau: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Reference ``(pose [B,3], speed, accel, curvature, arc)`` at time ``tau`` [B]."""
        i, f, beyond = self.locate(tau)
        g0 = lambda x: torch.gather(x, 1, i)[:, 0]  # noqa: E731
        g1 = lambda x: torch.gather(x, 1, i + 1)[:, 0]  # noqa: E731
        p0 = torch.gather(self.plan, 1, i[..., None].expand(-1, -1, 3))[:, 0]
        p1 = torch.gather(self.plan, 1, (i + 1)[..., None].expand(-1, -1, 3))[:, 0]
        v0, v1 = g0(self.v_node), g1(self.v_node)
        xy = p0[:, :2] + f[:, None] * (p1[:, :2] - p0[:, :2])
        yaw = p0[:, 2] + f * g0(self.dyaw)
        speed = v0 + f * (v1 - v0)
        accel = (v1 - v0) / PLAN_DT
        kappa = g0(self.k_seg)
        arc = g0(self.arc) + f * (g1(self.arc) - g0(self.arc))
        # past the last pose: constant speed and yaw rate of the plan's end (a circular arc)
        v_last, k_last = self.v_node[:, -1], self.k_seg[:, -1]
        ext = _advance(self.plan[:, -1], k_last, v_last * beyond)
        out = beyond > 0.0
        pose = torch.where(out[:, None], ext, torch.cat([xy, yaw[:, None]], -1))
        speed = torch.where(out, v_last, speed)
        accel = torch.where(out, torch.zeros_like(accel), accel)
        arc = torch.where(out, self.arc[:, -1] + v_last * beyond, arc)
        return pose, speed, accel, kappa, arc

    def point_at_arc(self, s: Tensor) -> Tensor:
        """Plan position ``[B, 2]`` at progress ``s`` [B] from its start; past the end the plan is
        continued along a circular arc with its last segment's curvature."""
        arc = self.arc_mono
        # index of the last pose at or before s (a comparison count: cheap for H ≤ 64 and, unlike
        # searchsorted, never slow when the CPU's threads are oversubscribed)
        j = ((arc <= s[:, None]).sum(1, keepdim=True) - 1).clamp(0, self.horizon - 1)
        a0, a1 = torch.gather(arc, 1, j)[:, 0], torch.gather(arc, 1, j + 1)[:, 0]
        p0 = torch.gather(self.plan[..., :2], 1, j[..., None].expand(-1, -1, 2))[:, 0]
        p1 = torch.gather(self.plan[..., :2], 1, (j + 1)[..., None].expand(-1, -1, 2))[:, 0]
        f = ((s - a0) / (a1 - a0).clamp(min=1e-6)).clamp(0.0, 1.0)
        inside = p0 + f[:, None] * (p1 - p0)
        beyond = (s - arc[:, -1]).clamp(min=0.0)
        ext = _advance(self.plan[:, -1], self.k_seg[:, -1].clamp(-0.5, 0.5), beyond)[:, :2]
        return torch.where((beyond > 0.0)[:, None], ext, inside)

    def pursuit_feedforward(self, s0: Tensor, look: Tensor, window: Tensor) -> Tensor:
        """Curvature ``[B]`` that pure pursuit misses on this plan at progress ``s0``: the plan's
        curvature averaged over ``s0 ± window`` minus the pure-pursuit curvature of the plan itself,
        i.e. the chord weighting 2(L - u)/L² of its curvature over ``[s0, s0 + L]`` (L = ``look``).
        Segment curvatures are yaw change / length; the first segment (from the ego's pose at the
        decision, possibly off the plan) takes its neighbour's value, so it carries no correction."""
        k = torch.cat([self.k_seg[:, 1:2], self.k_seg[:, 1:]], 1) if self.horizon > 1 else self.k_seg
        a, b = self.arc_mono[:, :-1], self.arc_mono[:, 1:]
        end, k_last = self.arc_mono[:, -1], k[:, -1]
        s0, look, window = s0[:, None], look[:, None], window[:, None]

        def chord_cdf(u: Tensor) -> Tensor:  # ∫0^u 2(L - x)/L² dx for u clipped to [0, L]
            return 1.0 - (1.0 - (u / look).clamp(0.0, 1.0)).square()

        w = chord_cdf(b - s0) - chord_cdf(a - s0)
        chord = (w * k).sum(1) + (1.0 - chord_cdf(end[:, None] - s0))[:, 0] * k_last
        lo, hi = s0 - window, s0 + window
        overlap = (torch.minimum(b, hi) - torch.maximum(a, lo)).clamp(min=0.0)
        ext = (hi - torch.maximum(end[:, None], lo)).clamp(min=0.0)[:, 0]
        here = ((overlap * k).sum(1) + ext * k_last) / (overlap.sum(1) + ext).clamp(min=1e-6)
        return here - chord


def plan_state_at(plan: Tensor, tau: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The plan's reference state ``tau`` seconds after it started.

    Args:
        plan: ``[B, H+1, 3]`` world-frame plan (``plan_to_world``), poses 0.1 s apart.
        tau: ``[B]`` seconds since the plan's first pose (negative values count as 0).

    Returns:
        ``(pose [B, 3], speed [B], accel [B], curvature [B])``. Positions and yaw are linearly
        interpolated between poses. Segment speeds are the segment's progress along the plan's own
        yaw / 0.1 s, clamped at 0 (a segment going backwards is a stop: no reverse); the speed at a
        pose is the mean
        of its two segments (one-sided at the ends) and is interpolated linearly; acceleration is
        the slope of that interpolation and curvature the segment's yaw change / length (both
        piecewise constant per segment, i.e. the exact averages over the segment). Past the last
        pose the plan continues at the last speed and yaw rate (a circular arc, acceleration 0).
        Yaw is wrapped to [-pi, pi).
    """
    pose, speed, accel, kappa, _ = _Profile.of(plan).at(tau)
    return torch.cat([pose[:, :2], wrap_angle(pose[:, 2:])], -1), speed, accel, kappa


def perfect_tracking(plan: Tensor, tau: Tensor) -> tuple[Tensor, Tensor]:
    """Ego ``(pose [B, 3], speed [B])`` under the "perfect tracking" switch: the ego is put on the
    plan at every tick, so call this with ``tau`` = the time of the tick being entered (e.g.
    ``tau + DT``). No limits apply: a plan that is not drivable is followed anyway."""
    pose, speed, _, _ = plan_state_at(plan, tau)
    return pose, speed


# ---- the tracking controller --------------------------------------------------------------------
@dataclass(frozen=True)
class ControllerConfig:
    """Gains of ``track``: pure pursuit with curvature feed-forward for steering, a receding-horizon
    position/speed match for acceleration. Defaults keep logged drives within 0.5 m (tests)."""

    lookahead_time: float = 0.6
    """Steering looks ``lookahead_time × speed`` metres ahead along the plan (s)."""
    min_lookahead: float = 3.0
    """Shortest steering lookahead (m), used at low speed."""
    max_lookahead: float = 25.0
    """Longest steering lookahead (m)."""
    feedforward: float = 1.0
    """Weight of the curvature feed-forward that cancels pure pursuit's corner cutting: the plan's
    own curvature minus the pure-pursuit curvature of the plan itself (0 = plain pure pursuit)."""
    curvature_window: float = 0.5
    """The feed-forward averages the plan's curvature over ± this fraction of the lookahead,
    which keeps noise in logged yaws out of the steering."""
    speed_horizon: float = 0.6
    """The acceleration is chosen so that, with a linearly varying acceleration, the ego would be
    at the plan's position and speed ``speed_horizon`` seconds ahead (s). Equivalent to a
    feed-forward plus PD law with gains 4/T on speed and 6/T² on position."""

    def __post_init__(self) -> None:
        for name in ("lookahead_time", "min_lookahead", "max_lookahead", "curvature_window", "speed_horizon"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"ControllerConfig.{name} must be a finite number > 0, got {value!r}")
        if self.max_lookahead < self.min_lookahead:
            raise ValueError(f"ControllerConfig.max_lookahead ({self.max_lookahead}) must be >= "
                             f"min_lookahead ({self.min_lookahead})")
        if not (math.isfinite(self.feedforward) and 0.0 <= self.feedforward <= 1.0):
            raise ValueError(f"ControllerConfig.feedforward must be in [0, 1], got {self.feedforward!r}")
        if self.speed_horizon < 2 * PLAN_DT:
            raise ValueError(f"ControllerConfig.speed_horizon must be >= {2 * PLAN_DT} s (two plan steps), "
                             f"got {self.speed_horizon}")


def _pursuit_curvature(pose: Tensor, target: Tensor) -> Tensor:
    """Curvature ``[B]`` of the circle through the rear axle, tangent to its heading, through
    ``target`` [B, 2] (pure pursuit)."""
    d = target - pose[:, :2]
    c, s = torch.cos(pose[:, 2]), torch.sin(pose[:, 2])
    lat = -s * d[:, 0] + c * d[:, 1]
    return 2.0 * lat / d.square().sum(-1).clamp(min=1e-4)


def track(
    pose: Tensor,
    speed: Tensor,
    plan: Tensor,
    tau: Tensor,
    dt: float,
    limits: VehicleLimits,
    cfg: ControllerConfig,
) -> tuple[Tensor, Tensor]:
    """Acceleration and curvature ``([B], [B])`` that track ``plan`` over the next tick.

    Args:
        pose: ``[B, 3]`` rear-axle pose now; speed: ``[B]`` m/s.
        plan: ``[B, H+1, 3]`` world-frame plan (``plan_to_world``); tau: ``[B]`` seconds since it
            started (0 at the decision tick).
        dt: the tick (s); limits: the returned commands lie within them; cfg: the gains.

    Steering: pure pursuit towards the plan point ``L`` metres ahead of the ego's position along the
    plan (L = clip(lookahead_time·v, min_lookahead, max_lookahead)), plus a feed-forward that
    removes pure pursuit's corner cutting on clothoids and S-curves: the plan's curvature near the
    ego (averaged over ± curvature_window·L) minus the curvature pure pursuit would command if the
    ego were exactly on the plan (the chord-weighted mean of the plan's curvature over the next L
    metres). On a circle both are equal and the law is plain pure pursuit; offsets are corrected
    by pure pursuit alone (spatial time constant about L/2).

    Acceleration: with T = speed_horizon, D the plan progress from the ego to the plan's position
    at ``tau + T`` and V the plan speed there, a = (6·(D - v·T) - 2·T·(V - v)) / T² puts the ego at
    distance D with speed V after T seconds under a linearly varying acceleration (re-solved every
    tick). The plan's first pose is the ego's pose at the decision, so its first segment carries
    any correction back onto the plan; looking T ≥ 0.2 s ahead keeps that segment's
    finite-difference speed out of the law, and the feed-forward ignores its curvature.

    Tested (tests/envs/drivesim/test_dynamics.py): replaying logged drives (straight, circles of
    radius 20-200 m, S-curves, stop-and-go, intersection turns) with a decision every 2 ticks and
    H = 20 or 64 stays within 0.15 m of the log.
    """
    prof = _Profile.of(plan)
    ref, _, _, _, arc_ref = prof.at(tau)
    c, s = torch.cos(ref[:, 2]), torch.sin(ref[:, 2])
    along = (pose[:, 0] - ref[:, 0]) * c + (pose[:, 1] - ref[:, 1]) * s
    s_ego = arc_ref + along

    # steering
    v_look = torch.maximum(speed, prof.at(tau + 0.5 * dt)[1])
    look = (cfg.lookahead_time * v_look).clamp(cfg.min_lookahead, cfg.max_lookahead)
    k_pp = _pursuit_curvature(pose, prof.point_at_arc(s_ego + look))
    if cfg.feedforward > 0.0:
        k_pp = k_pp + cfg.feedforward * prof.pursuit_feedforward(s_ego, look, cfg.curvature_window * look)
    bound = curvature_bound(speed, limits)
    kappa = torch.minimum(torch.maximum(k_pp, -bound), bound)

    # acceleration
    T = cfg.speed_horizon
    _, v_target, _, _, arc_target = prof.at(tau + T)
    dist = arc_target - s_ego
    accel = (6.0 * (dist - speed * T) - 2.0 * T * (v_target - speed)) / (T * T)
    accel = accel.clamp(-limits.max_decel, limits.max_accel)
    return accel, kappa


# ---- action sanitising --------------------------------------------------------------------------
def _bad_rows_message(bad: Tensor, what: str) -> str:
    rows = torch.nonzero(bad).flatten().tolist()
    shown = ", ".join(map(str, rows[:20])) + (f", ... ({len(rows)} in all)" if len(rows) > 20 else "")
    return f"{what} in env(s) [{shown}]"


def sanitize_action(action: Tensor, mode: str = "clip", max_abs_xy: float = 200.0) -> tuple[Tensor, Tensor]:
    """Never let a non-finite or absurd trajectory action reach the simulator.

    Args:
        action: ``[B, H, 3]`` ego-frame poses (H ≥ 5).
        mode: ``"clip"``: an env whose action holds any NaN/inf gets the all-zero plan (every pose
            at the current rear axle, i.e. "stop here": the controller brakes as hard as the limits
            allow), x and y are clipped to ±max_abs_xy and yaw is wrapped to [-pi, pi).
            ``"reject"``: raise ``ValueError`` naming the envs with a non-finite or out-of-range
            action.
        max_abs_xy: largest accepted |x| and |y| (m); 200 m is beyond any 6.4 s plan at 30 m/s.

    Returns:
        ``(clean [B, H, 3], bad [B] bool)``: ``bad`` marks envs whose action was replaced or clipped.
    """
    if action.ndim != 3 or action.shape[2] != 3 or action.shape[1] < 5:
        raise ValueError(
            f"sanitize_action: action must be [B, H>=5, 3] ego-frame poses, got {list(action.shape)}")
    if mode not in ("clip", "reject"):
        raise ValueError(f"sanitize_action: mode must be 'clip' or 'reject', got {mode!r}")
    finite = torch.isfinite(action).all(-1).all(-1)
    in_range = (action[..., :2].abs() <= max_abs_xy).all(-1).all(-1)
    bad = ~(finite & in_range)
    if mode == "reject":
        if bool(bad.any()):
            raise ValueError(_bad_rows_message(bad, f"non-finite action or |x|, |y| > {max_abs_xy} m"))
        return action, bad
    clean = torch.where(finite[:, None, None], action, torch.zeros_like(action))
    clean = torch.cat([clean[..., :2].clamp(-max_abs_xy, max_abs_xy), wrap_angle(clean[..., 2:])], -1)
    return clean, bad


def sanitize_tick_action(
    action: Tensor, mode: str = "clip", limits: VehicleLimits | None = None
) -> tuple[Tensor, Tensor]:
    """Sanitise per-tick ``(acceleration, curvature)`` actions ``[B, 2]``.

    ``"clip"``: a non-finite pair becomes (-max_decel, 0), an emergency stop straight ahead, and
    values are clipped to the limits (clipping alone does not mark an env as bad: ``bicycle_step``
    clips the same way). ``"reject"``: raise ``ValueError`` naming the envs with a non-finite
    pair. Returns ``(clean [B, 2], bad [B] bool)``.
    """
    limits = limits or VehicleLimits()
    if action.ndim != 2 or action.shape[1] != 2:
        raise ValueError(
            f"sanitize_tick_action: action must be [B, 2] (accel, curvature), got {list(action.shape)}")
    if mode not in ("clip", "reject"):
        raise ValueError(f"sanitize_tick_action: mode must be 'clip' or 'reject', got {mode!r}")
    bad = ~torch.isfinite(action).all(-1)
    if mode == "reject" and bool(bad.any()):
        raise ValueError(_bad_rows_message(bad, "non-finite (acceleration, curvature)"))
    stop = torch.tensor([-limits.max_decel, 0.0], dtype=action.dtype, device=action.device)
    clean = torch.where(bad[:, None], stop, action)
    clean = torch.stack([clean[:, 0].clamp(-limits.max_decel, limits.max_accel),
                         clean[:, 1].clamp(-limits.max_curvature, limits.max_curvature)], -1)
    return clean, bad
