"""Building blocks shared by the importers: input coercion, track repair, resampling, the map
builder, and the final assembly of a checked :class:`~envs.drivesim.scene.Scene`.

Every importer turns one source file into ``Track`` objects (float64, source frame, dt = 0.1 s) and
a :class:`MapBuilder`, then calls :func:`assemble_scene`, which applies the checks every format
shares (finite values, a valid ego at the start, minimum length), records each repair in
:class:`Notes`, moves the scene to a local frame centred on the ego's first position, crops the map
to the region the agents use and validates the result. Problems that make a file unusable raise
:class:`~envs.drivesim.scene.SceneError` with a message naming the field.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from envs.drivesim.scene import DT, AgentType, LinkKind, MapType, PolygonType, Scene, SceneError


@dataclass(frozen=True)
class ImportOptions:
    """Options every importer understands (the CLI flags of ``scenes import``)."""

    map_margin_m: float | None = 80.0
    """Keep map features within this distance of the bounding box of all valid agent positions;
    None keeps the whole map (nuScenes conversions carry whole-city maps)."""
    min_steps: int = 20
    """Skip scenes shorter than this many 0.1 s steps after repairs."""
    max_ego_gap_steps: int = 10
    """Interior gaps in the ego's track up to this many steps are interpolated; a longer gap ends
    the scene there."""
    ego_position: str = "auto"
    """What the source's ego positions are: ``center`` (box centre), ``rear_axle``, or ``auto``
    (per dataset: nuScenes logs the rear axle, the others box centres)."""
    ego_rear_axle_to_center: float | None = None
    """Rear-axle-to-box-centre distance (m) to use for the ego; None = per dataset when known."""
    quaternion_order: str = "xyzw"
    """Order of the quaternion in NuRec ``tracks_poses`` rows after x, y, z: ``xyzw`` or ``wxyz``."""
    nurec_map: str = "auto"
    """NuRec map source: ``xodr`` (OpenDRIVE, fully supported), ``parquet`` (best-effort,
    unverified) or ``auto`` (xodr when the archive has one, else parquet)."""

    def __post_init__(self) -> None:
        if self.map_margin_m is not None and self.map_margin_m < 0:
            raise ValueError(f"ImportOptions.map_margin_m must be >= 0 or None, got {self.map_margin_m}")
        if self.min_steps < 2:
            raise ValueError(f"ImportOptions.min_steps must be >= 2, got {self.min_steps}")
        if self.max_ego_gap_steps < 0:
            raise ValueError(f"ImportOptions.max_ego_gap_steps must be >= 0, got {self.max_ego_gap_steps}")
        for name, valid in (("ego_position", ("auto", "center", "rear_axle")),
                            ("quaternion_order", ("xyzw", "wxyz")),
                            ("nurec_map", ("auto", "xodr", "parquet"))):
            if getattr(self, name) not in valid:
                raise ValueError(f"ImportOptions.{name}={getattr(self, name)!r}; valid: {list(valid)}")
        if self.ego_rear_axle_to_center is not None and not (
            math.isfinite(self.ego_rear_axle_to_center) and self.ego_rear_axle_to_center >= 0
        ):
            raise ValueError("ImportOptions.ego_rear_axle_to_center must be finite and >= 0")


@dataclass
class Notes:
    """What an importer did to one file: ``fixes`` are repairs of bad data (the file's status
    becomes "fixed"); ``info`` are conversions that are not repairs."""

    fixes: list[str] = field(default_factory=list)
    info: list[str] = field(default_factory=list)


@dataclass
class ImportedScene:
    """A checked scene plus what was done to make it."""

    scene: Scene
    notes: Notes


@dataclass
class Track:
    """One agent in the source frame, on the 0.1 s grid."""

    id: str
    """Original track id."""
    type: AgentType
    """Agent class."""
    state: np.ndarray
    """``[T, 5]`` float64: x, y, heading, vx, vy (box centre; anything where invalid)."""
    valid: np.ndarray
    """``[T]`` bool."""
    size: tuple[float, float] | None
    """(length, width) in metres, None when the source gives no usable size."""


# ---- input coercion ----------------------------------------------------------------------------
def as_points(obj: Any, where: str) -> np.ndarray:
    """A polyline / polygon as ``[P, 2]`` float64 from an array ``(P, 2|3)``, a list of points
    (lists / tuples of 2-3 numbers) or a list of ``{x, y[, z]}`` dicts."""
    if isinstance(obj, np.ndarray):
        arr = obj
    elif isinstance(obj, (list, tuple)):
        if len(obj) and isinstance(obj[0], dict):
            try:
                arr = np.array([[p["x"], p["y"]] for p in obj], dtype=np.float64)
            except (KeyError, TypeError, ValueError) as e:
                raise SceneError(f"{where}: points must be {{x, y}} objects with numbers ({e})") from None
        else:
            try:
                arr = np.array(obj, dtype=np.float64)
            except (TypeError, ValueError) as e:
                raise SceneError(f"{where}: not a list of numeric points ({e})") from None
    else:
        raise SceneError(f"{where}: expected an array or list of points, got {type(obj).__name__}")
    if arr.size == 0:
        return np.zeros((0, 2))
    if arr.ndim != 2 or arr.shape[1] not in (2, 3):
        raise SceneError(f"{where}: points must have shape (P, 2) or (P, 3), got {list(arr.shape)}")
    if not np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_:
        raise SceneError(f"{where}: points must be numeric, got dtype {arr.dtype}")
    return arr[:, :2].astype(np.float64)


def as_series(obj: Any, length: int, where: str, cols: int | None = None) -> np.ndarray:
    """A per-step array: ``(T,)`` or ``(T, 1)`` -> ``[T]`` when ``cols`` is None, else ``[T, cols]``
    (extra columns, e.g. z, dropped). Raises SceneError on a wrong shape or a non-numeric type."""
    try:
        arr = np.asarray(obj, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise SceneError(f"{where}: not numeric ({type(obj).__name__}: {e})") from None
    if cols is None:
        if arr.ndim == 2 and arr.shape[1] == 1:
            arr = arr[:, 0]
        if arr.shape != (length,):
            raise SceneError(f"{where}: expected shape ({length},) or ({length}, 1), got {list(arr.shape)}")
        return arr
    if arr.ndim != 2 or arr.shape[0] != length or arr.shape[1] < cols:
        raise SceneError(f"{where}: expected shape ({length}, >={cols}), got {list(arr.shape)}")
    return arr[:, :cols]


def median_size(length: np.ndarray, width: np.ndarray, valid: np.ndarray) -> tuple[float, float] | None:
    """Median length and width over valid steps with positive, finite sizes (sources store zeros on
    invalid steps); None when no step qualifies."""
    ok = valid & np.isfinite(length) & np.isfinite(width) & (length > 0) & (width > 0)
    if not ok.any():
        return None
    return float(np.median(length[ok])), float(np.median(width[ok]))


def wrap_angle(a: np.ndarray) -> np.ndarray:
    return (np.asarray(a) + np.pi) % (2 * np.pi) - np.pi


def is_regular_grid(times: np.ndarray, dt: float = DT, tol: float = 1e-3) -> bool:
    """True when ``times`` are ``dt`` apart (within ``tol`` seconds)."""
    return len(times) < 2 or bool(np.all(np.abs(np.diff(times) - dt) <= tol))


def resample(t_src: np.ndarray, values: np.ndarray, valid: np.ndarray, t_dst: np.ndarray,
             max_gap: float, angle_cols: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Linear interpolation of ``values [M, C]`` sampled at increasing ``t_src [M]`` onto
    ``t_dst [T]``; a target step is valid when both neighbouring samples are valid and at most
    ``max_gap`` seconds apart (or it coincides with a valid sample). Columns in ``angle_cols`` are
    interpolated along the shorter arc. Returns ``(values [T, C], valid [T])``."""
    t_src = np.asarray(t_src, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64).reshape(len(t_src), -1)
    out = np.zeros((len(t_dst), values.shape[1]))
    ok = np.zeros(len(t_dst), dtype=bool)
    if len(t_src) == 0:
        return out, ok
    if np.any(np.diff(t_src) <= 0):
        raise SceneError("time stamps must be strictly increasing")
    eps = 1e-6  # grid times are sums of 0.1 s steps: match samples up to float noise
    hi = np.clip(np.searchsorted(t_src, t_dst - eps, side="left"), 0, len(t_src) - 1)
    exact = np.abs(t_src[hi] - t_dst) <= eps
    lo = np.clip(hi - 1, 0, len(t_src) - 1)
    inside = (t_dst > t_src[0]) & (t_dst < t_src[-1])
    gap = t_src[hi] - t_src[lo]
    alpha = np.where(gap > 0, (t_dst - t_src[lo]) / np.where(gap > 0, gap, 1.0), 0.0)[:, None]
    a, b = values[lo], values[hi]
    delta = b - a
    for c in angle_cols:
        delta[:, c] = wrap_angle(delta[:, c])
    interp = a + alpha * delta
    for c in angle_cols:
        interp[:, c] = wrap_angle(interp[:, c])
    use_interp = inside & ~exact & valid[lo] & valid[hi] & (gap <= max_gap + 1e-9)
    use_exact = exact & valid[hi]
    out[use_interp] = interp[use_interp]
    out[use_exact] = values[hi][use_exact]
    ok = use_interp | use_exact
    return out, ok


def velocity_from_positions(xy: np.ndarray, valid: np.ndarray, dt: float = DT) -> np.ndarray:
    """``[T, 2]`` velocity by central differences inside each run of valid steps (one-sided at the
    ends of a run, zero for a run of one step)."""
    v = np.zeros_like(xy, dtype=np.float64)
    idx = np.flatnonzero(valid)
    if len(idx) == 0:
        return v
    breaks = np.flatnonzero(np.diff(idx) > 1) + 1
    for run in np.split(idx, breaks):
        if len(run) >= 2:
            v[run] = np.gradient(xy[run], dt, axis=0)
    return v


# ---- the map -----------------------------------------------------------------------------------
@dataclass
class _Line:
    points: np.ndarray
    kind: MapType
    key: str | None
    width: np.ndarray | None
    speed: float


@dataclass
class _Polygon:
    points: np.ndarray
    kind: PolygonType
    lane_key: str | None


class MapBuilder:
    """Collects typed polylines, polygons, lane links and traffic lights, keyed by source ids, then
    crops and packs them into the scene's CSR arrays. Lanes are addressed by ``key`` (the source's
    feature id) so that links and lights can be resolved after cropping."""

    def __init__(self) -> None:
        self.lines: list[_Line] = []
        self.polygons: list[_Polygon] = []
        self.links: list[tuple[str, str, LinkKind]] = []
        self.lights: list[tuple[str, np.ndarray]] = []
        self.dropped: Counter[str] = Counter()

    # adding --------------------------------------------------------------------------------
    def add_line(self, points: np.ndarray, kind: MapType, key: str | None = None,
                 width: np.ndarray | float | None = None, speed_limit: float = math.nan) -> None:
        """Add a polyline ``[P, 2]``; ``width`` is the full lane width per vertex (or one value)."""
        pts = np.asarray(points, dtype=np.float64)
        if not np.isfinite(pts).all():
            self.dropped["polyline with non-finite points"] += 1
            return
        w = None
        if width is not None:
            w = np.broadcast_to(np.asarray(width, dtype=np.float64), (len(pts),)).copy()
        if len(pts) > 1:
            keep = np.concatenate([[True], np.linalg.norm(np.diff(pts, axis=0), axis=1) > 1e-6])
            pts = pts[keep]
            w = w[keep] if w is not None else None
        if len(pts) < 2:
            self.dropped["polyline with fewer than 2 distinct points"] += 1
            return
        self.lines.append(_Line(pts, MapType(kind), key, w, float(speed_limit)))

    def add_polygon(self, points: np.ndarray, kind: PolygonType, lane_key: str | None = None) -> None:
        pts = np.asarray(points, dtype=np.float64)
        if not np.isfinite(pts).all():
            self.dropped["polygon with non-finite points"] += 1
            return
        if len(pts) > 1 and np.allclose(pts[0], pts[-1]):
            pts = pts[:-1]  # implicitly closed in the scene format
        if len(pts) < 3:
            self.dropped["polygon with fewer than 3 points"] += 1
            return
        self.polygons.append(_Polygon(pts, PolygonType(kind), lane_key))

    def add_link(self, src: str, dst: str, kind: LinkKind) -> None:
        self.links.append((str(src), str(dst), LinkKind(kind)))

    def add_light(self, lane_key: str, states: np.ndarray) -> None:
        """A traffic light controlling lane ``lane_key``: ``states [T]`` int8 LightState."""
        self.lights.append((str(lane_key), np.asarray(states, dtype=np.int8)))

    # queries / edits -----------------------------------------------------------------------
    @property
    def num_features(self) -> int:
        return len(self.lines) + len(self.polygons)

    def infer_successors(self, max_gap: float = 0.5, max_angle_deg: float = 60.0) -> int:
        """Add SUCCESSOR links between lanes whose end meets another's start (within ``max_gap`` m,
        directions within ``max_angle_deg``), for sources that carry no lane graph. Returns the count."""
        from scipy.spatial import cKDTree

        lanes = [ln for ln in self.lines if ln.kind == MapType.LANE and ln.key is not None]
        if len(lanes) < 2:
            return 0
        starts = np.array([ln.points[0] for ln in lanes])
        start_dir = np.array([ln.points[1] - ln.points[0] for ln in lanes])
        tree = cKDTree(starts)
        cos_max = math.cos(math.radians(max_angle_deg))
        existing = {(a, b) for a, b, k in self.links if k == LinkKind.SUCCESSOR}
        added = 0
        for i, ln in enumerate(lanes):
            end_dir = ln.points[-1] - ln.points[-2]
            for j in tree.query_ball_point(ln.points[-1], max_gap):
                if j == i:
                    continue
                d0, d1 = end_dir, start_dir[j]
                cos = float(d0 @ d1) / max(float(np.linalg.norm(d0) * np.linalg.norm(d1)), 1e-12)
                pair = (str(ln.key), str(lanes[j].key))
                if cos >= cos_max and pair not in existing:
                    self.links.append((pair[0], pair[1], LinkKind.SUCCESSOR))
                    existing.add(pair)
                    added += 1
        return added

    def transform(self, fn) -> None:
        """Apply ``fn(points [P, 2]) -> [P, 2]`` to every vertex (e.g. a rigid transform)."""
        for ln in self.lines:
            ln.points = fn(ln.points)
        for pg in self.polygons:
            pg.points = fn(pg.points)

    def crop(self, lo: np.ndarray, hi: np.ndarray) -> int:
        """Keep what lies in the box ``[lo, hi]``: lanes and polygons whole when any part is inside;
        other polylines cut to their runs of segments that touch the box. Returns features removed."""

        def seg_touch(p: np.ndarray) -> np.ndarray:
            a, b = p[:-1], p[1:]
            smin, smax = np.minimum(a, b), np.maximum(a, b)
            return (smax >= lo).all(1) & (smin <= hi).all(1)

        before = self.num_features
        lines: list[_Line] = []
        for ln in self.lines:
            touch = seg_touch(ln.points)
            if not touch.any():
                continue
            if ln.kind == MapType.LANE or touch.all():
                lines.append(ln)
                continue
            # runs of touching segments -> vertex ranges [s, e] inclusive
            idx = np.flatnonzero(touch)
            for run in np.split(idx, np.flatnonzero(np.diff(idx) > 1) + 1):
                s, e = run[0], run[-1] + 1
                w = ln.width[s : e + 1] if ln.width is not None else None
                lines.append(_Line(ln.points[s : e + 1], ln.kind, None, w, ln.speed))
        self.lines = lines
        self.polygons = [pg for pg in self.polygons
                         if (pg.points.max(0) >= lo).all() and (pg.points.min(0) <= hi).all()]
        return max(0, before - self.num_features)

    # packing -------------------------------------------------------------------------------
    def build(self, num_steps: int, notes: Notes | None = None) -> dict[str, Any]:
        """Pack into the Scene's map arrays (dict of keyword arguments for ``Scene``)."""
        index: dict[str, int] = {}
        for i, ln in enumerate(self.lines):
            if ln.kind == MapType.LANE and ln.key is not None:
                index.setdefault(ln.key, i)
        n_pts = [len(ln.points) for ln in self.lines]
        offsets = np.concatenate([[0], np.cumsum(n_pts)]).astype("<i4")
        points = (np.concatenate([ln.points for ln in self.lines]) if self.lines
                  else np.zeros((0, 2)))
        widths = [ln.width if (ln.width is not None and ln.kind == MapType.LANE)
                  else np.full(len(ln.points), np.nan) for ln in self.lines]
        width = np.concatenate(widths) if widths else np.zeros(0)
        width = np.where(np.isfinite(width) & (width > 0), width, np.nan)
        speed = np.array([ln.speed if ln.kind == MapType.LANE and ln.speed > 0 else np.nan
                          for ln in self.lines], dtype=np.float64)
        links = sorted({(index[a], index[b], int(k)) for a, b, k in self.links
                        if a in index and b in index and a != b})
        poly_n = [len(pg.points) for pg in self.polygons]
        poly_off = np.concatenate([[0], np.cumsum(poly_n)]).astype("<i4")
        poly_pts = (np.concatenate([pg.points for pg in self.polygons]) if self.polygons
                    else np.zeros((0, 2)))
        poly_lane = [index.get(pg.lane_key, -1) if pg.lane_key is not None else -1 for pg in self.polygons]
        tl_lane, tl_state, lost = [], [], 0
        no_lights = np.zeros((0, num_steps), np.int8)
        for key, states in self.lights:
            if key in index and states.shape == (num_steps,):
                tl_lane.append(index[key])
                tl_state.append(states)
            else:
                lost += 1
        if lost and notes is not None:
            notes.fixes.append(f"{lost} traffic light(s) dropped: their lane is not in the map (or was "
                               "cropped) or their state series has the wrong length")
        return {
            "map_points": points.astype("<f4"),
            "map_offsets": offsets,
            "map_type": np.array([int(ln.kind) for ln in self.lines], dtype=np.int8),
            "map_width": width.astype("<f4"),
            "lane_speed_limit": speed.astype("<f4"),
            "lane_links": np.array(links, dtype="<i4").reshape(-1, 3),
            "polygon_points": poly_pts.astype("<f4"),
            "polygon_offsets": poly_off,
            "polygon_type": np.array([int(pg.kind) for pg in self.polygons], dtype=np.int8),
            "polygon_lane": np.array(poly_lane, dtype="<i4"),
            "tl_lane": np.array(tl_lane, dtype="<i4"),
            "tl_state": (np.stack(tl_state) if tl_state else no_lights).astype(np.int8),
        }


# ---- assembly ----------------------------------------------------------------------------------
def _repair_ego(tracks: list[Track], ego: int, options: ImportOptions, notes: Notes) -> list[Track]:
    """Trim leading steps without the ego, interpolate short gaps, end the scene at a long gap."""
    e = tracks[ego]
    valid = e.valid
    if not valid.any():
        raise SceneError(f"the ego (track {e.id!r}) has no valid step")
    first = int(np.argmax(valid))
    last = len(valid) - 1 - int(np.argmax(valid[::-1]))
    end = last + 1
    idx = np.flatnonzero(valid[first:end]) + first
    gaps = np.flatnonzero(np.diff(idx) > 1)
    filled = 0
    for g in gaps:
        a, b = int(idx[g]), int(idx[g + 1])
        if b - a - 1 > options.max_ego_gap_steps:
            notes.fixes.append(f"the ego track has a {b - a - 1}-step gap after step {a}: scene ended there "
                               f"(gaps up to {options.max_ego_gap_steps} steps are interpolated)")
            end = a + 1
            break
        for t in range(a + 1, b):
            w = (t - a) / (b - a)
            s = e.state[a] + w * (e.state[b] - e.state[a])
            s[2] = wrap_angle(e.state[a, 2] + w * wrap_angle(e.state[b, 2] - e.state[a, 2]))
            e.state[t] = s
            e.valid[t] = True
            filled += 1
    if filled:
        notes.fixes.append(f"interpolated {filled} step(s) missing inside the ego track")
    if first > 0 or end < len(valid):
        if first > 0:
            notes.fixes.append(f"dropped {first} leading step(s) where the ego was not valid")
        tracks = [Track(t.id, t.type, t.state[first:end], t.valid[first:end], t.size) for t in tracks]
    return tracks


def assemble_scene(
    *,
    scene_id: str,
    tracks: list[Track],
    ego: int,
    map_builder: MapBuilder,
    notes: Notes,
    options: ImportOptions,
    dataset: str,
    license: str,
    extra: dict | None = None,
    ego_rear_axle_to_center: float | None = None,
) -> Scene:
    """Check and repair the tracks, move everything to a local frame at the ego's first position,
    crop the map and return a validated :class:`Scene` (raises SceneError when unusable)."""
    if not scene_id:
        raise SceneError("empty scene id")
    if not 0 <= ego < len(tracks):
        raise SceneError(f"ego index {ego} out of range for {len(tracks)} tracks")
    steps = {t.state.shape for t in tracks} | {(len(t.valid), 5) for t in tracks}
    if len(steps) != 1 or next(iter(steps))[1] != 5:
        raise SceneError(f"tracks do not share one [T, 5] shape: {sorted(steps)}")
    tracks = [Track(t.id, t.type, np.array(t.state, dtype=np.float64), np.array(t.valid, dtype=bool), t.size)
              for t in tracks]
    # non-finite values on valid steps: fatal for the ego, otherwise those steps become invalid
    for i, t in enumerate(tracks):
        bad = t.valid & ~np.isfinite(t.state).all(1)
        if bad.any():
            if i == ego:
                raise SceneError(f"the ego (track {t.id!r}) has non-finite position/heading/velocity on "
                                 f"{int(bad.sum())} valid step(s), first at step {int(np.argmax(bad))}")
            t.valid &= ~bad
            notes.fixes.append(f"agent {t.id!r}: {int(bad.sum())} valid step(s) with non-finite values "
                               "marked invalid")
    tracks = _repair_ego(tracks, ego, options, notes)
    num_steps = len(tracks[ego].valid)
    if num_steps < options.min_steps:
        raise SceneError(f"only {num_steps} usable step(s) ({num_steps * DT:.1f} s); at least "
                         f"{options.min_steps} are needed (--min-steps)")
    if tracks[ego].size is None:
        raise SceneError(f"the ego (track {tracks[ego].id!r}) has no positive length and width on any "
                         "valid step")
    keep: list[int] = []
    never_valid = 0
    for i, t in enumerate(tracks):
        if i != ego and not t.valid.any():
            never_valid += 1
            continue
        if i != ego and t.size is None:
            notes.fixes.append(f"agent {t.id!r} dropped: no positive length and width on any valid step")
            continue
        keep.append(i)
    if never_valid:
        notes.info.append(f"{never_valid} agent(s) never valid within the scene dropped")
    ego_row = keep.index(ego)
    tracks = [tracks[i] for i in keep]

    state = np.stack([t.state for t in tracks])
    valid = np.stack([t.valid for t in tracks])
    origin = state[ego_row, 0, :2].copy()
    state[..., :2] -= origin
    state[..., 2] = wrap_angle(state[..., 2])
    state[~valid] = 0.0
    map_builder.transform(lambda p: p - origin)
    if options.map_margin_m is not None and map_builder.num_features:
        pos = state[..., :2][valid]
        lo, hi = pos.min(0) - options.map_margin_m, pos.max(0) + options.map_margin_m
        removed = map_builder.crop(lo, hi)
        if removed:
            notes.info.append(f"map cropped to {options.map_margin_m:g} m around the agents "
                              f"({removed} feature(s) outside removed or cut)")
    for why, n in sorted(map_builder.dropped.items()):
        notes.fixes.append(f"map: {n} {why} dropped")
    map_arrays = map_builder.build(num_steps, notes)
    info = dict(extra or {})
    info["origin_xy"] = [float(origin[0]), float(origin[1])]
    info["importer_notes"] = {"fixes": list(notes.fixes), "info": list(notes.info)}
    scene = Scene(
        scene_id=str(scene_id),
        agent_state=state.astype("<f4"),
        agent_size=np.array([t.size for t in tracks], dtype="<f4").reshape(len(tracks), 2),
        agent_valid=valid,
        agent_type=np.array([int(t.type) for t in tracks], dtype=np.int8),
        ego_index=ego_row,
        agent_ids=[str(t.id) for t in tracks],
        ego_rear_axle_to_center=ego_rear_axle_to_center,
        dataset=dataset,
        license=license,
        extra=info,
        **map_arrays,
    )
    return scene.validate()


# dataset name -> licence of its data (shown in the scene set's README when pushed)
LICENSES = {
    "nuscenes": "CC BY-NC-SA 4.0 (nuScenes terms of use; non-commercial)",
    "nuplan": "CC BY-NC-SA 4.0 (nuPlan terms of use; non-commercial)",
    "waymo": "Waymo Open Dataset License Agreement (non-commercial)",
    "av2": "CC BY-NC-SA 4.0 (Argoverse 2 terms of use; non-commercial)",
    "argoverse2": "CC BY-NC-SA 4.0 (Argoverse 2 terms of use; non-commercial)",
    "lyft": "CC BY-NC-SA 4.0 (Lyft Level 5 terms of use; non-commercial)",
    "nurec": "NVIDIA PhysicalAI-Autonomous-Vehicles-NuRec dataset terms (see the Hub dataset card)",
}


def license_for(dataset: str) -> str:
    return LICENSES.get(dataset.lower(), "unknown (see the source dataset's terms)")
