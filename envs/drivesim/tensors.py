"""Padded torch tensors of S loaded scenes plus their precomputed spatial look-ups.

B environments share these S scenes (GRPO runs G episodes per scene), so memory grows with S, not
B. Everything per-scene that the step needs is computed here once: the logged ego path and its arc
length, map segments with observation features, the nearest-segment grid, the drivable-area signed
distance raster, the road-edge and lane segment grids, and (for reactive agents) agent paths.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from envs.drivesim import raster
from envs.drivesim.config import DriveSimConfig
from envs.drivesim.scene import DEFAULT_LANE_WIDTH, AgentType, MapType, Scene, SceneError

PATH_STEP_M = 0.5
"""Resolution of the resampled logged ego path (progress, route, distance to the path)."""
GRID_CELL_M = 10.0
LANE_CELL_M = 5.0
LANE_MARGIN_M = 3.5
EDGE_MARGIN_M = 4.0
"""Road edges within this distance of a 5 m cell are indexed: covers a box of up to ~7.5 m x 2.6 m
whose centre lies in the cell (a longer vehicle may miss an edge crossing at its far end)."""
"""Lane centre lines within this distance of a 5 m cell are indexed (lane-keeping metrics)."""
MAP_FEATURES_RAW = 12  # x0, y0, x1, y1, half_width, speed_limit, lane, boundary, edge, crosswalk, tl_index, heading


def _ego_rear_axle(scene: Scene) -> tuple[np.ndarray, float]:
    """Logged ego rear-axle poses ``[T, 3]`` and the rear-axle-to-centre distance."""
    e = scene.ego_index
    length = float(scene.agent_size[e, 0])
    rac = scene.ego_rear_axle_to_center if scene.ego_rear_axle_to_center is not None else 0.3 * length
    st = scene.agent_state[e]
    pose = np.stack([st[:, 0] - rac * np.cos(st[:, 2]), st[:, 1] - rac * np.sin(st[:, 2]), st[:, 2]], -1)
    return pose.astype(np.float32), float(rac)


def _resample_path(xy: np.ndarray, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Polyline ``[P, 2]`` resampled every ``step`` m: (points [R, 2], arc length [R])."""
    seg = np.linalg.norm(np.diff(xy, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    total = s[-1]
    r = np.arange(0.0, total + 1e-6, step) if total > 0 else np.zeros(1)
    keep = np.concatenate([[True], seg > 1e-6])  # drop repeated points (stopped ego) for interp
    px = np.interp(r, s[keep], xy[keep, 0])
    py = np.interp(r, s[keep], xy[keep, 1])
    return np.stack([px, py], -1).astype(np.float32), r.astype(np.float32)


def _map_segments(scene: Scene, max_len: float) -> np.ndarray:
    """Every map polyline cut into segments of at most ``max_len`` m: ``[M, MAP_FEATURES_RAW]``."""
    tl_of_lane = {int(lane): k for k, lane in enumerate(scene.tl_lane)}
    rows = []
    for i in range(scene.num_polylines):
        pts = scene.polyline(i)
        if len(pts) < 2:
            continue  # a single point carries no direction; polygons give crosswalks their area
        kind = int(scene.map_type[i])
        widths = scene.map_width[scene.map_offsets[i] : scene.map_offsets[i + 1]]
        a, b = pts[:-1], pts[1:]
        seg_len = np.linalg.norm(b - a, axis=1)
        n_sub = np.maximum(1, np.ceil(seg_len / max_len).astype(int))
        idx = np.repeat(np.arange(len(a)), n_sub)
        frac0 = np.concatenate([np.arange(n) / n for n in n_sub])
        frac1 = np.concatenate([(np.arange(n) + 1) / n for n in n_sub])
        p0 = a[idx] + (b[idx] - a[idx]) * frac0[:, None]
        p1 = a[idx] + (b[idx] - a[idx]) * frac1[:, None]
        keep = np.linalg.norm(p1 - p0, axis=1) > 1e-3
        p0, p1, idx = p0[keep], p1[keep], idx[keep]
        w = widths[idx]
        w = np.where(np.isfinite(w), w, DEFAULT_LANE_WIDTH if kind == MapType.LANE else 0.0)
        speed = scene.lane_speed_limit[i] if np.isfinite(scene.lane_speed_limit[i]) else 0.0
        f = np.zeros((len(p0), MAP_FEATURES_RAW), dtype=np.float32)
        f[:, 0:2], f[:, 2:4] = p0, p1
        f[:, 4] = 0.5 * w if kind == MapType.LANE else 0.0
        f[:, 5] = speed
        f[:, 6] = kind == MapType.LANE
        f[:, 7] = kind == MapType.LANE_BOUNDARY
        f[:, 8] = kind == MapType.ROAD_EDGE
        f[:, 9] = kind == MapType.CROSSWALK
        f[:, 10] = tl_of_lane.get(i, -1)
        f[:, 11] = np.arctan2(p1[:, 1] - p0[:, 1], p1[:, 0] - p0[:, 0])
        rows.append(f)
    for g in range(len(scene.polygon_offsets) - 1):  # crosswalk polygons become outline segments
        if scene.polygon_type[g] != 1:
            continue
        poly = scene.polygon(g)
        if len(poly) < 3:
            continue
        p0, p1 = poly, np.roll(poly, -1, axis=0)
        f = np.zeros((len(p0), MAP_FEATURES_RAW), dtype=np.float32)
        f[:, 0:2], f[:, 2:4], f[:, 9], f[:, 10] = p0, p1, 1.0, -1
        f[:, 11] = np.arctan2(p1[:, 1] - p0[:, 1], p1[:, 0] - p0[:, 0])
        rows.append(f)
    if not rows:
        return np.zeros((0, MAP_FEATURES_RAW), dtype=np.float32)
    return np.concatenate(rows)


def _pad(arrays: list[np.ndarray], fill: float = 0.0, dtype=None) -> np.ndarray:
    """Stack arrays of different leading sizes, padding every axis to the maximum."""
    shape = tuple(max(a.shape[d] for a in arrays) for d in range(arrays[0].ndim))
    out = np.full((len(arrays),) + shape, fill, dtype=dtype or arrays[0].dtype)
    for i, a in enumerate(arrays):
        out[(i,) + tuple(slice(0, n) for n in a.shape)] = a
    return out


def _select_agents(scene: Scene, cap: int | None) -> np.ndarray:
    """Indices of the agents to keep: the ego first, then the nearest to the logged ego path."""
    n = scene.num_agents
    order = [scene.ego_index] + [i for i in range(n) if i != scene.ego_index]
    if cap is None or n <= cap:
        return np.asarray(order)
    ego = scene.agent_state[scene.ego_index, :, :2][scene.agent_valid[scene.ego_index]]
    others = np.asarray(order[1:])
    d = np.full(len(others), np.inf)
    for k, i in enumerate(others):
        pos = scene.agent_state[i, :, :2][scene.agent_valid[i]]
        if len(pos):
            d[k] = np.min(np.linalg.norm(pos[:, None, :] - ego[None, ::5, :], axis=-1))
    keep = others[np.argsort(d, kind="stable")[: cap - 1]]
    return np.concatenate([[scene.ego_index], np.sort(keep)])


@dataclass
class SceneTensors:
    """The S loaded scenes, padded, on one device. Agent row 0 of every scene is the ego."""

    scene_ids: list[str]
    num_steps: torch.Tensor        # [S] long, T of each scene
    agent_state: torch.Tensor      # [S, N, T, 5] x, y, heading, vx, vy (box centres)
    agent_valid: torch.Tensor      # [S, N, T] bool
    agent_size: torch.Tensor       # [S, N, 2] length, width
    agent_type: torch.Tensor       # [S, N] long AgentType
    ego_rac: torch.Tensor          # [S] rear axle to box centre (m)
    ego_log_pose: torch.Tensor     # [S, T, 3] logged rear-axle poses
    path_xy: torch.Tensor          # [S, R, 2] logged ego centre path, resampled every PATH_STEP_M
    path_len: torch.Tensor         # [S] number of valid path samples
    log_s: torch.Tensor            # [S, T] arc length of the logged centre at each step
    seg: torch.Tensor              # [S, M, MAP_FEATURES_RAW] map segments (world frame)
    seg_valid: torch.Tensor        # [S, M] bool
    tl_state: torch.Tensor         # [S, K, T] long LightState (K >= 1, padded)
    map_cells: torch.Tensor        # [S, Gy, Gx, K_obs] nearest segments per cell (-1 pad)
    lanes: torch.Tensor            # [S, L, 5] lane centre segments: x0, y0, x1, y1, half_width
    lane_cells: torch.Tensor       # [S, Gy, Gx, C] rows of `lanes` near each cell (-1 pad)
    edge_cells: torch.Tensor       # [S, Gy, Gx, C] road-edge segments near each cell (-1 pad)
    edges: torch.Tensor            # [S, E, 4] road-edge segments
    grid_origin: torch.Tensor      # [S, 2] lower-left corner of the grids
    sdf: torch.Tensor              # [S, H, W] drivable-area signed distance (m, > 0 outside)
    sdf_origin: torch.Tensor       # [S, 2] world position of sdf cell [0, 0]'s centre
    sdf_resolution: float
    grid_cell: float
    agent_paths: object | None = None  # agents.build_agent_paths output (reactive IDM only)
    any_traffic_light: bool = True     # some map segment is controlled by a light (decided on the host)

    @property
    def num_scenes(self) -> int:
        return len(self.scene_ids)

    @classmethod
    def build(cls, scenes: list[Scene], config: DriveSimConfig, device: str | torch.device = "cpu",
              obs_points: int = 256) -> SceneTensors:
        if not scenes:
            raise SceneError("drivesim needs at least one scene")
        per: dict[str, list] = {k: [] for k in (
            "state", "valid", "size", "type", "pose", "path", "plen", "log_s", "seg", "tl",
            "rac", "T", "lanes")}
        rasters, map_grids, lane_grids, edge_grids, edge_segs, origins = [], [], [], [], [], []
        for scene in scenes:
            scene.validate()
            keep = _select_agents(scene, config.max_agents)
            per["state"].append(scene.agent_state[keep])
            per["valid"].append(scene.agent_valid[keep])
            per["size"].append(scene.agent_size[keep])
            per["type"].append(scene.agent_type[keep].astype(np.int64))
            pose, rac = _ego_rear_axle(scene)
            # carry the last valid pose forward over invalid ego steps so the log stays usable
            ev = scene.agent_valid[scene.ego_index]
            last = np.maximum.accumulate(np.where(ev, np.arange(len(ev)), 0))
            pose = pose[last]
            per["pose"].append(pose)
            per["rac"].append(rac)
            per["T"].append(scene.num_steps)
            centre = scene.agent_state[scene.ego_index, :, :2][last]
            path, r = _resample_path(centre.astype(np.float64), PATH_STEP_M)
            per["path"].append(path)
            per["plen"].append(len(path))
            step_len = np.linalg.norm(np.diff(centre, axis=0), axis=1)
            per["log_s"].append(np.concatenate([[0.0], np.cumsum(step_len)]).astype(np.float32))
            seg = _map_segments(scene, config.map_segment_m)
            if config.max_map_points is not None and len(seg) > config.max_map_points:
                mid = 0.5 * (seg[:, 0:2] + seg[:, 2:4])
                d = np.min(np.linalg.norm(mid[:, None] - path[None, ::10], axis=-1), axis=1)
                seg = seg[np.sort(np.argsort(d)[: config.max_map_points])]
            per["seg"].append(seg)
            per["tl"].append(scene.tl_state.astype(np.int64) if len(scene.tl_lane)
                             else np.zeros((1, scene.num_steps), dtype=np.int64))
            bounds = raster.scene_bounds(scene, margin=30.0)
            rasters.append(raster.build_drivable_raster(scene, resolution=config.raster_resolution_m,
                                                        bounds=bounds))
            mids = 0.5 * (seg[:, 0:2] + seg[:, 2:4]) if len(seg) else np.zeros((0, 2), np.float32)
            map_grids.append(raster.build_nearest_grid(mids, bounds, cell=GRID_CELL_M, k=obs_points))
            lane_seg = seg[seg[:, 6] > 0][:, 0:5] if len(seg) else np.zeros((0, 5), np.float32)
            per["lanes"].append(lane_seg if len(lane_seg) else np.zeros((1, 5), np.float32))
            lane_grids.append(raster.build_segment_grid(lane_seg[:, :4], bounds, cell=LANE_CELL_M,
                                                        margin=LANE_MARGIN_M, cap=96))
            edge = raster.road_edge_segments(scene)
            edge_segs.append(edge if len(edge) else np.zeros((1, 4), np.float32))
            edge_grids.append(raster.build_segment_grid(edge, bounds, cell=LANE_CELL_M, margin=EDGE_MARGIN_M,
                                                        cap=128))
            origins.append(bounds[:2])
        sdf, sdf_origin = raster.stack_rasters(rasters)
        t = lambda a, dt=torch.float32: torch.as_tensor(a, dtype=dt, device=device)  # noqa: E731
        tensors = cls(
            scene_ids=[s.scene_id for s in scenes],
            num_steps=t(np.asarray(per["T"]), torch.long),
            agent_state=t(_pad(per["state"])),
            agent_valid=t(_pad(per["valid"], fill=False), torch.bool),
            agent_size=t(_pad(per["size"], fill=1.0)),
            agent_type=t(_pad(per["type"], fill=int(AgentType.UNSET)), torch.long),
            ego_rac=t(np.asarray(per["rac"], dtype=np.float32)),
            ego_log_pose=t(_pad_edge(per["pose"])),
            path_xy=t(_pad_edge(per["path"])),
            path_len=t(np.asarray(per["plen"]), torch.long),
            log_s=t(_pad_edge(per["log_s"])),
            seg=t(_pad(per["seg"]) if any(len(s) for s in per["seg"]) else
                  np.zeros((len(scenes), 1, MAP_FEATURES_RAW), np.float32)),
            seg_valid=t(_pad([np.ones(len(s), bool) for s in per["seg"]], fill=False)
                        if any(len(s) for s in per["seg"]) else np.zeros((len(scenes), 1), bool), torch.bool),
            tl_state=t(_pad(per["tl"]), torch.long),
            map_cells=t(raster.stack_grids([g.cells for g in map_grids]), torch.long),
            lanes=t(_pad(per["lanes"])),
            lane_cells=t(raster.stack_grids([g.cells for g in lane_grids]), torch.long),
            edge_cells=t(raster.stack_grids([g.cells for g in edge_grids]), torch.long),
            edges=t(_pad(edge_segs)),
            grid_origin=t(np.asarray(origins, dtype=np.float32)),
            sdf=t(sdf),
            sdf_origin=t(sdf_origin),
            sdf_resolution=float(config.raster_resolution_m),
            grid_cell=GRID_CELL_M,
            # known at build time, so observing never asks the device (a GPU sync per decision)
            any_traffic_light=any(len(g) and bool((g[:, 10] >= 0).any()) for g in per["seg"]),
        )
        if config.agents == "idm":
            from envs.drivesim import agents

            tensors.agent_paths = agents.build_agent_paths(
                tensors.agent_state, tensors.agent_valid, tensors.agent_size)
        return tensors


def _pad_edge(arrays: list[np.ndarray]) -> np.ndarray:
    """Stack along a new axis, padding the first axis by repeating each array's last row."""
    n = max(len(a) for a in arrays)
    return np.stack([np.concatenate([a, np.repeat(a[-1:], n - len(a), axis=0)]) for a in arrays])
