"""Observation builders: the DESIGN.md table from the simulator state, batched over B envs.

Every function returns ``(value [B, *shape], mask [B, shape[0]])`` in the current ego frame
(rear-axle origin, x forward, y left). They only gather and transform; no Python loop over envs.
"""

from __future__ import annotations

import torch

from alpagym_ray.observations import AGENTS, BEV_SIZE, GT_LEN, MAP_POINTS, ROUTE_LEN
from envs.drivesim import raster
from envs.drivesim.geometry import to_frame, wrap_angle
from envs.drivesim.scene import AgentType, LightState
from envs.drivesim.tensors import PATH_STEP_M, SceneTensors


def ego_history(hist: torch.Tensor, hist_valid: torch.Tensor, pose: torch.Tensor):
    """``hist [B, 16, 6]`` world-frame (x, y, yaw, speed, accel, yaw_rate), oldest first."""
    xy = to_frame(hist[..., :2], pose[:, None, :2], pose[:, None, 2])
    dyaw = wrap_angle(hist[..., 2] - pose[:, None, 2])
    out = torch.stack([xy[..., 0], xy[..., 1], torch.cos(dyaw), torch.sin(dyaw),
                       hist[..., 3], hist[..., 4], hist[..., 5]], dim=-1)
    return out * hist_valid[..., None], hist_valid.clone()


def path_points_at(st: SceneTensors, scene: torch.Tensor, s: torch.Tensor):
    """Positions on the logged ego path at arc lengths ``s [B, K]``: ``[B, K, 2]`` and in-range mask."""
    f = s / PATH_STEP_M
    last = (st.path_len[scene] - 1)[:, None]
    i0 = f.floor().long().clamp(min=0)
    i0 = torch.minimum(i0, (last - 1).clamp(min=0))
    i1 = torch.minimum(i0 + 1, last)
    w = (f - i0.float()).clamp(0.0, 1.0)[..., None]
    path = st.path_xy[scene]  # [B, R, 2]
    p0 = torch.gather(path, 1, i0[..., None].expand(-1, -1, 2))
    p1 = torch.gather(path, 1, i1[..., None].expand(-1, -1, 2))
    inside = (s >= 0) & (f <= last.float() + 1e-4)
    return p0 + (p1 - p0) * w, inside


def route(st: SceneTensors, scene: torch.Tensor, s_proj: torch.Tensor, pose: torch.Tensor, spacing: float):
    """AlpaSim's route: ROUTE_LEN waypoints ``spacing`` m apart ahead of the ego's projection on the
    logged path, masked beyond its end (AlpaSim NaN-pads there)."""
    k = torch.arange(1, ROUTE_LEN + 1, device=pose.device, dtype=pose.dtype)
    pts, inside = path_points_at(st, scene, s_proj[:, None] + spacing * k)
    xy = to_frame(pts, pose[:, None, :2], pose[:, None, 2])
    out = torch.cat([xy, torch.zeros_like(xy[..., :1])], dim=-1)
    return out * inside[..., None], inside


def gt_trajectory(st: SceneTensors, scene: torch.Tensor, t: torch.Tensor, pose: torch.Tensor):
    """The recorded rear-axle future at t + 0.1 k s, k = 1..64, in the ego frame."""
    k = torch.arange(1, GT_LEN + 1, device=t.device)
    steps = t[:, None] + k                                          # [B, 64]
    T = st.agent_state.shape[2]
    inside = steps < st.num_steps[scene][:, None]
    steps = steps.clamp(max=T - 1)
    log = st.ego_log_pose[scene]                                    # [B, T, 3]
    fut = torch.gather(log, 1, steps[..., None].expand(-1, -1, 3))
    valid = inside & torch.gather(st.agent_valid[scene, 0], 1, steps)
    xy = to_frame(fut[..., :2], pose[:, None, :2], pose[:, None, 2])
    yaw = wrap_angle(fut[..., 2] - pose[:, None, 2])
    out = torch.cat([xy, yaw[..., None]], dim=-1)
    return out * valid[..., None], valid


def map_points(st: SceneTensors, scene: torch.Tensor, t: torch.Tensor, pose: torch.Tensor):
    """The MAP_POINTS map segments nearest the ego (precomputed per grid cell)."""
    idx = raster.lookup_cells(st.map_cells, st.grid_origin, st.grid_cell, scene, pose[:, :2])
    idx = idx[:, :MAP_POINTS]
    valid = idx >= 0
    M = st.seg.shape[1]
    flat = (scene[:, None] * M + idx.clamp(min=0)).reshape(-1)
    seg = st.seg.reshape(-1, st.seg.shape[2]).index_select(0, flat).reshape(*idx.shape, -1)  # [B, K, F_raw]
    c, s = torch.cos(pose[:, 2])[:, None], torch.sin(pose[:, 2])[:, None]
    rel = seg[..., 0:2] - pose[:, None, :2]
    d = seg[..., 2:4] - seg[..., 0:2]
    xy = torch.stack([c * rel[..., 0] + s * rel[..., 1], -s * rel[..., 0] + c * rel[..., 1],
                      c * d[..., 0] + s * d[..., 1], -s * d[..., 0] + c * d[..., 1]], dim=-1)
    tl_idx = seg[..., 10].long()
    has_tl = tl_idx >= 0
    tl_stop = torch.zeros_like(seg[..., 10])
    if st.any_traffic_light:  # most maps have no traffic lights: skip the gather then
        T = st.tl_state.shape[2]
        tl = st.tl_state[scene[:, None], tl_idx.clamp(min=0), t.clamp(max=T - 1)[:, None]]
        tl_stop = (has_tl & (tl == int(LightState.STOP))).float()
    out = torch.cat([xy, seg[..., 4:10], tl_stop[..., None]], dim=-1)
    if out.shape[1] < MAP_POINTS:  # small scenes: pad to the fixed size
        pad = MAP_POINTS - out.shape[1]
        out = torch.nn.functional.pad(out, (0, 0, 0, pad))
        valid = torch.nn.functional.pad(valid, (0, pad))
    return out * valid[..., None], valid


def agents(agent_state: torch.Tensor, agent_valid: torch.Tensor, size: torch.Tensor, atype: torch.Tensor,
           pose: torch.Tensor):
    """The AGENTS nearest other agents (row 0, the ego, excluded).

    agent_state [B, N, 5] world (x, y, heading, vx, vy), agent_valid [B, N], size [B, N, 2],
    atype [B, N]."""
    others = agent_state[:, 1:]
    valid = agent_valid[:, 1:]
    d = torch.linalg.vector_norm(others[..., :2] - pose[:, None, :2], dim=-1)
    d = torch.where(valid, d, torch.full_like(d, float("inf")))
    k = min(AGENTS, d.shape[1])
    dist, order = torch.topk(d, k, dim=1, largest=False)
    sel = torch.gather(others, 1, order[..., None].expand(-1, -1, 5))
    sel_size = torch.gather(size[:, 1:], 1, order[..., None].expand(-1, -1, 2))
    sel_type = torch.gather(atype[:, 1:], 1, order)
    mask = torch.isfinite(dist)
    xy = to_frame(sel[..., :2], pose[:, None, :2], pose[:, None, 2])
    dyaw = sel[..., 2] - pose[:, None, 2]
    c, s = torch.cos(pose[:, 2])[:, None], torch.sin(pose[:, 2])[:, None]
    vx, vy = c * sel[..., 3] + s * sel[..., 4], -s * sel[..., 3] + c * sel[..., 4]
    out = torch.stack([xy[..., 0], xy[..., 1], torch.cos(dyaw), torch.sin(dyaw), vx, vy,
                       sel_size[..., 0], sel_size[..., 1],
                       (sel_type == int(AgentType.VEHICLE)).float(),
                       (sel_type == int(AgentType.PEDESTRIAN)).float(),
                       (sel_type == int(AgentType.CYCLIST)).float()], dim=-1)
    if k < AGENTS:
        out = torch.nn.functional.pad(out, (0, 0, 0, AGENTS - k))
        mask = torch.nn.functional.pad(mask, (0, AGENTS - k))
    return out * mask[..., None], mask


def bev(st: SceneTensors, scene: torch.Tensor, pose: torch.Tensor, agent_state: torch.Tensor,
        agent_valid: torch.Tensor, size: torch.Tensor, route_xy: torch.Tensor, route_mask: torch.Tensor,
        extent_m: float = 40.0):
    """A [3, BEV_SIZE, BEV_SIZE] raster ahead-centred on the ego: drivable area, other agents'
    boxes, route waypoints (each 0/1). Rows run from far ahead (row 0) to behind."""
    n = BEV_SIZE
    lin = (torch.arange(n, device=pose.device, dtype=pose.dtype) + 0.5) / n
    fwd = extent_m * (0.75 - lin)            # 30 m ahead .. 10 m behind
    left = extent_m * (0.5 - lin)            # 20 m left .. 20 m right
    gx, gy = torch.meshgrid(fwd, left, indexing="ij")
    local = torch.stack([gx, gy], -1).reshape(1, n * n, 2)
    c, s = torch.cos(pose[:, 2])[:, None], torch.sin(pose[:, 2])[:, None]
    wx = pose[:, None, 0] + c * local[..., 0] - s * local[..., 1]
    wy = pose[:, None, 1] + s * local[..., 0] + c * local[..., 1]
    world = torch.stack([wx, wy], -1)                                   # [B, n*n, 2]
    drivable = (raster.sample_sdf(st.sdf, st.sdf_origin, st.sdf_resolution, scene, world) < 0).float()
    rel = world[:, :, None, :] - agent_state[:, None, 1:, :2]           # [B, n*n, N-1, 2]
    ca, sa = torch.cos(agent_state[:, None, 1:, 2]), torch.sin(agent_state[:, None, 1:, 2])
    lon = ca * rel[..., 0] + sa * rel[..., 1]
    lat = -sa * rel[..., 0] + ca * rel[..., 1]
    inside = (lon.abs() <= size[:, None, 1:, 0] / 2) & (lat.abs() <= size[:, None, 1:, 1] / 2)
    occupied = (inside & agent_valid[:, None, 1:]).any(-1).float()
    d_route = torch.cdist(local.expand(pose.shape[0], -1, -1), route_xy[..., :2])
    d_route = torch.where(route_mask[:, None, :], d_route, torch.full_like(d_route, float("inf")))
    on_route = (d_route.amin(-1) < 1.5).float()
    out = torch.stack([drivable, occupied, on_route], 1).reshape(-1, 3, n, n)
    return out, torch.ones(out.shape[:2], dtype=torch.bool, device=out.device)
