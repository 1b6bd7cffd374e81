"""The scene model and the scene-set format on disk.

A :class:`Scene` is one logged drive in its own local metric frame (ENU-like, metres, radians,
dt = 0.1 s): agent tracks ``[N, T]`` (box centres), the ego's index, a vector map (polylines in CSR
layout plus optional polygons), traffic-light states and metadata. Arrays are unpadded here; the
simulator pads a loaded set to its maxima (``envs.drivesim.tensors``).

A *scene set* is a directory::

    index.json            {"format": "alpagym-ray/scene-set", "version": 1, "scenes": [...]}
    scenes/<scene_id>.npz one NumPy archive per scene, loaded with allow_pickle=False

Every array in the ``.npz`` has an explicit little-endian dtype, and metadata is a JSON string
stored as a ``uint8`` array, so files are pickle-free and do not depend on the machine that wrote
them. See ``docs/scene_format.md``.
"""

from __future__ import annotations

import enum
import json
import os
import re
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

FORMAT_NAME = "alpagym-ray/scene-set"
FORMAT_VERSION = 1
DT = 0.1
"""Seconds per log step (every supported dataset logs at 10 Hz)."""
DEFAULT_LANE_WIDTH = 3.7
"""Lane width (m) where a dataset gives none (DESIGN.md: half width 1.85 m)."""


class SceneError(ValueError):
    """A scene or scene-set file is malformed; the message names the scene and the field."""


class AgentType(enum.IntEnum):
    UNSET = 0
    VEHICLE = 1
    PEDESTRIAN = 2
    CYCLIST = 3
    OTHER = 4  # cones, barriers and other static objects


class MapType(enum.IntEnum):
    LANE = 0            # lane centre line (direction of travel = vertex order)
    LANE_BOUNDARY = 1   # painted line
    ROAD_EDGE = 2       # curb / end of the drivable surface
    CROSSWALK = 3       # outline
    STOP_LINE = 4
    OTHER = 5


class PolygonType(enum.IntEnum):
    LANE = 0
    CROSSWALK = 1
    DRIVEWAY = 2
    SPEED_BUMP = 3
    OTHER = 4


class LinkKind(enum.IntEnum):
    SUCCESSOR = 0
    LEFT_NEIGHBOR = 1
    RIGHT_NEIGHBOR = 2


class LightState(enum.IntEnum):
    UNKNOWN = 0
    STOP = 1
    CAUTION = 2
    GO = 3


_SAFE_ID = re.compile(r"[^A-Za-z0-9._-]+")


def scene_file_name(scene_id: str) -> str:
    """File name of a scene inside ``scenes/`` (ids are sanitised, never used as paths)."""
    return _SAFE_ID.sub("_", scene_id).strip("._") or "scene"


def _f32(shape: tuple[int, ...] = ()) -> np.ndarray:
    return np.zeros(shape, dtype="<f4")


def _i32(shape: tuple[int, ...] = ()) -> np.ndarray:
    return np.zeros(shape, dtype="<i4")


@dataclass
class Scene:
    """One logged drive. Positions are box centres in the scene's local frame."""

    scene_id: str
    """Unique id (e.g. ``clipgt-<uuid>``, ``scene-0061``, ``gen-000042``)."""
    agent_state: np.ndarray
    """``[N, T, 5]`` float32: x, y, heading, vx, vy (zeros where invalid)."""
    agent_size: np.ndarray
    """``[N, 2]`` float32: length, width (m)."""
    agent_valid: np.ndarray
    """``[N, T]`` bool."""
    agent_type: np.ndarray
    """``[N]`` int8 :class:`AgentType`."""
    ego_index: int
    """Row of the ego ("SDC") in the agent arrays; its track is the expert / GT trajectory."""
    map_points: np.ndarray = field(default_factory=lambda: _f32((0, 2)))
    """``[P, 2]`` float32: vertices of every polyline, concatenated."""
    map_offsets: np.ndarray = field(default_factory=lambda: _i32((1,)))
    """``[L + 1]`` int32: polyline ``i`` is ``map_points[map_offsets[i]:map_offsets[i + 1]]``."""
    map_type: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int8))
    """``[L]`` int8 :class:`MapType`."""
    map_width: np.ndarray = field(default_factory=lambda: _f32((0,)))
    """``[P]`` float32 lane width at each vertex (NaN where unknown or not a lane)."""
    lane_speed_limit: np.ndarray = field(default_factory=lambda: _f32((0,)))
    """``[L]`` float32 speed limit in m/s (NaN where unknown)."""
    lane_links: np.ndarray = field(default_factory=lambda: _i32((0, 3)))
    """``[E, 3]`` int32 rows ``(from_polyline, to_polyline, LinkKind)``."""
    polygon_points: np.ndarray = field(default_factory=lambda: _f32((0, 2)))
    """``[Q, 2]`` float32 polygon vertices (implicitly closed)."""
    polygon_offsets: np.ndarray = field(default_factory=lambda: _i32((1,)))
    """``[G + 1]`` int32 CSR offsets into ``polygon_points``."""
    polygon_type: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int8))
    """``[G]`` int8 :class:`PolygonType`."""
    polygon_lane: np.ndarray = field(default_factory=lambda: _i32((0,)))
    """``[G]`` int32 polyline index of the lane a lane polygon belongs to (-1 otherwise)."""
    tl_lane: np.ndarray = field(default_factory=lambda: _i32((0,)))
    """``[K]`` int32 polyline index of the lane each traffic light controls."""
    tl_state: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.int8))
    """``[K, T]`` int8 :class:`LightState` per step."""
    agent_ids: list[str] = field(default_factory=list)
    """``N`` original track ids (empty = ``0..N-1``)."""
    ego_rear_axle_to_center: float | None = None
    """Distance (m) from the ego's rear axle to its box centre when the dataset knows it."""
    dataset: str = "unknown"
    """Source dataset (``generated``, ``nuscenes``, ``waymo``, ``nurec``...)."""
    license: str = "unknown"
    """Licence of the source data."""
    extra: dict = field(default_factory=dict)
    """Free JSON-serialisable metadata (importer notes, generator parameters)."""

    # ---- sizes -----------------------------------------------------------------------------
    @property
    def num_agents(self) -> int:
        return int(self.agent_state.shape[0])

    @property
    def num_steps(self) -> int:
        return int(self.agent_state.shape[1])

    @property
    def num_polylines(self) -> int:
        return int(len(self.map_offsets) - 1)

    def polyline(self, i: int) -> np.ndarray:
        return self.map_points[self.map_offsets[i] : self.map_offsets[i + 1]]

    def polylines(self, kind: MapType | None = None) -> Iterator[tuple[int, np.ndarray]]:
        for i in range(self.num_polylines):
            if kind is None or self.map_type[i] == kind:
                yield i, self.polyline(i)

    def polygon(self, g: int) -> np.ndarray:
        return self.polygon_points[self.polygon_offsets[g] : self.polygon_offsets[g + 1]]

    # ---- checks ----------------------------------------------------------------------------
    def validate(self) -> Scene:
        """Check shapes, dtypes and values; raise :class:`SceneError` naming scene and field."""

        def bad(what: str) -> SceneError:
            return SceneError(f"scene {self.scene_id!r}: {what}")

        s = self.agent_state
        if s.ndim != 3 or s.shape[2] != 5:
            raise bad(f"agent_state must be [N, T, 5], got {list(s.shape)}")
        n, t = s.shape[:2]
        if n == 0 or t < 2:
            raise bad(f"needs at least the ego and 2 steps, got N={n}, T={t}")
        for name, arr, shape in (
            ("agent_size", self.agent_size, (n, 2)),
            ("agent_valid", self.agent_valid, (n, t)),
            ("agent_type", self.agent_type, (n,)),
        ):
            if arr.shape != shape:
                raise bad(f"{name} must have shape {list(shape)}, got {list(arr.shape)}")
        if not 0 <= self.ego_index < n:
            raise bad(f"ego_index {self.ego_index} out of range for {n} agents")
        valid = self.agent_valid
        if not np.isfinite(s[valid]).all():
            rows = np.unique(np.nonzero(~np.isfinite(s).all(-1) & valid)[0])
            raise bad(f"non-finite agent_state on valid steps of agents {rows[:10].tolist()}")
        sizes_needed = valid.any(axis=1)
        if not (np.isfinite(self.agent_size) & (self.agent_size > 0)).all(axis=1)[sizes_needed].all():
            raise bad("agent_size must be finite and > 0 for every agent with a valid step")
        if not valid[self.ego_index, 0]:
            raise bad("the ego is not valid at step 0")
        if self.agent_ids and len(self.agent_ids) != n:
            raise bad(f"agent_ids has {len(self.agent_ids)} entries for {n} agents")
        off = self.map_offsets
        n_lines = len(off) - 1
        if off.ndim != 1 or len(off) < 1 or off[0] != 0 or off[-1] != len(self.map_points) or (
            np.diff(off) < 0
        ).any():
            raise bad("map_offsets must start at 0, be non-decreasing and end at len(map_points)")
        if self.map_points.ndim != 2 or self.map_points.shape[1] != 2:
            raise bad(f"map_points must be [P, 2], got {list(self.map_points.shape)}")
        if not np.isfinite(self.map_points).all():
            raise bad("map_points contain non-finite values")
        for name, arr, length in (
            ("map_type", self.map_type, n_lines),
            ("lane_speed_limit", self.lane_speed_limit, n_lines),
            ("map_width", self.map_width, len(self.map_points)),
        ):
            if arr.shape != (length,):
                raise bad(f"{name} must have shape [{length}], got {list(arr.shape)}")
        if self.lane_links.ndim != 2 or self.lane_links.shape[1] != 3:
            raise bad(f"lane_links must be [E, 3], got {list(self.lane_links.shape)}")
        if len(self.lane_links) and (
            (self.lane_links[:, :2] < 0).any() or (self.lane_links[:, :2] >= n_lines).any()
        ):
            raise bad("lane_links reference polylines that do not exist")
        poff = self.polygon_offsets
        if len(poff) < 1 or poff[0] != 0 or poff[-1] != len(self.polygon_points) or (np.diff(poff) < 0).any():
            raise bad("polygon_offsets must start at 0, be non-decreasing and end at len(polygon_points)")
        n_poly = len(poff) - 1
        if self.polygon_type.shape != (n_poly,) or self.polygon_lane.shape != (n_poly,):
            raise bad("polygon_type and polygon_lane need one entry per polygon")
        if not np.isfinite(self.polygon_points).all():
            raise bad("polygon_points contain non-finite values")
        if self.tl_state.shape != (len(self.tl_lane), t) and len(self.tl_lane):
            raise bad(f"tl_state must be [K, T] = [{len(self.tl_lane)}, {t}], got {list(self.tl_state.shape)}")
        return self

    # ---- (de)serialisation -----------------------------------------------------------------
    _ARRAYS = (
        ("agent_state", "<f4"), ("agent_size", "<f4"), ("agent_valid", "|b1"), ("agent_type", "|i1"),
        ("map_points", "<f4"), ("map_offsets", "<i4"), ("map_type", "|i1"), ("map_width", "<f4"),
        ("lane_speed_limit", "<f4"), ("lane_links", "<i4"), ("polygon_points", "<f4"),
        ("polygon_offsets", "<i4"), ("polygon_type", "|i1"), ("polygon_lane", "<i4"),
        ("tl_lane", "<i4"), ("tl_state", "|i1"),
    )
    _META = ("scene_id", "ego_index", "agent_ids", "ego_rear_axle_to_center", "dataset", "license", "extra")

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays = {name: np.ascontiguousarray(getattr(self, name), dtype=dt) for name, dt in self._ARRAYS}
        meta = {k: getattr(self, k) for k in self._META}
        meta["format_version"] = FORMAT_VERSION
        arrays["meta_json"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], where: str = "<memory>") -> Scene:
        try:
            meta = json.loads(bytes(arrays["meta_json"]).decode())
        except (KeyError, ValueError) as e:
            raise SceneError(f"{where}: missing or unreadable meta_json ({e})") from None
        version = meta.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise SceneError(f"{where}: scene format version {version}, this code reads {FORMAT_VERSION}")
        kwargs = dict(meta)
        for name, dt in cls._ARRAYS:
            if name not in arrays:
                raise SceneError(f"{where}: missing array {name!r}")
            kwargs[name] = np.asarray(arrays[name]).astype(dt.replace("<", "="), copy=False)
        kwargs["agent_valid"] = kwargs["agent_valid"].astype(bool)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in kwargs.items() if k in known})

    def save(self, path: str | os.PathLike) -> None:
        """Write one ``.npz`` atomically (a reader never sees a half-written scene)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **self.to_arrays())  # type: ignore[arg-type]
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; scene sets are shared and pushed to the Hub
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> Scene:
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
            raise SceneError(f"{path}: not a readable scene file ({type(e).__name__}: {e})") from None
        return cls.from_arrays(arrays, str(path)).validate()


# ---- scene sets --------------------------------------------------------------------------------
def index_entry(scene: Scene, file: str) -> dict:
    """The ``index.json`` entry describing ``scene`` stored at ``file`` (relative to the set)."""
    ego = scene.agent_state[scene.ego_index, :, :2][scene.agent_valid[scene.ego_index]]
    path_len = float(np.linalg.norm(np.diff(ego, axis=0), axis=1).sum()) if len(ego) > 1 else 0.0
    return {
        "scene_id": scene.scene_id,
        "file": file,
        "num_agents": scene.num_agents,
        "num_steps": scene.num_steps,
        "num_polylines": scene.num_polylines,
        "num_map_points": int(len(scene.map_points)),
        "ego_path_m": round(path_len, 3),
        "dataset": scene.dataset,
    }


class SceneSet:
    """A scene-set directory: ``index.json`` plus ``scenes/*.npz``."""

    def __init__(self, root: str | os.PathLike, entries: list[dict]):
        self.root = Path(root)
        self.entries = entries
        self._by_id = {e["scene_id"]: e for e in entries}

    # opening ------------------------------------------------------------------------------
    @classmethod
    def open(cls, root: str | os.PathLike) -> SceneSet:
        root = Path(root)
        index = root / "index.json"
        if not index.is_file():
            raise SceneError(f"{root}: not a scene set (no index.json); create one with "
                             "`alpagym-ray scenes generate` or `alpagym-ray scenes import`")
        try:
            data = json.loads(index.read_text())
        except ValueError as e:
            raise SceneError(f"{index}: invalid JSON ({e})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise SceneError(f"{index}: not a {FORMAT_NAME} index")
        if data.get("version") != FORMAT_VERSION:
            raise SceneError(f"{index}: version {data.get('version')}, this code reads {FORMAT_VERSION}")
        entries = data.get("scenes")
        if not isinstance(entries, list) or not all(isinstance(e, dict) and "scene_id" in e and "file" in e
                                                    for e in entries):
            raise SceneError(f"{index}: 'scenes' must be a list of {{scene_id, file, ...}}")
        return cls(root, entries)

    @property
    def ids(self) -> list[str]:
        return [e["scene_id"] for e in self.entries]

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, scene_id: str) -> bool:
        return scene_id in self._by_id

    def entry(self, scene_id: str) -> dict:
        try:
            return self._by_id[scene_id]
        except KeyError:
            import difflib

            close = difflib.get_close_matches(scene_id, self.ids, n=3)
            hint = f"; did you mean {close}?" if close else ""
            raise KeyError(f"scene {scene_id!r} is not in {self.root}{hint}") from None

    def load(self, scene_id: str) -> Scene:
        return Scene.load(self.root / self.entry(scene_id)["file"])

    def load_many(self, ids: Iterable[str] | None = None) -> list[Scene]:
        return [self.load(i) for i in (self.ids if ids is None else ids)]

    # writing ------------------------------------------------------------------------------
    @staticmethod
    def write_index(root: str | os.PathLike, entries: list[dict]) -> None:
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        body = json.dumps({"format": FORMAT_NAME, "version": FORMAT_VERSION, "scenes": entries}, indent=1)
        tmp = root / "index.json.tmp"
        tmp.write_text(body)
        os.replace(tmp, root / "index.json")

    @classmethod
    def create(cls, root: str | os.PathLike, scenes: Iterable[Scene], append: bool = False) -> SceneSet:
        """Write scenes and the index. With ``append``, keep what the directory already holds
        (a scene id already present is replaced)."""
        root = Path(root)
        entries: list[dict] = []
        if append and (root / "index.json").is_file():
            entries = cls.open(root).entries
        by_id = {e["scene_id"]: i for i, e in enumerate(entries)}
        for scene in scenes:
            scene.validate()
            file = f"scenes/{scene_file_name(scene.scene_id)}.npz"
            scene.save(root / file)
            entry = index_entry(scene, file)
            if scene.scene_id in by_id:
                entries[by_id[scene.scene_id]] = entry
            else:
                by_id[scene.scene_id] = len(entries)
                entries.append(entry)
        cls.write_index(root, entries)
        return cls(root, entries)

    @classmethod
    def add_entries(cls, root: str | os.PathLike, scenes: Iterable[Scene]) -> SceneSet:
        return cls.create(root, scenes, append=True)

