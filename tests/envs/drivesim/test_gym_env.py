from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
from gymnasium.utils.env_checker import check_env

import envs  # noqa: F401  (registers alpagym/DriveSim-v0)
from envs.drivesim.gym_env import DriveSimEnv


def test_made_with_no_arguments_passes_check_env():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        env = gym.make("alpagym/DriveSim-v0")
        check_env(env.unwrapped, skip_render_check=True)


def test_episode_reports_metrics_and_renders():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        env = DriveSimEnv(render_mode="rgb_array")
    obs, info = env.reset(seed=1)
    assert set(info) == {"scene_id", "start_step"}
    done, steps = False, 0
    while not done:
        action = obs["gt_trajectory"][:20]
        obs, reward, terminated, truncated, info = env.step(action)
        done = terminated or truncated
        steps += 1
        assert np.isfinite(reward)
        assert info["metrics"]["eval_relevant"].shape == (2,)
    assert "scene_score" in info["episode_metrics"]
    frame = env.render()
    assert frame.shape[-1] == 3 and frame.dtype == np.uint8


def test_reset_with_the_same_seed_gives_the_same_observation():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        env = DriveSimEnv()
    a, ia = env.reset(seed=5)
    b, ib = env.reset(seed=5)
    assert ia == ib
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
