"""Other agents of drivesim: log replay, or reactive IDM along each agent's own logged path.

Both are batched over B envs and N agents (padded), pure torch, the same code on CPU and CUDA.
States are box centres ``(x, y, heading, vx, vy)`` in the scene frame, as in the log.

Reactive agents (``agents: idm``) follow the Intelligent Driver Model (Treiber et al. 2000) along
their logged path: each agent keeps its logged geometry and validity (it appears and disappears
as in the log, and starts from its logged state when it appears) but chooses its own speed from
the gap to the nearest box ahead of it on its path (another agent or the ego). Approximations:

- Paths are the logged box-centre tracks resampled by arc length (``build_agent_paths``; noise of a
  standing agent is thinned out), extended straight past the last logged point by max(20 m, 5 s at
  the largest logged speed) so an agent that falls behind its log can catch up and one that gets
  ahead does not stop at the end of its data; the extension's end is a stopped obstacle (an agent
  within ``lookahead`` of it brakes mildly even when on schedule).
- The desired speed v0 is the agent's largest logged speed (at least ``IDMParams.v0_floor``):
  IDM agents do not see traffic lights, stop signs or the map, so an agent that was stopped at a
  red light in the log drives on once its leader moves. Agents never leave their path (no lane
  changes, no yielding at crossings other than to boxes on their own path).
- The leader is the nearest valid box ahead whose centre projects onto the next
  ``IDMParams.lookahead`` metres of the path within a corridor of the agent's half width, the
  box's extent across the path and a margin; the gap is bumper to the box's near side (both from
  the relative heading). The projection is one path look-up at the straight-line distance plus a
  linear correction: exact on straight paths; on a curve of radius R the lateral offset of a box
  d metres ahead is off by about d⁶ / (72 R⁵) (1 cm at 10 m and 0.3 m at 20 m on R = 20 m; 0.2 m
  at 40 m on R = 50 m), the gap by far less.
- Broadphase (precomputed per scene): only agents whose paths enter the agent's corridor somewhere
  can ever lead it; at most ``max_candidates`` of them are examined (those that came closest at the
  same log step: a queue keeps its neighbours), plus the ego, which is always a candidate.
- Parked agents (logged path shorter than ``IDMParams.parked_length``) stay where they appeared.
- Braking is capped at ``IDMParams.max_decel``; IDM rarely needs more, but a box that cuts in
  right in front of an agent can still be hit. Agents reappearing after a gap in their log jump to
  their logged state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from envs.drivesim.scene import DT

Tensor = torch.Tensor


# ---- log replay ---------------------------------------------------------------------------------
def replay(log_state: Tensor, log_valid: Tensor, scene_idx: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """The logged agents of each env's scene at its step ``t``.

    Args:
        log_state: ``[S, N, T, 5]`` x, y, heading, vx, vy of box centres (padded scenes).
        log_valid: ``[S, N, T]`` bool.
        scene_idx: ``[B]`` long, the scene of each env.
        t: ``[B]`` long, the log step; it is clamped to ``[0, T-1]`` for the look-up and every agent
            is invalid at a step outside the log.

    Returns:
        ``(state [B, N, 5], valid [B, N])``.
    """
    n_steps = log_state.shape[2]
    tc = t.clamp(0, n_steps - 1)
    state = log_state[scene_idx, :, tc]                      # [B, N, 5]
    inside = (t >= 0) & (t < n_steps)
    valid = log_valid[scene_idx, :, tc] & inside[:, None]
    return state, valid


# ---- reactive agents: parameters, paths, state --------------------------------------------------
@dataclass(frozen=True)
class IDMParams:
    """Intelligent Driver Model parameters (Treiber's highway values) and the leader search."""

    max_accel: float = 1.5
    """a: maximum acceleration (m/s²)."""
    comfort_decel: float = 2.0
    """b: comfortable deceleration, a positive number (m/s²)."""
    headway: float = 1.5
    """T: desired time headway (s)."""
    min_gap: float = 2.0
    """s0: jam distance, bumper to bumper (m)."""
    delta: float = 4.0
    """Acceleration exponent of the free-road term 1 - (v/v0)^delta."""
    v0_floor: float = 2.0
    """Lower bound on each agent's desired speed (m/s): its largest logged speed, at least this."""
    max_decel: float = 9.0
    """Physical braking cap (m/s², positive) applied to the IDM acceleration."""
    lookahead: float = 60.0
    """Leaders are searched this far ahead along the path (m, bumper to bumper)."""
    lateral_margin: float = 0.5
    """A box is on the path when its lateral offset is below the two half widths plus this (m)."""
    parked_length: float = 1.0
    """Agents whose logged path is shorter than this (m) are parked and never move."""

    def __post_init__(self) -> None:
        for name in ("max_accel", "comfort_decel", "headway", "min_gap", "delta", "v0_floor", "max_decel",
                     "lookahead", "parked_length"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"IDMParams.{name} must be a finite number > 0, got {value!r}")
        if not (math.isfinite(self.lateral_margin) and self.lateral_margin >= 0):
            raise ValueError(f"IDMParams.lateral_margin must be >= 0, got {self.lateral_margin!r}")
        if self.max_decel < self.comfort_decel:
            raise ValueError(f"IDMParams.max_decel ({self.max_decel}) must be >= comfort_decel "
                             f"({self.comfort_decel})")


@dataclass
class AgentPaths:
    """Per-scene logged paths of every agent, resampled by arc length (``build_agent_paths``).

    Arc length ``s`` runs from the agent's first valid position; point ``j`` sits at
    ``s = j * spacing``; the last point at ``length``.
    """

    x: Tensor           # [S, N, P] box-centre positions
    y: Tensor           # [S, N, P]
    tx: Tensor          # [S, N, P] unit direction of travel from point j to j + 1
    ty: Tensor          # [S, N, P]
    heading: Tensor     # [S, N, P] logged box heading, interpolated by arc length
    spacing: Tensor     # [S, N] metres between points
    length: Tensor      # [S, N] arc length where the path ends (logged path + straight extension);
    #                     the points go on straight to (P - 1) * spacing, unused
    log_length: Tensor  # [S, N] arc length of the logged path alone
    step_arc: Tensor    # [S, N, T] arc length of the logged position at each step (carried over gaps)
    v_max: Tensor       # [S, N] largest logged speed (m/s): the desired speed before the floor
    controlled: Tensor  # [S, N] bool: simulated by IDM (has a valid step and is not the ego's row)
    candidates: Tensor  # [S, N, K] int32: agents whose paths come close to agent n's path (-1 pads)

    @property
    def num_points(self) -> int:
        return int(self.x.shape[2])


def build_agent_paths(
    agent_state: Tensor | np.ndarray,
    agent_valid: Tensor | np.ndarray,
    agent_size: Tensor | np.ndarray | None = None,
    ego_row: int | None = 0,
    spacing: float = 1.0,
    max_points: int = 256,
    extension_time: float = 5.0,
    min_extension: float = 20.0,
    min_step: float = 0.25,
    max_candidates: int = 4,
    corridor_margin: float = 1.0,
    parked_length: float = IDMParams.parked_length,
) -> AgentPaths:
    """Resample every agent's logged track by arc length (per-scene precomputation, numpy).

    Args:
        agent_state: ``[S, N, T, 5]`` padded logs (x, y, heading, vx, vy of box centres).
        agent_valid: ``[S, N, T]`` bool.
        agent_size: ``[S, N, 2]`` length, width; None assumes 12 m x 3 m boxes for the candidate
            search (conservative: more pairs qualify).
        ego_row: the ego's row in every scene (``SceneTensors`` puts it first); it is never
            simulated by IDM (the ego box is passed to ``idm_step`` instead). None: no ego row.
        spacing: target distance between resampled points (m). Every agent uses the same number
            of points P = min(max_points, longest path / spacing + 1), so long paths get a coarser
            spacing.
        extension_time, min_extension: the path continues straight past the last logged point for
            max(min_extension, extension_time × largest logged speed) metres.
        min_step: a logged position becomes a path vertex only once it is this far (m) from the
            previous vertex, so the position noise of a stationary agent does not turn into a path
            (a greedy thinning, vectorised over agents, looping over the T steps).
        parked_length: paths shorter than this (m) belong to parked agents, which never move
            (as ``IDMParams.parked_length``; used here only for the candidate search).
        max_candidates, corridor_margin: the precomputed broadphase of ``idm_step``. Agent m can only
            ever lead agent n where m's path enters n's corridor (n's half width + m's extent across
            n's path + ``corridor_margin``, which should be ≥ ``IDMParams.lateral_margin``), since
            agents never leave their paths. Of those, the ``max_candidates`` that came closest to n
            at the same log step are kept (a queue keeps its neighbours; crossing traffic that was
            far away in time in the log is dropped first). Fewer columns are kept when no agent
            needs them all. The step's cost grows with this number (see the report / BENCHMARKS).

    Returns:
        :class:`AgentPaths` on the device of ``agent_state`` (CPU for numpy input).
    """
    device = agent_state.device if isinstance(agent_state, Tensor) else torch.device("cpu")
    st = agent_state.detach().cpu().numpy() if isinstance(agent_state, Tensor) else np.asarray(agent_state)
    va = agent_valid.detach().cpu().numpy() if isinstance(agent_valid, Tensor) else np.asarray(agent_valid)
    if st.ndim != 4 or st.shape[-1] != 5 or va.shape != st.shape[:3]:
        raise ValueError(f"build_agent_paths: need agent_state [S, N, T, 5] and agent_valid [S, N, T], "
                         f"got {list(st.shape)} and {list(va.shape)}")
    if spacing <= 0 or max_points < 2:
        raise ValueError(f"build_agent_paths: spacing must be > 0 and max_points >= 2, "
                         f"got {spacing} and {max_points}")
    S, N, T, _ = st.shape
    A = S * N
    st = st.reshape(A, T, 5).astype(np.float64)
    va = va.reshape(A, T).astype(bool)
    any_valid = va.any(1)
    steps = np.arange(T)

    # carry positions over invalid steps (forward, and backward before the first valid step)
    first = np.where(any_valid, va.argmax(1), 0)
    last_seen = np.maximum.accumulate(np.where(va, steps[None], -1), axis=1)
    src = np.where(last_seen >= 0, last_seen, first[:, None])
    rows = np.arange(A)[:, None]
    raw = st[rows, src, :2]                                      # [A, T, 2]
    raw_yaw = st[rows, src, 2]
    # vertices: greedy thinning; every step holds its last vertex (position, heading, arc length)
    pos, yaw, arc = np.empty_like(raw), np.empty_like(raw_yaw), np.zeros((A, T))
    anchor, anchor_yaw, anchor_arc = raw[:, 0].copy(), raw_yaw[:, 0].copy(), np.zeros(A)
    for k in range(T):
        jump = np.linalg.norm(raw[:, k] - anchor, axis=-1)
        moved = jump >= min_step
        anchor_arc = np.where(moved, anchor_arc + jump, anchor_arc)
        anchor = np.where(moved[:, None], raw[:, k], anchor)
        anchor_yaw = np.where(moved, raw_yaw[:, k], anchor_yaw)
        pos[:, k], yaw[:, k], arc[:, k] = anchor, anchor_yaw, anchor_arc
    log_len = arc[:, -1]
    # a step's own arc length: its vertex's plus the distance still to go to it (< min_step)
    step_arc = np.minimum(arc + np.linalg.norm(raw - pos, axis=-1), log_len[:, None])

    speed = np.hypot(st[..., 3], st[..., 4])
    v_logged = np.where(va, speed, 0.0).max(1)
    span = np.where(any_valid, (T - 1 - va[:, ::-1].argmax(1)) - first, 0) * DT
    v_mean = np.where(span > 0, log_len / np.maximum(span, 1e-9), 0.0)
    v_max = np.maximum(v_logged, v_mean)
    ext_len = np.maximum(min_extension, extension_time * v_max)
    total = log_len + ext_len
    P = int(min(max_points, math.ceil(float(total.max()) / spacing) + 1))
    step = np.maximum(spacing, total / (P - 1))                 # [A]
    r = np.arange(P)[None] * step[:, None]                      # [A, P]

    # logged part: interpolate between the steps that bracket each arc length (clipped to the log)
    big = float(arc.max()) + float(r.max()) + 1.0
    flat = (arc + np.arange(A)[:, None] * big).ravel()

    def at_arc(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = np.minimum(q, log_len[:, None])
        k = np.searchsorted(flat, (q + np.arange(A)[:, None] * big).ravel(), "left")
        k = (k.reshape(q.shape) - np.arange(A)[:, None] * T).clip(1, T - 1)
        a0, a1 = np.take_along_axis(arc, k - 1, 1), np.take_along_axis(arc, k, 1)
        f = np.clip((q - a0) / np.maximum(a1 - a0, 1e-9), 0.0, 1.0)
        p0 = np.take_along_axis(pos, (k - 1)[..., None], 1)
        p1 = np.take_along_axis(pos, k[..., None], 1)
        h0, h1 = np.take_along_axis(yaw, k - 1, 1), np.take_along_axis(yaw, k, 1)
        return p0 + f[..., None] * (p1 - p0), h0 + f * (np.remainder(h1 - h0 + np.pi, 2 * np.pi) - np.pi)

    xy, heading = at_arc(r)
    # straight extension along the final direction of travel: the last 1 m chord's direction plus
    # half its turn from the chord before (exact on circles); the logged heading if it never moved
    ends = at_arc(log_len[:, None] - np.array([[0.0, 1.0, 2.0]]).clip(max=log_len[:, None]))[0]
    th1 = np.arctan2(*(ends[:, 0] - ends[:, 1]).T[::-1])
    th0 = np.arctan2(*(ends[:, 1] - ends[:, 2]).T[::-1])
    th_end = th1 + 0.5 * (np.remainder(th1 - th0 + np.pi, 2 * np.pi) - np.pi)
    chord = ends[:, 0] - at_arc(np.zeros((A, 1)))[0][:, 0]
    th_chord = np.arctan2(chord[:, 1], chord[:, 0])
    last_valid = np.where(any_valid, T - 1 - va[:, ::-1].argmax(1), 0)
    last_yaw = st[np.arange(A), last_valid, 2]
    th_dir = np.where(log_len >= 2.0, th_end, np.where(log_len >= 0.5, th_chord, last_yaw))
    direction = np.stack([np.cos(th_dir), np.sin(th_dir)], -1)
    beyond = (r - log_len[:, None]).clip(min=0.0)
    xy = xy + beyond[..., None] * direction[:, None]

    seg = np.diff(xy, axis=1)
    seg_len = np.linalg.norm(seg, axis=-1, keepdims=True)
    tan = np.where(seg_len > 1e-6, seg / np.maximum(seg_len, 1e-9), direction[:, None])
    tangent = np.concatenate([tan, tan[:, -1:]], 1)

    controlled = any_valid.reshape(S, N).copy()
    if ego_row is not None:
        if not 0 <= ego_row < N:
            raise ValueError(f"build_agent_paths: ego_row {ego_row} out of range for {N} agents")
        controlled[:, ego_row] = False
    if agent_size is None:
        size = np.broadcast_to(np.array([12.0, 3.0]), (S, N, 2))
    else:
        size = agent_size.detach().cpu().numpy() if isinstance(agent_size, Tensor) else np.asarray(agent_size)
        if size.shape != (S, N, 2):
            raise ValueError(f"build_agent_paths: agent_size must be [S, N, 2] = {[S, N, 2]}, "
                             f"got {list(size.shape)}")
    reach = np.where(log_len < parked_length, 0.0, total).reshape(S, N)
    candidates = np.stack([
        _candidates(xy.reshape(S, N, P, 2)[i], tangent.reshape(S, N, P, 2)[i], step.reshape(S, N)[i],
                    reach[i], raw.reshape(S, N, T, 2)[i],
                    va.reshape(S, N, T)[i], controlled[i], size[i].astype(np.float64), max_candidates,
                    corridor_margin)
        for i in range(S)])
    # keep only as many candidate columns as some agent needs (the step's cost grows with them)
    candidates = candidates[..., : max(1, int((candidates >= 0).sum(-1).max()))]
    f32 = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32, device=device)  # noqa: E731
    return AgentPaths(
        x=f32(xy[..., 0].reshape(S, N, P)),
        y=f32(xy[..., 1].reshape(S, N, P)),
        tx=f32(tangent[..., 0].reshape(S, N, P)),
        ty=f32(tangent[..., 1].reshape(S, N, P)),
        heading=f32(np.remainder(heading + np.pi, 2 * np.pi).reshape(S, N, P) - np.pi),
        spacing=f32(step.reshape(S, N)),
        length=f32(total.reshape(S, N)),
        log_length=f32(log_len.reshape(S, N)),
        step_arc=f32(step_arc.reshape(S, N, T)),
        v_max=f32(v_max.reshape(S, N)),
        controlled=torch.as_tensor(controlled, device=device),
        candidates=torch.as_tensor(candidates, dtype=torch.int32, device=device),
    )


def _candidates(xy: np.ndarray, tangent: np.ndarray, step: np.ndarray, reach: np.ndarray, pos: np.ndarray,
                valid: np.ndarray, controlled: np.ndarray, size: np.ndarray, k: int, margin: float) -> np.ndarray:
    """Broadphase of one scene: ``[N, k]`` agents whose paths pass near each agent's path (-1 pads).

    ``xy``, ``tangent [N, P, 2]`` resampled paths with spacing ``step [N]``, of which the first
    ``reach [N]`` metres can ever be occupied (a parked agent's: none past its first point); ``pos [N, T, 2]`` /
    ``valid [N, T]`` the log (same-step proximity ranks the pairs); ``size [N, 2]``. Agent m may
    lead agent n where a vertex of m's path lies beside a vertex of n's path (within half a vertex
    gap along it) at a lateral offset below n's half width + m's extent across n's path (from the
    two paths' relative heading) + ``margin``: the corridor test of ``idm_step``, with slack."""
    from scipy.spatial import cKDTree

    N, P, _ = xy.shape
    out = np.full((N, k), -1, dtype=np.int64)
    ids = np.flatnonzero(controlled)
    if len(ids) < 2:
        return out
    # vertices about 2 m apart are enough: a box is at most half a gap from the nearest one
    stride = max(1, int(2.0 // max(float(step[ids].min()), 1e-6)))
    q = xy[ids][:, ::stride].shape[1]
    used = (np.arange(q)[None] * (step[ids] * stride)[:, None]) <= reach[ids][:, None] + 1e-6  # [n, q]
    pts, tan = xy[ids][:, ::stride][used], tangent[ids][:, ::stride][used]
    owner = np.nonzero(used)[0]
    gap = (step[ids] * stride)[owner]
    half_l, half_w = 0.5 * size[ids, 0], 0.5 * size[ids, 1]
    r = float(half_w.max() + 0.5 * np.hypot(size[ids, 0], size[ids, 1]).max() + margin + gap.max())
    pairs = cKDTree(pts).query_pairs(r, output_type="ndarray")
    pairs = pairs[owner[pairs[:, 0]] != owner[pairs[:, 1]]]
    near = np.zeros((len(ids), len(ids)), bool)
    for i, j in ((pairs[:, 0], pairs[:, 1]), (pairs[:, 1], pairs[:, 0])):  # vertex i on n's path, j on m's
        n, m = owner[i], owner[j]
        d = pts[j] - pts[i]
        along = np.abs((d * tan[i]).sum(-1))
        lat = np.abs(tan[i, 0] * d[:, 1] - tan[i, 1] * d[:, 0])
        cos_d = np.abs((tan[i] * tan[j]).sum(-1))
        sin_d = np.abs(tan[i, 0] * tan[j, 1] - tan[i, 1] * tan[j, 0])
        across = half_l[m] * sin_d + half_w[m] * cos_d
        hit = (along <= 0.5 * gap[i] + 0.1) & (lat < half_w[n] + across + margin)
        near[n[hit], m[hit]] = True
    both = valid[ids][:, None] & valid[ids][None, :]                                # [n, n, T]
    same_step = np.linalg.norm(pos[ids][:, None] - pos[ids][None, :], axis=-1)
    rank = np.where(both, same_step, np.inf).min(-1)
    rank = np.where(near, np.minimum(rank, 1e6), np.inf)
    order = np.argsort(rank, axis=1, kind="stable")[:, :k]
    chosen = np.where(np.isfinite(np.take_along_axis(rank, order, 1)), ids[order], -1)
    out[ids, : chosen.shape[1]] = chosen
    return out


@dataclass
class IDMState:
    """Reactive agents of B envs: where each is on its path and how fast it goes."""

    s: Tensor       # [B, N] arc position on the agent's path (m)
    v: Tensor       # [B, N] speed along the path (m/s, >= 0)
    active: Tensor  # [B, N] bool: present now (logged valid at this step) and simulated by IDM


class _Lookup:
    """Point look-ups on the paths of B envs' agents (row n of each env's scene). Flat 1-D gathers
    in structure-of-arrays form: on CPU they are several times faster than row gathers or
    reductions over a trailing size-2 axis."""

    def __init__(self, paths: AgentPaths, scene_idx: Tensor):
        S, N, P = paths.x.shape
        self.P = P
        self.cols = [a.reshape(-1) for a in (paths.x, paths.y, paths.tx, paths.ty)]
        self.heading = paths.heading.reshape(-1)
        rows = scene_idx[:, None] * N + torch.arange(N, device=scene_idx.device)[None]
        self.base = (rows * P).to(torch.int32)                                   # [B, N] (int32: less memory traffic)
        self.spacing = paths.spacing[scene_idx]                                                       # [B, N]

    def at(self, s: Tensor, heading: bool = False) -> tuple[Tensor, ...]:
        """``(x, y, tx, ty[, heading])`` at arc lengths ``s [B, N, *K]`` (≥ 0) of each row's path,
        clamped to its end. Positions move along the segment's tangent (the chord of ≤ 1 spacing)."""
        extra = (1,) * (s.ndim - 2)
        spacing = self.spacing.reshape(*s.shape[:2], *extra)
        u = (s / spacing).clamp(max=self.P - 1.001)
        j = torch.floor(u)
        flat = (self.base.reshape(*self.base.shape, *extra) + j.to(torch.int32)).reshape(-1)
        x, y, tx, ty = (c.index_select(0, flat).reshape(s.shape) for c in self.cols)
        f = u - j
        along = f * spacing
        out = (torch.addcmul(x, along, tx), torch.addcmul(y, along, ty), tx, ty)
        if not heading:
            return out
        h0 = self.heading.index_select(0, flat).reshape(s.shape)
        h1 = self.heading.index_select(0, flat + 1).reshape(s.shape)
        dh = torch.remainder(h1 - h0 + math.pi, 2.0 * math.pi) - math.pi
        return (*out, h0 + f * dh)


def _logged_start(paths: AgentPaths, agent_state: Tensor, agent_valid: Tensor, scene_idx: Tensor,
                  t: Tensor, params: IDMParams | None = None) -> IDMState:
    """IDM state of every agent taken from the log at step ``t`` (absent agents inactive)."""
    log_state, valid = replay(agent_state, agent_valid, scene_idx, t)
    n_steps = paths.step_arc.shape[2]
    s = paths.step_arc[scene_idx, :, t.clamp(0, n_steps - 1)]
    parked = paths.log_length[scene_idx] < (params or IDMParams()).parked_length
    v = torch.hypot(log_state[..., 3], log_state[..., 4])
    active = valid & paths.controlled[scene_idx]
    v = torch.where(active & ~parked, v, torch.zeros_like(v))
    return IDMState(s=s, v=v, active=active)


def idm_reset(paths: AgentPaths, agent_state: Tensor, agent_valid: Tensor, scene_idx: Tensor, t: Tensor,
              params: IDMParams | None = None) -> IDMState:
    """Reactive agents of B envs starting from their logged states at step ``t [B]``.

    ``agent_state [S, N, T, 5]`` / ``agent_valid [S, N, T]`` are the padded logs the paths were
    built from; ``scene_idx [B]`` the scene of each env. Agents absent at ``t``, the ego's row and
    rows without data are inactive; parked agents start (and stay) at speed 0."""
    return _logged_start(paths, agent_state, agent_valid, scene_idx, t, params)


def idm_assign(state: IDMState, idx: Tensor, fresh: IDMState) -> IDMState:
    """A copy of ``state`` whose env rows ``idx [n]`` are replaced by ``fresh`` (``[n, N]`` fields)."""
    out = IDMState(state.s.clone(), state.v.clone(), state.active.clone())
    out.s[idx], out.v[idx], out.active[idx] = fresh.s, fresh.v, fresh.active
    return out


def _gap_on_path(
    look: _Lookup, s0: Tensor, end: Tensor, now: tuple[Tensor, ...], half_w: Tensor, half_l: Tensor,
    box: tuple[Tensor, ...], ok: Tensor, params: IDMParams,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gaps from each agent to K candidate boxes along the agent's path, keeping the nearest.

    ``s0``, ``end``, ``now`` = (x, y, tx, ty), ``half_w``, ``half_l``: the agent, ``[B, N, 1]``.
    ``box`` = (x, y, cos, sin, half length, half width) of the candidates and ``ok``: ``[B, N, K]``
    (or broadcastable). The candidate centre is projected onto the path with one look-up at the
    straight-line guess plus a linear correction. Returns ``(gap [B, N], best [B, N] candidate
    index, tx, ty [B, N] path tangent at the leader)``; gap is inf without a leader.
    (Written with few, fused passes: this is the hot loop of reactive traffic.)"""
    x, y, tx, ty = now
    cx, cy, c_cos, c_sin, c_hl, c_hw = box
    fwd = torch.addcmul((cx - x) * tx, cy - y, ty)
    qx, qy, qtx, qty = look.at(torch.minimum(s0 + fwd.clamp(min=0.0), end))
    rx, ry = cx - qx, cy - qy
    lat = torch.addcmul(qtx * ry, qty, rx, value=-1.0)
    cos_d = torch.addcmul(c_cos * qtx, c_sin, qty).abs_()
    sin_d = torch.addcmul(c_sin * qtx, c_cos, qty, value=-1.0).abs_()
    # bumper-to-bumper gap along the path: the candidate's extent along the path is
    # |l/2 cos| + |w/2 sin| of the relative heading, across it |l/2 sin| + |w/2 cos|
    ahead = torch.addcmul(fwd.clamp(min=0.0), rx, qtx).addcmul_(ry, qty)
    gap = ahead.sub_(half_l).sub_(c_hl * cos_d).sub_(c_hw * sin_d)
    reach = torch.addcmul(c_hl * sin_d, c_hw, cos_d).add_(half_w + params.lateral_margin)
    lead = ok & (fwd > 0.0) & (gap < params.lookahead) & (lat.abs_() < reach)
    gap = torch.where(lead, gap, torch.full_like(gap, math.inf))
    best = gap.argmin(-1)  # (min with indices is very slow on a busy CPU with several threads)
    best_gap = torch.gather(gap, -1, best[..., None])[..., 0]
    best_t = lambda a: torch.gather(a.expand_as(gap), -1, best[..., None])[..., 0]  # noqa: E731
    return best_gap, best, best_t(qtx), best_t(qty)


def _leaders(
    look: _Lookup, paths: AgentPaths, scene_idx: Tensor, state: IDMState, now: tuple[Tensor, ...],
    length: Tensor, width: Tensor, ego_box: tuple[Tensor, Tensor, Tensor, Tensor], ego_speed: Tensor,
    params: IDMParams,
) -> tuple[Tensor, Tensor]:
    """Bumper-to-bumper gap ``[B, N]`` to each agent's leader (inf without one) and the leader's
    speed along the agent's path ``[B, N]``. Candidates: the agents of the precomputed broadphase
    (``AgentPaths.candidates``, ``[B, N, K]``) that are active now, and the ego."""
    B, N = state.s.shape
    x, y, tx, ty, heading = now
    half_l, half_w = 0.5 * length, 0.5 * width
    cand = paths.candidates[scene_idx]                                          # [B, N, K]
    K = cand.shape[2]
    env_row = torch.arange(0, B * N, N, device=cand.device, dtype=torch.int32)[:, None, None]
    row = (env_row + cand.clamp(min=0)).reshape(-1)
    pick = lambda a: a.reshape(-1).index_select(0, row).reshape(B, N, K)  # noqa: E731
    u = lambda a: a[..., None]  # noqa: E731
    s0, end = u(state.s), u(paths.length[scene_idx])
    me = (u(x), u(y), u(tx), u(ty))
    ok = (cand >= 0) & pick(state.active) & u(state.active)
    box = (pick(x), pick(y), pick(torch.cos(heading)), pick(torch.sin(heading)), pick(half_l), pick(half_w))
    gap, best, qtx, qty = _gap_on_path(look, s0, end, me, u(half_w), u(half_l), box, ok, params)
    m = torch.gather(cand.clamp(min=0), 2, best[..., None])[..., 0].long()      # leader row [B, N]
    at_m = lambda a: torch.gather(a, 1, m)  # noqa: E731
    v_lead = at_m(state.v) * (at_m(tx) * qtx + at_m(ty) * qty)

    # the ego
    ego_c, ego_yaw, ego_l, ego_w = ego_box
    ec, es = torch.cos(ego_yaw), torch.sin(ego_yaw)
    e = lambda a: a.reshape(B, 1, 1)  # noqa: E731
    ego = (e(ego_c[:, 0]), e(ego_c[:, 1]), e(ec), e(es), e(0.5 * ego_l), e(0.5 * ego_w))
    gap_e, _, etx, ety = _gap_on_path(look, s0, end, me, u(half_w), u(half_l), ego, u(state.active), params)
    v_ego = ego_speed[:, None] * (ec[:, None] * etx + es[:, None] * ety)
    use = gap_e < gap
    gap, v_lead = torch.where(use, gap_e, gap), torch.where(use, v_ego, v_lead)

    # the end of the (extended) path is a stopped obstacle
    gap_end = paths.length[scene_idx] - state.s - half_l
    use = (gap_end < gap) & (gap_end < params.lookahead)
    return torch.where(use, gap_end, gap), torch.where(use, torch.zeros_like(v_lead), v_lead)


def idm_accel(v: Tensor, v0: Tensor, gap: Tensor, v_lead: Tensor, params: IDMParams) -> Tensor:
    """IDM acceleration a·[1 - (v/v0)^δ - (s*/s)²], s* = s0 + max(0, v·T + v·Δv / (2√(ab))), clipped
    to [-max_decel, max_accel]; ``gap`` = inf means a free road."""
    dv = v - v_lead
    dynamic = v * params.headway + v * dv / (2.0 * math.sqrt(params.max_accel * params.comfort_decel))
    s_star = params.min_gap + dynamic.clamp(min=0.0)
    finite = torch.isfinite(gap)
    safe_gap = torch.where(finite, gap, torch.ones_like(gap)).clamp(min=0.1)  # overlap: brake hard
    interaction = torch.where(finite, (s_star / safe_gap).square(), torch.zeros_like(gap))
    acc = params.max_accel * (1.0 - (v / v0).pow(params.delta) - interaction)
    return acc.clamp(-params.max_decel, params.max_accel)


def idm_step(
    state: IDMState,
    paths: AgentPaths,
    agent_state: Tensor,
    agent_valid: Tensor,
    agent_size: Tensor,
    scene_idx: Tensor,
    t: Tensor,
    ego_box: tuple[Tensor, Tensor, Tensor, Tensor],
    ego_speed: Tensor,
    params: IDMParams,
    dt: float,
) -> tuple[IDMState, Tensor, Tensor]:
    """Advance the reactive agents of B envs by one tick, into log step ``t``.

    Args:
        state: the agents now (``idm_reset`` / previous ``idm_step``).
        paths: ``build_agent_paths`` of the padded logs ``agent_state [S, N, T, 5]`` /
            ``agent_valid [S, N, T]``; ``agent_size [S, N, 2]`` length, width.
        scene_idx: ``[B]`` long; t: ``[B]`` long, the log step being entered (validity comes from it).
        ego_box: the ego box now: centre ``[B, 2]``, yaw ``[B]``, length ``[B]``, width ``[B]``
            (``checks.ego_box``); ego_speed: ``[B]`` m/s. The ego is a leader candidate of every agent.
        params: IDM parameters; dt: tick (s).

    Returns:
        ``(new_state, agent_state [B, N, 5], valid [B, N])`` with states as in the log (box centre
        x, y, heading, vx, vy). Each agent's leader is found from the boxes now; its speed then
        follows IDM with a ballistic update over ``dt`` (stopping within the tick stops it, no
        reverse) and it moves along its path. Agents appearing at ``t`` start from their logged
        state, agents absent at ``t`` are invalid, rows not simulated (the ego's) are log replay.
    """
    sc = scene_idx
    look = _Lookup(paths, sc)
    size = agent_size[sc]
    length, width = size[..., 0], size[..., 1]
    parked = paths.log_length[sc] < params.parked_length
    now = look.at(state.s, heading=True)
    gap, v_lead = _leaders(look, paths, sc, state, now, length, width, ego_box, ego_speed, params)
    v0 = paths.v_max[sc].clamp(min=params.v0_floor)
    acc = idm_accel(state.v, v0, gap, v_lead, params)
    v_free = state.v + acc * dt
    stops = v_free < 0.0
    ds = torch.where(stops, state.v.square() / (2.0 * (-acc).clamp(min=1e-6)),
                     state.v * dt + 0.5 * acc * dt * dt)
    moving = state.active & ~parked
    s_new = torch.where(moving, torch.minimum(state.s + ds, paths.length[sc]), state.s)
    v_new = torch.where(moving & ~stops, v_free, torch.zeros_like(v_free))

    start = _logged_start(paths, agent_state, agent_valid, sc, t, params)
    appear = start.active & ~state.active
    s_new = torch.where(appear, start.s, s_new)
    v_new = torch.where(appear, start.v, v_new)
    new = IDMState(s=s_new, v=torch.where(start.active, v_new, torch.zeros_like(v_new)), active=start.active)

    x, y, tx, ty, heading = look.at(new.s, heading=True)
    sim = torch.stack([x, y, heading, new.v * tx, new.v * ty], -1)
    log_state, log_valid = replay(agent_state, agent_valid, sc, t)
    ctrl = paths.controlled[sc]
    out = torch.where(ctrl[..., None], sim, log_state)
    valid = torch.where(ctrl, new.active, log_valid)
    return new, out, valid
