"""Every preset against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from alpagym_ray.targets import instantiate
from envs.alpasim.env import ALPASIM_METRICS
from envs.drivesim import metric_names as M
from envs.drivesim.metric_names import DRIVESIM_METRICS
from rewards import RewardFn, RewardSpecError, preset_names, reward_fn
from rewards.spec import preset_dir


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_validates_against_drivesim(name):
    fn = RewardFn.from_file(name, DRIVESIM_METRICS)
    assert len(fn.term_names) >= 1


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_node_builds_its_reward_from_the_target(name, episode):
    """What a rollout worker does: instantiate(reward node, metric_aggregations=env's) (no import of rewards)."""
    node = yaml.safe_load((preset_dir() / f"{name}.yaml").read_text())
    assert node["_target_"] == "rewards.compute.reward_fn"
    built = instantiate(node, metric_aggregations=DRIVESIM_METRICS)
    assert isinstance(built, RewardFn)
    from_file = RewardFn.from_file(name, DRIVESIM_METRICS)
    assert built.term_names == from_file.term_names
    assert built.episode(episode()) == from_file.episode(episode())


def test_reward_fn_names_its_source_in_errors():
    node = yaml.safe_load((preset_dir() / "comfort.yaml").read_text())
    # AlpaSim reports no comfort series: the first threshold term fails, naming the reward and the term
    with pytest.raises(RewardSpecError, match=r"reward 'comfort' \(test\), term 4"):
        instantiate({**node, "source": "reward 'comfort' (test)"}, metric_aggregations=ALPASIM_METRICS)
    with pytest.raises(RewardSpecError, match=r"^reward config, term 1"):
        reward_fn(DRIVESIM_METRICS, terms=[{"kind": "metric", "metric_name": "progres"}])
    with pytest.raises(ValueError, match="source must be a non-empty string"):
        reward_fn(DRIVESIM_METRICS, source="", terms=[{"kind": "metric", "metric_name": "progress"}])


def test_progress_safety(episode, flags):
    fn = RewardFn.from_file("progress_safety", DRIVESIM_METRICS)
    assert fn.episode(episode()) == (pytest.approx(1.0), {"term_1_metric_progress": pytest.approx(1.0),
                                                          "term_2_metric_collision_any": -0.0,
                                                          "term_3_metric_offroad": -0.0})
    # collision on tick 6: progress stops counting there; offroad after it is not counted
    ep = episode(collision_any=flags(6), collision_lateral=flags(6), offroad=flags(8))
    assert fn.episode(ep)[0] == pytest.approx(0.6 - 10.0)
    assert fn.episode(episode(offroad=flags(7)))[0] == pytest.approx(0.7 - 5.0)


def test_metrics(episode, flags):
    fn = RewardFn.from_file("metrics", DRIVESIM_METRICS)
    obstacle = np.full(11, 3.0)
    obstacle[[3, 4]] = 0.2   # 2 of 8 counted ticks closer than 0.5 m
    gt = np.zeros(11)
    gt[5] = 2.0
    ep = episode(collision_rear=flags(8), collision_any=flags(8), wrong_lane=flags(2),  # warm-up only
                 dist_to_gt_trajectory=gt, min_distance_to_obstacle_m=obstacle)
    # counted ticks 3..8; not at fault; wrong lane only during warm-up
    assert fn.episode(ep)[0] == pytest.approx(0.8 - 0.1 * 2.0 - 1.0 * 2 / 6)


def test_distance_to_gt(episode):
    fn = RewardFn.from_file("distance_to_gt", DRIVESIM_METRICS)
    d = np.array([50, 50, 50, 3, 4, 3, 4, 3, 4, 3, 4], dtype=float)
    assert fn.episode(episode(dist_to_gt_location=d))[0] == pytest.approx(-0.1 * np.sqrt(12.5))
    assert fn.episode(episode(dist_to_gt_location=np.full(11, 20.0)))[0] == pytest.approx(-1.0)


def test_comfort(episode):
    fn = RewardFn.from_file("comfort", DRIVESIM_METRICS)
    lon, lat, jerk, yaw = np.zeros(11), np.zeros(11), np.zeros(11), np.zeros(11)
    lon[[4, 5]] = [3.0, -5.0]
    lon[1] = 9.0          # warm-up: not counted
    lon[6] = -4.0         # inside nuPlan's braking bound
    lat[6] = -5.0
    jerk[7] = 9.0
    yaw[10] = 1.0
    ep = episode(accel_lon_mps2=lon, accel_lat_mps2=lat, jerk_mps3=jerk, yaw_rate_rps=yaw)
    total, terms = fn.episode(ep)
    assert terms["term_4_threshold_accel_lon_mps2"] == pytest.approx(-0.5 * 2 / 8)
    assert total == pytest.approx(1.0 - 0.5 * 5 / 8)


def test_comfort_uses_drivesims_thresholds():
    terms = yaml.safe_load((preset_dir() / "comfort.yaml").read_text())["terms"]
    bounds = {t["metric_name"]: (t.get("below"), t.get("above")) for t in terms if t["kind"] == "threshold"}
    assert bounds == {
        "accel_lon_mps2": (M.MIN_ACCEL_LON, M.MAX_ACCEL_LON),
        "accel_lat_mps2": (-M.MAX_ACCEL_LAT, M.MAX_ACCEL_LAT),
        "jerk_lon_mps3": (-M.MAX_JERK_LON, M.MAX_JERK_LON),
        "jerk_mps3": (None, M.MAX_JERK),
        "yaw_rate_rps": (-M.MAX_YAW_RATE, M.MAX_YAW_RATE),
        "yaw_accel_rps2": (-M.MAX_YAW_ACCEL, M.MAX_YAW_ACCEL),
    }


def test_scene_score(episode, flags):
    fn = RewardFn.from_file("scene_score", DRIVESIM_METRICS)
    assert fn.episode(episode(progress=np.full(11, 0.4)))[0] == pytest.approx(0.5)
    assert fn.episode(episode(progress=np.full(11, 0.9)))[0] == pytest.approx(1.0)
    assert fn.episode(episode(offroad=flags(9)))[0] == 0.0
