"""Waymo Open Motion scenes as per-scene JSON (the GPUDrive / PufferDrive layout) -> scenes.

One JSON object per scenario (91 steps at 0.1 s): ``objects`` (per-step ``position`` {x, y, z},
``heading``, ``velocity`` {x, y}, ``valid``; scalar ``length`` / ``width``; ``type`` vehicle,
pedestrian or cyclist; positions are box centres, the ego's too), ``roads`` (``geometry`` lists of
{x, y, z} with ``type`` lane, road_edge, road_line, crosswalk, stop_sign, driveway, speed_bump),
``tl_states`` and ``metadata.sdc_track_index`` (the ego's index in ``objects``). The layout has no
time stamps (every step is 0.1 s), no lane widths and no lane graph: successor links are inferred
from lane end points.
"""

from __future__ import annotations

import json
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
    assemble_scene,
    license_for,
)
from envs.drivesim.scene import AgentType, LightState, MapType, PolygonType, SceneError

AGENT_TYPES = {"vehicle": AgentType.VEHICLE, "pedestrian": AgentType.PEDESTRIAN, "cyclist": AgentType.CYCLIST}
ROAD_LINES = {"lane": MapType.LANE, "road_edge": MapType.ROAD_EDGE, "road_line": MapType.LANE_BOUNDARY}
ROAD_POLYGONS = {"crosswalk": PolygonType.CROSSWALK, "speed_bump": PolygonType.SPEED_BUMP,
                 "driveway": PolygonType.DRIVEWAY}
# Waymo's TrafficSignalLaneState enum (ints) and its names, plus the short names some exporters use
_WAYMO_TL = [LightState.UNKNOWN, LightState.STOP, LightState.CAUTION, LightState.GO, LightState.STOP,
             LightState.CAUTION, LightState.GO, LightState.STOP, LightState.CAUTION]
_TL_WORDS = {"unknown": LightState.UNKNOWN, "stop": LightState.STOP, "caution": LightState.CAUTION,
             "go": LightState.GO}


def light_state(value: Any) -> LightState:
    """A traffic-light state from a Waymo enum int, a ``LANE_STATE_*`` name or stop/caution/go."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return _WAYMO_TL[int(value)] if 0 <= int(value) < len(_WAYMO_TL) else LightState.UNKNOWN
    word = str(value).lower().removeprefix("lane_state_").removeprefix("arrow_").removeprefix("flashing_")
    return _TL_WORDS.get(word, LightState.UNKNOWN)


def _xy_series(obj: Any, length: int, where: str) -> np.ndarray:
    if not isinstance(obj, list):
        raise SceneError(f"{where}: expected a list of {length} {{x, y}} objects, got {type(obj).__name__}")
    if len(obj) != length:
        raise SceneError(f"{where}: {len(obj)} entries, expected {length}")
    return as_points(obj, where) if length else np.zeros((0, 2))


def _float_list(obj: Any, length: int, where: str) -> np.ndarray:
    if not isinstance(obj, list) or len(obj) != length:
        got = len(obj) if isinstance(obj, list) else type(obj).__name__
        raise SceneError(f"{where}: expected a list of {length} numbers, got {got}")
    try:
        return np.array([math.nan if v is None else float(v) for v in obj])
    except (TypeError, ValueError) as e:
        raise SceneError(f"{where}: not numeric ({e})") from None


def _number(obj: Any, where: str) -> float:
    if isinstance(obj, bool) or not isinstance(obj, (int, float)):
        raise SceneError(f"{where}: expected a number, got {type(obj).__name__}")
    return float(obj)


def _lights(tl: Any, num_steps: int, builder: MapBuilder, notes: Notes) -> None:
    """``tl_states`` as ``{lane_id: {"state": [T]} | [T]}`` or ``[{lane_id|lane, state|states}]``."""
    if not tl:
        return
    items: list[tuple[Any, Any]] = []
    if isinstance(tl, dict):
        for lane, v in tl.items():
            items.append((lane, v.get("state", v.get("states")) if isinstance(v, dict) else v))
    elif isinstance(tl, list):
        for v in tl:
            if isinstance(v, dict):
                items.append((v.get("lane_id", v.get("lane")), v.get("state", v.get("states"))))
    else:
        notes.fixes.append(f"tl_states of type {type(tl).__name__} not understood; traffic lights dropped")
        return
    bad = 0
    for lane, states in items:
        if lane is None or not isinstance(states, list) or len(states) != num_steps:
            bad += 1
            continue
        builder.add_light(str(lane), np.array([int(light_state(s)) for s in states], dtype=np.int8))
    if bad:
        notes.fixes.append(f"{bad} traffic light entr(y/ies) without a lane or with a state series not of "
                           f"length {num_steps} dropped")


def read_womd_json(path: str | Path, options: ImportOptions) -> ImportedScene:
    """Import one per-scene JSON file (raises SceneError when it cannot become a scene)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except UnicodeDecodeError as e:
        raise SceneError(f"{path}: not a text file ({e})") from None
    except json.JSONDecodeError as e:
        raise SceneError(f"{path}: invalid or truncated JSON ({e})") from None
    return convert(data, str(path), options)


def convert(data: Any, where: str, options: ImportOptions) -> ImportedScene:
    """Convert a parsed scenario object into a checked scene."""
    notes = Notes()
    if not isinstance(data, dict):
        raise SceneError(f"{where}: expected a JSON object, got {type(data).__name__}")
    objects, roads = data.get("objects"), data.get("roads", [])
    if not isinstance(objects, list) or not objects:
        raise SceneError(f"{where}: 'objects' must be a non-empty list")
    if not isinstance(roads, list):
        raise SceneError(f"{where}: 'roads' must be a list, got {type(roads).__name__}")
    meta = data.get("metadata") or {}
    sdc = meta.get("sdc_track_index") if isinstance(meta, dict) else None
    if isinstance(sdc, bool) or not isinstance(sdc, int) or not 0 <= sdc < len(objects):
        raise SceneError(f"{where}: missing ego: metadata.sdc_track_index={sdc!r} is not an index into "
                         f"the {len(objects)} objects")
    ego_obj = objects[sdc]
    if not isinstance(ego_obj, dict) or not isinstance(ego_obj.get("position"), list):
        raise SceneError(f"{where}: objects[{sdc}] (the ego) has no 'position' list")
    num_steps = len(ego_obj["position"])
    scene_id = str(data.get("scenario_id") or data.get("name") or Path(where).stem)

    tracks: list[Track] = []
    unknown: Counter[str] = Counter()
    for i, obj in enumerate(objects):
        w = f"{where}: objects[{i}]"
        if not isinstance(obj, dict):
            raise SceneError(f"{w}: expected an object, got {type(obj).__name__}")
        for key in ("position", "heading", "valid", "length", "width"):
            if key not in obj:
                raise SceneError(f"{w}: missing {key!r}")
        pos = _xy_series(obj["position"], num_steps, f"{w}.position")
        heading = _float_list(obj["heading"], num_steps, f"{w}.heading")
        vel = (_xy_series(obj["velocity"], num_steps, f"{w}.velocity") if "velocity" in obj
               else np.zeros((num_steps, 2)))
        valid_raw = obj["valid"]
        if not isinstance(valid_raw, list) or len(valid_raw) != num_steps:
            raise SceneError(f"{w}.valid: expected a list of {num_steps} booleans")
        valid = np.array([bool(v) for v in valid_raw])
        length, width = _number(obj["length"], f"{w}.length"), _number(obj["width"], f"{w}.width")
        size = (length, width) if length > 0 and width > 0 and math.isfinite(length + width) else None
        kind = str(obj.get("type", "")).lower()
        if kind not in AGENT_TYPES:
            unknown[kind] += 1
        tracks.append(Track(str(obj.get("id", i)), AGENT_TYPES.get(kind, AgentType.OTHER),
                            np.concatenate([pos, heading[:, None], vel], 1), valid, size))
    if unknown:
        notes.info.append(f"object types {dict(unknown)} imported as OTHER")

    builder = MapBuilder()
    skipped: Counter[str] = Counter()
    bad_roads: list[str] = []
    for j, road in enumerate(roads):
        try:
            if not isinstance(road, dict):
                raise SceneError(f"expected an object, got {type(road).__name__}")
            kind = str(road.get("type", "")).lower()
            geometry = road.get("geometry")
            if geometry is None:
                raise SceneError("no geometry")
            pts = as_points(geometry, "geometry")
            if kind in ROAD_LINES:
                builder.add_line(pts, ROAD_LINES[kind], key=str(road.get("id", f"road{j}")))
            elif kind in ROAD_POLYGONS:
                builder.add_polygon(pts, ROAD_POLYGONS[kind])
            elif kind == "stop_sign":
                skipped["stop sign (a point, not kept)"] += 1
            else:
                builder.add_line(pts, MapType.OTHER)
        except SceneError as e:
            bad_roads.append(f"roads[{j}] ({e})")
    if bad_roads:
        notes.fixes.append(f"map: {len(bad_roads)} malformed road(s) dropped: " + "; ".join(bad_roads[:3]))
    for why, n in skipped.items():
        notes.info.append(f"map: {n} {why} skipped")
    n_links = builder.infer_successors()
    if n_links:
        notes.info.append(f"{n_links} lane successor link(s) inferred from lane end points")
    _lights(data.get("tl_states"), num_steps, builder, notes)

    try:
        scene = assemble_scene(
            scene_id=scene_id, tracks=tracks, ego=sdc, map_builder=builder, notes=notes, options=options,
            dataset="waymo", license=license_for("waymo"),
            extra={"source_format": "womd-json", "source_file": Path(where).name,
                   "name": str(data.get("name", ""))},
            ego_rear_axle_to_center=options.ego_rear_axle_to_center,
        )
    except SceneError as e:
        raise SceneError(f"{where}: {e}") from None
    return ImportedScene(scene, notes)
