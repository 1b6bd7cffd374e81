"""ScenarioNet ScenarioDescription pickles -> scenes: known answers on hand-built files."""

from __future__ import annotations

import copy
import os
import pickle

import numpy as np
import pytest

from envs.drivesim.importers import find_sources
from envs.drivesim.importers.common import ImportOptions
from envs.drivesim.importers.safe_unpickle import UnsafePickleError
from envs.drivesim.importers.scenarionet import RENAULT_ZOE_REAR_AXLE_TO_CENTER, convert, read_scenarionet
from envs.drivesim.scene import AgentType, LightState, LinkKind, MapType, PolygonType, SceneError
from tests.envs.drivesim.importers.importer_builders import nuscenes_like, sd_scene, write_pickle

OPTS = ImportOptions(min_steps=10)


def lane_index(scene, x_start: float, y: float) -> int:
    """Polyline index of the lane starting at (x_start, y) (scene frame)."""
    for i, line in scene.polylines(MapType.LANE):
        if np.allclose(line[0], [x_start, y], atol=1e-3):
            return i
    raise AssertionError(f"no lane starts at {(x_start, y)}")


def test_waymo_style_scene_known_answers(tmp_path):
    res = read_scenarionet(write_pickle(tmp_path / "sd_waymo.pkl", sd_scene()), OPTS)
    s, notes = res.scene, res.notes
    assert s.scene_id == "sd-test-0001" and s.dataset == "waymo" and "Waymo" in s.license
    assert s.num_steps == 30 and s.num_agents == 3 and s.agent_ids == ["car1", "ego", "ped"]
    assert s.ego_index == 1 and s.ego_rear_axle_to_center is None  # Waymo positions are box centres
    # local frame: origin at the ego's first position (100, 50)
    assert s.extra["origin_xy"] == [100.0, 50.0]
    np.testing.assert_allclose(s.agent_state[1, :, 0], 0.5 * np.arange(30), atol=1e-5)
    np.testing.assert_allclose(s.agent_state[1, :, 3], 5.0)
    # the car is invalid for 5 steps, with zero sizes there: the median over valid steps is used
    assert s.agent_valid[0].tolist() == [False] * 5 + [True] * 25
    np.testing.assert_allclose(s.agent_size, [[4.5, 1.9], [4.8, 2.0], [0.6, 0.7]], rtol=1e-6)
    assert s.agent_type.tolist() == [AgentType.VEHICLE, AgentType.VEHICLE, AgentType.PEDESTRIAN]
    np.testing.assert_allclose(s.agent_state[0, 5:, :2], [[20.0, 0.0]] * 25)
    # map: 3 lanes, 2 road edges, 1 painted line; crosswalk polygon; stop sign skipped
    kinds = sorted(MapType(int(k)).name for k in s.map_type)
    assert kinds == ["LANE", "LANE", "LANE", "LANE_BOUNDARY", "ROAD_EDGE", "ROAD_EDGE"]
    assert s.polygon_type.tolist() == [PolygonType.CROSSWALK]
    lane10, lane11, lane12 = lane_index(s, -50, 0), lane_index(s, 50, 0), lane_index(s, 50, 3.6)
    w = s.map_width[s.map_offsets[lane10] : s.map_offsets[lane10 + 1]]
    np.testing.assert_allclose(w, 3.6)  # width (P, 2) = 1.8 left + 1.8 right
    assert np.isnan(s.map_width[s.map_offsets[lane11]])  # no width given
    np.testing.assert_allclose(s.lane_speed_limit[lane10], 10.0, rtol=1e-6)  # 36 km/h
    links = {tuple(r) for r in s.lane_links.tolist()}
    assert (lane10, lane11, LinkKind.SUCCESSOR) in links
    assert (lane10, lane12, LinkKind.LEFT_NEIGHBOR) in links
    assert s.tl_lane.tolist() == [lane10]
    assert s.tl_state[0, :10].tolist() == [LightState.STOP] * 10 and s.tl_state[0, 10:].min() == LightState.GO
    assert notes.fixes == [] and any("stop sign" in n for n in notes.info)


def test_nuscenes_quirks_are_fixed_and_reported(tmp_path):
    res = read_scenarionet(write_pickle(tmp_path / "sd_nu.pkl", nuscenes_like()), OPTS)
    s, notes = res.scene, res.notes
    assert s.dataset == "nuscenes" and "non-commercial" in s.license
    np.testing.assert_allclose(s.agent_size[s.ego_index], [4.08, 1.73], rtol=1e-6)
    assert any("ego length/width swapped (1.73 x 4.08 -> 4.08 x 1.73)" in f for f in notes.fixes)
    # rear-axle poses moved forward to the box centre (heading 0: +x)
    assert s.ego_rear_axle_to_center == pytest.approx(RENAULT_ZOE_REAR_AXLE_TO_CENTER)
    assert s.extra["origin_xy"] == pytest.approx([100 + RENAULT_ZOE_REAR_AXLE_TO_CENTER, 50.0])
    # (x, y, yaw) tuples read as 2-D; a polygon on the first lane only; successor inferred from end points
    lane_a, conn_b = lane_index(s, -51.385, 0.0), lane_index(s, 48.615, 0.0)
    assert s.polygon_type.tolist() == [PolygonType.LANE] and s.polygon_lane.tolist() == [lane_a]
    assert s.lane_links.tolist() == [[lane_a, conn_b, LinkKind.SUCCESSOR]]
    assert np.isnan(s.map_width).all()  # nuScenes gives no widths: the simulator uses 3.7 m
    np.testing.assert_allclose(s.lane_speed_limit[lane_a], 100 / 3.6, rtol=1e-6)
    assert any("inferred" in n for n in notes.info) and "ROAD_EDGE" not in {
        MapType(int(k)).name for k in s.map_type
    }


def test_geometry_as_arrays_or_lists_and_sizes_t_or_t1_give_the_same_scene(tmp_path):
    a = sd_scene()
    b = copy.deepcopy(a)
    for trk in b["tracks"].values():
        st = trk["state"]
        st["position"] = st["position"][:, :2].tolist()  # 2-D list instead of (T, 3) array
        st["length"] = np.asarray(st["length"]).reshape(-1)  # (T,) instead of (T, 1)
        st["heading"] = np.asarray(st["heading"]).reshape(-1, 1)  # (T, 1) instead of (T,)
        st["valid"] = np.asarray(st["valid"], dtype=np.float64)  # float validity
    for feat in b["map_features"].values():
        if "polyline" in feat:
            feat["polyline"] = np.asarray(feat["polyline"], dtype=float)
    sa = convert(a, "a", OPTS).scene
    sb = convert(b, "b", OPTS).scene
    for name in ("agent_state", "agent_size", "agent_valid", "map_points", "map_offsets", "lane_links"):
        np.testing.assert_array_equal(getattr(sa, name), getattr(sb, name), err_msg=name)


def test_ten_hz_check_and_resampling_of_a_5_hz_log(tmp_path):
    sd = sd_scene(T=16)
    t = np.arange(16) * 0.2
    sd["metadata"]["ts"] = t
    for trk in sd["tracks"].values():
        trk["state"]["position"][:, 0] = trk["state"]["position"][0, 0] + 5.0 * t
    sd["dynamic_map_states"]["tl0"]["state"]["object_state"] = ["LANE_STATE_STOP"] * 8 + ["LANE_STATE_GO"] * 8
    res = convert(sd, "five_hz", OPTS)
    s = res.scene
    assert s.num_steps == 31  # 3.0 s at 0.1 s
    np.testing.assert_allclose(np.diff(s.agent_state[s.ego_index, :, 0]), 0.5, atol=1e-4)
    assert any("resampled from a 0.2 s time step" in f for f in res.notes.fixes)
    assert (
        s.tl_state.shape == (1, 31)
        and s.tl_state[0, 0] == LightState.STOP
        and s.tl_state[0, -1] == LightState.GO
    )


def test_ego_invalid_at_the_start_is_trimmed_and_short_gaps_interpolated():
    sd = sd_scene(T=40)
    valid = np.ones(40, dtype=bool)
    valid[:3] = False
    valid[20:23] = False
    st = sd["tracks"]["ego"]["state"]
    st["valid"] = valid
    st["position"][~valid] = 0.0
    res = convert(sd, "gappy", OPTS)
    s = res.scene
    assert s.num_steps == 37 and s.agent_valid[s.ego_index].all()
    np.testing.assert_allclose(np.diff(s.agent_state[s.ego_index, :, 0]), 0.5, atol=1e-4)
    assert any("dropped 3 leading step(s)" in f for f in res.notes.fixes)
    assert any("interpolated 3 step(s)" in f for f in res.notes.fixes)


def test_nan_on_another_agent_is_marked_invalid_and_reported():
    sd = sd_scene()
    sd["tracks"]["ped"]["state"]["position"][7] = np.nan
    res = convert(sd, "nan_ped", OPTS)
    assert not res.scene.agent_valid[2, 7] and res.scene.agent_valid[2, 6]
    assert any("'ped': 1 valid step(s) with non-finite values marked invalid" in f for f in res.notes.fixes)


MALFORMED = {
    "nan_ego": (
        lambda sd: sd["tracks"]["ego"]["state"]["position"].__setitem__((4, 0), np.nan),
        "the ego (track 'ego') has non-finite position/heading/velocity on 1 valid step(s), first at step 4",
    ),
    "missing_ego": (
        lambda sd: sd["tracks"].pop("ego"),
        "missing ego: metadata.sdc_id='ego' is not a key of tracks",
    ),
    "tracks_list": (lambda sd: sd.__setitem__("tracks", [1, 2]), "tracks: expected a dict, got list"),
    "position_str": (
        lambda sd: sd["tracks"]["car1"]["state"].__setitem__("position", "oops"),
        "tracks['car1'].state.position: not numeric",
    ),
    "short_heading": (
        lambda sd: sd["tracks"]["ego"]["state"].__setitem__("heading", np.zeros(7)),
        "ego track: tracks['ego'].state.heading: expected shape (30,) or (30, 1), got [7]",
    ),
    "ego_never_valid": (
        lambda sd: sd["tracks"]["ego"]["state"].__setitem__("valid", np.zeros(30)),
        "the ego (track 'ego') has no valid step",
    ),
    "not_a_scene": (lambda sd: sd.pop("map_features"), "not a ScenarioDescription (no 'map_features'"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_files_raise_errors_naming_the_problem(tmp_path, name):
    sd = sd_scene()
    MALFORMED[name][0](sd)
    path = write_pickle(tmp_path / f"{name}.pkl", sd)
    with pytest.raises(SceneError) as err:
        read_scenarionet(path, OPTS)
    assert str(path) in str(err.value) and MALFORMED[name][1] in str(err.value)


def test_truncated_pickle_and_malicious_pickle(tmp_path):
    good = pickle.dumps(sd_scene(), protocol=4)
    trunc = tmp_path / "trunc.pkl"
    trunc.write_bytes(good[: len(good) // 3])
    with pytest.raises(SceneError, match="not a readable pickle"):
        read_scenarionet(trunc, OPTS)

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)

    sd = sd_scene()
    sd["metadata"]["evil"] = Evil()
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps(sd, protocol=4))
    with pytest.raises(UnsafePickleError, match=r"refused to load global '(posix|os)\.system'"):
        read_scenarionet(evil, OPTS)
    assert not (tmp_path / "pwned").exists()


def test_too_short_scene_is_skipped():
    with pytest.raises(SceneError, match="only 15 usable step"):
        convert(sd_scene(T=15), "short", ImportOptions(min_steps=20))


def test_map_is_cropped_around_the_agents():
    sd = sd_scene()
    sd["map_features"]["far"] = {"type": "LANE_SURFACE_STREET", "polyline": [[5000.0, 0.0], [5100.0, 0.0]]}
    sd["map_features"]["long_edge"] = {
        "type": "ROAD_EDGE_BOUNDARY",
        "polyline": [[x, 45.0] for x in np.linspace(-3000, 3000, 6001)],
    }
    s = convert(sd, "crop", ImportOptions(min_steps=10, map_margin_m=30.0)).scene
    assert s.num_polylines == 7  # the far lane is gone, the long edge kept only near the agents
    edges = [line for _, line in s.polylines(MapType.ROAD_EDGE) if np.allclose(line[:, 1], -5.0)]
    assert len(edges) == 1 and edges[0][:, 0].min() >= -81 and edges[0][:, 0].max() <= 81
    full = convert(sd, "nocrop", ImportOptions(min_steps=10, map_margin_m=None)).scene
    assert full.num_polylines == 8


def test_dataset_index_files_list_the_scenes(tmp_path):
    root = tmp_path / "sn"
    (root / "part_0").mkdir(parents=True)
    a = write_pickle(root / "part_0" / "sd_a.pkl", sd_scene())
    write_pickle(root / "dataset_mapping.pkl", {"sd_a.pkl": "part_0", "sd_missing.pkl": "part_0"})
    write_pickle(root / "dataset_summary.pkl", {"sd_a.pkl": {"id": "x"}, "sd_missing.pkl": {}})
    files, problems = find_sources("scenarionet", [root])
    assert files == [a, root / "part_0" / "sd_missing.pkl"] and problems == []
    with pytest.raises(SceneError, match="dataset_summary.pkl is a ScenarioNet dataset index"):
        read_scenarionet(root / "dataset_summary.pkl", OPTS)
    # without a mapping: the summary lists files beside it; without both: every *.pkl but the index files
    (root / "dataset_mapping.pkl").unlink()
    assert find_sources("scenarionet", [root])[0] == [root / "sd_a.pkl", root / "sd_missing.pkl"]
    (root / "dataset_summary.pkl").unlink()
    write_pickle(root / "dataset_mapping.pkl.bak", {})
    assert find_sources("scenarionet", [root])[0] == [a]
