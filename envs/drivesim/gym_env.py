"""``alpagym/DriveSim-v0``: a single drivesim environment with Gymnasium's API.

A thin view of :class:`~envs.drivesim.batched.DriveSimBatch` with ``num_envs=1``: observations are
numpy dicts (masks as ``int8`` MultiBinary), the action is ``[H, 3]`` ego-frame poses (or
``[2]`` acceleration/curvature), ``info["metrics"]`` holds the per-tick metrics of the decision and
``info["episode_metrics"]`` appears when the episode ends. Made with no arguments it runs on a small
generated scene set with a fixed seed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from alpagym_ray.observations import SPECS, mask_key
from envs.drivesim.batched import DriveSimBatch, RewardFn
from envs.drivesim.config import DriveSimConfig
from envs.drivesim.scene import Scene, SceneSet

DEFAULT_SCENES = 4
DEFAULT_SEED = 0
MAX_ABS_POSE = 200.0


def load_scenes(scenes: str | os.PathLike | Sequence[Scene] | None) -> list[Scene]:
    """Scenes from a scene-set directory, a list of Scene, or (None) a small generated set."""
    if scenes is None:
        from envs.drivesim.generate import GeneratorConfig, generate_scenes

        return list(generate_scenes(DEFAULT_SCENES, seed=DEFAULT_SEED, cfg=GeneratorConfig()))
    if isinstance(scenes, str | os.PathLike):
        return SceneSet.open(scenes).load_many()
    return list(scenes)


class DriveSimEnv(gym.Env):
    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(
        self,
        scenes: str | os.PathLike | Sequence[Scene] | None = None,
        config: DriveSimConfig | dict | None = None,
        render_mode: str | None = None,
        device: str = "cpu",
        reward_fn: RewardFn | None = None,
    ):
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode {render_mode!r} not supported; valid: [None, 'rgb_array']")
        cfg = DriveSimConfig.from_dict(config) if isinstance(config, dict) else (config or DriveSimConfig())
        self.sim = DriveSimBatch(load_scenes(scenes), num_envs=1, config=cfg, device=device, reward_fn=reward_fn)
        self.cfg = cfg
        self.render_mode = render_mode
        self.scene_ids = list(self.sim.st.scene_ids)
        obs_spaces: dict[str, spaces.Space] = {}
        for key in cfg.obs_keys:
            spec = SPECS[key]
            obs_spaces[key] = spaces.Box(-np.inf, np.inf, shape=spec.shape, dtype=np.float32)
            obs_spaces[mask_key(key)] = spaces.MultiBinary(spec.shape[0])
        self.observation_space = spaces.Dict(obs_spaces)
        if cfg.action_mode == "trajectory":
            self.action_space = spaces.Box(-MAX_ABS_POSE, MAX_ABS_POSE, shape=(cfg.horizon, 3), dtype=np.float32)
        else:
            lim = self.sim.limits
            self.action_space = spaces.Box(
                np.array([-lim.max_decel, -lim.max_curvature], dtype=np.float32),
                np.array([lim.max_accel, lim.max_curvature], dtype=np.float32), dtype=np.float32)
        self.metric_names = self.sim.metric_names

    def _np_obs(self, obs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        out = {}
        for k, v in obs.items():
            a = v[0].cpu().numpy()
            out[k] = a.astype(np.int8) if a.dtype == np.bool_ else a.astype(np.float32)
        return out

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        opts = dict(options or {})
        if opts.get("scene_id") is None:
            # draw the scene from the env's seeded generator so reset(seed=s) is reproducible
            opts["scene_id"] = self.scene_ids[int(self.np_random.integers(len(self.scene_ids)))]
        obs = self.sim.reset(seeds=[seed], options=[opts])
        return self._np_obs(obs), {"scene_id": opts["scene_id"], "start_step": int(opts.get("start_step", 0))}

    def step(self, action):
        a = torch.as_tensor(np.asarray(action, dtype=np.float32))[None]
        obs, reward, terminated, truncated, info = self.sim.step(a)
        # NaN marks a metric undefined on a tick; Gymnasium infos carry it as a separate mask
        metrics = {k: v[0].cpu().numpy() for k, v in info["metrics"].items()}
        out_info = {
            "metrics": {k: np.nan_to_num(v) for k, v in metrics.items()},
            "metrics_valid": {k: np.isfinite(v) for k, v in metrics.items()},
            "invalid_action": bool(info["invalid_action"][0]),
        }
        if "episode_metrics" in info:
            out_info["episode_metrics"] = {k: float(v[0]) for k, v in info["episode_metrics"].items()}
            out_info["episode_series"] = info["episode_series"][0]
        return self._np_obs(obs), float(reward[0]), bool(terminated[0]), bool(truncated[0]), out_info

    def render(self):
        if self.render_mode != "rgb_array":
            return None
        return self.sim.render(0)
