"""ScenarioNet ``ScenarioDescription`` pickles -> scenes.

ScenarioNet's converters turn Waymo Open Motion, nuPlan, nuScenes, Argoverse 2 and Lyft into one
pickled dict per scene (``/work/shared/specs/scene_formats.md``). Files are read with the restricted
unpickler (:mod:`.safe_unpickle`). Quirks handled, each reported when it changes data:

- tracks: ``position`` (T, 2|3), ``heading`` (T,) or (T, 1), ``velocity`` (T, 2), ``valid`` bool or
  float, ``length`` / ``width`` (T,) or (T, 1) with zeros on invalid steps (the median over valid
  steps is used), vehicles whose width exceeds their length (swapped; nuScenes' ego is 1.73 x 4.08
  in every file) are swapped back;
- the ego's reference point: nuScenes logs the ego's pose at the rear-axle centre (nuScenes' ego
  frame; confirmed on the real files: the slip between heading and direction of motion regresses
  to 0.03 m ahead of the logged point on scene-0061's curves, where a box centre would give about
  1.4 m), so its positions are moved to the box centre, ``RENAULT_ZOE_REAR_AXLE_TO_CENTER`` ahead;
  every other dataset's positions are box centres;
- maps: lane centre lines with or without polygons (nuScenes: about half are connectors with
  neither polygon nor width) and with per-vertex ``width`` (P, 2) = distances to the left and right
  boundaries (Waymo conversions), road edges (Waymo) or none (nuScenes), geometry as arrays or
  lists of 2-D / 3-D points (nuScenes lanes carry (x, y, yaw) tuples), lane graphs from
  ``entry_lanes`` / ``exit_lanes`` / neighbours, or inferred from lane end points when absent;
- traffic lights from ``dynamic_map_states``;
- the dataset index files ``dataset_summary.pkl`` / ``dataset_mapping.pkl`` locate scene files and
  are never read as scenes.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from envs.drivesim.importers.common import (
    ImportedScene,
    ImportOptions,
    MapBuilder,
    Notes,
    Track,
    as_points,
    as_series,
    assemble_scene,
    is_regular_grid,
    license_for,
    median_size,
    resample,
)
from envs.drivesim.importers.safe_unpickle import safe_load
from envs.drivesim.scene import DT, AgentType, LightState, LinkKind, MapType, PolygonType, SceneError

INDEX_FILES = ("dataset_summary.pkl", "dataset_mapping.pkl")
"""A ScenarioNet dataset directory's index files (not scenes)."""

RENAULT_ZOE_REAR_AXLE_TO_CENTER = 1.385
"""nuScenes' ego is a Renault Zoe: length 4.084 m, rear overhang 0.657 m, so its box centre sits
4.084 / 2 - 0.657 = 1.385 m ahead of the rear axle (the origin of nuScenes' ego frame)."""

EGO_AT_REAR_AXLE = {"nuscenes": RENAULT_ZOE_REAR_AXLE_TO_CENTER}
"""Datasets whose logged ego positions are rear-axle poses -> rear axle to box centre (m)."""

TRACK_TYPES = {
    "VEHICLE": AgentType.VEHICLE,
    "PEDESTRIAN": AgentType.PEDESTRIAN,
    "CYCLIST": AgentType.CYCLIST,
    "TRAFFIC_CONE": AgentType.OTHER,
    "TRAFFIC_BARRIER": AgentType.OTHER,
    "TRAFFIC_OBJECT": AgentType.OTHER,
    "OTHER": AgentType.OTHER,
}
LIGHT_STATES = {
    "LANE_STATE_STOP": LightState.STOP, "LANE_STATE_ARROW_STOP": LightState.STOP,
    "LANE_STATE_FLASHING_STOP": LightState.STOP,
    "LANE_STATE_CAUTION": LightState.CAUTION, "LANE_STATE_ARROW_CAUTION": LightState.CAUTION,
    "LANE_STATE_FLASHING_CAUTION": LightState.CAUTION,
    "LANE_STATE_GO": LightState.GO, "LANE_STATE_ARROW_GO": LightState.GO,
}
KMH = 1 / 3.6
MPH = 0.44704


def is_index_file(path: Path) -> bool:
    return path.name in INDEX_FILES


def discover(directory: Path) -> list[Path]:
    """Scene files of a ScenarioNet dataset directory: those listed by ``dataset_mapping.pkl``
    (file name -> sub-directory) or ``dataset_summary.pkl`` (file name -> summary), else every
    ``*.pkl`` below it except the index files. Listed files that do not exist are returned too, so
    that they are reported as skipped."""
    mapping_file, summary_file = directory / "dataset_mapping.pkl", directory / "dataset_summary.pkl"
    if mapping_file.is_file():
        mapping = safe_load(mapping_file)
        if not isinstance(mapping, dict):
            raise SceneError(f"{mapping_file}: expected a dict of file name -> sub-directory")
        return sorted(directory / str(sub or "") / str(name) for name, sub in mapping.items())
    if summary_file.is_file():
        summary = safe_load(summary_file)
        if not isinstance(summary, dict):
            raise SceneError(f"{summary_file}: expected a dict of file name -> summary")
        return sorted(directory / str(name) for name in summary)
    return sorted(p for p in directory.rglob("*.pkl") if not is_index_file(p))


def read_scenarionet(path: str | Path, options: ImportOptions) -> ImportedScene:
    """Import one ScenarioDescription pickle (raises SceneError when it cannot become a scene)."""
    path = Path(path)
    if is_index_file(path):
        raise SceneError(f"{path.name} is a ScenarioNet dataset index (it lists scene files), not a scene")
    return convert(safe_load(path), str(path), options)


def _dict(obj: Any, where: str) -> dict:
    if not isinstance(obj, dict):
        raise SceneError(f"{where}: expected a dict, got {type(obj).__name__}")
    return obj


def _ids(value: Any) -> list[str]:
    """Lane ids from a list of ids or of ``{feature_id | id: ...}`` dicts (Waymo neighbours)."""
    if value is None:
        return []
    if isinstance(value, (str, int, np.integer)):
        return [str(value)]
    out = []
    for v in np.asarray(value, dtype=object).ravel() if isinstance(value, np.ndarray) else value:
        if isinstance(v, dict):
            v = v.get("feature_id", v.get("id"))
        if v is not None:
            out.append(str(v))
    return out


def _lane_width(value: Any, n_points: int, where: str) -> np.ndarray | None:
    """Full lane width per vertex: ``(P, 2)`` = distances to the left and right boundaries (zeros
    where unknown), ``(P,)`` or a scalar = the full width."""
    if value is None:
        return None
    w = np.asarray(value, dtype=np.float64)
    if w.ndim == 0:
        return np.full(n_points, float(w))
    if w.ndim == 2 and w.shape == (n_points, 2):
        both = (w > 0).all(1)
        return np.where(both, w.sum(1), np.where((w > 0).any(1), 2 * w.max(1), np.nan))
    if w.ndim == 1 and len(w) == n_points:
        return w
    raise SceneError(f"{where}: width must be (P, 2), (P,) or a number for {n_points} points, "
                     f"got shape {list(w.shape)}")


def _convert_map(features: dict, builder: MapBuilder, notes: Notes) -> None:
    skipped: Counter[str] = Counter()
    bad: list[str] = []
    for fid, feat in features.items():
        where = f"map_features[{fid!r}]"
        try:
            feat = _dict(feat, where)
            kind = str(feat.get("type", ""))
            has_line = feat.get("polyline") is not None and len(feat["polyline"]) > 0
            has_poly = feat.get("polygon") is not None and len(feat["polygon"]) > 0
            if kind.startswith("LANE_") and kind != "LANE_BIKE_LANE":
                if not has_line:
                    skipped["lane without a polyline"] += 1
                    continue
                pts = as_points(feat["polyline"], f"{where}.polyline")
                width = _lane_width(feat.get("width"), len(pts), f"{where}.width")
                speed = math.nan
                if feat.get("speed_limit_kmh") is not None:
                    speed = float(feat["speed_limit_kmh"]) * KMH
                elif feat.get("speed_limit_mph") is not None:
                    speed = float(feat["speed_limit_mph"]) * MPH
                builder.add_line(pts, MapType.LANE, key=str(fid), width=width, speed_limit=speed)
                if has_poly:
                    builder.add_polygon(as_points(feat["polygon"], f"{where}.polygon"), PolygonType.LANE,
                                        lane_key=str(fid))
                for other in _ids(feat.get("exit_lanes")):
                    builder.add_link(str(fid), other, LinkKind.SUCCESSOR)
                for other in _ids(feat.get("entry_lanes")):
                    builder.add_link(other, str(fid), LinkKind.SUCCESSOR)
                for other in _ids(feat.get("left_neighbor")):
                    builder.add_link(str(fid), other, LinkKind.LEFT_NEIGHBOR)
                for other in _ids(feat.get("right_neighbor")):
                    builder.add_link(str(fid), other, LinkKind.RIGHT_NEIGHBOR)
            elif kind.startswith("ROAD_LINE") and has_line:
                builder.add_line(as_points(feat["polyline"], f"{where}.polyline"), MapType.LANE_BOUNDARY)
            elif kind.startswith("ROAD_EDGE") and has_line:
                builder.add_line(as_points(feat["polyline"], f"{where}.polyline"), MapType.ROAD_EDGE)
            elif kind in ("CROSSWALK", "SPEED_BUMP", "DRIVEWAY") and (has_poly or has_line):
                pts = as_points(feat["polygon"] if has_poly else feat["polyline"], where)
                builder.add_polygon(pts, PolygonType[kind])
            elif kind == "STOP_SIGN":
                skipped["stop sign (a point, not kept)"] += 1
            elif kind == "LANE_BIKE_LANE" and has_line:
                # a bike lane is not drivable for cars: kept as OTHER so it adds no drivable area
                builder.add_line(as_points(feat["polyline"], f"{where}.polyline"), MapType.OTHER)
            elif has_line:
                builder.add_line(as_points(feat["polyline"], f"{where}.polyline"), MapType.OTHER)
            elif has_poly:
                builder.add_polygon(as_points(feat["polygon"], f"{where}.polygon"), PolygonType.OTHER)
            else:
                skipped[f"{kind or 'untyped'} feature without geometry"] += 1
        except (SceneError, TypeError, ValueError) as e:
            bad.append(f"{fid!r} ({e})")
    if bad:
        notes.fixes.append(f"map: {len(bad)} malformed feature(s) dropped: " + "; ".join(bad[:3])
                           + (" ..." if len(bad) > 3 else ""))
    for why, n in sorted(skipped.items()):
        notes.info.append(f"map: {n} {why} skipped")


def _convert_lights(states: dict, num_steps: int, builder: MapBuilder, notes: Notes) -> None:
    bad = 0
    for lid, light in states.items():
        try:
            light = _dict(light, f"dynamic_map_states[{lid!r}]")
            obj_state = _dict(light.get("state"), f"dynamic_map_states[{lid!r}].state").get("object_state")
            seq = list(obj_state) if obj_state is not None else []
            if len(seq) != num_steps:
                raise SceneError(f"{len(seq)} states for {num_steps} steps")
            codes = np.array([int(LIGHT_STATES.get(str(s), LightState.UNKNOWN)) for s in seq], np.int8)
            lane = light.get("lane")
            if isinstance(lane, np.ndarray):
                lane = lane.ravel()[0] if lane.size else None
            if lane is None:
                raise SceneError("no lane")
            builder.add_light(str(lane.item() if isinstance(lane, np.generic) else lane), codes)
        except (SceneError, TypeError, ValueError) as e:
            bad += 1
            last = str(e)
    if bad:
        notes.fixes.append(f"{bad} malformed traffic light(s) dropped (e.g. {last})")


def _convert_track(tid: str, trk: Any, num_steps: int) -> tuple[Track, AgentType | None]:
    where = f"tracks[{tid!r}]"
    trk = _dict(trk, where)
    st = _dict(trk.get("state"), f"{where}.state")
    for key in ("position", "valid"):
        if key not in st:
            raise SceneError(f"{where}.state has no {key!r}")
    pos = as_series(st["position"], num_steps, f"{where}.state.position", cols=2)
    heading = as_series(st.get("heading", np.zeros(num_steps)), num_steps, f"{where}.state.heading")
    vel = (as_series(st["velocity"], num_steps, f"{where}.state.velocity", cols=2)
           if "velocity" in st else np.zeros((num_steps, 2)))
    valid = as_series(st["valid"], num_steps, f"{where}.state.valid") != 0

    def size(key: str) -> np.ndarray:
        v = st.get(key, 0.0)
        if np.ndim(v) == 0:
            return np.full(num_steps, float(v))
        return as_series(v, num_steps, f"{where}.state.{key}")

    raw_type = str(trk.get("type", "UNSET"))
    agent_type = TRACK_TYPES.get(raw_type)
    state = np.concatenate([pos, heading[:, None], vel], axis=1)
    track = Track(str(tid), agent_type or AgentType.OTHER, state, valid,
                  median_size(size("length"), size("width"), valid))
    return track, agent_type


def convert(sd: Any, where: str, options: ImportOptions) -> ImportedScene:
    """Convert an unpickled ScenarioDescription dict into a checked scene."""
    notes = Notes()
    sd = _dict(sd, where)
    for key in ("tracks", "map_features", "metadata"):
        if key not in sd:
            raise SceneError(f"{where}: not a ScenarioDescription (no {key!r}; keys: "
                             f"{sorted(map(str, sd))[:10]})")
    meta = _dict(sd["metadata"], f"{where}: metadata")
    tracks_in = _dict(sd["tracks"], f"{where}: tracks")
    sdc = meta.get("sdc_id")
    if sdc is None or str(sdc) not in {str(k) for k in tracks_in}:
        raise SceneError(f"{where}: missing ego: metadata.sdc_id={sdc!r} is not a key of tracks")
    scene_id = str(sd.get("id") or meta.get("scenario_id") or meta.get("id") or Path(where).stem)
    dataset = str(meta.get("dataset", "unknown")).lower()
    try:
        ego_key = next(k for k in tracks_in if str(k) == str(sdc))
        num_steps = int(sd.get("length") or len(tracks_in[ego_key]["state"]["position"]))
    except (KeyError, TypeError, ValueError) as e:
        raise SceneError(f"{where}: no scene length and no ego positions ({type(e).__name__}: {e})") from None
    if num_steps < 2:
        raise SceneError(f"{where}: length {num_steps}: a scene needs at least 2 steps")

    # time: every ScenarioNet source logs at 10 Hz, but check (and resample otherwise)
    times = None
    if meta.get("ts") is not None:
        times = as_series(meta["ts"], num_steps, f"{where}: metadata.ts")
    elif meta.get("sample_rate") is not None:
        times = np.arange(num_steps) * float(meta["sample_rate"])

    tracks: list[Track] = []
    unknown_types: Counter[str] = Counter()
    ego = -1
    for tid, trk in tracks_in.items():
        try:
            track, agent_type = _convert_track(str(tid), trk, num_steps)
        except SceneError as e:
            if str(tid) == str(sdc):
                raise SceneError(f"{where}: ego track: {e}") from None
            raise SceneError(f"{where}: {e}") from None
        if agent_type is None:
            unknown_types[str(trk.get("type"))] += 1
        if str(tid) == str(sdc):
            ego = len(tracks)
        tracks.append(track)
    if unknown_types:
        notes.info.append(f"track types {dict(unknown_types)} imported as OTHER")

    nearest = None  # source step of each 0.1 s step, when resampled
    if times is not None and not is_regular_grid(times):
        if not np.all(np.isfinite(times)) or np.any(np.diff(times) <= 0):
            raise SceneError(f"{where}: metadata.ts is not strictly increasing")
        grid = np.arange(times[0], times[-1] + 1e-9, DT)
        dt_src = float(np.median(np.diff(times)))
        for t in tracks:
            vals, ok = resample(times, t.state, t.valid, grid, max_gap=max(2.5 * dt_src, DT), angle_cols=[2])
            t.state, t.valid = vals, ok
        nearest = np.clip(np.searchsorted(times, grid - 0.5 * dt_src), 0, num_steps - 1)
        notes.fixes.append(f"resampled from a {dt_src:.3g} s time step to {DT} s "
                           f"({num_steps} -> {len(grid)} steps)")

    # sizes: a vehicle is longer than wide; nuScenes' ego comes swapped
    swapped = []
    for i, t in enumerate(tracks):
        if t.size is not None and t.type in (AgentType.VEHICLE, AgentType.CYCLIST) and t.size[1] > t.size[0]:
            swapped.append("the ego" if i == ego else repr(t.id))
            if i == ego:
                notes.fixes.append(f"ego length/width swapped ({t.size[0]:.2f} x {t.size[1]:.2f} -> "
                                   f"{t.size[1]:.2f} x {t.size[0]:.2f}): a vehicle is longer than wide")
            t.size = (t.size[1], t.size[0])
    others = [s for s in swapped if s != "the ego"]
    if others:
        notes.fixes.append(f"{len(others)} other vehicle(s) with width > length swapped: "
                           f"{', '.join(others[:5])}")

    # the ego's reference point
    rac = options.ego_rear_axle_to_center
    at_rear_axle = options.ego_position == "rear_axle" or (
        options.ego_position == "auto" and dataset in EGO_AT_REAR_AXLE)
    if at_rear_axle:
        ego_track = tracks[ego]
        if rac is None:
            rac = EGO_AT_REAR_AXLE.get(dataset, 0.3 * (ego_track.size[0] if ego_track.size else 4.5))
        c, s = np.cos(ego_track.state[:, 2]), np.sin(ego_track.state[:, 2])
        ego_track.state[:, 0] += rac * c
        ego_track.state[:, 1] += rac * s
        notes.info.append(f"{dataset} ego positions are rear-axle poses: moved {rac:.3f} m forward to the "
                          "box centre")

    builder = MapBuilder()
    _convert_map(_dict(sd["map_features"], f"{where}: map_features"), builder, notes)
    if not any(k == LinkKind.SUCCESSOR for _, _, k in builder.links):
        n = builder.infer_successors()
        if n:
            notes.info.append(f"no lane graph in the source: {n} successor link(s) inferred from lane end "
                              "points")
    lights = sd.get("dynamic_map_states") or {}
    if lights:
        _convert_lights(_dict(lights, f"{where}: dynamic_map_states"), num_steps, builder, notes)
        if nearest is not None:
            builder.lights = [(lane, states[nearest]) for lane, states in builder.lights]

    extra = {
        "source_format": "scenarionet",
        "source_file": Path(where).name,
        "source_version": str(sd.get("version", "")),
        **{k: str(meta[k]) for k in ("map", "date", "scenario_token", "coordinate") if k in meta},
    }
    try:
        scene = assemble_scene(
            scene_id=scene_id, tracks=tracks, ego=ego, map_builder=builder, notes=notes, options=options,
            dataset=dataset, license=license_for(dataset), extra=extra, ego_rear_axle_to_center=rac,
        )
    except SceneError as e:
        raise SceneError(f"{where}: {e}") from None
    return ImportedScene(scene, notes)
