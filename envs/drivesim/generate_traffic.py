"""Traffic for the procedural generator: routes over the lane graph, agent placement, and a
vectorised numpy simulation of drivers that produces the logged tracks.

Drivers (the ego included) follow a route (a lane sequence from a source lane to a sink) with the
rear axle on the route's centre line (smoothed over 4 m so yaw is continuous) and the box centre
0.3 x length ahead. Every SIM_DT they choose an acceleration with IDM (Treiber's Intelligent Driver
Model) towards a desired speed capped by the curvature ahead; the acceleration ramps linearly to
the new value over the interval (jerk-limited, except for braking harder than comfortable), and the
0.1 s log samples that ramp exactly.

Leaders are found along the route: any vehicle whose rear (or, while it enters the route from a
merging lane, its front) lies on a lane of the route ahead; vehicles on a junction lane that merges
into the route are projected onto it by their distance to the merge point, those on a junction lane
that forks off the route by their distance from the fork.

Junctions are arbitrated by reservations of junction lanes (connectors, merge zones). Entering a
lane that crosses another needs a reservation, granted only while no other vehicle holds a crossing
lane; a lane of lower priority (higher ``rank``) also needs an accepted gap: no vehicle bound for a
conflicting lane of higher priority is inside it, or arrives within the driver's critical gap of
the driver's own arrival. Signals gate requests (green; amber only for a moving driver that cannot
stop comfortably) and withdraw reservations that can still be given up. Priority movements ask
early (no needless braking); a yielding driver decides late, about a second before its last
comfortable stopping point, and is then committed. Without a reservation a driver stops at the
line (an IDM obstacle). Reservations are released when the rear bumper leaves the lane.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from envs.drivesim.generate_map import CONFLICT_DISTANCE, RoadMap, cumlen, left_normals, resample
from envs.drivesim.scene import DT, AgentType, LightState

DS = 0.5
"""Resolution (m) of route geometry tables."""
SMOOTH_M = 4.0
"""Window (m) of the moving average that smooths route centre lines (curvature continuity)."""
REAR_FRACTION = 0.2
"""Rear bumper to rear axle, as a fraction of length (the box centre is 0.3 x length ahead)."""
CENTER_FRACTION = 0.3
"""Rear axle to box centre, as a fraction of length (DESIGN.md's default)."""
SIM_DT = 0.3
"""Drivers decide every 0.3 s; acceleration ramps linearly to each new decision over the interval,
and the 0.1 s log samples that ramp exactly."""
STOP_GAP = 1.0
"""Drivers stop this far before a line (m)."""
JERK_UP = 2.0
"""Fastest rise of acceleration (m/s³)."""
JERK_DOWN = 4.0
"""Fastest fall of acceleration (m/s³) while braking no harder than comfortable."""
LOOKAHEAD_M = 150.0
"""Leaders farther than this are ignored."""
B_CURVE = 1.0
"""Deceleration (m/s²) used to slow down ahead of curves."""
B_MAX = 8.0
"""Hardest braking (m/s²) a driver applies."""


# ---- routes -------------------------------------------------------------------------------------
@dataclass
class Routes:
    """Every source-to-sink lane sequence with padded look-up tables (R routes, L lanes)."""

    lanes: list[list[int]]
    length: np.ndarray        # [R] route length (m)
    bounds: np.ndarray        # [R, K + 1] start offset of each lane of the route, then length, then +inf
    lane_of: np.ndarray       # [R, K] lane ids (-1 padded)
    n_lanes: np.ndarray       # [R]
    off: np.ndarray           # [R, L] start offset of lane l in route r; NaN if absent (merges: projected)
    off_own: np.ndarray       # [R, L] the same without projected lanes
    jlane: np.ndarray         # [R, J + 1] junction lanes in order (-1 padded)
    jstart: np.ndarray        # [R, J + 1] (+inf padded)
    jend: np.ndarray          # [R, J + 1] (+inf padded)
    xy: np.ndarray            # [R, P, 2] smoothed centre line every DS metres of route length
    heading: np.ndarray       # [R, P]
    kappa: np.ndarray         # [R, P]
    cap: np.ndarray           # [R, P] speed cap (m/s) from curvature ahead
    raw: list[np.ndarray]     # per route: the lanes' centre lines concatenated [Q, 2]
    raw_s: list[np.ndarray]   # per route: arc length at those vertices [Q]
    raw_w: list[np.ndarray]   # per route: lane width at those vertices [Q]
    lane_len: np.ndarray      # [L] length of every lane
    routes_of: list[list[int]]  # per lane: the routes through it


def _smooth(p: np.ndarray, n: int) -> np.ndarray:
    """Moving average over ``n`` (odd) samples; ends padded by point reflection (keeps lines straight)."""
    h = n // 2
    if len(p) <= 2 * h + 1:
        return p
    pad = np.concatenate([2 * p[0] - p[h:0:-1], p, 2 * p[-1] - p[-2:-h - 2:-1]])
    c = np.cumsum(np.concatenate([np.zeros((1,) + p.shape[1:]), pad]), axis=0)
    return (c[n:] - c[:-n]) / n


def build_routes(road: RoadMap, a_lat: float) -> Routes:
    lanes = road.lanes
    n_l = len(lanes)
    lane_len = np.array([cumlen(ln.points)[-1] for ln in lanes])
    # enumerate every path from a lane without predecessors to a lane without successors
    seqs: list[list[int]] = []
    stack = [[i] for i in range(n_l) if not road.pred[i]]
    while stack:
        seq = stack.pop()
        nxt = road.succ[seq[-1]]
        if not nxt:
            seqs.append(seq)
        for j in nxt[::-1]:
            if j not in seq:
                stack.append(seq + [j])
    seqs.sort()
    n_r = len(seqs)
    k_max = max(len(q) for q in seqs)
    bounds = np.full((n_r, k_max + 2), np.inf)
    lane_of = np.full((n_r, k_max), -1, dtype=np.int64)
    off = np.full((n_r, n_l), np.nan)
    jl: list[list[int]] = []
    raws, raw_ss, raw_ws = [], [], []
    for r, seq in enumerate(seqs):
        pts = [lanes[seq[0]].points] + [lanes[i].points[1:] for i in seq[1:]]
        raw = np.concatenate(pts)
        c = cumlen(raw)
        starts = np.cumsum([0] + [len(p) for p in pts[:-1]])
        starts[1:] -= 1                      # each later lane starts on the previous lane's last vertex
        bounds[r, : len(seq)] = c[starts]
        bounds[r, len(seq)] = c[-1]
        lane_of[r, : len(seq)] = seq
        off[r, seq] = c[starts]
        jl.append([i for i in seq if lanes[i].junction])
        raws.append(raw)
        raw_ss.append(c)
        raw_ws.append(np.repeat([lanes[i].width for i in seq], [len(p) for p in pts]))
    # geometry every DS metres for all routes at once, extended straight past each route's end
    length = bounds[np.arange(n_r), [len(q) for q in seqs]]
    t = np.arange(int(length.max() / DS) + 2) * DS
    xy = np.zeros((n_r, len(t), 2))
    for r in range(n_r):
        raw, c = raws[r], raw_ss[r]
        end_dir = (raw[-1] - raw[-2]) / max(c[-1] - c[-2], 1e-9)
        over = np.maximum(t - c[-1], 0.0)[:, None]
        xy[r] = np.stack([np.interp(t, c, raw[:, 0]), np.interp(t, c, raw[:, 1])], axis=1) + over * end_dir
    xy = _smooth(xy.transpose(1, 0, 2), int(SMOOTH_M / DS) | 1).transpose(1, 0, 2)
    dxy = np.asarray(np.gradient(xy, axis=1))
    heading = np.unwrap(np.arctan2(dxy[..., 1], dxy[..., 0]), axis=1)
    kappa = _smooth(np.gradient(heading, axis=1).T / DS, 5).T
    # cap(s)^2 = min over s' >= s of vc(s')^2 + 2 b (s' - s): a reverse running minimum
    q = a_lat / np.maximum(np.abs(kappa), 1e-4) + 2 * B_CURVE * t
    cap = np.sqrt(np.maximum(np.minimum.accumulate(q[:, ::-1], axis=1)[:, ::-1] - 2 * B_CURVE * t, 0.0))
    # junction lanes beside the route are projected onto it: one that merges into a route lane by
    # its distance to the merge point, one that diverges from the route by its distance from the fork
    off_own = off.copy()
    junction = [p for p in range(n_l) if lanes[p].junction]
    for r, seq in enumerate(seqs):
        pos = {lane: k for k, lane in enumerate(seq)}
        for p in junction:
            if p in pos:
                continue
            merged = [m for m in road.succ[p] if m in pos]
            if merged:
                off[r, p] = off[r, merged[0]] - lane_len[p]
                continue
            for q_ in road.pred[p]:
                k = pos.get(q_, -1)
                if 0 <= k < len(seq) - 1 and lanes[seq[k + 1]].junction:
                    off[r, p] = off[r, seq[k + 1]]
    j_max = max((len(x) for x in jl), default=0)
    jlane = np.full((n_r, j_max + 1), -1, dtype=np.int64)
    jstart = np.full((n_r, j_max + 1), np.inf)
    jend = np.full((n_r, j_max + 1), np.inf)
    for r, js in enumerate(jl):
        for k, i in enumerate(js):
            jlane[r, k] = i
            jstart[r, k] = off[r, i]
            jend[r, k] = off[r, i] + lane_len[i]
    routes_of: list[list[int]] = [[] for _ in range(n_l)]
    for r, seq in enumerate(seqs):
        for i in seq:
            routes_of[i].append(r)
    return Routes(
        lanes=seqs, length=length, bounds=bounds, lane_of=lane_of, n_lanes=np.array([len(q) for q in seqs]),
        off=off, off_own=off_own, jlane=jlane, jstart=jstart, jend=jend, xy=xy, heading=heading, kappa=kappa,
        cap=cap,
        raw=raws, raw_s=raw_ss, raw_w=raw_ws, lane_len=lane_len, routes_of=routes_of,
    )


@dataclass
class Conflicts:
    """Pairwise relations between lanes (only junction lanes have any)."""

    cross: np.ndarray      # [L, L] bool: the lanes cross (exclusive use)
    merge: np.ndarray      # [L, L] bool: the lanes merge into the same successor
    conflict: np.ndarray   # [L, L] bool: cross | merge (a lower rank yields to a higher one)
    need_res: np.ndarray   # [L] bool: entering needs a reservation
    rank: np.ndarray       # [L] int
    signal: np.ndarray     # [L] int signal group (-1 none)


def build_conflicts(road: RoadMap) -> Conflicts:
    n = len(road.lanes)
    cross = np.zeros((n, n), dtype=bool)
    merge = np.zeros((n, n), dtype=bool)
    jl = [i for i, ln in enumerate(road.lanes) if ln.junction]
    if jl:
        pts = [resample(road.lanes[i].points, 1.0) for i in jl]
        owner = np.concatenate([np.full(len(p), a) for a, p in enumerate(pts)])
        close = cKDTree(np.concatenate(pts)).query_pairs(CONFLICT_DISTANCE, output_type="ndarray")
        pair = np.zeros((len(jl), len(jl)), dtype=bool)
        pair[owner[close[:, 0]], owner[close[:, 1]]] = True
        pair |= pair.T
        for a, i in enumerate(jl):
            for c, j in enumerate(jl):
                if i == j:
                    continue
                if set(road.succ[i]) & set(road.succ[j]):
                    merge[i, j] = True
                elif set(road.pred[i]) & set(road.pred[j]):
                    continue            # diverging from one lane: ordered by following (projection)
                elif pair[a, c]:
                    cross[i, j] = True
    rank = np.array([ln.rank for ln in road.lanes])
    conflict = cross | merge
    signal = np.array([ln.signal for ln in road.lanes])
    need = cross.any(1) | ((rank > 0) & conflict.any(1)) | (signal >= 0)
    return Conflicts(cross, merge, conflict, need, rank, signal)


# ---- agents ---------------------------------------------------------------------------------------
@dataclass
class Drivers:
    """Per-vehicle parameters and initial state (N vehicles; index 0 is the ego)."""

    route: np.ndarray      # [N] route index
    s: np.ndarray          # [N] rear-axle position along the route (m)
    v: np.ndarray          # [N] speed (m/s)
    length: np.ndarray     # [N]
    width: np.ndarray      # [N]
    kind: np.ndarray       # [N] AgentType
    v0: np.ndarray         # [N] desired speed
    a: np.ndarray          # [N] IDM maximum acceleration
    b: np.ndarray          # [N] IDM comfortable deceleration
    th: np.ndarray         # [N] IDM time headway
    s0: np.ndarray         # [N] IDM jam distance
    gap: np.ndarray        # [N] critical gap (s) when yielding


def boxes_overlap(ca: np.ndarray, ha: np.ndarray, la: np.ndarray, wa: np.ndarray,
                  cb: np.ndarray, hb: np.ndarray, lb: np.ndarray, wb: np.ndarray) -> np.ndarray:
    """Separating-axis test of oriented boxes (broadcasting over leading dims; centres ``[..., 2]``).

    True where the boxes overlap (touching counts as separated).
    """
    ca_, sa_ = np.cos(ha), np.sin(ha)
    cb_, sb_ = np.cos(hb), np.sin(hb)
    dx, dy = cb[..., 0] - ca[..., 0], cb[..., 1] - ca[..., 1]
    cos_d = np.abs(ca_ * cb_ + sa_ * sb_)          # |cos| of the angle between the boxes' axes
    sin_d = np.abs(sa_ * cb_ - ca_ * sb_)
    sep = np.abs(dx * ca_ + dy * sa_) >= la / 2 + lb / 2 * cos_d + wb / 2 * sin_d
    sep |= np.abs(-dx * sa_ + dy * ca_) >= wa / 2 + lb / 2 * sin_d + wb / 2 * cos_d
    sep |= np.abs(dx * cb_ + dy * sb_) >= lb / 2 + la / 2 * cos_d + wa / 2 * sin_d
    sep |= np.abs(-dx * sb_ + dy * cb_) >= wb / 2 + la / 2 * sin_d + wa / 2 * cos_d
    return ~sep


def _pose(routes: Routes, r: np.ndarray, s: np.ndarray, length: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Box centre ``[..., 2]`` and heading of vehicles with rear axle at ``s`` on route ``r``."""
    f = np.minimum(np.maximum(s / DS, 0.0), routes.xy.shape[1] - 1.001)
    i = f.astype(np.int64)
    w = f - i
    xy = routes.xy[r, i] * (1 - w)[..., None] + routes.xy[r, i + 1] * w[..., None]
    h = routes.heading[r, i] * (1 - w) + routes.heading[r, i + 1] * w
    return xy + (CENTER_FRACTION * length)[..., None] * np.stack([np.cos(h), np.sin(h)], -1), h


@dataclass(frozen=True)
class TrafficSpec:
    """What the traffic drawer may use (a view of GeneratorConfig)."""

    num_agents: int
    num_steps: int
    agent_fill: tuple[float, float]
    pedestrian_fraction: float
    cyclist_fraction: float
    truck_fraction: float
    ego_speed_factor: tuple[float, float]


def _place_ego(rng: np.random.Generator, road: RoadMap, routes: Routes, spec: TrafficSpec
               ) -> tuple[int, float, float, float, float]:
    """Route, position, length, width and desired speed of the ego: a car on a route long enough
    for the whole log, starting 8 m to about a third of its log's travel (at most 60 m) before the
    layout's junction lane or curve when it has one."""
    n_r = len(routes.lanes)
    with_feature = [r for r in range(n_r) if np.isfinite(routes.jstart[r, 0])]
    order = list(rng.permutation(with_feature)) + list(rng.permutation(
        [r for r in range(n_r) if r not in with_feature]))
    length = float(np.clip(rng.normal(4.6, 0.3), 3.8, 5.3))
    width = float(rng.uniform(1.75, 2.0))
    factor = float(rng.uniform(*spec.ego_speed_factor))
    for r in order:
        v0 = road.lanes[routes.lanes[r][0]].speed_limit * factor
        need = 1.05 * v0 * spec.num_steps * DT + 0.8 * length + 10.0
        curv = np.nonzero(np.abs(routes.kappa[r]) > 2e-3)[0]
        if np.isfinite(routes.jstart[r, 0]):
            feature = routes.jstart[r, 0] - 0.8 * length
        elif len(curv):
            feature = curv[0] * DS
        else:
            feature = float(rng.uniform(60.0, max(routes.length[r] - need, 61.0)))
        # the feature comes in the first third of the log or so
        back = float(rng.uniform(8.0, max(20.0, min(60.0, 0.35 * v0 * spec.num_steps * DT))))
        s = min(feature - back, routes.length[r] - need)
        if s >= 5.0:
            return int(r), s, length, width, v0
    raise RuntimeError("no route is long enough for the ego")


def place_vehicles(rng: np.random.Generator, road: RoadMap, routes: Routes, conf: Conflicts, n_vehicles: int,
                   spec: TrafficSpec) -> Drivers:
    """The ego (index 0), then up to ``n_vehicles`` others at random free places on non-junction
    lanes: candidates are drawn at once and accepted greedily where their box, lengthened by 3.5 m
    front and back, overlaps no accepted one."""
    lanes = road.lanes
    r_e, s_e, l_e, w_e, v0_e = _place_ego(rng, road, routes, spec)
    m = 3 * n_vehicles + 8
    cand = np.array([i for i, ln in enumerate(lanes) if not ln.junction])
    p = routes.lane_len[cand] / routes.lane_len[cand].sum()
    lane = rng.choice(cand, size=m, p=p)
    pick = rng.random(m)
    route = np.array([routes.routes_of[ln][int(u * len(routes.routes_of[ln]))]
                      for ln, u in zip(lane, pick, strict=True)], dtype=np.int64)
    u = rng.random(m)
    cyclist = u < spec.cyclist_fraction
    gentle = np.abs(routes.kappa).max(1)[route] < 1 / 40          # trucks avoid tight turns
    truck = ~cyclist & (u < spec.cyclist_fraction + spec.truck_fraction) & gentle
    van = ~cyclist & ~truck & (rng.random(m) < 0.15)
    length = np.where(cyclist, rng.uniform(1.6, 1.9, m), np.where(
        truck, rng.uniform(7.5, 12.0, m), np.where(van, rng.uniform(5.0, 6.0, m),
                                                   np.clip(rng.normal(4.6, 0.3, m), 3.8, 5.3))))
    width = np.where(cyclist, rng.uniform(0.6, 0.8, m), np.where(
        truck, rng.uniform(2.4, 2.6, m),
        np.where(van, rng.uniform(1.95, 2.15, m), rng.uniform(1.75, 2.0, m))))
    lo = REAR_FRACTION * length + 0.5
    hi = routes.lane_len[lane] - (1 - REAR_FRACTION) * length - 0.5
    s = routes.off[route, lane] + lo + rng.random(m) * np.maximum(hi - lo, 0.0)
    limit = np.array([ln.speed_limit for ln in lanes])[lane]
    v0 = np.where(cyclist, rng.uniform(4.0, 6.5, m), limit * rng.uniform(0.8, 1.1, m))
    # greedy acceptance against inflated boxes (row 0 = the ego)
    all_r = np.concatenate([[r_e], route])
    all_s = np.concatenate([[s_e], s])
    all_l = np.concatenate([[l_e], length])
    all_w = np.concatenate([[w_e], width])
    c, h = _pose(routes, all_r, all_s, all_l)
    ov = boxes_overlap(c[:, None], h[:, None], all_l[:, None] + 7.0, all_w[:, None] + 0.3,
                       c[None], h[None], all_l[None] + 7.0, all_w[None] + 0.3)
    keep = np.zeros(m + 1, dtype=bool)
    keep[0] = True
    ok = np.concatenate([[True], hi > lo])
    count = 1
    for i in range(1, m + 1):
        if count > n_vehicles:
            break
        if ok[i] and not ov[i, keep].any():
            keep[i] = True
            count += 1
    idx = np.nonzero(keep[1:])[0]
    k = len(idx)
    one = np.ones(1)
    dr = Drivers(
        route=all_r[keep], s=all_s[keep], v=np.zeros(k + 1), length=all_l[keep], width=all_w[keep],
        kind=np.concatenate([[AgentType.VEHICLE],
                             np.where(cyclist[idx], AgentType.CYCLIST, AgentType.VEHICLE)]),
        v0=np.concatenate([[v0_e], v0[idx]]),
        a=np.concatenate([1.5 * one, rng.uniform(1.0, 2.0, k)]),
        b=np.concatenate([2.0 * one, rng.uniform(1.5, 2.5, k)]),
        th=np.concatenate([1.5 * one, rng.uniform(1.0, 1.8, k)]),
        s0=np.concatenate([2.5 * one, rng.uniform(2.0, 3.0, k)]),
        gap=np.concatenate([4.0 * one, rng.uniform(3.0, 5.0, k)]),
    )
    # initial speeds: a fraction of the desired speed, then no faster than the leader gap and the
    # next stop line allow
    cap = routes.cap[dr.route, np.minimum((dr.s / DS).astype(int), routes.cap.shape[1] - 1)]
    v = np.minimum(dr.v0, cap) * np.concatenate([rng.uniform(0.6, 1.0, 1), rng.uniform(0.4, 1.0, k)])
    # (every vehicle is treated as stopping at its next reservation line)
    sim = _Sim(routes, conf, dr, np.zeros((1, 1), dtype=np.int8))
    jl, d_line = sim.next_junction(dr.s)
    sim.off = np.where(sim.need_ext[jl][:, None], sim.off_own, sim.off_all)
    gap, j, has = sim.leaders(dr.s)
    stop = sim.need_ext[jl]
    for _ in range(12):
        dr.v = v
        acc = sim.idm(dr.s, v, gap, j, has, stop, d_line)
        slow = acc < -0.8 * dr.b
        if not slow.any():
            break
        v = np.where(slow, 0.75 * v, v)
    dr.v = np.where(acc < -0.8 * dr.b, 0.0, v)
    return dr



class _Sim:
    """The driver model (state: ``s``, ``v``, ``active`` and reservations), vectorised over N vehicles."""

    def __init__(self, routes: Routes, conf: Conflicts, dr: Drivers, lights: np.ndarray):
        self.conf, self.dr, self.lights = conf, dr, lights
        n = len(dr.route)
        self.n = n
        self.ar = np.arange(n)
        self.ar2 = np.arange(2 * n)
        # lane look-up for rear and front bumpers at once: edges[k] = start of the route's k-th lane,
        # with -inf first and +inf after the last lane so the count is always a valid lane index
        b = routes.bounds[dr.route]
        edges = b.copy()
        edges[:, 0] = -np.inf
        edges[self.ar, routes.n_lanes[dr.route]] = np.inf
        self.edges2 = np.concatenate([edges, edges])[:, 1:]      # [2N, K + 1]
        self.start2 = np.concatenate([b, b])                     # [2N, K + 2]
        self.lane2 = np.concatenate([routes.lane_of[dr.route]] * 2)
        self.off_all = routes.off[dr.route]                      # [N, L]
        self.off_own = routes.off_own[dr.route]
        self.off = self.off_all
        self.jlane = routes.jlane[dr.route]
        self.jstart = routes.jstart[dr.route]
        self.jend1 = routes.jend[dr.route] + 1.0
        self.has_junctions = bool((routes.jlane >= 0).any())
        self.cap = routes.cap[dr.route]                          # [N, P]
        self.p_max = self.cap.shape[1] - 1
        self.rear = REAR_FRACTION * dr.length
        self.front = (1 - REAR_FRACTION) * dr.length
        self.sqrt_ab = 2 * np.sqrt(dr.a * dr.b)
        self.res = np.full(n, -1)                                # reserved junction lane per vehicle
        self.set_active(np.ones(n, dtype=bool))
        # per-lane tables with one trailing entry for "no junction lane" (index -1)
        self.need_ext = np.concatenate([conf.need_res, [False]])
        self.signal_ext = np.concatenate([conf.signal, [-1]])
        self.minor_ext = np.concatenate([conf.rank > 0, [False]])
        self.signalised = bool((conf.signal >= 0).any())
        go_row = np.full((1, lights.shape[1]), LightState.GO, dtype=lights.dtype)
        self.lights_ext = np.concatenate([lights, go_row])

    def set_active(self, active: np.ndarray) -> None:
        """Vehicles still on the map (the others are never leaders)."""
        self.others = active[None, :] & ~np.eye(self.n, dtype=bool)

    def leaders(self, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Gap ``[N]`` from each front bumper to the nearest active vehicle ahead on its route, that
        vehicle's index, and whether there is one (within LOOKAHEAD_M)."""
        n = self.n
        s_rear = s - self.rear
        pos2 = np.concatenate([s_rear, s + self.front])
        k = np.add.reduce(self.edges2 <= pos2[:, None], axis=1)
        lane = self.lane2[self.ar2, k]
        u = pos2 - self.start2[self.ar2, k]
        u[n:] -= self.dr.length                                   # front bumper → rear estimate
        pos = self.off[:, lane] + u                               # [N (follower), 2N (rear | front)]
        # both estimates agree where both lanes are on the route; fmin skips the NaN of a lane
        # that is not
        rear_ij = np.fmin(pos[:, :n], pos[:, n:])
        gap = rear_ij - (s + self.front)[:, None]
        ok = (rear_ij > s_rear[:, None]) & (gap < LOOKAHEAD_M)
        ok &= self.others
        gap[~ok] = np.inf
        j = gap.argmin(1)
        g = gap[self.ar, j]
        return g, j, g < np.inf

    def next_junction(self, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Next junction lane of each vehicle (-1: none) and the distance from its front bumper to it."""
        kj = np.add.reduce(self.jend1 <= (s - self.rear)[:, None], axis=1)
        return self.jlane[self.ar, kj], self.jstart[self.ar, kj] - (s + self.front)

    def accel(self, t: int, s: np.ndarray, v: np.ndarray, active: np.ndarray) -> np.ndarray:
        """Acceleration ``[N]`` of every vehicle at log step ``t`` (updates reservations)."""
        if not self.has_junctions:
            g, j, has = self.leaders(s)
            return self.idm(s, v, g, j, has, None, None)
        # a vehicle not yet allowed into its junction lane ignores vehicles projected from lanes
        # beside it (it waits at the line; they are in their own lanes)
        jl, d_line = self.next_junction(s)
        waiting = self.need_ext[jl] & (self.res != jl)
        self.off = np.where(waiting[:, None], self.off_own, self.off_all) if waiting.any() else self.off_all
        g, j, has = self.leaders(s)
        blocked = self._junctions(t, v, active, g, has, jl, d_line)
        return self.idm(s, v, g, j, has, blocked, d_line)

    def idm(self, s: np.ndarray, v: np.ndarray, g: np.ndarray, j: np.ndarray, has: np.ndarray,
            blocked: np.ndarray | None, d_line: np.ndarray | None) -> np.ndarray:
        """IDM acceleration ``[N]`` towards the curvature-capped desired speed, behind the leader
        and, where ``blocked``, before the line ``d_line`` ahead of the front bumper."""
        dr = self.dr
        idx = np.minimum((s * (1 / DS)).astype(np.int64), self.p_max)
        v0 = np.maximum(np.minimum(dr.v0, self.cap[self.ar, idx]), 0.5)
        free = 1.0 - (v / v0) ** 4
        s_star = dr.s0 + np.maximum(0.0, v * dr.th + v * (v - v[j]) / self.sqrt_ab)
        acc = dr.a * (free - np.where(has, (s_star / np.maximum(g, 0.1)) ** 2, 0.0))
        if blocked is not None and d_line is not None and blocked.any():
            # a line is a standing obstacle with half the time headway (with all of it, IDM brakes
            # far harder than drivers do for a line; with none, stops end abruptly) and a jam gap
            # of STOP_GAP
            s_line = STOP_GAP + v * (0.5 * dr.th) + v * v / self.sqrt_ab
            acc_line = dr.a * (free - (s_line / np.maximum(d_line, 0.1)) ** 2)
            acc = np.where(blocked, np.minimum(acc, acc_line), acc)
        return np.minimum(np.maximum(acc, -B_MAX), dr.a)

    def _junctions(self, t: int, v: np.ndarray, active: np.ndarray, g: np.ndarray, has: np.ndarray,
                   jl: np.ndarray, d_line: np.ndarray) -> np.ndarray:
        """Release, withdraw and grant reservations; returns the vehicles that must stop at their
        line (``d_line`` ahead of their front bumper; ``jl`` their next junction lane)."""
        res = self.res
        res[res != jl] = -1                                     # passed (or none): release
        need = self.need_ext[jl] & active                       # jl = -1 reads the trailing False
        if not need.any():
            return need
        stop_dist = v * v * (1 / 5.0) + STOP_GAP               # room to stop at ~2.5 m/s²
        if self.signalised:
            light = self.lights_ext[self.signal_ext[jl], t]
            # withdraw reservations that can still be given up when the light is no longer green
            can_stop = (d_line > stop_dist) | ((v < 2.0) & (d_line > 0.0))
            res[(res >= 0) & (light != LightState.GO) & can_stop] = -1
        # ask early on a priority movement (no needless braking); a yielding one decides late,
        # about a second before its last comfortable stopping point (or standing at the line), so
        # the gap it accepts is still there when it arrives
        reach = np.where(self.minor_ext[jl], stop_dist + v + 2.0, v * v / (2 * self.dr.b) + v + 8.0)
        want = need & (res != jl) & (d_line < reach) & (~has | (g > d_line - 0.5))
        if want.any():
            for i in np.nonzero(want)[0][np.argsort(d_line[want], kind="stable")]:
                self._request(int(i), int(jl[i]), t, d_line, v, stop_dist, active, jl)
        return need & (res != jl) & (d_line > -1.0)

    def _request(self, i: int, lane: int, t: int, d_line: np.ndarray, v: np.ndarray, stop_dist: np.ndarray,
                 active: np.ndarray, jl: np.ndarray) -> None:
        conf, res = self.conf, self.res
        sig = conf.signal[lane]
        if sig >= 0:
            state = self.lights_ext[sig, t]
            if state == LightState.STOP or (state == LightState.CAUTION and (d_line[i] > stop_dist[i]
                                                                             or v[i] < 2.0)):
                return
        held = res[(res >= 0) & (self.ar != i)]
        if conf.cross[lane, held].any():
            return
        if conf.rank[lane] > 0:
            m = np.maximum(jl, 0)
            prior = active & (jl >= 0) & (self.ar != i) & conf.conflict[lane, m] & \
                (conf.rank[m] < conf.rank[lane])
            if prior.any():
                sig_m = self.signal_ext[jl]
                prior &= self.lights_ext[sig_m, t] != LightState.STOP
                arrive = np.maximum(d_line, 0.0) / np.maximum(v, 1.0)
                if (prior & ((d_line <= 0.0) | (arrive < arrive[i] + self.dr.gap[i]))).any():
                    return
        res[i] = lane


@dataclass
class Tracks:
    """Simulated logs of every agent (vehicles first, ego = 0, then pedestrians)."""

    state: np.ndarray      # [N, T, 5] box centre x, y, heading, vx, vy
    valid: np.ndarray      # [N, T]
    size: np.ndarray       # [N, 2]
    kind: np.ndarray       # [N]
    route: np.ndarray      # [N] route of vehicles (-1 for pedestrians)
    s: np.ndarray          # [N, T] rear-axle route position of vehicles


def _stop_time(v: np.ndarray, a0: np.ndarray, a1: np.ndarray) -> np.ndarray:
    """First time ``τ`` in ``[0, SIM_DT]`` where ``v + a0 τ + (a1 - a0) τ² / (2 SIM_DT)`` reaches 0
    (SIM_DT where it does not)."""
    q = (a1 - a0) / (2 * SIM_DT)
    disc = np.sqrt(np.maximum(a0 * a0 - 4 * q * v, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        roots = np.stack([(-a0 - disc) / (2 * q), (-a0 + disc) / (2 * q),
                          np.where(a0 < 0, -v / a0, np.inf)])
    roots = np.where(np.abs(q) < 1e-9, roots[2], roots)
    roots = np.where((roots >= 0) & (roots <= SIM_DT + 1e-9), roots, np.inf).min(0)
    return np.where(np.isfinite(roots), roots, SIM_DT)


def simulate(road: RoadMap, routes: Routes, conf: Conflicts, dr: Drivers, num_steps: int) -> Tracks:
    """Run the drivers every SIM_DT and sample the log every DT (constant acceleration between)."""
    n = len(dr.route)
    sub = int(round(SIM_DT / DT))
    lights = road.signal_states(num_steps, DT)
    if not len(lights):
        lights = np.zeros((1, num_steps), dtype=np.int8)
    sim = _Sim(routes, conf, dr, lights)
    s, v = dr.s.astype(np.float64).copy(), dr.v.astype(np.float64).copy()
    active = np.ones(n, dtype=bool)
    end = routes.length[dr.route] - sim.front - 0.5
    k_max = (num_steps - 1) // sub + 1
    S = np.zeros((n, k_max))
    V = np.zeros((n, k_max))
    A = np.zeros((n, k_max))
    act = np.zeros((n, k_max), dtype=bool)
    # acceleration ramps linearly within each interval from the previous command (P) to the new
    # one (A): it is continuous, and its rate of change is the jerk limiter's
    P = np.zeros((n, k_max))
    prev = np.zeros(n)
    for k in range(k_max):
        gone = active & (s >= end)
        if gone.any():                      # reached the end of its route: leaves the map
            active &= ~gone
            sim.set_active(active)
        S[:, k], V[:, k], act[:, k] = s, v, active
        want = sim.accel(k * sub, s, v, active)
        # limited jerk, except when braking harder than comfortable is needed
        acc = np.minimum(np.maximum(want, prev - JERK_DOWN * SIM_DT), prev + JERK_UP * SIM_DT)
        urgent = want < -dr.b
        if urgent.any():
            acc = np.where(urgent, np.minimum(acc, want), acc)
        A[:, k], P[:, k] = acc, prev
        v_new = v + 0.5 * (prev + acc) * SIM_DT
        s_new = s + v * SIM_DT + (2 * prev + acc) / 6 * SIM_DT ** 2
        stops = v_new < 0.0
        if stops.any():                     # comes to rest within the interval: stop there
            tau = _stop_time(v, prev, acc)
            s_stop = s + v * tau + prev / 2 * tau ** 2 + (acc - prev) / (6 * SIM_DT) * tau ** 3
            s_new = np.where(stops, s_stop, s_new)
            v_new = np.maximum(v_new, 0.0)
        s, v = s_new, v_new                 # (inactive vehicles move on unseen)
        prev = np.where(v > 0.0, acc, np.maximum(acc, 0.0))          # a stopped car does not brake
    # the log at DT: the state at the start of the interval advanced along the ramp; a vehicle that
    # stops inside an interval stays where it stopped (the running maximum of s)
    t = np.arange(num_steps)
    kk, frac = t // sub, (t % sub) * DT
    a0, a1, v_k = P[:, kk], A[:, kk], V[:, kk]
    ramp = (a1 - a0) / SIM_DT
    s_raw = S[:, kk] + v_k * frac + a0 / 2 * frac ** 2 + ramp / 6 * frac ** 3
    s_log = np.maximum.accumulate(s_raw, axis=1)
    v_log = np.where(s_raw < s_log - 1e-9, 0.0, np.maximum(v_k + a0 * frac + ramp / 2 * frac ** 2, 0.0))
    valid = act[:, kk]
    # poses: rear axle on the smoothed route, box centre CENTER_FRACTION * length ahead
    f = np.minimum(np.maximum(s_log / DS, 0.0), routes.xy.shape[1] - 1.001)
    i = f.astype(np.int64)
    w = f - i
    r = dr.route[:, None]
    xy = routes.xy[r, i] * (1 - w)[..., None] + routes.xy[r, i + 1] * w[..., None]
    h = routes.heading[r, i] * (1 - w) + routes.heading[r, i + 1] * w
    kap = routes.kappa[r, i] * (1 - w) + routes.kappa[r, i + 1] * w
    fwd = np.stack([np.cos(h), np.sin(h)], -1)
    lft = np.stack([-fwd[..., 1], fwd[..., 0]], -1)
    d = (CENTER_FRACTION * dr.length)[:, None, None]
    vel = v_log[..., None] * (fwd + (kap[..., None] * d) * lft)   # centre velocity = v t + ω × d
    state = np.concatenate([xy + d * fwd, np.angle(np.exp(1j * h))[..., None], vel], axis=-1)
    state[~valid] = 0.0
    return Tracks(state=state, valid=valid, size=np.stack([dr.length, dr.width], 1),
                  kind=dr.kind.astype(np.int8), route=dr.route.copy(), s=s_log)


def pedestrians(rng: np.random.Generator, road: RoadMap, count: int, num_steps: int) -> Tracks:
    """Pedestrians walking along sidewalks (1.2-3 m outside the outer road edges), never on the road.

    Each sidewalk has three walking lines; everyone on a line walks the same way at the same speed,
    at least 2 m apart, so pedestrians never overlap.
    """
    walks = [w for w in road.sidewalks if cumlen(w)[-1] > 20.0]
    if count == 0 or not walks:
        z = np.zeros((0, num_steps))
        return Tracks(np.zeros((0, num_steps, 5)), z.astype(bool), np.zeros((0, 2)), np.zeros(0, np.int8),
                      np.zeros(0, np.int64), z)
    wl = np.array([cumlen(w)[-1] for w in walks])
    lines: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, float, list[float]]] = {}
    out_state: list[np.ndarray] = []
    out_valid: list[np.ndarray] = []
    out_size: list[tuple[float, float]] = []
    t = np.arange(num_steps) * DT
    for _ in range(3 * count):
        if len(out_state) == count:
            break
        wi = int(rng.choice(len(walks), p=wl / wl.sum()))
        slot = int(rng.integers(0, 3))
        if (wi, slot) not in lines:
            path = resample(walks[wi], 1.0)
            path = path - (1.2 + 0.9 * slot) * left_normals(path)   # outside is on the right
            if rng.random() < 0.5:
                path = path[::-1]
            speed = 0.0 if rng.random() < 0.1 else float(rng.uniform(0.8, 1.6))
            lines[(wi, slot)] = (path, cumlen(path), speed, [])
        path, c, speed, used = lines[(wi, slot)]
        u = float(rng.uniform(1.0, c[-1] - 1.0))
        if any(abs(u - x) < 2.0 for x in used):
            continue
        used.append(u)
        pos = u + speed * t
        valid = pos <= c[-1]
        pos = np.minimum(pos, c[-1])
        x, y = np.interp(pos, c, path[:, 0]), np.interp(pos, c, path[:, 1])
        seg = np.clip(np.searchsorted(c, pos, side="right") - 1, 0, len(c) - 2)
        dxy = path[seg + 1] - path[seg]
        h = np.arctan2(dxy[:, 1], dxy[:, 0])
        st = np.stack([x, y, h, speed * np.cos(h), speed * np.sin(h)], -1)
        st[~valid] = 0.0
        out_state.append(st)
        out_valid.append(valid)
        out_size.append((float(rng.uniform(0.5, 0.8)), float(rng.uniform(0.5, 0.8))))
    m = len(out_state)
    return Tracks(np.array(out_state).reshape(m, num_steps, 5), np.array(out_valid).reshape(m, num_steps),
                  np.array(out_size).reshape(m, 2), np.full(m, AgentType.PEDESTRIAN, dtype=np.int8),
                  np.full(m, -1), np.zeros((m, num_steps)))
