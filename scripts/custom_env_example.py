"""Train a driving policy with GRPO on your own Gymnasium env, through the Python API.

The env below is a toy: a car on a straight one-lane road with a parked car ahead. It starts off
the lane centre at a random speed; it must keep its lane and stop before the parked car. What makes
it trainable by alpagym-ray is its interface, not its physics:

* ``step`` takes a **trajectory**: ``[H, 3]`` future poses (x, y, yaw) in the ego frame at 0.1 s
  steps (rear axle at the origin, x forward, y left); this env tracks the pose 1 s ahead;
* observations use keys of the observation table (``alpagym_ray/observations.py``): ``ego_history``
  ``[16, 7]``, ``route`` ``[20, 3]`` and ``agents`` ``[16, 11]``, each with a ``<key>_mask``, so the
  built-in trajectory policy can drive it;
* ``info["metrics"]`` reports, every step, the per-tick metrics the reward reads (``progress``,
  ``collision_any``, ``offroad``, ``eval_relevant``, and two of its own), and the call to
  ``api.train`` declares how each aggregates over an episode.

    python scripts/custom_env_example.py --iterations 3 --run-dir runs/custom-env

The same env through the Hydra CLI (``alpagym_ray/conf/env/gym.yaml`` names it; run from the repository
root so that ``scripts`` imports): ``alpagym-ray train env=gym policy=trajectory_route policy.size=tiny``.

The policy starts untrained here (real runs start from an open-loop model), so it leaves the road
in most episodes at first. Measured on a shared 2-core CPU machine: ``--iterations 60 --num-envs 16
--group-size 8 --lr 2e-3`` (3 min) moved the mean return from -4.0 (versions 0-9) to -3.1
(versions 50-60) and the off-road rate from 0.83 to 0.64.
"""

from __future__ import annotations

import argparse
import math
import sys

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from alpagym_ray.observations import AGENT_FEATURES, AGENTS, EGO_HISTORY_LEN, ROUTE_LEN

DT = 0.1                  # s per step (one tick; decision_every = 1)
EPISODE_STEPS = 60        # 6 s
LANE_HALF_WIDTH = 1.85    # m
OFFROAD_Y = 2.5           # m: the rear axle this far from the lane centre is off the road
CAR_LENGTH, CAR_WIDTH = 4.5, 1.9
REAR_AXLE_TO_FRONT = 0.8 * CAR_LENGTH  # rear axle at 0.2 x length from the back
STOP_GAP = 5.0            # m: "arrived" this far behind the parked car
MAX_ACCEL, MAX_BRAKE, MAX_YAW_RATE, MAX_SPEED = 3.0, 6.0, 0.6, 15.0
LOOKAHEAD = 10            # steps: the controller tracks the trajectory's pose 1 s ahead
ROUTE_SPACING = 4.0       # m between route waypoints

METRICS = {
    "progress": "last",          # fraction of the way to the stopping point, in [0, 1]
    "collision_any": "max",      # 1 on the tick the car hits the parked car
    "offroad": "max",            # 1 while off the road
    "eval_relevant": "max",      # 1: the policy is in control on every tick
    "lane_offset_m": "mean",     # |distance| from the lane centre
    "speed_mps": "mean",
}
"""Every metric the env reports in ``info["metrics"]``, with its time aggregation."""

REWARD = {"terms": [
    {"kind": "metric", "metric_name": "progress", "scale": 1.0},
    {"kind": "metric", "metric_name": "collision_any", "scale": -10.0},
    {"kind": "metric", "metric_name": "offroad", "scale": -5.0},
    {"kind": "metric", "metric_name": "lane_offset_m", "scale": -0.2},
]}
"""The reward: the same term list a YAML reward file holds (DESIGN.md, "Rewards")."""


class LaneKeepingEnv(gym.Env):
    """A car on a straight lane (along +x, centre y = 0) with a parked car ahead at ``x_parked``."""

    def __init__(self, horizon: int = 20):
        self.horizon = horizon
        self.action_space = spaces.Box(-np.inf, np.inf, (horizon, 3), np.float32)
        box = lambda *shape: spaces.Box(-np.inf, np.inf, shape, np.float32)  # noqa: E731
        self.observation_space = spaces.Dict({
            "ego_history": box(EGO_HISTORY_LEN, 7), "ego_history_mask": spaces.MultiBinary(EGO_HISTORY_LEN),
            "route": box(ROUTE_LEN, 3), "route_mask": spaces.MultiBinary(ROUTE_LEN),
            "agents": box(AGENTS, len(AGENT_FEATURES)), "agents_mask": spaces.MultiBinary(AGENTS),
        })

    # ---- Gymnasium API -------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)  # same seed -> same start: a GRPO group relies on it
        rng = self.np_random
        self.x, self.y = 0.0, float(rng.uniform(-0.8, 0.8))
        self.yaw, self.speed = float(rng.uniform(-0.05, 0.05)), float(rng.uniform(6.0, 9.0))
        self.x_parked = float(rng.uniform(35.0, 45.0))
        self.t = 0
        # history: as if the car had driven straight at this speed (a warm-up, like drivesim's)
        back = np.arange(EGO_HISTORY_LEN - 1, -1, -1) * DT * self.speed
        self.history = [(self.x - b * math.cos(self.yaw), self.y - b * math.sin(self.yaw), self.yaw,
                         self.speed, 0.0, 0.0) for b in back]
        return self._obs(), {"ego_pose": [self.x, self.y, self.yaw]}

    def step(self, action):
        traj = np.asarray(action, np.float32)
        k = min(LOOKAHEAD, len(traj))
        xl, yl = (float(v) for v in traj[k - 1, :2])   # the pose k * 0.1 s ahead, ego frame
        if not math.isfinite(xl + yl):
            xl = yl = 0.0                               # a broken trajectory: brake, go straight
        # pure pursuit: the speed that covers the distance in time, the arc that passes through it
        dist2 = xl * xl + yl * yl
        target_speed = math.sqrt(dist2) / (k * DT)
        curvature = 2.0 * yl / dist2 if dist2 > 1e-6 else 0.0
        accel = float(np.clip((target_speed - self.speed) / DT, -MAX_BRAKE, MAX_ACCEL))
        yaw_rate = float(np.clip(self.speed * curvature, -MAX_YAW_RATE, MAX_YAW_RATE))
        self.speed = float(np.clip(self.speed + accel * DT, 0.0, MAX_SPEED))
        self.yaw += yaw_rate * DT
        self.x += self.speed * math.cos(self.yaw) * DT
        self.y += self.speed * math.sin(self.yaw) * DT
        self.t += 1
        self.history = self.history[1:] + [(self.x, self.y, self.yaw, self.speed, accel, yaw_rate)]

        front_gap = self.x_parked - CAR_LENGTH / 2 - (self.x + REAR_AXLE_TO_FRONT)
        collision = front_gap <= 0 and abs(self.y) < CAR_WIDTH
        offroad = abs(self.y) > OFFROAD_Y
        metrics = {
            "progress": float(np.clip(self.x / (self.x_parked - STOP_GAP - REAR_AXLE_TO_FRONT), 0.0, 1.0)),
            "collision_any": float(collision), "offroad": float(offroad), "eval_relevant": 1.0,
            "lane_offset_m": abs(self.y), "speed_mps": self.speed,
        }
        terminated = collision                    # a crash ends the episode
        truncated = self.t >= EPISODE_STEPS       # the end of the "log"
        info = {"metrics": metrics, "ego_pose": [self.x, self.y, self.yaw]}
        return self._obs(), metrics["progress"], terminated, truncated, info

    # ---- observations in the ego frame -----------------------------------------------------------
    def _to_ego(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c, s = math.cos(self.yaw), math.sin(self.yaw)
        dx, dy = x - self.x, y - self.y
        return c * dx + s * dy, -s * dx + c * dy

    def _obs(self) -> dict[str, np.ndarray]:
        h = np.asarray(self.history, np.float64)                       # [16, 6] world poses, oldest first
        hx, hy = self._to_ego(h[:, 0], h[:, 1])
        rel_yaw = h[:, 2] - self.yaw
        ego_history = np.stack([hx, hy, np.cos(rel_yaw), np.sin(rel_yaw), h[:, 3], h[:, 4], h[:, 5]], -1)
        # the route: lane-centre waypoints ahead, ROUTE_SPACING apart
        wx = self.x + ROUTE_SPACING * np.arange(ROUTE_LEN)
        rx, ry = self._to_ego(wx, np.zeros(ROUTE_LEN))
        route = np.stack([rx, ry, np.zeros(ROUTE_LEN)], -1)
        # the parked car: row 0 of the agents table (features: alpagym_ray.observations.AGENT_FEATURES)
        agents = np.zeros((AGENTS, len(AGENT_FEATURES)), np.float32)
        px, py = self._to_ego(np.array([self.x_parked]), np.zeros(1))
        agents[0] = [px[0], py[0], math.cos(-self.yaw), math.sin(-self.yaw), 0.0, 0.0, CAR_LENGTH, CAR_WIDTH,
                     1.0, 0.0, 0.0]
        agents_mask = np.zeros(AGENTS, bool)
        agents_mask[0] = True
        return {
            "ego_history": ego_history.astype(np.float32), "ego_history_mask": np.ones(EGO_HISTORY_LEN, bool),
            "route": route.astype(np.float32), "route_mask": np.ones(ROUTE_LEN, bool),
            "agents": agents, "agents_mask": agents_mask,
        }


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--run-dir", default="runs/custom-env")
    p.add_argument("--num-envs", type=int, default=8,
                   help="envs per rollout worker (a multiple of --group-size)")
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--lr", type=float, default=3e-4)
    args = p.parse_args(argv)

    from alpagym_ray import api

    summary = api.train(
        env_factory=LaneKeepingEnv,
        env_kwargs={"horizon": 20},
        metric_aggregations=METRICS,
        reward=REWARD,
        policy={"_target_": "learners.trajectory_policy.build_policy", "size": "tiny",
                "obs_keys": ["ego_history", "route", "agents"], "horizon": 20, "num_anchors": 16},
        num_envs=args.num_envs,
        iterations=args.iterations,
        run_dir=args.run_dir,
        learner={"group_size": args.group_size, "groups_per_iteration": args.num_envs // args.group_size,
                 "checkpoint_every": args.iterations, "lr": args.lr},
        topology={"num_rollout_workers": args.workers},
    )
    print(f"published versions up to {summary['final_version']}; checkpoint {summary['checkpoint']}")
    print(f"episodes, metrics and TensorBoard logs under {summary['run_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
