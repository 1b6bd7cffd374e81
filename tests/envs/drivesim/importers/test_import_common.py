"""Shared importer building blocks: resampling, velocities, input coercion, the map builder."""

from __future__ import annotations

import numpy as np
import pytest

from envs.drivesim.importers.common import (
    ImportOptions,
    MapBuilder,
    as_points,
    as_series,
    median_size,
    resample,
    velocity_from_positions,
)
from envs.drivesim.scene import LightState, LinkKind, MapType, PolygonType, SceneError


def test_resample_interpolates_within_gaps_and_along_the_short_arc():
    t = np.array([0.0, 0.3, 0.6, 1.5, 1.8])
    vals = np.stack([t * 10, np.array([3.0, -3.0, -2.9, 0.0, 0.1])], 1)  # x, heading (wraps near pi)
    out, ok = resample(t, vals, np.ones(5, bool), np.arange(0, 1.85, 0.1), max_gap=0.35, angle_cols=[1])
    # steps between 0.6 and 1.5 s span a 0.9 s gap: invalid; everything else interpolated
    assert ok.tolist() == [True] * 7 + [False] * 8 + [True] * 4
    np.testing.assert_allclose(out[ok, 0], np.arange(0, 1.85, 0.1)[ok] * 10, atol=1e-9)
    # 3.0 -> -3.0 rad goes the short way through pi (0.283 rad), not through 0
    np.testing.assert_allclose(out[1, 1], 3.0 + (2 * np.pi - 6.0) / 3, atol=1e-9)
    np.testing.assert_allclose(out[2, 1], 3.0 + 2 * (2 * np.pi - 6.0) / 3 - 2 * np.pi, atol=1e-9)
    with pytest.raises(SceneError, match="strictly increasing"):
        resample(np.array([0.0, 0.0]), np.zeros((2, 1)), np.ones(2, bool), np.array([0.0]), 1.0)


def test_velocity_from_positions_per_valid_run():
    xy = np.stack([np.arange(6.0) ** 2, np.zeros(6)], 1)
    valid = np.array([True, True, True, False, True, True])
    v = velocity_from_positions(xy, valid, dt=1.0)
    np.testing.assert_allclose(v[:3, 0], [1.0, 2.0, 3.0])  # one-sided, central, one-sided
    np.testing.assert_allclose(v[3:, 0], [0.0, 9.0, 9.0])


def test_input_coercion():
    np.testing.assert_array_equal(as_points([{"x": 1, "y": 2, "z": 3}], "p"), [[1.0, 2.0]])
    np.testing.assert_array_equal(as_points([(1, 2, 0.5), (3, 4, 0.6)], "p"), [[1, 2], [3, 4]])
    for bad, msg in ((["a", "b"], "not a list of numeric points"), ("xy", "expected an array or list"),
                     (np.zeros((2, 4)), r"shape \(P, 2\) or \(P, 3\)"), ([{"x": 1}], r"\{x, y\} objects")):
        with pytest.raises(SceneError, match=msg):
            as_points(bad, "p")
    np.testing.assert_array_equal(as_series(np.ones((3, 1)), 3, "s"), [1, 1, 1])
    with pytest.raises(SceneError, match=r"expected shape \(3,\) or \(3, 1\), got \[3, 2\]"):
        as_series(np.ones((3, 2)), 3, "s")
    valid = np.array([False, True, True, True])  # zeros on the invalid step are ignored
    assert median_size(np.array([0, 4, 5, 4.5]), np.array([0, 2, 2, 2]), valid) == (4.5, 2.0)
    assert median_size(np.zeros(3), np.zeros(3), np.ones(3, bool)) is None


def test_map_builder_packs_crops_links_and_lights():
    b = MapBuilder()
    lane_a = np.array([[0, 0], [10, 0], [10, 0], [20, 0]])
    b.add_line(lane_a, MapType.LANE, key="a", width=3.0, speed_limit=10.0)
    b.add_line(np.array([[20.2, 0.1], [40, 0]]), MapType.LANE, key="b")
    b.add_line(np.array([[20.0, 5.0], [20.0, 5.0]]), MapType.LANE_BOUNDARY)  # degenerate: dropped
    b.add_line(np.array([[x, 9.0] for x in range(-500, 501, 10)]), MapType.ROAD_EDGE)
    b.add_polygon(np.array([[0, -2], [20, -2], [20, 2], [0, 2], [0, -2]]), PolygonType.LANE, lane_key="a")
    b.add_light("a", np.array([1, 3]))
    b.add_light("gone", np.array([1, 3]))
    assert b.infer_successors() == 1 and ("a", "b", LinkKind.SUCCESSOR) in b.links
    assert b.dropped == {"polyline with fewer than 2 distinct points": 1}
    assert b.crop(np.array([-15.0, -15.0]), np.array([45.0, 15.0])) == 0  # the edge is cut, not removed
    m = b.build(num_steps=2)
    assert m["map_offsets"].tolist() == [0, 3, 5, 13]  # duplicate vertex removed; edge cut to x = -20..50
    np.testing.assert_allclose(m["map_points"][5:, 0], np.arange(-20, 51, 10))
    np.testing.assert_allclose(m["map_width"][:3], 3.0)
    assert np.isnan(m["map_width"][3:]).all() and np.isnan(m["lane_speed_limit"][1:]).all()
    assert m["lane_links"].tolist() == [[0, 1, LinkKind.SUCCESSOR]]
    assert m["polygon_offsets"].tolist() == [0, 4] and m["polygon_lane"].tolist() == [0]
    assert m["tl_lane"].tolist() == [0] and m["tl_state"].tolist() == [[LightState.STOP, LightState.GO]]


def test_import_options_are_checked():
    with pytest.raises(ValueError, match="ego_position='middle'"):
        ImportOptions(ego_position="middle")
    with pytest.raises(ValueError, match="min_steps must be >= 2"):
        ImportOptions(min_steps=1)
    with pytest.raises(ValueError, match="map_margin_m must be >= 0"):
        ImportOptions(map_margin_m=-1.0)
