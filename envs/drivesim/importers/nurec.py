"""AlpaSim / NuRec scene archives (``.usdz`` zip files) -> scenes.

Read from the archive (key names as AlpaSim's reference loader reads them, see
``/work/shared/specs/scene_formats.md``):

- ``metadata.yaml``: ``scene_id`` (``clipgt-<uuid>``), ``uuid``, ``version_string``, ``time_range``;
- ``rig_trajectories.json``: the ego log. ``rig_trajectories[0]`` holds ``T_rig_world_timestamps_us``
  and ``T_rig_worlds`` (4x4 rig -> world; the rig origin is the rear-axle centre) and ``rig_bbox``
  (``centroid`` of the vehicle box in the rig frame, ``dim`` = length, width, height), so the box
  centre is the rig pose moved by the centroid and ``rear_axle_to_center`` = ``centroid[0]``.
  ``T_world_base`` (top level, or in the trajectory) places the OpenDRIVE map in the world frame;
- ``sequence_tracks.json``: the other actors, ``{sequence_id: {tracks_data: {tracks_id,
  tracks_label_class, tracks_flags, tracks_timestamps_us, tracks_poses}, cuboidtracks_data:
  {cuboids_dims}}}``; poses are ``[x, y, z, qx, qy, qz, qw]`` box centres in the world frame (the
  quaternion order is an option); a track whose flags lack ``CONTROLLABLE`` is static and is held
  at its median pose over the whole scene;
- the map: ``map.xodr`` (OpenDRIVE, fully supported by :mod:`.opendrive`) or, best-effort, the
  parquet vector map under ``map_data/``, ``clipgt/`` or ``fastmap/``. **The parquet schema is not
  public; the reader below is unverified against real archives**: it takes every parquet file whose
  name says what it holds (lane centres, road edges / boundaries, lane lines, crosswalks) and a
  geometry column of point lists, and reports what it could not use.

Everything is resampled to the 0.1 s grid starting at the ego's first time stamp.
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from envs.drivesim.importers.common import (
    ImportedScene,
    ImportOptions,
    MapBuilder,
    Notes,
    Track,
    assemble_scene,
    license_for,
    resample,
    velocity_from_positions,
)
from envs.drivesim.importers.opendrive import parse_opendrive
from envs.drivesim.scene import DT, AgentType, MapType, PolygonType, SceneError

PARQUET_DIRS = ("map_data", "clipgt", "fastmap")
"""Archive folders that may hold the parquet vector map."""
DEFAULT_EGO_SIZE = (4.8, 2.0)
"""Ego (length, width) assumed when ``rig_bbox`` is missing."""
TRACK_MAX_GAP_S = 0.35
"""Actor poses farther apart than this are not interpolated across."""
EGO_MAX_GAP_S = 0.5
_US = 1e-6


def _label_type(label: str) -> AgentType | None:
    s = label.lower()
    if any(w in s for w in ("pedestrian", "person", "walker")):
        return AgentType.PEDESTRIAN
    if any(w in s for w in ("bicycle", "cyclist", "rider", "bike", "motorcycl")):
        return AgentType.CYCLIST
    if any(w in s for w in ("car", "truck", "bus", "vehicle", "van", "automobile", "trailer", "suv")):
        return AgentType.VEHICLE
    return None


def yaw_from_quaternion(q: np.ndarray, order: str = "xyzw") -> np.ndarray:
    """Yaw (rotation about z) of quaternions ``[..., 4]`` in ``order`` (``xyzw`` or ``wxyz``)."""
    if order == "wxyz":
        w, x, y, z = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    else:
        x, y, z, w = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    return np.arctan2(2 * (w * z + x * y), 1 - 2 * (y * y + z * z))


def _matrices(obj: Any, where: str) -> np.ndarray:
    """``[M, 4, 4]`` from a list of 4x4 nested lists or of 16 numbers (row-major)."""
    try:
        arr = np.asarray(obj, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise SceneError(f"{where}: not a list of 4x4 matrices ({e})") from None
    if arr.ndim == 2 and arr.shape[1] == 16:
        arr = arr.reshape(-1, 4, 4)
    if arr.ndim != 3 or arr.shape[1:] != (4, 4):
        raise SceneError(f"{where}: expected 4x4 matrices, got shape {list(arr.shape)}")
    return arr


class _Archive:
    """Members of the zip by base name (archives are sometimes zipped with a top folder)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as e:
            raise SceneError(f"{path}: not a readable zip archive (truncated or not a .usdz: {e})") from None
        names = [n for n in self.zip.namelist() if not n.endswith("/")]
        self.names = sorted(names, key=lambda n: (n.count("/"), n))

    def find(self, name: str) -> str | None:
        for n in self.names:
            if n == name or n.endswith("/" + name):
                return n
        return None

    def read(self, name: str) -> bytes:
        member = self.find(name)
        if member is None:
            raise SceneError(f"{self.path}: the archive has no {name} (members: {self.names[:8]}"
                             f"{' ...' if len(self.names) > 8 else ''})")
        try:
            return self.zip.read(member)
        except (zipfile.BadZipFile, OSError, EOFError, zipfile.LargeZipFile) as e:
            raise SceneError(f"{self.path}: cannot read {member} (corrupt archive: {e})") from None

    def json(self, name: str) -> Any:
        try:
            return json.loads(self.read(name))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SceneError(f"{self.path}: {name} is not valid JSON ({e})") from None

    def close(self) -> None:
        self.zip.close()


def read_nurec(path: str | Path, options: ImportOptions) -> ImportedScene:
    """Import one NuRec ``.usdz`` archive (raises SceneError when it cannot become a scene)."""
    path = Path(path)
    archive = _Archive(path)
    try:
        return _convert(archive, str(path), options)
    finally:
        archive.close()


def _metadata(archive: _Archive, where: str) -> dict:
    import yaml  # PyYAML arrives with hydra-core / omegaconf

    try:
        meta = yaml.safe_load(archive.read("metadata.yaml"))
    except yaml.YAMLError as e:
        raise SceneError(f"{where}: metadata.yaml is not valid YAML ({e})") from None
    if not isinstance(meta, dict):
        raise SceneError(f"{where}: metadata.yaml must be a mapping, got {type(meta).__name__}")
    return meta


def _ego(rig_json: Any, where: str, notes: Notes):
    """Ego time stamps (s), rear-axle poses [M, 3], box size, centroid offset [2], T_world_base."""
    if not isinstance(rig_json, dict) or not isinstance(rig_json.get("rig_trajectories"), list):
        raise SceneError(f"{where}: rig_trajectories.json has no 'rig_trajectories' list")
    trajs = rig_json["rig_trajectories"]
    if not trajs or not isinstance(trajs[0], dict):
        raise SceneError(f"{where}: missing ego: rig_trajectories is empty")
    if len(trajs) > 1:
        notes.info.append(f"{len(trajs)} rig trajectories: the first is the ego")
    traj = trajs[0]
    w = f"{where}: rig_trajectories[0]"
    for key in ("T_rig_world_timestamps_us", "T_rig_worlds"):
        if key not in traj:
            raise SceneError(f"{w}: missing {key!r}")
    try:
        ts = np.asarray(traj["T_rig_world_timestamps_us"], dtype=np.float64) * _US
    except (TypeError, ValueError) as e:
        raise SceneError(f"{w}.T_rig_world_timestamps_us: not numeric ({e})") from None
    mats = _matrices(traj["T_rig_worlds"], f"{w}.T_rig_worlds")
    if ts.ndim != 1 or len(ts) != len(mats) or len(ts) < 2:
        raise SceneError(f"{w}: {ts.size} time stamps for {len(mats)} poses (need >= 2, equal counts)")
    if not (np.isfinite(ts).all() and np.isfinite(mats).all()):
        raise SceneError(f"{w}: non-finite time stamps or poses")
    order = np.argsort(ts, kind="stable")
    if (order != np.arange(len(ts))).any():
        notes.fixes.append("ego poses were not in time order: sorted")
    ts, mats = ts[order], mats[order]
    dup = np.concatenate([[False], np.diff(ts) <= 0])
    if dup.any():
        notes.fixes.append(f"{int(dup.sum())} ego pose(s) with a repeated time stamp dropped")
        ts, mats = ts[~dup], mats[~dup]
    pose = np.stack([mats[:, 0, 3], mats[:, 1, 3], np.arctan2(mats[:, 1, 0], mats[:, 0, 0])], -1)
    bbox = traj.get("rig_bbox")
    if isinstance(bbox, dict) and "dim" in bbox:
        try:
            dim = np.asarray(bbox["dim"], dtype=np.float64).ravel()
            centroid = np.asarray(bbox.get("centroid", [0.0, 0.0, 0.0]), dtype=np.float64).ravel()
        except (TypeError, ValueError) as e:
            raise SceneError(f"{w}.rig_bbox: not numeric ({e})") from None
        if dim.size < 2 or centroid.size < 2 or not (np.isfinite(dim[:2]).all() and (dim[:2] > 0).all()
                                                     and np.isfinite(centroid[:2]).all()):
            raise SceneError(f"{w}.rig_bbox: dim must hold a positive length and width, got {dim.tolist()}")
        size = (float(dim[0]), float(dim[1]))
        if size[1] > size[0]:
            notes.fixes.append(f"ego rig_bbox length/width swapped ({size[0]:.2f} x {size[1]:.2f}): a "
                               "vehicle is longer than wide")
            size = (size[1], size[0])
        offset = centroid[:2].copy()
    else:
        notes.fixes.append(f"rig_bbox is missing: ego box assumed {DEFAULT_EGO_SIZE[0]} x "
                           f"{DEFAULT_EGO_SIZE[1]} m with its centre 0.3 x length ahead of the rear axle")
        size, offset = DEFAULT_EGO_SIZE, np.array([0.3 * DEFAULT_EGO_SIZE[0], 0.0])
    base = rig_json.get("T_world_base", traj.get("T_world_base"))
    t_world_base = None
    if base is not None:
        if isinstance(base, dict) and "matrix" in base:
            base = base["matrix"]
        t_world_base = _matrices([base], f"{where}: T_world_base")[0]
    return ts, pose, size, offset, str(traj.get("sequence_id", "")), t_world_base


def _actors(seq_json: Any, sequence_id: str, grid: np.ndarray, options: ImportOptions, where: str,
            notes: Notes) -> list[Track]:
    if not isinstance(seq_json, dict):
        raise SceneError(f"{where}: sequence_tracks.json must be an object keyed by sequence id")
    if sequence_id in seq_json:
        seq = seq_json[sequence_id]
    elif len(seq_json) == 1:
        seq = next(iter(seq_json.values()))
        if sequence_id:
            notes.info.append(f"sequence_tracks.json has no {sequence_id!r}; used its only sequence")
    elif not seq_json:
        notes.info.append("sequence_tracks.json is empty: the scene has no other actors")
        return []
    else:
        raise SceneError(f"{where}: sequence_tracks.json has no sequence {sequence_id!r} "
                         f"(has {sorted(seq_json)[:5]})")
    w = f"{where}: sequence_tracks"
    if not isinstance(seq, dict) or not isinstance(seq.get("tracks_data"), dict):
        raise SceneError(f"{w}: no 'tracks_data' object")
    td = seq["tracks_data"]
    fields = ("tracks_id", "tracks_label_class", "tracks_flags", "tracks_timestamps_us", "tracks_poses")
    for f in fields:
        if not isinstance(td.get(f), list):
            raise SceneError(f"{w}.tracks_data.{f} must be a list")
    n = len(td["tracks_id"])
    dims = (seq.get("cuboidtracks_data") or {}).get("cuboids_dims")
    if not isinstance(dims, list):
        raise SceneError(f"{w}: cuboidtracks_data.cuboids_dims must be a list")
    if any(len(td[f]) != n for f in fields) or len(dims) != n:
        raise SceneError(f"{w}: tracks_data lists and cuboids_dims must all have {n} entries")
    tracks: list[Track] = []
    unknown: Counter[str] = Counter()
    bad = []
    for i in range(n):
        tid = str(td["tracks_id"][i])
        try:
            ts = np.asarray(td["tracks_timestamps_us"][i], dtype=np.float64).ravel() * _US
            poses = np.asarray(td["tracks_poses"][i], dtype=np.float64)
            dim = np.asarray(dims[i], dtype=np.float64).ravel()
        except (TypeError, ValueError) as e:
            bad.append(f"{tid} ({e})")
            continue
        if poses.ndim != 2 or poses.shape[1] != 7 or len(ts) != len(poses) or len(ts) == 0 or dim.size < 2:
            bad.append(f"{tid} (poses {list(poses.shape)} for {len(ts)} time stamps, dims {dim.tolist()})")
            continue
        finite = np.isfinite(poses).all(1) & np.isfinite(ts)
        ts, poses = ts[finite], poses[finite]
        if len(ts) == 0:
            bad.append(f"{tid} (no finite pose)")
            continue
        order = np.argsort(ts, kind="stable")
        ts, poses = ts[order], poses[order]
        keep = np.concatenate([[True], np.diff(ts) > 0])
        ts, poses = ts[keep], poses[keep]
        yaw = yaw_from_quaternion(poses[:, 3:7], options.quaternion_order)
        flags = td["tracks_flags"][i]
        flag_text = " ".join(map(str, flags)) if isinstance(flags, (list, tuple)) else str(flags)
        static = "CONTROLLABLE" not in flag_text.upper()
        state = np.zeros((len(grid), 5))
        if static:
            state[:, 0:2] = np.median(poses[:, :2], axis=0)
            state[:, 2] = np.angle(np.exp(1j * yaw).mean())
            valid = np.ones(len(grid), dtype=bool)
        else:
            vals, valid = resample(ts, np.stack([poses[:, 0], poses[:, 1], yaw], -1), np.ones(len(ts), bool),
                                   grid, max_gap=TRACK_MAX_GAP_S, angle_cols=[2])
            if len(ts) == 1:
                near = np.abs(grid - ts[0]) <= 0.5 * DT
                vals[near] = [poses[0, 0], poses[0, 1], yaw[0]]
                valid = valid | near
            state[:, 0:3] = vals
            state[:, 3:5] = velocity_from_positions(vals[:, :2], valid)
        label = str(td["tracks_label_class"][i])
        kind = _label_type(label)
        if kind is None:
            unknown[label] += 1
        size = (float(dim[0]), float(dim[1])) if (dim[:2] > 0).all() and np.isfinite(dim[:2]).all() else None
        tracks.append(Track(tid, kind or AgentType.OTHER, state, valid, size))
    if bad:
        notes.fixes.append(f"{len(bad)} malformed actor track(s) dropped: " + "; ".join(bad[:3]))
    if unknown:
        notes.info.append(f"actor classes {dict(unknown)} imported as OTHER")
    return tracks


def _xodr_map(archive: _Archive, member: str, t_world_base: np.ndarray | None, where: str,
              builder: MapBuilder, notes: Notes) -> None:
    odr = parse_opendrive(archive.read(member), f"{where}:{member}")
    for lane in odr.lanes:
        builder.add_line(lane.center, MapType.LANE, key=lane.key, width=lane.width, speed_limit=lane.speed)
        builder.add_polygon(lane.polygon, PolygonType.LANE, lane_key=lane.key)
    for edge in odr.edges:
        builder.add_line(edge, MapType.ROAD_EDGE)
    for line in odr.boundaries:
        builder.add_line(line, MapType.LANE_BOUNDARY)
    for a, b, kind in odr.links:
        builder.add_link(a, b, kind)
    for msg in odr.warnings[:5]:
        notes.info.append(f"map.xodr: {msg}")
    if t_world_base is not None:
        r, t = t_world_base[:2, :2], t_world_base[:2, 3]
        builder.transform(lambda p: p @ r.T + t)
    notes.info.append(f"map from {member}: {len(odr.lanes)} lanes, {len(odr.edges)} road edges")


_PARQUET_KINDS = (  # (words in the file name, what it holds)
    (("crosswalk",), "crosswalk"),
    (("road_edge", "roadedge", "road_boundar", "roadboundar", "curb"), MapType.ROAD_EDGE),
    (("lane_line", "laneline", "lane_boundar", "laneboundar", "lane_divider", "road_line"),
     MapType.LANE_BOUNDARY),
    (("wait_line", "stop_line", "waitline", "stopline"), MapType.STOP_LINE),
    (("lane_center", "lane_centre", "centerline", "centreline", "lanes"), MapType.LANE),
)
_GEOMETRY_COLUMNS = ("geometry", "polyline", "points", "coordinates", "coords", "vertices", "line",
                     "centerline", "center_line", "polygon")


def _points_from_cell(cell: Any) -> np.ndarray | None:
    if cell is None:
        return None
    if isinstance(cell, dict):  # struct of coordinate lists {x: [...], y: [...]}
        if "x" in cell and "y" in cell:
            return np.stack([np.asarray(cell["x"], float), np.asarray(cell["y"], float)], -1)
        return None
    try:
        if len(cell) and isinstance(cell[0], dict):
            return np.array([[p["x"], p["y"]] for p in cell], dtype=float)
        arr = np.asarray(cell, dtype=float)
    except (TypeError, ValueError, KeyError, IndexError):
        return None
    if arr.ndim == 1 and arr.size % 3 == 0 and arr.size >= 6:
        arr = arr.reshape(-1, 3)  # flat x, y, z, x, y, z ...
    if arr.ndim != 2 or arr.shape[1] < 2:
        return None
    return arr[:, :2]


def _parquet_map(archive: _Archive, members: list[str], builder: MapBuilder, notes: Notes) -> int:
    """Best-effort (unverified) reader of the parquet vector map; returns features added."""
    import pyarrow.parquet as pq

    added, unused = 0, []
    for member in members:
        stem = PurePosixPath(member).stem.lower()
        kind = next((k for words, k in _PARQUET_KINDS if any(w in stem for w in words)), None)
        if kind is None:
            unused.append(f"{member} (unknown content)")
            continue
        try:
            table = pq.read_table(io.BytesIO(archive.read(member)))
        except Exception as e:  # noqa: BLE001 - any pyarrow failure means "cannot use this file"
            unused.append(f"{member} (unreadable: {type(e).__name__})")
            continue
        col = next((c for c in _GEOMETRY_COLUMNS if c in table.column_names), None)
        if col is None:
            unused.append(f"{member} (no geometry column among {table.column_names[:6]})")
            continue
        for row, cell in enumerate(table.column(col).to_pylist()):
            pts = _points_from_cell(cell)
            if pts is None or len(pts) < 2:
                continue
            if isinstance(kind, MapType):
                builder.add_line(pts, kind, key=f"{stem}:{row}" if kind == MapType.LANE else None)
            else:
                builder.add_polygon(pts, PolygonType.CROSSWALK)
            added += 1
    notes.info.append(f"parquet vector map (best-effort, unverified schema): {added} feature(s) from "
                      f"{len(members) - len(unused)} file(s)")
    if unused:
        notes.info.append("parquet map files not used: " + "; ".join(unused[:5]))
    return added


def _convert(archive: _Archive, where: str, options: ImportOptions) -> ImportedScene:
    notes = Notes()
    meta = _metadata(archive, where)
    rig_json = archive.json("rig_trajectories.json")
    ts, rig_pose, size, offset, sequence_id, t_world_base = _ego(rig_json, where, notes)
    scene_id = meta.get("scene_id")
    if not isinstance(scene_id, str) or not scene_id:
        scene_id = f"clipgt-{meta['uuid']}" if meta.get("uuid") else Path(where).stem
        notes.fixes.append(f"metadata.yaml has no scene_id: using {scene_id!r}")

    grid = ts[0] + DT * np.arange(int(math.floor((ts[-1] - ts[0]) / DT + 1e-6)) + 1)
    vals, ego_valid = resample(ts, rig_pose, np.ones(len(ts), bool), grid, max_gap=EGO_MAX_GAP_S,
                               angle_cols=[2])
    src_dt = float(np.median(np.diff(ts)))
    if abs(src_dt - DT) > 1e-3 or not np.allclose(np.diff(ts), DT, atol=1e-3):
        notes.info.append(f"ego poses resampled from a {src_dt * 1e3:.0f} ms median step to {DT} s "
                          f"({len(ts)} poses -> {len(grid)} steps)")
    if options.ego_rear_axle_to_center is not None:
        offset = np.array([options.ego_rear_axle_to_center, 0.0])
    c, s = np.cos(vals[:, 2]), np.sin(vals[:, 2])
    centre = np.stack([vals[:, 0] + offset[0] * c - offset[1] * s,
                       vals[:, 1] + offset[0] * s + offset[1] * c], -1)
    ego_state = np.zeros((len(grid), 5))
    ego_state[:, 0:2], ego_state[:, 2] = centre, vals[:, 2]
    ego_state[:, 3:5] = velocity_from_positions(centre, ego_valid)
    ego_track = Track("ego", AgentType.VEHICLE, ego_state, ego_valid, size)

    actors = _actors(archive.json("sequence_tracks.json"), sequence_id, grid, options, where, notes)
    kept = []
    for t in actors:  # the ego sometimes appears among the tracks: it would collide with itself
        both = t.valid & ego_valid
        if both.sum() >= max(3, 0.5 * ego_valid.sum()):
            d = np.linalg.norm(t.state[both, :2] - centre[both], axis=1)
            if np.median(d) < 1.0:
                notes.fixes.append(f"actor track {t.id!r} follows the ego (median distance "
                                   f"{np.median(d):.2f} m): dropped as a duplicate of the ego")
                continue
        kept.append(t)

    builder = MapBuilder()
    xodr = archive.find("map.xodr")
    parquet = [n for n in archive.names if n.endswith(".parquet")
               and any(part in PARQUET_DIRS for part in PurePosixPath(n).parts[:-1])]
    use = options.nurec_map
    if use == "auto":
        use = "xodr" if xodr else "parquet"
    if use == "xodr":
        if xodr is None:
            raise SceneError(f"{where}: the archive has no map.xodr")
        _xodr_map(archive, xodr, t_world_base, where, builder, notes)
    else:
        if not parquet or not _parquet_map(archive, parquet, builder, notes):
            raise SceneError(f"{where}: no usable map: no map.xodr and no readable parquet vector map "
                             f"under {'/, '.join(PARQUET_DIRS)}/")
    if builder.num_features == 0:
        raise SceneError(f"{where}: the map is empty")

    extra = {
        "source_format": "nurec",
        "source_file": Path(where).name,
        "sequence_id": sequence_id,
        "map_source": use,
        **{k: str(meta[k]) for k in ("uuid", "version_string", "dataset_hash") if k in meta},
    }
    if isinstance(meta.get("time_range"), dict):
        extra["time_range"] = {str(k): str(v) for k, v in meta["time_range"].items()}
    rac = float(offset[0])
    try:
        scene = assemble_scene(
            scene_id=scene_id, tracks=[ego_track] + kept, ego=0, map_builder=builder, notes=notes,
            options=options, dataset="nurec", license=license_for("nurec"), extra=extra,
            ego_rear_axle_to_center=rac,
        )
    except SceneError as e:
        raise SceneError(f"{where}: {e}") from None
    return ImportedScene(scene, notes)
