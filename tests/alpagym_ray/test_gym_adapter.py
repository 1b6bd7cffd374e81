"""The Gymnasium adapter on a scripted toy env: stacking, no autoreset, per-tick series and episode
metrics with known answers; and the example env of scripts/custom_env_example.py through it."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces

from alpagym_ray import columns as C
from alpagym_ray.gym_adapter import GymBatchedEnv, make_gym_batched_env, register_obs_specs
from alpagym_ray.metrics import Aggregation
from alpagym_ray.observations import SPECS
from rewards.compute import RewardFn

H = 5
NAN = float("nan")
METRICS = {"eval_relevant": "max", "collision_any": "max", "offroad": "max", "progress": "last",
           "speed": "mean"}


class ScriptedEnv(gym.Env):
    """Plays back ``options["script"]``: one ``info["metrics"]`` mapping per step; the episode ends after
    the last one. Observations encode the seed and the step so that stacking can be checked."""

    observation_space = spaces.Dict({
        "ego_history": spaces.Box(-np.inf, np.inf, (16, 7), np.float32),
        "route": spaces.Box(-np.inf, np.inf, (20, 3), np.float32),
        "route_mask": spaces.MultiBinary(20),
    })
    action_space = spaces.Box(-np.inf, np.inf, (H, 3), np.float32)

    def __init__(self, terminate: bool = False):
        self.terminate = terminate
        self.steps_taken = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.script = list((options or {}).get("script", [{}, {}, {}]))
        self.base = float(seed or 0)
        self.t = 0
        self.actions = []
        return self._obs(), {"ego_pose": [self.base, 0.0, 0.0]}

    def _obs(self):
        return {"ego_history": np.full((16, 7), 10 * self.base + self.t, np.float32),
                "route": np.full((20, 3), -self.t, np.float32),
                "route_mask": np.arange(20) < self.t + 1}

    def step(self, action):
        self.actions.append(np.array(action))
        metrics = self.script[self.t]
        self.t += 1
        self.steps_taken += 1
        done = self.t >= len(self.script)
        info = {"metrics": metrics, "ego_pose": [self.base, float(self.t), 0.0]}
        return self._obs(), float(self.t), done and self.terminate, done and not self.terminate, info


def make(num_envs: int, metrics=METRICS, **kwargs) -> GymBatchedEnv:
    return GymBatchedEnv(ScriptedEnv, num_envs, metric_aggregations=metrics,
                         obs_keys=kwargs.pop("obs_keys", ("ego_history", "route")), **kwargs)


def run(env: GymBatchedEnv, options: list[dict], seeds: list[int] | None = None):
    """Step every env to its end; per env: (episode metrics, series, decision count)."""
    env.reset(seeds=seeds or list(range(env.num_envs)), options=options)
    out: list = [None] * env.num_envs
    alive = np.ones(env.num_envs, bool)
    steps = 0
    while alive.any():
        _, _, term, trunc, info = env.step(torch.zeros(env.num_envs, H, 3))
        steps += 1
        ended = (term | trunc).numpy() & alive
        for b in np.nonzero(ended)[0]:
            metrics = {k: float(v[b]) for k, v in info["episode_metrics"].items()}
            out[b] = (metrics, info["episode_series"][b], steps)
        alive &= ~ended
    return out


# the script of test_series_and_episode_metrics_over_the_tick_mask: tick 0 warm-up (not relevant),
# first failure on tick 2 (a collision; it still counts), ticks 3-4 cut; speed NaN (invalid) on tick 4
MASKED_SCRIPT = [
    {"eval_relevant": 0, "collision_any": 0, "offroad": 0, "progress": 0.1, "speed": 5.0},
    {"eval_relevant": 1, "collision_any": 0, "offroad": 0, "progress": 0.2, "speed": 6.0},
    {"eval_relevant": 1, "collision_any": 1, "offroad": 0, "progress": 0.3, "speed": 7.0},
    {"eval_relevant": 1, "collision_any": 0, "offroad": 0, "progress": 0.4, "speed": 8.0},
    {"eval_relevant": 1, "collision_any": 0, "offroad": 1, "progress": 0.5, "speed": NAN},
]


@pytest.fixture
def restore_specs():
    before = dict(SPECS)
    yield
    SPECS.clear()
    SPECS.update(before)


# ---- observations and actions ----------------------------------------------------------------------
def test_stacks_observations_and_masks_per_env():
    env = make(3)
    obs = env.reset(seeds=[1, 2, 3], options=[{}, {}, {}])
    assert set(obs) == {"ego_history", "ego_history_mask", "route", "route_mask"}
    assert obs["ego_history"].shape == (3, 16, 7) and obs["ego_history"].dtype == torch.float32
    assert obs["route_mask"].shape == (3, 20) and obs["route_mask"].dtype == torch.bool
    assert obs["ego_history"][:, 0, 0].tolist() == [10.0, 20.0, 30.0]
    assert bool(obs["ego_history_mask"].all())                      # no mask given: all valid
    assert obs["route_mask"].sum(1).tolist() == [1, 1, 1]            # the env's own mask
    obs2, *_ = env.step(torch.zeros(3, H, 3))
    assert obs2["ego_history"][:, 0, 0].tolist() == [11.0, 21.0, 31.0]
    assert obs2["route_mask"].sum(1).tolist() == [2, 2, 2]
    assert obs["ego_history"][:, 0, 0].tolist() == [10.0, 20.0, 30.0]  # returned tensors are not reused


def test_each_env_gets_its_own_action_row():
    env = make(2)
    env.reset(seeds=[0, 0], options=[{}, {}])
    actions = torch.arange(2 * H * 3, dtype=torch.float32).reshape(2, H, 3)
    env.step(actions)
    for b in range(2):
        got = env.envs[b].actions[0]
        assert got.shape == (H, 3) and got.dtype == np.float32
        np.testing.assert_array_equal(got, actions[b].numpy())


def test_obs_keys_default_to_the_dict_space_keys_and_bad_shapes_are_named():
    env = GymBatchedEnv(ScriptedEnv, 1, metric_aggregations=METRICS)
    assert env.obs_keys == ("ego_history", "route")

    class WrongShape(ScriptedEnv):
        def _obs(self):
            return {**super()._obs(), "route": np.zeros((19, 3), np.float32)}

    bad = GymBatchedEnv(WrongShape, 2, metric_aggregations=METRICS, obs_keys=("route",))
    with pytest.raises(ValueError, match=r"env 0 \(reset\): observation 'route' has shape \[19, 3\]"):
        bad.reset()
    with pytest.raises(ValueError, match="not in the observation table"):
        GymBatchedEnv(ScriptedEnv, 1, metric_aggregations=METRICS, obs_keys=("no_such_key",))


def test_custom_obs_key_is_registered_and_reaches_the_arrow_schema(restore_specs):
    class LaneStateEnv(ScriptedEnv):
        observation_space = spaces.Box(-np.inf, np.inf, (1, 4), np.float32)

        def _obs(self):
            return np.array([[self.base, self.t, 0.0, 1.0]], np.float32)

    declared = {"lane_state": {"shape": [1, 4], "features": ["y", "t", "zero", "one"], "doc": "toy"}}
    env = make_gym_batched_env(LaneStateEnv, 2, metric_aggregations=METRICS, obs_keys=["lane_state"],
                               obs_specs=declared)
    obs = env.reset(seeds=[4, 5])
    assert obs["lane_state"][:, 0, 0].tolist() == [4.0, 5.0] and obs["lane_state_mask"].shape == (2, 1)
    assert SPECS["lane_state"].shape == (1, 4) and not SPECS["lane_state"].alpasim
    schema = C.step_schema(["lane_state"], H)
    assert schema.field("obs.lane_state").type.list_size == 4
    assert register_obs_specs(declared) == ("lane_state",)             # the same again: a no-op
    with pytest.raises(ValueError, match="already in the table with shape"):
        register_obs_specs({"lane_state": {"shape": [2, 4]}})
    with pytest.raises(ValueError, match="'route' is already in the table"):
        register_obs_specs({"route": {"shape": [5, 3]}})
    with pytest.raises(ValueError, match="3 features"):
        register_obs_specs({"other": {"shape": [1, 4], "features": ["a", "b", "c"]}})


# ---- no autoreset ------------------------------------------------------------------------------------
def test_an_ended_env_waits_until_reset():
    env = make(2, metrics={"progress": "last"})   # eval_relevant implicit: 1 on every tick
    one, three = [{}], [{}, {}, {}]
    env.reset(seeds=[7, 8], options=[{"script": one}, {"script": three}])
    obs, reward, term, trunc, info = env.step(torch.zeros(2, H, 3))
    assert trunc.tolist() == [True, False] and term.tolist() == [False, False]
    assert info["ended"].tolist() == [True, False]
    assert info["episode_metrics"]["eval_relevant"][0] == 1.0
    assert math.isnan(info["episode_metrics"]["progress"][0])      # declared but never reported: invalid
    assert math.isnan(info["episode_metrics"]["eval_relevant"][1]) and info["episode_series"][1] is None
    last_obs = obs["ego_history"][0].clone()
    obs, reward, term, trunc, info = env.step(torch.zeros(2, H, 3))
    assert env.envs[0].steps_taken == 1 and env.envs[1].steps_taken == 2   # env 0 was not stepped
    assert torch.equal(obs["ego_history"][0], last_obs)
    assert reward.tolist() == [0.0, 2.0]
    assert trunc.tolist() == [True, False]                                 # the flag stays set
    assert info["ended"].tolist() == [False, False] and "episode_metrics" not in info
    assert math.isnan(float(info["metrics"]["progress"][0, 0]))           # no metrics for a waiting env
    env.step(torch.zeros(2, H, 3))
    obs = env.reset(seeds=[7, 8], options=[{"script": one}, {"script": three}])
    assert env.envs[0].steps_taken == 1 and obs["ego_history"][0, 0, 0] == 70.0
    _, _, term, trunc, _ = env.step(torch.zeros(2, H, 3))
    assert env.envs[0].steps_taken == 2 and trunc.tolist() == [True, False]


def test_terminated_max_steps_and_ego_pose():
    env = make(2, max_steps=2)
    env.envs[0].terminate = True
    env.reset(seeds=[3, 4], options=[{"script": [{}]}, {"script": [{}] * 5}])
    _, _, term, trunc, info = env.step(torch.zeros(2, H, 3))
    assert term.tolist() == [True, False] and trunc.tolist() == [False, False]
    assert info["ego_pose"].tolist() == [[3.0, 1.0, 0.0], [4.0, 1.0, 0.0]]
    _, _, term, trunc, info = env.step(torch.zeros(2, H, 3))
    assert term.tolist() == [True, False] and trunc.tolist() == [False, True]   # max_steps truncates
    assert info["ego_pose"].tolist() == [[3.0, 1.0, 0.0], [4.0, 2.0, 0.0]]      # env 0 keeps its last pose


# ---- series and episode metrics -----------------------------------------------------------------------
def test_series_and_episode_metrics_over_the_tick_mask():
    (metrics, series, steps), = run(make(1), [{"script": MASKED_SCRIPT}])
    assert steps == 5
    values, valid, agg = series["speed"]
    np.testing.assert_array_equal(values, [5, 6, 7, 8, 0])
    np.testing.assert_array_equal(valid, [True, True, True, True, False])
    assert agg == Aggregation.MEAN
    np.testing.assert_array_equal(series["eval_relevant"][0], [0, 1, 1, 1, 1])
    # counted ticks: 1 and 2 (tick 0 is not relevant; ticks after the collision on tick 2 are cut)
    assert metrics["progress"] == pytest.approx(0.3)
    assert metrics["speed"] == pytest.approx(6.5)
    assert metrics["collision_any"] == 1.0 and metrics["offroad"] == 0.0 and metrics["eval_relevant"] == 1.0
    assert set(metrics) == set(METRICS)

    (kept, _, _), = run(make(1, cut_after_failure=False), [{"script": MASKED_SCRIPT}])
    assert kept["progress"] == pytest.approx(0.5)
    assert kept["speed"] == pytest.approx(7.0)          # ticks 1-3; tick 4 is invalid
    assert kept["offroad"] == 1.0


def test_without_mask_series_every_tick_counts_and_failure_flags_are_not_reported():
    env = make(1, metrics={"speed": "mean", "progress": Aggregation.LAST})
    assert env.implicit_metrics == ("eval_relevant", "collision_any", "offroad")
    assert env.metric_names == ("speed", "progress", "eval_relevant")
    assert set(env.metric_aggregations) == {"speed", "progress", "eval_relevant", "collision_any", "offroad"}
    script = [{"speed": 2.0, "progress": 0.1}, {"speed": 4.0, "progress": 0.2},
              {"speed": 9.0, "progress": 0.6}]
    (metrics, series, _), = run(env, [{"script": script}])
    assert metrics == {"speed": pytest.approx(5.0), "progress": pytest.approx(0.6), "eval_relevant": 1.0}
    np.testing.assert_array_equal(series["eval_relevant"][1], [True] * 3)
    np.testing.assert_array_equal(series["offroad"][1], [False] * 3)        # unknown, not "0"
    # a reward over the reported metrics works as the rollout worker calls it ...
    reward = RewardFn.from_mapping({"terms": [{"kind": "metric", "metric_name": "progress", "scale": 2.0},
                                              {"kind": "metric", "metric_name": "speed", "scale": 0.1}]},
                                   env.metric_aggregations)
    env.check_reward(reward)
    result = reward.evaluate(series, np.arange(3) // env.decision_every, 3)
    assert result.total == pytest.approx(2.0 * 0.6 + 0.1 * 5.0)
    assert result.per_decision.sum() == pytest.approx(result.total)
    # ... and one that reads a failure flag the env does not report is refused
    offroad = RewardFn.from_mapping({"terms": [{"kind": "metric", "metric_name": "offroad", "scale": -1.0}]},
                                    env.metric_aggregations)
    with pytest.raises(ValueError, match=r"reads \['offroad'\], which env .* does not report"):
        env.check_reward(offroad)


def test_derived_episode_metrics_when_the_env_reports_their_series():
    names = {"eval_relevant": "max", "collision_front": "max", "collision_lateral": "max",
             "collision_any": "max", "offroad": "max", "progress": "last", "gt_dist_traveled_m": "last"}
    env = make(2, metrics=names)
    assert env.metric_names[-3:] == ("collision_at_fault", "offroad_or_collision", "scene_score")
    tick = {"eval_relevant": 1, "collision_front": 0, "collision_lateral": 0, "collision_any": 0,
            "offroad": 0, "gt_dist_traveled_m": 20.0}
    clean = [{**tick, "progress": 0.4}, {**tick, "progress": 0.6}]
    crash = [{**tick, "progress": 0.4, "collision_front": 1, "collision_any": 1}, {**tick, "progress": 0.6}]
    (a, _, _), (b, _, _) = run(env, [{"script": clean}, {"script": crash}])
    assert a["scene_score"] == pytest.approx(0.75) and a["collision_at_fault"] == 0.0   # min(0.6 / 0.8, 1)
    assert b["scene_score"] == 0.0 and b["collision_at_fault"] == 1.0 and b["progress"] == pytest.approx(0.4)


def test_per_tick_lists_with_decision_every_2():
    env = make(1, metrics={"speed": "max"}, decision_every=2)
    script = [{"speed": [1.0, 2.0]}, {"speed": [3.0, NAN]}, {"speed": [5.0]}]     # the last step: 1 tick
    env.reset(seeds=[0], options=[{"script": script}])
    _, _, _, _, info = env.step(torch.zeros(1, H, 3))
    assert info["metrics"]["speed"].shape == (1, 2) and info["metrics"]["speed"].tolist() == [[1.0, 2.0]]
    _, _, _, _, info = env.step(torch.zeros(1, H, 3))
    assert info["metrics_valid"]["speed"].tolist() == [[True, False]]
    _, _, _, trunc, info = env.step(torch.zeros(1, H, 3))
    assert bool(trunc[0]) and info["metrics_valid"]["speed"].tolist() == [[True, False]]
    values, valid, _ = info["episode_series"][0]["speed"]
    np.testing.assert_array_equal(values, [1, 2, 3, 0, 5])
    np.testing.assert_array_equal(valid, [True, True, True, False, True])
    assert info["episode_metrics"]["speed"][0] == 5.0
    # the rollout worker maps ticks to decisions as arange(T) // decision_every
    dense_sum = {"kind": "metric", "metric_name": "speed", "scale": 1.0, "dense": True, "aggregation": "sum"}
    reward = RewardFn.from_mapping({"terms": [dense_sum]}, env.metric_aggregations)
    per_decision = reward.per_decision(info["episode_series"][0], np.arange(5) // 2, 3)
    np.testing.assert_allclose(per_decision, [3.0, 3.0, 5.0])


# ---- bad input ---------------------------------------------------------------------------------------
def test_bad_metrics_and_calls_are_named():
    env = make(1, metrics={"speed": "mean"}, decision_every=2)
    env.reset(options=[{"script": [{"speed": [1.0]}, {"speed": [1.0, 2.0]}]}])
    with pytest.raises(ValueError, match=r"env 0, step 0: metrics hold 1 tick\(s\); with decision_every=2"):
        env.step(torch.zeros(1, H, 3))
    env = make(1, metrics={"speed": "mean", "progress": "last"}, decision_every=2)
    env.reset(options=[{"script": [{"speed": [1.0, 2.0], "progress": 0.5}]}])
    with pytest.raises(ValueError, match="different numbers of ticks"):
        env.step(torch.zeros(1, H, 3))
    env = make(1, metrics={"speed": "mean"})
    env.reset(options=[{"script": [{"speed": 1.0, "other": 3.0}]}])
    with pytest.warns(UserWarning, match="'other', which is not declared"):
        env.step(torch.zeros(1, H, 3))
    with pytest.raises(RuntimeError, match="before reset"):
        make(1).step(torch.zeros(1, H, 3))
    env = make(2)
    env.reset()
    with pytest.raises(ValueError, match=r"actions must be \[B=2, H, 3\]"):
        env.step(torch.zeros(2, H))
    with pytest.raises(ValueError, match=r"action space is \[5, 3\] poses; the actions have H = 6"):
        env.step(torch.zeros(2, 6, 3))
    with pytest.raises(ValueError, match=r"metric_aggregations\['speed'\]: unknown aggregation 'avg'"):
        make(1, metrics={"speed": "avg"})
    with pytest.raises(ValueError, match="'scene_score' is derived"):
        make(1, metrics={"scene_score": "last"})
    with pytest.raises(ImportError, match="no attribute"):
        GymBatchedEnv("alpagym_ray.gym_adapter:NoSuchEnv", 1, metric_aggregations={})


# ---- the example env ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def example():
    path = Path(__file__).resolve().parents[2] / "scripts" / "custom_env_example.py"
    spec = importlib.util.spec_from_file_location("custom_env_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_env_fits_the_table_and_resets_deterministically(example):
    env = GymBatchedEnv(example.LaneKeepingEnv, 3, metric_aggregations=example.METRICS)
    assert env.obs_keys == ("agents", "ego_history", "route")
    obs = env.reset(seeds=[11, 11, 12], options=[{}, {}, {}])
    for key in env.obs_keys:
        assert obs[key].shape[1:] == SPECS[key].shape
        assert torch.equal(obs[key][0], obs[key][1])                  # same seed: same start (a GRPO group)
        assert not torch.equal(obs[key][0], obs[key][2])               # another seed: another start
    # the last history pose is "now": the ego-frame origin, heading along x
    np.testing.assert_allclose(obs["ego_history"][:, -1, :4].numpy(), [[0, 0, 1, 0]] * 3, atol=1e-5)
    reward = RewardFn.from_mapping(example.REWARD, env.metric_aggregations)
    env.check_reward(reward)


def test_example_env_braking_to_a_stop_is_safe(example):
    env = GymBatchedEnv(example.LaneKeepingEnv, 2, metric_aggregations=example.METRICS)
    env.reset(seeds=[1, 2], options=[{}, {}])
    steps = 0
    while True:
        # every pose at the origin: target speed 0, no turn -> brake at the limit and stand still
        _, _, term, trunc, info = env.step(torch.zeros(2, 20, 3))
        steps += 1
        if bool((term | trunc).all()):
            break
    assert steps == example.EPISODE_STEPS and not bool(term.any())
    m = info["episode_metrics"]
    assert m["collision_any"].tolist() == [0.0, 0.0] and m["offroad"].tolist() == [0.0, 0.0]
    assert m["eval_relevant"].tolist() == [1.0, 1.0]
    speed = info["episode_series"][0]["speed_mps"][0]
    assert speed[-1] == 0.0 and np.all(np.diff(speed) <= 0)
    # from at most 9 m/s at 6 m/s^2: stopped within 1.5 s, < 7 m + one step of travel
    assert 0.0 < m["progress"][0] < 8.0 / (35.0 - example.STOP_GAP - example.REAR_AXLE_TO_FRONT)
