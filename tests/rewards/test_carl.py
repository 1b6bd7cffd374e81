"""The CaRL term: route completion gained per tick times soft penalty factors."""

from __future__ import annotations

import re

import numpy as np
import pytest

from alpagym_ray.metrics import ALPASIM_METRICS
from envs.drivesim.metric_names import DRIVESIM_METRICS
from rewards import RewardFn, RewardSpecError
from rewards.carl import DEFAULTS, carl_reward

# ticks 0-2 warm-up; the ego backs up on tick 6 (0.35 -> 0.3): the running max pays that stretch once
PROGRESS = np.array([0.0, 0.05, 0.1, 0.2, 0.3, 0.35, 0.3, 0.4, 0.5, 0.6, 0.7])
# gains on counted ticks 3..10, from the warm-up's last 0.1: 0.1 0.1 0.05 0 0.05 0.1 0.1 0.1 = 0.6


def carl(**params) -> RewardFn:
    term = {"kind": "python", "target": "rewards.carl:carl_reward", "params": params}
    return RewardFn.from_mapping({"terms": [term]}, DRIVESIM_METRICS, source="reward 'carl-test'")


def soft_infractions(episode, flags, **extra):
    ttc = np.full(11, 10.0)
    ttc[8] = 0.5
    lane = np.zeros(11)
    lane[9] = 2.5
    return episode(progress=PROGRESS, wrong_lane=flags(4), ttc_s=ttc, comfort_violation=flags(8),
                   lane_center_distance_m=lane, **extra)


def test_preset_known_value(episode, flags):
    fn = RewardFn.from_file("carl", DRIVESIM_METRICS)
    assert fn.term_names == ("carl",)
    # tick 4 wrong lane x0.5; tick 8 ttc and comfort x0.25; tick 9 off lane is off by default
    expected = 0.1 + 0.1 * 0.5 + 0.05 + 0.0 + 0.05 + 0.1 * 0.25 + 0.1 + 0.1
    assert fn.episode(soft_infractions(episode, flags))[0] == pytest.approx(expected)
    assert fn.episode(episode(progress=PROGRESS))[0] == pytest.approx(0.6)
    # off_lane switched on: tick 9 x0.5
    assert carl(off_lane=0.5).episode(soft_infractions(episode, flags))[0] == pytest.approx(expected - 0.05)


def test_hard_failure_ends_the_progress(episode, flags):
    ep = soft_infractions(episode, flags, collision_front=flags(9), collision_any=flags(9))
    # tick 9 counted with factor 0; tick 10 after the collision not counted
    expected = 0.1 + 0.05 + 0.05 + 0.0 + 0.05 + 0.025
    assert carl().episode(ep)[0] == pytest.approx(expected)
    assert carl(terminal_penalty=1.0).episode(ep)[0] == pytest.approx(expected - 1.0)
    assert carl(collision_at_fault=0.5).episode(ep)[0] == pytest.approx(expected + 0.05)
    # a rear collision is not at fault: the tick keeps its gain, then the mask ends the episode
    rear = soft_infractions(episode, flags, collision_rear=flags(9), collision_any=flags(9))
    assert carl(terminal_penalty=1.0).episode(rear)[0] == pytest.approx(expected + 0.1)


def test_speeding_needs_a_limit(episode, flags):
    speed = np.full(11, 10.0)
    speed[[3, 7]] = 15.0
    ep = episode(progress=PROGRESS, speed_mps=speed)
    assert carl().episode(ep)[0] == pytest.approx(0.6)
    assert carl(speed_limit_mps=12.0).episode(ep)[0] == pytest.approx(0.6 - 0.05 - 0.025)
    assert carl(speed_limit_mps=12.0, speeding=0.0).episode(ep)[0] == pytest.approx(0.6 - 0.1 - 0.05)


def test_direct_call_and_invalid_progress(episode):
    ep = episode(progress=PROGRESS, invalid={"progress": [2]})
    mask = np.arange(11) >= 3
    # the last valid progress before take-over is tick 1 (0.05)
    assert carl_reward(ep, mask, {}) == pytest.approx(0.65)
    assert carl_reward(ep, np.zeros(11, bool), {}) == 0.0


@pytest.mark.parametrize(("params", "expected"), [
    ({"wrong_lanes": 0.5}, "unknown CaRL param 'wrong_lanes'; did you mean 'wrong_lane'? valid: ["),
    ({"ttc": 1.5}, "CaRL factor ttc must be in [0, 1], got 1.5"),
    ({"comfort": "half"}, "CaRL param comfort must be a finite number, got 'half'"),
    ({"ttc_threshold_s": -1.0}, "CaRL param ttc_threshold_s must be > 0, got -1.0"),
    ({"terminal_penalty": -1.0}, "CaRL param terminal_penalty must be >= 0"),
])
def test_params_are_checked_at_validation(params, expected):
    with pytest.raises(RewardSpecError) as info:
        carl(**params)
    assert str(info.value).startswith("reward 'carl-test', term 1: ")
    assert expected in str(info.value)


def test_alpasim_needs_the_drivesim_only_factors_off():
    with pytest.raises(RewardSpecError, match=re.escape(
            "CaRL needs metrics this env does not report: {'ttc_s': 'factor ttc', 'comfort_violation': "
            "'factor comfort'}")):
        RewardFn.from_file("carl", ALPASIM_METRICS)
    term = {"kind": "python", "target": "rewards.carl:carl_reward", "params": {"ttc": 1.0, "comfort": 1.0}}
    RewardFn.from_mapping({"terms": [term]}, ALPASIM_METRICS)


def test_preset_spells_out_every_default():
    from rewards.spec import load_spec

    assert load_spec("carl").terms[0].params == DEFAULTS


def test_required_series_follow_the_params(episode):
    assert carl().required_series == ("eval_relevant", "collision_any", "offroad", "progress",
                                      "collision_front", "collision_lateral", "wrong_lane", "ttc_s",
                                      "comfort_violation")
    fn = carl(ttc=1.0, comfort=1.0, wrong_lane=1.0, collision_at_fault=1.0, offroad=1.0)
    assert fn.required_series == ("eval_relevant", "collision_any", "offroad", "progress")
    ep = episode(progress=PROGRESS)
    with pytest.raises(ValueError, match=r"the episode lacks the series \['ttc_s'\]"):
        carl().episode({k: v for k, v in ep.items() if k != "ttc_s"})
