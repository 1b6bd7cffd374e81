"""RewardFn on hand-built episodes: each kind, clip and scale, the shared tick mask, per-decision
rewards, and the same reward from AlpaSim-shaped series."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

from alpagym_ray.metrics import ALPASIM_METRICS, MetricSeries, episode_metrics, series_to_arrays
from envs.drivesim.metric_names import DRIVESIM_METRICS
from rewards import RewardFn

# 11 ticks: 0-2 warm-up, 3-10 policy; decision_every 2 -> decisions (3,4) (5,6) (7,8) (9,10)
DECISIONS = np.array([-1, -1, -1, 0, 0, 1, 1, 2, 2, 3, 3])


def reward(*terms, metrics=DRIVESIM_METRICS, **top) -> RewardFn:
    return RewardFn.from_mapping({"terms": list(terms), **top}, metrics, source="reward 'test'")


def test_metric_terms_use_the_mask_and_their_aggregation(episode, flags):
    speed = np.array([9, 9, 9, 1, 2, 3, 6, 4, 5, 7, 8], dtype=float)
    ep = episode(speed_mps=speed, collision_any=flags(8), collision_rear=flags(8))
    # counted ticks: 3..8 (warm-up dropped, nothing after the collision on tick 8)
    fn = reward(
        {"kind": "metric", "metric_name": "progress"},                        # last: 0.8
        {"kind": "metric", "metric_name": "collision_any", "scale": -10.0},   # max: 1
        {"kind": "metric", "metric_name": "speed_mps"},                       # own (mean): 21/6
        {"kind": "metric", "metric_name": "speed_mps", "aggregation": "sum", "name": "s_sum"},
        {"kind": "metric", "metric_name": "speed_mps", "aggregation": "min", "name": "s_min"},
        {"kind": "metric", "metric_name": "speed_mps", "aggregation": "max", "name": "s_max"},
        {"kind": "metric", "metric_name": "speed_mps", "aggregation": "median", "name": "s_med"},
        {"kind": "metric", "metric_name": "speed_mps", "aggregation": "last", "name": "s_last"},
    )
    total, terms = fn.episode(ep)
    expected = {"term_1_metric_progress": 0.8, "term_2_metric_collision_any": -10.0,
                "term_3_metric_speed_mps": 21 / 6, "s_sum": 21.0, "s_min": 1.0, "s_max": 6.0,
                "s_med": 3.5, "s_last": 5.0}
    assert terms == pytest.approx(expected)
    assert total == pytest.approx(sum(expected.values()))
    # a metric term with the metric's own aggregation is the logged episode metric
    em = episode_metrics(ep)
    assert terms["term_3_metric_speed_mps"] == pytest.approx(em["speed_mps"])
    assert terms["term_1_metric_progress"] == pytest.approx(em["progress"])


def test_cut_after_failure_false_keeps_later_ticks(episode, flags):
    ep = episode(offroad=flags(6))
    terms = [{"kind": "metric", "metric_name": "progress"}, {"kind": "metric", "metric_name": "offroad"}]
    assert reward(*terms).episode(ep)[0] == pytest.approx(0.6 + 1.0)
    assert reward(*terms, cut_after_failure=False).episode(ep)[0] == pytest.approx(1.0 + 1.0)


def test_invalid_ticks_do_not_count(episode):
    ep = episode(invalid={"progress": [9, 10]})
    assert reward({"kind": "metric", "metric_name": "progress"}).episode(ep)[0] == pytest.approx(0.8)


def test_scale_and_clip_apply_clip_first(episode):
    d = np.zeros(11)
    d[3:7] = [3.0, 4.0, 3.0, 4.0]
    d[7:] = 5.0   # RMS over 3..10 of (3, 4, 3, 4, 5, 5, 5, 5) = sqrt(150 / 8)
    ep = episode(dist_to_gt_location=d)
    rms = np.sqrt(150 / 8)
    fn = reward({"kind": "distance_to_gt", "scale": -2.0, "name": "d"},
                {"kind": "distance_to_gt", "scale": -2.0, "clip": [0.0, 4.0], "name": "d_clip"},
                {"kind": "metric", "metric_name": "dist_to_gt_location", "clip": [4.5, 9.0], "name": "d_max"})
    result = fn.evaluate(ep)
    assert result.raw == pytest.approx({"d": rms, "d_clip": rms, "d_max": 5.0})
    assert result.terms == pytest.approx({"d": -2 * rms, "d_clip": -8.0, "d_max": 5.0})


def test_threshold_terms(episode):
    ttc = np.array([0.1, 0.1, 0.1, 5.0, 1.0, 0.5, 2.0, 3.0, 0.9, 10.0, 12.0])
    ep = episode(ttc_s=ttc)
    fn = reward({"kind": "threshold", "metric_name": "ttc_s", "below": 1.0, "mode": "count", "name": "c"},
                {"kind": "threshold", "metric_name": "ttc_s", "below": 1.0, "name": "f"},
                {"kind": "threshold", "metric_name": "ttc_s", "below": 1.0, "above": 9.0, "name": "band",
                 "scale": -1.0})
    # counted ticks 3..10: below 1.0 (strict) on ticks 5 and 8; above 9.0 on 9 and 10
    assert fn.episode(ep)[1] == pytest.approx({"c": 2.0, "f": 2 / 8, "band": -4 / 8})


def test_derived_episode_metrics(episode, flags):
    fn = reward({"kind": "metric", "metric_name": "scene_score"},
                {"kind": "metric", "metric_name": "collision_at_fault", "scale": -1.0},
                {"kind": "metric", "metric_name": "offroad_or_collision", "scale": -1.0})
    progress = np.full(11, 0.6)
    # no failure: score = min(0.6 / 0.8, 1)
    assert fn.episode(episode(progress=progress))[1] == pytest.approx(
        {"term_1_metric_scene_score": 0.75, "term_2_metric_collision_at_fault": 0.0,
         "term_3_metric_offroad_or_collision": 0.0})
    # being rear-ended is a collision but not at fault: the score stays
    rear = episode(progress=progress, collision_rear=flags(5), collision_any=flags(5))
    assert fn.episode(rear)[1] == pytest.approx(
        {"term_1_metric_scene_score": 0.75, "term_2_metric_collision_at_fault": 0.0,
         "term_3_metric_offroad_or_collision": -1.0})
    front = episode(progress=progress, collision_front=flags(5), collision_any=flags(5))
    assert fn.episode(front)[0] == pytest.approx(0.0 - 1.0 - 1.0)
    # a recorded path under 5 m scores 1
    short = episode(progress=progress, gt_dist_traveled_m=np.full(11, 4.0))
    assert fn.episode(short)[1]["term_1_metric_scene_score"] == 1.0


def test_no_counted_tick_gives_zero(episode):
    ep = episode(eval_relevant=np.zeros(11))
    fn = reward({"kind": "metric", "metric_name": "progress"}, {"kind": "distance_to_gt"},
                {"kind": "threshold", "metric_name": "ttc_s", "below": 100.0})
    assert fn.episode(ep) == (0.0, {"term_1_metric_progress": 0.0,
                                    "term_2_distance_to_gt_dist_to_gt_location": 0.0,
                                    "term_3_threshold_ttc_s": 0.0})


def test_python_term(tmp_path, monkeypatch, episode):
    (tmp_path / "my_reward_terms2.py").write_text(textwrap.dedent("""
        import numpy as np
        def speed_bonus(series, mask, params):
            v, valid, _ = series["speed_mps"]
            return params["k"] * float(np.sum(v[mask & valid]))
        def not_a_float(series, mask, params):
            return "high"
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    speed = np.arange(11, dtype=float)
    fn = reward({"kind": "python", "target": "my_reward_terms2:speed_bonus", "params": {"k": 0.5},
                 "scale": 2.0, "clip": [0, 40]})
    # sum of speeds over ticks 3..10 = 52; * 0.5 = 26; clip 40; * 2
    assert fn.episode(episode(speed_mps=speed)) == (52.0, {"term_1_python_speed_bonus": 52.0})
    bad = reward({"kind": "python", "target": "my_reward_terms2:not_a_float"})
    with pytest.raises(ValueError, match="reward 'test', term 1 .*my_reward_terms2:not_a_float returned str"):
        bad.episode(episode())


def test_non_finite_values_name_the_term(episode):
    dist = np.full(11, np.inf)
    ep = episode(min_distance_to_obstacle_m=dist)
    fn = reward({"kind": "metric", "metric_name": "progress"},
                {"kind": "metric", "metric_name": "min_distance_to_obstacle_m"})
    with pytest.raises(ValueError, match="reward 'test', term 2 .*value inf from "
                                         "'min_distance_to_obstacle_m' is not finite; bound it with clip"):
        fn.episode(ep)
    clipped = reward({"kind": "metric", "metric_name": "min_distance_to_obstacle_m", "clip": [0, 5]})
    assert clipped.episode(ep)[0] == 5.0


def test_series_are_checked(episode):
    fn = reward({"kind": "metric", "metric_name": "ttc_s"})
    ep = episode()
    with pytest.raises(ValueError, match=r"the episode lacks the series \['ttc_s'\]"):
        fn.episode({k: v for k, v in ep.items() if k != "ttc_s"})
    short = dict(ep, ttc_s=(np.zeros(5), np.ones(5, bool), DRIVESIM_METRICS["ttc_s"]))
    with pytest.raises(ValueError, match="series of different lengths"):
        fn.episode(short)
    with pytest.raises(ValueError, match="series 'ttc_s': values \\(11,\\) and valid \\(5,\\)"):
        fn.episode(dict(ep, ttc_s=(np.zeros(11), np.ones(5, bool), DRIVESIM_METRICS["ttc_s"])))


# ---------------------------------------------------------------------------------------------------
# per-decision rewards


def test_per_decision_dense_and_episodic(episode, flags):
    ttc = np.full(11, 10.0)
    ttc[[4, 7, 8]] = 0.5
    speed = np.array([0, 0, 0, 1, 3, 2, 2, 4, 4, 0, 0], dtype=float)
    ep = episode(ttc_s=ttc, speed_mps=speed, collision_any=flags(6), collision_front=flags(6))
    fn = reward(
        {"kind": "metric", "metric_name": "progress", "dense": True},               # last
        {"kind": "metric", "metric_name": "collision_any", "scale": -10.0, "dense": True},  # max
        {"kind": "metric", "metric_name": "speed_mps", "dense": True, "scale": 2.0},   # mean
        {"kind": "threshold", "metric_name": "ttc_s", "below": 1.0, "mode": "count", "dense": True},
        {"kind": "metric", "metric_name": "scene_score", "scale": 3.0},             # episodic
        cut_after_failure=False,
    )
    result = fn.evaluate(ep, DECISIONS, 4)
    # progress 0.1 t over 3..10: 0.3 on tick 3 (reached at take-over), then +0.1 per tick
    progress = [0.4, 0.2, 0.2, 0.2]
    collision = [0.0, -10.0, 0.0, 0.0]                   # first failing tick 6 is in decision 1
    speed_mean = 2.0 * np.array([4, 4, 8, 0]) / 8        # 16 / 8 = 2 -> 4
    ttc_count = [1.0, 0.0, 2.0, 0.0]
    episodic = [0.0, 0.0, 0.0, 3.0 * 0.0]                # at-fault collision: scene score 0
    expected = np.array(progress) + collision + speed_mean + ttc_count + episodic
    np.testing.assert_allclose(result.per_decision, expected)
    assert result.per_decision.sum() == pytest.approx(result.total)
    assert result.total == pytest.approx(1.0 - 10.0 + 4.0 + 3.0)
    np.testing.assert_allclose(fn.per_decision(ep, DECISIONS, 4), result.per_decision)


def test_per_decision_episodic_terms_land_on_the_last_decision(episode):
    fn = reward({"kind": "metric", "metric_name": "progress"}, {"kind": "distance_to_gt", "scale": -1.0})
    ep = episode(dist_to_gt_location=np.full(11, 2.0))
    np.testing.assert_allclose(fn.per_decision(ep, DECISIONS, 4), [0, 0, 0, 1.0 - 2.0])
    assert not fn.has_dense


def test_per_decision_counted_warmup_ticks_go_to_decision_0(episode):
    fn = reward({"kind": "metric", "metric_name": "speed_mps", "aggregation": "sum", "dense": True})
    ep = episode(speed_mps=np.ones(11), eval_relevant=np.ones(11))
    per = fn.per_decision(ep, DECISIONS, 4)
    np.testing.assert_allclose(per, [3 + 2, 2, 2, 2])
    assert per.sum() == fn.episode(ep)[0] == 11.0


def test_per_decision_random_episodes_sum_to_the_return(episode):
    rng = np.random.default_rng(0)
    fn = reward(
        {"kind": "metric", "metric_name": "progress", "dense": True},
        {"kind": "metric", "metric_name": "ttc_s", "dense": True, "scale": 0.1},
        {"kind": "metric", "metric_name": "lane_center_distance_m", "aggregation": "max", "dense": True},
        {"kind": "metric", "metric_name": "speed_mps", "aggregation": "sum", "dense": True, "scale": -0.01},
        {"kind": "threshold", "metric_name": "jerk_mps3", "above": 1.0, "dense": True},
        {"kind": "metric", "metric_name": "offroad", "scale": -5.0},
        {"kind": "distance_to_gt", "scale": -0.1},
    )
    for _ in range(20):
        ep = episode(progress=np.cumsum(rng.uniform(-0.02, 0.1, 11)), ttc_s=rng.uniform(0, 10, 11),
                     lane_center_distance_m=rng.uniform(0, 3, 11), speed_mps=rng.uniform(0, 20, 11),
                     jerk_mps3=rng.uniform(0, 2, 11), offroad=(rng.uniform(size=11) < 0.1).astype(float),
                     dist_to_gt_location=rng.uniform(0, 5, 11))
        result = fn.evaluate(ep, DECISIONS, 4)
        assert result.per_decision.sum() == pytest.approx(result.total, abs=1e-12)


def test_per_decision_arguments_are_checked(episode):
    fn = reward({"kind": "metric", "metric_name": "progress"})
    ep = episode()
    with pytest.raises(ValueError, match="num_decisions must be an int >= 1, got 0"):
        fn.per_decision(ep, DECISIONS, 0)
    with pytest.raises(ValueError, match=r"decision_of_tick must be an int array of shape \(11,\)"):
        fn.per_decision(ep, DECISIONS[:5], 4)
    with pytest.raises(ValueError, match=r"values in \[-1, 3\]; valid: -1 \(warm-up\) to "
                                         r"num_decisions - 1 = 2"):
        fn.per_decision(ep, DECISIONS, 3)
    with pytest.raises(ValueError, match="need both decision_of_tick and num_decisions"):
        fn.evaluate(ep, DECISIONS)


# ---------------------------------------------------------------------------------------------------
# the same series from drivesim or in AlpaSim's TimestepMetric shape


def as_timestep_metrics(series: dict, names, rng) -> list[MetricSeries]:
    """The series as AlpaSim's TimestepMetric list: shuffled, 100 ms ticks from an arbitrary start,
    each series carrying only the ticks where it is valid (AlpaSim omits the others)."""
    start_us = 1_700_000_000_000_000
    out = []
    for name in rng.permutation(list(names)):
        values, valid, agg = series[name]
        ticks = np.flatnonzero(valid)
        if name != "eval_relevant":  # a series missing ticks in the middle, as a sparse sender would
            ticks = ticks[ticks != 0] if len(ticks) > 1 else ticks
        out.append(MetricSeries(name=str(name), timestamps_us=start_us + 100_000 * ticks,
                                values=values[ticks], valid=np.ones(len(ticks), bool), aggregation=agg))
    return out


@pytest.mark.parametrize("preset", ["progress_safety", "metrics", "distance_to_gt", "scene_score"])
def test_same_reward_from_drivesim_series_and_alpasim_timestep_metrics(preset, episode, flags):
    rng = np.random.default_rng(1)
    ep = episode(progress=np.cumsum(rng.uniform(0, 0.1, 11)), collision_rear=flags(9),
                 collision_any=flags(9), wrong_lane=flags(4), dist_to_gt_location=rng.uniform(0, 3, 11),
                 dist_to_gt_trajectory=rng.uniform(0, 6, 11),
                 min_distance_to_obstacle_m=rng.uniform(0, 2, 11), invalid={"progress": [0]})
    drivesim_fn = RewardFn.from_file(preset, DRIVESIM_METRICS)
    alpasim_fn = RewardFn.from_file(preset, ALPASIM_METRICS)
    from_alpasim = series_to_arrays(as_timestep_metrics(ep, ALPASIM_METRICS, rng))
    assert from_alpasim["progress"][1][0] == np.False_ and from_alpasim["offroad"][1][0] == np.False_
    total, terms = drivesim_fn.episode(ep)
    assert alpasim_fn.episode(from_alpasim) == (total, terms)
    assert total != 0.0


def test_hydra_config_group_node_gives_the_same_reward(episode):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from rewards.spec import preset_dir

    with initialize_config_dir(config_dir=str(preset_dir().parent), version_base=None):
        cfg = compose(overrides=["+reward=metrics"])
    node = cfg.reward
    assert OmegaConf.is_config(node)
    ep = episode(wrong_lane=np.ones(11), dist_to_gt_trajectory=np.full(11, 7.0),
                 min_distance_to_obstacle_m=np.full(11, 10.0))
    from_node = RewardFn.from_mapping(node, DRIVESIM_METRICS, source="reward 'metrics' (hydra)")
    from_file = RewardFn.from_file("metrics", DRIVESIM_METRICS)
    assert from_node.episode(ep) == from_file.episode(ep)
    # progress 1 - wrong lane 2 - clip(7, 0, 5) * 0.1
    assert from_file.episode(ep)[0] == pytest.approx(1.0 - 2.0 - 0.5)
