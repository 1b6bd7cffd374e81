"""``alpagym_ray.api.train`` with a toy Gymnasium env and a toy policy defined here: a 2-iteration GRPO
run on the session Ray cluster (a custom observation key included), and the checks that fail before
Ray starts."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from gymnasium import spaces
from safetensors.torch import load_file
from torch import nn

from alpagym_ray import api
from alpagym_ray import columns as C
from alpagym_ray.observations import SPECS
from alpagym_ray.policy import ActionSpec
from rewards.spec import RewardSpecError

H = 5
STEPS = 10
LANE_STATE = {"lane_state": {"shape": [1, 4], "features": ["y", "t_frac", "zero", "one"],
                             "doc": "toy: lateral offset, elapsed fraction, 0, 1"}}
METRICS = {"progress": "last", "lane_offset_m": "mean", "collision_any": "max", "offroad": "max",
           "eval_relevant": "max"}
REWARD = {"terms": [{"kind": "metric", "metric_name": "progress", "scale": 1.0},
                    {"kind": "metric", "metric_name": "lane_offset_m", "scale": -1.0}]}
TERM_PROGRESS, TERM_OFFSET = "term.term_1_metric_progress", "term.term_2_metric_lane_offset_m"


class LateralLaneEnv(gym.Env):
    """1-D lane keeping: the car starts at a seeded lateral offset ``y`` and moves sideways by the
    first pose's y (clipped to +-0.5 m); STEPS steps; off-road beyond 2 m."""

    observation_space = spaces.Box(-np.inf, np.inf, (1, 4), np.float32)
    action_space = spaces.Box(-np.inf, np.inf, (H, 3), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.y = float(self.np_random.uniform(-1.0, 1.0))
        self.t = 0
        return self._obs(), {}

    def _obs(self):
        return np.array([[self.y, self.t / STEPS, 0.0, 1.0]], np.float32)

    def step(self, action):
        self.y += float(np.clip(np.asarray(action)[0, 1], -0.5, 0.5))
        self.t += 1
        metrics = {"progress": self.t / STEPS, "lane_offset_m": abs(self.y), "collision_any": 0.0,
                   "offroad": float(abs(self.y) > 2.0), "eval_relevant": 1.0}
        return self._obs(), 0.0, False, self.t >= STEPS, {"metrics": metrics}


class GaussianLateralPolicy(nn.Module):
    """Samples the lateral move ``u ~ N(w . lane_state, std)`` and drives straight at 5 m/s with it."""

    kind = "tests.toy.GaussianLateralPolicy"
    obs_keys = ("lane_state",)
    deterministic = False

    def __init__(self, horizon: int = H):
        super().__init__()
        self.horizon = horizon
        self.action_spec = ActionSpec(horizon=horizon)
        self.w = nn.Parameter(torch.zeros(4))
        self.log_std = nn.Parameter(torch.full((1,), math.log(0.3)))

    def policy_config(self) -> dict:
        return {"horizon": self.horizon}

    @classmethod
    def from_config(cls, config: dict) -> GaussianLateralPolicy:
        return cls(**config)

    def _dist(self, obs) -> torch.distributions.Normal:
        mean = obs["lane_state"][:, 0, :] @ self.w
        return torch.distributions.Normal(mean, self.log_std.exp().expand_as(mean))

    def act(self, obs, generator=None, deterministic=None):
        dist = self._dist(obs)
        noise = torch.randn(dist.mean.shape, generator=generator)
        u = dist.mean if (deterministic or False) else dist.mean + dist.stddev * noise
        action = torch.zeros(u.shape[0], self.horizon, 3)
        action[:, :, 0] = 0.5 * torch.arange(1, self.horizon + 1)
        action[:, :, 1] = u[:, None]
        return action, dist.log_prob(u), {}

    def log_prob(self, obs, action):
        return self._dist(obs).log_prob(action[:, 0, 1])

    def entropy(self, obs):
        return self._dist(obs).entropy()


@pytest.fixture(autouse=True)
def restore_specs():
    """api.train registers lane_state in this process's observation table: undo it after each test."""
    before = dict(SPECS)
    yield
    SPECS.clear()
    SPECS.update(before)


@pytest.fixture
def by_value():
    """Ship this module's classes to the actors by value, so they need not import this test file."""
    import ray.cloudpickle as cp

    cp.register_pickle_by_value(sys.modules[__name__])
    yield
    cp.unregister_pickle_by_value(sys.modules[__name__])


def _kwargs(tmp_path: Path, **over) -> dict:
    kw = dict(env_factory=LateralLaneEnv, reward=REWARD,
              policy={"_target_": GaussianLateralPolicy, "horizon": H}, metric_aggregations=METRICS,
              obs_specs=LANE_STATE, num_envs=2, iterations=2, run_dir=tmp_path / "run", seed=3,
              learner={"group_size": 2, "groups_per_iteration": 2, "checkpoint_every": 1, "lr": 0.05},
              topology={"num_rollout_workers": 1, "rollout_cpus": 0, "learner_cpus": 0.5})
    kw.update(over)
    return kw


@pytest.mark.ray
def test_api_trains_a_toy_gym_env_with_a_custom_obs_key(ray_session, tmp_path, by_value):
    summary = api.train(**_kwargs(tmp_path))
    run = Path(summary["run_dir"])
    assert summary["final_version"] == 2                           # version 0 = start, +1 per iteration
    assert summary["buffer"]["accounting_ok"]
    assert summary["buffer"]["consumed"] == 2 * 2 * 2              # iterations x groups x G
    assert summary["buffer"]["failed_groups"] == 0
    assert json.loads((run / "summary.json").read_text())["final_version"] == 2
    # every episode: STEPS decisions, progress 1 (LAST), return = progress - mean |y| over its ticks
    episodes = pq.read_table(list((run / "episodes").glob("*.parquet"))).to_pydict()
    assert set(episodes[C.NUM_DECISIONS]) == {STEPS}
    for i in range(len(episodes[C.RETURN])):
        # progress is 1 unless the car left the road (later ticks are cut from the episode metrics)
        assert episodes["metric.progress"][i] == pytest.approx(1.0) or episodes["metric.offroad"][i] == 1.0
        progress, offset = episodes[TERM_PROGRESS][i], episodes[TERM_OFFSET][i]
        assert offset == pytest.approx(-episodes["metric.lane_offset_m"][i])
        assert progress == pytest.approx(episodes["metric.progress"][i])
        assert episodes[C.RETURN][i] == pytest.approx(progress + offset)
    # the learner moved the weights away from their zero start and saved them
    state = load_file(str(Path(summary["checkpoint"]) / "model.safetensors"))
    assert float(state["w"].abs().sum()) > 0.0
    config = json.loads((Path(summary["checkpoint"]) / "config.json").read_text())
    assert config["obs_keys"] == ["lane_state"]


def test_a_reward_on_an_undeclared_metric_fails_before_ray(tmp_path):
    bad = {"terms": [{"kind": "metric", "metric_name": "speed", "scale": 1.0}]}
    with pytest.raises(RewardSpecError, match="speed"):
        api.train(**_kwargs(tmp_path, reward=bad))
    assert not (tmp_path / "run").exists()


def test_a_reward_on_an_unreported_failure_flag_fails_before_ray(tmp_path):
    quiet = {k: v for k, v in METRICS.items() if k not in ("offroad", "collision_any")}
    offroad = {"terms": [{"kind": "metric", "metric_name": "offroad", "scale": -5.0}]}
    with pytest.raises(ValueError, match=r"reads \['offroad'\], which env .* does not report"):
        api.train(**_kwargs(tmp_path, reward=offroad, metric_aggregations=quiet))


def test_policy_keys_and_overrides_are_checked_before_ray(tmp_path):
    reads_history = {"_target_": "learners.baselines.ConstantVelocityPolicy", "horizon": H}
    with pytest.raises(ValueError, match=r"the env stacks \['lane_state'\]: missing \['ego_history'\]"):
        api.train(**_kwargs(tmp_path, policy=reads_history, obs_keys=["lane_state"]))
    with pytest.raises(ValueError, match=r"observation space 'ego_history' has shape \[1, 4\]"):
        api.train(**_kwargs(tmp_path, policy=reads_history))
    with pytest.raises(ValueError, match=r"the policy emits H = 8 poses; the env's action space takes"):
        api.train(**_kwargs(tmp_path, policy={"_target_": GaussianLateralPolicy, "horizon": 8}))
    with pytest.raises(ValueError, match="num_envs=3 must be a positive multiple of learner.group_size=2"):
        api.train(**_kwargs(tmp_path, num_envs=3))
    with pytest.raises(ValueError, match="topology has no key 'workers'"):
        api.train(**_kwargs(tmp_path, topology={"workers": 2}))
    with pytest.raises(ValueError, match="learner.grpo has no key 'eps'"):
        api.train(**_kwargs(tmp_path, learner={"grpo": {"eps": 0.1}}))


def test_reward_presets_and_files_load_as_config_nodes(tmp_path):
    preset = api.load_reward("progress_safety")
    assert [t["metric_name"] for t in preset["terms"]] == ["progress", "collision_any", "offroad"]
    assert preset["_target_"] == api.REWARD_TARGET and preset["source"].startswith("reward 'progress_safety'")
    path = tmp_path / "mine.yaml"
    path.write_text("terms:\n  - {kind: metric, metric_name: progress, scale: 2.0}\n")
    assert api.load_reward(path) == {"_target_": api.REWARD_TARGET, "source": f"reward file '{path}'",
                                     "terms": [{"kind": "metric", "metric_name": "progress", "scale": 2.0}]}
    # a plain mapping gets the target; a node with its own target is left as it is
    assert api.load_reward(REWARD) == {**REWARD, "_target_": api.REWARD_TARGET, "source": "reward (api.train)"}
    mine = {"_target_": "my_rewards:build", "weight": 2.0}
    assert api.load_reward(mine) == mine
    with pytest.raises(RewardSpecError, match="not found"):
        api.load_reward(tmp_path / "missing.yaml")
    with pytest.raises(RewardSpecError, match=r"^reward \(api.train\), term 1: unknown metric_name 'speed'"):
        api.train(**_kwargs(tmp_path, reward={"terms": [{"kind": "metric", "metric_name": "speed"}]}))


def test_learner_overrides_reach_the_algorithm_node():
    lc = api._learner_config({"lr": 0.1, "algorithm": {"kl_coef": 0.5}})
    assert lc["lr"] == 0.1 and lc["algorithm"]["kl_coef"] == 0.5 and lc["algorithm"]["eps_low"] == 0.2
    assert lc["algorithm"]["_target_"] == "learners.grpo.GRPO" and lc["checkpoint_io"] == "learners.checkpoint"
    assert api._learner_config({"grpo": {"kl_coef": 0.5}})["algorithm"] == lc["algorithm"]  # the former name
    other = {"_target_": "my_algos:PPO", "clip": 0.1}
    assert api._learner_config({"algorithm": other})["algorithm"] == other  # another target: replaced whole
    with pytest.raises(ValueError, match="learner.algorithm has no key 'eps'"):
        api._learner_config({"algorithm": {"eps": 0.1}})
    with pytest.raises(ValueError, match="not both"):
        api._learner_config({"grpo": {}, "algorithm": {}})
