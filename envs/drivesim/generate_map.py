"""Road layouts for the procedural generator: geometry helpers, a map builder, and one function per
layout (straight road, curve, 4-way intersection, T-junction, on-ramp merge).

Everything here is numpy on small arrays and runs once per generated scene. Conventions:
right-hand traffic; a lane's vertex order is its direction of travel; ``offset > 0`` is to the left
of a polyline's direction; every road edge is stored with the road surface on its left, so the
outside (a sidewalk) is on its right.

A layout function returns a :class:`RoadMap`: the lanes (with the traffic attributes the driver
model needs: junction flag, priority rank, signal group) plus every other map element, ready to be
turned into :class:`~envs.drivesim.scene.Scene` arrays by :meth:`RoadMap.scene_arrays`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from envs.drivesim.scene import LightState, LinkKind, MapType, PolygonType

LANE_SPACING = 2.0
"""Vertex spacing (m) of road lanes, lines and edges (curves have radius ≥ 30 m: chord error < 2 cm)."""
JUNCTION_SPACING = 1.0
"""Vertex spacing (m) of junction connectors and curb returns (radius ≥ ~6 m)."""
CONFLICT_DISTANCE = 3.0
"""Two junction lanes conflict when their centre lines come closer than this (m)."""


# ---- geometry helpers ---------------------------------------------------------------------------
def cumlen(p: np.ndarray) -> np.ndarray:
    """Cumulative arc length ``[P]`` of a polyline ``[P, 2]`` (starts at 0)."""
    d = np.hypot(np.diff(p[:, 0]), np.diff(p[:, 1]))
    return np.concatenate([[0.0], np.cumsum(d)])


def resample(p: np.ndarray, spacing: float) -> np.ndarray:
    """Resample a polyline ``[P, 2]`` at (nearly) uniform ``spacing``, keeping both end points."""
    c = cumlen(p)
    n = max(int(np.ceil(c[-1] / spacing - 1e-9)), 1)
    t = np.linspace(0.0, c[-1], n + 1)
    return np.stack([np.interp(t, c, p[:, 0]), np.interp(t, c, p[:, 1])], axis=1)


def left_normals(p: np.ndarray) -> np.ndarray:
    """Unit left normals ``[P, 2]`` at the vertices (tangents by central differences)."""
    d = np.gradient(p, axis=0)
    d /= np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)
    return np.stack([-d[:, 1], d[:, 0]], axis=1)


def offset(p: np.ndarray, d: float, normals: np.ndarray | None = None) -> np.ndarray:
    """The polyline shifted ``d`` metres to its left (``d < 0``: right)."""
    return p + d * (left_normals(p) if normals is None else normals)


def path_from_curvature(pieces: list[tuple[float, float]], ds: float,
                        start: tuple[float, float] = (0.0, 0.0), heading: float = 0.0
                        ) -> tuple[np.ndarray, np.ndarray]:
    """A reference line from ``(length, curvature)`` pieces, integrated exactly (arcs stay arcs).

    Returns points ``[P, 2]`` spaced ``ds`` apart (pieces are rounded to whole steps) and the
    heading ``[P]`` at each point.
    """
    kap = np.concatenate([np.full(max(int(round(length / ds)), 1), k) for length, k in pieces])
    theta = heading + np.concatenate([[0.0], np.cumsum(kap * ds)])
    chord = ds * np.sinc(kap * ds / (2 * np.pi))     # exact chord of an arc of length ds
    mid = theta[:-1] + kap * ds / 2
    xy = np.zeros((len(kap) + 1, 2))
    xy[0] = start
    xy[1:, 0] = start[0] + np.cumsum(chord * np.cos(mid))
    xy[1:, 1] = start[1] + np.cumsum(chord * np.sin(mid))
    return xy, theta


def bezier_connector(p0: np.ndarray, h0: float, p1: np.ndarray, h1: float, spacing: float) -> np.ndarray:
    """A cubic Bézier from ``p0`` (heading ``h0``) to ``p1`` (heading ``h1``), resampled uniformly.

    The control arms follow the circular-arc rule ``k = 4/3 tan(θ/4) / tan(θ/2)`` of the distance to
    the tangents' intersection, so a symmetric turn is within ~0.03 % of an exact arc.
    """
    t0 = np.array([np.cos(h0), np.sin(h0)])
    t1 = np.array([np.cos(h1), np.sin(h1)])
    turn = abs(np.angle(np.exp(1j * (h1 - h0))))
    chord = float(np.linalg.norm(p1 - p0))
    if turn < 1e-3:
        a0 = a1 = chord / 3
    else:
        # distances from the end points to the tangents' intersection (solve p0 + u t0 = p1 - v t1)
        m = np.stack([t0, t1], axis=1)
        u, v = np.linalg.solve(m, p1 - p0)
        k = 4 / 3 * np.tan(turn / 4) / np.tan(turn / 2)
        a0, a1 = (k * u, k * v) if u > 0 and v > 0 else (chord / 3, chord / 3)
    ctrl = np.stack([p0, p0 + a0 * t0, p1 - a1 * t1, p1])
    t = np.linspace(0.0, 1.0, max(int(chord * 3), 16))[:, None]
    curve = ((1 - t) ** 3) * ctrl[0] + 3 * ((1 - t) ** 2) * t * ctrl[1] + 3 * (1 - t) * t * t * ctrl[2] + \
        (t ** 3) * ctrl[3]
    return resample(curve, spacing)


def arc(center: np.ndarray, radius: float, a0: float, a1: float, spacing: float) -> np.ndarray:
    """Points of a circular arc from angle ``a0`` to ``a1`` (radians, either direction)."""
    n = max(int(np.ceil(abs(a1 - a0) * radius / spacing)), 2)
    a = np.linspace(a0, a1, n + 1)
    return center + radius * np.stack([np.cos(a), np.sin(a)], axis=1)


def rot(v: np.ndarray, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return v @ np.array([[c, s], [-s, c]])


# ---- the map under construction -----------------------------------------------------------------
@dataclass
class Lane:
    """One lane centre line and what the driver model needs to know about it."""

    points: np.ndarray
    """``[P, 2]`` float64 centre line in travel order."""
    width: float
    """Lane width (m)."""
    speed_limit: float
    """Posted limit (m/s)."""
    junction: bool = False
    """Inside a junction (connector or merge zone): entering it is arbitrated (priority, signals)."""
    rank: int = 0
    """Priority: a lane yields to conflicting lanes of a lower rank (0 = main road)."""
    signal: int = -1
    """Signal group controlling the lane (-1: none)."""


@dataclass
class RoadMap:
    """A finished map: lanes with links, other polylines and polygons, signal plan, sidewalks."""

    lanes: list[Lane]
    succ: list[list[int]]
    """Successor lane indices of each lane."""
    links: list[tuple[int, int, int]]
    """``(from, to, LinkKind)`` rows (successors and neighbours)."""
    lines: list[tuple[np.ndarray, int]]
    """Non-lane polylines ``(points, MapType)``."""
    polygons: list[tuple[np.ndarray, int, int]]
    """``(points, PolygonType, lane or -1)``; lane polygons are added by :meth:`scene_arrays`."""
    sidewalks: list[np.ndarray]
    """Polylines pedestrians may walk along (outer road edges, road on their left)."""
    signal_cycle: list[tuple[float, tuple[int, ...]]] = field(default_factory=list)
    """Signal plan: ``(duration_s, state per group)`` phases, repeated; empty: no signals."""
    signal_offset: float = 0.0
    """Seconds into the cycle at step 0."""
    params: dict = field(default_factory=dict)
    """Layout parameters recorded in ``Scene.extra``."""

    def __post_init__(self) -> None:
        self.pred: list[list[int]] = [[] for _ in self.lanes]
        for a, bs in enumerate(self.succ):
            for b in bs:
                self.pred[b].append(a)

    @property
    def num_signal_groups(self) -> int:
        return len(self.signal_cycle[0][1]) if self.signal_cycle else 0

    def signal_states(self, num_steps: int, dt: float) -> np.ndarray:
        """``[groups, T]`` int8 LightState of every signal group at every step."""
        if not self.signal_cycle:
            return np.zeros((0, num_steps), dtype=np.int8)
        ends = np.cumsum([d for d, _ in self.signal_cycle])
        table = np.array([s for _, s in self.signal_cycle], dtype=np.int8)   # [phases, groups]
        t = (self.signal_offset + np.arange(num_steps) * dt) % ends[-1]
        phase = np.searchsorted(ends, t, side="right")
        return table[phase].T.copy()

    def rotate(self, angle: float) -> None:
        """Rotate every coordinate about the origin (scenes get a random orientation)."""
        for lane in self.lanes:
            lane.points = rot(lane.points, angle)
        self.lines = [(rot(p, angle), t) for p, t in self.lines]
        self.polygons = [(rot(p, angle), t, ln) for p, t, ln in self.polygons]
        self.sidewalks = [rot(p, angle) for p in self.sidewalks]

    def scene_arrays(self, num_steps: int, dt: float) -> dict[str, np.ndarray]:
        """The map fields of a :class:`Scene` (lanes first, so polyline ``i`` is lane ``i``)."""
        polylines = [ln.points for ln in self.lanes] + [p for p, _ in self.lines]
        lens = np.array([len(p) for p in polylines])
        nl = len(self.lanes)
        width = np.full(lens.sum(), np.nan, dtype=np.float32)
        width[: lens[:nl].sum()] = np.repeat([ln.width for ln in self.lanes], lens[:nl])
        polys: list[tuple[np.ndarray, int, int]] = []
        for i, ln in enumerate(self.lanes):
            # lane polygon: left side forward, right side backward (implicitly closed)
            nrm = left_normals(ln.points)
            polys.append((np.concatenate([ln.points + ln.width / 2 * nrm,
                                          (ln.points - ln.width / 2 * nrm)[::-1]]), int(PolygonType.LANE), i))
        polys += self.polygons
        tl_lane = np.array([i for i, ln in enumerate(self.lanes) if ln.signal >= 0], dtype=np.int32)
        states = self.signal_states(num_steps, dt)
        tl_state = states[[self.lanes[i].signal for i in tl_lane]] if len(tl_lane) else \
            np.zeros((0, num_steps), dtype=np.int8)
        return {
            "map_points": np.concatenate(polylines).astype(np.float32),
            "map_offsets": np.concatenate([[0], np.cumsum(lens)]).astype(np.int32),
            "map_type": np.array([MapType.LANE] * nl + [t for _, t in self.lines], dtype=np.int8),
            "map_width": width,
            "lane_speed_limit": np.array([ln.speed_limit for ln in self.lanes] + [np.nan] * len(self.lines),
                                         dtype=np.float32),
            "lane_links": np.array(self.links, dtype=np.int32).reshape(-1, 3),
            "polygon_points": np.concatenate([p for p, _, _ in polys]).astype(np.float32),
            "polygon_offsets": np.concatenate([[0], np.cumsum([len(p) for p, _, _ in polys])]).astype(
                np.int32),
            "polygon_type": np.array([t for _, t, _ in polys], dtype=np.int8),
            "polygon_lane": np.array([ln for _, _, ln in polys], dtype=np.int32),
            "tl_lane": tl_lane,
            "tl_state": tl_state.astype(np.int8),
        }


class MapBuilder:
    """Accumulates lanes, links, lines and polygons; :meth:`finish` returns the :class:`RoadMap`."""

    def __init__(self) -> None:
        self.lanes: list[Lane] = []
        self.succ: list[list[int]] = []
        self.links: list[tuple[int, int, int]] = []
        self.lines: list[tuple[np.ndarray, int]] = []
        self.polygons: list[tuple[np.ndarray, int, int]] = []
        self.sidewalks: list[np.ndarray] = []

    def lane(self, points: np.ndarray, width: float, speed: float, **kw) -> int:
        self.lanes.append(Lane(np.asarray(points, dtype=np.float64), float(width), float(speed), **kw))
        self.succ.append([])
        return len(self.lanes) - 1

    def link(self, a: int, b: int) -> None:
        self.succ[a].append(b)
        self.links.append((a, b, int(LinkKind.SUCCESSOR)))

    def neighbours(self, left: int, right: int) -> None:
        """``right`` lies to the right of ``left`` (same direction of travel)."""
        self.links.append((left, right, int(LinkKind.RIGHT_NEIGHBOR)))
        self.links.append((right, left, int(LinkKind.LEFT_NEIGHBOR)))

    def line(self, points: np.ndarray, kind: MapType, sidewalk: bool = False) -> None:
        points = np.asarray(points, dtype=np.float64)
        points = _spaced(points) if len(points) > 2 else points
        self.lines.append((points, int(kind)))
        if sidewalk:
            self.sidewalks.append(np.asarray(points, dtype=np.float64))

    def polygon(self, points: np.ndarray, kind: PolygonType, lane: int = -1) -> None:
        self.polygons.append((np.asarray(points, dtype=np.float64), int(kind), lane))

    def finish(self, **kw) -> RoadMap:
        return RoadMap(self.lanes, self.succ, self.links, self.lines, self.polygons, self.sidewalks, **kw)


@dataclass(frozen=True)
class CrossSection:
    """Lateral layout of a road around its reference line."""

    n_fwd: int
    """Lanes travelling along the reference (on its right)."""
    n_bwd: int
    """Lanes travelling against it (on its left); 0 = one-way."""
    width: float
    """Lane width (m)."""
    median: float
    """Gap between the two directions (m); ≥ 2.5 is a raised median bounded by road edges."""
    shoulder: float
    """Paved strip between the outermost lane and the road edge (m)."""

    def lane_offset(self, fwd: bool, i: int) -> float:
        """Offset of lane ``i`` (0 = next to the median) from the reference line."""
        d = self.median / 2 + (i + 0.5) * self.width
        return -d if fwd else d

    def half_width(self, fwd: bool) -> float:
        """Distance from the reference to the road edge on that side."""
        n = self.n_fwd if fwd else self.n_bwd
        if not fwd and n == 0:
            return self.median / 2 + self.shoulder
        return self.median / 2 + n * self.width + self.shoulder


def _spaced(p: np.ndarray) -> np.ndarray:
    """``p`` resampled at LANE_SPACING when offsetting stretched it (outside of curves)."""
    d = np.diff(p, axis=0)
    if len(d) and (d * d).sum(1).max() > (1.05 * LANE_SPACING) ** 2:
        return resample(p, LANE_SPACING)
    return p


def build_road(b: MapBuilder, ref: np.ndarray, normals: np.ndarray, xs: CrossSection, speed: float,
               cuts: list[int] | None = None, lane_start: int = 0, lane_end: int | None = None,
               edges: tuple[bool, bool] = (True, True), sidewalks: bool = True, edge_start: int = 0,
               ) -> tuple[list[list[int]], list[list[int]]]:
    """Add the lanes, painted lines and road edges of one road along a reference polyline.

    ``ref`` ``[P, 2]`` with unit left ``normals``; lanes span ``ref[lane_start:lane_end]`` and are
    cut into successive pieces at the reference indices ``cuts``; edges (right, left) span
    ``ref[edge_start:]``. Returns ``(fwd, bwd)``: per lane (0 = next to the median) the list of its
    pieces in travel order.
    """
    lane_end = len(ref) if lane_end is None else lane_end
    bounds = [lane_start] + [c for c in (cuts or []) if lane_start < c < lane_end - 1] + [lane_end - 1]
    lr = ref[lane_start:lane_end]
    ln = normals[lane_start:lane_end]
    out: list[list[list[int]]] = [[], []]
    for side, fwd in enumerate((True, False)):
        n = xs.n_fwd if fwd else xs.n_bwd
        for i in range(n):
            full = lr + xs.lane_offset(fwd, i) * ln
            pieces = []
            for a, c in zip(bounds[:-1], bounds[1:], strict=True):
                pts = full[a - lane_start : c - lane_start + 1]
                pieces.append(b.lane(_spaced(pts if fwd else pts[::-1]), xs.width, speed))
            if not fwd:
                pieces = pieces[::-1]
            for p, q in zip(pieces[:-1], pieces[1:], strict=True):
                b.link(p, q)
            out[side].append(pieces)
        for i in range(n - 1):
            for p, q in zip(out[side][i], out[side][i + 1], strict=True):
                b.neighbours(p, q)
    # painted lines: lane dividers and outer edge lines on each side, the centre line(s) between
    for fwd, n in ((True, xs.n_fwd), (False, xs.n_bwd)):
        sgn = -1.0 if fwd else 1.0
        for i in range(1, n + 1):
            b.line(lr + sgn * (xs.median / 2 + i * xs.width) * ln, MapType.LANE_BOUNDARY)
    if xs.n_bwd == 0 or xs.median >= 2.5:
        b.line(lr - xs.median / 2 * ln, MapType.LANE_BOUNDARY)
        if xs.n_bwd:
            b.line(lr + xs.median / 2 * ln, MapType.LANE_BOUNDARY)
    else:
        b.line(lr, MapType.LANE_BOUNDARY)
    # road edges: road surface on the left of each edge polyline
    er, en = ref[edge_start:], normals[edge_start:]
    if edges[0]:
        b.line(er - xs.half_width(True) * en, MapType.ROAD_EDGE, sidewalk=sidewalks)
    if edges[1]:
        b.line((er + xs.half_width(False) * en)[::-1], MapType.ROAD_EDGE, sidewalk=sidewalks)
    if xs.n_bwd and xs.median >= 2.5:
        inner = xs.median / 2 - 0.5
        b.line((er - inner * en)[::-1], MapType.ROAD_EDGE)
        b.line(er + inner * en, MapType.ROAD_EDGE)
    return out[0], out[1]


def _cuts(rng: np.random.Generator, n_points: int, spacing: float) -> list[int]:
    """Indices where long lanes are cut into pieces of 60-120 m (real maps are segmented too)."""
    cuts: list[int] = []
    i = 0
    while True:
        i += int(rng.uniform(60.0, 120.0) / spacing)
        if i >= n_points - int(30.0 / spacing):
            return cuts
        cuts.append(i)


# ---- layouts -------------------------------------------------------------------------------------
# speed limits (m/s): 40, 50, 60, 70, 80, 100 km/h
URBAN_LIMITS = (11.11, 13.89, 16.67)
ROAD_LIMITS = (13.89, 16.67, 19.44, 22.22, 27.78)


@dataclass(frozen=True)
class LayoutSpec:
    """What a layout function may draw (a view of GeneratorConfig)."""

    lanes_per_direction: tuple[int, int]
    junction_lanes: tuple[int, int]
    lane_width: tuple[float, float]
    curve_radius: tuple[float, float]
    one_way_prob: float
    traffic_light_prob: float
    crosswalk_prob: float
    duration_s: float
    """Length of the log (s): roads are built long enough for the ego to keep driving that long."""


def _cross_section(rng: np.random.Generator, spec: LayoutSpec, n: int, two_way: bool) -> CrossSection:
    w = float(rng.uniform(*spec.lane_width))
    if not two_way:
        median = 0.0
    elif rng.random() < 0.3:
        median = float(rng.uniform(2.5, 6.0))        # raised median with its own edges
    else:
        median = float(rng.uniform(0.2, 0.6))        # painted
    return CrossSection(n, n if two_way else 0, w, median, float(rng.uniform(0.5, 1.5)))


def straight_layout(rng: np.random.Generator, spec: LayoutSpec) -> RoadMap:
    n = int(rng.integers(spec.lanes_per_direction[0], spec.lanes_per_direction[1] + 1))
    two_way = rng.random() >= spec.one_way_prob
    xs = _cross_section(rng, spec, n, two_way)
    speed = float(rng.choice(ROAD_LIMITS if n > 1 else ROAD_LIMITS[:4]))
    length = 1.1 * speed * spec.duration_s + 260.0
    ref, theta = path_from_curvature([(length, 0.0)], LANE_SPACING, start=(-length / 2, 0.0))
    nrm = np.stack([-np.sin(theta), np.cos(theta)], axis=1)
    b = MapBuilder()
    build_road(b, ref, nrm, xs, speed, cuts=_cuts(rng, len(ref), LANE_SPACING))
    return b.finish(params={"lanes_per_direction": n, "two_way": bool(two_way), "lane_width": xs.width,
                            "median": xs.median, "speed_limit": speed, "length_m": round(length, 1)})


def curve_layout(rng: np.random.Generator, spec: LayoutSpec) -> RoadMap:
    n = int(rng.integers(spec.lanes_per_direction[0], spec.lanes_per_direction[1] + 1))
    two_way = rng.random() >= spec.one_way_prob
    xs = _cross_section(rng, spec, n, two_way)
    # the innermost lane keeps a radius ≥ ~12 m
    r_min = max(spec.curve_radius[0], max(xs.half_width(True), xs.half_width(False)) + 12.0)
    r_max = max(spec.curve_radius[1], r_min)
    radius = float(np.exp(rng.uniform(np.log(r_min), np.log(r_max))))
    s_curve = rng.random() < 0.5
    sign = 1.0 if rng.random() < 0.5 else -1.0
    speed = float(rng.choice(ROAD_LIMITS[:4]))
    angle = float(rng.uniform(np.radians(30), np.radians(120 if not s_curve else 70)))
    pre = float(rng.uniform(120.0, 170.0))
    pieces = [(pre, 0.0), (radius * angle, sign / radius)]
    params = {"radius_m": round(radius, 1), "angle_deg": round(float(np.degrees(angle)), 1)}
    if s_curve:
        radius2 = float(np.clip(radius * rng.uniform(0.7, 1.4), r_min, r_max))
        angle2 = float(rng.uniform(np.radians(30), np.radians(70)))
        pieces += [(float(rng.uniform(0.0, 30.0)), 0.0), (radius2 * angle2, -sign / radius2)]
        params.update(radius2_m=round(radius2, 1), angle2_deg=round(float(np.degrees(angle2)), 1))
    pieces.append((1.1 * speed * spec.duration_s + 100.0, 0.0))
    ref, theta = path_from_curvature(pieces, LANE_SPACING / 2)
    ref, theta = ref[::2], theta[::2]          # integrate at 1 m, store at 2 m
    nrm = np.stack([-np.sin(theta), np.cos(theta)], axis=1)
    b = MapBuilder()
    build_road(b, ref, nrm, xs, speed, cuts=_cuts(rng, len(ref), LANE_SPACING))
    params.update(s_curve=bool(s_curve), lanes_per_direction=n, two_way=bool(two_way), lane_width=xs.width,
                  median=xs.median, speed_limit=speed)
    return b.finish(params=params)


def junction_layout(rng: np.random.Generator, spec: LayoutSpec, arms: tuple[int, ...]) -> RoadMap:
    """A 4-way intersection (``arms = (0, 1, 2, 3)``) or a T-junction (``(0, 1, 2)``, stem = arm 1).

    Arm ``k`` points along ``e_k`` at ``90° k``. Axis A = arms 0, 2; axis B = arms 1, 3. Connectors
    (junction lanes) join inbound lanes to the outbound lanes of the other arms: right turns from
    the rightmost lane, left turns from the leftmost, straight from every lane.
    """
    four_way = len(arms) == 4
    n_ax = [int(rng.integers(spec.junction_lanes[0], spec.junction_lanes[1] + 1)) for _ in range(2)]
    w = float(rng.uniform(*spec.lane_width))
    median = float(rng.uniform(0.2, 0.5))
    shoulder = float(rng.uniform(0.5, 1.0))
    r_curb = float(rng.uniform(6.0, 12.0))
    crosswalks = rng.random() < spec.crosswalk_prob
    cw = 3.0
    ext = cw + 1.5 if crosswalks else 1.0             # stop line this far beyond the curb return
    signals = four_way and rng.random() < spec.traffic_light_prob
    major_axis = 0 if not four_way else int(rng.integers(0, 2))
    speeds = [float(rng.choice(URBAN_LIMITS)) for _ in range(2)]
    if not four_way:
        speeds[0] = max(speeds)                        # the through road is the faster one

    xs = [CrossSection(n_ax[k % 2], n_ax[k % 2], w, median, shoulder) for k in range(4)]
    half = [xs[k].half_width(True) for k in range(4)]
    dist = [half[(k + 1) % 4] + r_curb for k in range(4)]     # curb return tangent point on arm k
    stop = [dist[k] + ext for k in range(4)]
    e = [np.array([np.cos(np.pi / 2 * k), np.sin(np.pi / 2 * k)]) for k in range(4)]
    arm_len = 1.1 * max(speeds) * spec.duration_s + 80.0

    b = MapBuilder()
    inbound: dict[int, list[int]] = {}
    outbound: dict[int, list[int]] = {}
    for k in arms:
        # reference from the curb-return tangent point (edges start there) outwards; lanes start at
        # the stop line
        s_edge = np.linspace(dist[k], stop[k], int(np.ceil(ext / LANE_SPACING)) + 1)
        s = np.concatenate([s_edge[:-1], stop[k] + LANE_SPACING * np.arange(int(arm_len / LANE_SPACING) + 1)])
        ref = s[:, None] * e[k]
        nrm = np.repeat(rot(e[k][None], np.pi / 2), len(s), axis=0)
        fwd, bwd = build_road(b, ref, nrm, xs[k], speeds[k % 2], lane_start=len(s_edge) - 1)
        outbound[k] = [p[0] for p in fwd]
        inbound[k] = [p[-1] for p in bwd]

    def rank(k: int, move: str) -> int:
        if signals:
            return 1 if move == "left" else 0
        minor = 2 if (k % 2) != major_axis else 0
        return minor + (1 if move == "left" else 0)

    n_conn = 0
    for k in arms:
        n = n_ax[k % 2]
        moves = [("straight", (k + 2) % 4, i, i) for i in range(n)]
        moves.append(("right", (k + 1) % 4, n - 1, n_ax[(k + 1) % 2] - 1))
        moves.append(("left", (k + 3) % 4, 0, 0))
        for move, j, i_in, i_out in moves:
            if j not in arms:
                continue
            a, c = inbound[k][i_in], outbound[j][i_out]
            p0, p1 = b.lanes[a].points[-1], b.lanes[c].points[0]
            if move == "straight":
                pts = resample(np.stack([p0, p1]), LANE_SPACING)
            else:
                # straight across the crosswalk zone, then turn between the curb-return tangent
                # points (concentric with the curb for right turns), then straight again
                q0, q1 = p0 - (stop[k] - dist[k]) * e[k], p1 - (stop[j] - dist[j]) * e[j]
                turn = bezier_connector(q0, np.arctan2(*(-e[k])[::-1]), q1, np.arctan2(*e[j][::-1]),
                                        JUNCTION_SPACING)
                pts = np.concatenate([resample(np.stack([p0, q0]), LANE_SPACING)[:-1], turn,
                                      resample(np.stack([q1, p1]), LANE_SPACING)[1:]])
            lane = b.lane(pts, w, speeds[k % 2], junction=True, rank=rank(k, move),
                          signal=(k % 2) if signals else -1)
            b.link(a, lane)
            b.link(lane, c)
            n_conn += 1
    # curb returns between adjacent arms, a straight edge across a missing arm (T-junction)
    for k in range(4):
        k1 = (k + 1) % 4
        if k in arms and k1 in arms:
            centre = dist[k] * e[k] + dist[k1] * e[k1]
            a0 = np.arctan2(*(-e[k1])[::-1])
            pts = arc(centre, r_curb, a0, a0 - np.pi / 2, JUNCTION_SPACING)
            b.line(pts, MapType.ROAD_EDGE)
        elif k in arms and (k + 2) % 4 in arms and k1 not in arms:
            k2 = (k + 2) % 4
            p0 = dist[k2] * e[k2] + half[k2] * e[k1]
            p1 = dist[k] * e[k] + half[k] * e[k1]
            b.line(resample(np.stack([p1, p0]), LANE_SPACING), MapType.ROAD_EDGE)
    # crosswalks and stop lines
    for k in arms:
        nk = rot(e[k][None], np.pi / 2)[0]
        hw = median / 2 + n_ax[k % 2] * w
        if crosswalks:
            d0, d1 = dist[k] + 0.5, dist[k] + 0.5 + cw
            poly = np.stack([d0 * e[k] - hw * nk, d1 * e[k] - hw * nk,
                             d1 * e[k] + hw * nk, d0 * e[k] + hw * nk])
            b.polygon(poly, PolygonType.CROSSWALK)
            b.line(np.concatenate([poly, poly[:1]]), MapType.CROSSWALK)
        if signals or rank(k, "straight") > 0:
            b.line(np.stack([stop[k] * e[k] + median / 2 * nk, stop[k] * e[k] + hw * nk]), MapType.STOP_LINE)
    cycle: list[tuple[float, tuple[int, ...]]] = []
    offset_s = 0.0
    if signals:
        g, y, r = LightState.GO, LightState.CAUTION, LightState.STOP
        green = [float(rng.uniform(8.0, 16.0)) for _ in range(2)]
        amber = 4.0             # ITE: 1 s + v / (2 x 3 m/s²) for urban speeds, rounded up
        cycle = [(green[0], (g, r)), (amber, (y, r)), (2.0, (r, r)),
                 (green[1], (r, g)), (amber, (r, y)), (2.0, (r, r))]
        offset_s = float(rng.uniform(0.0, sum(d for d, _ in cycle)))
    params = {"lanes_axis_a": n_ax[0], "lanes_axis_b": n_ax[1], "lane_width": w, "curb_radius": r_curb,
              "signalised": bool(signals), "crosswalks": bool(crosswalks), "connectors": n_conn,
              "speed_limits": speeds}
    if not signals:
        params["major_axis"] = "a" if major_axis == 0 else "b"
    return b.finish(signal_cycle=cycle, signal_offset=offset_s, params=params)


def merge_layout(rng: np.random.Generator, spec: LayoutSpec) -> RoadMap:
    """A one-way main road (1-3 lanes, along +x) and an on-ramp joining from the right.

    The ramp curves in, runs beside the rightmost lane, then tapers into it (a smootherstep lateral
    shift, curvature-continuous). The last stretch of the ramp (``Rb``) and of the rightmost lane
    (``Mb``) are junction lanes merging into the same successor.
    """
    n = int(rng.integers(1, min(3, spec.lanes_per_direction[1]) + 1))
    w = float(rng.uniform(*spec.lane_width))
    sh = float(rng.uniform(0.8, 1.5))
    speed_main = float(rng.choice(ROAD_LIMITS[2:]))
    speed_ramp = float(rng.choice(URBAN_LIMITS[1:] + ROAD_LIMITS[2:3]))
    taper = float(rng.uniform(60.0, 100.0))
    parallel = float(rng.uniform(20.0, 60.0))
    alpha = float(rng.uniform(np.radians(12), np.radians(25)))
    r_ramp = float(rng.uniform(120.0, 250.0))
    ramp_in = float(rng.uniform(60.0, 110.0))
    up = r_ramp * np.sin(alpha) + ramp_in * np.cos(alpha) + parallel + 40.0
    x_t = 0.0                                    # taper start; merge point at x_m
    x_m = taper
    x_a = -parallel
    y_r = -(n - 0.5) * w                         # rightmost main lane
    down = 1.1 * speed_main * spec.duration_s + 100.0
    # main reference (the left road edge line y = 0) from x = -up to x_m + down, vertex on x_t, x_m
    xs_u = np.arange(-up, x_t, LANE_SPACING)
    xs_t = np.linspace(x_t, x_m, int(np.ceil(taper / JUNCTION_SPACING)) + 1)
    xs_d = np.arange(x_m, x_m + down, LANE_SPACING)
    xref = np.concatenate([xs_u, xs_t[:-1], xs_d])
    ref = np.stack([xref, np.zeros_like(xref)], axis=1)
    nrm = np.tile([0.0, 1.0], (len(ref), 1))
    i_t, i_m = len(xs_u), len(xs_u) + len(xs_t) - 1
    b = MapBuilder()
    xs = CrossSection(n, 0, w, 0.0, sh)
    speed = speed_main
    fwd, _ = build_road(b, ref, nrm, xs, speed, cuts=[i_t, i_m], edges=(False, True))
    # rightmost lane pieces: [..., Mb (taper zone), M2 ...]
    right = fwd[n - 1]
    mb = next(p for p in right if abs(b.lanes[p].points[0, 0] - x_t) < 1e-6)
    m2 = b.succ[mb][0]
    b.lanes[mb].junction = True
    # ramp: straight approach at heading alpha, arc to heading 0, parallel stretch, taper
    c = np.array([x_a, y_r - w - r_ramp])
    arc_pts = arc(c, r_ramp, np.pi / 2 + alpha, np.pi / 2, LANE_SPACING)
    start = arc_pts[0] - ramp_in * np.array([np.cos(alpha), np.sin(alpha)])
    approach = resample(np.stack([start, arc_pts[0]]), LANE_SPACING)
    xpar = np.arange(x_a, x_t, LANE_SPACING)
    par = np.stack([xpar, np.full_like(xpar, y_r - w)], 1)
    ra = np.concatenate([approach[:-1], arc_pts[:-1], par, [[x_t, y_r - w]]])
    u = (xs_t - x_t) / taper
    smooth = 6 * u ** 5 - 15 * u ** 4 + 10 * u ** 3
    rb = np.stack([xs_t, y_r - w + w * smooth], axis=1)
    lane_ra = b.lane(ra, w, speed_ramp)
    lane_rb = b.lane(rb, w, speed_ramp, junction=True, rank=1)
    b.link(lane_ra, lane_rb)
    b.link(lane_rb, m2)
    b.neighbours(mb, lane_rb)
    # edges: ramp left edge and main right edge meet at the gore; the ramp's right edge continues
    # as the main road's right edge after the merge
    ramp_full = np.concatenate([ra[:-1], rb])
    rn = left_normals(ramp_full)
    ramp_left = ramp_full + (w / 2 + sh) * rn
    y_edge = y_r - w / 2 - sh
    gore = int(np.argmax(ramp_left[:, 1] >= y_edge))
    x_gore = float(ramp_left[gore, 0])
    b.line(ramp_left[:gore + 1][::-1], MapType.ROAD_EDGE)       # road (ramp) on its left
    xmr = np.arange(-up, x_gore, LANE_SPACING)
    main_right = np.stack([xmr, np.full_like(xmr, y_edge)], 1)
    b.line(np.concatenate([main_right, [[x_gore, y_edge]]]), MapType.ROAD_EDGE)   # gore side: no sidewalk
    right_edge = np.concatenate([ramp_full - (w / 2 + sh) * rn,
                                 np.stack([xs_d[1:], np.full(len(xs_d) - 1, y_edge)], 1)])
    b.line(right_edge, MapType.ROAD_EDGE, sidewalk=True)
    # painted line between the ramp and the main road from the gore to the merge point
    sep = rb + (w / 2) * left_normals(rb)
    beside = slice(gore, len(ra) - 1)
    b.line(np.concatenate([ramp_left[beside] - sh * rn[beside], sep]), MapType.LANE_BOUNDARY)
    params = {"main_lanes": n, "lane_width": w, "speed_limit": speed_main, "ramp_speed_limit": speed_ramp,
              "taper_m": round(taper, 1), "ramp_radius_m": round(r_ramp, 1),
              "ramp_angle_deg": round(float(np.degrees(alpha)), 1)}
    return b.finish(params=params)


LAYOUTS = ("straight", "curve", "intersection", "t_junction", "merge")


def build_layout(name: str, rng: np.random.Generator, spec: LayoutSpec) -> RoadMap:
    if name == "straight":
        return straight_layout(rng, spec)
    if name == "curve":
        return curve_layout(rng, spec)
    if name == "intersection":
        return junction_layout(rng, spec, (0, 1, 2, 3))
    if name == "t_junction":
        return junction_layout(rng, spec, (0, 1, 2))
    if name == "merge":
        return merge_layout(rng, spec)
    raise ValueError(f"unknown layout {name!r}; valid: {list(LAYOUTS)}")
