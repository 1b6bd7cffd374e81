"""AlpaSim / NuRec .usdz archives -> scenes, on small archives built in the NuRec layout."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from envs.drivesim.importers.common import ImportOptions
from envs.drivesim.importers.nurec import read_nurec, yaw_from_quaternion
from envs.drivesim.scene import AgentType, MapType, PolygonType, SceneError
from tests.envs.drivesim.importers.importer_builders import nurec_members, write_usdz

OPTS = ImportOptions()


def test_nurec_archive_known_answers(tmp_path):
    res = read_nurec(write_usdz(tmp_path / "clip.usdz", nurec_members()), OPTS)
    s, notes = res.scene, res.notes
    assert s.scene_id == "clipgt-0f1e2d3c" and s.dataset == "nurec" and s.num_steps == 41
    assert s.extra["uuid"] == "0f1e2d3c" and s.extra["map_source"] == "xodr"
    # ego box from rig_bbox: centre 1.5 m ahead of the rear axle; the track duplicating the ego is dropped
    assert s.agent_ids == ["ego", "car-1", "cone-1"] and s.ego_index == 0
    assert s.ego_rear_axle_to_center == pytest.approx(1.5)
    np.testing.assert_allclose(s.agent_size, [[4.8, 2.0], [4.5, 1.9], [0.4, 0.4]], rtol=1e-6)
    assert s.extra["origin_xy"] == pytest.approx([21.5, -1.75])
    ego = s.agent_state[0]
    np.testing.assert_allclose(ego[:, 0], 0.5 * np.arange(41), atol=1e-4)  # 30 Hz rig poses -> 0.1 s
    np.testing.assert_allclose(ego[:, 3], 5.0, atol=1e-3)
    assert any("resampled" in n for n in notes.info)
    assert any("'egodup' follows the ego" in f for f in notes.fixes)
    # actors: yaw from the quaternion, velocity from positions; the static cone is held for the whole scene
    car = s.agent_state[1]
    np.testing.assert_allclose(car[:, 2], 0.5, atol=1e-6)
    np.testing.assert_allclose(car[:, 3], 2.0, atol=1e-3)
    assert s.agent_valid.all()
    np.testing.assert_allclose(s.agent_state[2, :, :2], [[80.1 - 21.5, 3.75]] * 41, atol=1e-4)
    assert s.agent_type.tolist() == [AgentType.VEHICLE, AgentType.VEHICLE, AgentType.OTHER]
    # map: the two-lane road of map.xodr, in the scene frame
    lane_rows = [line for _, line in s.polylines(MapType.LANE)]
    assert (
        len(lane_rows) == 2
        and len(s.polygon_type) == 2
        and set(s.polygon_type.tolist()) == {PolygonType.LANE}
    )
    ys = sorted(float(line[0, 1]) for line in lane_rows)
    assert ys == pytest.approx([0.0, 3.5])  # lane centres at y = -1.75 and +1.75, minus the origin's y


def test_quaternion_orders_and_yaw():
    q = np.array([0.0, 0.0, math.sin(0.35), math.cos(0.35)])
    assert yaw_from_quaternion(q, "xyzw") == pytest.approx(0.7)
    assert yaw_from_quaternion(np.roll(q, 1), "wxyz") == pytest.approx(0.7)


def test_wxyz_archives_need_the_option(tmp_path):
    path = write_usdz(tmp_path / "wxyz.usdz", nurec_members(quat_order="wxyz"))
    s = read_nurec(path, ImportOptions(quaternion_order="wxyz")).scene
    np.testing.assert_allclose(s.agent_state[1, :, 2], 0.5, atol=1e-6)
    wrong = read_nurec(path, OPTS).scene
    assert not np.allclose(wrong.agent_state[1, :, 2], 0.5, atol=1e-3)


def test_world_to_base_transform_places_the_map(tmp_path):
    members = nurec_members()
    rig = json.loads(members["rig_trajectories.json"])
    # the map's base frame is 1000 m west of the world origin: lanes move with it
    rig["T_world_base"] = [[1, 0, 0, -1000.0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    rig["rig_trajectories"][0]["T_rig_worlds"] = [
        [[r[0][0], r[0][1], r[0][2], r[0][3] - 1000.0]] + r[1:]
        for r in rig["rig_trajectories"][0]["T_rig_worlds"]
    ]
    members["rig_trajectories.json"] = json.dumps(rig).encode()
    tracks = json.loads(members["sequence_tracks.json"])
    for poses in tracks["seq-1"]["tracks_data"]["tracks_poses"]:
        for p in poses:
            p[0] -= 1000.0
    members["sequence_tracks.json"] = json.dumps(tracks).encode()
    s = read_nurec(write_usdz(tmp_path / "based.usdz", members), OPTS).scene
    assert s.extra["origin_xy"] == pytest.approx([-978.5, -1.75])
    starts = sorted(float(line[:, 0].min()) for _, line in s.polylines(MapType.LANE))
    assert starts == pytest.approx([-21.5, -21.5])  # the road starts at world x = -1000


def test_parquet_vector_map_best_effort(tmp_path):
    members = nurec_members(xodr=None)
    table = pa.table(
        {
            "id": [0, 1],
            "geometry": [[[0.0, -1.75, 0.0], [200.0, -1.75, 0.0]], [[200.0, 1.75, 0.0], [0.0, 1.75, 0.0]]],
        }
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    members["map_data/lane_centerlines.parquet"] = buf.getvalue()
    edges = io.BytesIO()
    pq.write_table(pa.table({"geometry": [[[0.0, -3.5], [200.0, -3.5]]]}), edges)
    members["map_data/road_boundaries.parquet"] = edges.getvalue()
    members["map_data/unknown_layer.parquet"] = buf.getvalue()
    res = read_nurec(write_usdz(tmp_path / "pq.usdz", members), OPTS)
    s = res.scene
    assert s.extra["map_source"] == "parquet"
    assert sorted(MapType(int(k)).name for k in s.map_type) == ["LANE", "LANE", "ROAD_EDGE"]
    assert any("unverified" in n for n in res.notes.info) and any(
        "unknown_layer" in n for n in res.notes.info
    )


def test_missing_rig_bbox_is_fixed_with_defaults(tmp_path):
    members = nurec_members()
    rig = json.loads(members["rig_trajectories.json"])
    rig["rig_trajectories"][0]["rig_bbox"] = None
    members["rig_trajectories.json"] = json.dumps(rig).encode()
    res = read_nurec(write_usdz(tmp_path / "nobox.usdz", members), OPTS)
    assert res.scene.agent_size[0].tolist() == pytest.approx([4.8, 2.0])
    assert res.scene.ego_rear_axle_to_center == pytest.approx(0.3 * 4.8)
    assert any("rig_bbox is missing" in f for f in res.notes.fixes)


def _edit(members, name, fn):
    obj = json.loads(members[name])
    fn(obj)
    members[name] = json.dumps(obj).encode()
    return members


MALFORMED = {
    "no_rig": (lambda m: m.pop("rig_trajectories.json"), "the archive has no rig_trajectories.json"),
    "empty_rig": (
        lambda m: _edit(m, "rig_trajectories.json", lambda r: r.__setitem__("rig_trajectories", [])),
        "missing ego: rig_trajectories is empty",
    ),
    "nan_pose": (
        lambda m: _edit(
            m,
            "rig_trajectories.json",
            lambda r: r["rig_trajectories"][0]["T_rig_worlds"][3][0].__setitem__(3, float("nan")),
        ),
        "non-finite time stamps or poses",
    ),
    "bad_matrix": (
        lambda m: _edit(
            m,
            "rig_trajectories.json",
            lambda r: r["rig_trajectories"][0].__setitem__("T_rig_worlds", [[1, 2, 3]] * 121),
        ),
        "expected 4x4 matrices",
    ),
    "no_map": (lambda m: m.pop("map.xodr"), "no usable map"),
    "bad_json": (
        lambda m: m.__setitem__("sequence_tracks.json", b'{"seq-1": '),
        "sequence_tracks.json is not valid JSON",
    ),
    "bad_yaml": (
        lambda m: m.__setitem__("metadata.yaml", b"scene_id: [unclosed"),
        "metadata.yaml is not valid YAML",
    ),
    "bad_xodr": (lambda m: m.__setitem__("map.xodr", b"<OpenDRIVE><road"), "not valid XML"),
    "tracks_mismatch": (
        lambda m: _edit(m, "sequence_tracks.json", lambda t: t["seq-1"]["tracks_data"]["tracks_id"].pop()),
        "tracks_data lists and cuboids_dims must all have 2 entries",
    ),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_archives_raise_errors_naming_the_problem(tmp_path, name):
    members = nurec_members()
    MALFORMED[name][0](members)
    path = write_usdz(tmp_path / f"{name}.usdz", members)
    with pytest.raises(SceneError) as err:
        read_nurec(path, OPTS)
    assert str(path) in str(err.value) and MALFORMED[name][1] in str(err.value)


def test_truncated_archive(tmp_path):
    full = write_usdz(tmp_path / "full.usdz", nurec_members()).read_bytes()
    (tmp_path / "trunc.usdz").write_bytes(full[: len(full) // 2])
    with pytest.raises(SceneError, match="not a readable zip archive"):
        read_nurec(tmp_path / "trunc.usdz", OPTS)
