"""Per-tick checks and metrics (AlpaSim's names plus drivesim's own), batched over B envs.

Collision: oriented-box overlap (boxes shrunk 2 % as AlpaSim does) after a distance broadphase,
classified front / rear / lateral by the ego's bumper lines; contacts already present in the log
when the policy takes control are ignored until they separate. Off-road: a box corner more than
``tolerance`` outside the drivable area (signed-distance raster), or the box crossing a road edge.
"""

from __future__ import annotations

import torch

from envs.drivesim import geometry, raster
from envs.drivesim.metric_names import (
    DRIVESIM_METRICS,
    MAX_ACCEL_LAT,
    MAX_ACCEL_LON,
    MAX_JERK,
    MAX_JERK_LON,
    MAX_YAW_ACCEL,
    MAX_YAW_RATE,
    MIN_ACCEL_LON,
    TTC_HORIZON_S,
)
from envs.drivesim.tensors import LANE_CELL_M, LANE_MARGIN_M, PATH_STEP_M, SceneTensors

METRIC_INDEX = {name: i for i, name in enumerate(DRIVESIM_METRICS)}
NUM_METRICS = len(METRIC_INDEX)
WINDOW_BACK, WINDOW = 8, 64
"""The projection onto the logged path searches PATH_STEP_M-spaced points from 4 m behind to 28 m
ahead of the previous projection (an ego moves at most ~4 m per tick), so loops never alias."""
BROADPHASE_M = 12.0
NEAR_K = 8
DIST_K = 3
"""Agents given exact box tests per tick (the nearest by centre distance)."""


def ego_box(st: SceneTensors, scene: torch.Tensor, pose: torch.Tensor):
    """Ego box (centre [B, 2], yaw [B], length [B], width [B]) from the rear-axle pose."""
    rac = st.ego_rac[scene]
    c, s = torch.cos(pose[:, 2]), torch.sin(pose[:, 2])
    centre = torch.stack([pose[:, 0] + rac * c, pose[:, 1] + rac * s], -1)
    size = st.agent_size[scene, 0]
    return centre, pose[:, 2], size[:, 0], size[:, 1]


def contacts(st: SceneTensors, scene: torch.Tensor, pose: torch.Tensor, agent_state: torch.Tensor,
             agent_valid: torch.Tensor):
    """Overlap [B, N-1] of the ego box with every other agent's box (broadphase first)."""
    centre, yaw, length, width = ego_box(st, scene, pose)
    other = agent_state[:, 1:]
    osize = st.agent_size[scene, 1:]
    near = agent_valid[:, 1:] & (
        torch.linalg.vector_norm(other[..., :2] - centre[:, None], dim=-1) < BROADPHASE_M
    )
    overlap = geometry.boxes_overlap(
        centre[:, None], yaw[:, None], length[:, None], width[:, None],
        other[..., :2], other[..., 2], osize[..., 0], osize[..., 1], shrink=0.02,
    )
    return overlap & near


def project_on_path(st: SceneTensors, scene: torch.Tensor, centre: torch.Tensor, s_prev: torch.Tensor):
    """Arc length of the ego centre's projection on the logged path, searched near ``s_prev``, and
    the distance to the path: ``(s [B], dist [B])``."""
    base = (s_prev / PATH_STEP_M).long() - WINDOW_BACK
    last = st.path_len[scene] - 1
    idx = (base[:, None] + torch.arange(WINDOW + 1, device=centre.device)).clamp(min=0)
    idx = torch.minimum(idx, last[:, None])
    pts = torch.gather(st.path_xy[scene], 1, idx[..., None].expand(-1, -1, 2))    # [B, W+1, 2]
    d, u = geometry.point_segment_distance(centre[:, None], pts[:, :-1], pts[:, 1:])
    best = d.argmin(dim=1, keepdim=True)
    s = (torch.gather(idx[:, :-1], 1, best).float() + torch.gather(u, 1, best)) * PATH_STEP_M
    return s[:, 0], torch.gather(d, 1, best)[:, 0]


def tick_metrics(
    st: SceneTensors,
    scene: torch.Tensor,       # [B] long
    t: torch.Tensor,           # [B] long, log step of this tick
    t_start: torch.Tensor,     # [B] long, episode start (warm-up start)
    t_end: torch.Tensor,       # [B] long, last step of the episode
    pose: torch.Tensor,        # [B, 3] rear axle
    speed: torch.Tensor,       # [B]
    kin: dict[str, torch.Tensor],  # accel_lon, accel_lat, jerk_lon, jerk, yaw_rate, yaw_accel [B]
    agent_state: torch.Tensor,  # [B, N, 5]
    agent_valid: torch.Tensor,  # [B, N]
    ignore: torch.Tensor,      # [B, N-1] contacts present at the start, still ongoing
    s_prev: torch.Tensor,      # [B] previous projection on the logged path
    dist_traveled: torch.Tensor,  # [B] after this tick
    tolerance: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Metrics of one tick: ``(values [B, NUM_METRICS] (NaN = not defined), ignore, s_proj)``."""
    B = pose.shape[0]
    m = torch.full((B, NUM_METRICS), float("nan"), device=pose.device)

    def put(name: str, value: torch.Tensor) -> None:
        m[:, METRIC_INDEX[name]] = value.float()

    centre, yaw, length, width = ego_box(st, scene, pose)
    valid_all = agent_valid[:, 1:]
    n_other = valid_all.shape[1]

    # broadphase: exact box tests only for the K agents nearest the ego (no more than K boxes can
    # be within a car length of the ego); the rest can neither touch nor be the closest obstacle
    dist_c = torch.linalg.vector_norm(agent_state[:, 1:, :2] - centre[:, None], dim=-1)
    dist_c = torch.where(valid_all, dist_c, torch.full_like(dist_c, float("inf")))
    k = min(NEAR_K, n_other)
    _, near = torch.topk(dist_c, k, dim=1, largest=False)                         # [B, K]
    other = torch.gather(agent_state[:, 1:], 1, near[..., None].expand(-1, -1, 5))
    osize = torch.gather(st.agent_size[scene, 1:], 1, near[..., None].expand(-1, -1, 2))
    valid = torch.gather(valid_all, 1, near)
    ego_args = (centre[:, None], yaw[:, None], length[:, None], width[:, None])
    other_args = (other[..., :2], other[..., 2], osize[..., 0], osize[..., 1])

    # collisions (contacts present when the policy took control are ignored until they separate)
    overlap_k = geometry.boxes_overlap(*ego_args, *other_args, shrink=0.02) & valid
    overlap = torch.zeros_like(valid_all).scatter(1, near, overlap_k)
    ignore = ignore & overlap
    hit_k = overlap_k & ~torch.gather(ignore, 1, near)
    front = rear = lateral = torch.zeros_like(hit_k)
    # rare: on the CPU classify only then (the bumper-line tests are the costly part); on a GPU
    # asking would stall the stream once per tick, which costs more than the tests
    if hit_k.device.type != "cpu" or bool(hit_k.any()):
        front, rear, lateral = geometry.classify_collision(*ego_args, *other_args)
    put("collision_front", (hit_k & front).any(1))
    put("collision_rear", (hit_k & rear).any(1))
    put("collision_lateral", (hit_k & lateral).any(1))
    put("collision_any", hit_k.any(1))
    put("collision_at_fault_tick", (hit_k & (front | lateral)).any(1))
    # the closest obstacle is among the few nearest centres (exact distance on DIST_K of them)
    kd = min(DIST_K, k)
    dist = geometry.box_distance(*(a[:, :1] for a in ego_args), *(a[:, :kd] for a in other_args))
    dist = torch.where(valid[:, :kd], dist, torch.full_like(dist, float("inf")))
    dmin = dist.amin(1) if kd else torch.full((B,), float("inf"), device=pose.device)
    put("min_distance_to_obstacle_m", torch.where(torch.isfinite(dmin), dmin, torch.full_like(dmin, float("nan"))))

    # time to collision: exact for translating boxes, on the K agents with the smallest lower bound
    # (centre distance minus both circumradii, over the closing speed)
    c, s = torch.cos(yaw), torch.sin(yaw)
    ego_vel = torch.stack([speed * c, speed * s], -1)
    rel_speed = torch.linalg.vector_norm(agent_state[:, 1:, 3:5] - ego_vel[:, None], dim=-1)
    radii = 0.5 * (torch.hypot(length, width)[:, None] + torch.linalg.vector_norm(st.agent_size[scene, 1:], dim=-1))
    t_lb = (dist_c - radii).clamp(min=0.0) / rel_speed.clamp(min=1e-3)
    _, soon = torch.topk(t_lb, k, dim=1, largest=False)
    o2 = torch.gather(agent_state[:, 1:], 1, soon[..., None].expand(-1, -1, 5))
    s2 = torch.gather(st.agent_size[scene, 1:], 1, soon[..., None].expand(-1, -1, 2))
    ttc = geometry.time_to_collision(
        *ego_args, ego_vel[:, None], o2[..., :2], o2[..., 2], s2[..., 0], s2[..., 1], o2[..., 3:5],
        horizon=TTC_HORIZON_S,
    )
    ok = torch.gather(valid_all & ~ignore, 1, soon)
    ttc = torch.where(ok, ttc, torch.full_like(ttc, TTC_HORIZON_S))
    put("ttc_s", ttc.amin(1) if k else torch.full((B,), TTC_HORIZON_S, device=pose.device))

    # road: drivable area, road edges, lanes
    corners = geometry.box_corners(centre, yaw, length, width)                       # [B, 4, 2]
    sdf = raster.sample_sdf(st.sdf, st.sdf_origin, st.sdf_resolution, scene, corners)  # [B, 4]
    edge_idx = raster.lookup_cells(st.edge_cells, st.grid_origin, LANE_CELL_M, scene, centre)
    crosses = raster.box_crosses_segments(corners, edge_idx, st.edges, scene_idx=scene)
    put("offroad", (sdf.amax(1) > tolerance) | crosses)
    put("min_distance_to_lane_boundary_m", (-sdf.amax(1)).clamp(min=0.0))
    lane_idx = raster.lookup_cells(st.lane_cells, st.grid_origin, LANE_CELL_M, scene, centre)
    lane_seg = st.lanes[scene[:, None], lane_idx.clamp(min=0)]                         # [B, C, 5]
    d_lane, _ = geometry.point_segment_distance(centre[:, None], lane_seg[..., 0:2], lane_seg[..., 2:4])
    d_lane = torch.where(lane_idx >= 0, d_lane, torch.full_like(d_lane, float("inf")))
    # lanes are indexed within LANE_MARGIN_M of each cell: farther is reported as that cap
    put("lane_center_distance_m", d_lane.amin(1).clamp(max=LANE_MARGIN_M))
    heading = torch.atan2(lane_seg[..., 3] - lane_seg[..., 1], lane_seg[..., 2] - lane_seg[..., 0])
    containing = d_lane < lane_seg[..., 4].clamp(min=0.5)
    opposite = geometry.wrap_angle(heading - yaw[:, None]).abs() > (2.0 * torch.pi / 3.0)
    # wrong way: inside at least one lane and every lane containing the centre points > 120° away
    put("wrong_lane", containing.any(1) & (opposite | ~containing).all(1))

    # progress along the logged ego path
    s_proj, d_path = project_on_path(st, scene, centre, s_prev)
    s0 = torch.gather(st.log_s[scene], 1, t_start[:, None])[:, 0]
    s_end = torch.gather(st.log_s[scene], 1, t_end[:, None])[:, 0]
    s_now = torch.gather(st.log_s[scene], 1, t.clamp(max=st.log_s.shape[1] - 1)[:, None])[:, 0]
    gt_len = s_end - s0
    put("progress", (s_proj - s0) / gt_len.clamp(min=1e-3))
    logged_so_far = s_now - s0
    rel = torch.where(logged_so_far > 0.5, (s_proj - s0).clamp(max=logged_so_far) / logged_so_far.clamp(min=1e-3),
                      torch.ones_like(s_proj))
    put("progress_rel", rel)
    put("dist_to_gt_trajectory", d_path)
    tt = t.clamp(max=st.agent_state.shape[2] - 1)
    log_centre = st.agent_state[scene, 0, tt, :2]
    put("dist_to_gt_location", torch.linalg.vector_norm(centre - log_centre, dim=-1))
    put("dist_traveled_m", dist_traveled)
    put("gt_dist_traveled_m", gt_len)
    put("eval_relevant", torch.ones(B, device=pose.device))

    # comfort
    put("speed_mps", speed)
    for name, key in (("accel_lon_mps2", "accel_lon"), ("accel_lat_mps2", "accel_lat"),
                      ("jerk_lon_mps3", "jerk_lon"), ("jerk_mps3", "jerk"), ("yaw_rate_rps", "yaw_rate"),
                      ("yaw_accel_rps2", "yaw_accel")):
        put(name, kin[key])
    bad = (
        (kin["accel_lon"] < MIN_ACCEL_LON) | (kin["accel_lon"] > MAX_ACCEL_LON)
        | (kin["accel_lat"].abs() > MAX_ACCEL_LAT) | (kin["jerk_lon"].abs() > MAX_JERK_LON)
        | (kin["jerk"].abs() > MAX_JERK) | (kin["yaw_rate"].abs() > MAX_YAW_RATE)
        | (kin["yaw_accel"].abs() > MAX_YAW_ACCEL)
    )
    put("comfort_violation", bad)
    return m, ignore, s_proj
