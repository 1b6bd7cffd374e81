"""Known answers for the per-scene spatial precomputation (drivable-area SDF, segment and nearest
grids) and the torch samplers that read it every tick."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from envs.drivesim import geometry, raster
from envs.drivesim.scene import MapType, PolygonType, Scene

LANE = MapType.LANE
EDGE = MapType.ROAD_EDGE


def make_scene(lines=(), types=(), widths=None, polygons=(), ego_xy=(10.0, 0.0), scene_id="t") -> Scene:
    """A one-agent scene with the given polylines (``[P_i, 2]``), their MapTypes, per-vertex widths
    (NaN = unknown) and lane polygons."""
    lines = [np.asarray(p, np.float32) for p in lines]
    pts = np.concatenate(lines) if lines else np.zeros((0, 2), np.float32)
    polys = [np.asarray(p, np.float32) for p in polygons]
    state = np.zeros((1, 2, 5), np.float32)
    state[0, :, 0:2] = ego_xy
    return Scene(
        scene_id=scene_id, agent_state=state, agent_size=np.array([[4.5, 1.9]], np.float32),
        agent_valid=np.ones((1, 2), bool), agent_type=np.array([1], np.int8), ego_index=0,
        map_points=pts, map_offsets=np.cumsum([0] + [len(p) for p in lines]).astype(np.int32),
        map_type=np.asarray(types, np.int8),
        map_width=np.full(len(pts), np.nan, np.float32) if widths is None else np.asarray(widths, np.float32),
        lane_speed_limit=np.full(len(lines), np.nan, np.float32),
        polygon_points=np.concatenate(polys) if polys else np.zeros((0, 2), np.float32),
        polygon_offsets=np.cumsum([0] + [len(p) for p in polys]).astype(np.int32),
        polygon_type=np.full(len(polys), PolygonType.LANE, np.int8),
        polygon_lane=np.full(len(polys), -1, np.int32),
    ).validate()


def straight_lane(n: int = 101) -> np.ndarray:
    """Centre line along the x axis from 0 to 100 m, a vertex per metre."""
    return np.stack([np.linspace(0.0, 100.0, n), np.zeros(n)], -1)


def corners_np(x: float, y: float, yaw: float = 0.0, length: float = 4.5, width: float = 1.9) -> np.ndarray:
    t = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    return geometry.box_corners(t([x, y]), t(yaw), t(length), t(width)).numpy()


def sdf_both(r: raster.DrivableRaster, pts: np.ndarray) -> np.ndarray:
    """Sample with the numpy method and the torch sampler; check they agree; return the values."""
    a = r.sample(pts)
    sdf, origin = raster.stack_rasters([r])
    q = torch.from_numpy(pts.reshape(1, -1, 2).astype(np.float32))
    b = raster.sample_sdf(torch.from_numpy(sdf), torch.from_numpy(origin), r.resolution,
                          torch.zeros(1, dtype=torch.long), q)
    np.testing.assert_allclose(a.reshape(-1), b.numpy().reshape(-1), atol=1e-4)
    return a


# ---- bounds -------------------------------------------------------------------------------------
def test_scene_bounds_cover_map_polygons_and_agents():
    s = make_scene([[[0, 0], [10, 5]]], [LANE], polygons=[[[20, -3], [22, -3], [22, 1]]], ego_xy=(-4.0, 7.0))
    assert raster.scene_bounds(s, margin=1.0) == (-5.0, -4.0, 23.0, 8.0)
    with pytest.raises(ValueError, match="margin"):
        raster.scene_bounds(s, margin=-1.0)


# ---- drivable area ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lane_raster() -> raster.DrivableRaster:
    """One straight 3.7 m lane (width unknown in the data -> the 3.7 m default)."""
    return raster.build_drivable_raster(make_scene([straight_lane()], [LANE]))


def test_box_inside_the_lane(lane_raster):
    vals = sdf_both(lane_raster, corners_np(50.0, 0.0))
    np.testing.assert_allclose(vals, -0.9, atol=2e-3)          # corners 0.95 m off the centre line
    assert lane_raster.origin == (-30.0, -30.0) and lane_raster.resolution == 0.25


def test_box_touching_the_edge(lane_raster):
    # left corners 0.2 m beyond the lane edge at y = 1.85; right corners inside
    vals = sdf_both(lane_raster, corners_np(50.0, 1.85 + 0.2 - 0.95))
    np.testing.assert_allclose(vals[[0, 3]], 0.2, atol=5e-3)
    np.testing.assert_allclose(vals[[1, 2]], -1.7, atol=5e-3)
    assert vals.max() < 0.3                                     # not off-road at the 0.3 m threshold


def test_box_fully_off_the_road(lane_raster):
    vals = sdf_both(lane_raster, corners_np(50.0, 6.0))
    assert (vals > 0.3).all()
    np.testing.assert_allclose(vals[[1, 2]], 6.0 - 0.95 - 1.85, atol=0.05)  # 3.2 m: far field
    # just beyond the round cap at the lane's start: exact within the 0.5 m band
    np.testing.assert_allclose(sdf_both(lane_raster, np.array([[-1.85 - 0.4, 0.0], [-1.0, 0.0]])),
                               [0.4, -0.85], atol=5e-3)


def test_exact_values_across_the_lane(lane_raster):
    y = np.linspace(-2.3, 2.3, 47)
    vals = sdf_both(lane_raster, np.stack([np.full_like(y, 37.3), y], -1))
    want = np.abs(y) - 1.85
    near = np.abs(want) <= 0.5                                  # the analytic band
    np.testing.assert_allclose(vals[near], want[near], atol=5e-3)
    np.testing.assert_allclose(vals, want, atol=0.3)
    assert np.array_equal(vals < 0, want < 0)


def test_lane_polygon_only_scene():
    poly = [[0, -1.85], [100, -1.85], [100, 1.85], [0, 1.85]]
    r = raster.build_drivable_raster(make_scene(polygons=[poly]))
    np.testing.assert_allclose(sdf_both(r, corners_np(50.0, 0.0)), -0.9, atol=5e-3)
    vals = sdf_both(r, corners_np(50.0, 1.85 + 0.2 - 0.95))
    np.testing.assert_allclose(vals[[0, 3]], 0.2, atol=5e-3)
    assert (sdf_both(r, corners_np(50.0, 6.0)) > 0.3).all()
    # the polygon's square corner (no round cap): 0.3 m beyond the end on the axis, and diagonally
    # (bilinear sampling of the circular field around the corner adds ~res^2 / 8 / 0.4 m = 0.02 m)
    vals = sdf_both(r, np.array([[100.3, 0.0], [100.3, 2.15]]))
    np.testing.assert_allclose(vals, [0.3, 0.3 * math.sqrt(2)], atol=0.03)


def test_lanes_with_widths_and_road_edges():
    """Waymo-style map: lane centre lines with their widths (3.0 m here) plus road edges, which do
    not widen the drivable area."""
    lane = straight_lane()
    edges = [np.stack([lane[:, 0], np.full(len(lane), y)], -1) for y in (2.5, -2.5)]
    s = make_scene([lane, *edges], [LANE, EDGE, EDGE],
                   widths=np.concatenate([np.full(len(lane), 3.0), np.full(2 * len(lane), np.nan)]))
    r = raster.build_drivable_raster(s)
    np.testing.assert_allclose(sdf_both(r, np.array([[50.0, 1.7], [50.0, 0.0], [50.0, -1.4]])),
                               [0.2, -1.5, -0.1], atol=5e-3)


def test_two_lanes_seam_is_not_a_boundary():
    lanes = [straight_lane(), straight_lane() + [0.0, 3.7]]
    r = raster.build_drivable_raster(make_scene(lanes, [LANE, LANE]))
    # the road spans y in [-1.85, 5.55]; the seam between the lanes lies at y = 1.85
    vals = sdf_both(r, np.array([[50.0, 1.85], [50.0, 5.25], [50.0, -1.6], [50.0, 5.75]]))
    assert vals[0] < -3.2                                       # 3.7 m deep (far field, ~0.5 m)
    np.testing.assert_allclose(vals[1:], [-0.3, -0.25, 0.2], atol=5e-3)


def test_curved_lanes_match_brute_force():
    """Random arcs of varying width: every cell within 0.5 m outside the area has the exact
    distance, and the sign is right everywhere."""
    rng = np.random.default_rng(0)
    lines, widths = [], []
    for _ in range(3):
        c, rad, th0 = rng.uniform(-15, 15, 2), rng.uniform(15, 50), rng.uniform(0, 2 * np.pi)
        th = np.linspace(th0, th0 + rng.uniform(0.4, 1.2), 25)
        lines.append(np.stack([c[0] + rad * np.cos(th), c[1] + rad * np.sin(th)], -1))
        widths.append(3.5 + 0.2 * np.sin(np.arange(25) / 3))
    s = make_scene(lines, [LANE] * 3, np.concatenate(widths), ego_xy=lines[0][0])
    r = raster.build_drivable_raster(s)
    h, w = r.shape
    ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    p = np.stack([r.origin[0] + jj.ravel() * r.resolution, r.origin[1] + ii.ravel() * r.resolution], -1)
    a = np.concatenate([ln[:-1] for ln in lines])
    b = np.concatenate([ln[1:] for ln in lines])
    ra = np.concatenate([wd[:-1] for wd in widths]) / 2
    rb = np.concatenate([wd[1:] for wd in widths]) / 2
    near = np.min(np.linalg.norm(p[:, None] - np.concatenate(lines)[None, ::3], axis=-1), axis=1) < 6
    p = p[near]
    ab, ap = b - a, p[:, None] - a[None]
    t = np.clip((ap * ab).sum(-1) / (ab * ab).sum(-1), 0, 1)
    want = (np.linalg.norm(ap - t[..., None] * ab, axis=-1) - (ra + t * (rb - ra))).min(1)
    got = r.sdf.reshape(-1)[near]
    band = (want > 0) & (want <= 0.5)
    assert band.sum() > 1000
    np.testing.assert_allclose(got[band], want[band], atol=3e-3)
    assert np.array_equal(got[np.abs(want) > 0.01] > 0, want[np.abs(want) > 0.01] > 0)


def test_no_lanes_is_drivable_everywhere_with_a_warning():
    s = make_scene([straight_lane()], [EDGE])
    with pytest.warns(raster.NoDrivableAreaWarning, match="no lane"):
        r = raster.build_drivable_raster(s)
    assert (r.sdf == -raster.FAR).all()


def test_dtype_and_coarse_resolution_options():
    s = make_scene([straight_lane()], [LANE])
    r16 = raster.build_drivable_raster(s, dtype=np.float16)
    assert r16.sdf.dtype == np.float16
    np.testing.assert_allclose(r16.sample(np.array([[50.0, 2.05]])), [0.2], atol=2e-3)
    r1 = raster.build_drivable_raster(s, resolution=1.0)        # coarse grid == fine grid
    np.testing.assert_allclose(r1.sample(np.array([[50.0, 2.05], [50.0, 0.0]])), [0.2, -1.85], atol=5e-3)
    with pytest.raises(ValueError, match="resolution"):
        raster.build_drivable_raster(s, resolution=0.0)


def test_sample_sdf_matches_numpy_raster_across_scenes():
    r0 = raster.build_drivable_raster(make_scene([straight_lane()], [LANE]))
    arc = np.stack([20 * np.cos(np.linspace(0, 2, 30)), 20 * np.sin(np.linspace(0, 2, 30))], -1)
    r1 = raster.build_drivable_raster(make_scene([arc], [LANE], ego_xy=(20.0, 0.0)))
    sdf, origin = raster.stack_rasters([r0, r1])
    assert sdf.shape == (2, max(r0.shape[0], r1.shape[0]), max(r0.shape[1], r1.shape[1]))
    assert sdf[0, r0.shape[0]:].min() == raster.FAR             # padding reads as far outside
    gen = np.random.default_rng(1)
    pts = gen.uniform(-50, 140, size=(2, 500, 2)).astype(np.float32)
    out = raster.sample_sdf(torch.from_numpy(sdf), torch.from_numpy(origin), 0.25, torch.tensor([0, 1]),
                            torch.from_numpy(pts)).numpy()
    for s, r in enumerate((r0, r1)):
        want = r.sample(pts[s])
        on = want < raster.FAR                                  # on the scene's own raster
        np.testing.assert_allclose(out[s][on], want[on], atol=1e-4)
        # off it: the padding (bilinear with the last real cells within half a cell of its edge)
        assert (out[s][~on] > 20).all() and (out[s][~on] == raster.FAR).mean() > 0.9
    sdf16, _ = raster.stack_rasters([r0, r1], dtype=np.float16)          # half the memory
    assert sdf16.dtype == np.float16 and sdf16[0, -1, -1] == raster.FAR
    half = raster.sample_sdf(torch.from_numpy(sdf16), torch.from_numpy(origin), 0.25,
                             torch.tensor([0, 1]), torch.from_numpy(pts))
    assert half.dtype == torch.float32
    np.testing.assert_allclose(half.numpy(), out, rtol=2e-3, atol=2e-3)
    with pytest.raises(ValueError, match="resolution"):
        raster.stack_rasters([r0, raster.build_drivable_raster(make_scene([straight_lane()], [LANE]), 0.5)])


# ---- segment grids and road edges ---------------------------------------------------------------
def square_distance(seg: np.ndarray, x0: float, y0: float, size: float) -> float:
    """Reference: distance from a densely sampled segment to a square (sampling error <= 1 mm)."""
    t = np.linspace(0, 1, 2001)[:, None]
    p = seg[:2] + t * (seg[2:] - seg[:2])
    d = np.maximum(np.maximum([x0, y0] - p, p - [x0 + size, y0 + size]), 0)
    return float(np.hypot(d[:, 0], d[:, 1]).min())


def test_segment_grid_matches_brute_force():
    rng = np.random.default_rng(2)
    segs = np.concatenate([rng.uniform(0, 60, (40, 2)), np.zeros((40, 2))], 1)
    segs[:, 2:] = segs[:, :2] + rng.normal(0, 8, (40, 2))
    grid = raster.build_segment_grid(segs, (0.0, 0.0, 60.0, 50.0), cell=10.0, margin=4.0)
    assert grid.cells.shape[:2] == (5, 6) and grid.origin == (0.0, 0.0)
    for gy in range(5):
        for gx in range(6):
            listed = set(grid.cells[gy, gx][grid.cells[gy, gx] >= 0].tolist())
            d = np.array([square_distance(s, gx * 10.0, gy * 10.0, 10.0) for s in segs])
            assert set(np.nonzero(d <= 4.0 - 1e-3)[0]) <= listed
            assert listed <= set(np.nonzero(d <= 4.0 + 1e-3)[0])


def test_segment_grid_cap_keeps_nearest_and_warns():
    segs = np.array([[1.0 + i, 0.0, 1.0 + i, 10.0] for i in range(8)])    # vertical lines x = 1..8
    with pytest.warns(UserWarning, match="cap=3"):
        grid = raster.build_segment_grid(segs, (0.0, 0.0, 10.0, 10.0), cell=10.0, margin=0.0, cap=3)
    assert grid.cells.shape == (1, 1, 3)
    assert sorted(grid.cells[0, 0].tolist()) == [3, 4, 5]                  # x = 4, 5, 6: nearest to 5
    empty = raster.build_segment_grid(np.zeros((0, 4)), (0.0, 0.0, 25.0, 5.0))
    assert empty.cells.shape == (1, 3, 1) and (empty.cells == -1).all()


def test_road_edge_crossing_detected():
    lane = straight_lane()
    edge = np.stack([lane[:, 0], np.full(len(lane), 3.0)], -1)            # a curb at y = 3
    s = make_scene([lane, edge, [[60.0, -0.3], [60.5, 0.3]]], [LANE, EDGE, EDGE])
    segs = raster.road_edge_segments(s)
    assert segs.shape == (100 + 1, 4)
    bounds = raster.scene_bounds(s, margin=30.0)
    grid = raster.build_road_edge_grid(s, bounds)
    cells = torch.from_numpy(raster.stack_grids([grid]))
    origin = torch.tensor([bounds[:2]], dtype=torch.float32)
    centres = torch.tensor([[50.0, 2.5], [50.0, 0.0], [60.0, 0.0], [30.0, 1.95], [30.0, 2.06]])
    corners = geometry.box_corners(centres, torch.zeros(5), torch.full((5,), 4.5), torch.full((5,), 1.9))
    scene_idx = torch.zeros(5, dtype=torch.long)
    idx = raster.lookup_cells(cells, origin, grid.cell, scene_idx, centres)
    table = torch.from_numpy(segs)
    # over the curb, clear, a short edge inside the box, 0.1 m short of the curb, just over it
    want = [True, False, True, False, True]
    assert raster.box_crosses_segments(corners, idx, table).tolist() == want
    assert raster.box_crosses_segments(corners, idx, table.expand(5, -1, -1)).tolist() == want
    assert raster.box_crosses_segments(corners, idx, table[None], scene_idx=scene_idx).tolist() == want
    assert not raster.box_crosses_segments(corners, torch.full_like(idx, -1), table).any()


def test_lookup_cells_and_stacked_grids():
    a = np.arange(2 * 3 * 2, dtype=np.int32).reshape(2, 3, 2)
    b = np.arange(4 * 1 * 3, dtype=np.int32).reshape(4, 1, 3) + 100
    stacked = raster.stack_grids([a, raster.NearestGrid(b, (0.0, 0.0), 10.0)])
    assert stacked.shape == (2, 4, 3, 3)
    assert (stacked[0, 2:] == -1).all() and (stacked[0, :, :, 2] == -1).all()
    assert (stacked[1, :, 1:] == -1).all()
    cells = torch.from_numpy(stacked)
    origin = torch.tensor([[100.0, 200.0], [0.0, 0.0]])
    xy = torch.tensor([[125.0, 215.0], [5.0, 35.0], [99.0, 200.0], [5.0, 45.0], [15.0, 5.0]])
    out = raster.lookup_cells(cells, origin, 10.0, torch.tensor([0, 1, 0, 1, 1]), xy)
    assert out.tolist() == [[a[1, 2, 0], a[1, 2, 1], -1], b[3, 0].tolist(), [-1] * 3, [-1] * 3, [-1] * 3]


def test_nearest_grid_matches_brute_force():
    rng = np.random.default_rng(3)
    pts = rng.uniform(0, 80, (500, 2))
    bounds = (-10.0, 0.0, 90.0, 75.0)
    grid = raster.build_nearest_grid(pts, bounds, cell=10.0, k=16)
    assert grid.cells.shape == (8, 10, 16) and grid.cells.dtype == np.int32
    for gy in range(8):
        for gx in range(10):
            centre = np.array([-10.0 + (gx + 0.5) * 10.0, (gy + 0.5) * 10.0])
            d = np.linalg.norm(pts - centre, axis=1)
            got = d[grid.cells[gy, gx]]
            np.testing.assert_allclose(got, np.sort(d)[:16], atol=1e-9)    # the 16 nearest, sorted
    few = raster.build_nearest_grid(pts[:5], bounds, cell=10.0, k=8)
    assert (few.cells[..., 5:] == -1).all() and (np.sort(few.cells[..., :5], -1) == np.arange(5)).all()
    none = raster.build_nearest_grid(np.zeros((0, 2)), bounds, k=4)
    assert (none.cells == -1).all()


def test_bad_inputs_are_reported():
    with pytest.raises(ValueError, match="bounds"):
        raster.build_segment_grid(np.zeros((1, 4)), (0.0, 0.0, -1.0, 5.0))
    with pytest.raises(ValueError, match="non-finite"):
        raster.build_nearest_grid(np.array([[np.nan, 0.0]]), (0.0, 0.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="segments must be"):
        raster.box_crosses_segments(torch.zeros(1, 4, 2), torch.zeros(1, 1, dtype=torch.long), torch.zeros(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")               # a normal scene warns about nothing
        raster.build_drivable_raster(make_scene([straight_lane()], [LANE]))
