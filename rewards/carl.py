"""CaRL's reward as a ``python`` term: route completion multiplied by soft penalty factors.

CaRL (Jaeger et al. 2025, "CaRL: Learning Scalable Planning Policies with Simple Rewards") rewards
each step with the route completion it gained, multiplied by a factor below 1 for every soft
infraction on that step; hard infractions end the episode, so the penalty for them is the progress
the policy no longer makes. Here, per counted tick ``t`` (the shared tick mask and a valid
``progress``)::

    value = sum_t gain_t * prod_i factor_i(t)   -   terminal_penalty * [hard failure]
    gain_t = max(progress up to t) - max(progress up to the previous counted tick)

``progress`` is AlpaSim's (a 0-1 fraction of the recorded path); the running max pays each stretch
of the route once, however often the ego drives back and forth. The first counted tick's gain is
measured from the last valid ``progress`` before it (the end of the warm-up), so only progress the
policy made counts.

Factors and the drivesim metrics they read (a factor of 1 turns it off; a factor applies on the
ticks where its condition holds and its metric is valid):

=====================  ===============================  ===================================
param (default)        condition on tick t              metric(s)
=====================  ===============================  ===================================
collision_at_fault 0   at-fault collision (hard)        collision_front or collision_lateral
offroad 0              off the drivable area (hard)     offroad
wrong_lane 0.5         against the lane direction       wrong_lane
ttc 0.5                ttc_s < ttc_threshold_s (0.95)   ttc_s (nuPlan's TTC bound)
comfort 0.5            a nuPlan comfort bound exceeded  comfort_violation
off_lane 1 (off)       lane_center_distance_m >         lane_center_distance_m
                       off_lane_threshold_m (1.85)
speeding 0.5           speed_mps > speed_limit_mps      speed_mps (off while
                                                        speed_limit_mps is null)
=====================  ===============================  ===================================

drivesim reports no per-lane speed limit, so speeding uses one fixed ``speed_limit_mps``.
``terminal_penalty`` (default 0) is subtracted once when a counted tick has a hard failure (an
at-fault collision or off-road): an optional extra beyond CaRL's multiplicative shape.

Pair this reward with an env that terminates on hard failures (drivesim:
``terminate_on_collision`` and ``terminate_on_offroad``), as CaRL does: with the shared tick mask
(``cut_after_failure``) nothing after the failure counts anyway, termination saves simulating it.
On AlpaSim, which reports no ``ttc_s``, ``comfort_violation``, ``lane_center_distance_m`` or
``speed_mps``, set ``ttc``, ``comfort``, ``off_lane`` and ``speeding`` to 1; the reward is then
checked to need only AlpaSim's metrics.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np

from rewards.spec import unknown_choice

DEFAULTS: dict[str, float | None] = {
    "collision_at_fault": 0.0,
    "offroad": 0.0,
    "wrong_lane": 0.5,
    "ttc": 0.5,
    "ttc_threshold_s": 0.95,
    "comfort": 0.5,
    "off_lane": 1.0,
    "off_lane_threshold_m": 1.85,
    "speeding": 0.5,
    "speed_limit_mps": None,
    "terminal_penalty": 0.0,
}
"""Every parameter and its default."""

FACTORS: dict[str, tuple[str, ...]] = {
    "collision_at_fault": ("collision_front", "collision_lateral"),
    "offroad": ("offroad",),
    "wrong_lane": ("wrong_lane",),
    "ttc": ("ttc_s",),
    "comfort": ("comfort_violation",),
    "off_lane": ("lane_center_distance_m",),
    "speeding": ("speed_mps",),
}
"""Penalty factor -> the per-tick metrics its condition reads."""
HARD_FAILURE_METRICS = ("collision_front", "collision_lateral", "offroad")


def _params(params: Mapping[str, Any]) -> dict[str, Any]:
    return {**DEFAULTS, **params}


def _active(p: Mapping[str, Any]) -> list[str]:
    """Factors that can change the reward."""
    active = [name for name in FACTORS if p[name] != 1.0]
    if p["speed_limit_mps"] is None and "speeding" in active:
        active.remove("speeding")
    return active


def _needed(p: Mapping[str, Any]) -> dict[str, str]:
    """``{metric: why}`` for the series the reward reads with params ``p``."""
    needed = {"progress": "route completion"}
    for name in _active(p):
        for metric in FACTORS[name]:
            needed.setdefault(metric, f"factor {name}")
    if p["terminal_penalty"] > 0:
        for metric in HARD_FAILURE_METRICS:
            needed.setdefault(metric, "terminal_penalty")
    return needed


def required_series(params: Mapping[str, Any]) -> list[str]:
    """Series an episode must carry for :func:`carl_reward` with ``params``."""
    return list(_needed(_params(params)))


def validate_params(params: Mapping[str, Any], metric_names: Collection[str]) -> None:
    """Check names and ranges of ``params`` and that the env reports the metrics they need.

    Called by ``rewards.spec.bind_terms`` before any rollout; raises ValueError."""
    for key in params:
        if key not in DEFAULTS:
            raise ValueError(unknown_choice("CaRL param", key, DEFAULTS))
    p = _params(params)
    for key, value in p.items():
        if key == "speed_limit_mps" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"CaRL param {key} must be a finite number, got {value!r}")
    for name in FACTORS:
        if not 0.0 <= p[name] <= 1.0:
            raise ValueError(f"CaRL factor {name} must be in [0, 1], got {p[name]}")
    for key in ("ttc_threshold_s", "off_lane_threshold_m", "speed_limit_mps"):
        if p[key] is not None and p[key] <= 0:
            raise ValueError(f"CaRL param {key} must be > 0, got {p[key]}")
    if p["terminal_penalty"] < 0:
        raise ValueError(f"CaRL param terminal_penalty must be >= 0, got {p['terminal_penalty']}")
    missing = {m: why for m, why in _needed(p).items() if m not in metric_names}
    if missing:
        raise ValueError(f"CaRL needs metrics this env does not report: {missing}; set the factor to 1 "
                         f"(or terminal_penalty to 0) to turn it off")


def _flags(series: Mapping[str, Any], name: str, p: Mapping[str, Any]) -> np.ndarray:
    """``[T]`` bool: ticks where factor ``name``'s condition holds (and its metrics are valid)."""
    def valid_values(metric: str) -> tuple[np.ndarray, np.ndarray]:
        values, valid, _ = series[metric]
        return np.asarray(values, dtype=np.float64), np.asarray(valid, dtype=bool)

    hit = None
    for metric in FACTORS[name]:
        v, ok = valid_values(metric)
        if name == "ttc":
            cond = v < p["ttc_threshold_s"]
        elif name == "off_lane":
            cond = v > p["off_lane_threshold_m"]
        elif name == "speeding":
            cond = v > p["speed_limit_mps"]
        else:
            cond = v > 0.5
        cond = cond & ok
        hit = cond if hit is None else hit | cond
    assert hit is not None
    return hit


def carl_reward(series: Mapping[str, Any], mask: np.ndarray, params: Mapping[str, Any]) -> float:
    """CaRL's episodic reward (module docstring) from per-tick series and the shared tick mask ``[T]``."""
    p = _params(params)
    progress, valid, _ = series["progress"]
    progress = np.asarray(progress, dtype=np.float64)
    valid = np.asarray(valid, dtype=bool)
    mask = np.asarray(mask, dtype=bool)
    value = 0.0
    idx = np.flatnonzero(mask & valid)
    if idx.size:
        before = np.flatnonzero(valid[: idx[0]])
        start = progress[before[-1]] if before.size else progress[idx[0]]
        best = np.maximum.accumulate(np.concatenate([[start], progress[idx]]))
        gain = np.diff(best)  # [n] >= 0
        factor = np.ones(progress.shape, dtype=np.float64)
        for name in _active(p):
            factor = np.where(_flags(series, name, p), factor * p[name], factor)
        value = float(np.sum(gain * factor[idx]))
    if p["terminal_penalty"] > 0:
        hard = np.zeros(mask.shape, dtype=bool)
        for name in ("collision_at_fault", "offroad"):
            hard |= _flags(series, name, p)
        if (hard & mask).any():
            value -= float(p["terminal_penalty"])
    return value


# hooks rewards.spec / rewards.compute look for on a python target
carl_reward.validate_params = validate_params  # type: ignore[attr-defined]
carl_reward.required_series = required_series  # type: ignore[attr-defined]
