"""Small hand-built scenes with known answers for drivesim tests."""

from __future__ import annotations

import numpy as np

from envs.drivesim.scene import AgentType, MapType, Scene


def straight_road_scene(
    scene_id: str = "hand-straight",
    steps: int = 61,
    ego_speed: float = 10.0,
    others: list[dict] | None = None,
    lane_width: float = 3.7,
    road_edges: bool = True,
    curve_radius: float | None = None,
) -> Scene:
    """One lane along +x (or an arc of ``curve_radius`` turning left) with road edges at its sides;
    the ego drives the lane centre at ``ego_speed``. ``others``: dicts with x, y, heading, speed
    (constant velocity along heading), length, width."""
    t = np.arange(steps) * 0.1
    s_ego = ego_speed * t
    if curve_radius is None:
        s = np.linspace(-60.0, 300.0, 181)
        centre = np.stack([s, np.zeros_like(s)], -1)
        heading_line = np.zeros_like(s)
        ego_xy = np.stack([s_ego, np.zeros_like(s_ego)], -1)
        ego_h = np.zeros_like(s_ego)
    else:
        ang = np.linspace(-0.5, 2.5, 301)  # radians of arc, centre of the circle at (0, R)
        r = curve_radius
        centre = np.stack([r * np.sin(ang), r - r * np.cos(ang)], -1)
        heading_line = ang
        a = s_ego / r
        ego_xy = np.stack([r * np.sin(a), r - r * np.cos(a)], -1)
        ego_h = a
    normal = np.stack([-np.sin(heading_line), np.cos(heading_line)], -1)
    polylines = [centre]
    types = [MapType.LANE]
    if road_edges:
        polylines += [centre + normal * lane_width / 2, centre - normal * lane_width / 2]
        types += [MapType.ROAD_EDGE, MapType.ROAD_EDGE]
    points = np.concatenate(polylines).astype(np.float32)
    offsets = np.cumsum([0] + [len(p) for p in polylines]).astype(np.int32)
    widths = np.full(len(points), np.nan, dtype=np.float32)
    widths[: len(centre)] = lane_width
    others = others or []
    n = 1 + len(others)
    state = np.zeros((n, steps, 5), dtype=np.float32)
    size = np.zeros((n, 2), dtype=np.float32)
    state[0, :, 0:2] = ego_xy
    state[0, :, 2] = ego_h
    state[0, :, 3] = ego_speed * np.cos(ego_h)
    state[0, :, 4] = ego_speed * np.sin(ego_h)
    size[0] = (4.5, 1.9)
    for i, o in enumerate(others, start=1):
        h, v = o.get("heading", 0.0), o.get("speed", 0.0)
        state[i, :, 0] = o["x"] + v * np.cos(h) * t
        state[i, :, 1] = o["y"] + v * np.sin(h) * t
        state[i, :, 2] = h
        state[i, :, 3] = v * np.cos(h)
        state[i, :, 4] = v * np.sin(h)
        size[i] = (o.get("length", 4.5), o.get("width", 1.9))
    return Scene(
        scene_id=scene_id,
        agent_state=state,
        agent_size=size,
        agent_valid=np.ones((n, steps), dtype=bool),
        agent_type=np.full(n, int(AgentType.VEHICLE), dtype=np.int8),
        ego_index=0,
        map_points=points,
        map_offsets=offsets,
        map_type=np.asarray(types, dtype=np.int8),
        map_width=widths,
        lane_speed_limit=np.full(len(polylines), np.nan, dtype=np.float32),
        dataset="hand-built",
    ).validate()
