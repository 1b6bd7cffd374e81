"""The numpy quality checks of imported scenes (off-road rule of DESIGN.md, logged box overlaps)."""

from __future__ import annotations

import numpy as np
import pytest

from envs.drivesim.importers.qa import box_corners, check_scene, ego_offroad, points_in_polygons
from envs.drivesim.scene import AgentType, MapType, PolygonType, Scene


def scene(ego_y: float, map_kind: str = "polygon", other_x: float | None = None) -> Scene:
    """A 10-step ego (4 x 2 m, heading +x) at y = ego_y driving x = 0..9 m, on a map of one
    lane along y = 0 from x = -20 to 40 given as a 3.5 m wide polygon, a centre line of unknown
    width, or a centre line plus road edges at y = +-1.75."""
    T = 10
    state = np.zeros((2, T, 5), np.float32)
    state[0, :, 0] = np.arange(T)
    state[0, :, 1] = ego_y
    state[1, :, 0] = other_x if other_x is not None else 100.0
    valid = np.ones((2, T), bool)
    kw = {}
    line = np.array([[-20.0, 0.0], [40.0, 0.0]], np.float32)
    if map_kind == "polygon":
        kw = dict(
            polygon_points=np.array([[-20, -1.75], [40, -1.75], [40, 1.75], [-20, 1.75]], np.float32),
            polygon_offsets=np.array([0, 4], np.int32),
            polygon_type=np.array([PolygonType.LANE], np.int8),
            polygon_lane=np.array([-1], np.int32),
        )
    else:
        pts = [line]
        types = [MapType.LANE]
        if map_kind == "edges":
            pts += [line + [0, 1.75], line - [0, 1.75]]
            types += [MapType.ROAD_EDGE, MapType.ROAD_EDGE]
        kw = dict(
            map_points=np.concatenate(pts),
            map_offsets=np.arange(len(pts) + 1, dtype=np.int32) * 2,
            map_type=np.array(types, np.int8),
            map_width=np.full(2 * len(pts), np.nan, np.float32),
            lane_speed_limit=np.full(len(pts), np.nan, np.float32),
        )
    return Scene(
        "qa",
        state,
        np.array([[4.0, 2.0], [4.0, 2.0]], np.float32),
        valid,
        np.array([AgentType.VEHICLE] * 2, np.int8),
        0,
        agent_ids=["ego", "car"],
        **kw,
    ).validate()


def test_box_corners_and_point_in_polygon():
    c = box_corners(np.array([1.0, 2.0]), np.array(np.pi / 2), 4.0, 2.0)
    np.testing.assert_allclose(c, [[0, 4], [2, 4], [2, 0], [0, 0]], atol=1e-12)
    poly = np.array([[0, 0], [4, 0], [4, 4], [0, 4]], float)
    inside = points_in_polygons(
        np.array([[1, 1], [5, 1], [3.9, 3.9], [-0.1, 2]]), poly, np.array([0, 4]), np.array([0])
    )
    assert inside.tolist() == [True, False, True, False]


@pytest.mark.parametrize("kind", ["polygon", "centerline"])
@pytest.mark.parametrize("ego_y, off", [(0.0, False), (0.9, False), (1.0, False), (1.2, True), (5.0, True)])
def test_offroad_rule_tolerance(kind, ego_y, off):
    # the box's left side sits at ego_y + 1; the drivable area ends at 1.75 (3.5 m polygon) or 1.85
    # (the default 3.7 m width around a centre line); a corner more than 0.3 m outside is off-road
    flags = ego_offroad(scene(ego_y, kind))
    assert flags.all() if off else not flags.any()


def test_crossing_a_road_edge_is_offroad_even_inside_the_lane_buffer():
    assert not ego_offroad(scene(0.0, "edges")).any()
    assert ego_offroad(scene(0.9, "edges")).all()  # left side at 1.9 crosses the edge at 1.75


def test_overlaps_of_the_logged_boxes():
    qa = check_scene(scene(0.0, other_x=6.0))  # the car at x = 6: the ego box reaches it from step 3
    assert qa.overlap_agents == ("car",) and qa.first_overlap_step == 3 and qa.overlap_steps == 7
    clear = check_scene(scene(0.0, other_x=60.0))
    assert clear.overlap_steps == 0 and clear.offroad_steps == 0 and clear.valid_steps == 10
