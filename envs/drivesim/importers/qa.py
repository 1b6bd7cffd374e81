"""Quality checks of an imported scene, in numpy, independent of the simulator.

They answer "does the logged ego look right on this map?": how often a corner of the logged ego box
lies outside the drivable area (DESIGN.md's off-road rule: more than ``tolerance`` outside the
union of lane polygons and lane centre lines buffered by half their width, 1.85 m when unknown, or
the box crossing a road edge), and at which steps the logged ego box overlaps another agent's box.
A high off-road rate or overlaps at the start usually mean a wrong ego reference point, swapped
sizes or a map in another frame: the importer's job, not the driver's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from envs.drivesim.scene import DEFAULT_LANE_WIDTH, MapType, PolygonType, Scene


def box_corners(center: np.ndarray, yaw: np.ndarray, length: float | np.ndarray,
                width: float | np.ndarray) -> np.ndarray:
    """Corners ``[..., 4, 2]`` (front-left, front-right, rear-right, rear-left) of oriented boxes."""
    c, s = np.cos(yaw)[..., None], np.sin(yaw)[..., None]
    hl = np.broadcast_to(np.asarray(length) / 2, np.shape(yaw))[..., None]
    hw = np.broadcast_to(np.asarray(width) / 2, np.shape(yaw))[..., None]
    lx = np.concatenate([hl, hl, -hl, -hl], -1)
    ly = np.concatenate([hw, -hw, -hw, hw], -1)
    x = center[..., 0:1] + lx * c - ly * s
    y = center[..., 1:2] + lx * s + ly * c
    return np.stack([x, y], -1)


def point_segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distances ``[M, S]`` from points ``[M, 2]`` to segments ``a, b [S, 2]``."""
    ab = b - a
    denom = np.maximum((ab * ab).sum(-1), 1e-12)
    u = np.clip(((p[:, None, :] - a[None]) * ab[None]).sum(-1) / denom, 0.0, 1.0)
    closest = a[None] + u[..., None] * ab[None]
    return np.linalg.norm(p[:, None, :] - closest, axis=-1)


def points_in_polygons(p: np.ndarray, pts: np.ndarray, offsets: np.ndarray, which: np.ndarray) -> np.ndarray:
    """``[M]`` True where a point lies inside any of the polygons ``which`` (even-odd rule)."""
    inside = np.zeros(len(p), dtype=bool)
    for g in which:
        poly = pts[offsets[g] : offsets[g + 1]]
        if len(poly) < 3:
            continue
        a, b = poly, np.roll(poly, -1, axis=0)
        py = p[:, 1:2]
        cond = (a[None, :, 1] > py) != (b[None, :, 1] > py)
        x_cross = a[None, :, 0] + (py - a[None, :, 1]) * (b[None, :, 0] - a[None, :, 0]) / np.where(
            b[None, :, 1] == a[None, :, 1], 1e-12, b[None, :, 1] - a[None, :, 1])
        inside ^= (cond & (p[:, 0:1] < x_cross)).sum(1) % 2 == 1
    return inside


def segments_intersect(p1: np.ndarray, p2: np.ndarray, q1: np.ndarray, q2: np.ndarray) -> np.ndarray:
    """``[M, S]`` True where segment ``p1-p2 [M]`` properly intersects ``q1-q2 [S]``."""

    def orient(a, b, c):
        ab, ac = b - a, c - a
        return ab[..., 0] * ac[..., 1] - ab[..., 1] * ac[..., 0]

    P1, P2 = p1[:, None], p2[:, None]
    Q1, Q2 = q1[None], q2[None]
    d1, d2 = orient(Q1, Q2, P1), orient(Q1, Q2, P2)
    d3, d4 = orient(P1, P2, Q1), orient(P1, P2, Q2)
    return (d1 * d2 < 0) & (d3 * d4 < 0)


def _boxes_overlap(c1, y1, l1, w1, c2, y2, l2, w2) -> np.ndarray:
    """Separating-axis test for pairs of oriented boxes (broadcast shapes)."""
    k1, k2 = box_corners(c1, y1, l1, w1), box_corners(c2, y2, l2, w2)
    overlap = np.ones(np.broadcast_shapes(np.shape(y1), np.shape(y2)), dtype=bool)
    for yaw in (y1, y2):
        for ang in (yaw, yaw + np.pi / 2):
            axis = np.stack([np.cos(ang), np.sin(ang)], -1)[..., None, :]
            p1, p2 = (k1 * axis).sum(-1), (k2 * axis).sum(-1)
            overlap &= (p1.max(-1) >= p2.min(-1)) & (p2.max(-1) >= p1.min(-1))
    return overlap


@dataclass(frozen=True)
class SceneQA:
    """Results of :func:`check_scene`."""

    offroad_steps: int
    """Valid ego steps with a box corner off the drivable area (or crossing a road edge)."""
    valid_steps: int
    """Valid ego steps checked."""
    overlap_steps: int
    """Valid ego steps where the logged ego box overlaps another valid agent's box."""
    overlap_agents: tuple[str, ...]
    """Ids of the agents the logged ego overlaps."""
    first_overlap_step: int | None
    """First step with an overlap (None when none)."""

    @property
    def offroad_fraction(self) -> float:
        return self.offroad_steps / max(self.valid_steps, 1)


def ego_offroad(scene: Scene, tolerance: float = 0.3) -> np.ndarray:
    """``[T]`` bool: the logged ego box is off-road at each step (False where the ego is invalid)."""
    e = scene.ego_index
    valid = scene.agent_valid[e]
    st = scene.agent_state[e].astype(np.float64)
    length, width = (float(v) for v in scene.agent_size[e])
    corners = box_corners(st[:, :2], st[:, 2], length, width)             # [T, 4, 2]
    p = corners.reshape(-1, 2)
    lo, hi = p.min(0) - 10.0, p.max(0) + 10.0
    ok = np.zeros(len(p), dtype=bool)
    pts = scene.map_points.astype(np.float64)
    for i in range(scene.num_polylines):
        if scene.map_type[i] != MapType.LANE:
            continue
        s, t = scene.map_offsets[i], scene.map_offsets[i + 1]
        line = pts[s:t]
        if (line.max(0) < lo).any() or (line.min(0) > hi).any():
            continue
        w = scene.map_width[s:t].astype(np.float64)
        half = 0.5 * np.where(np.isfinite(w), w, DEFAULT_LANE_WIDTH)
        d = point_segment_distance(p, line[:-1], line[1:])
        ok |= (d <= np.maximum(half[:-1], half[1:])[None] + tolerance).any(1)
    lanes = np.flatnonzero(scene.polygon_type == PolygonType.LANE)
    ppts = scene.polygon_points.astype(np.float64)
    if len(lanes):
        ok |= points_in_polygons(p, ppts, scene.polygon_offsets, lanes)
        for g in lanes:
            poly = ppts[scene.polygon_offsets[g] : scene.polygon_offsets[g + 1]]
            if len(poly) >= 2:
                ok |= (point_segment_distance(p, poly, np.roll(poly, -1, axis=0)) <= tolerance).any(1)
    off = ~ok.reshape(-1, 4).all(1)
    edges = [scene.polyline(i).astype(np.float64) for i in range(scene.num_polylines)
             if scene.map_type[i] == MapType.ROAD_EDGE]
    if edges:
        q1 = np.concatenate([e[:-1] for e in edges])
        q2 = np.concatenate([e[1:] for e in edges])
        b1 = corners.reshape(-1, 2)
        b2 = np.roll(corners, -1, axis=1).reshape(-1, 2)
        off |= segments_intersect(b1, b2, q1, q2).any(1).reshape(-1, 4).any(1)
    return off & valid


def check_scene(scene: Scene, tolerance: float = 0.3, shrink: float = 0.02) -> SceneQA:
    """Off-road steps and box overlaps of the logged ego (boxes shrunk by ``shrink`` as drivesim's
    collision check does)."""
    e = scene.ego_index
    valid = scene.agent_valid[e]
    off = ego_offroad(scene, tolerance)
    st = scene.agent_state.astype(np.float64)
    size = scene.agent_size.astype(np.float64) * (1 - shrink)
    others = np.array([i for i in range(scene.num_agents) if i != e], dtype=int)
    hit = np.zeros((scene.num_steps, len(others)), dtype=bool)
    if len(others):
        both = valid[:, None] & scene.agent_valid[others].T
        gap = np.linalg.norm(st[others, :, :2].transpose(1, 0, 2) - st[e, :, None, :2], axis=-1)
        near = both & (gap < 15.0)
        if near.any():
            t_idx, a_idx = np.nonzero(near)
            o = others[a_idx]
            ov = _boxes_overlap(st[e, t_idx, :2], st[e, t_idx, 2], size[e, 0], size[e, 1],
                                st[o, t_idx, :2], st[o, t_idx, 2], size[o, 0], size[o, 1])
            hit[t_idx[ov], a_idx[ov]] = True
    steps = hit.any(1)
    ids = scene.agent_ids or [str(i) for i in range(scene.num_agents)]
    return SceneQA(
        offroad_steps=int(off.sum()),
        valid_steps=int(valid.sum()),
        overlap_steps=int(steps.sum()),
        overlap_agents=tuple(ids[others[j]] for j in np.flatnonzero(hit.any(0))),
        first_overlap_step=int(np.argmax(steps)) if steps.any() else None,
    )
