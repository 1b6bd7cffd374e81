"""Builders of small hand-made source files for the importer tests (every format, in its own layout).

Imported by the tests as `tests.envs.drivesim.importers.importer_builders` (pytest puts the repository root on
sys.path: `pythonpath = ["."]`).
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).parent / "fixtures"


def sd_scene(T: int = 30, dataset: str = "waymo", ego_speed: float = 5.0) -> dict:
    """A ScenarioNet ScenarioDescription: the ego drives +x at ``ego_speed`` from (100, 50) on lane
    "10" (straight, y = 50), a car waits 20 m ahead, lane "11" continues lane "10", road edges run
    at y = 46 and 54, a crosswalk, a traffic light on lane "10"."""
    t = np.arange(T) * 0.1
    ego_pos = np.stack([100 + ego_speed * t, np.full(T, 50.0), np.zeros(T)], 1)
    car_valid = np.ones(T)
    car_valid[:5] = 0.0
    car_pos = np.stack([np.full(T, 120.0), np.full(T, 50.0), np.zeros(T)], 1) * car_valid[:, None]
    size = lambda v, valid: np.full((T, 1), v) * valid[:, None]  # noqa: E731 - zeros where invalid
    lane10 = np.stack([np.linspace(50, 150, 101), np.full(101, 50.0)], 1)
    lane11 = np.stack([np.linspace(150, 250, 101), np.full(101, 50.0)], 1)
    return {
        "id": "sd-test-0001",
        "version": "v1.2",
        "length": T,
        "metadata": {
            "id": "sd-test-0001",
            "scenario_id": "sd-test-0001",
            "dataset": dataset,
            "sdc_id": "ego",
            "ts": t,
            "sample_rate": 0.1,
            "coordinate": "right-handed",
            "map": "test-town",
            "number_summary": {"object_types": {"VEHICLE"}},
        },
        "tracks": {
            "car1": {
                "type": "VEHICLE",
                "metadata": {"track_length": T},
                "state": {
                    "position": car_pos,
                    "heading": np.zeros(T),
                    "velocity": np.zeros((T, 2)),
                    "valid": car_valid,
                    "length": size(4.5, car_valid),
                    "width": size(1.9, car_valid),
                    "height": size(1.5, car_valid),
                },
            },
            "ego": {
                "type": "VEHICLE",
                "metadata": {"track_length": T},
                "state": {
                    "position": ego_pos,
                    "heading": np.zeros((T, 1)),
                    "velocity": np.stack([np.full(T, ego_speed), np.zeros(T)], 1),
                    "valid": np.ones(T, dtype=bool),
                    "length": np.full(T, 4.8),
                    "width": np.full(T, 2.0),
                    "height": np.full(T, 1.6),
                },
            },
            "ped": {
                "type": "PEDESTRIAN",
                "metadata": {},
                "state": {
                    "position": np.tile([130.0, 56.0], (T, 1)),
                    "heading": np.full(T, 1.5),
                    "velocity": np.zeros((T, 2)),
                    "valid": np.ones(T),
                    "length": np.full(T, 0.6),
                    "width": np.full(T, 0.7),
                    "height": np.full(T, 1.7),
                },
            },
        },
        "map_features": {
            "10": {
                "type": "LANE_SURFACE_STREET",
                "polyline": lane10,
                "width": np.full((101, 2), 1.8),
                "speed_limit_kmh": 36,
                "exit_lanes": ["11"],
                "entry_lanes": [],
                "left_neighbor": [{"feature_id": "12", "self_start_index": 0}],
                "right_neighbor": [],
            },
            "11": {"type": "LANE_SURFACE_STREET", "polyline": lane11.tolist(), "entry_lanes": ["10"]},
            "12": {"type": "LANE_SURFACE_STREET", "polyline": lane10[::-1] + [0.0, 3.6]},
            "20": {"type": "ROAD_EDGE_BOUNDARY", "polyline": [[50.0, 46.0], [250.0, 46.0]]},
            "21": {
                "type": "ROAD_EDGE_BOUNDARY",
                "polyline": np.array([[50.0, 54.0, 0.2], [250.0, 54.0, 0.2]]),
            },
            "30": {"type": "ROAD_LINE_BROKEN_SINGLE_WHITE", "polyline": [(50.0, 51.8), (250.0, 51.8)]},
            "40": {"type": "CROSSWALK", "polygon": [[140, 46], [144, 46], [144, 54], [140, 54]]},
            "50": {"type": "STOP_SIGN", "position": np.array([149.0, 47.0]), "lane": ["10"]},
        },
        "dynamic_map_states": {
            "tl0": {
                "type": "TRAFFIC_LIGHT",
                "lane": "10",
                "stop_point": np.array([149.0, 50.0, 0.0]),
                "state": {"object_state": ["LANE_STATE_STOP"] * 10 + ["LANE_STATE_ARROW_GO"] * (T - 10)},
            },
        },
    }


def nuscenes_like(T: int = 30) -> dict:
    """nuScenes conversion quirks: swapped ego size 1.73 x 4.08, rear-axle ego positions, valid as
    float64, lanes as lists of (x, y, yaw) tuples, lane polygons on some lanes only, no lane graph,
    no road edges, sets in metadata and no current_time_index."""
    sd = sd_scene(T, dataset="nuscenes")
    ego = sd["tracks"]["ego"]["state"]
    ego["length"], ego["width"] = np.full((T, 1), 1.73), np.full((T, 1), 4.08)
    ego["valid"] = np.ones(T, dtype=np.float64)
    sd["version"] = "nuscenesv1.0-mini"
    sd["metadata"]["object_summary"] = {"ego": {"type": "VEHICLE"}}
    sd["metadata"]["num_object_types"] = {"VEHICLE", "PEDESTRIAN"}
    xs = np.linspace(50, 150, 101)
    sd["map_features"] = {
        "lane-a": {
            "type": "LANE_SURFACE_STREET",
            "polyline": [(x, 50.0, 0.0) for x in xs],
            "polygon": [[50, 48.2], [150, 48.2], [150, 51.8], [50, 51.8]],
            "speed_limit_kmh": 100,
        },
        "conn-b": {"type": "LANE_SURFACE_STREET", "polyline": [(x + 100, 50.0, 0.0) for x in xs]},
        "boundary_0": {
            "type": "ROAD_LINE_SOLID_SINGLE_WHITE",
            "polyline": np.array([[50.0, 48.2], [250.0, 48.2]]),
        },
    }
    sd["dynamic_map_states"] = {}
    return sd


def write_pickle(path: Path, obj, protocol: int = 4) -> Path:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


def womd_scene(T: int = 91) -> dict:
    """A Waymo Open Motion scene in the GPUDrive JSON layout: the ego (index 1) drives +y at 4 m/s
    from (-20, -30) on a lane along x = -20; a cyclist; road edges at x = -24 and -16."""

    def pts(xs, ys):
        return [{"x": float(x), "y": float(y), "z": 0.0} for x, y in zip(xs, ys, strict=True)]

    t = np.arange(T) * 0.1
    return {
        "name": "tfrecord-00000-of-01000_42",
        "scenario_id": "womd-abc123",
        "objects": [
            {
                "position": pts(np.full(T, -17.0), -10 + 2 * t),
                "width": 0.8,
                "length": 1.9,
                "height": 1.7,
                "heading": [np.pi / 2] * T,
                "velocity": pts(np.zeros(T), np.full(T, 2.0)),
                "valid": [True] * T,
                "goalPosition": {"x": -17.0, "y": 10.0, "z": 0.0},
                "type": "cyclist",
                "id": 7,
                "mark_as_expert": False,
            },
            {
                "position": pts(np.full(T, -20.0), -30 + 4 * t),
                "width": 2.1,
                "length": 5.0,
                "height": 1.8,
                "heading": [np.pi / 2] * T,
                "velocity": pts(np.zeros(T), np.full(T, 4.0)),
                "valid": [True] * T,
                "goalPosition": {"x": -20.0, "y": 6.0, "z": 0.0},
                "type": "vehicle",
                "id": 1,
                "mark_as_expert": False,
            },
            {
                "position": pts(np.full(T, -10000.0), np.full(T, -10000.0)),
                "width": 2.0,
                "length": 4.5,
                "height": 1.5,
                "heading": [0.0] * T,
                "velocity": pts(np.zeros(T), np.zeros(T)),
                "valid": [False] * T,
                "type": "vehicle",
                "id": 9,
            },
        ],
        "roads": [
            {
                "geometry": pts(np.full(60, -20.0), np.linspace(-40, 20, 60)),
                "type": "lane",
                "id": 100,
                "map_element_id": 2,
            },
            {
                "geometry": pts(np.full(40, -20.0), np.linspace(20, 60, 40)),
                "type": "lane",
                "id": 101,
                "map_element_id": 2,
            },
            {
                "geometry": pts([-24.0, -24.0], [-40.0, 60.0]),
                "type": "road_edge",
                "id": 200,
                "map_element_id": 15,
            },
            {
                "geometry": pts([-16.0, -16.0], [-40.0, 60.0]),
                "type": "road_edge",
                "id": 201,
                "map_element_id": 15,
            },
            {
                "geometry": pts([-24, -16, -16, -24], [0, 0, 4, 4]),
                "type": "crosswalk",
                "id": 300,
                "map_element_id": 18,
            },
            {"geometry": pts([-18.0], [19.0]), "type": "stop_sign", "id": 400, "map_element_id": 17},
        ],
        "tl_states": {"100": {"state": ["go"] * 50 + ["stop"] * (T - 50)}},
        "metadata": {
            "sdc_track_index": 1,
            "tracks_to_predict": [{"track_index": 0, "difficulty": 1}],
            "objects_of_interest": [],
        },
    }


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


STRAIGHT_XODR = """<?xml version="1.0" standalone="yes"?>
<OpenDRIVE>
  <header revMajor="1" revMinor="6" name="straight"/>
  <road name="main" length="200" id="1" junction="-1">
    <planView><geometry s="0" x="0" y="0" hdg="0" length="200"><line/></geometry></planView>
    <lanes>
      <laneSection s="0">
        <left>
          <lane id="1" type="driving" level="false"><width sOffset="0" a="3.5" b="0" c="0" d="0"/></lane>
        </left>
        <center><lane id="0" type="none"><roadMark sOffset="0" type="solid"/></lane></center>
        <right>
          <lane id="-1" type="driving" level="false"><width sOffset="0" a="3.5" b="0" c="0" d="0"/></lane>
        </right>
      </laneSection>
    </lanes>
  </road>
</OpenDRIVE>
"""


def quat_xyzw(yaw: float) -> list[float]:
    return [0.0, 0.0, float(np.sin(yaw / 2)), float(np.cos(yaw / 2))]


def rig_matrix(x: float, y: float, yaw: float) -> list[list[float]]:
    c, s = float(np.cos(yaw)), float(np.sin(yaw))
    return [[c, -s, 0.0, x], [s, c, 0.0, y], [0.0, 0.0, 1.0, 0.3], [0.0, 0.0, 0.0, 1.0]]


def nurec_members(
    seconds: float = 4.0, rig_hz: float = 30.0, xodr: str | None = STRAIGHT_XODR, quat_order: str = "xyzw"
) -> dict[str, bytes]:
    """Members of a NuRec ``.usdz``: the ego's rear axle drives +x at 5 m/s along y = -1.75 from
    x = 20 (poses at ``rig_hz``); a car (CONTROLLABLE, 10 Hz, yaw 0.5) 30 m ahead; a static cone;
    a track duplicating the ego; the straight two-lane road of ``STRAIGHT_XODR``."""
    t0 = 1_700_000_000_000_000
    n = int(seconds * rig_hz) + 1
    ts = [t0 + int(round(i * 1e6 / rig_hz)) for i in range(n)]
    rig = {
        "world_to_nre": {"matrix": np.eye(4).tolist()},
        "camera_calibrations": {"cam0": {"logical_sensor_name": "camera_front_wide_120fov"}},
        "rig_trajectories": [
            {
                "sequence_id": "seq-1",
                "T_rig_world_timestamps_us": ts,
                "T_rig_worlds": [rig_matrix(20 + 5 * (t - t0) * 1e-6, -1.75, 0.0) for t in ts],
                "cameras_frame_timestamps_us": {"cam0": [[ts[0], ts[0] + 1000]]},
                "rig_bbox": {"centroid": [1.5, 0.0, 0.8], "dim": [4.8, 2.0, 1.6], "rot": [0.0, 0.0, 0.0]},
            }
        ],
        "T_world_base": np.eye(4).tolist(),
    }
    k = int(seconds * 10) + 1
    tt = [t0 + i * 100_000 for i in range(k)]
    q = quat_xyzw(0.5)
    if quat_order == "wxyz":
        q = [q[3], q[0], q[1], q[2]]
    tracks = {
        "seq-1": {
            "tracks_data": {
                "tracks_id": ["car-1", "cone-1", "egodup"],
                "tracks_label_class": ["automobile", "traffic_cone", "automobile"],
                "tracks_flags": [["CONTROLLABLE"], [], ["CONTROLLABLE"]],
                "tracks_timestamps_us": [tt, [t0, t0 + 500_000], tt],
                "tracks_poses": [
                    [[60 + 2 * i * 0.1, -1.75, 0.5] + q for i in range(k)],
                    [[80.0, 2.0, 0.2, 0.0, 0.0, 0.0, 1.0], [80.2, 2.0, 0.2, 0.0, 0.0, 0.0, 1.0]],
                    [[20 + 1.5 + 5 * i * 0.1, -1.75, 0.8, 0.0, 0.0, 0.0, 1.0] for i in range(k)],
                ],
            },
            "cuboidtracks_data": {"cuboids_dims": [[4.5, 1.9, 1.5], [0.4, 0.4, 0.8], [4.8, 2.0, 1.6]]},
        }
    }
    meta = (
        "scene_id: clipgt-0f1e2d3c\nversion_string: nre-1.2\ntraining_date: '2025-01-01'\n"
        "dataset_hash: abc\nuuid: 0f1e2d3c\nis_resumable: false\n"
        "sensors: {camera_ids: [cam0], lidar_ids: []}\nlogger: {name: test, run_id: '1', run_url: ''}\n"
        f"time_range: {{start: {ts[0]}, end: {ts[-1]}}}\n"
    )
    members = {
        "metadata.yaml": meta.encode(),
        "rig_trajectories.json": json.dumps(rig).encode(),
        "sequence_tracks.json": json.dumps(tracks).encode(),
    }
    if xodr is not None:
        members["map.xodr"] = xodr.encode()
    return members


def write_usdz(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path
