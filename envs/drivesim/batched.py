"""drivesim's batched environment: B envs over S shared scenes, one code path on CPU and GPU.

``reset`` places every env at ``start_step + warmup_ticks`` of its scene's log (the warm-up is a
replay of the logged ego, so it is taken directly from the log); ``step`` takes one decision per
env (a trajectory of H ego-frame poses, or an (acceleration, curvature) pair) and advances
``decision_every`` ticks of 0.1 s: controller → bicycle model → other agents → checks → metrics.
No autoreset: an ended env keeps its final state until it is reset.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from alpagym_ray.metrics import episode_metrics
from alpagym_ray.observations import EGO_HISTORY_LEN, mask_key
from envs.drivesim import agents as agents_mod
from envs.drivesim import checks, dynamics, observe
from envs.drivesim.config import DriveSimConfig
from envs.drivesim.geometry import wrap_angle
from envs.drivesim.metric_names import DRIVESIM_METRICS, EPISODE_METRIC_NAMES
from envs.drivesim.scene import DT, Scene
from envs.drivesim.tensors import SceneTensors

RewardFn = Callable[[dict[str, torch.Tensor], dict[str, Any]], torch.Tensor]
"""Optional dense reward: (per-tick metrics of the decision {name: [B, k]}, info) -> reward [B]."""


def progress_reward(metrics: dict[str, torch.Tensor], info: dict[str, Any]) -> torch.Tensor:
    """Default dense reward: progress gained along the logged path during the decision."""
    return info["progress_gain"]


class DriveSimBatch:
    """The batched drivesim env (``alpagym_ray.env_protocol.BatchedEnv``)."""

    def __init__(
        self,
        scenes: Sequence[Scene],
        num_envs: int,
        config: DriveSimConfig | None = None,
        device: str | torch.device = "cpu",
        reward_fn: RewardFn | None = None,
    ):
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        self.cfg = config or DriveSimConfig()
        self.device = torch.device(device)
        self.scenes = list(scenes)
        self.st = SceneTensors.build(self.scenes, self.cfg, self.device)
        self.scene_index = {sid: i for i, sid in enumerate(self.st.scene_ids)}
        self.num_envs = num_envs
        self.decision_every = self.cfg.decision_every
        self.obs_keys = tuple(self.cfg.obs_keys)
        self.metric_names = EPISODE_METRIC_NAMES
        self.metric_aggregations = dict(DRIVESIM_METRICS)
        self.reward_fn = reward_fn or progress_reward
        self.limits = dynamics.VehicleLimits()
        self.ctrl = dynamics.ControllerConfig()
        self.idm_params = agents_mod.IDMParams()
        self.max_ticks = int(self.st.num_steps.max())
        # host copies for reset's per-env checks (reading the device per env syncs it 2 B times)
        self._num_steps_host = self.st.num_steps.cpu().numpy()
        self._ego_valid_host = self.st.agent_valid[:, 0].cpu().numpy()                # [S, T]
        self._alloc()

    # ---- state ---------------------------------------------------------------------------
    def _alloc(self) -> None:
        B, dev, H = self.num_envs, self.device, self.cfg.horizon
        z = lambda *s, dt=torch.float32: torch.zeros(*s, dtype=dt, device=dev)  # noqa: E731
        N = self.st.agent_state.shape[1]
        self.scene, self.t, self.t_start, self.t_end = (z(B, dt=torch.long) for _ in range(4))
        self.pose, self.speed, self.curvature = z(B, 3), z(B), z(B)
        self.prev = {k: z(B) for k in ("accel_lon", "accel_lat", "yaw_rate")}
        self.plan, self.tau = z(B, H + 1, 3), z(B)
        self.have_plan = z(B, dt=torch.bool)
        self.tick_action = z(B, 2)
        self.hist, self.hist_valid = z(B, EGO_HISTORY_LEN, 6), z(B, EGO_HISTORY_LEN, dt=torch.bool)
        self.agent_state, self.agent_valid = z(B, N, 5), z(B, N, dt=torch.bool)
        self.ignore = z(B, N - 1, dt=torch.bool)
        self.s_proj, self.dist_traveled = z(B), z(B)
        self.done = torch.ones(B, dtype=torch.bool, device=dev)
        self.series = torch.full((B, self.max_ticks, checks.NUM_METRICS), float("nan"), device=dev)
        self.ticks = z(B, dt=torch.long)
        self.idm = None
        self.seeds = [0] * B
        # the tick, bound to this object's fresh state (a CUDA graph owns copies of that state)
        self._tick_fn: Callable[[torch.Tensor], torch.Tensor] = self._tick
        if self.device.type == "cuda" and self.cfg.cuda_graph:
            from envs.drivesim.cuda_graph import GraphedTick

            self._tick_fn = GraphedTick(self, self._tick, self._tick_state())

    def _tick_state(self) -> list[str]:
        """Every state tensor :meth:`_tick` reads or reassigns (what a CUDA graph of it must own)."""
        names = ["pose", "speed", "curvature", "plan", "tau", "t", "dist_traveled", "hist", "hist_valid",
                 "agent_state", "agent_valid", "ignore", "s_proj", "scene", "t_start", "t_end", "tick_action",
                 *(f"prev.{k}" for k in self.prev)]
        if self.cfg.agents == "idm":
            names += ["idm.s", "idm.v", "idm.active"]
        return names

    # ---- reset ---------------------------------------------------------------------------
    def reset(
        self,
        seeds: Sequence[int | None] | None = None,
        options: Sequence[dict | None] | None = None,
        env_ids: Sequence[int] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Reset the envs ``env_ids`` (default all). ``options[i]`` may hold ``scene_id`` (else the
        scene is drawn from ``seeds[i]``) and ``start_step`` (default 0). Deterministic per
        (scene, start step, seed)."""
        ids = list(range(self.num_envs)) if env_ids is None else list(env_ids)
        n = len(ids)
        seeds = list(seeds) if seeds is not None else [None] * n
        options = list(options) if options is not None else [None] * n
        if len(seeds) != n or len(options) != n:
            raise ValueError(f"reset: got {len(seeds)} seeds and {len(options)} options for {n} envs")
        scene_idx, starts = [], []
        for i, (seed, opt) in enumerate(zip(seeds, options, strict=True)):
            opt = dict(opt or {})
            unknown = set(opt) - {"scene_id", "start_step"}
            if unknown:
                raise ValueError(f"reset options[{i}]: unknown keys {sorted(unknown)}; valid: scene_id, start_step")
            if "scene_id" in opt and opt["scene_id"] is not None:
                sid = opt["scene_id"]
                if sid not in self.scene_index:
                    import difflib

                    close = difflib.get_close_matches(str(sid), list(self.scene_index), n=3)
                    raise KeyError(f"reset options[{i}]: scene {sid!r} is not loaded"
                                   + (f"; did you mean {close}?" if close else ""))
                s = self.scene_index[sid]
            else:
                s = int(np.random.default_rng(seed).integers(self.st.num_scenes))
            start = int(opt.get("start_step", 0))
            T = int(self._num_steps_host[s])
            first = start + self.cfg.warmup_ticks
            if start < 0 or first + self.decision_every > T - 1:
                raise ValueError(
                    f"reset options[{i}]: start_step {start} + warm-up {self.cfg.warmup_ticks} leaves no "
                    f"decision in scene {self.st.scene_ids[s]!r} of {T} steps (max start_step "
                    f"{T - 2 - self.cfg.warmup_ticks - self.decision_every})")
            if not self._ego_valid_host[s, first]:
                raise ValueError(f"reset options[{i}]: the ego of {self.st.scene_ids[s]!r} is not valid "
                                 f"at step {first} (start_step {start} + warm-up)")
            scene_idx.append(s)
            starts.append(start)
            self.seeds[ids[i]] = 0 if seed is None else int(seed)
        idx = torch.as_tensor(ids, device=self.device)
        sc = torch.as_tensor(scene_idx, device=self.device)
        t_start = torch.as_tensor(starts, device=self.device)
        t0 = t_start + self.cfg.warmup_ticks
        t_end = self.st.num_steps[sc] - 1
        if self.cfg.max_ticks is not None:
            t_end = torch.minimum(t_end, t0 + self.cfg.max_ticks)
        self.scene[idx], self.t[idx], self.t_start[idx], self.t_end[idx] = sc, t0, t_start, t_end
        log = self.st.ego_log_pose[sc]                                       # [n, T, 3]
        pose = log[torch.arange(n), t0]
        self.pose[idx] = pose
        # history: the logged ego over the last 16 steps (the warm-up replays the log); one step past
        # t0 is read too so that speeds and accelerations at t0 are central differences, not lagging
        k = torch.arange(EGO_HISTORY_LEN - 1, -2, -1, device=self.device)
        steps = (t0[:, None] - k).clamp(min=0)                               # oldest first, [n, 17]
        hv = ((t0[:, None] - k) >= 0) & self.st.agent_valid[sc[:, None], 0, steps]
        hv = hv[:, :EGO_HISTORY_LEN]
        hp = log[torch.arange(n)[:, None], steps]                            # [n, 17, 3]
        vel = self.st.agent_state[sc[:, None], 0, steps, 3:5]
        hs, ha, hy = self._log_kinematics(hp, vel)
        hp = hp[:, :EGO_HISTORY_LEN]
        self.hist[idx] = torch.cat([hp, hs[..., None], ha[..., None], hy[..., None]], -1)
        self.hist_valid[idx] = hv
        self.speed[idx] = hs[:, -1]
        self.curvature[idx] = hy[:, -1] / hs[:, -1].clamp(min=1.0)
        self.prev["accel_lon"][idx] = ha[:, -1]
        self.prev["yaw_rate"][idx] = hy[:, -1]
        self.prev["accel_lat"][idx] = hs[:, -1] * hy[:, -1]
        self.tau[idx] = 0.0
        self.have_plan[idx] = False
        self.plan[idx] = pose[:, None, :].expand(-1, self.cfg.horizon + 1, -1)
        state, valid = agents_mod.replay(self.st.agent_state, self.st.agent_valid, sc, t0)
        self.agent_state[idx], self.agent_valid[idx] = state, valid
        if self.cfg.agents == "idm":
            self._idm_reset(idx, sc, t0)
        self.ignore[idx] = checks.contacts(self.st, sc, pose, state, valid)
        centre = checks.ego_box(self.st, sc, pose)[0]
        s_log = torch.gather(self.st.log_s[sc], 1, t0[:, None])[:, 0]
        self.s_proj[idx] = checks.project_on_path(self.st, sc, centre, s_log)[0]
        self.dist_traveled[idx] = 0.0
        self.series[idx] = float("nan")
        self.ticks[idx] = 0
        self.done[idx] = False
        return self._observe()

    def _log_kinematics(self, poses: torch.Tensor, vel: torch.Tensor):
        """Speed, longitudinal acceleration and yaw rate ``[n, K-1]`` of logged poses ``[n, K, 3]`` with
        logged velocities ``[n, K, 2]`` (central differences; the last of the K steps is look-ahead)."""
        speed = (vel[..., 0] * torch.cos(poses[..., 2]) + vel[..., 1] * torch.sin(poses[..., 2])).clamp(min=0.0)
        accel = torch.gradient(speed, spacing=DT, dim=1)[0]
        yaw = poses[..., 2]
        dyaw = wrap_angle(yaw[:, 1:] - yaw[:, :-1])
        unwrapped = torch.cat([yaw[:, :1], yaw[:, :1] + torch.cumsum(dyaw, 1)], 1)
        yaw_rate = torch.gradient(unwrapped, spacing=DT, dim=1)[0]
        return speed[:, :-1], accel[:, :-1], yaw_rate[:, :-1]

    def _idm_reset(self, idx: torch.Tensor, sc: torch.Tensor, t0: torch.Tensor) -> None:
        fresh = agents_mod.idm_reset(self.st.agent_paths, self.st.agent_state, self.st.agent_valid, sc, t0)
        if self.idm is None:
            self.idm = agents_mod.idm_reset(
                self.st.agent_paths, self.st.agent_state, self.st.agent_valid,
                self.scene, self.t)
        self.idm = agents_mod.idm_assign(self.idm, idx, fresh)

    # ---- step ----------------------------------------------------------------------------
    def step(self, actions: torch.Tensor):
        actions = torch.as_tensor(actions, dtype=torch.float32, device=self.device)
        B = self.num_envs
        live = ~self.done
        info: dict[str, Any] = {}
        if self.cfg.action_mode == "trajectory":
            if actions.ndim != 3 or actions.shape[0] != B or actions.shape[2] != 3 or actions.shape[1] < 5:
                raise ValueError(f"actions must be [B={B}, H>=5, 3] ego-frame poses, got {list(actions.shape)}")
            clean, bad = dynamics.sanitize_action(actions, self.cfg.invalid_action)
            new_plan = dynamics.plan_to_world(clean, self.pose)
            info["plan_deviation"] = self._plan_deviation(new_plan)
            if new_plan.shape[1] != self.plan.shape[1]:
                self.plan = self.plan.new_zeros(new_plan.shape)
            self.plan = torch.where(live[:, None, None], new_plan, self.plan)
            self.tau = torch.where(live, torch.zeros_like(self.tau), self.tau)
            self.have_plan |= live
        else:
            if actions.shape != (B, 2):
                raise ValueError(f"actions must be [B={B}, 2] (acceleration, curvature), got {list(actions.shape)}")
            clean, bad = dynamics.sanitize_tick_action(actions, self.cfg.invalid_action, self.limits)
            self.tick_action = clean
            info["plan_deviation"] = torch.full((B,), float("nan"), device=self.device)
        info["invalid_action"] = bad
        start_progress = self._last_metric("progress")
        k = self.decision_every
        per_tick = torch.full((B, k, checks.NUM_METRICS), float("nan"), device=self.device)
        ended = torch.zeros(B, dtype=torch.bool, device=self.device)
        arange = torch.arange(B, device=self.device)
        terminated = torch.zeros_like(ended)
        truncated = torch.zeros_like(ended)
        for j in range(k):
            live = ~self.done
            values = self._tick_fn(live)
            if j == 0:
                values[:, checks.METRIC_INDEX["plan_deviation"]] = info["plan_deviation"]
            per_tick[:, j] = torch.where(live[:, None], values, per_tick[:, j])
            # write the live envs' tick into their series (ended envs rewrite what is there: no sync)
            at = self.ticks.clamp(max=self.max_ticks - 1)
            self.series[arange, at] = torch.where(live[:, None], values, self.series[arange, at])
            self.ticks = self.ticks + live.long()
            at_fault = values[:, checks.METRIC_INDEX["collision_at_fault_tick"]] > 0
            offroad = values[:, checks.METRIC_INDEX["offroad"]] > 0
            term = live & ((self.cfg.terminate_on_collision & at_fault) | (self.cfg.terminate_on_offroad & offroad))
            trunc = live & ~term & (self.t >= self.t_end)
            terminated |= term
            truncated |= trunc
            ended |= term | trunc
            self.done = self.done | term | trunc
        metrics = {name: per_tick[:, :, i] for name, i in checks.METRIC_INDEX.items()}
        info["metrics"] = metrics
        info["progress_gain"] = torch.nan_to_num(self._last_metric("progress") - start_progress)
        if bool(ended.any()):
            info["episode_metrics"], info["episode_series"] = self._episode_end(ended)
        info["ended"] = ended
        info["ego_pose"] = self.pose.clone()  # the next tick may overwrite self.pose in place (CUDA graph)
        reward = self.reward_fn(metrics, info)
        return self._observe(), reward, terminated, truncated, info

    def _last_metric(self, name: str) -> torch.Tensor:
        i = checks.METRIC_INDEX[name]
        last = (self.ticks - 1).clamp(min=0)
        v = self.series[torch.arange(self.num_envs, device=self.device), last, i]
        return torch.where(self.ticks > 0, v, torch.zeros_like(v))

    def _plan_deviation(self, new_plan: torch.Tensor) -> torch.Tensor:
        """Mean distance between the new plan and the previous one over their overlap in time.

        Each env's old plan is read from its own elapsed time ``tau`` (one gather, no host sync)."""
        B, P = self.plan.shape[:2]
        steps = torch.round(self.tau / DT).long()                          # [B] old plan poses behind us
        j = torch.arange(1, new_plan.shape[1], device=self.device)         # new plan poses 1..H
        old_i = 1 + steps[:, None] + (j - 1)[None]                         # [B, H] matching old poses
        overlap = old_i < P
        old = torch.gather(self.plan[..., :2], 1, old_i.clamp(max=P - 1)[..., None].expand(-1, -1, 2))
        d = torch.linalg.vector_norm(new_plan[:, 1:, :2] - old, dim=-1)    # [B, H]
        n = overlap.sum(1)
        d = (d * overlap).sum(1) / n.clamp(min=1)
        return torch.where(self.have_plan & (n > 0), d, torch.full_like(d, float("nan")))

    def _tick(self, live: torch.Tensor) -> torch.Tensor:
        """Advance one tick for the live envs; return their metrics ``[B, NUM_METRICS]``."""
        cfg = self.cfg
        old_pose, old_speed = self.pose, self.speed
        if cfg.action_mode == "accel_curvature":
            pose, speed, _, curv = dynamics.bicycle_step(old_pose, old_speed, self.tick_action[:, 0],
                                                         self.tick_action[:, 1], DT, self.limits, self.curvature)
            self.curvature = torch.where(live, curv, self.curvature)
        elif cfg.tracking == "perfect":
            pose, speed = dynamics.perfect_tracking(self.plan, self.tau + DT)
        else:
            accel, curv = dynamics.track(old_pose, old_speed, self.plan, self.tau, DT, self.limits, self.ctrl)
            pose, speed, _, curv = dynamics.bicycle_step(old_pose, old_speed, accel, curv, DT, self.limits,
                                                         self.curvature)
            self.curvature = torch.where(live, curv, self.curvature)
        m = live[:, None]
        self.pose = torch.where(m, pose, old_pose)
        self.speed = torch.where(live, speed, old_speed)
        self.tau = self.tau + DT * live
        self.t = self.t + live.long()
        # kinematics for comfort metrics
        yaw_rate = wrap_angle(self.pose[:, 2] - old_pose[:, 2]) / DT
        accel_lon = (self.speed - old_speed) / DT
        accel_lat = self.speed * yaw_rate
        kin = {
            "accel_lon": accel_lon, "accel_lat": accel_lat, "yaw_rate": yaw_rate,
            "jerk_lon": (accel_lon - self.prev["accel_lon"]) / DT,
            "jerk": torch.hypot(accel_lon - self.prev["accel_lon"], accel_lat - self.prev["accel_lat"]) / DT,
            "yaw_accel": (yaw_rate - self.prev["yaw_rate"]) / DT,
        }
        for key in ("accel_lon", "accel_lat", "yaw_rate"):
            self.prev[key] = torch.where(live, kin[key], self.prev[key])
        self.dist_traveled = self.dist_traveled + live * torch.linalg.vector_norm(
            self.pose[:, :2] - old_pose[:, :2], dim=-1)
        # ego history ring: drop the oldest, append now
        now = torch.cat([self.pose, self.speed[:, None], accel_lon[:, None], yaw_rate[:, None]], -1)
        rolled = torch.cat([self.hist[:, 1:], now[:, None]], 1)
        self.hist = torch.where(m[:, :, None], rolled, self.hist)
        self.hist_valid = torch.where(m, torch.cat([self.hist_valid[:, 1:], live[:, None]], 1), self.hist_valid)
        # other agents
        if cfg.agents == "idm":
            ego_box = checks.ego_box(self.st, self.scene, self.pose)
            self.idm, state, valid = agents_mod.idm_step(
                self.idm, self.st.agent_paths, self.st.agent_state, self.st.agent_valid, self.st.agent_size,
                self.scene, self.t, ego_box, self.speed, self.idm_params, DT)
        else:
            state, valid = agents_mod.replay(self.st.agent_state, self.st.agent_valid, self.scene, self.t)
        self.agent_state = torch.where(m[:, :, None], state, self.agent_state)
        self.agent_valid = torch.where(m, valid, self.agent_valid)
        values, ignore, s_proj = checks.tick_metrics(
            self.st, self.scene, self.t, self.t_start, self.t_end, self.pose, self.speed, kin,
            self.agent_state, self.agent_valid, self.ignore, self.s_proj, self.dist_traveled,
            cfg.offroad_tolerance_m)
        self.ignore = torch.where(m, ignore, self.ignore)
        self.s_proj = torch.where(live, s_proj, self.s_proj)
        return values

    def _episode_end(self, ended: torch.Tensor):
        """Episode metrics ``{name: [B]}`` (NaN where not ended) and per-env series (None where not)."""
        rows = torch.nonzero(ended).squeeze(1)
        vals = self.series[rows].double().cpu().numpy()                     # [E, T, M]
        n_ticks = self.ticks[rows].cpu().numpy()
        in_range = np.arange(vals.shape[1])[None, :] < n_ticks[:, None]
        series = {}
        for name, i in checks.METRIC_INDEX.items():
            v = vals[:, :, i]
            series[name] = (np.nan_to_num(v), np.isfinite(v) & in_range, DRIVESIM_METRICS[name])
        agg = episode_metrics(series, cut_after_failure=self.cfg.cut_after_failure)
        out = {name: np.full(self.num_envs, np.nan) for name in agg}
        r = rows.cpu().numpy()
        for name, v in agg.items():
            out[name][r] = v
        per_env: list[dict | None] = [None] * self.num_envs
        for j, b in enumerate(r):
            T = int(n_ticks[j])
            per_env[b] = {name: (v[j, :T], valid[j, :T], a) for name, (v, valid, a) in series.items()}
        return out, per_env

    # ---- observations --------------------------------------------------------------------
    def _observe(self) -> dict[str, torch.Tensor]:
        obs: dict[str, torch.Tensor] = {}
        keys = self.obs_keys
        if "ego_history" in keys:
            obs["ego_history"], obs[mask_key("ego_history")] = observe.ego_history(
                self.hist, self.hist_valid, self.pose)
        if "route" in keys or "bev" in keys:
            r, rm = observe.route(self.st, self.scene, self.s_proj, self.pose, self.cfg.route_spacing_m)
            if "route" in keys:
                obs["route"], obs[mask_key("route")] = r, rm
        if "gt_trajectory" in keys:
            obs["gt_trajectory"], obs[mask_key("gt_trajectory")] = observe.gt_trajectory(
                self.st, self.scene, self.t, self.pose)
        if "map_points" in keys:
            obs["map_points"], obs[mask_key("map_points")] = observe.map_points(
                self.st, self.scene, self.t, self.pose)
        size = self.st.agent_size[self.scene]
        atype = self.st.agent_type[self.scene]
        if "agents" in keys:
            obs["agents"], obs[mask_key("agents")] = observe.agents(
                self.agent_state, self.agent_valid, size, atype, self.pose)
        if "bev" in keys:
            obs["bev"], obs[mask_key("bev")] = observe.bev(
                self.st, self.scene, self.pose, self.agent_state, self.agent_valid, size, r, rm)
        return obs

    # ---- rendering -----------------------------------------------------------------------
    def render(self, env: int = 0, size: int | None = None) -> np.ndarray:
        """An RGB frame ``[px, px, 3]`` uint8 around env ``env``'s ego (plan and logged path drawn)."""
        from envs.drivesim import render

        s = int(self.scene[env])
        scene = self.scenes[s]
        pose = self.pose[env].cpu().numpy()
        centre = checks.ego_box(self.st, self.scene[env:env + 1], self.pose[env:env + 1])[0][0].cpu().numpy()
        log = self.st.agent_state[s, 0, :, :2][self.st.agent_valid[s, 0]].cpu().numpy()
        return render.render_frame(
            scene,
            ego_pose=pose,
            ego_size=self.st.agent_size[s, 0].cpu().numpy(),
            agent_state=self.agent_state[env, 1:].cpu().numpy(),
            agent_valid=self.agent_valid[env, 1:].cpu().numpy(),
            # the batch's agent slots (padded to the largest scene, fewest-first selection): sizes and
            # types per slot, not the scene's own agent list
            agent_size=self.st.agent_size[s, 1:].cpu().numpy(),
            agent_type=self.st.agent_type[s, 1:].cpu().numpy(),
            view_center=centre,
            px=size or self.cfg.render_size,
            extra_paths={"plan": self.plan[env, :, :2].cpu().numpy(), "log": log},
        )
