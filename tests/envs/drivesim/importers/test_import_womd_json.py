"""Waymo Open Motion per-scene JSON (GPUDrive / PufferDrive layout) -> scenes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from envs.drivesim.importers.common import ImportOptions
from envs.drivesim.importers.womd_json import light_state, read_womd_json
from envs.drivesim.scene import AgentType, LightState, LinkKind, MapType, PolygonType, SceneError
from tests.envs.drivesim.importers.importer_builders import womd_scene, write_json

OPTS = ImportOptions()


def test_womd_scene_known_answers(tmp_path):
    res = read_womd_json(write_json(tmp_path / "womd.json", womd_scene()), OPTS)
    s = res.scene
    assert s.scene_id == "womd-abc123" and s.dataset == "waymo" and s.num_steps == 91
    # the never-valid object is dropped; the ego (sdc_track_index 1) keeps its place
    assert s.agent_ids == ["7", "1"] and s.ego_index == 1
    assert s.agent_type.tolist() == [AgentType.CYCLIST, AgentType.VEHICLE]
    np.testing.assert_allclose(s.agent_size, [[1.9, 0.8], [5.0, 2.1]], rtol=1e-6)
    assert s.extra["origin_xy"] == [-20.0, -30.0]
    ego = s.agent_state[1]
    np.testing.assert_allclose(ego[:, 1], 0.4 * np.arange(91), atol=1e-4)
    np.testing.assert_allclose(ego[:, 2], np.pi / 2, atol=1e-6)
    np.testing.assert_allclose(ego[:, 4], 4.0)
    kinds = sorted(MapType(int(k)).name for k in s.map_type)
    assert kinds == ["LANE", "LANE", "ROAD_EDGE", "ROAD_EDGE"]
    assert s.polygon_type.tolist() == [PolygonType.CROSSWALK]
    lanes = [i for i, _ in s.polylines(MapType.LANE)]
    assert s.lane_links.tolist() == [
        [lanes[0], lanes[1], LinkKind.SUCCESSOR]
    ]  # inferred: 100 ends where 101 starts
    assert s.tl_lane.tolist() == [lanes[0]]
    assert s.tl_state[0, 0] == LightState.GO and s.tl_state[0, -1] == LightState.STOP
    assert res.notes.fixes == [] and any("never valid" in n for n in res.notes.info)


@pytest.mark.parametrize(
    "value, state",
    [
        (4, LightState.STOP),
        (3, LightState.GO),
        (8, LightState.CAUTION),
        (0, LightState.UNKNOWN),
        ("LANE_STATE_ARROW_CAUTION", LightState.CAUTION),
        ("go", LightState.GO),
        ("weird", LightState.UNKNOWN),
        (99, LightState.UNKNOWN),
    ],
)
def test_light_states(value, state):
    assert light_state(value) == state


def set_path(obj, path, value):
    for key in path[:-1]:
        obj = obj[key]
    obj[path[-1]] = value


MALFORMED = {
    "nan_ego": (
        ("objects", 1, "position", 10, "x"),
        float("nan"),
        "the ego (track '1') has non-finite position/heading/velocity on 1 valid step(s), first at step 10",
    ),
    "missing_ego": (("metadata", "sdc_track_index"), 5, "missing ego: metadata.sdc_track_index=5"),
    "objects_dict": (("objects",), {"a": 1}, "'objects' must be a non-empty list"),
    "heading_str": (("objects", 0, "heading"), "north", "objects[0].heading: expected a list of 91 numbers"),
    "length_str": (("objects", 0, "length"), "long", "objects[0].length: expected a number, got str"),
    "short_valid": (("objects", 0, "valid"), [True] * 5, "objects[0].valid: expected a list of 91 booleans"),
    "position_values": (("objects", 0, "position", 3), {"x": "a", "y": 1}, "objects[0].position"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_json_raises_errors_naming_the_problem(tmp_path, name):
    path, value, message = MALFORMED[name]
    data = womd_scene()
    set_path(data, path, value)
    f = tmp_path / f"{name}.json"
    f.write_text(json.dumps(data))  # NaN is written as the NaN token, which json reads back
    with pytest.raises(SceneError) as err:
        read_womd_json(f, OPTS)
    assert str(f) in str(err.value) and message in str(err.value)


def test_truncated_and_non_json_files(tmp_path):
    text = json.dumps(womd_scene())
    (tmp_path / "trunc.json").write_text(text[: len(text) // 2])
    with pytest.raises(SceneError, match="invalid or truncated JSON"):
        read_womd_json(tmp_path / "trunc.json", OPTS)
    (tmp_path / "bin.json").write_bytes(b"\x80\x04\x95")
    with pytest.raises(SceneError, match="not a text file"):
        read_womd_json(tmp_path / "bin.json", OPTS)
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(SceneError, match="expected a JSON object, got list"):
        read_womd_json(tmp_path / "list.json", OPTS)


def test_bad_road_is_dropped_and_reported(tmp_path):
    data = womd_scene()
    data["roads"].append({"geometry": "nowhere", "type": "lane", "id": 999})
    data["tl_states"] = {"100": {"state": ["go"] * 3}}
    res = read_womd_json(write_json(tmp_path / "road.json", data), OPTS)
    assert any("1 malformed road(s) dropped: roads[6]" in f for f in res.notes.fixes)
    assert any("traffic light" in f for f in res.notes.fixes) and len(res.scene.tl_lane) == 0
