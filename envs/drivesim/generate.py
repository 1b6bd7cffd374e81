"""The procedural scene generator: seeded, reproducible :class:`~envs.drivesim.scene.Scene` objects.

A scene is drawn in three parts: a road layout (``generate_map``: straight road, curve, 4-way
intersection, T-junction or on-ramp merge, with lanes, links, painted lines, road edges, lane
polygons, crosswalks, stop lines and signals), traffic (``generate_traffic``: IDM drivers on lane
routes with junction arbitration, plus pedestrians on sidewalks) and an acceptance check here: a
scene whose log has two overlapping boxes, an off-road ego, an ego that leaves the map early or
barely moves is rejected and re-drawn (the counts are recorded in ``scene.extra["rejections"]``).

``generate_scene(seed, cfg)`` is a pure function of ``(seed, cfg)``: the layout comes from the seed,
attempt ``k`` draws from ``numpy.random.default_rng([seed, k])``.

    >>> scene = generate_scene(7)               # doctest: +SKIP
    >>> scene.scene_id                           # doctest: +SKIP
    'gen-merge-000007'
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from envs.drivesim.generate_map import LAYOUTS, LayoutSpec, RoadMap, build_layout
from envs.drivesim.generate_traffic import (
    CENTER_FRACTION,
    Routes,
    Tracks,
    TrafficSpec,
    boxes_overlap,
    build_conflicts,
    build_routes,
    pedestrians,
    place_vehicles,
    simulate,
)
from envs.drivesim.scene import DT, AgentType, MapType, Scene, SceneSet

__all__ = [
    "LAYOUTS", "GeneratorConfig", "GenerationError", "generate_scene", "generate_scenes",
    "generate_scene_set", "small_scene_set", "find_collisions", "ego_offroad",
]


class GenerationError(RuntimeError):
    """Every attempt for a seed was rejected."""


@dataclass(frozen=True)
class GeneratorConfig:
    """What the procedural generator draws. Ranges are ``(low, high)``, both inclusive."""

    num_agents: int = 32
    """Most agents besides the ego (vehicles, cyclists, pedestrians); fewer when the road is full."""
    num_steps: int = 91
    """T, log length in 0.1 s steps (91 = 9.1 s; warm-up 1.7 s + 7.4 s of driving)."""
    layouts: tuple[str, ...] = LAYOUTS
    """Layouts to draw from: any of ``straight, curve, intersection, t_junction, merge``."""
    layout_weights: tuple[float, ...] | None = None
    """Relative frequency of each entry of ``layouts`` (None: equal)."""
    lanes_per_direction: tuple[int, int] = (1, 4)
    """Lanes per direction on straight roads and curves (the merge's main road: at most 3)."""
    junction_lanes: tuple[int, int] = (1, 2)
    """Lanes per direction on the arms of intersections and T-junctions."""
    lane_width: tuple[float, float] = (3.2, 3.8)
    """Lane width (m)."""
    curve_radius: tuple[float, float] = (30.0, 300.0)
    """Radius of the road's reference line on curves (m); raised where the inner lanes need it."""
    one_way_prob: float = 0.25
    """Chance that a straight road or curve is one-way."""
    traffic_light_prob: float = 0.7
    """Chance that a 4-way intersection is signalised (otherwise one axis has priority)."""
    crosswalk_prob: float = 0.8
    """Chance that a junction has crosswalks on its arms."""
    agent_fill: tuple[float, float] = (0.5, 1.0)
    """Fraction of ``num_agents`` a scene tries to place (varies the traffic density)."""
    pedestrian_fraction: float = 0.1
    """Share of the agents that are pedestrians on sidewalks."""
    cyclist_fraction: float = 0.03
    """Share of the vehicles that are cyclists (riding in the lane)."""
    truck_fraction: float = 0.08
    """Share of the vehicles that are trucks or buses (only on routes without tight turns)."""
    ego_speed_factor: tuple[float, float] = (0.85, 1.05)
    """The ego's desired speed as a fraction of the speed limit."""
    lateral_accel: float = 2.0
    """Lateral acceleration (m/s²) drivers accept in curves; sets their curve speeds."""
    offroad_tolerance_m: float = 0.3
    """An ego box corner farther than this outside every lane rejects the scene (DESIGN.md)."""
    min_ego_progress_m: float = 10.0
    """The ego must drive at least this far, or the scene is rejected."""
    max_attempts: int = 25
    """Attempts per seed before :class:`GenerationError`."""
    random_rotation: bool = True
    """Rotate each scene by a random angle (scenes are in their own local frame anyway)."""

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> ValueError:
            return ValueError(f"GeneratorConfig.{field}: {why}")

        if self.num_agents < 0:
            raise bad("num_agents", f"must be ≥ 0, got {self.num_agents}")
        if self.num_steps < 30:
            raise bad("num_steps", f"must be ≥ 30 (3 s), got {self.num_steps}")
        if not self.layouts:
            raise bad("layouts", "is empty")
        unknown = [x for x in self.layouts if x not in LAYOUTS]
        if unknown:
            raise bad("layouts", f"unknown {unknown}; valid: {list(LAYOUTS)}")
        if self.layout_weights is not None:
            w = self.layout_weights
            if len(w) != len(self.layouts):
                raise bad("layout_weights", f"has {len(w)} entries for {len(self.layouts)} layouts")
            if any(not np.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
                raise bad("layout_weights", f"must be finite, ≥ 0 and not all 0, got {list(w)}")
        for name in ("lanes_per_direction", "junction_lanes"):
            n_lo, n_hi = getattr(self, name)
            if not 1 <= n_lo <= n_hi:
                raise bad(name, f"needs 1 ≤ low ≤ high, got {(n_lo, n_hi)}")
        if self.junction_lanes[1] > 3:
            raise bad("junction_lanes", f"at most 3 lanes per direction, got {self.junction_lanes[1]}")
        for name, lo_min in (("lane_width", 2.5), ("curve_radius", 20.0), ("agent_fill", 0.0),
                             ("ego_speed_factor", 0.1)):
            lo, hi = getattr(self, name)
            if not (np.isfinite(lo) and np.isfinite(hi) and lo_min <= lo <= hi):
                raise bad(name, f"needs {lo_min} ≤ low ≤ high, got {(lo, hi)}")
        if self.agent_fill[1] > 1.0:
            raise bad("agent_fill", f"high must be ≤ 1, got {self.agent_fill[1]}")
        for name in ("one_way_prob", "traffic_light_prob", "crosswalk_prob", "pedestrian_fraction",
                     "cyclist_fraction", "truck_fraction"):
            x = getattr(self, name)
            if not 0.0 <= x <= 1.0:
                raise bad(name, f"must be in [0, 1], got {x}")
        if self.cyclist_fraction + self.truck_fraction > 1.0:
            raise bad("cyclist_fraction", "cyclist_fraction + truck_fraction must be ≤ 1")
        if not self.lateral_accel > 0:
            raise bad("lateral_accel", f"must be > 0, got {self.lateral_accel}")
        if self.offroad_tolerance_m < 0 or self.min_ego_progress_m < 0:
            raise bad("offroad_tolerance_m", "offroad_tolerance_m and min_ego_progress_m must be ≥ 0")
        if self.max_attempts < 1:
            raise bad("max_attempts", f"must be ≥ 1, got {self.max_attempts}")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


# ---- acceptance checks --------------------------------------------------------------------------
def find_collisions(state: np.ndarray, valid: np.ndarray, size: np.ndarray) -> np.ndarray:
    """Every overlapping pair of valid boxes: ``[C, 3]`` int rows ``(t, i, j)`` with ``i < j``.

    ``state [N, T, ≥3]`` (x, y, heading of box centres), ``valid [N, T]``, ``size [N, 2]``.
    A centre-distance broad phase, then an oriented-box separating-axis test.
    """
    x, y = state[:, :, 0].T, state[:, :, 1].T                           # [T, N]
    r = np.hypot(size[:, 0], size[:, 1]) / 2
    d2 = (x[:, :, None] - x[:, None, :]) ** 2 + (y[:, :, None] - y[:, None, :]) ** 2
    near = d2 < ((r[:, None] + r[None, :]) ** 2)[None]
    v = valid.T
    near &= v[:, :, None] & v[:, None, :]
    near &= np.triu(np.ones(len(r), dtype=bool), 1)[None]
    t, i, j = np.nonzero(near)
    if not len(t):
        return np.zeros((0, 3), dtype=np.int64)
    h = state[:, :, 2]
    hit = boxes_overlap(state[i, t, :2], h[i, t], size[i, 0], size[i, 1],
                        state[j, t, :2], h[j, t], size[j, 0], size[j, 1])
    return np.stack([t, i, j], 1)[hit]


def _corners(centre: np.ndarray, heading: np.ndarray, length: float, width: float) -> np.ndarray:
    """``[T, 4, 2]`` corners (front-left, front-right, rear-right, rear-left)."""
    f = np.stack([np.cos(heading), np.sin(heading)], -1)[:, None]
    lft = np.stack([-np.sin(heading), np.cos(heading)], -1)[:, None]
    sx = np.array([1, 1, -1, -1])[None, :, None] * length / 2
    sy = np.array([1, -1, -1, 1])[None, :, None] * width / 2
    return centre[:, None] + sx * f + sy * lft


def _point_segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ab = b - a
    t = np.clip(((p - a) * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-12), 0.0, 1.0)
    q = a + t[..., None] * ab - p
    return np.sqrt((q * q).sum(-1))


def _lane_excess(points: np.ndarray, road: RoadMap) -> np.ndarray:
    """For points ``[M, 2]``: distance outside the nearest lane (``dist to centre − width / 2``)."""
    segs_a = np.concatenate([ln.points[:-1] for ln in road.lanes])
    segs_b = np.concatenate([ln.points[1:] for ln in road.lanes])
    half = np.concatenate([np.full(len(ln.points) - 1, ln.width / 2) for ln in road.lanes])
    d = _point_segment_distance(points[:, None], segs_a[None], segs_b[None])
    return (d - half[None]).min(1)


def ego_offroad(road: RoadMap, routes: Routes, tracks: Tracks, tolerance: float) -> np.ndarray:
    """Steps ``[K]`` where an ego box corner is more than ``tolerance`` outside the lane union or
    the ego box crosses a road edge (drivesim's off-road rule, checked on the generator's map)."""
    ego_len, ego_wid = tracks.size[0]
    st = tracks.state[0]
    corners = _corners(st[:, :2], st[:, 2], ego_len, ego_wid)         # [T, 4, 2]
    # cheap pass: distance to the ego's own route centre line near its position
    raw, raw_s, raw_w = (x[tracks.route[0]] for x in (routes.raw, routes.raw_s, routes.raw_w))
    s_ego = tracks.s[0]
    i0 = np.maximum(np.searchsorted(raw_s, s_ego - 10.0) - 1, 0)
    i1 = np.searchsorted(raw_s, s_ego + 15.0) + 1
    win = int((i1 - i0).max()) + 1
    idx = np.minimum(i0[:, None] + np.arange(win)[None], len(raw) - 2)   # [T, W]
    d = _point_segment_distance(corners[:, :, None], raw[idx][:, None], raw[idx + 1][:, None])   # [T, 4, W]
    k = d.argmin(-1)
    seg = np.take_along_axis(idx, k.reshape(len(k), -1), 1)                # [T, 4]
    excess = np.take_along_axis(d, k[..., None], -1)[..., 0] - raw_w[seg] / 2
    out = excess > tolerance
    if out.any():
        t_out, c_out = np.nonzero(out)
        out[t_out, c_out] = _lane_excess(corners[t_out, c_out], road) > tolerance
    bad = out.any(1)
    # road edges: box edges against edge segments near the ego
    edges = [p for p, kind in road.lines if kind == MapType.ROAD_EDGE]
    if edges:
        a = np.concatenate([p[:-1] for p in edges])
        b = np.concatenate([p[1:] for p in edges])
        # only segments near the ego's path, then a centre-distance broad phase per step
        lo, hi = st[:, :2].min(0) - 15.0, st[:, :2].max(0) + 15.0
        near = ((np.minimum(a, b) < hi) & (np.maximum(a, b) > lo)).all(1)
        a, b = a[near], b[near]
        mid, half = (a + b) / 2, np.hypot(*(b - a).T) / 2
        reach = np.hypot(ego_len, ego_wid) / 2 + half
        dist2 = (st[:, None, 0] - mid[None, :, 0]) ** 2 + (st[:, None, 1] - mid[None, :, 1]) ** 2   # [T, E]
        t_c, e_c = np.nonzero(dist2 < (reach ** 2)[None])
        if len(t_c):
            hit = _segment_hits_box(a[e_c], b[e_c], st[t_c, :2], st[t_c, 2], ego_len, ego_wid)
            bad[t_c[hit]] = True
    return np.nonzero(bad)[0]


def _segment_hits_box(a: np.ndarray, b: np.ndarray, centre: np.ndarray, heading: np.ndarray,
                      length: float, width: float) -> np.ndarray:
    """Segments ``a→b [M, 2]`` that touch boxes ``[M]`` (Liang-Barsky clipping in the box frame)."""
    c, s = np.cos(heading), np.sin(heading)

    def local(p: np.ndarray) -> np.ndarray:
        q = p - centre
        return np.stack([q[:, 0] * c + q[:, 1] * s, -q[:, 0] * s + q[:, 1] * c], 1)

    p0, p1 = local(a), local(b)
    d = p1 - p0
    t0, t1 = np.zeros(len(a)), np.ones(len(a))
    ok = np.ones(len(a), dtype=bool)
    for axis, lim in ((0, length / 2), (1, width / 2)):
        for sign in (-1.0, 1.0):
            # inside: sign * (p0 + t d) <= lim
            num = lim - sign * p0[:, axis]
            den = sign * d[:, axis]
            par = np.abs(den) < 1e-12
            ok &= ~(par & (num < 0))
            with np.errstate(divide="ignore", invalid="ignore"):
                t = num / den
            t1 = np.where(~par & (den > 0), np.minimum(t1, t), t1)
            t0 = np.where(~par & (den < 0), np.maximum(t0, t), t0)
    return ok & (t0 <= t1)


# ---- generation ---------------------------------------------------------------------------------
def _layout_for_seed(seed: int, cfg: GeneratorConfig) -> str:
    w = np.ones(len(cfg.layouts)) if cfg.layout_weights is None else np.asarray(cfg.layout_weights, float)
    rng = np.random.default_rng([seed, 0x1A7])
    return cfg.layouts[int(rng.choice(len(cfg.layouts), p=w / w.sum()))]


def _attempt(seed: int, attempt: int, layout: str, cfg: GeneratorConfig) -> tuple[Scene | None, str]:
    rng = np.random.default_rng([seed, attempt])
    spec = LayoutSpec(cfg.lanes_per_direction, cfg.junction_lanes, cfg.lane_width, cfg.curve_radius,
                      cfg.one_way_prob, cfg.traffic_light_prob, cfg.crosswalk_prob, cfg.num_steps * DT)
    road = build_layout(layout, rng, spec)
    if cfg.random_rotation:
        road.rotate(float(rng.uniform(-np.pi, np.pi)))
    routes = build_routes(road, cfg.lateral_accel)
    conf = build_conflicts(road)
    tspec = TrafficSpec(cfg.num_agents, cfg.num_steps, cfg.agent_fill, cfg.pedestrian_fraction,
                        cfg.cyclist_fraction, cfg.truck_fraction, cfg.ego_speed_factor)
    n_total = int(round(cfg.num_agents * rng.uniform(*cfg.agent_fill)))
    n_ped = int(rng.binomial(n_total, cfg.pedestrian_fraction)) if road.sidewalks else 0
    drivers = place_vehicles(rng, road, routes, conf, n_total - n_ped, tspec)
    veh = simulate(road, routes, conf, drivers, cfg.num_steps)
    ped = pedestrians(rng, road, n_ped, cfg.num_steps)
    # acceptance
    if not veh.valid[0].all():
        return None, "ego_left_map"
    ego_xy = veh.state[0, :, :2]
    if np.linalg.norm(np.diff(ego_xy, axis=0), axis=1).sum() < cfg.min_ego_progress_m:
        return None, "ego_stalled"
    state = np.concatenate([veh.state, ped.state])
    valid = np.concatenate([veh.valid, ped.valid])
    size = np.concatenate([veh.size, ped.size])
    if len(find_collisions(state, valid, size)):
        return None, "collision"
    if len(ego_offroad(road, routes, veh, cfg.offroad_tolerance_m)):
        return None, "ego_offroad"
    # assemble: agents in a random order (the ego is not always row 0)
    kind = np.concatenate([veh.kind, ped.kind])
    names = ["ego"] + [f"{AgentType(int(k)).name.lower()}-{i:03d}" for i, k in enumerate(kind) if i > 0]
    perm = rng.permutation(len(kind))
    ego_index = int(np.nonzero(perm == 0)[0][0])
    map_arrays: dict[str, Any] = road.scene_arrays(cfg.num_steps, DT)
    scene = Scene(
        scene_id=f"gen-{layout}-{seed:06d}",
        agent_state=state[perm].astype(np.float32),
        agent_size=size[perm].astype(np.float32),
        agent_valid=valid[perm],
        agent_type=kind[perm].astype(np.int8),
        ego_index=ego_index,
        agent_ids=[names[i] for i in perm],
        ego_rear_axle_to_center=float(CENTER_FRACTION * veh.size[0, 0]),
        dataset="generated",
        license="CC0-1.0",
        **map_arrays,
    )
    scene.extra = {
        "generator": "alpagym-ray procedural v1",
        "layout": layout,
        "seed": int(seed),
        "attempt": int(attempt),
        "layout_params": road.params,
        "num_vehicles": int(len(veh.kind)),
        "num_pedestrians": int(len(ped.kind)),
        "ego_route_lanes": [int(i) for i in routes.lanes[int(veh.route[0])]],
        "config": cfg.to_dict(),
    }
    return scene, ""


def generate_scene(seed: int, cfg: GeneratorConfig | None = None) -> Scene:
    """One scene, a pure function of ``(seed, cfg)``; id ``gen-<layout>-<seed:06d>``.

    Rejected attempts (collision, off-road ego, ego leaving the map or stalled) are re-drawn and
    counted in ``scene.extra["rejections"]``; :class:`GenerationError` after ``cfg.max_attempts``.
    """
    cfg = cfg or GeneratorConfig()
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"generate_scene: seed must be an integer ≥ 0, got {seed!r}")
    seed = int(seed)
    layout = _layout_for_seed(seed, cfg)
    rejections: Counter[str] = Counter()
    for attempt in range(cfg.max_attempts):
        scene, reason = _attempt(seed, attempt, layout, cfg)
        if scene is not None:
            scene.extra["rejections"] = dict(sorted(rejections.items()))
            return scene.validate()
        rejections[reason] += 1
    raise GenerationError(f"seed {seed} ({layout}): all {cfg.max_attempts} attempts rejected: "
                          f"{dict(rejections)}")


def generate_scenes(n: int, seed: int = 0, cfg: GeneratorConfig | None = None) -> Iterator[Scene]:
    """``n`` scenes from seeds ``seed, seed + 1, ...`` (lazily)."""
    if n < 0:
        raise ValueError(f"generate_scenes: n must be ≥ 0, got {n}")
    cfg = cfg or GeneratorConfig()
    for i in range(n):
        yield generate_scene(seed + i, cfg)


def generate_scene_set(n: int, out_dir: str | os.PathLike, seed: int = 0,
                       cfg: GeneratorConfig | None = None) -> SceneSet:
    """Generate ``n`` scenes into a scene-set directory (``SceneSet.create``)."""
    return SceneSet.create(out_dir, generate_scenes(n, seed, cfg))


def small_scene_set(tmp_dir: str | os.PathLike, n: int = 4, seed: int = 0) -> SceneSet:
    """A few default scenes in ``tmp_dir`` (for tests and quick starts)."""
    return generate_scene_set(n, Path(tmp_dir), seed, GeneratorConfig())
